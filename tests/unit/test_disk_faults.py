"""qcow2 crash consistency and I/O errors, at every write and sync the backend makes (simulated).

A file wrapper counts the backend's writes and fdatasyncs and, at a chosen
one, either:
  * dies ("kill"): every write made so far is in the page cache and stays,
    as when the process is SIGKILLed;
  * loses power ("power"): the file goes back to its state at the last
    fdatasync plus a random subset of the writes made since;
  * fails that one call with ENOSPC (write) or EIO (fdatasync).
Then the image is reopened: it must have no corruption (leaks are allowed),
and every byte the guest saw flushed must read back. Every crash point of a
workload is tried, so a missing or misplaced barrier shows up here.
"""

from __future__ import annotations

import errno
import os
import random
from typing import List, Optional

import pytest

from tenbox_vmm.disk import DiskError, DiskIOError, create_qcow2, open_disk
from tenbox_vmm.disk.fileio import ImageFile
from tenbox_vmm.disk.opener import _open
from tenbox_vmm.disk.qcow2 import image as qimage
from tenbox_vmm.disk.qcow2 import refcount as qrefcount
from tenbox_vmm.disk.qcow2.check import check
from tests.framework.disk_model import Model, first_difference_outside, read_all

SIZE = 1 << 20


class Crash(BaseException):
    """The simulated death of the process (not an Exception: nothing may catch it)."""


class SimFile(ImageFile):
    def __init__(self, path: str, writable: bool, at: int, mode: str, rnd: random.Random) -> None:
        super().__init__(path, writable)
        self.at, self.mode, self.rnd = at, mode, rnd
        self.ops = 0
        self.dead = False
        self.log: List[tuple] = []
        self.durable: Optional[bytes] = self._contents() if mode == "power" else None

    def _contents(self) -> bytes:
        return bytes(ImageFile.read(self, 0, self.end))

    def _tick(self, what: str) -> None:
        if self.dead:
            raise Crash()
        if self.ops == self.at:
            if self.mode in ("kill", "power"):
                self.dead = True
                raise Crash()
            if self.mode == "fail":
                self.ops += 1
                if what == "sync":
                    self.sync_error = "fdatasync failed: injected EIO"
                    raise DiskIOError("%s: injected fdatasync EIO" % self.path, errno.EIO)
                raise DiskIOError("%s: injected write ENOSPC" % self.path, errno.ENOSPC)
        self.ops += 1

    def writev(self, offset, views) -> None:
        self._tick("write")
        data = b"".join(bytes(v) for v in views)
        super().writev(offset, [memoryview(data)])
        if self.mode == "power":
            self.log.append((offset, data))

    def datasync(self) -> None:
        self._tick("sync")
        super().datasync()
        if self.mode == "power":
            self.log.clear()
            self.durable = self._contents()

    def lose_power(self) -> None:
        """Put the file in a state a power cut could leave: the last sync plus some later writes."""
        assert self.durable is not None
        state = bytearray(self.durable)
        for off, data in self.log:
            if self.rnd.random() < 0.5:
                if len(state) < off + len(data):
                    state.extend(bytes(off + len(data) - len(state)))
                state[off:off + len(data)] = data
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, len(state))
            os.pwrite(fd, bytes(state), 0)
        finally:
            os.close(fd)


