"""The few libc and system calls the sandbox needs that Python's os module lacks (worker, root until it drops).

ctypes on libc, with errno: unshare, mount, umount2, pivot_root, prctl,
capset and madvise (for a standby's pages, tenbox_vmm/standby.py). Each raises OSError with errno and the call's name on failure.
Python 3.12 has os.unshare; the oldest interpreter tenbox supports (3.8)
does not, so all of them come from here.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

MADV_MERGEABLE = 12

CAP_SYS_ADMIN = 21

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# pivot_root has no libc wrapper: its number by architecture (asm/unistd_64.h, asm-generic/unistd.h).
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

# The interpreter's own C library, already loaded: dlopen(NULL), not ctypes.util.find_library,
# which runs `ldconfig -p` (a child process, milliseconds of every worker's start).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


# Version 3's two 32-bit halves. Made here, with the functions' pointers below, when a standby imports
# this: its spares then share them instead of each making its own after the fork.
_CapSets = _CapData * 2
_libc.capget.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
_libc.capset.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int, data: Optional[str] = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount %s" % target)


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags), "umount %s" % target)


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(0, "pivot_root: no system call number for %s" % os.uname().machine)
    _check(_libc.syscall(ctypes.c_long(nr), _b(new_root), _b(put_old)), "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    rc = _libc.prctl(option, arg2, arg3, arg4, arg5)
    _check(rc, "prctl(%d)" % option)
    return rc


def madvise(start: int, length: int, advice: int) -> None:
    _check(_libc.madvise(start, length, advice), "madvise")


def clear_capabilities() -> None:
    """Empty this thread's effective, permitted and inheritable capability sets (capset(2))."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapSets()  # version 3: two 32-bit halves, all zero
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def open_without_capability(path: str, flags: int, cap: int) -> int:
    """os.open with capability `cap` out of this thread's effective set for the call, then back: for files
    whose kernel reads the opener's capabilities when opened (pagemap shows page frame numbers only to
    CAP_SYS_ADMIN). The caller must be single-threaded or alone in holding `cap`'s meaning."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    saved = _CapSets()
    _check(_libc.capget(ctypes.byref(header), saved), "capget")
    word, bit = divmod(cap, 32)
    if not saved[word].effective & (1 << bit):
        return os.open(path, flags)
    lowered = _CapSets()
    ctypes.memmove(lowered, saved, ctypes.sizeof(saved))
    lowered[word].effective &= ~(1 << bit)
    _check(_libc.capset(ctypes.byref(header), lowered), "capset")
    try:
        return os.open(path, flags)
    finally:
        _check(_libc.capset(ctypes.byref(header), saved), "capset")


def kernel_log_size() -> int:
    """klogctl(SYSLOG_ACTION_SIZE_BUFFER): harmless, and outside every worker's seccomp filter."""
    return _libc.klogctl(10, None, 0)
