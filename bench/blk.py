"""Block benchmark: tenbox's virtio-blk against QEMU's, same guest workload, same images, one run.

Default: the `blk` test guest's benchmark loop runs at CPL3 and polls the
used ring (user code runs natively on this host; kernel code would be
emulated), so the figures measure the VMMs' device paths, tenbox's KVM
worker against QEMU microvm with KVM. Cases: sequential 1 MiB reads and
writes, 4 KiB random reads, on a raw image and on a qcow2 overlay whose
backing file holds the data. Reported: medians of interleaved runs, the
tenbox/QEMU ratio, and the host's own read speed of the image file (page
cache) as the physical limit.

--linux: Linux's own virtio-blk driver (Debian's kernel under QEMU TCG)
drives tenbox's VirtioBlk served by tenbox-vhost-user-blk, against QEMU's
built-in virtio-blk, with the same O_DIRECT workload (bench/linux_io.c):
sequential 1 MiB reads and writes, 4 KiB random reads at queue depths 1
and 4. Both disks are in the same guest, each on its own copy of the image
(two overlays of one template for qcow2), and every case runs on them in
alternating rounds: how fast TCG runs the guest kernel differs from boot
to boot by more than the devices differ, and this way both devices see
the same boot.

--baseline TREE adds a third side to the default benchmark: the worker of
another checkout of tenbox (e.g. a `git worktree` at an older commit), on
the same images in the same interleaved rounds, and prints this tree's
ratio to it: before/after figures without two runs' drift between them.

    python3 -m bench.blk [--runs 5] [--linux] [--workdir DIR] [--baseline TREE]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from bench.common import at_checkout, build_static, fresh_overlay, interleave, median, table
from tests.framework import linux_guest, qemu
from tests.framework.guests import guest_path
from tests.framework.process import ConsoleProcess
from tests.framework.repo import CACHE
from tests.framework.runtime import boot_argv
from tests.framework.vhost_user import Backend

IMAGE_MB = 256
SEQ_MB = 1024  # four passes over the image: long enough that line timing jitter is noise (~1 %)
RAND_OPS = 100000
MEM_MB = 256
START_SEC = 120.0
DONE_SEC = 600.0
EXIT_SEC = 60.0


def tenbox_argv(image: str, cmdline: str) -> List[str]:
    return boot_argv(guest_path("blk"), cmdline=cmdline, memory_mb=MEM_MB, disks=[image])


def qemu_argv(image: str, fmt: str, cmdline: str) -> List[str]:
    return qemu.microvm(guest_path("blk"), append=cmdline, memory_mb=MEM_MB, rtc=True,
                        devices=qemu.virtio_blk(image, fmt))


def run(argv: List[str], amount: float) -> Dict[str, float]:
    with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
        t0 = p.seconds_to("blk: start", START_SEC)
        t1 = p.seconds_to("blk: done", DONE_SEC)
        rc = p.wait_exit(EXIT_SEC)
        lines = p.lines()
        if rc != 0 or "TENBOX-GUEST blk PASS" not in lines:
            p.fail("the guest did not pass: %s" % [ln for ln in lines if "not ok" in ln])
    return {"rate": amount / (t1 - t0)}


def prepare(workdir: Path) -> Dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "data.raw"
    if not raw.exists() or raw.stat().st_size != IMAGE_MB << 20:
        with open(str(raw) + ".tmp", "wb") as f:
            for _ in range(IMAGE_MB):
                f.write(os.urandom(1 << 20))
        os.replace(str(raw) + ".tmp", str(raw))
    template = workdir / "template.qcow2"
    if not template.exists():
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(template)], check=True)
    return {"raw": raw, "template": template}


def recache(path: Path) -> None:
    """Drop `path` from the page cache and read it back in, front to back.

    How the page cache holds a file (small pages, or the large folios that
    readahead builds on newer kernels) changes how fast preadv copies out of
    it, by 2x on this host; images that the two VMMs read must be cached
    the same way.
    """
    with open(str(path), "rb", buffering=0) as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(1 << 20)
        while f.readinto(buf):
            pass


def host_read_mib_s(path: Path) -> float:
    with open(str(path), "rb") as f:
        while f.read(1 << 20):
            pass  # warm the page cache, as the guests see it
    best = 0.0
    for _ in range(3):
        t = time.monotonic()
        with open(str(path), "rb", buffering=0) as f:
            buf = bytearray(1 << 20)
            while f.readinto(buf):
                pass
        best = max(best, (IMAGE_MB) / (time.monotonic() - t))
    return best


# --- --linux: Debian's kernel under QEMU TCG, tenbox over vhost-user --------------------------

LINUX_SEQ_MB = 1024  # four passes over the image (the reads wrap): ~0.5 s per round
LINUX_RAND_OPS = 8000
LINUX_QD = 4
LINUX_ROUNDS = 3  # rounds of each case per boot, each round on both devices
LINUX_WORKLOAD = [  # (case, linux_io arguments, unit)
    ("seqread", "seqread %d 2" % LINUX_SEQ_MB, "MiB/s"),
    ("seqwrite", "seqwrite %d 2" % LINUX_SEQ_MB, "MiB/s"),
    ("randread qd1", "randread %d 1" % LINUX_RAND_OPS, "IOPS"),
    ("randread qd%d" % LINUX_QD, "randread %d %d" % (LINUX_RAND_OPS, LINUX_QD), "IOPS"),
]
QUEUE_SIZE = 256  # both devices (vhost-user-blk's default would be 128)
DEVICES = ("tenbox", "qemu")  # also the disks' serials, by which the guest tells them apart
LINUX_MEMORY_MB = 512
LINUX_WAIT_SEC = 300.0  # for each case's line; a case takes seconds
BACKEND_EXIT_SEC = 30.0


def linux_rounds():
    """(case, linux_io arguments, unit, round, device) in the order the guest runs them: every case,
    round by round, on both disks, the first disk alternating between rounds."""
    for case, io_args, unit in LINUX_WORKLOAD:
        for r in range(LINUX_ROUNDS):
            for dev in (DEVICES if r % 2 == 0 else DEVICES[::-1]):
                yield case, io_args, unit, r, dev


def linux_script() -> str:
    """The guest's script: find the disks by serial, then linux_rounds()."""
    lines = ["set -e", "T= Q=",
             "for d in /sys/block/vd*; do",
             "  case \"$(cat $d/serial)\" in tenbox) T=/dev/${d##*/};; qemu) Q=/dev/${d##*/};; esac",
             "done",
             "[ -n \"$T\" ] && [ -n \"$Q\" ] || { echo 'CASE-ERROR: disks not found'; exit 1; }"]
    for case, io_args, _, r, dev in linux_rounds():
        lines.append("echo \"CASE: %s %s %d $(/linux_io $%s %s)\"" % (case, dev, r, dev[0].upper(), io_args))
    return "\n".join(lines) + "\n"


