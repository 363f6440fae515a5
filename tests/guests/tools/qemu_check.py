#!/usr/bin/env python3
"""Boot every test guest under QEMU microvm and check its result lines (developer tool, not root).

    tools/qemu_check.py [--accel kvm|tcg] [--out DIR] [--verbose] [GUEST...]

QEMU is the reference VMM for the guests: each must report PASS here before
tenbox is judged by it. Prints the exact command line, the wall time from
process start to exit and the verdict for each guest; exit status 0 only if
all passed. The interactive guests are driven as a user would: echo over a
pipe on stdin, idle through stdin and `system_powerdown` on a monitor socket.

The virtio guests run against QEMU's own virtio-mmio version 2 devices
(`-global virtio-mmio.force-legacy=false`): blk against virtio-blk-device on
a raw image whose CRC-32s (zlib) are compared with the guest's, before and
after its writes; net against virtio-net-device with `-netdev user` (slirp):
DHCP, ping of the gateway, UDP and TCP to sockets on the host's loopback
through 10.0.2.2, TCP through a guestfwd, and the guest's UDP and TCP echo
services through hostfwd, link changes by `set_link`. The *-bench checks
print the time between the guest's start and done lines as seen here.
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
    times: List[float] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def reader(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self.times.append(time.monotonic())
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


def verdict(name: str, run: Run, elapsed: float, extra_ok: Callable[[List[str]], str] = lambda l: "",
            guest: Optional[str] = None) -> Result:
    lines = run.lines
    why = ""
    if not any(l == "TENBOX-GUEST %s PASS" % (guest or name) for l in lines):
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

# ---- virtio-blk ----------------------------------------------------------------

VIRTIO_MODERN = ["-global", "virtio-mmio.force-legacy=false"]
SECTOR = 512
BLK_SERIAL = "TENBOX-BLK-0001"
BLK_IMAGE_MIB = 8
BLK_BENCH_IMAGE_MIB = 256
BLK_BENCH_MIB = 256
BLK_BENCH_OPS = 20000


def make_image(path: str, mib: int, seed: int = 1) -> bytes:
    """A raw disk image of deterministic pseudo-random bytes; returns them."""
    import random

    size = mib << 20
    data = random.Random(seed).getrandbits(size * 8).to_bytes(size, "little")
    with open(path, "wb") as f:
        f.write(data)
    return data


def blk_device(path: str, drive_opts: str = "") -> List[str]:
    return VIRTIO_MODERN + ["-device", "virtio-blk-device,drive=d0,serial=%s" % BLK_SERIAL,
                            "-drive", "file=%s,if=none,format=raw,id=d0%s" % (path, drive_opts)]


def crc_lines(lines: List[str]) -> List[tuple]:
    """(lba, count, crc) from every "info - blk.crc32.<lba>.<count>=<hex>" line, in order."""
    found = []
    for l in lines:
        if l.startswith("info - blk.crc32."):
            key, _, value = l[len("info - blk.crc32."):].partition("=")
            lba, _, count = key.partition(".")
            found.append((int(lba), int(count), int(value, 16)))
    return found


def sectors(data: bytes, lba: int, count: int) -> bytes:
    return data[lba * SECTOR:(lba + count) * SECTOR]


def check_blk_basic(name: str, accel: str, out: str, tmp: str, append: str, drive_opts: str = "",
                    reads: Optional[List[tuple]] = None, writes: Optional[List[tuple]] = None,
                    expect: Optional[List[str]] = None) -> Result:
    """Guest CRCs of read ranges against the original image, of written ranges and the
    whole image after the run against the written bytes (writes: (lba, count, byte))."""
    path = os.path.join(tmp, name + ".img")
    orig = make_image(path, BLK_IMAGE_MIB)
    run = start(qemu_argv(accel, os.path.join(out, "blk.bzImage"), append, "microvm,acpi=on,rtc=on",
                          blk_device(path, drive_opts)))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)
    with open(path, "rb") as f:
        final = f.read()

    def judge(lines: List[str]) -> str:
        want = ["info - blk.capacity=%d" % (len(orig) // SECTOR), "info - blk.serial=" + BLK_SERIAL] + (expect or [])
        missing = [w for w in want if w not in lines]
        if missing:
            return "missing %r" % missing
        got = crc_lines(lines)
        read_keys = {(l, c) for l, c in reads or []}
        for lba, count, crc in got:
            image = orig if (lba, count) in read_keys else final
            if zlib.crc32(sectors(image, lba, count)) != crc:
                return "guest crc32 of %d:%d is %08x, the image's %08x" % (
                    lba, count, crc, zlib.crc32(sectors(image, lba, count)))
        missing_reads = read_keys - {(l, c) for l, c, _ in got}
        if missing_reads:
            return "no crc32 line for %r" % sorted(missing_reads)
        expected = bytearray(orig)
        for lba, count, byte in writes or []:
            expected[lba * SECTOR:(lba + count) * SECTOR] = bytes([byte]) * (count * SECTOR)
        if final != bytes(expected):
            first = next(i for i in range(len(final)) if final[i] != expected[i])
            return "the image differs from what the guest wrote at sector %d" % (first // SECTOR)
        return ""

    return verdict(name, run, elapsed, judge, guest="blk")


def check_blk_hostile(name: str, accel: str, out: str, tmp: str, mode: str) -> Result:
    path = os.path.join(tmp, name + ".img")
    make_image(path, BLK_IMAGE_MIB)
    run = start(qemu_argv(accel, os.path.join(out, "blk.bzImage"), "blk.hostile=" + mode, "microvm,acpi=on,rtc=on",
                          blk_device(path)))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)

    def judge(lines: List[str]) -> str:
        outcome = [l for l in lines if l.startswith("info - blk.hostile.outcome=")]
        if "ok - the device works again after a reset" not in lines:
            return "the device did not recover after a reset"
        return "" if outcome else "no outcome line"

    r = verdict(name, run, elapsed, judge, guest="blk")
    if r.ok:
        r.why = "PASS: " + "; ".join(l[len("info - "):] for l in r.lines if l.startswith("info - blk.hostile."))
    return r


def line_time(run: Run, prefix: str) -> Optional[float]:
    for l, t in zip(run.lines, run.times):
        if l.startswith(prefix):
            return t
    return None


def bench_span(run: Run, guest: str) -> Optional[float]:
    t0, t1 = line_time(run, guest + ": start"), line_time(run, guest + ": done")
    return t1 - t0 if t0 is not None and t1 is not None else None


def done_fields(lines: List[str], prefix: str) -> dict:
    for l in lines:
        if l.startswith(prefix):
            return dict(kv.split("=", 1) for kv in l[len(prefix):].split() if "=" in kv)
    return {}


def check_blk_bench(name: str, accel: str, out: str, tmp: str, kind: str) -> Result:
    path = os.path.join(tmp, "bench.img")
    if not os.path.exists(path):
        chunk = bytes((i * 131 + 7) & 0xFF for i in range(1 << 20))
        with open(path, "wb") as f:
            for _ in range(BLK_BENCH_IMAGE_MIB):
                f.write(chunk)
    size = "blk.bench.ops=%d" % BLK_BENCH_OPS if kind == "randread" else "blk.bench.mb=%d" % BLK_BENCH_MIB
    run = start(qemu_argv(accel, os.path.join(out, "blk.bzImage"), "blk.bench=%s %s" % (kind, size),
                          "microvm,acpi=on,rtc=on", blk_device(path)))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)
    r = verdict(name, run, elapsed, guest="blk")
    span = bench_span(run, "blk")
    f = done_fields(r.lines, "blk: done ")
    if r.ok and span and f:
        mib, ops = int(f["bytes"]) / (1 << 20), int(f["ops"])
        r.why = "PASS: %d ops, %.0f MiB in %.3f s: %.0f MiB/s, %.0f ops/s (host time between blk: start and done)" % (
            ops, mib, span, mib / span, ops / span)
    return r


# ---- virtio-net ----------------------------------------------------------------

TCP_PAYLOAD = bytes((i * 7 + 1) & 0xFF for i in range(100000))
NET_DEVICE = VIRTIO_MODERN + ["-device", "virtio-net-device,netdev=n0"]


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_echo_server() -> tuple:
    """A UDP socket on the host's loopback that echoes every datagram; (port, received list)."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    got: List[bytes] = []

    def serve() -> None:
        while True:
            data, addr = u.recvfrom(65536)
            got.append(data)
            u.sendto(data, addr)

    threading.Thread(target=serve, daemon=True).start()
    return u.getsockname()[1], got


