"""Frames for the user-mode network tests, and a guest's end of the wire (tests only).

The first half is pure: builders and parsers for Ethernet, ARP, IPv4, IPv6,
UDP, TCP, ICMP, ICMPv6, DHCP and DNS, with checksums, enough to play a
guest by hand. The second half is `GuestLink` (a SlirpNetwork driven by a
small poll loop, every wait bounded by a deadline) and `GuestTcp` (a TCP
endpoint simple enough to read: in order, no loss recovery; libslirp on
loopback does not lose segments).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from tenbox_vmm.net.icmp import internet_checksum

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
ETH_IPV6 = 0x86DD
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

GUEST_MAC = bytes.fromhex("525400123456")
BROADCAST_MAC = b"\xff" * 6
GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
DNS_IP = "10.0.2.3"
MSS_OPTION = b"\x02\x04\x05\xb4"  # MSS 1460

DEFAULT_WAIT_SEC = 5.0
POLL_SLICE_MS = 20


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


checksum = internet_checksum


# -- builders ------------------------------------------------------------------


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, op) + sha + ip4(spa) + tha + ip4(tpa)


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 1) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                         ip4(src), ip4(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def _pseudo4(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, length)


def _udp_segment(pseudo: Callable[[int], bytes], sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP header and payload with its checksum; pseudo(length) is the IP pseudo-header."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = checksum(pseudo(len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def _tcp_segment(pseudo: Callable[[int], bytes], sport: int, dport: int, seq: int, ack: int, flags: int,
                 payload: bytes, window: int, options: bytes) -> bytes:
    offset = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, offset << 4, flags,
                      window, 0, 0) + options + payload
    c = checksum(pseudo(len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    seg = _udp_segment(lambda n: _pseudo4(src, dst, PROTO_UDP, n), sport, dport, payload)
    return ipv4(src, dst, PROTO_UDP, seg)


def tcp4(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
         payload: bytes = b"", window: int = 65535, options: bytes = b"") -> bytes:
    seg = _tcp_segment(lambda n: _pseudo4(src, dst, PROTO_TCP, n), sport, dport, seq, ack, flags, payload, window,
                       options)
    return ipv4(src, dst, PROTO_TCP, seg)


def icmp4_echo(src: str, dst: str, ident: int, seq: int, data: bytes) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    return ipv4(src, dst, PROTO_ICMP, msg)


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 255) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit) + ip6(src) + ip6(dst) + payload


def _pseudo6(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip6(src) + ip6(dst) + struct.pack("!IxxxB", length, proto)


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    seg = _udp_segment(lambda n: _pseudo6(src, dst, PROTO_UDP, n), sport, dport, payload)
    return ipv6(src, dst, PROTO_UDP, seg, hop_limit=64)


def tcp6(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
         payload: bytes = b"", window: int = 65535, options: bytes = b"") -> bytes:
    seg = _tcp_segment(lambda n: _pseudo6(src, dst, PROTO_TCP, n), sport, dport, seq, ack, flags, payload, window,
                       options)
    return ipv6(src, dst, PROTO_TCP, seg, hop_limit=64)


def icmp6(src: str, dst: str, type_: int, code: int, body: bytes) -> bytes:
    msg = struct.pack("!BBH", type_, code, 0) + body
    pseudo = _pseudo6(src, dst, PROTO_ICMPV6, len(msg))
    msg = msg[:2] + struct.pack("!H", checksum(pseudo + msg)) + msg[4:]
    return ipv6(src, dst, PROTO_ICMPV6, msg)


def link_local(mac: bytes) -> str:
    eui = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCP_DISCOVER, DHCP_OFFER, DHCP_REQUEST, DHCP_ACK = 1, 2, 3, 5


def dhcp(msg_type: int, mac: bytes, xid: int, options: bytes = b"") -> bytes:
    """A BOOTREQUEST with the DHCP message type and extra raw options."""
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4),
                        bytes(4), bytes(4), mac + bytes(10), b"", b"")
    opts = bytes([53, 1, msg_type]) + options + bytes([55, 3, 1, 3, 6]) + b"\xff"
    return fixed + DHCP_MAGIC + opts


def dhcp_frame(payload: bytes, mac: bytes = GUEST_MAC) -> bytes:
    return eth(BROADCAST_MAC, mac, ETH_IPV4, udp4("0.0.0.0", "255.255.255.255", 68, 67, payload))


def dns_query(qid: int, name: str, qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


# -- parsers -------------------------------------------------------------------


@dataclass
class Arp:
    op: int
    sha: bytes
    spa: str
    tha: bytes
    tpa: str


@dataclass
class Ip:
    version: int
    src: str
    dst: str
    proto: int
    payload: bytes
    checksum_ok: bool = True


@dataclass
class Udp:
    sport: int
    dport: int
    payload: bytes
    checksum_ok: bool


@dataclass
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    checksum_ok: bool

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


@dataclass
class Icmp:
    type: int
    code: int
    body: bytes
    checksum_ok: bool


@dataclass
class Frame:
    dst: bytes
    src: bytes
    ethertype: int
    raw: bytes
    arp: Optional[Arp] = None
    ip: Optional[Ip] = None
    udp: Optional[Udp] = None
    tcp: Optional[Tcp] = None
    icmp: Optional[Icmp] = None

    def checksums_ok(self) -> bool:
        parts = [self.ip, self.udp, self.tcp, self.icmp]
        return all(p.checksum_ok for p in parts if p is not None)

    def describe(self) -> str:
        if self.arp:
            return "ARP op=%d %s->%s" % (self.arp.op, self.arp.spa, self.arp.tpa)
        if self.ip is None:
            return "ethertype 0x%04x" % self.ethertype
        what = "proto %d" % self.ip.proto
        if self.tcp:
            what = "TCP %d->%d flags=0x%02x len=%d" % (self.tcp.sport, self.tcp.dport, self.tcp.flags,
                                                       len(self.tcp.payload))
        elif self.udp:
            what = "UDP %d->%d len=%d" % (self.udp.sport, self.udp.dport, len(self.udp.payload))
        elif self.icmp:
            what = "ICMP type=%d code=%d" % (self.icmp.type, self.icmp.code)
        return "IPv%d %s->%s %s" % (self.ip.version, self.ip.src, self.ip.dst, what)


def parse(raw: bytes) -> Frame:
    f = Frame(raw[0:6], raw[6:12], struct.unpack("!H", raw[12:14])[0], raw)
    body = raw[14:]
    if f.ethertype == ETH_ARP:
        op = struct.unpack("!H", body[6:8])[0]
        f.arp = Arp(op, body[8:14], str(ipaddress.IPv4Address(body[14:18])), body[18:24],
                    str(ipaddress.IPv4Address(body[24:28])))
    elif f.ethertype == ETH_IPV4:
        ihl = (body[0] & 15) * 4
        total = struct.unpack("!H", body[2:4])[0]
        src, dst = body[12:16], body[16:20]
        f.ip = Ip(4, str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), body[9],
                  body[ihl:total], checksum(body[:ihl]) == 0)
        pseudo = src + dst + struct.pack("!BBH", 0, body[9], total - ihl)
        _parse_l4(f, pseudo)
    elif f.ethertype == ETH_IPV6:
        length, nh = struct.unpack("!HB", body[4:7])
        src, dst = body[8:24], body[24:40]
        f.ip = Ip(6, str(ipaddress.IPv6Address(src)), str(ipaddress.IPv6Address(dst)), nh, body[40:40 + length])
        pseudo = src + dst + struct.pack("!IxxxB", length, nh)
        _parse_l4(f, pseudo)
    return f


def _parse_l4(f: Frame, pseudo: bytes) -> None:
    ip = f.ip
    assert ip is not None
    p = ip.payload
    if ip.proto == PROTO_UDP:
        sport, dport, _, csum = struct.unpack("!HHHH", p[:8])
        ok = csum == 0 and ip.version == 4 or checksum(pseudo + p) == 0
        f.udp = Udp(sport, dport, p[8:], ok)
    elif ip.proto == PROTO_TCP:
        sport, dport, seq, ack, off, flags, window = struct.unpack("!HHIIBBH", p[:16])
        f.tcp = Tcp(sport, dport, seq, ack, flags, window, p[(off >> 4) * 4:], checksum(pseudo + p) == 0)
    elif ip.proto == PROTO_ICMP:
        f.icmp = Icmp(p[0], p[1], p[4:], checksum(p) == 0)
    elif ip.proto == PROTO_ICMPV6:
        f.icmp = Icmp(p[0], p[1], p[4:], checksum(pseudo + p) == 0)


def dhcp_options(payload: bytes) -> dict:
    """DHCP options of a BOOTP message: {code: bytes}; 'yiaddr' is added."""
    opts = {"yiaddr": str(ipaddress.IPv4Address(payload[16:20]))}
    assert payload[236:240] == DHCP_MAGIC
    i = 240
    while i < len(payload) and payload[i] != 255:
        if payload[i] == 0:
            i += 1
            continue
        code, n = payload[i], payload[i + 1]
        opts[code] = payload[i + 2:i + 2 + n]
        i += 2 + n
    return opts


def dns_answers(payload: bytes) -> Tuple[int, List[str]]:
    """(id, IPv4 addresses of the A records) of a DNS response."""
    qid, _, qd, an = struct.unpack("!HHHH", payload[:8])
    i = 12
    for _ in range(qd):
        while payload[i]:
            i += payload[i] + 1
        i += 5
    out = []
    for _ in range(an):
        if payload[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while payload[i]:
                i += payload[i] + 1
            i += 1
        rtype, _, _, rdlen = struct.unpack("!HHIH", payload[i:i + 10])
        i += 10
        if rtype == 1:
            out.append(str(ipaddress.IPv4Address(payload[i:i + 4])))
        i += rdlen
    return qid, out


# -- a guest's end of the wire -------------------------------------------------


class GuestLink:
    """A SlirpNetwork and the guest side of its wire, driven by a poll loop.

    Frames libslirp sends are parsed into `rx`. ARP requests for the guest's
    address are answered at once (as a guest kernel would), so libslirp can
    always resolve it. Every frame received must carry correct checksums.
    """

    def __init__(self, config=None, mac: bytes = GUEST_MAC, ip: str = GUEST_IP, **kw) -> None:
        from tenbox_vmm.net import NetConfig, SlirpNetwork

        self.mac = mac
        self.ip = ip
        self.ip6 = {link_local(mac)}  # and SLAAC addresses the test adds
        self.rx: List[Frame] = []
        self.bad: List[Frame] = []
        self._outbox: List[bytes] = []
        self.net = SlirpNetwork(config or NetConfig(), self._on_frame, **kw)
        self.gateway_mac: Optional[bytes] = None

    def _on_frame(self, raw: bytes) -> None:
        assert isinstance(raw, bytes)
        f = parse(raw)
        if not f.checksums_ok():
            self.bad.append(f)
        # Neighbour resolution is answered as a guest kernel would. We are
        # called from inside libslirp: the answer goes in after it returns.
        if f.arp and f.arp.op == 1 and f.arp.tpa == self.ip:
            self._outbox.append(eth(f.arp.sha, self.mac, ETH_ARP, arp(2, self.mac, self.ip, f.arp.sha, f.arp.spa)))
            return
        if f.icmp and f.ip.version == 6 and f.icmp.type == 135:
            target = str(ipaddress.IPv6Address(f.icmp.body[4:20]))
            if target in self.ip6:
                body = struct.pack("!I", 0x60000000) + ip6(target) + bytes([2, 1]) + self.mac
                self._outbox.append(eth(f.src, self.mac, ETH_IPV6, icmp6(target, f.ip.src, 136, 0, body)))
                return
        self.rx.append(f)

    def _flush(self) -> None:
        while self._outbox:
            self.net.input(self._outbox.pop(0))

    def send(self, frame: bytes) -> None:
        self.net.input(frame)
        self._flush()

    def send_ip(self, packet: bytes, dst_mac: Optional[bytes] = None) -> None:
        ethertype = ETH_IPV6 if packet[0] >> 4 == 6 else ETH_IPV4
        self.send(eth(dst_mac or self.gateway_mac or BROADCAST_MAC, self.mac, ethertype, packet))

    def pump(self, max_wait_ms: int = POLL_SLICE_MS) -> None:
        """One turn of the I/O loop: prepare, poll (bounded), done."""
        fds, timeout = self.net.poll_prepare()
        p = select.poll()
        for fd, events in fds:
            p.register(fd, events)
        wait = max_wait_ms if timeout < 0 else min(timeout, max_wait_ms)
        self.net.poll_done(dict(p.poll(wait)))
        self._flush()

    def take(self, match: Callable[[Frame], bool]) -> Optional[Frame]:
        for i, f in enumerate(self.rx):
            if match(f):
                return self.rx.pop(i)
        return None

    def wait_for(self, match: Callable[[Frame], bool], what: str, timeout: float = DEFAULT_WAIT_SEC) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            f = self.take(match)
            if f is not None:
                return f
            if time.monotonic() >= deadline:
                seen = "; ".join(x.describe() for x in self.rx[-8:]) or "nothing"
                raise AssertionError("no %s within %.1f s (last frames: %s)" % (what, timeout, seen))
            self.pump()

    def run_until(self, cond: Callable[[], bool], what: str, timeout: float = DEFAULT_WAIT_SEC) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() >= deadline:
                raise AssertionError("%s did not happen within %.1f s" % (what, timeout))
            self.pump()

    def resolve_gateway(self) -> bytes:
        """ARP for the gateway (which also teaches libslirp our MAC)."""
        self.send(eth(BROADCAST_MAC, self.mac, ETH_ARP, arp(1, self.mac, self.ip, bytes(6), GATEWAY_IP)))
        f = self.wait_for(lambda f: f.arp is not None and f.arp.op == 2 and f.arp.spa == GATEWAY_IP,
                          "ARP reply for %s" % GATEWAY_IP)
        self.gateway_mac = f.arp.sha
        return self.gateway_mac

    def close(self) -> None:
        self.net.close()
        assert not self.bad, "frames with bad checksums: %s" % [f.describe() for f in self.bad]


@dataclass
class GuestTcp:
    """The guest's end of one TCP connection."""

    link: GuestLink
    local_port: int
    remote_ip: str
    remote_port: int
    snd_nxt: int = 1000
    rcv_nxt: int = 0
    received: bytearray = field(default_factory=bytearray)
    fin_received: bool = False
    rst_received: bool = False
    peer_acked: int = 0
    peer_window: int = 0

    def _send(self, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        self.link.send_ip(tcp4(self.link.ip, self.remote_ip, self.local_port, self.remote_port,
                               self.snd_nxt, self.rcv_nxt, flags, payload, options=options))

    def mine(self, f: Frame) -> bool:
        return (f.tcp is not None and f.ip.src == self.remote_ip and f.ip.dst == self.link.ip
                and f.tcp.sport == self.remote_port and f.tcp.dport == self.local_port)

    def connect(self, timeout: float = DEFAULT_WAIT_SEC) -> Frame:
        """Send SYN; the answer (SYN-ACK, RST or ICMP error) is returned; on SYN-ACK, ACK it."""
        self._send(TCP_SYN, options=MSS_OPTION)
        f = self.link.wait_for(lambda f: self.mine(f) or self._icmp_error_for_me(f),
                               "answer to SYN for %s:%d" % (self.remote_ip, self.remote_port), timeout)
        if f.tcp is not None and f.tcp.has(TCP_SYN | TCP_ACK):
            self.snd_nxt += 1
            self.rcv_nxt = f.tcp.seq + 1
            self.peer_acked = f.tcp.ack
            self.peer_window = f.tcp.window
            self._send(TCP_ACK)
        return f

    def _icmp_error_for_me(self, f: Frame) -> bool:
        return (f.icmp is not None and f.ip.version == 4 and f.icmp.type == 3
                and f.icmp.body[4 + 16:4 + 20] == ip4(self.remote_ip))

    @classmethod
    def accept(cls, link: GuestLink, syn: Frame) -> "GuestTcp":
        """Answer a SYN libslirp sent (a hostfwd connection) and wait for its ACK."""
        conn = cls(link, syn.tcp.dport, syn.ip.src, syn.tcp.sport, snd_nxt=5000, rcv_nxt=syn.tcp.seq + 1)
        conn._send(TCP_SYN | TCP_ACK, options=MSS_OPTION)
        conn.snd_nxt += 1
        ack = link.wait_for(lambda f: conn.mine(f) and f.tcp.has(TCP_ACK) and f.tcp.ack == conn.snd_nxt,
                            "ACK of our SYN-ACK")
        conn.peer_acked = conn.snd_nxt
        conn.peer_window = ack.tcp.window
        return conn

    def handle(self, f: Frame) -> None:
        t = f.tcp
        if t.has(TCP_RST):
            self.rst_received = True
            return
        if t.has(TCP_ACK):
            self.peer_acked = max(self.peer_acked, t.ack)
            self.peer_window = t.window
        if t.payload or t.has(TCP_FIN):
            if t.seq == self.rcv_nxt:
                self.received += t.payload
                self.rcv_nxt += len(t.payload)
                if t.has(TCP_FIN):
                    self.rcv_nxt += 1
                    self.fin_received = True
            self._send(TCP_ACK)  # in order or a duplicate: (re)acknowledge

    def pump_until(self, cond: Callable[[], bool], what: str, timeout: float = DEFAULT_WAIT_SEC) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            f = self.link.take(self.mine)
            if f is not None:
                self.handle(f)
                continue
            if time.monotonic() >= deadline:
                raise AssertionError("%s did not happen within %.1f s" % (what, timeout))
            self.link.pump()

    def send(self, data: bytes, mss: int = 1400, timeout: float = DEFAULT_WAIT_SEC) -> None:
        """Send `data` within the peer's window and wait until all of it is acknowledged."""

        def room() -> int:
            return min(self.peer_window, 32 * 1024) - (self.snd_nxt - self.peer_acked)

        i = 0
        while i < len(data):
            if room() <= 0:
                self.pump_until(lambda: room() > 0, "the peer's window to open", timeout)
            chunk = data[i:i + min(mss, room())]
            self._send(TCP_PSH | TCP_ACK, chunk)
            self.snd_nxt += len(chunk)
            i += len(chunk)
        self.pump_until(lambda: self.peer_acked >= self.snd_nxt, "ACK of %d bytes sent" % len(data), timeout)

    def recv_exactly(self, n: int, timeout: float = DEFAULT_WAIT_SEC) -> bytes:
        self.pump_until(lambda: len(self.received) >= n, "receiving %d bytes" % n, timeout)
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    def close(self) -> None:
        self._send(TCP_FIN | TCP_ACK)
        self.snd_nxt += 1


# -- host-side sockets, driven while the guest's loop runs ----------------------


def host_listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(8)
    s.setblocking(False)
    return s


def host_accept(link: GuestLink, listener: socket.socket, timeout: float = DEFAULT_WAIT_SEC) -> socket.socket:
    got: List[socket.socket] = []

    def accepted() -> bool:
        try:
            got.append(listener.accept()[0])
        except BlockingIOError:
            pass
        return bool(got)

    link.run_until(accepted, "a host connection on port %d" % listener.getsockname()[1], timeout)
    got[0].setblocking(False)
    return got[0]


def host_recv(link: GuestLink, sock: socket.socket, n: int, timeout: float = DEFAULT_WAIT_SEC) -> bytes:
    """Exactly n bytes from a non-blocking host socket, or all until EOF if n < 0."""
    buf = bytearray()
    eof = []

    def enough() -> bool:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                eof.append(True)
                break
            buf.extend(data)
        return bool(eof) if n < 0 else len(buf) >= n

    link.run_until(enough, "the host receiving %s" % ("until EOF" if n < 0 else "%d bytes" % n), timeout)
    return bytes(buf)
