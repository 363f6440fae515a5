"""The raw backend, request checks and image locking between tenbox users."""

from __future__ import annotations

import os

import pytest

from tenbox_vmm.disk import (
    DiskError,
    DiskRangeError,
    ImageLocked,
    create_qcow2,
    image_info,
    open_disk,
)
from tenbox_vmm.disk.iov import IOV_MAX, Cursor, FlatViews, as_views


@pytest.fixture
def raw(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    return path


def test_raw_reads_and_writes_in_place(raw):
    """Data lands at the same offset in the file; size is the file's size."""
    with open_disk(raw, fmt="raw") as d:
        assert d.format == "raw" and d.size == 1 << 20
        d.writev(4096, [memoryview(bytearray(b"ab")), memoryview(bytearray(b"cd" * 100))])
        d.flush()
    with open(raw, "rb") as f:
        f.seek(4096)
        assert f.read(202) == b"ab" + b"cd" * 100


def test_raw_discard_and_write_zeroes_read_as_zeros_and_keep_size(raw):
    with open_disk(raw, fmt="raw") as d:
        d.discard(8192, 100000)
        d.write_zeroes(300001, 5000, may_unmap=False)
        d.write_zeroes(500000, 70000, may_unmap=True)
        out = bytearray(1 << 20)
        d.readv(0, [memoryview(out)])
    assert out[8192:108192] == bytes(100000)
    assert out[300001:305001] == bytes(5000)
    assert out[500000:570000] == bytes(70000)
    assert os.path.getsize(raw) == 1 << 20


def test_requests_outside_the_disk_are_refused(raw, tmp_path):
    q = str(tmp_path / "d.qcow2")
    create_qcow2(q, 1 << 20)
    for path in (raw, q):
        with open_disk(path) as d:
            for call in (lambda: d.readv(1 << 20, [memoryview(bytearray(1))]),
                         lambda: d.writev((1 << 20) - 1, [memoryview(bytearray(2))]),
                         lambda: d.discard(-1, 10),
                         lambda: d.write_zeroes(0, (1 << 20) + 1, True)):
                with pytest.raises(DiskRangeError, match="outside the disk"):
                    call()
            d.readv(1 << 20, [])  # empty at the end is fine


def test_more_buffers_than_iov_max(tmp_path, raw):
    """Requests with more segments than IOV_MAX are split into several syscalls, not refused."""
    q = str(tmp_path / "d.qcow2")
    create_qcow2(q, 1 << 20)
    for path in (raw, q):
        with open_disk(path) as d:
            n = IOV_MAX * 2 + 3
            data = [memoryview(bytearray([i % 256]) * 7) for i in range(n)]
            d.writev(1000, data)
            out = [memoryview(bytearray(7)) for _ in range(n)]
            d.readv(1000, out)
            assert [bytes(o) for o in out] == [bytes(x) for x in data]


def test_probed_raw_refuses_to_become_qcow2(raw):
    """A guest cannot turn a raw disk opened without fmt into a qcow2 image (backing-file escape)."""
    with open_disk(raw) as d:
        assert d.format == "raw"
        with pytest.raises(DiskError, match="refusing to write a qcow2 header"):
            d.writev(0, [memoryview(bytearray(b"QFI\xfb" + bytes(508)))])
        with pytest.raises(DiskError, match="qcow2 header"):
            d.writev(0, [memoryview(bytearray(b"QF")), memoryview(bytearray(b"I\xfb"))])
        d.writev(0, [memoryview(bytearray(b"QFI\x00"))])
    with open_disk(raw, fmt="raw") as d:  # declared raw: the guest owns every byte
        d.writev(0, [memoryview(bytearray(b"QFI\xfb"))])


def test_image_info_of_raw(raw):
    info = image_info(raw)
    assert info["format"] == "raw" and info["virtual_size"] == 1 << 20 and info["backing_chain"] == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_two_writers_exclude_each_other(tmp_path, fmt):
    """An image open for writing cannot be opened again, for writing or reading; readers share."""
    path = str(tmp_path / "d.img")
    if fmt == "qcow2":
        create_qcow2(path, 1 << 20)
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 20)
    with open_disk(path, fmt=fmt):
        with pytest.raises(ImageLocked, match='failed to get "write" lock.*in use by another process'):
            open_disk(path, fmt=fmt)
        with pytest.raises(ImageLocked, match='failed to get shared "write" lock'):
            open_disk(path, read_only=True, fmt=fmt)
    with open_disk(path, read_only=True, fmt=fmt), open_disk(path, read_only=True, fmt=fmt):
        with pytest.raises(ImageLocked):
            open_disk(path, fmt=fmt)
    with open_disk(path, fmt=fmt):  # all released on close
        pass


def test_template_in_use_as_backing_cannot_be_written(tmp_path):
    base = str(tmp_path / "base.qcow2")
    create_qcow2(base, 1 << 20)
    for name in ("a", "b"):
        create_qcow2(str(tmp_path / (name + ".qcow2")), 0, backing="base.qcow2")
    with open_disk(str(tmp_path / "a.qcow2")), open_disk(str(tmp_path / "b.qcow2")):
        with pytest.raises(ImageLocked):
            open_disk(base)


def test_close_is_idempotent_and_releases(tmp_path, raw):
    q = str(tmp_path / "d.qcow2")
    create_qcow2(q, 1 << 20, lazy_refcounts=True)
    for path in (raw, q):
        d = open_disk(path)
        d.writev(0, [memoryview(bytearray(512))])
        d.close()
        d.close()
        with pytest.raises(DiskError):
            d.writev(0, [memoryview(bytearray(512))])
        open_disk(path).close()
    assert not image_info(q)["dirty"]


def test_flat_view_lists_pass_through_and_cursors_hand_them_out():
    buf = bytearray(range(10))
    flat = FlatViews([memoryview(buf)[:4], memoryview(buf)[4:]])
    assert as_views(flat) is flat  # no re-check, no copy of the list
    plain = as_views([memoryview(buf).cast("c"), b"", bytearray(b"xy")])
    assert type(plain) is FlatViews and [v.format for v in plain] == ["B", "B"]  # empty dropped
    cur = Cursor(flat, 10)
    part = cur.take(6)
    assert type(part) is FlatViews and b"".join(part) == bytes(range(6))
    assert b"".join(cur.take(4)) == bytes(range(6, 10))