def tcp_line_server() -> tuple:
    """A TCP server on the host's loopback: reads a line, answers "hello <line>" and the
    payload, closes. (port, lines received)"""
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("127.0.0.1", 0))
    t.listen(4)
    got: List[bytes] = []

    def serve() -> None:
        while True:
            c, _ = t.accept()
            with c:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    line += chunk
                got.append(line)
                c.sendall(b"hello " + line + TCP_PAYLOAD)

    threading.Thread(target=serve, daemon=True).start()
    return t.getsockname()[1], got


def tcp_get_ok(lines: List[str], answer: bytes) -> str:
    want = ["info - net.tcp.bytes=%d" % len(answer), "info - net.tcp.crc32=%08x" % zlib.crc32(answer)]
    missing = [w for w in want if w not in lines]
    return "missing %r" % missing if missing else ""


def check_net(name: str, accel: str, out: str) -> Result:
    uport, ugot = udp_echo_server()
    tport, tgot = tcp_line_server()
    text = "hello-from-the-guest"
    append = ("net.test=dhcp,ping,udp,tcp net.udp.send=10.0.2.2:%d:%s expect.udp_reply=1 net.tcp.get=10.0.2.2:%d"
              % (uport, text, tport))
    run = start(qemu_argv(accel, os.path.join(out, "net.bzImage"), append, "microvm,acpi=on,rtc=on",
                          NET_DEVICE + ["-netdev", "user,id=n0"]))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)

    def judge(lines: List[str]) -> str:
        want = ["info - net.ip=10.0.2.15 gw=10.0.2.2 dns=10.0.2.3", "ok - ping 10.0.2.2",
                "info - net.udp.reply=" + text, "info - net.tcp.line=hello tenbox-guest"]
        missing = [w for w in want if w not in lines]
        if missing:
            return "missing %r" % missing
        if text.encode() not in ugot:
            return "the host's UDP socket did not get the datagram"
        if tgot != [b"tenbox-guest\n"]:
            return "the host's TCP server got %r" % tgot
        return tcp_get_ok(lines, b"hello tenbox-guest\n" + TCP_PAYLOAD)

    return verdict(name, run, elapsed, judge, guest="net")


