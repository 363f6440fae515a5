"""Control-plane benchmark: tenboxd's own cost, measured against the bare runtime.

  * `vm.list` latency with 100 VMs defined (raw socket request, and the full
    `tenbox vm ls` command including interpreter start-up);
  * create -> running -> the guest's first line, through the daemon with a
    standby worker ready (docs/daemon.md, "Standby workers") and through one
    without standbys (TENBOX_STANDBY_WORKERS=0), against tenbox-vm-runtime
    started directly and QEMU microvm (KVM) on the same guest, interleaved;
  * an idle standby worker's memory (RSS and USS);
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
from tests.framework import qemu
from tests.framework.daemon import DaemonProcess
from tests.framework.guests import guest_path
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv

IDLE = guest_path("idle")
READY_SEC = 60.0
CONSOLE_POLL_SEC = 0.002  # the console log is polled: the start figures are only as fine as this


class Daemon:
    """tenboxd on private paths (tests/framework/daemon.py) and what the benchmark asks of it."""

    def __init__(self, standby_workers: int = 1) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tbx-bench-"))
        self.d = DaemonProcess(self.root, extra_env={"TENBOX_STANDBY_WORKERS": str(standby_workers)})
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

    def standby_ready(self, timeout: float = READY_SEC) -> dict:
        """Until a standby worker is ready (not timed: a start finds one ready when starts are not back to back)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.call("system.info")["standby_workers"]
            if info["ready"] >= info["wanted"]:
                return info
            if time.monotonic() > deadline:
                raise RuntimeError("no standby worker ready within %.0f s: %s" % (timeout, info))
            time.sleep(0.05)

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


def bench_start(d: Daemon, cold: Daemon, rounds: int) -> dict:
    counter = [0]

    def through(daemon: Daemon):
        def run():
            if daemon.d.extra_env.get("TENBOX_STANDBY_WORKERS") != "0":
                daemon.standby_ready()
            counter[0] += 1
            t0 = time.monotonic()
            vm = daemon.call("vm.create", name="start-%d" % counter[0], kernel=IDLE, memory_mb=64)
            daemon.call("vm.start", vm_id=vm["id"])
            t_running = time.monotonic()
            daemon.wait_console(vm["id"], "idle: ready")
            t_ready = time.monotonic()
            daemon.call("vm.stop", vm_id=vm["id"])
            daemon.call("vm.delete", vm_id=vm["id"])
            return {"running_ms": (t_running - t0) * 1000, "ready_ms": (t_ready - t0) * 1000}
        return run

    def bare(argv):
        def run():
            with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
                ready = p.seconds_to("idle: ready", READY_SEC)
                p.signal(signal.SIGTERM)
                p.wait_exit(READY_SEC)
            return {"ready_ms": ready * 1000}
        return run

    return interleave(rounds, {"daemon": through(d), "cold daemon": through(cold),
                               "bare": bare(boot_argv(IDLE, memory_mb=64)),
                               "qemu": bare(qemu.microvm(IDLE, memory_mb=64))})


def bench_standby_memory(d: Daemon) -> dict:
    """An idle standby's RSS and USS, and its spare's (a worker sandboxed ahead of its order)."""
    ready = d.standby_ready()
    time.sleep(0.3)
    info = psutil.Process(ready["pids"][0]).memory_full_info()
    out = {"rss_mib": info.rss / (1 << 20), "uss_mib": info.uss / (1 << 20)}
    if ready.get("spares"):
        spare = psutil.Process(ready["spares"][0]).memory_full_info()
        out.update(spare_rss_mib=spare.rss / (1 << 20), spare_uss_mib=spare.uss / (1 << 20))
    return out


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
    cold = Daemon(standby_workers=0)
    try:
        listing = bench_list(d, args.runs)
        starts = bench_start(d, cold, args.runs)
        standby = bench_standby_memory(d)
        burst = bench_burst(d, args.burst)
    finally:
        d.close()
        cold.close()
    print("control benchmark: medians of %d interleaved runs" % args.runs)
    rows = [(k, "%.1f ms" % v) for k, v in listing.items()]
    print(table(rows, ("listing", "median")))
    print()
    q = median(starts["qemu"]["ready_ms"])
    rows = []
    for name, label in (("daemon", "create + start through tenboxd, a standby ready"),
                        ("cold daemon", "create + start through tenboxd, no standby")):
        rows.append((label + " -> running", "%.1f ms" % median(starts[name]["running_ms"]), ""))
        r = median(starts[name]["ready_ms"])
        rows.append((label + " -> guest's first line", "%.1f ms" % r, "%.2f" % (r / q)))
    b = median(starts["bare"]["ready_ms"])
    rows.append(("bare tenbox-vm-runtime -> guest's first line", "%.1f ms" % b, "%.2f" % (b / q)))
    rows.append(("bare QEMU microvm (KVM) -> guest's first line", "%.1f ms" % q, "1.00"))
    print(table(rows, ("start (idle guest, 64 MiB)", "median", "/ QEMU microvm")))
    print()
    rows = [("idle standby worker: RSS", "%.1f MiB" % standby["rss_mib"]),
            ("idle standby worker: USS (its own pages)", "%.1f MiB" % standby["uss_mib"])]
    if "spare_uss_mib" in standby:
        rows += [("its spare, sandboxed ahead: RSS / USS", "%.1f / %.1f MiB" % (standby["spare_rss_mib"],
                                                                              standby["spare_uss_mib"]))]
    print(table(rows, ("standby", "value")))
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
