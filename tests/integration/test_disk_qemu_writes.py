"""Images tenbox writes, judged by QEMU: qemu-io reads the patterns, qemu-img check is clean,
qemu-img compare finds them identical to a raw mirror; dirty-bit repair both ways; image locks
against a real qemu-io."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from tenbox_vmm.disk import ImageLocked, create_qcow2, image_info, open_disk
from tests.framework.disk_model import Model, read_all, split_bufs
from tests.framework.disk_tools import pattern_writes, qemu_check, qemu_img, qemu_img_create, qemu_io, sha256_file

pytestmark = pytest.mark.usefixtures("qemu_tools")

SIZE = 9 * (1 << 20) + 512  # not a multiple of any cluster size but 512
LOCK_WAIT_SEC = 10.0

WRITE_MATRIX = [
    # version, cluster size, refcount bits, backing (made by qemu), lazy
    (2, 65536, 16, False, False),
    (2, 4096, 16, True, False),
    (3, 512, 1, False, False),
    (3, 512, 64, True, False),
    (3, 65536, 16, True, False),
    (3, 65536, 2, False, True),
    (3, 2 << 20, 8, True, False),
]


@pytest.mark.parametrize("version,cs,rb,with_backing,lazy", WRITE_MATRIX, ids=[
    "v%d-cs%d-rb%d%s%s" % (v, c, r, "-backing" if b else "", "-lazy" if z else "") for v, c, r, b, z in WRITE_MATRIX])
def test_tenbox_written_image_is_what_qemu_reads(tmp_path, version, cs, rb, with_backing, lazy):
    """Random unaligned writes, overwrites, discards and write-zeroes through tenbox: qemu-img check
    exits 0, qemu-img compare says identical to the raw mirror, qemu-io verifies patterns, and the
    template is unchanged byte for byte."""
    rnd = random.Random(cs + rb + version)
    backing = None
    base = str(tmp_path / "template.qcow2")
    if with_backing:
        qemu_img_create(base, SIZE - (1 << 20), "cluster_size=%d" % min(cs, 65536))
        content = bytearray(SIZE - (1 << 20))
        qemu_io(base, *pattern_writes(content, rnd, 8))
        backing = bytes(content)
        template_sum = sha256_file(base)
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, SIZE, cluster_size=cs, refcount_bits=rb, version=version, lazy_refcounts=lazy,
                 backing="template.qcow2" if with_backing else None, backing_fmt="qcow2" if with_backing else None)
    model = Model(SIZE, cs, version, backing)
    d = open_disk(path)
    try:
        for i in range(60):
            off = rnd.randrange(SIZE)
            n = min(SIZE - off, rnd.choice([1, 511, 4096, 65536 + 3, 300000, rnd.randrange(1, 1 << 20)]))
            x = rnd.random()
            if x < 0.6:
                data = os.urandom(n) if rnd.random() < 0.3 else bytes([rnd.randrange(256)]) * n
                d.writev(off, split_bufs(data, rnd))
                model.write(off, data)
            elif x < 0.75:
                d.discard(off, n)
                model.discard(off, n)
            elif x < 0.9:
                d.write_zeroes(off, n, rnd.random() < 0.5)
                model.write_zeroes(off, n)
            else:
                d.flush()
            if i == 30:
                d.close()
                d = open_disk(path)
        # A few known patterns for qemu-io to verify.
        checks = []
        for pat in (0x11, 0x22, 0x33):
            off = rnd.randrange(SIZE - 200000)
            n = rnd.randrange(1, 200000)
            d.writev(off, [memoryview(bytearray([pat]) * n)])
            model.write(off, bytes([pat]) * n)
            checks.append((pat, off, n))
    finally:
        d.close()
    assert not image_info(path)["dirty"]
    assert qemu_check(path) == 0
    qemu_io(path, *["read -P 0x%02x %d %d" % c for c in checks], read_only=True)
    mirror = str(tmp_path / "mirror.raw")
    with open(mirror, "wb") as f:
        f.write(model.data)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, path)
    if with_backing:
        assert sha256_file(base) == template_sum, "the template changed"
    # And QEMU can keep using it.
    qemu_io(path, "write -P 0x44 0 70000", "read -P 0x44 0 70000")
    assert qemu_check(path) == 0


def test_qemu_repairs_a_dirty_image_tenbox_left(tmp_path):
    """A lazy-refcount image tenbox was killed with (dirty bit set) is repaired by QEMU on open,
    with every flushed write intact."""
    path = str(tmp_path / "lazy.qcow2")
    create_qcow2(path, SIZE, lazy_refcounts=True)
    d = open_disk(path)
    d.writev(65536 * 3 + 100, [memoryview(bytearray(b"\x5c" * 300000))])
    d.flush()
    assert image_info(path)["dirty"]
    d._release_files()  # as if killed: no close, no refcount write-back, dirty bit stays
    assert qemu_img("check", path, ok=(0, 2, 3)).returncode == 2  # stale refcounts, as QEMU sees them
    qemu_io(path, "read -P 0x5c %d 300000" % (65536 * 3 + 100))  # opening read-write repairs
    assert qemu_check(path) == 0


def test_tenbox_repairs_a_dirty_image_qemu_left(tmp_path):
    """QEMU aborted with lazy refcounts leaves a dirty image; tenbox repairs it on open, as QEMU would."""
    path = str(tmp_path / "lazy.qcow2")
    qemu_img_create(path, SIZE, "lazy_refcounts=on")
    r = subprocess.run(["qemu-io", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 5M 2M", "-c", "flush",
                        "-c", "abort", path], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # abort() kills it
    assert image_info(path)["dirty"]
    with open_disk(path, read_only=True) as d:  # read-only: no repair, reads work
        assert read_all(d)[:1 << 20] == b"\x61" * (1 << 20)
    with open_disk(path) as d:
        assert not image_info(path)["dirty"]
        data = read_all(d)
        assert data[:1 << 20] == b"\x61" * (1 << 20) and data[5 << 20:7 << 20] == b"\x62" * (2 << 20)
    assert qemu_check(path) == 0


# Locks ---------------------------------------------------------------------------------------

class QemuIo:
    """A qemu-io process holding an image open until stopped."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        argv = ["qemu-io"] + (["-r"] if read_only else []) + [path]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.path = path

    def wait_locked(self) -> None:
        """Until qemu-io's lock bytes show in /proc/locks for the image (or it died)."""
        ino = os.stat(self.path).st_ino
        deadline = time.monotonic() + LOCK_WAIT_SEC
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            with open("/proc/locks") as f:
                if any(":%d " % ino in line and " 100 " in line for line in f):
                    return
            time.sleep(0.01)
        raise AssertionError("qemu-io never locked %s" % self.path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def qemu_holder():
    held = []

    def hold(path, read_only=False):
        q = QemuIo(path, read_only)
        held.append(q)
        q.wait_locked()
        return q

    yield hold
    for q in held:
        q.stop()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_qemu_writer_locks_tenbox_out(tmp_path, qemu_holder, fmt):
    """While qemu-io has the image open for writing, tenbox can open it neither read-write nor read-only."""
    path = str(tmp_path / ("d." + fmt))
    if fmt == "qcow2":
        create_qcow2(path, 1 << 20)
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 20)
    q = qemu_holder(path)
    with pytest.raises(ImageLocked, match='%s: failed to get (shared )?"write" lock' % path):
        open_disk(path, fmt=fmt)
    with pytest.raises(ImageLocked, match='failed to get shared "write" lock'):
        open_disk(path, read_only=True, fmt=fmt)
    q.stop()
    open_disk(path, fmt=fmt).close()


