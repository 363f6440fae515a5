"""create_qcow2: a new empty qcow2 image, optionally over a backing file (daemon/CLI through imagetool; tests).

Layout, as qemu-img lays out small images: cluster 0 the header (with the
backing format and feature name extensions and the backing file name),
then the refcount table, the refcount blocks that count all of this, and
the L1 table (zeros). The image is written to a temporary file in the same
folder, fsync'd, and linked into place only if nothing exists there yet,
then the folder is fsync'd: a crash leaves either no image or a whole one.
"""

from __future__ import annotations

import errno
import os
import secrets
from typing import Optional

from tenbox_vmm.disk import backing as bk
from tenbox_vmm.disk.errors import DiskError
from tenbox_vmm.disk.qcow2 import format as F
from tenbox_vmm.disk.qcow2.header import Header, l1_entries_for, pack
from tenbox_vmm.disk.qcow2.refcount import set_entry

IMAGE_MODE = 0o644  # like qemu-img; the umask applies


def _log2(n: int) -> int:
    return n.bit_length() - 1


def create_qcow2(path: str, size: int, cluster_size: int = 65536, backing: Optional[str] = None,
                 backing_fmt: Optional[str] = None, refcount_bits: int = 16, lazy_refcounts: bool = False,
                 version: int = 3, open_backing: bool = True) -> None:
    """Create a qcow2 image at `path` (which must not exist).

    `size` is the virtual size in bytes, a multiple of 512; with a backing
    file, 0 means "the backing file's size". `backing` is stored as given:
    relative names are relative to the new image's folder. `version` 3 is
    qemu-img's compat=1.1, 2 is compat=0.10 (16-bit refcounts, no lazy
    refcounts). `open_backing` False (a backing image a running VM holds
    locked): `size` and `backing_fmt` are taken as given, the backing file
    is only located, not opened.
    """
    if version not in (2, 3):
        raise DiskError("qcow2 version must be 2 or 3, not %r" % (version,))
    if cluster_size & (cluster_size - 1) or not 1 << F.MIN_CLUSTER_BITS <= cluster_size <= 1 << F.MAX_CLUSTER_BITS:
        raise DiskError("cluster size must be a power of two from 512 B to 2 MiB, not %r" % (cluster_size,))
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise DiskError("refcount_bits must be a power of two from 1 to 64, not %r" % (refcount_bits,))
    if version == 2 and refcount_bits != 16:
        raise DiskError("qcow2 version 2 images have 16-bit refcounts only")
    if version == 2 and lazy_refcounts:
        raise DiskError("lazy refcounts need a qcow2 version 3 image")
    if os.path.lexists(path):
        raise DiskError("%s already exists; not overwriting it" % path)
    if backing is not None and open_backing:
        size, backing_fmt = _backing_size(path, backing, backing_fmt, size)
    elif backing is not None:
        bk.locate(path, backing, backing_fmt, 1)
    if size <= 0 or size % F.SECTOR:
        raise DiskError("virtual size must be a positive multiple of 512 bytes, not %r" % (size,))

    cb = _log2(cluster_size)
    cs = cluster_size
    l1_size = l1_entries_for(size, cb)
    if l1_size * 8 > F.L1_MAX_BYTES:
        raise DiskError("%d bytes is too large for %d-byte clusters (the L1 table would pass 32 MiB)" % (size, cs))
    l1_clusters = (l1_size * 8 + cs - 1) // cs
    per_block = cs * 8 // refcount_bits
    blocks, tclusters = 1, 1
    while True:
        total_clusters = 1 + tclusters + blocks + l1_clusters
        nb = (total_clusters + per_block - 1) // per_block
        nt = (nb * 8 + cs - 1) // cs
        if (nb, nt) == (blocks, tclusters):
            break
        blocks, tclusters = nb, nt
    table_off = cs
    blocks_off = table_off + tclusters * cs
    l1_off = blocks_off + blocks * cs

    h = Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb, size=size,
               crypt_method=0, l1_size=l1_size, l1_table_offset=l1_off if l1_size else 0,
               refcount_table_offset=table_off, refcount_table_clusters=tclusters, nb_snapshots=0,
               snapshots_offset=0)
    if version >= 3:
        h.refcount_order = _log2(refcount_bits)
        h.header_length = F.V3_HEADER_BYTES
        h.compatible_features = F.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0
    if backing is not None:
        h.backing_file = backing
        h.backing_format = backing_fmt
    first = pack(h)

    image = bytearray(l1_off + l1_clusters * cs)
    image[:len(first)] = first
    table = bytearray(tclusters * cs)
    for b in range(blocks):
        table[b * 8:b * 8 + 8] = (blocks_off + b * cs).to_bytes(8, "big")
    image[table_off:table_off + len(table)] = table
    for c in range(total_clusters):
        b, idx = divmod(c, per_block)
        start = blocks_off + b * cs
        block = image[start:start + cs]
        set_entry(block, idx, refcount_bits, 1)
        image[start:start + cs] = block
    _write_new(path, bytes(image))


def _backing_size(path: str, backing: str, backing_fmt: Optional[str], size: int):
    from tenbox_vmm.disk.opener import open_disk

    bpath = bk.locate(path, backing, backing_fmt, 1)
    with open_disk(bpath, read_only=True, fmt=backing_fmt) as b:
        return (size if size > 0 else b.size), b.format


def _write_new(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, ".%s.tmp-%s" % (os.path.basename(path), secrets.token_hex(6)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
    except OSError as e:
        raise DiskError("%s: cannot create: %s" % (path, e.strerror)) from None
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwrite
        except FileExistsError:
            raise DiskError("%s already exists; not overwriting it" % path) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise DiskError("%s: cannot create: %s" % (path, e.strerror)) from None
            # No hard links on this file system: rename, after checking again.
            if os.path.lexists(path):
                raise DiskError("%s already exists; not overwriting it" % path) from None
            os.rename(tmp, path)
    except OSError as e:
        raise DiskError("%s: cannot create: %s" % (path, e.strerror)) from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass  # renamed into place
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
