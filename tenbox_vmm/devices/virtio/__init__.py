"""virtio devices (worker): split virtqueues, the virtio-mmio transport, blk, net and a power key (input).

The device models and the virtqueue know nothing of the transport: the same
classes serve virtio-mmio inside a tenbox VM and, later, vhost-user.
"""

# Device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Feature bits common to all devices
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

# Device ids
ID_NET = 1
ID_BLOCK = 2
ID_INPUT = 18

# Interrupt status bits
INT_VRING = 1
INT_CONFIG = 2
