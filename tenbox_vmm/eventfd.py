"""eventfd(2) for ioeventfd and irqfd, on every Python the package supports (worker)."""

from __future__ import annotations

import os
import struct

EFD_CLOEXEC = 0o2000000
EFD_NONBLOCK = 0o4000
_U64 = struct.Struct("=Q")


def eventfd(nonblocking: bool = True) -> int:
    flags = EFD_CLOEXEC | (EFD_NONBLOCK if nonblocking else 0)
    if hasattr(os, "eventfd"):
        return os.eventfd(0, flags)  # novermin: guarded (Python 3.10+)
    from tenbox_vmm.kvm.ffi import ffi, libc

    fd = libc.eventfd(0, flags)
    if fd < 0:
        err = ffi.errno
        raise OSError(err, "eventfd: %s" % os.strerror(err))
    return fd


def signal(fd: int) -> None:
    """Add one to the counter: wakes a poller, or raises the irqfd's interrupt."""
    try:
        os.write(fd, _U64.pack(1))
    except BlockingIOError:
        pass  # the counter is saturated: the reader will see it anyway


def drain(fd: int) -> int:
    """Read and reset the counter (0 if nothing was signalled)."""
    try:
        return _U64.unpack(os.read(fd, 8))[0]
    except BlockingIOError:
        return 0
