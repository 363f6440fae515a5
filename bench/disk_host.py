"""Disk backend throughput on the host: tenbox's qcow2 backend against `qemu-img bench`, same images, one run.

No guest: this measures the block backend alone (what virtio-blk calls on
its I/O thread), one request at a time, page cache (QEMU cache=writeback,
queue depth 1). Cases, on a 64 KiB-cluster qcow2 image:
  * seq-write-1M: 1 MiB writes into a fresh image (allocating clusters);
  * seq-read-1M: 1 MiB reads of a fully written image;
  * rand-read-4K / rand-write-4K: 4 KiB requests, offsets i * step mod size
    (step 4 KiB * 7919, qemu-img bench's stride), on a fully written image;
  * rand-alloc-4K: the same 4 KiB writes into a fresh image (each allocates
    a cluster and fills the rest of it: copy-on-write cost).
Prints medians of --runs interleaved rounds and tenbox/QEMU ratios.

    python3 -m bench.disk_host [--runs 3] [--size-mib 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from bench.common import interleave, median, table
from tenbox_vmm.disk import create_qcow2, open_disk

MIB = 1 << 20
STEP_4K = 4096 * 7919


def fresh(folder: str, size: int) -> str:
    path = os.path.join(folder, "bench-%d.qcow2" % time.monotonic_ns())
    create_qcow2(path, size)
    return path


def filled(folder: str, size: int) -> str:
    path = fresh(folder, size)
    subprocess.run(["qemu-img", "bench", "-w", "-c", str(size // MIB), "-s", "1M", path], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def tenbox_case(kind: str, path: str, size: int, count: int, block: int, step: int):
    buf = memoryview(bytearray(os.urandom(block)))
    with open_disk(path) as d:
        t = time.perf_counter()
        off = 0
        for _ in range(count):
            if kind == "read":
                d.readv(off, [buf])
            else:
                d.writev(off, [buf])
            off = (off + step) % size
        return time.perf_counter() - t


def qemu_case(kind: str, path: str, size: int, count: int, block: int, step: int) -> float:
    argv = ["qemu-img", "bench", "-t", "writeback", "-d", "1", "-c", str(count), "-s", str(block), "-S", str(step)]
    if kind == "write":
        argv.append("-w")
    r = subprocess.run(argv + [path], capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if not m:
        raise RuntimeError("unexpected qemu-img bench output: %s" % r.stdout)
    return float(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=512, help="virtual size of the images")
    p.add_argument("--dir", default=None, help="folder for the images (default: a temporary one)")
    args = p.parse_args()
    size = args.size_mib * MIB
    n4k = 50000
    cases = [
        # name, kind, image, count, block, step, unit
        ("seq-write-1M", "write", "fresh", size // MIB, MIB, MIB, "MiB/s"),
        ("seq-read-1M", "read", "filled", size // MIB, MIB, MIB, "MiB/s"),
        ("rand-read-4K", "read", "filled", n4k, 4096, STEP_4K, "IOPS"),
        ("rand-write-4K", "write", "filled", n4k, 4096, STEP_4K, "IOPS"),
        ("rand-alloc-4K", "write", "fresh", n4k // 5, 4096, STEP_4K, "IOPS"),
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = []
        for name, kind, image, count, block, step, unit in cases:
            def make(fn):
                def run():
                    path = filled(folder, size) if image == "filled" else fresh(folder, size)
                    try:
                        seconds = fn(kind, path, size, count, block, step)
                    finally:
                        os.unlink(path)
                    rate = count * block / MIB / seconds if unit == "MiB/s" else count / seconds
                    return {"rate": rate, "us_per_request": seconds / count * 1e6}
                return run

            res = interleave(args.runs, {"tenbox": make(tenbox_case), "qemu": make(qemu_case)})
            t, q = median(res["tenbox"]["rate"]), median(res["qemu"]["rate"])
            rows.append((name, "%.0f %s" % (t, unit), "%.1f" % median(res["tenbox"]["us_per_request"]),
                         "%.0f %s" % (q, unit), "%.1f" % median(res["qemu"]["us_per_request"]), "%.2f" % (t / q)))
    print(table(rows, ("case", "tenbox", "tenbox µs/req", "qemu-img bench", "qemu µs/req", "tenbox/qemu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
