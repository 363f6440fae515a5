"""Repeated stock-Linux boots under tenbox's worker, QEMU's KVM boot as the control (tests; in the lane, root).

    python3 -m tests.framework.lane -- python3 -m tests.framework.soak \\
        --cpus 1,2,4,8 --rounds 10 --control --out /lane-out/soak.json

Each round boots the kernel and busybox initramfs of scripts/x86_64 to
`nproc` and poweroff, once per vCPU count, under tenbox-vm-runtime and (with
--control) under `qemu-system-x86_64 -M microvm -accel kvm` with the same
kernel, initramfs and command line, interleaved. A boot passes when it
exits 0 and prints the vCPU count. Failures keep their console tail and
stderr. The summary (JSON) counts passes and failures per VMM and vCPU
count. With `--until TEXT`, a boot passes once TEXT is on its console (the
VMM is killed then): for another image's kernel and initrd, say a Debian
template's up to "Run /init as init process".

It needs /dev/kvm with hardware virtualization: the lane, or a host with
vmx/svm. The exit status is 1 when any boot failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import signal
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
DUMP_WAIT_SEC = 3.0


def tenbox_argv(kernel: Path, initrd: Path, cmdline: str, cpus: int, memory_mb: int) -> List[str]:
    return boot_argv(kernel, initrd, cmdline, memory_mb=memory_mb, cpus=cpus)


QEMU_CPU = "host"


def qemu_argv(kernel: Path, initrd: Path, cmdline: str, cpus: int, memory_mb: int,
              cpu_model: str = QEMU_CPU) -> List[str]:
    return qemu.microvm(kernel, initrd, cmdline, cpu=cpu_model, memory_mb=memory_mb, cpus=cpus)


TRACING = Path("/sys/kernel/tracing")
# KVM's own record of what each vCPU did last: the exits (with the guest's RIP), exceptions
# and interrupts it injected. A triple fault under AMD-V loses the guest's registers
# (KVM resets the vCPU), so this is where the faulting RIP survives.
TRACE_EVENTS = ("kvm/kvm_exit", "kvm/kvm_inj_exception", "kvm/kvm_inj_virq", "kvm/kvm_page_fault",
                "kvm/kvm_userspace_exit")
TRACE_KEEP_LINES = 20000


def trace_start() -> None:
    if not (TRACING / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACING)], check=True)
    (TRACING / "buffer_size_kb").write_text("16384")
    for event in TRACE_EVENTS:
        (TRACING / "events" / event / "enable").write_text("1")
    (TRACING / "trace").write_text("")
    (TRACING / "tracing_on").write_text("1")


def trace_take() -> str:
    """The last TRACE_KEEP_LINES of KVM's trace; the buffer is cleared for the next boot."""
    (TRACING / "tracing_on").write_text("0")
    lines = (TRACING / "trace").read_text(errors="replace").splitlines()
    (TRACING / "trace").write_text("")
    (TRACING / "tracing_on").write_text("1")
    return "\n".join(lines[-TRACE_KEEP_LINES:])


F_SETPIPE_SZ = 1031
THROTTLE_PIPE_BYTES = 4096
THROTTLE_CHUNK = 64


def _communicate_throttled(proc: subprocess.Popen, deadline: float, bytes_per_sec: int):
    """Like communicate(), but stdout is read at bytes_per_sec through a 4 KiB pipe: a slow
    console, so that a VMM's serial writes back up (the soak's way to give QEMU slow exits)."""
    import fcntl
    import threading

    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, THROTTLE_PIPE_BYTES)
    out, err = bytearray(), bytearray()

    def pump(stream, buf, throttle):
        while True:
            chunk = stream.read1(THROTTLE_CHUNK if throttle else 65536)
            if not chunk:
                return
            buf += chunk
            if throttle:
                time.sleep(len(chunk) / bytes_per_sec)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, False), daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=deadline)
        rc: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    for t in threads:
        t.join(30)
    return bytes(out), bytes(err), rc