GUESTFWD_SERVER = """import sys
line = sys.stdin.buffer.readline()
sys.stdout.buffer.write(b"guestfwd " + line + bytes((i * 7 + 1) & 0xFF for i in range(100000)))
sys.stdout.buffer.flush()
"""


def check_net_guestfwd(name: str, accel: str, out: str, tmp: str) -> Result:
    """The guest's TCP client through a guestfwd to a command (a connection per run of it)."""
    script = os.path.join(tmp, "guestfwd_server.py")
    with open(script, "w") as f:
        f.write(GUESTFWD_SERVER)
    netdev = "user,id=n0,guestfwd=tcp:10.0.2.100:80-cmd:%s %s" % (sys.executable, script)
    run = start(qemu_argv(accel, os.path.join(out, "net.bzImage"), "net.test=dhcp,tcp net.tcp.get=10.0.2.100:80",
                          "microvm,acpi=on,rtc=on", NET_DEVICE + ["-netdev", netdev]))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)
    return verdict(name, run, elapsed,
                   lambda lines: tcp_get_ok(lines, b"guestfwd tenbox-guest\n" + TCP_PAYLOAD), guest="net")


def check_net_stay(name: str, accel: str, out: str, tmp: str) -> Result:
    """The guest's UDP and TCP echo services through hostfwd, link changes, the power button."""
    hu, ht = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    sock = os.path.join(tmp, name + ".sock")
    netdev = "user,id=n0,hostfwd=udp:127.0.0.1:%d-:7,hostfwd=tcp:127.0.0.1:%d-:7" % (hu, ht)
    run = start(qemu_argv(accel, os.path.join(out, "net.bzImage"),
                          "net.test=dhcp net.udp.echo=7 net.tcp.listen=7 net.stay=1", "microvm,acpi=on,rtc=on",
                          NET_DEVICE + ["-netdev", netdev], monitor="unix:%s,server=on,wait=off" % sock))
    problems: List[str] = []
    if run.wait_line("net: ready"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"udp-through-hostfwd", ("127.0.0.1", hu))
            try:
                if u.recvfrom(2048)[0] != b"udp-through-hostfwd":
                    problems.append("wrong UDP echo")
            except socket.timeout:
                problems.append("no UDP echo")
        data = bytes((i * 13) & 0xFF for i in range(30000))
        try:
            with socket.create_connection(("127.0.0.1", ht), timeout=10) as c:
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
                back = b""
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    back += chunk
            if back != data:
                problems.append("TCP echo returned %d of %d bytes" % (len(back), len(data)))
        except OSError as e:
            problems.append("TCP echo: %s" % e)
        if not run.wait_line("net: tcp closed"):
            problems.append("no tcp closed line")
        send_monitor(sock, "set_link n0 off")
        if not run.wait_line("info - net.link=down", 10):
            problems.append("no link down line")
        send_monitor(sock, "set_link n0 on")
        ups = lambda: sum(1 for l in run.lines if l == "info - net.link=up")
        deadline = time.monotonic() + 10
        while ups() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        if ups() < 2:
            problems.append("no link up line after set_link on")
        send_monitor(sock, "system_powerdown")
    elapsed = finish(run, GUEST_TIMEOUT_SEC)

    def judge(lines: List[str]) -> str:
        if problems:
            return "; ".join(problems)
        return "" if "net: power button" in lines else "no power button line"

    return verdict(name, run, elapsed, judge, guest="net")