class Workload:
    """A deterministic guest: writes, discards, zeroes, flushes; remembers what was flushed."""

    def __init__(self, seed: int, model: Model) -> None:
        self.rnd = random.Random(seed)
        self.model = model
        self.flushed = bytes(model.data)
        self.touched = bytearray(model.size)  # touched since the last good flush
        self.uncertain = bytearray(model.size)  # outcome of a failed request
        self.last_flush_ok = True

    def ops(self, n: int):
        r = self.rnd
        for _ in range(n):
            x = r.random()
            off = r.randrange(self.model.size)
            cs = self.model.cs
            ln = min(self.model.size - off, r.choice([512, 4096, 5000, cs, 2 * cs + 100, 150000, self.model.size // 6]))
            if x < 0.5:
                yield ("write", off, ln, r.randrange(1, 256))
            elif x < 0.65:
                yield ("discard", off, ln, 0)
            elif x < 0.75:
                yield ("zero", off, ln, r.randrange(2))
            else:
                yield ("flush", 0, 0, 0)

    def run(self, disk, n: int, tolerate_errors: bool = False) -> None:
        m = self.model
        for kind, off, ln, val in self.ops(n):
            ranges = [range(off, off + ln)] if kind != "discard" else m.discarded_ranges(off, ln)
            if kind != "flush":  # a crash inside this request may leave any of it half done
                self.touched[off:off + ln] = b"\xff" * ln
            try:
                if kind == "write":
                    data = bytes([val]) * ln
                    disk.writev(off, [memoryview(bytearray(data))])
                    m.write(off, data)
                elif kind == "discard":
                    disk.discard(off, ln)
                    m.discard(off, ln)
                elif kind == "zero":
                    disk.write_zeroes(off, ln, bool(val))
                    m.write_zeroes(off, ln)
                else:
                    disk.flush()
                    self.flushed = bytes(m.data)
                    self.touched = bytearray(m.size)
                    self.last_flush_ok = True
                    continue
            except DiskError:
                if not tolerate_errors:
                    raise
                if kind == "flush":
                    self.last_flush_ok = False
                for r in ([range(off, off + ln)] if kind != "flush" else []):
                    self.uncertain[r.start:r.stop] = b"\xff" * len(r)
                    self.touched[r.start:r.stop] = b"\xff" * len(r)
                continue
            for r in ranges:
                self.touched[r.start:r.stop] = b"\xff" * len(r)
                self.uncertain[r.start:r.stop] = bytes(len(r))

    def verify_flushed(self, got: bytes) -> None:
        """Bytes not touched since the last good flush hold their flushed value."""
        _same_outside(got, self.flushed, self.touched, "flushed")

    def verify_model(self, got: bytes) -> None:
        """After a good final flush: every byte not left uncertain by a failed request is the model's."""
        _same_outside(got, bytes(self.model.data), self.uncertain, "model")


def _same_outside(got: bytes, want: bytes, mask: bytearray, what: str) -> None:
    """got == want wherever mask is 0 (mask bytes are 0x00 or 0xff)."""
    j = first_difference_outside(got, want, bytes(mask))
    if j is not None:
        raise AssertionError("byte %d lost: %d, %s has %d" % (j, got[j], what, want[j]))


CONFIGS = {
    "v3": dict(cluster_size=65536, refcount_bits=16, version=3),
    "v3-512b-rb64": dict(cluster_size=512, refcount_bits=64, version=3),  # new refcount blocks, table growth
    "v3-lazy-backing": dict(cluster_size=4096, refcount_bits=16, version=3, lazy_refcounts=True, backing=True),
    "v2-backing": dict(cluster_size=4096, refcount_bits=16, version=2, backing=True),
}
OPS = 60
SEEDS = (1234, 5)


def _setup(tmp_path, name: str, cfg: dict):
    cfg = dict(cfg)
    size = cfg.pop("size", SIZE)
    folder = tmp_path / name
    folder.mkdir()
    backing = None
    if cfg.pop("backing", False):
        base = str(folder / "base.qcow2")
        create_qcow2(base, size, cluster_size=cfg["cluster_size"])
        content = bytearray(size)
        with open_disk(base) as b:
            b.writev(4096, [memoryview(bytearray(b"\x5a" * 300000))])
            content[4096:304096] = b"\x5a" * 300000
        backing = bytes(content)
        cfg.update(backing="base.qcow2", backing_fmt="qcow2")
    path = str(folder / "disk.qcow2")
    create_qcow2(path, size, **cfg)
    model = Model(size, cfg["cluster_size"], cfg["version"], backing)
    return path, model


def _count_ops(tmp_path, name, cfg, seed) -> int:
    path, model = _setup(tmp_path, name + "-count", cfg)
    disk = _open(path, False, "qcow2", (), file_factory=lambda p, w: SimFile(p, w, -1, "count", random.Random(0)))
    Workload(seed, model).run(disk, OPS)
    n = disk._file.ops
    disk.close()
    return n


def _reopen_and_verify(path: str, w: Workload, final_flush_ok: bool) -> None:
    with open_disk(path) as d:  # repairs a dirty (lazy refcounts) image
        result = check(d)
        assert result.corruptions == 0, result.messages[:5]
        got = read_all(d)
        if final_flush_ok:
            w.verify_model(got)
        else:
            w.verify_flushed(got)
        # Still a working image: a write and flush afterwards leave it consistent.
        d.writev(0, [memoryview(bytearray(b"\x77" * 70000))])
        d.flush()
        assert check(d).corruptions == 0


def _points(total: int, limit: int = 60) -> List[int]:
    """Every op index, or an even spread of `limit` of them (the first and last included)."""
    if total <= limit:
        return list(range(total))
    return sorted(set(round(i * (total - 1) / (limit - 1)) for i in range(limit)))


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_crash_at_any_write_leaves_image_sound_and_flushed_data_intact(tmp_path, name, mode):
    """Killed (or powered off) at any write or fdatasync: no corruption, every flushed byte reads back."""
    cfg = CONFIGS[name]
    for seed in SEEDS:
        _crash_everywhere(tmp_path / str(seed), name, cfg, mode, seed)


def _crash_everywhere(tmp_path, name: str, cfg: dict, mode: str, seed: int) -> None:
    tmp_path.mkdir()
    total = _count_ops(tmp_path, name, cfg, seed)
    assert total > 10
    for at in _points(total, 30):
        path, model = _setup(tmp_path, "%s-%s-%d" % (name, mode, at), cfg)
        sim: List[SimFile] = []

        def factory(p, w, at=at):
            f = SimFile(p, w, at, mode, random.Random(at))
            sim.append(f)
            return f

        disk = _open(path, False, "qcow2", (), file_factory=factory)
        w = Workload(seed, model)
        with pytest.raises(Crash):
            w.run(disk, OPS)
            disk.close()
        disk._release_files()  # the process is gone: its fds close, nothing more is written
        if mode == "power":
            sim[0].lose_power()
        _reopen_and_verify(path, w, final_flush_ok=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_io_error_at_any_write_fails_that_request_only(tmp_path, name):
    """ENOSPC on a write or EIO on fdatasync: that request fails, the image stays sound, and
    everything else (all of it after a later good flush; else what was flushed) reads back."""
    cfg = CONFIGS[name]
    seed = 99
    total = _count_ops(tmp_path, name, cfg, seed)
    for at in _points(total, 40):
        path, model = _setup(tmp_path, "%s-fail-%d" % (name, at), cfg)
        disk = _open(path, False, "qcow2", (), file_factory=lambda p, w, at=at: SimFile(p, w, at, "fail",
                                                                                         random.Random(0)))
        w = Workload(seed, model)
        w.run(disk, OPS, tolerate_errors=True)
        try:
            disk.flush()
            final_ok = True
        except DiskIOError:
            final_ok = False
        poisoned = disk._file.sync_error is not None
        try:
            disk.close()
        except DiskIOError:
            final_ok = False
        _reopen_and_verify(path, w, final_flush_ok=final_ok and not poisoned)


def test_failed_fdatasync_poisons_the_disk(tmp_path):
    """After fdatasync fails, dirty pages may be gone: flush and writes keep failing until reopen."""
    path, model = _setup(tmp_path, "poison", CONFIGS["v3"])
    files: List[SimFile] = []

    def factory(p, w):
        files.append(SimFile(p, w, 10 ** 9, "fail", random.Random(0)))
        return files[-1]

    disk = _open(path, False, "qcow2", (), file_factory=factory)
    disk.writev(0, [memoryview(bytearray(4096))])
    files[0].at = files[0].ops + 1  # the first fdatasync of the next flush fails
    with pytest.raises(DiskIOError, match="fdatasync"):
        disk.flush()
    with pytest.raises(DiskIOError, match="earlier failure"):
        disk.flush()
    with pytest.raises(DiskIOError, match="earlier failure"):
        disk.writev(0, [memoryview(bytearray(512))])
    disk.readv(0, [memoryview(bytearray(512))])  # reads still work
    disk.close()
    with open_disk(path) as d:
        assert check(d).corruptions == 0


def test_caches_evicting_under_load_keep_ordering(tmp_path, monkeypatch):
    """With tiny caches every few requests evict dirty metadata; crash points stay sound."""
    monkeypatch.setattr(qimage, "L2_CACHE_MAX_BYTES", 1024)
    monkeypatch.setattr(qimage, "L2_CACHE_MIN_SLICES", 2)
    monkeypatch.setattr(qrefcount.Refcounts.__init__, "__defaults__", (1024,))
    cfg = dict(cluster_size=1024, refcount_bits=8, version=3)
    seed = 7
    total = _count_ops(tmp_path, "evict", cfg, seed)
    for at in _points(total, 40):
        path, model = _setup(tmp_path, "evict-%d" % at, cfg)
        sim: List[SimFile] = []

        def factory(p, w, at=at):
            sim.append(SimFile(p, w, at, "power", random.Random(at)))
            return sim[-1]

        disk = _open(path, False, "qcow2", (), file_factory=factory)
        w = Workload(seed, model)
        with pytest.raises(Crash):
            w.run(disk, OPS)
            disk.close()
        disk._release_files()
        sim[0].lose_power()
        _reopen_and_verify(path, w, final_flush_ok=False)


class SequentialWorkload(Workload):
    """64 KiB writes one after another, each flushed: the file grows steadily."""

    def ops(self, n: int):
        for i in range(n):
            yield ("write", (i * 65536) % self.model.size, 65536, 1 + i % 255)
            yield ("flush", 0, 0, 0)


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("event", ["_grow_table", "_create_block"])
def test_crash_while_refcount_metadata_grows(tmp_path, monkeypatch, mode, event):
    """Crash at every write and sync around a new refcount block or a refcount table growth
    (512 B clusters, 64-bit refcounts: a block counts 64 clusters, a table cluster 2 MiB)."""
    cfg = dict(cluster_size=512, refcount_bits=64, version=3, size=4 << 20)
    windows: List[tuple] = []
    original = getattr(qrefcount.Refcounts, event)

    def spy(self, *args):
        before = self._file.ops
        original(self, *args)
        windows.append((before, self._file.ops))

    monkeypatch.setattr(qrefcount.Refcounts, event, spy)
    path, model = _setup(tmp_path, "count", cfg)
    disk = _open(path, False, "qcow2", (), file_factory=lambda p, w: SimFile(p, w, -1, "count", random.Random(0)))
    SequentialWorkload(0, model).run(disk, 48)
    disk.close()
    assert windows, "the workload never ran %s" % event
    monkeypatch.setattr(qrefcount.Refcounts, event, original)
    first, last = windows[-1]
    for at in range(first, last + 3):
        path, model = _setup(tmp_path, "%s-%d" % (mode, at), cfg)
        sim: List[SimFile] = []

        def factory(p, w, at=at):
            sim.append(SimFile(p, w, at, mode, random.Random(at)))
            return sim[-1]

        disk = _open(path, False, "qcow2", (), file_factory=factory)
        w = SequentialWorkload(0, model)
        with pytest.raises(Crash):
            w.run(disk, 48)
            disk.close()
        disk._release_files()
        if mode == "power":
            sim[0].lose_power()
        _reopen_and_verify(path, w, final_flush_ok=False)
