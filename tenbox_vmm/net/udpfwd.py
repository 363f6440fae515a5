"""UDP host forwards, carried here instead of by libslirp (I/O thread).

Why not slirp_add_hostfwd(is_udp=1): libslirp shows a client on this host
to the guest as the gateway (10.0.2.2), and with disable_host_loopback on,
tenbox's default, it then refuses the guest's answers, because they are
addressed to 10.0.2.2 (EPERM; the guest gets ICMP unreachable). Answers
within a forwarded UDP flow are no way into the host's loopback services,
so this module carries UDP forwards itself:

- a datagram that arrives on the forward's host socket from peer P goes to
  the guest as a UDP frame from P (from the gateway address when P is this
  host's loopback, as libslirp shows it), and the flow is remembered for
  UDP_FLOW_IDLE_SEC;
- a guest UDP frame that belongs to a remembered flow is sent from the
  forward's socket to P and never reaches libslirp.

Every other guest frame goes to libslirp as before, so a guest datagram to
10.0.2.2 that is not an answer is still refused. Frames to the guest carry
UDP checksum 0 (allowed for IPv4), so Python touches no payload byte;
datagrams that do not fit one frame of the MTU are dropped and counted.

Per-datagram cost is what limits a forward, so both directions batch:
datagrams arrive by recvmmsg(2) into slots with room for the headers in
front (the frame is one copy of one contiguous range), and answers leave
straight from the guest's buffers, as one sendmsg(2) with UDP segmentation
(UDP_SEGMENT) for each run of one size to one peer, else by sendmmsg(2);
`flush()` sends them, and the caller must not give those buffers back to
the guest before. A flow's addresses, ports and IPv4 header checksum are
worked out once: a datagram costs one header pack each way. Without
sendmmsg/recvmmsg in libc, one system call per datagram, as before.

Flow control: a forward reads no more datagrams than the guest has receive
buffers for (`guest_room`); the rest wait in the socket, whose receive
buffer is enlarged (FORWARD_RCVBUF_BYTES) so that a burst survives the I/O
thread or the guest being off the CPU for a few milliseconds.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import select
import socket
import struct
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from tenbox_vmm.net import mmsg
from tenbox_vmm.net.config import NetConfig
from tenbox_vmm.protocol.forwards import HostForward
from tenbox_vmm.net.ports import bind_error

log = logging.getLogger("tenbox.net")

UDP_FLOW_IDLE_SEC = 120.0  # as TenBox's UDP NAT
FLOWS_MAX = 1024
EVICT_CANDIDATES = 16  # beyond FLOWS_MAX, the least recently used of the oldest this many goes
EXPIRE_SCAN_SEC = 1.0  # idle flows are looked for this often (a scan of at most FLOWS_MAX)
PENDING_MAX = 16  # datagrams held per guest address until its MAC is known
ARP_RETRY_SEC = 1.0
RECV_BATCH = 64  # datagrams read from one socket per recvmmsg(2)
RECV_ROUND_MAX = 256  # datagrams read from one socket per poll round, so others get their turn
RECV_SLOTS_BYTES_MAX = 1 << 20  # receive slots of one network, whatever the MTU
DATAGRAM_MAX_BYTES = 65535
FORWARD_RCVBUF_BYTES = 1 << 20  # SO_RCVBUF asked per forward: ~900 MTU-size datagrams once Linux doubles it
IPV4_UDP_HEADERS = 28
ETH_IPV4_UDP_HEADERS = 14 + IPV4_UDP_HEADERS

ETH_IPV4 = b"\x08\x00"
ETH_ARP = b"\x08\x06"
BROADCAST_MAC = b"\xff" * 6
PROTO_UDP = 17

Buffer = Union[bytes, bytearray, memoryview]
FlowKey = Tuple[bytes, int, bytes, int]  # guest ip, guest port, peer ip as the guest sees it, peer port

# Ethernet + IPv4 + UDP toward the guest: guest MAC; gateway MAC, type, version/IHL, TOS;
# total length; ident; DF; TTL, protocol; checksum; source, destination, ports; UDP length; checksum 0.
_TO_GUEST = struct.Struct("!6s10sHHH2sH12sHH")
_FIXED_WORDS = 0x4500 + 0x4000 + 0x4011  # the header words that never change (TTL 64, UDP)


def ipv4_header_checksum(header: bytes) -> int:
    s = sum(struct.unpack("!10H", header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _words(b: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(b) // 2), b))


class _Forward:
    __slots__ = ("fwd", "sock", "fd", "guest_ip", "guest_port", "by_peer")

    def __init__(self, fwd: HostForward, sock: socket.socket, guest_ip: bytes) -> None:
        self.fwd = fwd
        self.sock = sock
        self.fd = sock.fileno()
        self.guest_ip = guest_ip
        self.guest_port = fwd.guest_port
        self.by_peer: Dict[bytes, "_Flow"] = {}  # peer port and address, as recvmmsg gives them


class _Flow:
    """One peer of one forward, and everything its datagrams need precomputed."""

    __slots__ = ("key", "fwd", "peer", "peer6", "used", "name", "tx_key", "tx_match", "rx_addrs", "rx_sum")

    def __init__(self, key: FlowKey, fwd: _Forward, peer: tuple, peer6: bytes, now: float) -> None:
        guest_ip, guest_port, shown, peer_port = key
        self.key = key
        self.fwd = fwd
        self.peer = peer
        self.peer6 = peer6
        self.used = now
        self.name = mmsg.sockaddr(peer6[2:], peer[1]) if mmsg.available() else None
        # frame[26:38] of the guest's answers: source and destination address, ports.
        self.tx_key = guest_ip + shown + struct.pack("!HH", guest_port, peer_port)
        self.tx_match = b""  # frame[6:15] once seen: the guest's MAC, IPv4, no options
        self.rx_addrs = shown + guest_ip + struct.pack("!HH", peer_port, guest_port)
        self.rx_sum = _FIXED_WORDS + _words(shown + guest_ip)


class UdpForwards:
    """The UDP host forwards of one network and their flows."""

    def __init__(self, config: NetConfig, send_to_guest: Callable[[bytes], None],
                 clock: Callable[[], float]) -> None:
        self._send = send_to_guest
        self._clock = clock
        self._gw_ip = config.host.packed
        # libslirp's gateway MAC: 52:55 and then the gateway's IPv4 address.
        self._gw_mac = b"\x52\x55" + config.host.packed
        self._gw_fixed = self._gw_mac + ETH_IPV4 + b"\x45\x00"
        self._payload_max = config.mtu - IPV4_UDP_HEADERS
        self._forwards: Dict[tuple, _Forward] = {}
        self._by_fd: Dict[int, _Forward] = {}
        self._guest_ips: Set[bytes] = set()
        self._flows: Dict[FlowKey, _Flow] = {}  # in the order they were made
        self._expired_at = clock()
        self._tx_index: Dict[bytes, _Flow] = {}
        self._touched: Set[_Flow] = set()  # flows that carried answers since the last flush
        self._macs: Dict[bytes, bytes] = {}
        self._pending: Dict[bytes, Deque[bytes]] = {}
        self._arp_sent: Dict[bytes, float] = {}
        self._ident = 0
        self.dropped = 0
        # How many frames the guest can take now (its free receive buffers); None: no limit.
        # Datagrams wait in their socket's buffer while it is 0, as they would behind a
        # busy host, instead of being read only to be dropped.
        self.guest_room: Optional[Callable[[], int]] = None
        self._batched = mmsg.available()
        self._out = mmsg.SendBatch() if self._batched else None
        self._in: Optional[mmsg.RecvBatch] = None
        if self._batched:
            slot = ETH_IPV4_UDP_HEADERS + self._payload_max + 1  # one byte more: longer ones come truncated
            slots = max(1, min(RECV_BATCH, RECV_SLOTS_BYTES_MAX // slot))
            self._in = mmsg.RecvBatch(slots, self._payload_max + 1, ETH_IPV4_UDP_HEADERS)

    def __bool__(self) -> bool:
        return bool(self._forwards)

    # -- forwards --------------------------------------------------------------

    def add(self, fwd: HostForward, guest_ip: bytes) -> Optional[str]:
        """Bind fwd's host socket; None, or why it failed."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((str(fwd.host_addr), fwd.host_port))
            sock.setblocking(False)
            # Datagrams wait in the socket while the I/O thread is off the CPU or the guest
            # has no receive buffer (guest_room): the default holds under a millisecond of a
            # busy flow. Linux doubles the value and caps it at net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FORWARD_RCVBUF_BYTES)
        except OSError as e:
            sock.close()
            return bind_error(e.errno or 0, "udp %s:%d" % (fwd.host_addr, fwd.host_port))
        if self._out is not None and not self._forwards:
            self._out.gso = mmsg.gso_supported(sock)
        f = _Forward(fwd, sock, guest_ip)
        self._forwards[fwd.key] = f
        self._by_fd[f.fd] = f
        self._guest_ips.add(guest_ip)
        return None

    def remove(self, key: tuple) -> bool:
        f = self._forwards.pop(key, None)
        if f is None:
            return False
        self.flush()  # answers already taken leave before the socket closes
        del self._by_fd[f.fd]
        f.sock.close()
        for flow in [v for v in self._flows.values() if v.fwd is f]:
            self._forget(flow)
        self._guest_ips = {x.guest_ip for x in self._forwards.values()}
        return True

    def close(self) -> None:
        for key in list(self._forwards):
            self.remove(key)
        self._pending.clear()

    # -- flows -----------------------------------------------------------------

    def _forget(self, flow: _Flow) -> None:
        self._flows.pop(flow.key, None)
        if self._tx_index.get(flow.tx_key) is flow:
            del self._tx_index[flow.tx_key]
        if flow.fwd.by_peer.get(flow.peer6) is flow:
            del flow.fwd.by_peer[flow.peer6]
        self._touched.discard(flow)

    def _flow_for(self, f: _Forward, peer6: bytes, now: float) -> _Flow:
        """The flow of a datagram from peer6 to forward f, made or re-pointed at this peer."""
        peer_ip = peer6[2:]
        peer = (socket.inet_ntoa(peer_ip), int.from_bytes(peer6[:2], "big"))
        shown = self._gw_ip if peer_ip[0] == 127 or peer_ip == b"\0\0\0\0" else peer_ip
        key = (f.guest_ip, f.guest_port, shown, peer[1])
        old = self._flows.get(key)
        if old is not None:
            self._forget(old)  # another loopback address behind the same shown one: the latest wins
        flow = _Flow(key, f, peer, peer6, now)
        self._flows[key] = flow
        self._tx_index[flow.tx_key] = flow
        f.by_peer[peer6] = flow
        if len(self._flows) > FLOWS_MAX:
            # The least recently used of the oldest few: O(1), and a busy old flow survives.
            oldest = itertools.islice(self._flows.values(), EVICT_CANDIDATES)
            self._forget(min(oldest, key=lambda v: v.used))
        return flow

    def _expire(self, now: float) -> None:
        if now - self._expired_at < EXPIRE_SCAN_SEC:
            return
        self._expired_at = now
        for flow in [v for v in self._flows.values() if now - v.used >= UDP_FLOW_IDLE_SEC]:
            self._forget(flow)

    # -- host side -------------------------------------------------------------

    def poll_fds(self) -> List[Tuple[int, int]]:
        if self.guest_room is not None and self._by_fd and not self.guest_room():
            return []  # the guest's receive ring will wake the loop when it has room again
        return [(fd, select.POLLIN) for fd in self._by_fd]

    def handle(self, revents: Dict[int, int]) -> None:
        """Read the forward sockets poll(2) found readable; send what came to the guest."""
        now = self._clock()
        by_fd = self._by_fd
        for fd in [fd for fd in revents if fd in by_fd]:  # a forward may go while we read
            f = by_fd.get(fd)
            if f is None or not revents[fd]:
                continue
            if self._in is not None:
                self._receive_batches(f, now)
            else:
                self._receive_one_by_one(f, now)
        self._expire(now)

    def _receive_one_by_one(self, f: _Forward, now: float) -> None:
        for _ in range(RECV_BATCH):
            if self.guest_room is not None and not self.guest_room():
                return
            try:
                data, peer = f.sock.recvfrom(DATAGRAM_MAX_BYTES)
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("udp forward %s: %s", f.fwd, e)
                return
            n = len(data)
            if n > self._payload_max:
                self._too_big(f, n)
                continue
            peer6 = peer[1].to_bytes(2, "big") + socket.inet_aton(peer[0])
            flow = f.by_peer.get(peer6) or self._flow_for(f, peer6, now)
            flow.used = now
            self._to_guest(flow, bytearray(ETH_IPV4_UDP_HEADERS) + data, 0, n)

    def _receive_batches(self, f: _Forward, now: float) -> None:
        batch = self._in
        assert batch is not None
        view = batch.view
        payload_max = self._payload_max
        room = self.guest_room
        taken = 0
        while taken < RECV_ROUND_MAX:
            want = batch.slots
            if room is not None:
                want = min(want, room())
                if want <= 0:
                    return
            try:
                got = batch.recv(f.fd, want)
            except OSError as e:
                log.debug("udp forward %s: %s", f.fwd, e)
                return
            for start, n, peer6, truncated in got:
                if truncated or n > payload_max:
                    self._too_big(f, n, truncated)
                    continue
                flow = f.by_peer.get(peer6)
                if flow is None:
                    flow = self._flow_for(f, peer6, now)
                flow.used = now
                self._to_guest(flow, view, start - ETH_IPV4_UDP_HEADERS, n)
            taken += len(got)
            if len(got) < want:
                return

    def _too_big(self, f: _Forward, n: int, truncated: bool = False) -> None:
        self.dropped += 1
        log.info("udp forward %s: dropped a %s%d-byte datagram (more than one %d-byte frame)",
                 f.fwd, "longer than " if truncated else "", n, self._payload_max + IPV4_UDP_HEADERS)

    def _to_guest(self, flow: _Flow, buf: Union[bytearray, memoryview], at: int, n: int) -> None:
        """Frame the n-byte datagram at buf[at + 42:] for the guest, headers written in front of it."""
        ident = self._ident = (self._ident + 1) & 0xFFFF
        total = IPV4_UDP_HEADERS + n
        s = flow.rx_sum + total + ident
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        guest_ip = flow.key[0]
        mac = self._macs.get(guest_ip)
        _TO_GUEST.pack_into(buf, at, mac or BROADCAST_MAC, self._gw_fixed, total, ident, 0x4000, b"\x40\x11",
                            ~s & 0xFFFF, flow.rx_addrs, 8 + n, 0)
        if mac is not None:
            self._send(bytes(buf[at : at + ETH_IPV4_UDP_HEADERS + n]))
            return
        queue = self._pending.setdefault(guest_ip, collections.deque(maxlen=PENDING_MAX))
        if len(queue) == PENDING_MAX:
            self.dropped += 1
        queue.append(bytes(buf[at + 6 : at + ETH_IPV4_UDP_HEADERS + n]))
        self._ask_mac(guest_ip)

    def _ask_mac(self, guest_ip: bytes) -> None:
        now = self._clock()
        if now - self._arp_sent.get(guest_ip, -ARP_RETRY_SEC) < ARP_RETRY_SEC:
            return
        self._arp_sent[guest_ip] = now
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + self._gw_mac + self._gw_ip + bytes(6) + guest_ip
        self._send(BROADCAST_MAC + self._gw_mac + ETH_ARP + arp)

    def _learn(self, ip: bytes, mac: bytes) -> None:
        if self._macs.get(ip) == mac or mac[0] & 1:
            return
        self._macs[ip] = mac
        queue = self._pending.pop(ip, None)
        while queue:
            self._send(mac + queue.popleft())

    # -- guest side ------------------------------------------------------------

    def from_guest(self, frame: Buffer) -> bool:
        """Take the frame if it answers a forwarded flow (True); else leave it to libslirp.

        An answer taken may still be queued: `flush()` sends it, and `frame`
        must stay as it is until then.
        """
        n = len(frame)
        if n >= ETH_IPV4_UDP_HEADERS:
            h = bytes(frame[:ETH_IPV4_UDP_HEADERS])
            flow = self._tx_index.get(h[26:38])
            # The fast path: a flow's answer from the MAC and in the shape seen before, not a fragment.
            if (flow is not None and h[6:15] == flow.tx_match and h[23] == PROTO_UDP
                    and not (h[20] & 0x3F or h[21])):
                end = 34 + ((h[38] << 8) | h[39])
                if ETH_IPV4_UDP_HEADERS <= end <= n:
                    self._answer(flow, memoryview(frame)[ETH_IPV4_UDP_HEADERS:end])
                    return True
        return self._from_guest_slow(frame)

    def _from_guest_slow(self, frame: Buffer) -> bool:
        ethertype = frame[12:14]
        if ethertype == ETH_ARP:
            if len(frame) >= 42:
                sender = bytes(frame[28:32])
                if sender in self._guest_ips:
                    self._learn(sender, bytes(frame[22:28]))
            return False
        if ethertype != ETH_IPV4 or len(frame) < 42:
            return False
        src = bytes(frame[26:30])
        if src not in self._guest_ips:
            return False
        self._learn(src, bytes(frame[6:12]))
        if frame[23] != PROTO_UDP or (frame[20] & 0x3F) or frame[21]:
            return False  # not UDP, or a fragment: libslirp reassembles those
        ihl = (frame[14] & 0x0F) * 4
        u = 14 + ihl
        if len(frame) < u + 8:
            return False
        sport = (frame[u] << 8) | frame[u + 1]
        dport = (frame[u + 2] << 8) | frame[u + 3]
        flow = self._flows.get((src, sport, bytes(frame[30:34]), dport))
        if flow is None:
            return False
        if ihl == 20:
            flow.tx_match = bytes(frame[6:15])  # the next answers in this shape take the fast path
        ulen = (frame[u + 4] << 8) | frame[u + 5]
        end = min(u + max(ulen, 8), len(frame))
        self._answer(flow, memoryview(frame)[u + 8:end])
        return True

    def _answer(self, flow: _Flow, payload: memoryview) -> None:
        """Send (or queue for flush) a guest's answer within a flow."""
        out = self._out
        if out is None:
            flow.used = self._clock()
            try:
                flow.fwd.sock.sendto(payload, flow.peer)
            except OSError as e:
                self._answer_failed(flow.fwd, e.errno or 0)
            return
        fd = flow.fwd.fd
        if out.count and (out.fd != fd or out.full()):
            self.flush()
        out.add(fd, payload, flow.name)
        self._touched.add(flow)

    def flush(self) -> None:
        """Send the answers `from_guest` queued; after this their frames may change."""
        out = self._out
        if out is None or not out.count:
            return
        fwd = self._by_fd.get(out.fd)
        _, failed = out.flush()
        for err in failed:
            self._answer_failed(fwd, err)
        now = self._clock()
        for flow in self._touched:
            flow.used = now
        self._touched.clear()

    def _answer_failed(self, fwd: Optional[_Forward], err: int) -> None:
        self.dropped += 1
        log.debug("udp forward %s: an answer was not sent: %s", fwd.fwd if fwd else "?", os.strerror(err))
