"""Network benchmark: tenbox's virtio-net + libslirp against QEMU's virtio-net + `-netdev user` (libslirp too).

The `net` test guest's loop runs at CPL3 and polls. Both VMMs get the same
UDP host forward to the guest's benchmark port; the host socket opens the
conversation through it (`net.bench.wait=1`), then:
  * udp-tx: the guest streams datagrams to the host socket, which counts
    what arrives;
  * udp-rx: the host socket streams datagrams to the guest, which counts
    what arrives.
Rates are measured between the guest's start and done lines; medians of
interleaved runs and the tenbox/QEMU ratio, in Mbit/s and packets/s.

--linux: Linux's own virtio-net driver and TCP stack (Debian's kernel under
QEMU TCG) on tenbox's VirtioNet + SlirpNetwork served by
tenbox-vhost-user-net, against QEMU's virtio-net with `-netdev user`; the
same guest workload through the same guest forward (10.0.2.100:9000 and
:9001 to servers on the host's loopback):
  * tcp-tx: bench/linux_tcp.c (64 KiB writes; busybox nc writes 1 KiB at a
    time) streams to a host sink, timed there from the first byte to the last;
  * tcp-rx: busybox wget fetches from a host HTTP server, timed from the
    request to the guest's done line.

    python3 -m bench.net [--runs 5] [--linux] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

from bench.common import build_static, interleave, median, table
from tests.framework import linux_guest, qemu
from tests.framework.guests import guest_path
from tests.framework.ports import free_port
from tests.framework.process import ConsoleProcess
from tests.framework.repo import CACHE
from tests.framework.runtime import boot_argv
from tests.framework.vhost_user import Backend

GUEST_PORT = 40000
SIZE = 1024
COUNT = 20000
MEM_MB = 128
READY_SEC = 120.0
KNOCK_SEC = 30.0  # the forward may need a moment to be ready
KNOCK_INTERVAL_SEC = 0.2
DONE_SEC = 120.0


def argv_for(vmm: str, kind: str, hport: int) -> List[str]:
    cmdline = ("console=ttyS0 net.test=dhcp net.bench=%s net.bench.wait=1 net.bench.count=%d net.bench.size=%d"
               % (kind, COUNT, SIZE))
    fwd = "udp:127.0.0.1:%d-:%d" % (hport, GUEST_PORT)
    if vmm == "tenbox":
        return boot_argv(guest_path("net"), cmdline=cmdline, memory_mb=MEM_MB, hostfwds=[fwd])
    return qemu.microvm(guest_path("net"), append=cmdline, memory_mb=MEM_MB, rtc=True,
                        devices=qemu.user_net(["hostfwd=" + fwd]))


def run(vmm: str, kind: str) -> Dict[str, float]:
    hport = free_port(socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    try:
        with ConsoleProcess(argv_for(vmm, kind, hport), stdin=subprocess.DEVNULL) as p:
            p.wait_for("net: bench waiting", READY_SEC)
            received = [0, 0]
            stop = threading.Event()

            def count():
                sock.settimeout(0.2)
                while not stop.is_set():
                    try:
                        data = sock.recv(65536)
                    except socket.timeout:
                        continue
                    received[0] += 1
                    received[1] += len(data)

            # Knock until the guest has its peer; no knock once it has started (it would count as data).
            deadline = time.monotonic() + KNOCK_SEC
            while p.poll_for("net: start") is None:
                if p.proc.poll() is not None:
                    p.fail("the VMM exited before the benchmark started")
                if time.monotonic() > deadline:
                    p.fail("the guest did not start within %.0f s of knocking" % KNOCK_SEC)
                sock.sendto(b"tenbox-bench go", ("127.0.0.1", hport))
                p.poll_for("net: start", KNOCK_INTERVAL_SEC)
            t_start = p.seconds_to("net: start")
            counter = threading.Thread(target=count, daemon=True)
            if kind == "udp-tx":
                counter.start()
            else:
                payload = b"r" * SIZE
                for _ in range(COUNT):
                    sock.sendto(payload, ("127.0.0.1", hport))
            t_done = p.seconds_to(r"net: done.*\n", DONE_SEC)
            stop.set()
            if counter.is_alive():
                counter.join(2)
            guest_packets = int(re.search(r"net: done.*\bpackets=(\d+)", p.output).group(1))
    finally:
        sock.close()
    packets = received[0] if kind == "udp-tx" else guest_packets
    secs = t_done - t_start
    return {"pps": packets / secs, "mbit": packets * SIZE * 8 / secs / 1e6, "delivered": packets / COUNT}


# --- --linux: Debian's kernel under QEMU TCG, tenbox over vhost-user --------------------------

LINUX_MB = int(os.environ.get("TENBOX_BENCH_NET_MB", "64"))
LINUX_FWD_ADDR = "10.0.2.100"
LINUX_SINK_PORT, LINUX_SOURCE_PORT = 9000, 9001
LINUX_MEMORY_MB = 512
LINUX_WAIT_SEC = 300.0
BACKEND_EXIT_SEC = 30.0
LINUX_SCRIPT = r"""
set -e
udhcpc -i eth0 -n -q -t 5 -T 2 >/dev/null 2>&1
echo NET-UP
/linux_tcp %(addr)s %(sink)d %(mb)d
echo NET-TX-DONE
wget -q -O /dev/null http://%(addr)s:%(source)d/data
echo NET-RX-DONE
""" % {"mb": LINUX_MB, "addr": LINUX_FWD_ADDR, "sink": LINUX_SINK_PORT, "source": LINUX_SOURCE_PORT}


class _HostEnds:
    """The host's ends on 127.0.0.1: a sink that times what arrives, an HTTP source that streams zeros."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sink.bind(("127.0.0.1", 0))
        self.sink.listen(1)
        self.source = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.source.bind(("127.0.0.1", 0))
        self.source.listen(1)
        self.tx_secs: float = 0.0
        self.rx_start: float = 0.0
        self.errors: list = []
        self._threads = [threading.Thread(target=self._take, daemon=True),
                         threading.Thread(target=self._give, daemon=True)]
        for t in self._threads:
            t.start()

    def _take(self) -> None:
        try:
            conn, _ = self.sink.accept()
            with conn:
                buf = bytearray(1 << 20)
                got = conn.recv_into(buf)
                t0 = time.monotonic()
                while 0 < got < self.nbytes:
                    n = conn.recv_into(buf)
                    if n == 0:
                        break
                    got += n
                self.tx_secs = time.monotonic() - t0
                if got < self.nbytes:
                    self.errors.append("the sink got %d of %d bytes" % (got, self.nbytes))
                # QEMU's guestfwd is a chardev: closing our end does not close the guest's
                # connection, so the guest waits for this line and stops nc itself.
                conn.sendall(b"SINK-DONE\n")
                time.sleep(0.5)
        except OSError as e:
            self.errors.append("sink: %s" % e)

    def _give(self) -> None:
        try:
            conn, _ = self.source.accept()
            with conn:
                req = b""
                while b"\r\n\r\n" not in req:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    req += chunk
                self.rx_start = time.monotonic()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % self.nbytes)
                block = bytes(1 << 20)
                left = self.nbytes
                while left:
                    n = conn.send(block[:min(left, len(block))])
                    left -= n
        except OSError as e:
            self.errors.append("source: %s" % e)

    def close(self) -> None:
        self.sink.close()
        self.source.close()


