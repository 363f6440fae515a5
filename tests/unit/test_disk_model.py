"""Disk backends against an in-memory model: random write/discard/zero/flush/reopen sequences (hypothesis).

Every sequence ends with the whole disk compared with the model and, for
qcow2, the backend's own refcount check (the same rules as qemu-img check)
reporting no corruption and no leak. The integration tests repeat the
exercise with qemu-img as the judge.
"""

from __future__ import annotations

import os
import random
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenbox_vmm.disk import ReadOnlyDisk, create_qcow2, open_disk
from tenbox_vmm.disk.qcow2 import image as qimage
from tenbox_vmm.disk.qcow2 import refcount as qrefcount
from tenbox_vmm.disk.qcow2.check import check
from tests.framework.disk_model import Model, read_all, split_bufs


def apply(disk, model: Model, op, rnd: random.Random) -> None:
    kind, off, n, val = op
    n = min(n, model.size - off)
    if kind == "write":
        data = bytes([val]) * n if val % 3 else os.urandom(n)
        disk.writev(off, split_bufs(data, rnd))
        model.write(off, data)
    elif kind == "discard":
        disk.discard(off, n)
        model.discard(off, n)
    elif kind == "zero":
        disk.write_zeroes(off, n, bool(val & 1))
        model.write_zeroes(off, n)
    elif kind == "read":
        views = split_bufs(bytes(n), rnd)
        disk.readv(off, views)
        got = b"".join(bytes(v) for v in views)
        assert got == bytes(model.data[off:off + n]), "read of [%d, +%d) differs from the model" % (off, n)
    elif kind == "flush":
        disk.flush()


CONFIGS = [
    # cluster size, refcount bits, version, with backing, lazy refcounts
    (512, 1, 3, False, False),
    (512, 64, 3, True, False),
    (1024, 2, 3, True, True),
    (4096, 16, 2, False, False),
    (4096, 16, 2, True, False),
    (4096, 8, 3, True, False),
    (65536, 16, 3, False, False),
    (65536, 32, 3, True, True),
    (65536, 16, 2, True, False),
    (2 << 20, 16, 3, True, False),
]

SIZE = 3 << 20  # bytes; not a multiple of 2 MiB, so the last cluster is partial there

op_strategy = st.tuples(
    st.sampled_from(["write", "write", "write", "discard", "zero", "read", "flush", "reopen"]),
    st.integers(0, SIZE - 1),
    st.sampled_from([1, 511, 512, 4096, 65536, 70000, 300000, SIZE]),
    st.integers(0, 255),
)


def make_backing(folder: str, cs: int, rnd: random.Random) -> bytes:
    """A qcow2 template with some data, made through our own backend."""
    path = os.path.join(folder, "base.qcow2")
    create_qcow2(path, SIZE - (1 << 20), cluster_size=min(cs, 65536))  # shorter than the overlay
    content = bytearray(SIZE - (1 << 20))
    with open_disk(path) as b:
        for _ in range(6):
            off = rnd.randrange(len(content))
            data = bytes([rnd.randrange(1, 256)]) * min(len(content) - off, rnd.randrange(1, 400000))
            b.writev(off, [memoryview(bytearray(data))])
            content[off:off + len(data)] = data
    return bytes(content)


@pytest.fixture
def small_caches(monkeypatch):
    """Tiny L2 and refcount caches, so eviction (and the flush it forces) happens all the time."""
    monkeypatch.setattr(qimage, "L2_CACHE_MAX_BYTES", 1024)
    monkeypatch.setattr(qimage, "L2_CACHE_MIN_SLICES", 2)
    monkeypatch.setattr(qimage, "PENDING_FREES_MAX", 8)
    monkeypatch.setattr(qrefcount.Refcounts.__init__, "__defaults__", (1024,))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "cs%d-rb%d-v%d%s%s" % (
    c[0], c[1], c[2], "-backing" if c[3] else "", "-lazy" if c[4] else ""))
# function_scoped_fixture exists from hypothesis 5.44 on (Debian 11 has 5.43).
# data_too_large: 25 operations of 5-tuples sometimes overrun hypothesis's example buffer
# while it searches; the health check then fails the test at random (seen in a full run).
@settings(max_examples=12, deadline=None,
          suppress_health_check=[h for h in (getattr(HealthCheck, "function_scoped_fixture", None),
                                             HealthCheck.data_too_large) if h])
@given(ops=st.lists(op_strategy, min_size=1, max_size=25), seed=st.integers(0, 2 ** 32 - 1))
def test_qcow2_matches_model_and_stays_consistent(small_caches, config, ops, seed):
    """Any sequence of writes, discards, write-zeroes, flushes and reopens reads back as the model says,
    and leaves refcounts exactly right (no corruption, no leak)."""
    cs, rb, version, with_backing, lazy = config
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        backing = make_backing(folder, cs, rnd) if with_backing else None
        path = os.path.join(folder, "disk.qcow2")
        create_qcow2(path, SIZE, cluster_size=cs, refcount_bits=rb, version=version, lazy_refcounts=lazy,
                     backing="base.qcow2" if with_backing else None, backing_fmt="qcow2" if with_backing else None)
        model = Model(SIZE, cs, version, backing)
        disk = open_disk(path)
        try:
            for op in ops:
                if op[0] == "reopen":
                    disk.close()
                    disk = open_disk(path)
                else:
                    apply(disk, model, op, rnd)
            disk.flush()
            result = check(disk)
            assert result.clean, result.messages[:5]
            assert read_all(disk) == bytes(model.data)
        finally:
            disk.close()
        with open_disk(path, read_only=True) as disk:
            assert read_all(disk) == bytes(model.data)
            assert check(disk).clean
        if backing is not None:
            with open_disk(os.path.join(folder, "base.qcow2"), read_only=True) as b:
                assert read_all(b) == backing, "the template changed"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(ops=st.lists(op_strategy, min_size=1, max_size=30), seed=st.integers(0, 2 ** 32 - 1))
def test_raw_matches_model(ops, seed):
    """The raw backend reads back every write; discard and write-zeroes leave zeros."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "disk.raw")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        model = Model(SIZE, fmt="raw")
        disk = open_disk(path, fmt="raw")
        try:
            for op in ops:
                if op[0] == "reopen":
                    disk.close()
                    disk = open_disk(path, fmt="raw")
                else:
                    apply(disk, model, op, rnd)
            assert read_all(disk) == bytes(model.data)
        finally:
            disk.close()


def test_read_only_disk_refuses_every_change(tmp_path):
    """A read-only disk raises ReadOnlyDisk on write, discard and write-zeroes, and reads fine."""
    path = str(tmp_path / "d.qcow2")
    create_qcow2(path, 1 << 20)
    for fmt in ("qcow2", "raw"):
        with open_disk(path, read_only=True, fmt=fmt) as d:
            with pytest.raises(ReadOnlyDisk):
                d.writev(0, [memoryview(bytearray(512))])
            with pytest.raises(ReadOnlyDisk):
                d.discard(0, 512)
            with pytest.raises(ReadOnlyDisk):
                d.write_zeroes(0, 512, True)
            d.flush()
            d.readv(0, [memoryview(bytearray(512))])
