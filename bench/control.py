#!/usr/bin/env python3
"""Control-plane benchmark: tenboxd's own cost, measured against the bare runtime.

  * `vm.list` latency with 100 VMs defined (raw socket request, and the full
    `tenbox vm ls` command including interpreter start-up);
  * create -> running -> the guest's first line, through the daemon, against
    tenbox-vm-runtime started directly on the same guest (the daemon's overhead),
    interleaved;
  * 20 VMs of 64 MiB started at once: time until all run and all guests answer,
    the daemon's CPU time for it, and each worker's private memory (USS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import GUESTS, PYTHON, Timed, env, interleave, median, table, tenbox_argv  # noqa: E402

IDLE = str(GUESTS / "idle.bzImage")


class Daemon:
    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="tbx-bench-")
        self.sock = os.path.join(self.root, "tenbox.sock")
        e = env()
        e["TENBOX_NO_SCOPES"] = "1"
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tenbox_supervisor", "--data-dir", os.path.join(self.root, "data"), "--socket", self.sock,
             "--run-dir", os.path.join(self.root, "run")],
            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                raise RuntimeError("tenboxd did not start")
            time.sleep(0.05)

    def call(self, type_: str, **payload) -> dict:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(300)
        s.connect(self.sock)
        try:
            s.sendall((json.dumps({"type": type_, "payload": payload}) + "\n").encode())
            reply = json.loads(s.makefile("rb").readline())
        finally:
            s.close()
        if not reply.get("ok"):
            raise RuntimeError("%s: %s" % (type_, reply))
        return reply["payload"]

    def wait_console(self, vm_id: str, text: str, timeout: float = 60) -> None:
        path = os.path.join(self.root, "data", "vms", vm_id, "logs", "console.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path, "rb") as f:
                    if text.encode() in f.read():
                        return
            except OSError:
                pass
            time.sleep(0.002)
        raise RuntimeError("%s never printed %r" % (vm_id, text))

    def close(self) -> None:
        for vm in self.call("vm.list")["vms"]:
            if vm.get("state") in ("running", "starting"):
                self.call("vm.stop", vm_id=vm["id"])
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


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
    e = env()
    e["TENBOX_SOCK"] = d.sock
    for _ in range(rounds):
        t = time.monotonic()
        subprocess.run([PYTHON, "-m", "tenbox_ctl", "vm", "ls"], env=e, stdout=subprocess.DEVNULL, check=True)
        cli.append((time.monotonic() - t) * 1000)
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
        p = Timed(tenbox_argv(IDLE, 64))
        ready = p.wait_line(b"idle: ready")
        p.proc.send_signal(signal.SIGTERM)
        p.wait_exit()
        return {"ready_ms": ready * 1000}

    return interleave(rounds, {"daemon": through_daemon, "bare": bare})


def bench_burst(d: Daemon, count: int) -> dict:
    ids = [d.call("vm.create", name="burst-%02d" % i, kernel=IDLE, memory_mb=64)["id"] for i in range(count)]
    me = psutil.Process(d.proc.pid)
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