def linux_run(vmm: str, linux: linux_guest.Artifacts, tsc: int, initrd: Path, workdir: Path) -> Dict[str, float]:
    ends = _HostEnds(LINUX_MB << 20)
    fwds = [("tcp:%s:%d" % (LINUX_FWD_ADDR, LINUX_SINK_PORT), ends.sink.getsockname()[1]),
            ("tcp:%s:%d" % (LINUX_FWD_ADDR, LINUX_SOURCE_PORT), ends.source.getsockname()[1])]
    backend = None
    try:
        if vmm == "qemu":
            devices = qemu.user_net(["guestfwd=%s-tcp:127.0.0.1:%d" % f for f in fwds], mac=qemu.DEFAULT_MAC)
        else:
            sock = workdir / "vhost-user-net.sock"
            args = []
            for spec, port in fwds:
                args += ["--guestfwd", "guestfwd:%s-127.0.0.1:%d" % (spec, port)]
            backend = Backend("net", sock, args)
            devices = qemu.vhost_user_net(sock)
        with linux_guest.boot_script(linux, tsc, initrd, devices, memory_mb=LINUX_MEMORY_MB, deadline=None) as vm:
            vm.wait_for(r"^NET-TX-DONE$", LINUX_WAIT_SEC)
            vm.wait_for(r"^NET-RX-DONE$", LINUX_WAIT_SEC)
            rx_secs = time.monotonic() - ends.rx_start
            linux_guest.finish_script(vm)
        if backend is not None:
            backend.wait_exit(BACKEND_EXIT_SEC)
        if ends.errors:
            raise RuntimeError("; ".join(ends.errors))
    finally:
        if backend is not None:
            backend.close()
        ends.close()
    mbit = (LINUX_MB << 20) * 8 / 1e6
    return {"tcp-tx": mbit / ends.tx_secs, "tcp-rx": mbit / rx_secs}