def linux_rates(vm: ConsoleProcess) -> Dict[str, Dict[str, List[float]]]:
    """{device: {case: [rate per round]}} from one boot's console."""
    out: Dict[str, Dict[str, List[float]]] = {dev: {case: [] for case, _, _ in LINUX_WORKLOAD} for dev in DEVICES}
    for case, _, unit, r, dev in linux_rounds():
        m = vm.wait_for(r"^CASE: %s %s %d LINUX-IO: mode=\S+ ops=(\d+) bytes=(\d+) secs=([\d.]+)$"
                        % (re.escape(case), dev, r), LINUX_WAIT_SEC)
        ops, nbytes, secs = int(m.group(1)), int(m.group(2)), float(m.group(3))
        out[dev][case].append((nbytes / (1 << 20) if unit == "MiB/s" else ops) / secs)
    linux_guest.finish_script(vm)
    return out


def linux_boot(images: Dict[str, Path], fmt: str, linux: linux_guest.Artifacts, tsc: int, initrd: Path,
               workdir: Path) -> Dict[str, Dict[str, List[float]]]:
    """One guest with both disks: tenbox's over vhost-user and QEMU's own, each on its copy of the image."""
    sock = workdir / "vhost-user-blk.sock"
    with Backend("blk", sock, ["--disk", "%s,format=%s,serial=tenbox" % (images["tenbox"], fmt)]) as backend:
        devices = (qemu.vhost_user_blk(sock, queue_size=QUEUE_SIZE)
                   + qemu.virtio_blk(images["qemu"], fmt, index=1, serial="qemu", queue_size=QUEUE_SIZE))
        with linux_guest.boot_script(linux, tsc, initrd, devices, memory_mb=LINUX_MEMORY_MB, deadline=None) as vm:
            rates = linux_rates(vm)
        backend.wait_exit(BACKEND_EXIT_SEC)
    return rates


