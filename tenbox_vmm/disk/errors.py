"""Disk backend errors, one line each for operators (worker; also daemon/CLI through image_info and create).

The virtio-blk device fails a request with VIRTIO_BLK_S_IOERR on any
DiskError; the subclasses say why, for logs and for callers that care
(the CLI, the tests). Messages name the image file and, where there is
one, the fix.
"""

from __future__ import annotations

from typing import Optional


class DiskError(Exception):
    """A disk operation or image was refused, or failed; the message is one line for people."""


class DiskPermissionError(DiskError):
    """The image file (or one of its backing files) may not be opened with the caller's rights."""


class ReadOnlyDisk(DiskError):
    """A write, discard or write-zeroes on a disk opened read-only."""


class DiskRangeError(DiskError):
    """A request outside [0, size) of the virtual disk."""


class DiskIOError(DiskError):
    """The host file failed (EIO, ENOSPC, EFBIG...); `errno` says how. The image stays sound."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno


class DiskUnsupported(DiskError):
    """The image uses a feature this backend refuses (encryption, external data file, ...)."""


class DiskCorrupt(DiskError):
    """The image's metadata is inconsistent or points outside the file."""


class BackingFileError(DiskError):
    """A backing file is missing, loops, or cannot be used."""


class ImageLocked(DiskError):
    """Another process (QEMU or another tenbox VM) holds a conflicting lock on the image."""
