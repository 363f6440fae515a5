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
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import struct
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from tenbox_vmm.net.config import NetConfig
from tenbox_vmm.net.forwards import HostForward
from tenbox_vmm.net.ports import bind_error

log = logging.getLogger("tenbox.net")

UDP_FLOW_IDLE_SEC = 120.0  # as TenBox's UDP NAT
FLOWS_MAX = 1024
PENDING_MAX = 16  # datagrams held per guest address until its MAC is known
ARP_RETRY_SEC = 1.0
RECV_BATCH = 64  # datagrams read from one socket per poll round
DATAGRAM_MAX_BYTES = 65535
IPV4_UDP_HEADERS = 28

ETH_IPV4 = b"\x08\x00"
ETH_ARP = b"\x08\x06"
BROADCAST_MAC = b"\xff" * 6
PROTO_UDP = 17

Buffer = Union[bytes, bytearray, memoryview]
FlowKey = Tuple[bytes, int, bytes, int]  # guest ip, guest port, peer ip as the guest sees it, peer port


def ipv4_header_checksum(header: bytes) -> int:
    s = sum(struct.unpack("!10H", header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class _Forward:
    __slots__ = ("fwd", "sock", "guest_ip", "guest_port")

    def __init__(self, fwd: HostForward, sock: socket.socket, guest_ip: bytes) -> None:
        self.fwd = fwd
        self.sock = sock
        self.guest_ip = guest_ip
        self.guest_port = fwd.guest_port


class UdpForwards:
    """The UDP host forwards of one network and their flows."""

    def __init__(self, config: NetConfig, send_to_guest: Callable[[bytes], None],
                 clock: Callable[[], float]) -> None:
        self._send = send_to_guest
        self._clock = clock
        self._gw_ip = config.host.packed
        # libslirp's gateway MAC: 52:55 and then the gateway's IPv4 address.
        self._gw_mac = b"\x52\x55" + config.host.packed
        self._payload_max = config.mtu - IPV4_UDP_HEADERS
        self._forwards: Dict[tuple, _Forward] = {}
        self._by_fd: Dict[int, _Forward] = {}
        self._guest_ips: Set[bytes] = set()
        self._flows: "collections.OrderedDict[FlowKey, Tuple[_Forward, tuple, float]]" = collections.OrderedDict()
        self._macs: Dict[bytes, bytes] = {}
        self._pending: Dict[bytes, Deque[bytes]] = {}
        self._arp_sent: Dict[bytes, float] = {}
        self._ident = 0
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self._forwards)

    # -- forwards --------------------------------------------------------------

    def add(self, fwd: HostForward, guest_ip: bytes) -> Optional[str]:
        """Bind fwd's host socket; None, or why it failed."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((str(fwd.host_addr), fwd.host_port))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            return bind_error(e.errno or 0, "udp %s:%d" % (fwd.host_addr, fwd.host_port))
        f = _Forward(fwd, sock, guest_ip)
        self._forwards[fwd.key] = f
        self._by_fd[sock.fileno()] = f
        self._guest_ips.add(guest_ip)
        return None

    def remove(self, key: tuple) -> bool:
        f = self._forwards.pop(key, None)
        if f is None:
            return False
        del self._by_fd[f.sock.fileno()]
        f.sock.close()
        for k in [k for k, v in self._flows.items() if v[0] is f]:
            del self._flows[k]
        self._guest_ips = {x.guest_ip for x in self._forwards.values()}
        return True

    def close(self) -> None:
        for key in list(self._forwards):
            self.remove(key)
        self._pending.clear()

    # -- host side -------------------------------------------------------------

    def poll_fds(self) -> List[Tuple[int, int]]:
        return [(fd, select.POLLIN) for fd in self._by_fd]

    def handle(self, revents: Dict[int, int]) -> None:
        """Read the forward sockets poll(2) found readable; send what came to the guest."""
        for fd, f in list(self._by_fd.items()):
            if not revents.get(fd, 0):
                continue
            for _ in range(RECV_BATCH):
                try:
                    data, peer = f.sock.recvfrom(DATAGRAM_MAX_BYTES)
                except BlockingIOError:
                    break
                except OSError as e:
                    log.debug("udp forward %s: %s", f.fwd, e)
                    break
                self._to_guest(f, data, peer)
        self._expire(self._clock())

    def _to_guest(self, f: _Forward, data: bytes, peer: tuple) -> None:
        if len(data) > self._payload_max:
            self.dropped += 1
            log.info("udp forward %s: dropped a %d-byte datagram (more than one %d-byte frame)",
                     f.fwd, len(data), self._payload_max + IPV4_UDP_HEADERS)
            return
        peer_ip = socket.inet_aton(peer[0])
        shown = self._gw_ip if peer_ip[0] == 127 or peer_ip == b"\0\0\0\0" else peer_ip
        key = (f.guest_ip, f.guest_port, shown, peer[1])
        self._flows[key] = (f, peer, self._clock())
        self._flows.move_to_end(key)
        while len(self._flows) > FLOWS_MAX:
            self._flows.popitem(last=False)
        self._ident = (self._ident + 1) & 0xFFFF
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, IPV4_UDP_HEADERS + len(data), self._ident, 0x4000, 64,
                         PROTO_UDP, 0, shown, f.guest_ip)
        ip = ip[:10] + struct.pack("!H", ipv4_header_checksum(ip)) + ip[12:]
        udp = struct.pack("!HHHH", peer[1], f.guest_port, 8 + len(data), 0)
        tail = self._gw_mac + ETH_IPV4 + ip + udp + data
        mac = self._macs.get(f.guest_ip)
        if mac is not None:
            self._send(mac + tail)
            return
        queue = self._pending.setdefault(f.guest_ip, collections.deque(maxlen=PENDING_MAX))
        if len(queue) == PENDING_MAX:
            self.dropped += 1
        queue.append(tail)
        self._ask_mac(f.guest_ip)

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

    def _expire(self, now: float) -> None:
        while self._flows:
            key, (_, _, used) = next(iter(self._flows.items()))
            if now - used < UDP_FLOW_IDLE_SEC:
                return
            del self._flows[key]

    # -- guest side ------------------------------------------------------------

    def from_guest(self, frame: Buffer) -> bool:
        """Take the frame if it answers a forwarded flow (True); else leave it to libslirp."""
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
        f, peer, _ = flow
        self._flows[(src, sport, bytes(frame[30:34]), dport)] = (f, peer, self._clock())
        ulen = (frame[u + 4] << 8) | frame[u + 5]
        end = min(u + max(ulen, 8), len(frame))
        try:
            f.sock.sendto(frame[u + 8:end], peer)
        except OSError as e:
            self.dropped += 1
            log.debug("udp forward %s: answer to %s:%d not sent: %s", f.fwd, peer[0], peer[1], e)
        return True
