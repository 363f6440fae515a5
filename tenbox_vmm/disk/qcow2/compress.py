"""Decompression of qcow2 compressed clusters: raw deflate (zlib) and zstd (worker).

A compressed cluster is a raw deflate stream (no zlib header; QEMU writes it
with a 4 KiB window) or one or more zstd frames, followed by whatever else
shares its last sector; decompression stops once a whole cluster came out.
zstd needs the `zstandard` module (Debian: python3-zstandard), imported on
the first zstd cluster only.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Optional

from tenbox_vmm.disk.errors import DiskCorrupt, DiskUnsupported
from tenbox_vmm.disk.qcow2 import format as F

ZSTD_FRAMES_MAX = 64  # a cluster is at most 2 MiB: more frames than this is garbage

_zstd: Optional[Any] = None


def _zstandard() -> Any:
    global _zstd
    if _zstd is None:
        try:
            import zstandard  # novermin - optional, Debian's python3-zstandard
        except ImportError:
            raise DiskUnsupported("this image has zstd-compressed clusters and the Python module 'zstandard'"
                                  " is missing (apt-get install python3-zstandard)") from None
        _zstd = zstandard
    return _zstd


def decompress(ctype: int, data: bytes, cluster_size: int, where: str) -> bytes:
    """One cluster from its compressed bytes; DiskCorrupt if they do not make a whole cluster."""
    if ctype == F.COMPRESSION_ZLIB:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as e:
            raise DiskCorrupt("%s: compressed cluster does not inflate: %s" % (where, e)) from None
    elif ctype == F.COMPRESSION_ZSTD:
        out = _zstd_cluster(data, cluster_size, where)
    else:  # pragma: no cover - the header parser refuses other types
        raise DiskUnsupported("%s: unknown compression type %d" % (where, ctype))
    if len(out) < cluster_size:
        raise DiskCorrupt("%s: compressed cluster inflates to %d bytes, not %d" % (where, len(out), cluster_size))
    return out


def _zstd_cluster(data: bytes, cluster_size: int, where: str) -> bytes:
    """At most cluster_size bytes out of the frames in `data`, never more in memory.

    A guest-supplied image is untrusted: 2 KiB of zstd can describe 64 MiB of
    zeros (measured), so the output is bounded while it is made, as zlib's
    max_length does, not cut after the fact.
    """
    zstd = _zstandard()
    dctx = zstd.ZstdDecompressor()
    try:
        reader = dctx.stream_reader(io.BytesIO(data), read_across_frames=True)
    except TypeError:  # python3-zstandard before 0.15: frame by frame, bounded below
        return _zstd_frames(zstd, dctx, data, cluster_size, where)
    out = bytearray()
    try:
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    except zstd.ZstdError as e:
        raise DiskCorrupt("%s: zstd cluster does not decompress: %s" % (where, e)) from None
    return bytes(out)


ZSTD_FEED_BYTES = 8  # a zstd block (up to 128 KiB out) takes at least 4 bytes in: 8 in, at most 256 KiB out


def _zstd_frames(zstd: Any, dctx: Any, data: bytes, cluster_size: int, where: str) -> bytes:
    out = bytearray()
    rest = data
    for _ in range(ZSTD_FRAMES_MAX):
        obj = dctx.decompressobj()
        try:
            for i in range(0, len(rest), ZSTD_FEED_BYTES):
                out += obj.decompress(rest[i : i + ZSTD_FEED_BYTES])
                if len(out) >= cluster_size:
                    return bytes(out[:cluster_size])
        except zstd.ZstdError as e:
            raise DiskCorrupt("%s: zstd cluster does not decompress: %s" % (where, e)) from None
        rest = getattr(obj, "unused_data", b"")
        if not rest:
            break
    return bytes(out)