def check_net_quit(name: str, accel: str, out: str) -> Result:
    run = start(qemu_argv(accel, os.path.join(out, "net.bzImage"), "net.test=none net.stay=1",
                          "microvm,acpi=on,rtc=on", NET_DEVICE + ["-netdev", "user,id=n0"]))
    if run.wait_line("net: ready"):
        run.send(b"quit\n")
    elapsed = finish(run, GUEST_TIMEOUT_SEC)
    return verdict(name, run, elapsed, lambda lines: "" if "echo: quit" in lines else "no echo of quit", guest="net")


NET_BENCH_COUNT = 20000
NET_BENCH_SIZE = 1024


def check_net_bench(name: str, accel: str, out: str, kind: str) -> Result:
    """udp-tx: the guest sends to a host socket at 10.0.2.2; udp-rx: the host answers the
    guest's request with the datagrams."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    u.bind(("127.0.0.1", 0))
    port = u.getsockname()[1]
    stats = {"packets": 0, "bytes": 0}

    def serve() -> None:
        while True:
            try:
                data, addr = u.recvfrom(65536)
            except OSError:
                return
            if kind == "udp-rx" and data.startswith(b"tenbox-bench udp-rx"):
                f = dict(kv.split(b"=") for kv in data.split()[2:])
                count, size = int(f[b"count"]), int(f[b"size"])
                payload = bytes(size)
                for i in range(count):
                    u.sendto(payload, addr)
                    if i % 32 == 31:
                        time.sleep(0.0003)  # let slirp's socket buffer (QEMU's main loop) keep up
            else:
                stats["packets"] += 1
                stats["bytes"] += len(data)

    threading.Thread(target=serve, daemon=True).start()
    append = "net.test=dhcp net.bench=%s net.bench.port=%d net.bench.count=%d net.bench.size=%d" % (
        kind, port, NET_BENCH_COUNT, NET_BENCH_SIZE)
    run = start(qemu_argv(accel, os.path.join(out, "net.bzImage"), append, "microvm,acpi=on,rtc=on",
                          NET_DEVICE + ["-netdev", "user,id=n0"]))
    run.proc.stdin.close()  # type: ignore[union-attr]
    elapsed = finish(run, GUEST_TIMEOUT_SEC)
    time.sleep(0.2)
    u.close()
    r = verdict(name, run, elapsed, guest="net")
    span = bench_span(run, "net")
    f = done_fields(r.lines, "net: done ")
    if r.ok and span and f:
        packets = int(f["packets"])
        seen = "the host received %d" % stats["packets"] if kind == "udp-tx" else "the host sent %d" % NET_BENCH_COUNT
        if kind == "udp-rx" and packets < NET_BENCH_COUNT:
            seen += "; lost ones cost the guest's %d ms idle wait" % 300
        r.why = "PASS: %d datagrams of %d bytes in %.3f s: %.0f packets/s, %.1f MiB/s (%s)" % (
            packets, NET_BENCH_SIZE, span, packets / span, int(f["bytes"]) / span / (1 << 20), seen)
    return r


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
            "blk": lambda: check_blk_basic(
                "blk", a, out, tmp,
                "blk.read=0:16,100:300,16000:384 blk.write=1000:16:c3 blk.zero=2000:8 blk.discard=3000:8 "
                "expect.discard_zeroes=1 blk.segments=3",
                ",discard=unmap", reads=[(0, 16), (100, 300), (16000, 384)],
                writes=[(1000, 16, 0xC3), (2000, 8, 0), (3000, 8, 0)],
                expect=["ok - every completion arrived with its interrupt", "ok - flush"]),
            "blk-poll": lambda: check_blk_basic(
                "blk-poll", a, out, tmp,
                "virtio.irq=0 virtio.indirect=0 virtio.event_idx=0 blk.segments=7 blk.read=0:64 blk.write=64:32:5a",
                reads=[(0, 64)], writes=[(64, 32, 0x5A)], expect=["info - blk.completion=polling"]),
            "blk-ro": lambda: check_blk_basic(
                "blk-ro", a, out, tmp, "expect.ro=1 blk.write=5:1:aa", ",readonly=on", reads=[(0, 16)],
                expect=["ok - write refused on a read-only disk"]),
            "blk-hostile-loop": lambda: check_blk_hostile("blk-hostile-loop", a, out, tmp, "loop"),
            "blk-hostile-oob": lambda: check_blk_hostile("blk-hostile-oob", a, out, tmp, "oob"),
            "blk-hostile-huge": lambda: check_blk_hostile("blk-hostile-huge", a, out, tmp, "huge"),
            "blk-hostile-move": lambda: check_blk_hostile("blk-hostile-move", a, out, tmp, "move"),
            "blk-bench-seqread": lambda: check_blk_bench("blk-bench-seqread", a, out, tmp, "seqread"),
            "blk-bench-seqwrite": lambda: check_blk_bench("blk-bench-seqwrite", a, out, tmp, "seqwrite"),
            "blk-bench-randread": lambda: check_blk_bench("blk-bench-randread", a, out, tmp, "randread"),
            "net": lambda: check_net("net", a, out),
            "net-guestfwd": lambda: check_net_guestfwd("net-guestfwd", a, out, tmp),
            "net-stay": lambda: check_net_stay("net-stay", a, out, tmp),
            "net-quit": lambda: check_net_quit("net-quit", a, out),
            "net-bench-udp-tx": lambda: check_net_bench("net-bench-udp-tx", a, out, "udp-tx"),
            "net-bench-udp-rx": lambda: check_net_bench("net-bench-udp-rx", a, out, "udp-rx"),
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
            width = max(8, max(len(n) for n in names))
            pad = " " * (width + 1)
            print("%-*s %-4s %6.2f s  %s" % (width, name, "ok" if r.ok else "FAIL", r.elapsed, r.why))
            print(pad + "$ " + " ".join(shlex.quote(x) for x in r.argv))
            if args.verbose or not r.ok:
                for line in r.lines:
                    print(pad + "| " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