def test_qemu_reader_allows_tenbox_reader_only(tmp_path, qemu_holder):
    path = str(tmp_path / "d.qcow2")
    create_qcow2(path, 1 << 20)
    qemu_holder(path, read_only=True)
    with pytest.raises(ImageLocked, match='failed to get "write" lock'):
        open_disk(path)
    open_disk(path, read_only=True).close()


def _qemu_open_error(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, "%s opened an image tenbox holds" % " ".join(argv)
    return r.stderr


def test_tenbox_writer_locks_qemu_out(tmp_path):
    """While tenbox writes an image, qemu-io and qemu-img cannot open it; a tenbox reader lets QEMU read."""
    path = str(tmp_path / "d.qcow2")
    create_qcow2(path, 1 << 20)
    with open_disk(path):
        assert 'Failed to get "write" lock' in _qemu_open_error("qemu-io", "-c", "read 0 512", path)
        assert 'Failed to get shared "write" lock' in _qemu_open_error("qemu-io", "-r", "-c", "read 0 512", path)
        assert 'Failed to get shared "write" lock' in _qemu_open_error("qemu-img", "info", path)
    with open_disk(path, read_only=True):
        qemu_io(path, "read 0 512", read_only=True)
        assert 'Failed to get "write" lock' in _qemu_open_error("qemu-io", "-c", "read 0 512", path)


def test_template_used_by_a_qemu_overlay_cannot_be_written(tmp_path, qemu_holder):
    """QEMU using an overlay holds its template read-only; tenbox refuses to open the template for writing,
    and may use it as its own backing file."""
    base = str(tmp_path / "base.qcow2")
    create_qcow2(base, 1 << 20)
    qemu_img_create(str(tmp_path / "q.qcow2"), 1 << 20, backing="base.qcow2")
    create_qcow2(str(tmp_path / "t.qcow2"), 0, backing="base.qcow2")
    qemu_holder(str(tmp_path / "q.qcow2"))
    with pytest.raises(ImageLocked):
        open_disk(base)
    with open_disk(str(tmp_path / "t.qcow2")) as d:
        d.writev(0, [memoryview(bytearray(b"x" * 512))])


def test_writing_clears_autoclear_bitmaps_as_the_spec_requires(tmp_path):
    """tenbox keeps no persistent dirty bitmaps: writing clears the autoclear bit first, so QEMU sees
    the bitmaps as inconsistent (their clusters leak: check exits 3) instead of trusting stale ones."""
    path = str(tmp_path / "bm.qcow2")
    qemu_img_create(path, SIZE)
    qemu_img("bitmap", "--add", path, "b0")
    with open_disk(path) as d:
        d.writev(0, [memoryview(bytearray(b"z" * 4096))])
    r = qemu_img("check", path, ok=(0, 3))
    assert "considered inconsistent" in r.stderr
    qemu_io(path, "read -P 0x7a 0 4096")
