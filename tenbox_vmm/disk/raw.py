"""The raw backend: the image file is the disk, byte for byte (worker).

Reads and writes are one preadv/pwritev each, straight between the file and
the caller's views. The size is the file's size at open. Discard punches a
hole (fallocate PUNCH_HOLE|KEEP_SIZE), so a discarded range reads as zeros;
where the file system cannot punch, discard does nothing (it is a hint).
write_zeroes punches (may_unmap) or zeroes the range in place
(FALLOC_FL_ZERO_RANGE), falling back to writing zeros.

A raw image whose format was probed rather than declared refuses writes
that would put a qcow2 header at offset 0: otherwise a guest could turn its
disk into a qcow2 image naming any host file as its backing file (QEMU
guards probed raw images the same way).
"""

from __future__ import annotations

from typing import Callable, Sequence

from tenbox_vmm.disk import lock
from tenbox_vmm.disk.base import Disk
from tenbox_vmm.disk.errors import DiskError, DiskIOError, ImageLocked
from tenbox_vmm.disk.fileio import ImageFile
from tenbox_vmm.disk.iov import as_views, total, zero_views

QCOW2_MAGIC = b"QFI\xfb"


class RawDisk(Disk):
    format = "raw"
    # Every request is one positional syscall on the image with no shared
    # metadata, so virtio-blk may run a batch of them on several threads.
    concurrent_io = True

    def __init__(self, path: str, read_only: bool = False, probed: bool = False,
                 file_factory: Callable[[str, bool], ImageFile] = ImageFile) -> None:
        self.path = path
        self.read_only = read_only
        self.probed = probed
        self._file: ImageFile = file_factory(path, not read_only)
        try:
            lock.acquire(self._file.fd, not read_only)
        except lock.LockConflict as e:
            self._file.close()
            raise ImageLocked("%s: %s: the image is in use by another process (a QEMU or another tenbox VM)"
                              % (path, e)) from None
        except OSError as e:
            self._file.close()
            raise DiskError("%s: cannot lock the image: %s" % (path, e.strerror)) from None
        self.size = self._file.end
        self._closed = False

    def grow(self, size: int) -> None:
        self._check_growth(size)
        self._check_usable()
        self._file.extend(size)
        self._file.datasync()
        self.size = size

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = as_views(bufs)
        self._check_range(offset, total(views))
        self._check_open()
        self._file.readv(offset, views)

    def _check_usable(self) -> None:
        self._check_writable()
        self._check_open()
        if self._file.sync_error:
            raise DiskIOError("%s: refusing writes after an earlier failure (%s); reopen the disk"
                              % (self.path, self._file.sync_error))

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._check_usable()
        views = as_views(bufs)
        self._check_range(offset, total(views))
        if self.probed and offset < len(QCOW2_MAGIC) and views:
            self._refuse_magic(offset, views)
        self._file.writev(offset, views)

    def _refuse_magic(self, offset: int, views: Sequence[memoryview]) -> None:
        head = bytearray(self._file.read(0, len(QCOW2_MAGIC)))
        data = b"".join(bytes(v[:len(QCOW2_MAGIC)]) for v in views)[:len(QCOW2_MAGIC) - offset]
        head[offset:offset + len(data)] = data
        if bytes(head) == QCOW2_MAGIC:
            raise DiskError("%s: refusing to write a qcow2 header into a raw image whose format was probed;"
                            " open it with fmt='raw'" % self.path)

    def flush(self) -> None:
        if not self.read_only and not self._closed:
            if self._file.sync_error:
                raise DiskIOError("%s: an earlier %s; writes since then may be lost" % (self.path, self._file.sync_error))
            self._file.datasync()

    def discard(self, offset: int, length: int) -> None:
        self._check_usable()
        self._check_range(offset, length)
        self._file.punch_hole(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check_usable()
        self._check_range(offset, length)
        if length == 0:
            return
        if may_unmap and self._file.punch_hole(offset, length):
            return
        if self._file.zero_range(offset, length):
            return
        self._file.writev(offset, zero_views(length))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                self._file.datasync()
        finally:
            self._file.close()
