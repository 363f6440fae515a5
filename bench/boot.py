#!/usr/bin/env python3
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
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import GUESTS, Timed, interleave, median, qemu_argv, smaps_rss_split, table, tenbox_argv  # noqa: E402

MEM_MB = 128
FIRST_LINE = b"hello from the tenbox test guest"


def boot_case(argv):
    def run():
        p = Timed(argv)
        first = p.wait_line(FIRST_LINE)
        end = p.wait_exit()
        if p.returncode != 0:
            raise RuntimeError("%s exited %s" % (argv[0], p.returncode))
        return {"first_line_ms": first * 1000, "exit_ms": end * 1000, "peak_rss_mib": p.rusage.ru_maxrss / 1024}
    return run


def overhead_case(argv):
    def run():
        p = Timed(argv)
        p.wait_line(b"idle: ready")
        time.sleep(0.3)
        guest, other = smaps_rss_split(p.proc.pid, MEM_MB << 20)
        p.proc.send_signal(signal.SIGTERM)
        p.wait_exit()
        return {"overhead_rss_mib": other / (1 << 20), "guest_rss_mib": guest / (1 << 20)}
    return run


def pio_case(argv, count):
    def run():
        p = Timed(argv)
        t_start = p.wait_line(b"pio: start", 120)
        t_done = p.wait_line(b"pio: done", 600)
        p.wait_exit(60)
        return {"exits_per_sec": count / (t_done - t_start)}
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--pio-count", type=int, default=200000)
    args = ap.parse_args()
    k = lambda name: str(GUESTS / ("%s.bzImage" % name))
    pio_cmd = "console=ttyS0 pio.count=%d" % args.pio_count

    results = interleave(args.runs, {
        "tenbox": boot_case(tenbox_argv(k("poweroff"), MEM_MB)),
        "qemu": boot_case(qemu_argv(k("poweroff"), MEM_MB)),
    })
    over = interleave(max(3, args.runs // 3), {
        "tenbox": overhead_case(tenbox_argv(k("idle"), MEM_MB)),
        "qemu": overhead_case(qemu_argv(k("idle"), MEM_MB)),
    })
    pio = interleave(max(3, args.runs // 3), {
        "tenbox": pio_case(tenbox_argv(k("pio"), MEM_MB, cmdline=pio_cmd), args.pio_count),
        "qemu": pio_case(qemu_argv(k("pio"), MEM_MB, cmdline=pio_cmd), args.pio_count),
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