def linux_main(args: argparse.Namespace) -> int:
    args.workdir.mkdir(parents=True, exist_ok=True)
    linux = linux_guest.build()
    tsc = linux_guest.tsc_khz(linux)
    initrd = linux_guest.initrd_with(args.workdir, linux, LINUX_SCRIPT,
                                     {"/linux_tcp": build_static("linux_tcp", args.workdir)})
    res = interleave(args.runs, {"tenbox": lambda: linux_run("tenbox", linux, tsc, initrd, args.workdir),
                                 "qemu": lambda: linux_run("qemu", linux, tsc, initrd, args.workdir)})
    rows = []
    for case in ("tcp-tx", "tcp-rx"):
        t, q = median(res["tenbox"][case]), median(res["qemu"][case])
        rows.append(("%s Mbit/s" % case, "%.0f" % t, "%.0f" % q, "%.2f" % (t / q)))
        print("  %-16s tenbox %.0f  qemu %.0f  (%.2f)" % (case, t, q, t / q), file=sys.stderr)
    print("network benchmark, Linux's virtio-net driver (Debian %s under QEMU TCG, microvm): %d interleaved runs "
          "each, medians; %d MiB each way over TCP through a guest forward to the host's loopback"
          % (linux.release, args.runs, LINUX_MB))
    print(table(rows, ("case", "tenbox vhost-user-net", "QEMU virtio-net -netdev user", "tenbox/QEMU")))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--linux", action="store_true",
                    help="Linux's driver under QEMU TCG: tenbox over vhost-user against QEMU's -netdev user")
    ap.add_argument("--workdir", type=Path, default=CACHE / "bench-net")
    args = ap.parse_args()
    if args.linux:
        return linux_main(args)
    rows = []
    for kind in ("udp-tx", "udp-rx"):
        res = interleave(args.runs, {"tenbox": lambda: run("tenbox", kind), "qemu": lambda: run("qemu", kind)})
        for metric, unit in (("mbit", "Mbit/s"), ("pps", "packets/s")):
            t, q = median(res["tenbox"][metric]), median(res["qemu"][metric])
            rows.append(("%s %s" % (kind, unit), "%.0f" % t, "%.0f" % q, "%.2f" % (t / q)))
        rows.append(("%s delivered" % kind, "%.0f %%" % (100 * median(res["tenbox"]["delivered"])),
                     "%.0f %%" % (100 * median(res["qemu"]["delivered"])), ""))
        print("  %s done" % kind, file=sys.stderr)
    print("network benchmark: %d interleaved runs each, medians; %d datagrams of %d bytes through a UDP host forward"
          % (args.runs, COUNT, SIZE))
    print(table(rows, ("case", "tenbox", "QEMU microvm -netdev user", "tenbox/QEMU")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
