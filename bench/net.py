#!/usr/bin/env python3
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
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import GUESTS, PYTHON, QEMU, Timed, interleave, median, table  # noqa: E402

GUEST_PORT = 40000
SIZE = 1024
COUNT = 20000
MEM_MB = 128


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def argv_for(vmm: str, kind: str, hport: int):
    cmdline = ("console=ttyS0 net.test=dhcp net.bench=%s net.bench.wait=1 net.bench.count=%d net.bench.size=%d"
               % (kind, COUNT, SIZE))
    fwd = "udp:127.0.0.1:%d-:%d" % (hport, GUEST_PORT)
    kernel = str(GUESTS / "net.bzImage")
    if vmm == "tenbox":
        return [PYTHON, "-m", "tenbox_vmm", "--kernel", kernel, "--memory", str(MEM_MB), "--console", "stdio",
                "--net", "--hostfwd", fwd, "--cmdline", cmdline]
    return [QEMU, "-M", "microvm,acpi=on,rtc=on", "-accel", "kvm", "-m", str(MEM_MB), "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-net-device,netdev=n0",
            "-netdev", "user,id=n0,hostfwd=" + fwd, "-kernel", kernel, "-append", cmdline]


def run(vmm: str, kind: str) -> dict:
    hport = free_udp_port()
    p = Timed(argv_for(vmm, kind, hport))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    try:
        p.wait_line(b"net: bench waiting", 120)
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

        # Knock until the guest has its peer (the forward may need a moment to be ready).
        deadline = time.monotonic() + 30
        while not any(b"net: start" in line for _, line in p.marks):
            sock.sendto(b"tenbox-bench go", ("127.0.0.1", hport))
            try:
                p.wait_line(b"net: start", 0.2)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                p = _revive(p)
        t_start = p.wait_line(b"net: start", 1)
        counter = threading.Thread(target=count, daemon=True)
        if kind == "udp-tx":
            counter.start()
        else:
            payload = b"r" * SIZE
            for _ in range(COUNT):
                sock.sendto(payload, ("127.0.0.1", hport))
        t_done = p.wait_line(b"net: done", 120)
        stop.set()
        if counter.is_alive():
            counter.join(2)
        done_line = [line for _, line in p.marks if b"net: done" in line][-1].decode()
        guest_packets = int(done_line.split("packets=")[1].split()[0])
        p.kill()
    finally:
        sock.close()
    packets = received[0] if kind == "udp-tx" else guest_packets
    secs = t_done - t_start
    return {"pps": packets / secs, "mbit": packets * SIZE * 8 / secs / 1e6, "delivered": packets / COUNT}


def _revive(p):
    if p.proc.poll() is not None:
        raise RuntimeError("the VMM exited before the benchmark started")
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
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
