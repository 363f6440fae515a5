"""The cffi handle on the KVM API and libc's ioctl (worker)."""

from __future__ import annotations

from tenbox_vmm.ffigen import load
from tenbox_vmm.kvm._cdef import CDEF

ffi = load("tenbox_vmm.kvm._kvm_ffi", CDEF)
libc = ffi.dlopen(None)
