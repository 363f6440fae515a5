"""Stock Linux boot benchmark: tenbox-vm-runtime against QEMU microvm with KVM, same kernel, one run.

The same kernel, initramfs and command line (scripts/x86_64: Debian's cloud
kernel and the busybox initramfs) boot under tenbox and under
`qemu-system-x86_64 -M microvm,acpi=on -accel kvm -cpu host`, interleaved,
--runs times each. Medians of:

  * process start -> the kernel's first console line ("Linux version");
  * process start -> /init (the initramfs marker), with the verbose console
    and with `quiet`;
  * process start -> the systemd login prompt of a Debian image (the e2e
    image of tests/framework/lane.py, on a fresh qcow2 overlay per run,
    virtio-blk on virtio-mmio in both VMMs);
  * resident memory outside guest RAM at /init (every mapping that is not
    guest RAM, from /proc/PID/smaps).

Stock Linux needs hardware virtualization: on a host without vmx/svm the
benchmark runs itself in the nested lane (tests/framework/lane.py) and
prints the table here. Timings there are a proxy (every exit crosses
emulated AMD-V): read the ratios, not the seconds.

    python3 -m bench.linux_boot [--runs 3] [--no-image]
    python3 -m bench.linux_boot --arch aarch64 [--runs 3]

`--arch aarch64` (issue 17): Debian's arm64 cloud kernel and a busybox
initramfs under tenbox's arm64 worker and under `qemu-system-aarch64 -M
virt -accel kvm -cpu host`, in the same arm64 KVM host (on an x86 host,
the emulated one of tests/framework/lane_arm64.py). Both get the same
command line without `console=`: each kernel takes its console from its
device tree's stdout-path (tenbox's ns16550a, QEMU's PL011). No image row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

from bench.common import fresh_overlay, interleave, median, smaps_rss_split, table
from tests.framework import lane, linux_guest, qemu
from tests.framework.process import ConsoleProcess
from tests.framework.repo import PYTHON, REPO
from tests.framework.runtime import boot_argv

MEM_MB = 256
IMAGE_MEM_MB = 512
FIRST_LINE = "Linux version"
LOGIN = "login:"
BOOT_TIMEOUT_SEC = 300.0
LOGIN_TIMEOUT_SEC = 600.0
STOP_SEC = 30.0

Make = Callable[..., List[str]]


def tenbox_argv(kernel: str, initrd: str, cmdline: str, memory_mb: int, disk: str = "") -> List[str]:
    return boot_argv(kernel, initrd, cmdline, memory_mb=memory_mb, disks=["%s,format=qcow2" % disk] if disk else [])


def qemu_argv(kernel: str, initrd: str, cmdline: str, memory_mb: int, disk: str = "") -> List[str]:
    return qemu.microvm(kernel, initrd, cmdline, cpu="host", memory_mb=memory_mb,
                        devices=qemu.virtio_blk(disk, "qcow2") if disk else ())


def initramfs_case(make: Make, quiet: bool):
    """Start -> first kernel line -> /init; memory outside guest RAM at /init."""
    kernel, initrd = str(linux_guest.KERNEL_DIR / "vmlinuz"), str(linux_guest.KERNEL_DIR / "initramfs.cpio.gz")
    cmdline = linux_guest.BASE_CMDLINE + (" quiet" if quiet else "") + " tenbox.run=sleep%201"
    return boot_case(make, kernel, initrd, cmdline, quiet)


def boot_case(make: Make, kernel: str, initrd: str, cmdline: str, quiet: bool):
    """One boot of `kernel` to the initramfs marker and the guest's poweroff, as initramfs_case measures it."""

    def run() -> Dict[str, float]:
        out: Dict[str, float] = {}
        with ConsoleProcess(make(kernel, initrd, cmdline, MEM_MB), stdin=subprocess.DEVNULL) as p:
            if not quiet:
                out["first_line_s"] = p.seconds_to(FIRST_LINE, BOOT_TIMEOUT_SEC)
            out["init_quiet_s" if quiet else "init_s"] = p.seconds_to(linux_guest.MARKER, BOOT_TIMEOUT_SEC)
            if not quiet:
                _, other = smaps_rss_split(p.proc.pid, MEM_MB << 20)
                out["overhead_rss_mib"] = other / (1 << 20)
            if p.wait_exit(BOOT_TIMEOUT_SEC) != 0:
                p.fail("exit %s" % p.proc.returncode)
        return out
    return run


