"""SIGKILL during heavy writes: qemu-img check finds no corruption and every flushed write is there.

A child process writes through the backend in a loop (writes, discards,
write-zeroes, a flush every few requests) and, after each flush returns,
tells the parent the index of that request on a pipe. The parent kills it
with SIGKILL at a random moment, many times over the same image; after each
kill `qemu-img check` must exit 0 or 3 (leaks only), and every byte written
before the last acknowledged flush, and not written since, must read back.
Images with lazy refcounts are dirty after a kill: tenbox repairs them on
open (as QEMU does) before qemu-img checks them.

    python3 -m tests.integration.test_disk_crash IMAGE SEED   # the child
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from typing import Iterator, Optional, Tuple

import pytest

from tenbox_vmm.disk import create_qcow2, image_info, open_disk
from tests.framework import disk_model
from tests.framework.disk_tools import qemu_check
from tests.framework.process import ConsoleProcess
from tests.framework.repo import PYTHON

SIZE = 16 << 20
OPS_MAX = 100000
FLUSH_EVERY = 6  # requests, on average
READY_TIMEOUT_SEC = 20.0
KILLS = 15  # per configuration
KILL_AFTER_MAX_SEC = 0.4

Op = Tuple[str, int, int, int]


def ops(seed: int, cs: int) -> Iterator[Op]:
    """The child's requests, reproducible from the seed."""
    r = random.Random(seed)
    for _ in range(OPS_MAX):
        x = r.random()
        if x < 1.0 / FLUSH_EVERY:
            yield ("flush", 0, 0, 0)
            continue
        off = r.randrange(SIZE)
        if r.random() < 0.5:
            off -= off % 512
        n = min(SIZE - off, r.choice([512, 4096, 65536, 262144, cs + 17, r.randrange(1, 1 << 20)]))
        if x < 0.75:
            yield ("write", off, n, r.randrange(1, 256))
        elif x < 0.88:
            yield ("discard", off, n, 0)
        else:
            yield ("zero", off, n, r.randrange(2))


def child(path: str, seed: int) -> None:
    disk = open_disk(path, fmt="qcow2")
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for i, (kind, off, n, val) in enumerate(ops(seed, disk.cs)):
        if kind == "write":
            disk.writev(off, [memoryview(bytearray([val]) * n)])
        elif kind == "discard":
            disk.discard(off, n)
        elif kind == "zero":
            disk.write_zeroes(off, n, bool(val))
        else:
            disk.flush()
            out.write(b"%d\n" % i)
            out.flush()
    disk.close()


class Model:
    """The image as the parent knows it, and which bytes are uncertain after a kill."""

    def __init__(self, data: bytes, cs: int, version: int, backing: Optional[bytes]) -> None:
        self.m = disk_model.Model(SIZE, cs, version, backing)
        self.m.data[:] = data

    def replay(self, seed: int, acked: int) -> bytearray:
        """Apply requests 0..acked; return the mask of bytes requests after it may have touched."""
        m = self.m
        touched = bytearray(SIZE)
        after_ack = False
        for i, (kind, off, n, val) in enumerate(ops(seed, m.cs)):
            if i > acked:
                after_ack = True
            if after_ack:
                if kind == "flush":
                    break  # the child acknowledges a flush before it starts the next request
                touched[off:off + n] = b"\xff" * n
                continue
            if kind == "write":
                m.write(off, bytes([val]) * n)
            elif kind == "discard":
                m.discard(off, n)
            elif kind == "zero":
                m.write_zeroes(off, n)
        return touched


def run_child_and_kill(path: str, seed: int, rnd: random.Random) -> int:
    """Start a child, kill it at a random moment; the last flushed request index (-1 if none)."""
    with ConsoleProcess([PYTHON, "-m", "tests.integration.test_disk_crash", path, str(seed)],
                        stdin=subprocess.DEVNULL) as p:
        p.wait_for(r"^ready$", READY_TIMEOUT_SEC)
        time.sleep(rnd.uniform(0.0, KILL_AFTER_MAX_SEC))
        p.kill()  # acknowledgements written before the kill are valid too: kill() reads to the end
        assert p.proc.returncode == -signal.SIGKILL, "the child exited early: %s" % p.errors[-2000:]
        acks = [ln for ln in p.lines() if ln and ln != "ready"]
    return int(acks[-1]) if acks else -1


def read_all(path: str) -> bytes:
    with open_disk(path, read_only=True) as d:
        return disk_model.read_all(d)


CONFIGS = [
    # version, cluster size, refcount bits, lazy refcounts, backing
    (3, 65536, 16, False, True),
    (3, 4096, 64, True, False),
    (2, 65536, 16, False, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("version,cs,rb,lazy,with_backing", CONFIGS,
                         ids=["v%d-cs%d-rb%d%s%s" % (v, c, r, "-lazy" if z else "", "-backing" if b else "")
                              for v, c, r, z, b in CONFIGS])
def test_sigkill_during_writes_never_corrupts_and_keeps_flushed_data(tmp_path, version, cs, rb, lazy, with_backing):
    rnd = random.Random(version * 1000 + cs + rb)
    backing = None
    if with_backing:
        base = str(tmp_path / "base.qcow2")
        create_qcow2(base, SIZE // 2)
        content = bytearray(SIZE // 2)
        with open_disk(base) as b:
            for _ in range(20):
                off = rnd.randrange(len(content))
                data = bytes([rnd.randrange(1, 256)]) * min(len(content) - off, rnd.randrange(1, 1 << 20))
                b.writev(off, [memoryview(bytearray(data))])
                content[off:off + len(data)] = data
        backing = bytes(content)
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, SIZE, cluster_size=cs, refcount_bits=rb, version=version, lazy_refcounts=lazy,
                 backing="base.qcow2" if with_backing else None, backing_fmt="qcow2" if with_backing else None)
    data = read_all(path)
    acks = 0
    for round_ in range(KILLS):
        seed = rnd.randrange(1 << 30)
        acked = run_child_and_kill(path, seed, rnd)
        acks += acked >= 0
        if lazy and image_info(path)["dirty"]:
            open_disk(path).close()  # repair, as QEMU does on open
            assert not image_info(path)["dirty"]
        qemu_check(path)
        model = Model(data, cs, version, backing)
        uncertain = model.replay(seed, acked)
        got = read_all(path)
        bad = disk_model.first_difference_outside(got, bytes(model.m.data), bytes(uncertain))
        assert bad is None, "round %d: byte %d is %d, flushed %d" % (round_, bad, got[bad], model.m.data[bad])
        data = got  # what the uncertain bytes turned out to be
    assert acks >= KILLS // 3, "too few rounds got to a flush before the kill"
    # The image is still good for both: QEMU writes to it, tenbox writes to it.
    r = subprocess.run(["qemu-io", "-c", "write -P 0x99 0 1M", "-c", "read -P 0x99 0 1M", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with open_disk(path) as d:
        d.writev(SIZE - 70000, [memoryview(bytearray(b"\x98" * 70000))])
    assert qemu_check(path) in (0, 3)


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
