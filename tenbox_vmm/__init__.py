"""tenbox_vmm: one VM per process on /dev/kvm (the `tenbox-vm-runtime` worker)."""

__version__ = "0.1.0"
