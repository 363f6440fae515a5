"""qcow2 header and header extensions: parse, validate, serialise (worker; also daemon/CLI via info and create).

`parse` checks every field against the spec and against the file's size
(tables that end past EOF are refused as corrupt), and refuses features
this backend does not implement, in one line naming the feature. The
refusals that depend on writing (corrupt bit, internal snapshots) are in
`check_writable`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from tenbox_vmm.disk.errors import DiskCorrupt, DiskError, DiskUnsupported
from tenbox_vmm.disk.qcow2 import format as F

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 72..104
_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = F.V2_REFCOUNT_ORDER
    header_length: int = F.V2_HEADER_BYTES
    compression_type: int = F.COMPRESSION_ZLIB
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    feature_names: Dict[Tuple[int, int], str] = field(default_factory=dict)
    has_bitmaps: bool = False
    has_data_file_name: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & F.COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & F.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & F.INCOMPAT_CORRUPT)

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit), "unknown feature bit %d" % bit)


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map `size` virtual bytes."""
    per_l1 = (1 << cluster_bits) * ((1 << cluster_bits) // 8)
    return (size + per_l1 - 1) // per_l1


def parse(buf: bytes, file_size: int, path: str) -> Header:
    """The header in `buf` (the image's first cluster, or all of a shorter file)."""
    if len(buf) < 4 or bytes(buf[:4]) != F.MAGIC:
        raise DiskError("%s: not a qcow2 image (no QFI\\xfb magic)" % path)
    if len(buf) < 8:
        raise DiskCorrupt("%s: truncated qcow2 header" % path)
    version = struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise DiskUnsupported("%s: qcow version %d is not supported (only qcow2 versions 2 and 3)" % (path, version))
    if len(buf) < F.V2_HEADER_BYTES:
        raise DiskCorrupt("%s: truncated qcow2 header (%d bytes)" % (path, len(buf)))
    (_, _, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf, 0)
    h = Header(version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off)
    if not F.MIN_CLUSTER_BITS <= cbits <= F.MAX_CLUSTER_BITS:
        raise DiskUnsupported("%s: cluster size 2^%d is not supported (512 B .. 2 MiB)" % (path, cbits))
    cs = h.cluster_size
    if version == 3:
        if len(buf) < F.V3_HEADER_MIN_BYTES:
            raise DiskCorrupt("%s: truncated qcow2 v3 header" % path)
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(buf, 72)
        if h.header_length < F.V3_HEADER_MIN_BYTES or h.header_length % 8 or h.header_length > cs:
            raise DiskCorrupt("%s: invalid header length %d" % (path, h.header_length))
        if len(buf) < h.header_length:
            raise DiskCorrupt("%s: truncated qcow2 v3 header" % path)
        if h.header_length > 104:
            h.compression_type = buf[104]
    if h.refcount_order > F.MAX_REFCOUNT_ORDER:
        raise DiskCorrupt("%s: refcount order %d is over 6 (64-bit refcounts)" % (path, h.refcount_order))

    _parse_extensions(h, buf, path)

    # Refusals of features this backend does not implement.
    if crypt != F.CRYPT_NONE:
        raise DiskUnsupported("%s: encrypted images (%s) are not supported"
                              % (path, {1: "AES", 2: "LUKS"}.get(crypt, "method %d" % crypt)))
    unknown = h.incompatible_features & ~F.INCOMPAT_KNOWN
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        raise DiskUnsupported("%s: unsupported incompatible feature(s): %s"
                              % (path, ", ".join(h.feature_name(0, b) for b in bits)))
    if h.incompatible_features & F.INCOMPAT_DATA_FILE or h.has_data_file_name:
        raise DiskUnsupported("%s: images with an external data file are not supported" % path)
    if h.incompatible_features & F.INCOMPAT_EXTL2:
        raise DiskUnsupported("%s: images with extended L2 entries (subclusters) are not supported" % path)
    if h.incompatible_features & F.INCOMPAT_COMPRESSION:
        if h.header_length <= 104 or h.compression_type == F.COMPRESSION_ZLIB:
            raise DiskCorrupt("%s: compression type bit set without a compression type" % path)
        if h.compression_type not in F.COMPRESSION_NAMES:
            raise DiskUnsupported("%s: unknown compression type %d" % (path, h.compression_type))
    elif h.compression_type != F.COMPRESSION_ZLIB:
        if h.compression_type in F.COMPRESSION_NAMES:
            raise DiskCorrupt("%s: compression type %d without the compression type bit" % (path, h.compression_type))
        raise DiskUnsupported("%s: unknown compression type %d" % (path, h.compression_type))

    # Tables must be aligned and inside the file.
    _check_table(path, "L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size, allow_empty=True)
    if h.l1_size * 8 > F.L1_MAX_BYTES:
        raise DiskUnsupported("%s: L1 table of %d entries is over QEMU's 32 MiB limit" % (path, h.l1_size))
    if h.l1_size < l1_entries_for(h.size, cbits):
        raise DiskCorrupt("%s: L1 table too small (%d entries) for the virtual size %d" % (path, h.l1_size, h.size))
    if h.refcount_table_clusters == 0:
        raise DiskCorrupt("%s: empty refcount table" % path)
    if h.refcount_table_clusters * cs > F.REFTABLE_MAX_BYTES:
        raise DiskCorrupt("%s: refcount table of %d clusters is over QEMU's 8 MiB limit"
                          % (path, h.refcount_table_clusters))
    _check_table(path, "refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size)
    if h.nb_snapshots:
        _check_table(path, "snapshot table", h.snapshots_offset, 1, cs, file_size)
    return h


def _check_table(path: str, name: str, offset: int, nbytes: int, cs: int, file_size: int,
                 allow_empty: bool = False) -> None:
    if allow_empty and nbytes == 0:
        return
    if offset % cs or offset == 0:
        raise DiskCorrupt("%s: %s offset %#x is not a valid cluster offset" % (path, name, offset))
    if offset + nbytes > file_size:
        raise DiskCorrupt("%s: %s [%#x, +%d) ends past the end of the file (%d bytes)"
                          % (path, name, offset, nbytes, file_size))


def _parse_extensions(h: Header, buf: bytes, path: str) -> None:
    cs = h.cluster_size
    pos = h.header_length
    if h.backing_file_offset:
        if h.backing_file_size > F.BACKING_NAME_MAX or h.backing_file_size == 0:
            raise DiskCorrupt("%s: backing file name length %d is invalid" % (path, h.backing_file_size))
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_offset < pos or end > cs or end > len(buf):
            raise DiskCorrupt("%s: backing file name lies outside the first cluster" % path)
        h.backing_file = os.fsdecode(bytes(buf[h.backing_file_offset:end]))
        limit = h.backing_file_offset
    else:
        limit = min(cs, len(buf))
    while pos + _EXT.size <= limit:
        etype, elen = _EXT.unpack_from(buf, pos)
        pos += _EXT.size
        if etype == F.EXT_END:
            return
        if pos + elen > limit:
            raise DiskCorrupt("%s: header extension %#x overflows the first cluster" % (path, etype))
        data = bytes(buf[pos:pos + elen])
        if etype == F.EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif etype == F.EXT_FEATURE_TABLE:
            for i in range(0, elen - elen % _FEATURE.size, _FEATURE.size):
                kind, bit, name = _FEATURE.unpack_from(data, i)
                h.feature_names[(kind, bit)] = name.split(b"\0", 1)[0].decode("ascii", "replace")
        elif etype == F.EXT_BITMAPS:
            h.has_bitmaps = True
        elif etype == F.EXT_DATA_FILE:
            h.has_data_file_name = True
        pos += (elen + 7) & ~7
    # No end marker before the limit: QEMU accepts a first cluster that is full of extensions.


def check_writable(h: Header, path: str) -> None:
    """Refusals that only apply when the image is opened for writing."""
    if h.corrupt:
        raise DiskUnsupported("%s: the image is marked corrupt; it can be opened read-only, or repaired with"
                              " 'qemu-img check -r all'" % path)
    if h.nb_snapshots:
        raise DiskUnsupported("%s: the image has %d internal snapshot(s); tenbox writes only images without"
                              " (delete them with 'qemu-img snapshot -d', or open read-only)" % (path, h.nb_snapshots))


def read_header(f, path: str) -> Header:  # f: ImageFile
    """Read and parse the header (and its first cluster) of the open image file `f`."""
    head = f.read(0, min(4096, max(f.end, 0)))
    if len(head) >= 24 and bytes(head[:4]) == F.MAGIC:
        cbits = struct.unpack_from(">I", head, 20)[0]
        if F.MIN_CLUSTER_BITS <= cbits <= F.MAX_CLUSTER_BITS and (1 << cbits) > len(head):
            head = f.read(0, min(1 << cbits, f.end))
    return parse(bytes(head), f.end, path)


# Serialisation (create) ------------------------------------------------------------------


def pack(h: Header) -> bytes:
    """The first cluster's contents before padding: header, extensions, backing file name.

    The feature name table is optional: it is left out when it would not fit
    in the first cluster (512-byte clusters with a backing file), as qemu-img does.
    """
    out = _pack(h, with_feature_table=h.version >= 3)
    if len(out) > h.cluster_size and h.version >= 3:
        out = _pack(h, with_feature_table=False)
    if len(out) > h.cluster_size:
        raise DiskError("header and backing file name do not fit in one %d-byte cluster" % h.cluster_size)
    return out


def _pack(h: Header, with_feature_table: bool) -> bytes:
    out = bytearray(_V2.pack(F.MAGIC, h.version, 0, 0, h.cluster_bits, h.size, h.crypt_method, h.l1_size,
                             h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters,
                             h.nb_snapshots, h.snapshots_offset))
    if h.version >= 3:
        out += _V3.pack(h.incompatible_features, h.compatible_features, h.autoclear_features,
                        h.refcount_order, h.header_length)
        out += bytes(h.header_length - len(out))
        if h.header_length > 104:
            out[104] = h.compression_type
    exts: List[Tuple[int, bytes]] = []
    if h.backing_format:
        exts.append((F.EXT_BACKING_FORMAT, h.backing_format.encode("ascii")))
    if with_feature_table:
        exts.append((F.EXT_FEATURE_TABLE, b"".join(_FEATURE.pack(k, b, n.encode("ascii"))
                                                  for k, b, n in F.FEATURE_TABLE)))
    for etype, data in exts:
        out += _EXT.pack(etype, len(data)) + data + bytes(-len(data) % 8)
    out += _EXT.pack(F.EXT_END, 0)
    if h.backing_file:
        name = os.fsencode(h.backing_file)
        struct.pack_into(">QI", out, 8, len(out), len(name))
        out += name
    return bytes(out)