def _communicate_until(proc: subprocess.Popen, deadline: float, marker: str):
    """Like communicate(), but the VMM is killed once `marker` is on its console; rc is 0 then."""
    import threading

    out, err = bytearray(), bytearray()
    seen = threading.Event()
    wanted = marker.encode()

    def pump(stream, buf, watch):
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            buf += chunk
            if watch and wanted in buf[-(len(chunk) + len(wanted)):]:
                seen.set()

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, False), daemon=True)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline
    while not seen.is_set() and proc.poll() is None and time.monotonic() < end:
        seen.wait(0.2)
    rc: Optional[int] = 0 if seen.is_set() else proc.poll()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for t in threads:
        t.join(30)
    return bytes(out), bytes(err), rc


def boot(argv: Sequence[str], cpus: int, deadline: float, trace: bool = False,
         console_bytes_per_sec: int = 0, until: str = "") -> Dict[str, object]:
    """One boot to poweroff (or to `until` on the console): its exit code, time, and whether
    `nproc` printed the vCPU count (or `until` was seen)."""
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    rc: Optional[int]
    if until:
        out, err, rc = _communicate_until(proc, deadline, until)
    elif console_bytes_per_sec:
        out, err, rc = _communicate_throttled(proc, deadline, console_bytes_per_sec)
    else:
        try:
            out, err = proc.communicate(timeout=deadline)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            if argv[:3] == list(boot_argv("k")[:3]):
                proc.send_signal(signal.SIGUSR2)  # tenbox-vm-runtime: every thread's stack to stderr
                time.sleep(DUMP_WAIT_SEC)
            proc.kill()
            out, err = proc.communicate()  # what it printed before the deadline
            rc = None
    elapsed = time.monotonic() - started
    console = out.decode("utf-8", "replace").replace("\r", "")
    nproc_ok = re.search(r"^TENBOX-INITRAMFS: run: nproc\n%d\n" % cpus, console, re.M) is not None
    if until:
        nproc_ok = until in console
    result: Dict[str, object] = {"rc": rc, "seconds": round(elapsed, 2), "ok": rc == 0 and nproc_ok}
    if not result["ok"]:
        result["console_tail"] = console[-TAIL_CHARS:]
        result["stderr_tail"] = err.decode("utf-8", "replace")[-4 * TAIL_CHARS:]  # thread dumps
    if trace:
        kvm_trace = trace_take()
        if not result["ok"]:
            result["kvm_trace"] = kvm_trace
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.framework.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default="1,2,4,8", help="vCPU counts, comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="boots per vCPU count and VMM (default %(default)s)")
    p.add_argument("--control", action="store_true", help="interleave QEMU microvm -accel kvm boots")
    p.add_argument("--only-control", action="store_true", help="QEMU's boots only")
    p.add_argument("--qemu-cpu", default=QEMU_CPU, help="QEMU's -cpu (default %(default)s)")
    p.add_argument("--qemu-console-bps", type=int, default=0,
                   help="read QEMU's console at this many bytes/s through a 4 KiB pipe (slow serial exits)")
    p.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default %(default)s)")
    p.add_argument("--deadline", type=float, default=BOOT_DEADLINE_SEC,
                   help="seconds a boot may take before it counts as hung (default %(default)s)")
    p.add_argument("--kernel", type=Path, default=KERNEL_DIR / "vmlinuz")
    p.add_argument("--initrd", type=Path, default=KERNEL_DIR / "initramfs.cpio.gz")
    p.add_argument("--cmdline", default=CMDLINE)
    p.add_argument("--until", default="",
                   help="a boot passes once this text is on its console (the VMM is killed then), "
                        "instead of at poweroff with the vCPU count: for other images' kernels and initrds")
    p.add_argument("--out", type=Path, help="where the JSON summary goes")
    p.add_argument("--trace", action="store_true",
                   help="keep KVM's trace (tracefs) of each failed boot; adds nokaslr to the command line")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.cpus.split(",") if c.strip()]
    if args.trace:
        trace_start()
        args.cmdline += " nokaslr"
    vmms = {} if args.only_control else {"tenbox": tenbox_argv}
    if args.control or args.only_control:
        vmms["qemu"] = functools.partial(qemu_argv, cpu_model=args.qemu_cpu)
    runs: List[Dict[str, object]] = []
    for rnd in range(1, args.rounds + 1):
        for cpus in counts:
            for name, make in vmms.items():
                res = boot(make(args.kernel, args.initrd, args.cmdline, cpus, args.memory), cpus, args.deadline,
                           args.trace, args.qemu_console_bps if name == "qemu" else 0, args.until)
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
    failed = any(not r["ok"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
