#!/usr/bin/env python3
"""Block benchmark: tenbox's virtio-blk against QEMU's, same test guest, same images, one run.

The `blk` test guest's benchmark loop runs at CPL3 and polls the used ring
(user code runs natively on this host; kernel code would be emulated), so
the figures measure the VMMs' device paths. Cases: sequential 1 MiB reads
and writes, 4 KiB random reads, on a raw image and on a qcow2 overlay whose
backing file holds the data. Reported: medians of interleaved runs, the
tenbox/QEMU ratio, and the host's own read speed of the image file (page
cache) as the physical limit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import GUESTS, PYTHON, QEMU, REPO, Timed, interleave, median, table  # noqa: E402

IMAGE_MB = 256
SEQ_MB = 128
RAND_OPS = 20000
MEM_MB = 256


def tenbox_argv(image: str, cmdline: str):
    return [PYTHON, "-m", "tenbox_vmm", "--kernel", str(GUESTS / "blk.bzImage"), "--memory", str(MEM_MB),
            "--console", "stdio", "--disk", image, "--cmdline", cmdline]


def qemu_argv(image: str, fmt: str, cmdline: str):
    return [QEMU, "-M", "microvm,acpi=on,rtc=on", "-accel", "kvm", "-m", str(MEM_MB), "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-blk-device,drive=d0",
            "-drive", "file=%s,if=none,format=%s,id=d0" % (image, fmt),
            "-kernel", str(GUESTS / "blk.bzImage"), "-append", cmdline]


def run(argv, amount: float) -> dict:
    p = Timed(argv)
    t0 = p.wait_line(b"blk: start", 120)
    t1 = p.wait_line(b"blk: done", 600)
    p.wait_exit(60)
    lines = [line for _, line in p.marks]
    if p.returncode != 0 or b"TENBOX-GUEST blk PASS" not in lines:
        raise RuntimeError("%s: the guest did not pass: %s" % (argv[0], [l for l in lines if b"not ok" in l]))
    return {"rate": amount / (t1 - t0)}


def prepare(workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    raw = os.path.join(workdir, "data.raw")
    if not os.path.exists(raw) or os.path.getsize(raw) != IMAGE_MB << 20:
        with open(raw + ".tmp", "wb") as f:
            for _ in range(IMAGE_MB):
                f.write(os.urandom(1 << 20))
        os.replace(raw + ".tmp", raw)
    template = os.path.join(workdir, "template.qcow2")
    if not os.path.exists(template):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, template], check=True)
    return {"raw": raw, "template": template}


def fresh_overlay(workdir: str, template: str) -> str:
    overlay = os.path.join(workdir, "overlay.qcow2")
    if os.path.exists(overlay):
        os.unlink(overlay)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", template, "-F", "qcow2", overlay], check=True)
    return overlay


def host_read_mib_s(path: str) -> float:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass  # warm the page cache, as the guests see it
    best = 0.0
    for _ in range(3):
        t = time.monotonic()
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(1 << 20)
            while f.readinto(buf):
                pass
        best = max(best, (IMAGE_MB) / (time.monotonic() - t))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench-blk"))
    args = ap.parse_args()
    imgs = prepare(args.workdir)
    kinds = {
        "seqread": ("blk.bench=seqread blk.bench.mb=%d" % SEQ_MB, SEQ_MB, "MiB/s"),
        "seqwrite": ("blk.bench=seqwrite blk.bench.mb=%d" % SEQ_MB, SEQ_MB, "MiB/s"),
        "randread": ("blk.bench=randread blk.bench.ops=%d" % RAND_OPS, RAND_OPS, "IOPS"),
    }
    rows = []
    for backing in ("raw", "qcow2+backing"):
        for kind, (keys, amount, unit) in kinds.items():
            cmdline = "console=ttyS0 blk.test=none " + keys

            def image():
                if backing == "raw":
                    return imgs["raw"], "raw"
                return fresh_overlay(args.workdir, imgs["template"]), "qcow2"

            def tb():
                path, _ = image()
                return run(tenbox_argv(path, cmdline), amount)

            def qm():
                path, fmt = image()
                return run(qemu_argv(path, fmt, cmdline), amount)

            res = interleave(args.runs, {"tenbox": tb, "qemu": qm})
            t, q = median(res["tenbox"]["rate"]), median(res["qemu"]["rate"])
            rows.append(("%s %s" % (backing, kind), "%.0f %s" % (t, unit), "%.0f %s" % (q, unit), "%.2f" % (t / q)))
            print("  %-24s tenbox %.0f  qemu %.0f  (%.2f)" % (rows[-1][0], t, q, t / q), file=sys.stderr)
    print("block benchmark: %d interleaved runs each, medians; %d MiB image; guest loop at CPL3, polling"
          % (args.runs, IMAGE_MB))
    print(table(rows, ("case", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU")))
    print("host read of the image file (page cache): %.0f MiB/s" % host_read_mib_s(imgs["raw"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
