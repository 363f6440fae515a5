#!/usr/bin/env python3
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

    python3 bench/linux_boot.py [--runs 3] [--no-image]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PYTHON, REPO, Timed, interleave, median, smaps_rss_split, table  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.framework import lane  # noqa: E402

KERNEL_DIR = REPO / ".cache" / "linux"
MEM_MB = 256
IMAGE_MEM_MB = 512
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"
FIRST_LINE = b"Linux version"
MARKER = b"TENBOX-INITRAMFS: up"
LOGIN = b"login:"
BOOT_TIMEOUT_SEC = 300.0
LOGIN_TIMEOUT_SEC = 600.0


def tenbox_argv(kernel: str, initrd: str, cmdline: str, memory_mb: int, disk: str = "") -> List[str]:
    argv = [PYTHON, "-m", "tenbox_vmm", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
            "--memory", str(memory_mb), "--cpus", "1", "--console", "stdio"]
    if disk:
        argv += ["--disk", "%s,format=qcow2" % disk]
    return argv


def qemu_argv(kernel: str, initrd: str, cmdline: str, memory_mb: int, disk: str = "") -> List[str]:
    argv = ["qemu-system-x86_64", "-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", "host", "-smp", "1",
            "-m", str(memory_mb), "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    if disk:
        argv += ["-global", "virtio-mmio.force-legacy=false",
                 "-drive", "id=d0,file=%s,format=qcow2,if=none" % disk, "-device", "virtio-blk-device,drive=d0"]
    return argv


def initramfs_case(make, quiet: bool):
    """Start -> first kernel line -> /init; memory outside guest RAM at /init."""
    kernel, initrd = str(KERNEL_DIR / "vmlinuz"), str(KERNEL_DIR / "initramfs.cpio.gz")
    cmdline = BASE_CMDLINE + (" quiet" if quiet else "") + " tenbox.run=sleep%201"

    def run() -> Dict[str, float]:
        p = Timed(make(kernel, initrd, cmdline, MEM_MB))
        out: Dict[str, float] = {}
        if not quiet:
            out["first_line_s"] = p.wait_line(FIRST_LINE, BOOT_TIMEOUT_SEC)
        out["init_quiet_s" if quiet else "init_s"] = p.wait_line(MARKER, BOOT_TIMEOUT_SEC)
        if not quiet:
            _, other = smaps_rss_split(p.proc.pid, MEM_MB << 20)
            out["overhead_rss_mib"] = other / (1 << 20)
        p.wait_exit(BOOT_TIMEOUT_SEC)
        if p.returncode != 0:
            raise RuntimeError("%s exited %s" % (p.proc.args[0], p.returncode))
        return out
    return run


def image_case(make, manifest: dict, image_dir: Path, work: Path):
    """Start -> the Debian image's login prompt, on a fresh overlay of its template."""
    kernel, initrd = str(image_dir / "vmlinuz"), str(image_dir / "initrd.img")
    cmdline = manifest["cmdline"]

    def run() -> Dict[str, float]:
        overlay = work / "overlay.qcow2"
        if overlay.exists():
            overlay.unlink()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(image_dir / "rootfs.qcow2"), str(overlay)], check=True)
        p = Timed(make(kernel, initrd, cmdline, IMAGE_MEM_MB, str(overlay)))
        try:
            took = p.wait_line(LOGIN, LOGIN_TIMEOUT_SEC)
        finally:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
                try:
                    p.wait_exit(30)
                except RuntimeError:
                    pass
        return {"login_s": took}
    return run


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


def report(results: Dict[str, Dict[str, List[float]]], where: str) -> str:
    rows = []
    for key, label in ROWS:
        t, q = results["tenbox"].get(key), results["qemu"].get(key)
        if not t or not q:
            continue
        rows.append((label, "%.2f" % median(t), "%.2f" % median(q), "%.2f" % (median(t) / median(q)), str(len(t))))
    return "%s\n\n%s" % (where, table(rows, ("metric (median)", "tenbox", "QEMU microvm", "ratio", "runs")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-image", action="store_true", help="skip the Debian image's login prompt")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    for script in ("get-kernel.sh", "make-initramfs.sh"):
        if lane.needs_lane() or not (KERNEL_DIR / "vmlinuz").exists():
            subprocess.run([str(REPO / "scripts" / "x86_64" / script)], check=True, stdin=subprocess.DEVNULL)
    if lane.needs_lane():
        if not args.no_image:
            lane.build_e2e_image()
        out = Path(tempfile.mkdtemp(prefix="tenbox-bench-lane-"))
        os.chmod(str(out), 0o755)
        cmd = "export PYTHONPATH=%s; %s bench/linux_boot.py --runs %d --json /lane-out/results.json%s" % (
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
