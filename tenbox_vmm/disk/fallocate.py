"""fallocate(2) hole punching and range zeroing through cffi's ABI mode (worker).

Python's os module has posix_fallocate but not fallocate's mode flags, so
libc's fallocate is called through cffi (the project's FFI). The FFI is
parsed on first use: only disks that discard pay for it. A file system that
cannot punch holes answers EOPNOTSUPP; callers then fall back to writing
zeros or doing nothing.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Optional

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

CDEF = "int fallocate(int fd, int mode, long offset, long len);"  # off_t is long on LP64 Linux

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_ffi: Optional[Any] = None
_libc: Optional[Any] = None


def _lib() -> Any:
    global _ffi, _libc
    if _libc is None:
        from tenbox_vmm.ffigen import load

        _ffi = load("tenbox_vmm.disk._fallocate_ffi", CDEF)
        _libc = _ffi.dlopen(None)
    return _libc


def _call(fd: int, mode: int, offset: int, length: int) -> bool:
    """True when done, False when the file system does not support `mode`; OSError otherwise."""
    if length <= 0:
        return True
    lib = _lib()
    if lib.fallocate(fd, mode, offset, length) == 0:
        return True
    err = _ffi.errno  # type: ignore[union-attr]
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate the range; it reads as zeros and the file keeps its size."""
    return _call(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> bool:
    """Zero the range, keeping it allocated (and the size, with KEEP_SIZE)."""
    return _call(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
