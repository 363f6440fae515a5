"""Control-plane benchmark: tenboxd's own cost, measured against the bare runtime.

  * `vm.list` latency with 100 VMs defined (raw socket request, and the full
    `tenbox vm ls` command including interpreter start-up);
  * create -> running -> the guest's first line, through the daemon, against
    tenbox-vm-runtime started directly on the same guest (the daemon's overhead),
    interleaved;
  * 20 VMs of 64 MiB started at once: time until all run and all guests answer,
    the daemon's CPU time for it, and each worker's private memory (USS).

    python3 -m bench.control [--runs 10] [--burst 20]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import interleave, median, table
from tests.framework.daemon import DaemonProcess
from tests.framework.guests import guest_path
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv

IDLE = guest_path("idle")
READY_SEC = 60.0
CONSOLE_POLL_SEC = 0.002  # the console log is polled: the start figures are only as fine as this


class Daemon:
    """tenboxd on private paths (tests/framework/daemon.py) and what the benchmark asks of it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tbx-bench-"))
        self.d = DaemonProcess(self.root)
        self.d.start()
        self.pid = self.d.proc.proc.pid

    def call(self, type_: str, **payload) -> dict:
        """The reply's payload; an error reply raises."""
        reply = self.d.call(type_, timeout=300, **payload)
        if not reply.get("ok"):
            raise RuntimeError("%s: %s" % (type_, reply))
        return reply["payload"]

    def wait_console(self, vm_id: str, text: str, timeout: float = READY_SEC) -> None:
        """Until the VM's console log file has `text`: read straight from the file, not through vm.logs,
        so that the daemon's own answer time is not in the figure."""
        path = self.d.data_dir / "vms" / vm_id / "logs" / "console.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text.encode() in path.read_bytes():
                    return
            except OSError:
                pass  # not written yet
            time.sleep(CONSOLE_POLL_SEC)
        raise RuntimeError("%s never printed %r" % (vm_id, text))

    def close(self) -> None:
        for vm in self.call("vm.list")["vms"]:
            if vm.get("state") in ("running", "starting"):
                self.call("vm.stop", vm_id=vm["id"])
        self.d.stop()
        self.d.cleanup()
        shutil.rmtree(str(self.root), ignore_errors=True)


def bench_list(d: Daemon, rounds: int) -> dict:
    for i in range(100):
        d.call("vm.create", name="list-%03d" % i, kernel=IDLE, memory_mb=32)
    raw = []
    for _ in range(rounds * 5):
        t = time.monotonic()
        n = len(d.call("vm.list")["vms"])
        raw.append((time.monotonic() - t) * 1000)
        assert n >= 100
    cli = []
    for _ in range(rounds):
        t = time.monotonic()
        r = d.d.ctl("vm", "ls")
        cli.append((time.monotonic() - t) * 1000)
        if r.returncode != 0:
            raise RuntimeError("tenbox vm ls: %s" % r.stderr.decode(errors="replace"))
    for vm in d.call("vm.list")["vms"]:
        if vm["name"].startswith("list-"):
            d.call("vm.delete", vm_id=vm["id"])
    return {"vm.list request (100 VMs)": median(raw), "`tenbox vm ls` command (100 VMs)": median(cli)}


def bench_start(d: Daemon, rounds: int) -> dict:
    counter = [0]

    def through_daemon():
        counter[0] += 1
        t0 = time.monotonic()
        vm = d.call("vm.create", name="start-%d" % counter[0], kernel=IDLE, memory_mb=64)
        d.call("vm.start", vm_id=vm["id"])
        t_running = time.monotonic()
        d.wait_console(vm["id"], "idle: ready")
        t_ready = time.monotonic()
        d.call("vm.stop", vm_id=vm["id"])
        d.call("vm.delete", vm_id=vm["id"])
        return {"running_ms": (t_running - t0) * 1000, "ready_ms": (t_ready - t0) * 1000}

    def bare():
        with ConsoleProcess(boot_argv(IDLE, memory_mb=64), stdin=subprocess.DEVNULL) as p:
            ready = p.seconds_to("idle: ready", READY_SEC)
            p.signal(signal.SIGTERM)
            p.wait_exit(READY_SEC)
        return {"ready_ms": ready * 1000}

    return interleave(rounds, {"daemon": through_daemon, "bare": bare})


def bench_burst(d: Daemon, count: int) -> dict:
    ids = [d.call("vm.create", name="burst-%02d" % i, kernel=IDLE, memory_mb=64)["id"] for i in range(count)]
    me = psutil.Process(d.pid)
    cpu0 = sum(me.cpu_times()[:2])
    t0 = time.monotonic()
    errors = []

    def start(vm_id):
        try:
            d.call("vm.start", vm_id=vm_id)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e))

    threads = [threading.Thread(target=start, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_running = time.monotonic()
    for i in ids:
        d.wait_console(i, "idle: ready", 120)
    t_ready = time.monotonic()
    cpu = sum(me.cpu_times()[:2]) - cpu0
    uss = []
    for vm in d.call("vm.list")["vms"]:
        if vm["id"] in ids and vm.get("pid"):
            uss.append(psutil.Process(vm["pid"]).memory_full_info().uss / (1 << 20))
    for i in ids:
        d.call("vm.stop", vm_id=i)
        d.call("vm.delete", vm_id=i)
    if errors:
        raise RuntimeError("starts failed: %s" % errors[:3])
    return {"all_running_s": t_running - t0, "all_ready_s": t_ready - t0, "daemon_cpu_s": cpu,
            "uss_median_mib": median(uss), "uss_max_mib": max(uss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--burst", type=int, default=20)
    args = ap.parse_args()
    d = Daemon()
    try:
        listing = bench_list(d, args.runs)
        starts = bench_start(d, args.runs)
        burst = bench_burst(d, args.burst)
    finally:
        d.close()
    print("control benchmark: medians of %d interleaved runs" % args.runs)
    rows = [(k, "%.1f ms" % v) for k, v in listing.items()]
    print(table(rows, ("listing", "median")))
    print()
    dr, br = median(starts["daemon"]["ready_ms"]), median(starts["bare"]["ready_ms"])
    rows = [
        ("create + start -> running (daemon)", "%.1f ms" % median(starts["daemon"]["running_ms"]), "", ""),
        ("create + start -> guest's first line", "%.1f ms" % dr, "%.1f ms" % br, "%.2f" % (dr / br)),
    ]
    print(table(rows, ("start", "through tenboxd", "bare tenbox-vm-runtime", "daemon/bare")))
    print()
    rows = [
        ("%d VMs of 64 MiB started at once: all running" % args.burst, "%.2f s" % burst["all_running_s"]),
        ("... all guests answering", "%.2f s" % burst["all_ready_s"]),
        ("tenboxd CPU time for the burst", "%.2f s" % burst["daemon_cpu_s"]),
        ("worker private memory (USS), median", "%.1f MiB" % burst["uss_median_mib"]),
        ("worker private memory (USS), max", "%.1f MiB" % burst["uss_max_mib"]),
    ]
    print(table(rows, ("burst", "value")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
