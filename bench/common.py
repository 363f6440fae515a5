"""Shared pieces of tenbox's benchmarks (bench/; run by hand or `make bench`).

Every benchmark runs tenbox and a reference in the same run, interleaved,
several times, and reports medians and ratios; none of them is a test.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
GUESTS = REPO / "tests" / "guests" / "out"
QEMU = "qemu-system-x86_64"


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO)
    e.pop("NOTIFY_SOCKET", None)
    return e


def tenbox_argv(kernel: str, memory_mb: int, cpus: int = 1, cmdline: Optional[str] = None) -> List[str]:
    argv = [PYTHON, "-m", "tenbox_vmm", "--kernel", kernel, "--memory", str(memory_mb), "--cpus", str(cpus),
            "--console", "stdio"]
    if cmdline is not None:
        argv += ["--cmdline", cmdline]
    return argv


def qemu_argv(kernel: str, memory_mb: int, cpus: int = 1, cmdline: Optional[str] = None, accel: str = "kvm") -> List[str]:
    argv = [QEMU, "-M", "microvm,acpi=on", "-accel", accel, "-m", str(memory_mb), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-kernel", kernel]
    if cmdline is not None:
        argv += ["-append", cmdline]
    return argv


class Timed:
    """A child process whose stdout lines are timestamped as they arrive."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env())
        self.buf = b""
        self.marks: List[Tuple[float, bytes]] = []
        self.rusage = None
        self.returncode: Optional[int] = None

    def wait_line(self, needle: bytes, timeout: float = 60.0) -> float:
        """Seconds from start until a stdout line containing `needle` was read."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            for t, line in self.marks:
                if needle in line:
                    return t - self.t0
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise RuntimeError("no %r from %s" % (needle, self.proc.args[:3]))
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                self.kill()
                raise RuntimeError("%s exited before %r" % (self.proc.args[:3], needle))
            self._take(chunk, now)

    def _take(self, chunk: bytes, now: float) -> None:
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.marks.append((now, line.rstrip(b"\r")))

    def wait_exit(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                now = time.monotonic()
                self.rusage = rusage
                self.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
                self.proc.returncode = self.returncode
                return now - self.t0
            r, _, _ = select.select([fd], [], [], 0.001)
            if r:
                self._take(os.read(fd, 65536), time.monotonic())
        self.kill()
        raise RuntimeError("%s did not exit" % (self.proc.args[:3],))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def interleave(runs: int, cases: Dict[str, Callable[[], Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """Run each case once per round, alternating, `runs` rounds; collect every metric."""
    results: Dict[str, Dict[str, List[float]]] = {name: {} for name in cases}
    for i in range(runs):
        order = list(cases.items())
        if i % 2:
            order.reverse()  # neither side always goes first
        for name, fn in order:
            for metric, value in fn().items():
                results[name].setdefault(metric, []).append(value)
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def smaps_rss_split(pid: int, guest_bytes: int) -> Tuple[int, int]:
    """(RSS of the guest RAM mapping(s), RSS of everything else) in bytes, from /proc/pid/smaps."""
    guest = other = 0
    size = rss = 0
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:":
                rss = int(parts[1]) * 1024
                if size >= guest_bytes * 3 // 4 and size <= guest_bytes + (64 << 20):
                    guest += rss
                else:
                    other += rss
    return guest, other


def table(rows: List[Tuple[str, ...]], header: Tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