def linux_main(args: argparse.Namespace, imgs: Dict[str, Path]) -> int:
    linux = linux_guest.build()
    tsc = linux_guest.tsc_khz(linux)
    initrd = linux_guest.initrd_with(args.workdir, linux, linux_script(),
                                     {"/linux_io": build_static("linux_io", args.workdir)})
    raw_copy = args.workdir / "data-qemu.raw"  # QEMU's disk: its own file (both lock theirs)
    if not raw_copy.exists() or raw_copy.stat().st_mtime < imgs["raw"].stat().st_mtime:
        shutil.copyfile(str(imgs["raw"]), str(raw_copy) + ".tmp")
        os.replace(str(raw_copy) + ".tmp", str(raw_copy))
    rows = []
    for backing in ("raw", "qcow2+backing"):
        res = {dev: {case: [] for case, _, _ in LINUX_WORKLOAD} for dev in DEVICES}
        for _ in range(args.runs):
            if backing == "raw":
                images, fmt = {"tenbox": imgs["raw"], "qemu": raw_copy}, "raw"
                for path in images.values():
                    recache(path)
            else:  # two fresh overlays of one template
                images = {dev: fresh_overlay(args.workdir / ("overlay-%s.qcow2" % dev), imgs["template"])
                          for dev in DEVICES}
                fmt = "qcow2"
                recache(imgs["template"])
            for dev, cases in linux_boot(images, fmt, linux, tsc, initrd, args.workdir).items():
                for case, rates in cases.items():
                    res[dev][case] += rates
        for case, _, unit in LINUX_WORKLOAD:
            ts, qs = res["tenbox"][case], res["qemu"][case]
            t, q = median(ts), median(qs)
            won = sum(1 for a, b in zip(ts, qs) if a > b)  # rounds are paired: same boot, one after the other
            rows.append(("%s %s" % (backing, case), "%.0f %s" % (t, unit), "%.0f %s" % (q, unit), "%.2f" % (t / q),
                         "%d of %d" % (won, len(ts))))
            print("  %-28s tenbox %.0f  qemu %.0f  (%.2f, ahead in %s)" % (rows[-1][0], t, q, t / q, rows[-1][4]),
                  file=sys.stderr)
    print("block benchmark, Linux's virtio-blk driver (Debian %s under QEMU TCG, microvm): %d boots, each with "
          "both disks and %d alternating rounds of every case; medians of all rounds; %d MiB image; O_DIRECT, "
          "%d MiB sequential (2 threads), %d random 4 KiB reads"
          % (linux.release, args.runs, LINUX_ROUNDS, IMAGE_MB,
             LINUX_SEQ_MB, LINUX_RAND_OPS))
    print(table(rows, ("case", "tenbox vhost-user-blk", "QEMU virtio-blk", "tenbox/QEMU", "tenbox ahead")))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=CACHE / "bench-blk")
    ap.add_argument("--linux", action="store_true",
                    help="Linux's driver under QEMU TCG: tenbox over vhost-user against QEMU's virtio-blk")
    ap.add_argument("--baseline", type=Path, metavar="TREE",
                    help="also run the worker of another tenbox checkout, interleaved, and report this/that")
    args = ap.parse_args()
    if args.baseline is not None and not (args.baseline / "tenbox_vmm" / "__main__.py").is_file():
        ap.error("--baseline %s: not a tenbox checkout (no tenbox_vmm/__main__.py)" % args.baseline)
    imgs = prepare(args.workdir)
    if args.linux:
        return linux_main(args, imgs)
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
                    return str(imgs["raw"]), "raw"
                return str(fresh_overlay(args.workdir / "overlay.qcow2", imgs["template"])), "qcow2"

            def tb():
                path, _ = image()
                return run(tenbox_argv(path, cmdline), amount)

            def qm():
                path, fmt = image()
                return run(qemu_argv(path, fmt, cmdline), amount)

            def base():
                path, _ = image()
                return run(at_checkout(tenbox_argv(path, cmdline), args.baseline), amount)

            sides = {"tenbox": tb, "qemu": qm}
            if args.baseline is not None:
                sides["baseline"] = base
            res = interleave(args.runs, sides)
            t, q = median(res["tenbox"]["rate"]), median(res["qemu"]["rate"])
            row = ["%s %s" % (backing, kind), "%.0f %s" % (t, unit), "%.0f %s" % (q, unit), "%.2f" % (t / q)]
            if args.baseline is not None:
                b = median(res["baseline"]["rate"])
                row += ["%.0f %s" % (b, unit), "%.3f" % (t / b)]
            rows.append(tuple(row))
            print("  %-24s %s" % (row[0], "  ".join(row[1:])), file=sys.stderr)
    print("block benchmark: %d interleaved runs each, medians; %d MiB image; guest loop at CPL3, polling"
          % (args.runs, IMAGE_MB))
    header = ("case", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU")
    if args.baseline is not None:
        header += ("baseline tenbox", "tenbox/baseline")
        print("baseline: the worker of %s" % args.baseline.resolve().name)
    print(table(rows, header))
    print("host read of the image file (page cache): %.0f MiB/s" % host_read_mib_s(imgs["raw"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
