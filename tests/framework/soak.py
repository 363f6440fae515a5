"""Repeated stock-Linux boots under tenbox's worker, QEMU's KVM boot as the control (tests; in the lane, root).

    python3 -m tests.framework.lane -- python3 -m tests.framework.soak \\
        --cpus 1,2,4,8 --rounds 10 --control --out /lane-out/soak.json

Each round boots the kernel and busybox initramfs of scripts/x86_64 to
`nproc` and poweroff, once per vCPU count, under tenbox-vm-runtime and (with
--control) under `qemu-system-x86_64 -M microvm -accel kvm` with the same
kernel, initramfs and command line, interleaved. A boot passes when it
exits 0 and prints the vCPU count. Failures keep their console tail and
stderr. The summary (JSON) counts passes and failures per VMM and vCPU
count; the exit status is 1 when any tenbox boot failed.

It needs /dev/kvm with hardware virtualization: the lane, or a host with
vmx/svm.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.framework import qemu
from tests.framework.linux_guest import BASE_CMDLINE, KERNEL_DIR
from tests.framework.repo import REPO
from tests.framework.runtime import boot_argv

BOOT_DEADLINE_SEC = 240.0
CMDLINE = BASE_CMDLINE + " tenbox.run=nproc"
TAIL_CHARS = 6000


def tenbox_argv(kernel: Path, initrd: Path, cmdline: str, cpus: int, memory_mb: int) -> List[str]:
    return boot_argv(kernel, initrd, cmdline, memory_mb=memory_mb, cpus=cpus)


def qemu_argv(kernel: Path, initrd: Path, cmdline: str, cpus: int, memory_mb: int) -> List[str]:
    return qemu.microvm(kernel, initrd, cmdline, cpu="host", memory_mb=memory_mb, cpus=cpus)


def boot(argv: Sequence[str], cpus: int, deadline: float) -> Dict[str, object]:
    """One boot to poweroff: its exit code, time, and whether `nproc` printed the vCPU count."""
    started = time.monotonic()
    try:
        r = subprocess.run(list(argv), cwd=str(REPO), stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=deadline)
        rc: Optional[int] = r.returncode
        out, err = r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or b"", e.stderr or b""
    elapsed = time.monotonic() - started
    console = out.decode("utf-8", "replace").replace("\r", "")
    nproc_ok = re.search(r"^TENBOX-INITRAMFS: run: nproc\n%d\n" % cpus, console, re.M) is not None
    result: Dict[str, object] = {"rc": rc, "seconds": round(elapsed, 2), "ok": rc == 0 and nproc_ok}
    if not result["ok"]:
        result["console_tail"] = console[-TAIL_CHARS:]
        result["stderr_tail"] = err.decode("utf-8", "replace")[-TAIL_CHARS:]
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.framework.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default="1,2,4,8", help="vCPU counts, comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="boots per vCPU count and VMM (default %(default)s)")
    p.add_argument("--control", action="store_true", help="interleave QEMU microvm -accel kvm boots")
    p.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default %(default)s)")
    p.add_argument("--kernel", type=Path, default=KERNEL_DIR / "vmlinuz")
    p.add_argument("--initrd", type=Path, default=KERNEL_DIR / "initramfs.cpio.gz")
    p.add_argument("--cmdline", default=CMDLINE)
    p.add_argument("--out", type=Path, help="where the JSON summary goes")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.cpus.split(",") if c.strip()]
    vmms = {"tenbox": tenbox_argv}
    if args.control:
        vmms["qemu"] = qemu_argv
    runs: List[Dict[str, object]] = []
    for rnd in range(1, args.rounds + 1):
        for cpus in counts:
            for name, make in vmms.items():
                res = boot(make(args.kernel, args.initrd, args.cmdline, cpus, args.memory), cpus, BOOT_DEADLINE_SEC)
                res.update(vmm=name, cpus=cpus, round=rnd)
                runs.append(res)
                print("soak: %-6s cpus=%d round=%d %s rc=%s %.1f s"
                      % (name, cpus, rnd, "ok" if res["ok"] else "FAILED", res["rc"], res["seconds"]), flush=True)
                if not res["ok"]:
                    print(str(res["stderr_tail"])[-1500:], flush=True)
                if args.out:
                    args.out.write_text(json.dumps({"runs": runs}, indent=1))
    summary: Dict[str, Dict[str, List[int]]] = {}
    for r in runs:
        cell = summary.setdefault(str(r["vmm"]), {}).setdefault(str(r["cpus"]), [0, 0])
        cell[0 if r["ok"] else 1] += 1
    for name, by_cpus in summary.items():
        print("soak: %s: %s" % (name, ", ".join("%s vCPU %d/%d ok" % (c, ok, ok + bad)
                                               for c, (ok, bad) in sorted(by_cpus.items(), key=lambda kv: int(kv[0])))))
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    failed = any(not r["ok"] for r in runs if r["vmm"] == "tenbox")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
