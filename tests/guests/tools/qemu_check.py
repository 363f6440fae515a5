#!/usr/bin/env python3
"""Boot every test guest under QEMU microvm and check its result lines (developer tool, not root).

    tools/qemu_check.py [--accel kvm|tcg] [--out DIR] [--verbose] [GUEST...]

QEMU is the reference VMM for the guests: each must report PASS here before
tenbox is judged by it. Prints the exact command line, the wall time from
process start to exit and the verdict for each guest; exit status 0 only if
all passed. The interactive guests are driven as a user would: echo over a
pipe on stdin, idle through stdin and `system_powerdown` on a monitor socket.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional

QEMU = "qemu-system-x86_64"
GUEST_TIMEOUT_SEC = 60.0
LINE_WAIT_SEC = 30.0
MONITOR_CONNECT_SEC = 5.0
INITRD_SIZE = 5000  # "a few KiB", as the boot guest's tests use


@dataclass
class Run:
    """One QEMU process and the console lines it printed, with arrival times."""

    argv: List[str]
    proc: subprocess.Popen
    started: float
    lines: List[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def reader(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, text: str, timeout: float = LINE_WAIT_SEC) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(text in l for l in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return any(text in l for l in self.lines)
                self.cond.wait(min(left, 0.2))
        return True

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()


def start(argv: List[str]) -> Run:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    run = Run(argv=argv, proc=proc, started=time.monotonic())
    threading.Thread(target=run.reader, daemon=True).start()
    return run


def finish(run: Run, timeout: float) -> float:
    """Wait for QEMU to exit (kill it at the deadline); returns the wall time."""
    try:
        run.proc.wait(timeout=max(0.0, run.started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
    elapsed = time.monotonic() - run.started
    time.sleep(0.05)  # let the reader drain the pipe
    return elapsed


def qemu_argv(accel: str, kernel: str, append: str = "", machine: str = "microvm,acpi=on",
              extra: Optional[List[str]] = None, no_reboot: bool = True, monitor: str = "none") -> List[str]:
    argv = [QEMU, "-M", machine, "-accel", accel, "-m", "256", "-kernel", kernel,
            "-nographic", "-serial", "stdio", "-monitor", monitor]
    if append:
        argv += ["-append", append]
    if no_reboot:
        argv.append("-no-reboot")
    return argv + (extra or [])


def send_monitor(path: str, command: str) -> None:
    deadline = time.monotonic() + MONITOR_CONNECT_SEC
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s:
        s.settimeout(2.0)
        s.recv(4096)  # banner
        s.sendall(command.encode() + b"\n")
        time.sleep(0.2)


@dataclass
class Result:
    name: str
    argv: List[str]
    elapsed: float
    ok: bool
    why: str
    lines: List[str]


def verdict(name: str, run: Run, elapsed: float, extra_ok: Callable[[List[str]], str] = lambda l: "") -> Result:
    lines = run.lines
    why = ""
    if not any(l == "TENBOX-GUEST %s PASS" % name for l in lines):
        why = "no PASS line"
    elif run.proc.returncode != 0:
        why = "QEMU exit status %s" % run.proc.returncode
    else:
        why = extra_ok(lines)
    return Result(name, run.argv, elapsed, not why, why or "PASS", lines)


def check_simple(name: str, accel: str, out: str, append: str = "", extra: Optional[List[str]] = None,
                 machine: str = "microvm,acpi=on", expect: Optional[List[str]] = None) -> Result:
    run = start(qemu_argv(accel, os.path.join(out, name + ".bzImage"), append, machine, extra))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)

    def has(lines: List[str]) -> str:
        missing = [e for e in expect or [] if not any(e in l for l in lines)]
        return "missing %r" % missing if missing else ""

    return verdict(name, run, elapsed, has)


def check_boot(accel: str, out: str, tmp: str) -> Result:
    data = bytes((i * 7 + 3) & 0xFF for i in range(INITRD_SIZE))
    path = os.path.join(tmp, "initrd.bin")
    with open(path, "wb") as f:
        f.write(data)
    crc = "%08x" % zlib.crc32(data)
    return check_simple("boot", accel, out, "expect.mem_mb=256 expect.initrd_size=%d" % INITRD_SIZE,
                        ["-initrd", path], expect=["info - initrd.crc32=" + crc])


def check_reset(accel: str, out: str) -> Result:
    # microvm has no i8042: the FADT reset register; no -no-reboot, so QEMU
    # resets the machine and the guest boots a second time. rtc=on: the CMOS
    # boot counter needs the RTC, which microvm leaves out under KVM.
    argv = qemu_argv(accel, os.path.join(out, "reset.bzImage"), "reset=acpi", "microvm,acpi=on,rtc=on",
                     no_reboot=False)
    run = start(argv)
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)

    def both_boots(lines: List[str]) -> str:
        return "" if "reset: boot 1" in lines and "reset: boot 2" in lines else "did not see both boots"

    return verdict("reset", run, elapsed, both_boots)


def check_echo(accel: str, out: str) -> Result:
    run = start(qemu_argv(accel, os.path.join(out, "echo.bzImage")))
    if run.wait_line("echo: ready"):
        run.send(b"hello from the pipe\nsecond line\r\npoweroff\n")
    elapsed = finish(run, GUEST_TIMEOUT_SEC)

    def echoed(lines: List[str]) -> str:
        want = ["echo: hello from the pipe", "echo: second line", "echo: poweroff"]
        missing = [w for w in want if w not in lines]
        return "missing %r" % missing if missing else ""

    return verdict("echo", run, elapsed, echoed)


def check_idle(accel: str, out: str, tmp: str) -> Result:
    sock = os.path.join(tmp, "monitor.sock")
    run = start(qemu_argv(accel, os.path.join(out, "idle.bzImage"), monitor="unix:%s,server=on,wait=off" % sock))
    if run.wait_line("idle: ready"):
        run.send(b"still idle\n")
        if run.wait_line("echo: still idle"):
            send_monitor(sock, "system_powerdown")
    elapsed = finish(run, GUEST_TIMEOUT_SEC)
    return verdict("idle", run, elapsed,
                   lambda lines: "" if "idle: power button" in lines else "no power button line")


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="example: tools/qemu_check.py --accel kvm boot smp")
    p.add_argument("--accel", default="kvm", choices=("kvm", "tcg"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out"))
    p.add_argument("--verbose", "-v", action="store_true", help="print every console line")
    p.add_argument("guests", nargs="*")
    args = p.parse_args(argv)
    out = os.path.normpath(args.out)
    a = args.accel
    with tempfile.TemporaryDirectory(prefix="tenbox-guests-") as tmp:
        checks = {
            "boot": lambda: check_boot(a, out, tmp),
            "acpi": lambda: check_simple("acpi", a, out, "expect.cpus=4 expect.virtio=1",
                                         ["-smp", "4", "-global", "virtio-mmio.force-legacy=false",
                                          "-device", "virtio-rng-device"]),
            "smp": lambda: check_simple("smp", a, out, "expect.cpus=4", ["-smp", "4"],
                                        expect=["info - cpu=%d up" % i for i in range(4)]),
            "poweroff": lambda: check_simple("poweroff", a, out, expect=["hello from the tenbox test guest"]),
            "reset": lambda: check_reset(a, out),
            "echo": lambda: check_echo(a, out),
            "idle": lambda: check_idle(a, out, tmp),
            "pio": lambda: check_simple("pio", a, out, "pio.count=100000", expect=["pio: done n=100000"]),
        }
        names = args.guests or list(checks)
        unknown = [n for n in names if n not in checks]
        if unknown:
            print("unknown guest(s): %s (choose from %s)" % (" ".join(unknown), " ".join(checks)), file=sys.stderr)
            return 2
        failed = 0
        for name in names:
            r = checks[name]()
            failed += not r.ok
            print("%-8s %-4s %6.2f s  %s" % (name, "ok" if r.ok else "FAIL", r.elapsed, r.why))
            print("         $ " + " ".join(shlex.quote(x) for x in r.argv))
            if args.verbose or not r.ok:
                for line in r.lines:
                    print("         | " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
