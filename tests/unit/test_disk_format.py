"""qcow2 metadata: header round trip, refcount packing, creation rules, refusals with one clear line."""

from __future__ import annotations

import os
import struct

import pytest

from tenbox_vmm.disk import (
    BackingFileError,
    DiskCorrupt,
    DiskError,
    DiskUnsupported,
    create_qcow2,
    image_info,
    open_disk,
)
from tenbox_vmm.disk.qcow2 import format as F
from tenbox_vmm.disk.qcow2.header import parse
from tenbox_vmm.disk.qcow2.image import l2_cache_slices
from tenbox_vmm.disk.qcow2.refcount import get_entry, plan_area, set_entry


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_incompat(path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(F.OFF_INCOMPATIBLE)
        old = struct.unpack(">Q", f.read(8))[0]
        f.seek(F.OFF_INCOMPATIBLE)
        f.write(struct.pack(">Q", old | bits))


@pytest.fixture
def img(tmp_path):
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, 8 << 20)
    return path


# Refcount entries --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_entries_of_every_width_round_trip(bits):
    """Entries of 1..64 bits pack without disturbing their neighbours."""
    n = 64
    buf = bytearray(n * bits // 8)
    values = [(i * 2654435761) % (1 << bits) for i in range(n)]
    for i, v in enumerate(values):
        set_entry(buf, i, bits, v)
    assert [get_entry(buf, i, bits) for i in range(n)] == values


def test_sub_byte_refcounts_are_least_significant_bits_first():
    """Spec: for sub-byte widths, bit 0 of an entry is the byte's least significant bit."""
    buf = bytearray(1)
    set_entry(buf, 0, 1, 1)
    assert buf == b"\x01"
    set_entry(buf, 3, 2, 2)
    assert buf == b"\x81"  # entry 3 of a 2-bit table is bits 6..7
    buf = bytearray(2)
    set_entry(buf, 0, 16, 0x102)
    assert buf == b"\x01\x02"  # wider entries are big-endian


def test_refcount_area_counts_itself():
    """A new refcount area's blocks cover every block they are asked for and the area itself."""
    for start, per_block, need in [(1000, 64, {3, 15}), (5, 64, set()), (63, 64, {0}), (10 ** 6, 32768, {1})]:
        blocks, tclusters, entries = plan_area(start, per_block, 512, need, 1)
        end = start + len(blocks) + tclusters
        assert need <= set(blocks)
        assert set(range(start // per_block, (end - 1) // per_block + 1)) <= set(blocks)
        assert entries >= max(blocks) + 1 and tclusters * 512 // 8 == entries


def test_l2_cache_maps_the_disk_within_its_bound():
    """The L2 cache covers the whole disk up to 4 MiB of entries, in 4 KiB slices."""
    assert l2_cache_slices(1 << 30, 16) == 16 * 1024 * 8 // 4096  # 1 GiB: 128 KiB of entries
    assert l2_cache_slices(1 << 40, 16) == (4 << 20) // 4096  # capped
    assert l2_cache_slices(1 << 20, 16) == 16  # floor
    assert l2_cache_slices(1 << 30, 9) == (4 << 20) // 512  # 512 B clusters: 512 B slices


# Creation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("rb", [1, 16, 64])
def test_created_image_is_consistent_and_described(tmp_path, cs, rb):
    """create_qcow2 makes an image whose header, tables and refcounts agree."""
    from tenbox_vmm.disk.qcow2.check import check

    path = str(tmp_path / "x.qcow2")
    create_qcow2(path, 100 << 20, cluster_size=cs, refcount_bits=rb, lazy_refcounts=(rb == 16))
    info = image_info(path)
    assert info["format"] == "qcow2" and info["virtual_size"] == 100 << 20
    assert info["cluster_size"] == cs and info["refcount_bits"] == rb and info["version"] == 3
    assert info["lazy_refcounts"] == (rb == 16) and not info["dirty"] and info["backing_chain"] == []
    with open_disk(path) as d:
        assert check(d).clean


def test_create_refuses_bad_arguments_and_existing_files(tmp_path, img):
    p = str(tmp_path / "new.qcow2")
    for kw, msg in [
        (dict(size=1000), "multiple of 512"),
        (dict(size=1 << 20, cluster_size=3000), "power of two"),
        (dict(size=1 << 20, cluster_size=4 << 20), "2 MiB"),
        (dict(size=1 << 20, refcount_bits=3), "refcount_bits"),
        (dict(size=1 << 20, version=2, refcount_bits=8), "16-bit"),
        (dict(size=1 << 20, version=2, lazy_refcounts=True), "version 3"),
        (dict(size=1 << 40, cluster_size=512), "32 MiB"),
    ]:
        with pytest.raises(DiskError, match=msg):
            create_qcow2(p, **kw)
        assert not os.path.exists(p)
    with pytest.raises(DiskError, match="already exists"):
        create_qcow2(img, 1 << 20)


def test_overlay_takes_backing_size_and_format(tmp_path, img):
    """An overlay with size 0 gets the template's size; the backing format is recorded."""
    ov = str(tmp_path / "ov.qcow2")
    create_qcow2(ov, 0, backing="disk.qcow2")
    info = image_info(ov)
    assert info["virtual_size"] == 8 << 20
    assert info["backing_file"] == "disk.qcow2" and info["backing_format"] == "qcow2"
    assert info["backing_chain"] == [(img, "qcow2")]


def test_512_byte_clusters_with_a_long_backing_name_fit(tmp_path, img):
    """The optional feature table is left out when the first cluster is too small for it."""
    ov = str(tmp_path / "ov.qcow2")
    create_qcow2(ov, 0, cluster_size=512, backing=os.path.abspath(img))
    with open_disk(ov) as d:
        assert d.backing is not None and d.backing.path == os.path.abspath(img)


# Refusals ----------------------------------------------------------------------------------

def test_unknown_incompatible_feature_is_refused_by_name(img):
    """Unknown incompatible bits refuse the image, named from the feature table when it has them."""
    set_incompat(img, 1 << 9)
    with pytest.raises(DiskUnsupported, match="unsupported incompatible feature.*unknown feature bit 9"):
        open_disk(img, read_only=True)


@pytest.mark.parametrize("bit,msg", [(F.INCOMPAT_DATA_FILE, "external data file"),
                                     (F.INCOMPAT_EXTL2, "extended L2")])
def test_unsupported_features_are_refused(img, bit, msg):
    set_incompat(img, bit)
    with pytest.raises(DiskUnsupported, match=msg):
        open_disk(img, read_only=True)


def test_encryption_is_refused(img):
    patch(img, 32, struct.pack(">I", 2))
    with pytest.raises(DiskUnsupported, match="encrypted images \\(LUKS\\)"):
        open_disk(img, read_only=True)


def test_unknown_compression_type_is_refused(img):
    set_incompat(img, F.INCOMPAT_COMPRESSION)
    patch(img, 104, b"\x07")
    with pytest.raises(DiskUnsupported, match="unknown compression type 7"):
        open_disk(img, read_only=True)


def test_corrupt_bit_refuses_writing_but_allows_reading(img):
    set_incompat(img, F.INCOMPAT_CORRUPT)
    with pytest.raises(DiskUnsupported, match="marked corrupt.*read-only.*qemu-img check -r all"):
        open_disk(img)
    with open_disk(img, read_only=True) as d:
        d.readv(0, [memoryview(bytearray(512))])
    assert image_info(img)["corrupt"]


def test_internal_snapshots_refuse_writing_but_allow_reading(img):
    with open(img, "r+b") as f:  # one (fake) snapshot table entry in a cluster of its own, at the file's end
        end = f.seek(0, 2)
        f.write(bytes(65536))
    patch(img, 60, struct.pack(">IQ", 1, end))
    with pytest.raises(DiskUnsupported, match="1 internal snapshot"):
        open_disk(img)
    with open_disk(img, read_only=True):
        pass


@pytest.mark.parametrize("what,offset,data,msg", [
    ("l1 offset past EOF", 40, struct.pack(">Q", 1 << 40), "L1 table .* past the end"),
    ("l1 offset unaligned", 40, struct.pack(">Q", 65536 * 3 + 8), "L1 table offset"),
    ("refcount table past EOF", 48, struct.pack(">Q", 1 << 40), "refcount table .* past the end"),
    ("refcount table empty", 56, struct.pack(">I", 0), "empty refcount table"),
    ("l1 too small", 36, struct.pack(">I", 0), "L1 table too small"),
    ("cluster bits", 20, struct.pack(">I", 22), "cluster size 2\\^22"),
    ("version", 4, struct.pack(">I", 4), "qcow version 4"),
    ("backing name outside", 8, struct.pack(">QI", 65530, 100), "backing file name lies outside"),
    ("header length", 100, struct.pack(">I", 100), "invalid header length"),
])
def test_corrupt_headers_are_refused(img, what, offset, data, msg):
    """Every header offset is checked against alignment and the file size before use."""
    patch(img, offset, data)
    with pytest.raises(DiskError, match=msg):
        open_disk(img, read_only=True)


def test_truncated_images_are_refused(tmp_path, img):
    for cut, msg in [(50, "truncated qcow2 header"), (100, "truncated qcow2 v3 header"),
                     (65536 + 100, "table .* past the end of the file"), (3 * 65536 + 4, "L1 table .* past the end")]:
        p = str(tmp_path / ("cut%d.qcow2" % cut))
        with open(img, "rb") as f, open(p, "wb") as g:
            g.write(f.read(cut))
        with pytest.raises(DiskCorrupt, match=msg):
            open_disk(p, read_only=True)


def test_l2_table_past_eof_is_reported_as_corruption(img):
    """A bad L1 entry found at run time fails the request and marks the image corrupt, as QEMU does."""
    with open_disk(img) as d:
        l1 = d.header.l1_table_offset
    patch(img, l1, struct.pack(">Q", (1 << 63) | (1 << 40)))
    with open_disk(img) as d:
        with pytest.raises(DiskCorrupt, match="L1 entry 0 points to"):
            d.readv(0, [memoryview(bytearray(512))])
    assert image_info(img)["corrupt"]


def test_missing_backing_file_is_named(tmp_path, img):
    ov = str(tmp_path / "ov.qcow2")
    create_qcow2(ov, 0, backing="disk.qcow2")
    os.rename(img, img + ".moved")
    with pytest.raises(BackingFileError, match="backing file 'disk.qcow2' is missing"):
        open_disk(ov)
    with pytest.raises(BackingFileError, match="disk.qcow2"):
        image_info(ov)


def test_backing_chain_loop_is_refused(tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create_qcow2(a, 1 << 20)
    create_qcow2(b, 1 << 20, backing="a.qcow2")
    hdr = parse(open(a, "rb").read(65536), os.path.getsize(a), a)
    name = b"b.qcow2"
    off = hdr.header_length + 400  # free space in the first cluster
    patch(a, off, name)
    patch(a, 8, struct.pack(">QI", off, len(name)))
    with pytest.raises(BackingFileError, match="loops"):
        open_disk(b)


def test_protocol_backing_names_are_refused(tmp_path, img):
    ov = str(tmp_path / "ov.qcow2")
    create_qcow2(ov, 1 << 20, backing="disk.qcow2")
    name = b"nbd:localhost:10809"
    hdr = parse(open(ov, "rb").read(65536), os.path.getsize(ov), ov)
    patch(ov, hdr.backing_file_offset, name)
    patch(ov, 16, struct.pack(">I", len(name)))
    with pytest.raises(DiskUnsupported, match="'nbd' protocol"):
        open_disk(ov)


def test_not_a_qcow2_image(tmp_path):
    p = str(tmp_path / "x.raw")
    with open(p, "wb") as f:
        f.write(b"hello" * 1000)
    with pytest.raises(DiskError, match="not a qcow2 image"):
        open_disk(p, fmt="qcow2")
    with pytest.raises(DiskUnsupported, match="format 'vmdk'"):
        open_disk(p, fmt="vmdk")
    with pytest.raises(DiskError, match="no such file"):
        open_disk(str(tmp_path / "nope"))


# Compressed clusters -------------------------------------------------------------------------

def test_deflate_cluster_ignores_what_shares_its_last_sector():
    """A raw deflate stream (QEMU: window bits -12) decompresses to one cluster; trailing bytes are ignored."""
    import zlib

    from tenbox_vmm.disk.qcow2.compress import decompress

    data = os.urandom(100) * 41
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    stream = c.compress(data[:4096]) + c.flush()
    assert decompress(F.COMPRESSION_ZLIB, stream + b"\x55" * 300, 4096, "t") == data[:4096]
    with pytest.raises(DiskCorrupt, match="inflates to"):
        decompress(F.COMPRESSION_ZLIB, stream[:len(stream) // 2], 4096, "t")
    with pytest.raises(DiskCorrupt, match="does not inflate"):
        decompress(F.COMPRESSION_ZLIB, b"\xff" * 64, 4096, "t")


def _zstandard_or_refusal():
    """The zstandard module; where there is none, checks that a zstd cluster is
    refused naming the package and returns None."""
    from tenbox_vmm.disk.qcow2.compress import decompress

    try:
        import zstandard
    except ImportError:
        # Debian 11 has no python3-zstandard (the package only suggests it): there
        # a zstd cluster is refused with the package to install.
        with pytest.raises(DiskUnsupported, match="python3-zstandard"):
            decompress(F.COMPRESSION_ZSTD, b"\x28\xb5\x2f\xfd" + bytes(20), 4096, "t")
        return None
    return zstandard


def test_zstd_cluster_may_span_frames():
    from tenbox_vmm.disk.qcow2.compress import decompress

    zstandard = _zstandard_or_refusal()
    if zstandard is None:
        return
    data = os.urandom(2048) + bytes(2048)
    frames = zstandard.ZstdCompressor().compress(data[:1000]) + zstandard.ZstdCompressor().compress(data[1000:])
    assert decompress(F.COMPRESSION_ZSTD, frames + b"junk", 4096, "t") == data
    with pytest.raises(DiskCorrupt):
        decompress(F.COMPRESSION_ZSTD, b"\x28\xb5\x2f\xfd" + b"\xff" * 20, 4096, "t")


@pytest.mark.parametrize("path", ["stream", "frames"])
def test_a_zstd_bomb_is_cut_at_the_cluster_size_without_inflating(monkeypatch, path):
    """2 KiB of zstd that describe 64 MiB of zeros (no content size in the frame header):
    decompression stops at the cluster size and never holds much more in memory, on the
    streaming path and on the frame-by-frame path of older python3-zstandard."""
    import tracemalloc

    zstandard = _zstandard_or_refusal()
    if zstandard is None:
        return
    from tenbox_vmm.disk.qcow2 import compress

    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(64 << 20))
    assert len(bomb) < 4096
    if path == "frames":
        class OldDecompressor:
            def __init__(self):
                self._d = zstandard.ZstdDecompressor()

            def stream_reader(self, *a, **kw):
                raise TypeError("read_across_frames")  # what python3-zstandard before 0.15 says

            def decompressobj(self):
                return self._d.decompressobj()

        monkeypatch.setattr(compress, "_zstandard",
                            lambda: type("Z", (), {"ZstdDecompressor": OldDecompressor,
                                                   "ZstdError": zstandard.ZstdError}))
    tracemalloc.start()
    try:
        out = compress.decompress(F.COMPRESSION_ZSTD, bomb, 65536, "t")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == bytes(65536)
    assert peak < 2 << 20, "peak %d bytes while decompressing one 64 KiB cluster" % peak


def test_zstd_without_the_module_says_what_to_install(monkeypatch):
    """zstandard is imported on the first zstd cluster only; without it the error names the package."""
    import sys

    from tenbox_vmm.disk.qcow2 import compress

    monkeypatch.setattr(compress, "_zstd", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
    with pytest.raises(DiskUnsupported, match="apt-get install python3-zstandard"):
        compress.decompress(F.COMPRESSION_ZSTD, b"x", 4096, "t")


def test_backing_chain_depth_is_bounded(tmp_path, monkeypatch):
    """Reads recurse once per backing level, so chains are capped (BACKING_CHAIN_MAX, 128 by default)."""
    from tenbox_vmm.disk import backing

    monkeypatch.setattr(backing, "BACKING_CHAIN_MAX", 3)
    create_qcow2(str(tmp_path / "l0.qcow2"), 1 << 20)
    for i in range(1, 5):
        create_qcow2(str(tmp_path / ("l%d.qcow2" % i)), 0, backing="l%d.qcow2" % (i - 1))
    with open_disk(str(tmp_path / "l3.qcow2")) as d:
        d.readv(0, [memoryview(bytearray(4096))])
    top = str(tmp_path / "l4.qcow2")
    with pytest.raises(BackingFileError, match="l4.qcow2: backing chain deeper than 3 images"):
        open_disk(top)
    with pytest.raises(BackingFileError, match="deeper than 3"):
        image_info(top)


def test_dirty_image_is_repaired_on_open_for_writing(img):
    """Dirty bit set and refcounts wrong: opening read-write rewrites them from the L1/L2 tables
    (in place), then clears the bit; opening read-only leaves the image alone."""
    from tenbox_vmm.disk.qcow2.check import check

    with open_disk(img) as d:
        d.writev(70000, [memoryview(bytearray(b"\x3c" * 500000))])
        block0 = d._refcounts.table[0]
    patch(img, block0, bytes(64))  # refcounts of the header, tables and first clusters: gone
    set_incompat(img, F.INCOMPAT_DIRTY)
    with open_disk(img, read_only=True) as d:
        assert not check(d).clean
    assert image_info(img)["dirty"]
    with open_disk(img) as d:
        assert check(d).clean
        out = bytearray(500000)
        d.readv(70000, [memoryview(out)])
        assert out == b"\x3c" * 500000
    assert not image_info(img)["dirty"]


def test_dirty_image_without_refcount_blocks_gets_a_new_refcount_structure(img):
    """When referenced clusters have no refcount block at all, repair writes a new table and blocks
    after the end of the file and points the header at them."""
    from tenbox_vmm.disk.qcow2.check import check

    with open_disk(img) as d:
        d.writev(0, [memoryview(bytearray(b"\x3d" * 300000))])
        table = d._refcounts.table_offset
    patch(img, table, bytes(8))  # the table forgets block 0
    set_incompat(img, F.INCOMPAT_DIRTY)
    with open_disk(img) as d:
        assert d._refcounts.table_offset != table
        assert check(d).clean
        out = bytearray(300000)
        d.readv(0, [memoryview(out)])
        assert out == b"\x3d" * 300000
        d.writev(8 << 19, [memoryview(bytearray(b"\x3e" * 100000))])
        d.flush()
        assert check(d).clean
    assert not image_info(img)["dirty"]