def image_case(make: Make, manifest: dict, image_dir: Path, work: Path):
    """Start -> the Debian image's login prompt, on a fresh overlay of its template."""
    kernel, initrd = str(image_dir / "vmlinuz"), str(image_dir / "initrd.img")
    cmdline = manifest["cmdline"]

    def run() -> Dict[str, float]:
        overlay = fresh_overlay(work / "overlay.qcow2", image_dir / "rootfs.qcow2")
        with ConsoleProcess(make(kernel, initrd, cmdline, IMAGE_MEM_MB, str(overlay)), stdin=subprocess.DEVNULL) as p:
            took = p.seconds_to(LOGIN, LOGIN_TIMEOUT_SEC)
            p.stop(STOP_SEC)  # as an operator would; killed past STOP_SEC
        return {"login_s": took}
    return run


ARM64_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "%s$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
""" % linux_guest.MARKER
ARM64_CMDLINE = "panic=-1"


def arm64_tenbox_argv(kernel: str, initrd: str, cmdline: str, memory_mb: int) -> List[str]:
    return boot_argv(kernel, initrd, cmdline, memory_mb=memory_mb)


def arm64_qemu_argv(kernel: str, initrd: str, cmdline: str, memory_mb: int) -> List[str]:
    return ["qemu-system-aarch64", "-M", "virt,gic-version=host", "-accel", "kvm", "-cpu", "host", "-smp", "1",
            "-m", str(memory_mb), "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]


def measure_arm64(runs: int, kernel: str, initrd: str) -> Dict[str, Dict[str, List[float]]]:
    vmms = {"tenbox": arm64_tenbox_argv, "qemu": arm64_qemu_argv}
    results: Dict[str, Dict[str, List[float]]] = {name: {} for name in vmms}
    for quiet in (False, True):
        cmdline = ARM64_CMDLINE + (" quiet" if quiet else "")
        part = interleave(runs, {name: boot_case(make, kernel, initrd, cmdline, quiet) for name, make in vmms.items()})
        for name, metrics in part.items():
            for k, v in metrics.items():
                results[name].setdefault(k, []).extend(v)
    return results


def main_arm64(args) -> int:
    """--arch aarch64: measure here on an arm64 host, else in the emulated one."""
    if os.uname().machine == "aarch64":
        results = measure_arm64(args.runs, args.kernel, args.initrd)
        where = "On this arm64 host, 1 vCPU."
    else:
        out = Path(tempfile.mkdtemp(prefix="tenbox-bench-arm64-"))
        os.chmod(str(out), 0o755)
        kernel = linux_guest.foreign_kernel("arm64")
        linux_guest.arm64_initramfs(out / "initrd.cpio", ARM64_INIT)
        cmd = "%s -m bench.linux_boot --arch aarch64 --runs %d --kernel %s --initrd /lane-out/initrd.cpio " \
              "--json /lane-out/results.json" % (PYTHON, args.runs, kernel)
        print("linux_boot: running in the emulated arm64 host (console: %s)" % (out / "console.log"), file=sys.stderr)
        res = lane.run(cmd, out, 7200.0, console_log=out / "console.log", arch="aarch64", gic="3", memory_mb=2048)
        if res.rc != 0:
            print("linux_boot: the arm64 lane run failed: %s\n%s" % (res.reason or "exit %s" % res.rc,
                                                                     lane.tail(res.console)), file=sys.stderr)
            return 1
        results = json.loads((out / "results.json").read_text())
        where = ("In the emulated arm64 host (QEMU TCG at EL2, GICv3; ratios, not absolute times), 1 vCPU; "
                 "QEMU is `-M virt -accel kvm`.")
    if args.json:
        args.json.write_text(json.dumps(results))
    print(report(results, where, "QEMU virt"))
    return 0


ROWS = [
    ("first_line_s", "start -> first kernel line, s"),
    ("init_s", "start -> /init (verbose console), s"),
    ("init_quiet_s", "start -> /init (quiet), s"),
    ("login_s", "start -> Debian login prompt, s"),
    ("overhead_rss_mib", "RSS outside guest RAM at /init, MiB"),
]


def measure(runs: int, with_image: bool) -> Dict[str, Dict[str, List[float]]]:
    vmms = {"tenbox": tenbox_argv, "qemu": qemu_argv}
    results: Dict[str, Dict[str, List[float]]] = {name: {} for name in vmms}

    def merge(part: Dict[str, Dict[str, List[float]]]) -> None:
        for name, metrics in part.items():
            for k, v in metrics.items():
                results[name].setdefault(k, []).extend(v)

    merge(interleave(runs, {name: initramfs_case(make, quiet=False) for name, make in vmms.items()}))
    merge(interleave(runs, {name: initramfs_case(make, quiet=True) for name, make in vmms.items()}))
    if with_image:
        manifest = json.loads((lane.E2E_IMAGE_DIR / "manifest.json").read_text())
        with tempfile.TemporaryDirectory(prefix="tenbox-bench-") as tmp:
            merge(interleave(runs, {name: image_case(make, manifest, lane.E2E_IMAGE_DIR, Path(tmp))
                                    for name, make in vmms.items()}))
    return results


def report(results: Dict[str, Dict[str, List[float]]], where: str, reference: str = "QEMU microvm") -> str:
    rows = []
    for key, label in ROWS:
        t, q = results["tenbox"].get(key), results["qemu"].get(key)
        if not t or not q:
            continue
        rows.append((label, "%.2f" % median(t), "%.2f" % median(q), "%.2f" % (median(t) / median(q)), str(len(t))))
    return "%s\n\n%s" % (where, table(rows, ("metric (median)", "tenbox", reference, "ratio", "runs")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-image", action="store_true", help="skip the Debian image's login prompt")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64",
                    help="aarch64: the arm64 worker against QEMU virt (see above)")
    ap.add_argument("--kernel", help=argparse.SUPPRESS)  # --arch aarch64 on an arm64 host: what to boot
    ap.add_argument("--initrd", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arch == "aarch64":
        return main_arm64(args)
    if lane.needs_lane() or not (linux_guest.KERNEL_DIR / "vmlinuz").exists():
        linux_guest.build()  # on the build host: the lane has no network
    if lane.needs_lane():
        if not args.no_image:
            lane.build_e2e_image()
        out = Path(tempfile.mkdtemp(prefix="tenbox-bench-lane-"))
        os.chmod(str(out), 0o755)
        cmd = "export PYTHONPATH=%s; %s -m bench.linux_boot --runs %d --json /lane-out/results.json%s" % (
            REPO, PYTHON, args.runs, " --no-image" if args.no_image else "")
        print("linux_boot: no vmx/svm here; running in the nested lane (console: %s)" % (out / "console.log"),
              file=sys.stderr)
        res = lane.run(cmd, out, 7200.0, console_log=out / "console.log")
        if res.rc != 0:
            print("linux_boot: the lane run failed: %s\n%s" % (res.reason or "exit %s" % res.rc,
                                                               lane.tail(res.console)), file=sys.stderr)
            return 1
        results = json.loads((out / "results.json").read_text())
        where = "In the nested lane (QEMU TCG with emulated AMD-V; ratios, not absolute times), 1 vCPU."
    else:
        results = measure(args.runs, not args.no_image)
        where = ("In the nested lane, 1 vCPU." if lane.in_lane() else "On this host (vmx/svm), 1 vCPU.")
    if args.json:
        args.json.write_text(json.dumps(results))
    print(report(results, where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
