#!/bin/sh
# `make demo`: boot a VM with tenbox-vm-runtime and show its console.
# This host's /dev/kvm decides the guest: with vmx/svm, Debian's cloud kernel
# and the project's busybox initramfs; without, the `boot` test guest (stock
# Linux cannot boot in useful time on a software KVM; see docs/testing.md).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/usr/bin/python3}
export PYTHONPATH="$PWD"

if grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
    echo "demo: this host has hardware virtualization: booting Debian's cloud kernel"
    make -s linux
    exec "$PY" -m tenbox_vmm --kernel .cache/linux/vmlinuz --initrd .cache/linux/initramfs.cpio.gz \
        --memory 256 --cpus 2 --console stdio \
        --cmdline "console=ttyS0 reboot=k panic=1 pci=off quiet tenbox.run=uname%20-a" </dev/null
fi
echo "demo: no vmx/svm on this host: booting the 'boot' test guest (it checks the boot contract and reports)"
exec "$PY" -m tenbox_vmm --kernel tests/guests/out/boot.bzImage --memory 64 --cpus 1 --console stdio \
    --cmdline "console=ttyS0 expect.mem_mb=64" </dev/null
