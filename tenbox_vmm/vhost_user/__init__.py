"""A vhost-user backend front for tenbox's virtio devices (tenbox-vhost-user-*, a process of its own).

The same virtqueue, virtio-blk (qcow2, backing chains) and virtio-net
(libslirp) code the KVM worker uses, served to any vhost-user front end
(QEMU, Cloud Hypervisor, crosvm) over a unix socket.
"""
