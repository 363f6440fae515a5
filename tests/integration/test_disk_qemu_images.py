"""Images QEMU made, read (and written) through tenbox's backend; qemu-img and qemu-io are the oracle.

Needs Debian's qemu-utils (qemu-img, qemu-io); the tests fail, not skip, without them.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from tenbox_vmm.disk import DiskUnsupported, open_disk
from tenbox_vmm.disk.qcow2.check import check
from tests.framework.disk_model import read_all
from tests.framework.disk_tools import pattern_writes, qemu_check, qemu_img, qemu_img_create, qemu_io, sha256_file

QEMU_TIMEOUT_SEC = 60.0

pytestmark = pytest.mark.usefixtures("qemu_tools")

SIZE = 9 * (1 << 20) + 512  # not a multiple of any cluster size but 512

READ_MATRIX = [
    # compat, cluster size, refcount bits, lazy refcounts
    ("0.10", 512, 16, False),
    ("0.10", 65536, 16, False),
    ("0.10", 2 << 20, 16, False),
    ("1.1", 512, 1, False),
    ("1.1", 1024, 2, False),
    ("1.1", 4096, 4, False),
    ("1.1", 8192, 8, False),
    ("1.1", 65536, 16, False),
    ("1.1", 65536, 32, True),
    ("1.1", 2 << 20, 64, False),
]


@pytest.mark.parametrize("compat,cs,rb,lazy", READ_MATRIX,
                         ids=["compat%s-cs%d-rb%d%s" % (c, s, r, "-lazy" if z else "") for c, s, r, z in READ_MATRIX])
def test_qemu_written_image_reads_back_exactly(tmp_path, compat, cs, rb, lazy):
    """Patterns and zero clusters qemu-io wrote read back byte for byte, also in scattered pieces."""
    path = str(tmp_path / "img.qcow2")
    opts = ["compat=" + compat, "cluster_size=%d" % cs]
    if compat == "1.1":
        opts += ["refcount_bits=%d" % rb] + (["lazy_refcounts=on"] if lazy else [])
    qemu_img_create(path, SIZE, *opts)
    model = bytearray(SIZE)
    rnd = random.Random(cs * 7 + rb)
    qemu_io(path, *pattern_writes(model, rnd, 14))
    with open_disk(path, read_only=True) as d:
        assert d.size == SIZE
        assert read_all(d) == bytes(model)
        for _ in range(30):
            off = rnd.randrange(SIZE)
            n = rnd.randrange(1, min(SIZE - off, 300000) + 1)
            pieces = []
            left = n
            while left:
                k = rnd.randrange(1, left + 1)
                pieces.append(memoryview(bytearray(k)))
                left -= k
            d.readv(off, pieces)
            assert b"".join(bytes(p) for p in pieces) == bytes(model[off:off + n])
    with open_disk(path) as d:  # open for writing too: nothing to repair, nothing changes
        assert check(d).clean


def test_multi_cluster_reads_in_one_extent_or_not(tmp_path, monkeypatch):
    """Reads of several clusters: one extent serves a contiguous run or an unallocated span; a zero
    cluster inside a run, a run out of order, or allocated and unallocated mixed take the general path.
    Every read matches what qemu-io wrote."""
    from tenbox_vmm.disk.qcow2.image import Qcow2Disk

    cs = 65536
    size = 16 * cs
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(bytes([0x11]) * size)
    top = str(tmp_path / "top.qcow2")
    qemu_img_create(top, size, "cluster_size=%d" % cs, backing=base, backing_fmt="raw")
    model = bytearray([0x11]) * size
    cmds = ["write -P 0x22 0 %d" % (4 * cs),  # clusters 0-3, allocated in order
            "write -z %d %d" % (cs, cs),  # cluster 1: zero flag, its allocation kept
            "write -P 0x33 %d %d" % (8 * cs, cs), "write -P 0x44 %d %d" % (12 * cs, cs),
            "write -P 0x55 %d %d" % (9 * cs, cs)]  # clusters 8 and 9 are not adjacent in the file
    qemu_io(top, *cmds)
    model[0:4 * cs] = bytes([0x22]) * (4 * cs)
    model[cs:2 * cs] = bytes(cs)
    model[8 * cs:9 * cs] = bytes([0x33]) * cs
    model[12 * cs:13 * cs] = bytes([0x44]) * cs
    model[9 * cs:10 * cs] = bytes([0x55]) * cs

    taken = []
    one_extent = Qcow2Disk._read_one_extent

    def spy(self, offset, end, cur):
        done = one_extent(self, offset, end, cur)
        taken.append(done)
        return done

    monkeypatch.setattr(Qcow2Disk, "_read_one_extent", spy)
    cases = [  # (offset, length, served as one extent)
        (2 * cs + 100, 2 * cs - 200, True),  # clusters 2-3: a run
        (4 * cs, 4 * cs, True),  # clusters 4-7: unallocated, from the backing file
        (0, 4 * cs, False),  # a zero cluster inside the run
        (8 * cs, 2 * cs, False),  # 8 and 9: out of order in the file
        (3 * cs, 2 * cs, False),  # allocated then unallocated
        (0, size, False),
    ]
    with open_disk(top, read_only=True) as d:
        e = d._entries(0, 4)
        assert e[1] == e[0] + cs + 1  # in order in the file: only cluster 1's zero flag (bit 0) breaks the run
        for off, n, fast in cases:
            taken.clear()
            halves = [memoryview(bytearray(n // 2)), memoryview(bytearray(n - n // 2))]
            d.readv(off, halves)
            assert b"".join(bytes(h) for h in halves) == bytes(model[off:off + n]), (off, n)
            assert taken[0] is fast, (off, n)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [512, 65536, 2 << 20])
def test_compressed_images_read_and_overwrite(tmp_path, ctype, cs):
    """qemu-img convert -c output (deflate or zstd) reads back; overwriting and discarding compressed
    clusters keeps the image consistent for qemu-img and equal to a raw mirror."""
    src = str(tmp_path / "src.raw")
    rnd = random.Random(cs)
    model = bytearray(SIZE - 512)
    for off in range(0, len(model), 65536):
        kind = rnd.randrange(3)
        if kind == 1:
            model[off:off + 65536] = bytes([rnd.randrange(256)]) * 65536
        elif kind == 2:
            model[off:off + 65536] = os.urandom(64) * 1024
    with open(src, "wb") as f:
        f.write(model)
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=%s,cluster_size=%d" % (ctype, cs),
        src, img)
    with open_disk(img, read_only=True) as d:
        assert read_all(d) == bytes(model)
    with open_disk(img) as d:
        for _ in range(20):
            off = rnd.randrange(len(model))
            n = min(len(model) - off, rnd.choice([1, 512, 5000, 70000]))
            data = os.urandom(n)
            d.writev(off, [memoryview(bytearray(data))])
            model[off:off + n] = data
        d.discard(cs + 100, cs * 3)  # clusters 2 and 3 go; the partial ones at either end stay
        model[cs * 2:cs * 4] = bytes(cs * 2)
        assert read_all(d) == bytes(model)
    assert qemu_check(img) == 0
    with open(src, "wb") as f:
        f.write(model)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, img)


CHAINS = [
    # depth, bottom format, names ("rel" | "abs" per link)
    (1, "qcow2", ("rel",)),
    (2, "raw", ("abs", "rel")),
    (3, "qcow2", ("rel", "abs", "rel")),
    (4, "raw", ("rel", "rel", "abs", "rel")),
]


@pytest.mark.parametrize("depth,bottom,names", CHAINS, ids=["depth%d-%s" % (c[0], c[1]) for c in CHAINS])
def test_backing_chains(tmp_path, depth, bottom, names):
    """Chains of 1..4 backing files, relative and absolute names, raw or qcow2 at the bottom, each
    layer smaller or equal to the next: reads fall through; writes go to the top only."""
    rnd = random.Random(depth)
    sub = tmp_path / "layers"
    sub.mkdir()
    sizes = [SIZE - (depth - i) * (1 << 20) for i in range(depth + 1)]
    model = bytearray(SIZE)
    paths = []
    base = str(sub / ("l0." + bottom))
    if bottom == "raw":
        with open(base, "wb") as f:
            f.truncate(sizes[0])
        qemu_io(base, *pattern_writes(model, rnd, 6, hi=sizes[0], zeros=False), fmt="raw")
    else:
        qemu_img_create(base, sizes[0])
        qemu_io(base, *pattern_writes(model, rnd, 6, hi=sizes[0]))
    paths.append((base, bottom))
    for i in range(1, depth + 1):
        # Every layer but the top lives in the sub-folder; relative names are relative to the naming image.
        folder = sub if i < depth else tmp_path
        path = str(folder / ("l%d.qcow2" % i))
        lower, lower_fmt = paths[-1]
        name = lower if names[i - 1] == "abs" else os.path.relpath(lower, str(folder))
        qemu_img_create(path, sizes[i], backing=name, backing_fmt=lower_fmt)
        qemu_io(path, *pattern_writes(model, rnd, 5, hi=sizes[i]))
        paths.append((path, "qcow2"))
    top = paths[-1][0]
    before = {p: sha256_file(p) for p, _ in paths[:-1]}
    with open_disk(top, read_only=True) as d:
        assert read_all(d) == bytes(model)
    with open_disk(top) as d:
        chain = []
        b = d.backing
        while b is not None:
            chain.append(os.path.realpath(b.path))
            b = getattr(b, "backing", None)
        assert chain == [os.path.realpath(p) for p, _ in reversed(paths[:-1])]
        for _ in range(20):
            off = rnd.randrange(SIZE)
            n = min(SIZE - off, rnd.choice([1, 512, 4096, 70000, 300000]))
            data = bytes([rnd.randrange(256)]) * n
            d.writev(off, [memoryview(bytearray(data))])
            model[off:off + n] = data
        d.write_zeroes(65536 * 5 + 7, 200000, may_unmap=True)
        model[65536 * 5 + 7:65536 * 5 + 200007] = bytes(200000)
        d.flush()
        assert read_all(d) == bytes(model)
    assert {p: sha256_file(p) for p, _ in paths[:-1]} == before, "a backing file changed"
    assert qemu_check(top) == 0
    mirror = str(tmp_path / "mirror.raw")
    with open(mirror, "wb") as f:
        f.write(model)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, top)


def test_internal_snapshots_read_only(tmp_path):
    """An image with internal snapshots reads fine and is refused for writing, in one line."""
    path = str(tmp_path / "s.qcow2")
    qemu_img_create(path, SIZE)
    model = bytearray(SIZE)
    qemu_io(path, *pattern_writes(model, random.Random(3), 5))
    qemu_img("snapshot", "-c", "snap1", path)
    qemu_io(path, "write -P 0x42 0 65536")
    model[0:65536] = b"\x42" * 65536
    with pytest.raises(DiskUnsupported, match="1 internal snapshot.*qemu-img snapshot -d"):
        open_disk(path)
    with open_disk(path, read_only=True) as d:
        assert read_all(d) == bytes(model)


@pytest.mark.parametrize("what,opts,msg", [
    ("luks", ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"], "encrypted images \\(LUKS\\)"),
    ("aes", ["encrypt.format=aes", "encrypt.key-secret=sec0"], "encrypted images \\(AES\\)"),
    ("data-file", ["data_file=DATA"], "external data file"),
    ("extended-l2", ["extended_l2=on"], "extended L2"),
])
def test_qemu_features_we_refuse(tmp_path, what, opts, msg):
    path = str(tmp_path / "f.qcow2")
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if what in ("luks", "aes"):
        argv += ["--object", "secret,id=sec0,data=tenbox-test"]
    argv += ["-o", ",".join(o.replace("DATA", str(tmp_path / "f.data")) for o in opts), path, "1M"]
    # LUKS creation calibrates its key derivation on CPU time, which some VMs cannot measure
    # ("Unable to get accurate CPU usage"); it usually works within a few attempts.
    for _ in range(30):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_TIMEOUT_SEC)
        if r.returncode == 0 or "accurate CPU usage" not in r.stderr:
            break
    assert r.returncode == 0, r.stderr
    for ro in (True, False):
        with pytest.raises(DiskUnsupported, match=msg):
            open_disk(path, read_only=ro)
