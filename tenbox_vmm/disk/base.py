"""The block-backend interface that virtio-blk drives (worker, from the disk's one I/O thread).

A `Disk` is used by one thread at a time: the device's I/O thread issues
every request, and `close` comes after that thread has stopped. A backend
that sets `concurrent_io` (raw: one positional syscall per request, no
shared metadata) may have a batch of reads and writes run on several
threads at once; flushes still come alone. Buffers are
memoryviews into guest RAM; backends move data between them and the image
file with preadv/pwritev, without copying it through Python objects.
"""

from __future__ import annotations

import abc
from typing import Sequence

from tenbox_vmm.disk.errors import DiskError, DiskRangeError, ReadOnlyDisk


class Disk(abc.ABC):
    """One opened image (and, for qcow2, its backing chain)."""

    path: str
    format: str  # "raw" | "qcow2"
    size: int  # virtual bytes
    read_only: bool
    concurrent_io = False
    _closed = False

    @abc.abstractmethod
    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill `bufs` from [offset, offset + total): zeros where nothing is allocated."""

    @abc.abstractmethod
    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write `bufs` at `offset`; durable after the next `flush`."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Give the range back to the host; what it reads as afterwards is backend-defined."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeros; `may_unmap` lets the backend deallocate it."""

    def grow(self, size: int) -> None:
        """Make the virtual disk `size` bytes (not less than it is), durably; the new part reads as zeros."""
        raise DiskError("%s: %s disks cannot grow" % (self.path, self.format))

    def _check_growth(self, size: int) -> None:
        self._check_open()
        self._check_writable()
        if size < self.size:
            raise DiskError("%s: %d bytes is smaller than the disk (%d bytes): disks only grow"
                            % (self.path, size, self.size))
        if size % 512:
            raise DiskError("%s: %d bytes is not a whole number of 512-byte sectors" % (self.path, size))

    @abc.abstractmethod
    def close(self) -> None:
        """Flush, release locks and files. Idempotent."""

    def __enter__(self) -> "Disk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<%s %s %s size=%d%s>" % (type(self).__name__, self.format, self.path, self.size,
                                        " ro" if self.read_only else "")

    # Helpers for subclasses -------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskRangeError("%s: request [%d, +%d) is outside the disk (%d bytes)"
                                 % (self.path, offset, length, self.size))

    def _check_open(self) -> None:
        if self._closed:
            raise DiskError("%s: the disk is closed" % self.path)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyDisk("%s: the disk is read-only" % self.path)
