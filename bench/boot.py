"""Boot benchmark: tenbox-vm-runtime against QEMU microvm with KVM, same test guests, one run.

Measures, interleaved, --runs times each (default 10):
  * process start -> the guest's first serial line, and -> process exit
    (tests/guests `poweroff`: prints one line, powers off through ACPI);
  * memory overhead: resident memory outside guest RAM, with the `idle`
    guest booted and waiting (Firecracker's method: RSS of every mapping
    that is not guest memory), plus peak RSS of the boot runs;
  * port-I/O exits handled per second: the `pio` guest does N `outb` from
    user mode (CPL3, native speed here), timed between its start and done lines.
Prints medians and tenbox/QEMU ratios as a markdown table.

    python3 -m bench.boot [--runs 10] [--pio-count 200000]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from bench.common import interleave, median, smaps_rss_split, table
from tests.framework import qemu
from tests.framework.guests import guest_path
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv

MEM_MB = 128
FIRST_LINE = "hello from the tenbox test guest"
WAIT_SEC = 60.0
PIO_START_SEC = 120.0
PIO_DONE_SEC = 600.0


def boot_case(argv: List[str]):
    def run() -> Dict[str, float]:
        with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
            first = p.seconds_to(FIRST_LINE, WAIT_SEC)
            if p.wait_exit(WAIT_SEC) != 0:
                p.fail("exit %s" % p.proc.returncode)
            return {"first_line_ms": first * 1000, "exit_ms": p.elapsed() * 1000,
                    "peak_rss_mib": p.rusage.ru_maxrss / 1024}
    return run


def overhead_case(argv: List[str]):
    def run() -> Dict[str, float]:
        with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
            p.wait_for("idle: ready", WAIT_SEC)
            time.sleep(0.3)
            guest, other = smaps_rss_split(p.proc.pid, MEM_MB << 20)
            p.signal(signal.SIGTERM)
            p.wait_exit(WAIT_SEC)
        return {"overhead_rss_mib": other / (1 << 20), "guest_rss_mib": guest / (1 << 20)}
    return run


def pio_case(argv: List[str], count: int):
    def run() -> Dict[str, float]:
        with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
            t_start = p.seconds_to("pio: start", PIO_START_SEC)
            t_done = p.seconds_to("pio: done", PIO_DONE_SEC)
            p.wait_exit(WAIT_SEC)
        return {"exits_per_sec": count / (t_done - t_start)}
    return run


def tenbox_argv(name: str, cmdline: Optional[str] = None) -> List[str]:
    return boot_argv(guest_path(name), cmdline=cmdline, memory_mb=MEM_MB)


def qemu_argv(name: str, cmdline: Optional[str] = None) -> List[str]:
    return qemu.microvm(guest_path(name), append=cmdline, memory_mb=MEM_MB)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--pio-count", type=int, default=200000)
    args = ap.parse_args()
    pio_cmd = "console=ttyS0 pio.count=%d" % args.pio_count

    results = interleave(args.runs, {
        "tenbox": boot_case(tenbox_argv("poweroff")),
        "qemu": boot_case(qemu_argv("poweroff")),
    })
    over = interleave(max(3, args.runs // 3), {
        "tenbox": overhead_case(tenbox_argv("idle")),
        "qemu": overhead_case(qemu_argv("idle")),
    })
    pio = interleave(max(3, args.runs // 3), {
        "tenbox": pio_case(tenbox_argv("pio", pio_cmd), args.pio_count),
        "qemu": pio_case(qemu_argv("pio", pio_cmd), args.pio_count),
    })
    for name in results:
        results[name].update(over[name])
        results[name].update(pio[name])

    rows = []
    for metric, unit, better in (
        ("first_line_ms", "ms", "lower"),
        ("exit_ms", "ms", "lower"),
        ("peak_rss_mib", "MiB", "lower"),
        ("overhead_rss_mib", "MiB", "lower"),
        ("exits_per_sec", "/s", "higher"),
    ):
        t, q = median(results["tenbox"][metric]), median(results["qemu"][metric])
        rows.append((metric, "%.1f %s" % (t, unit), "%.1f %s" % (q, unit), "%.2f" % (t / q), better))
    print("boot benchmark: %d runs each, interleaved; medians; guest RAM %d MiB" % (args.runs, MEM_MB))
    print(table(rows, ("metric", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU", "better")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
