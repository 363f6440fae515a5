"""Block backends behind virtio-blk: raw and qcow2 with backing chains (worker; create_qcow2 and image_info also daemon/CLI).

    disk = open_disk(path, read_only=False, fmt=None)   # fmt probed by magic when None
    disk.readv(offset, [memoryview, ...]); disk.writev(offset, views)
    disk.flush(); disk.discard(offset, n); disk.write_zeroes(offset, n, may_unmap)
    disk.close()

One I/O thread per disk drives it. Every failure is a DiskError with a
one-line message; the device answers VIRTIO_BLK_S_IOERR. Images are locked
against other writers the way QEMU locks them (lock.py).
"""

from __future__ import annotations

from tenbox_vmm.disk.base import Disk
from tenbox_vmm.disk.errors import (
    BackingFileError,
    DiskCorrupt,
    DiskError,
    DiskIOError,
    DiskPermissionError,
    DiskRangeError,
    DiskUnsupported,
    ImageLocked,
    ReadOnlyDisk,
)
from tenbox_vmm.disk.info import image_info
from tenbox_vmm.disk.opener import open_disk
from tenbox_vmm.disk.qcow2.create import create_qcow2

__all__ = [
    "BackingFileError",
    "Disk",
    "DiskCorrupt",
    "DiskError",
    "DiskIOError",
    "DiskPermissionError",
    "DiskRangeError",
    "DiskUnsupported",
    "ImageLocked",
    "ReadOnlyDisk",
    "create_qcow2",
    "image_info",
    "open_disk",
]
