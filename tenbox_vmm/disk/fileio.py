"""One open image file: positional vectored I/O with OS errors as DiskIOError (worker).

This is the seam between the backends and the OS: every read, write and
sync of image data and metadata goes through an `ImageFile`, so tests can
substitute one that fails the Nth write with EIO or ENOSPC. `end` tracks the
file's length including our own appends (clusters are allocated past it).
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import Optional, Sequence, Union

from tenbox_vmm import passed_files
from tenbox_vmm.disk import fallocate
from tenbox_vmm.disk.errors import DiskError, DiskIOError, DiskPermissionError
from tenbox_vmm.disk.iov import IOV_MAX, advance, total, zero_fill, zero_views

Data = Union[bytes, bytearray, memoryview]


class ImageFile:
    """An image file opened read-only or read-write (O_CLOEXEC; page cache, no O_DIRECT)."""

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.fd = passed_files.open_fd(path, flags)  # a sandboxed worker's images are passed to it
        except FileNotFoundError:
            raise DiskError("%s: no such file" % path) from None
        except IsADirectoryError:
            raise DiskError("%s: is a directory, not a disk image" % path) from None
        except PermissionError:
            raise DiskPermissionError("%s: permission denied (opening it %s)"
                            % (path, "read-write" if writable else "read-only")) from None
        except OSError as e:
            raise DiskError("%s: cannot open: %s" % (path, e.strerror)) from None
        try:
            self.end = os.fstat(self.fd).st_size
        except OSError as e:  # pragma: no cover - fstat on a fresh fd does not fail
            os.close(self.fd)
            raise DiskError("%s: cannot stat: %s" % (path, e.strerror)) from None
        self._punch_ok = True
        self._zero_range_ok = True
        # Set by a failed fdatasync: the kernel may have dropped dirty pages, so nothing written
        # since the last good sync can be trusted; the backends refuse further writes.
        self.sync_error: Optional[str] = None

    def _fail(self, what: str, offset: int, e: OSError) -> DiskIOError:
        return DiskIOError("%s: %s at offset %d failed: %s" % (self.path, what, offset, e.strerror or e), e.errno)

    def readv(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill `views` from `offset`; bytes past the end of the file read as zeros."""
        rest = views  # copied only if the first call falls short
        pos = offset
        while rest:
            batch = rest if len(rest) <= IOV_MAX else rest[:IOV_MAX]
            try:
                n = os.preadv(self.fd, batch, pos)
            except OSError as e:
                raise self._fail("read", pos, e) from None
            if n == 0:
                zero_fill(rest)
                return
            if batch is rest and n == total(batch):
                return  # the usual case: all of it in one call
            pos += n
            rest = advance(list(rest), n)

    def writev(self, offset: int, views: Sequence[memoryview]) -> None:
        rest = views  # copied only if the first call falls short
        pos = offset
        while rest:
            batch = rest if len(rest) <= IOV_MAX else rest[:IOV_MAX]
            try:
                n = os.pwritev(self.fd, batch, pos)
            except OSError as e:
                raise self._fail("write", pos, e) from None
            if n == 0:  # pragma: no cover - regular files do not do this
                raise DiskIOError("%s: write at offset %d made no progress" % (self.path, pos), errno_mod.EIO)
            pos += n
            if pos > self.end:
                self.end = pos
            if batch is rest and n == total(batch):
                return  # the usual case: all of it in one call
            rest = advance(list(rest), n)

    def read(self, offset: int, n: int) -> bytearray:
        """`n` bytes at `offset` (metadata); zeros past the end of the file."""
        buf = bytearray(n)
        if n:
            self.readv(offset, [memoryview(buf)])
        return buf

    def write(self, offset: int, data: Data) -> None:
        self.writev(offset, [memoryview(data)])

    def write_zeros(self, offset: int, n: int) -> None:
        self.writev(offset, zero_views(n))

    def extend(self, size: int) -> None:
        """Make the file `size` bytes long (a raw disk growing); never shorter than it is."""
        if size <= self.end:
            return
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise self._fail("extend to %d bytes" % size, 0, e) from None
        self.end = size

    def datasync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self.sync_error = "fdatasync failed: %s" % (e.strerror or e)
            raise DiskIOError("%s: %s" % (self.path, self.sync_error), e.errno) from None

    def punch_hole(self, offset: int, n: int) -> bool:
        """Deallocate [offset, offset+n) keeping the size; False where the file system cannot."""
        if not self._punch_ok:
            return False
        try:
            done = fallocate.punch_hole(self.fd, offset, n)
        except OSError as e:
            raise self._fail("punch hole", offset, e) from None
        self._punch_ok = done
        return done

    def zero_range(self, offset: int, n: int) -> bool:
        """Zero [offset, offset+n) keeping it allocated; False where the file system cannot."""
        if not self._zero_range_ok:
            return False
        try:
            done = fallocate.zero_range(self.fd, offset, n)
        except OSError as e:
            raise self._fail("zero range", offset, e) from None
        self._zero_range_ok = done
        if done and offset + n > self.end:  # pragma: no cover - callers stay inside the file
            self.end = offset + n
        return done

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # also drops this file description's OFD locks

