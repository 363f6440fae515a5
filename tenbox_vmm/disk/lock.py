"""Image locking compatible with QEMU's file-posix "image locking" (worker; also create for backing files).

QEMU expresses who may use an image as block-layer permissions and turns
them into OFD byte-range locks (fcntl F_OFD_SETLK, shared/read locks only)
on the image file (block/file-posix.c, raw_apply_lock_bytes):

  * byte 100 + n is locked by every user that *holds* permission bit n;
  * byte 200 + n is locked by every user that does *not share* permission n
    with others;

then it tests (F_OFD_GETLK with a write lock) for conflicts
(raw_check_lock_bytes): a permission we want is refused if anybody locks
200 + n; a permission we refuse to share is refused if anybody locks 100 + n.

Permission bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize.
A qcow2 image opened read-write by qemu-io or qemu-system holds bytes 100,
101, 103 and 201, 203; opened read-only (also as a backing file) 100 and
201, 203. tenbox uses exactly those sets for raw and qcow2 alike (for raw,
stricter than qemu-io, which shares write): two tenbox VMs never write one
image, a template in use as a backing file cannot be opened for writing,
and QEMU and tenbox exclude each other both ways.

Locks belong to the open file description: closing the image's fd drops
them. Where OFD locks are missing (Linux < 3.15) process-wide POSIX locks
stand in, as QEMU falls back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import List

PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_BITS = 4
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# What tenbox holds and refuses to share (the sets QEMU uses for a qcow2 image).
READ_WRITE_PERMS = PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
READ_ONLY_PERMS = PERM_CONSISTENT_READ
UNSHARED_PERMS = PERM_WRITE | PERM_RESIZE  # nobody may change the file under us

# Linux fcntl commands (asm-generic/fcntl.h); the fcntl module has them from Python 3.9 only.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock on LP64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("@hhqqi4x")


class LockConflict(Exception):
    """Another process holds a conflicting lock; the message says which permission."""


class _Locker:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.get_cmd, self.set_cmd = F_OFD_GETLK, F_OFD_SETLK

    def _fcntl(self, cmd: int, arg: bytes) -> bytes:
        try:
            return fcntl.fcntl(self.fd, cmd, arg)  # type: ignore[return-value]
        except OSError as e:
            if e.errno == errno.EINVAL and cmd in (F_OFD_GETLK, F_OFD_SETLK):
                # No OFD locks on this kernel: fall back to POSIX locks, as QEMU does.
                self.get_cmd, self.set_cmd = fcntl.F_GETLK, fcntl.F_SETLK
                return fcntl.fcntl(self.fd, fcntl.F_GETLK if cmd == F_OFD_GETLK else fcntl.F_SETLK, arg)  # type: ignore[return-value]
            raise

    def lock_shared(self, byte: int) -> bool:
        """A read lock on one byte; False if someone holds a write lock there."""
        try:
            self._fcntl(self.set_cmd, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def unlock(self, byte: int) -> None:
        self._fcntl(self.set_cmd, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0))

    def held_elsewhere(self, byte: int) -> bool:
        """Whether another file description holds any lock on the byte."""
        r = self._fcntl(self.get_cmd, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return _FLOCK.unpack(r)[0] != fcntl.F_UNLCK


def _bits(mask: int) -> List[int]:
    return [i for i in range(PERM_BITS) if mask & (1 << i)]


def acquire(fd: int, writable: bool) -> None:
    """Take QEMU's lock bytes for a read-write or read-only user; LockConflict if in use.

    As QEMU does, locks are applied first and conflicts tested afterwards, so
    two racing openers cannot both miss each other (both may fail; neither
    proceeds unsafely). On conflict every lock taken here is dropped again.
    """
    perms = READ_WRITE_PERMS if writable else READ_ONLY_PERMS
    locker = _Locker(fd)
    taken: List[int] = []
    try:
        for bytes_, mask in ((LOCK_PERM_BASE, perms), (LOCK_SHARED_BASE, UNSHARED_PERMS)):
            for i in _bits(mask):
                if not locker.lock_shared(bytes_ + i):
                    raise LockConflict('failed to get "%s" lock' % PERM_NAMES[1 << i])
                taken.append(bytes_ + i)
        for i in _bits(perms):
            if locker.held_elsewhere(LOCK_SHARED_BASE + i):
                raise LockConflict('failed to get "%s" lock' % PERM_NAMES[1 << i])
        for i in _bits(UNSHARED_PERMS):
            if locker.held_elsewhere(LOCK_PERM_BASE + i):
                raise LockConflict('failed to get shared "%s" lock' % PERM_NAMES[1 << i])
    except BaseException:
        for byte in taken:
            try:
                locker.unlock(byte)
            except OSError:
                pass  # the fd is about to be closed by the caller, which drops the lock anyway
        raise



def downgrade(fd: int) -> None:
    """A read-write user's locks become a read-only user's: the image is now another image's backing file
    (a snapshot's layer), which other VMs may open read-only as well."""
    locker = _Locker(fd)
    for i in _bits(READ_WRITE_PERMS & ~READ_ONLY_PERMS):
        locker.unlock(LOCK_PERM_BASE + i)
