"""UDP host forwards in batches: recvmmsg in, sendmmsg and UDP segmentation out, flow control, flow lifetimes.

The guest is this test writing frames (tests/net_frames.py GuestLink, real
libslirp behind); host peers are loopback sockets. Every case that depends
on the batched calls also runs on the one-datagram-per-call path tenbox
keeps for a libc without them, and the answers also run with UDP
segmentation off: the host must see exactly the same datagrams.
"""

import socket
import struct
import time

import pytest

from tenbox_vmm.net import mmsg, udpfwd
from tests import net_frames as nf
from tests.framework.ports import free_port
from tests.net_frames import GuestLink

GUEST_PORT = 5000
HOST_WAIT_SEC = 5.0


@pytest.fixture(params=["batched", "one-by-one"])
def link(request, monkeypatch):
    if request.param == "one-by-one":
        monkeypatch.setattr(mmsg, "available", lambda: False)
    g = GuestLink()
    g.resolve_gateway()
    yield g
    g.close()


class Peer:
    """A host socket talking to the guest through a UDP forward."""

    def __init__(self, link: GuestLink) -> None:
        self.link = link
        self.port = free_port(socket.SOCK_DGRAM)
        assert link.net.add_hostfwd("udp:127.0.0.1:%d-:%d" % (self.port, GUEST_PORT)) is None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setblocking(False)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.port))

    def open_flow(self):
        """The first datagram, as the guest sees it: (gateway address, peer port)."""
        self.send(b"open")
        f = self.link.wait_for(lambda f: f.udp is not None and f.udp.payload == b"open", "the opening datagram")
        return f.ip.src, f.udp.sport

    def recv_all(self, count: int):
        got = []
        deadline = time.monotonic() + HOST_WAIT_SEC
        while len(got) < count:
            try:
                data, src = self.sock.recvfrom(65536)
            except BlockingIOError:
                assert time.monotonic() < deadline, "%d of %d datagrams arrived" % (len(got), count)
                self.link.pump(1)
                continue
            assert src == ("127.0.0.1", self.port)
            got.append(data)
        return got

    def nothing_more(self) -> bool:
        try:
            self.sock.recvfrom(65536)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peer(link):
    p = Peer(link)
    yield p
    p.close()


@pytest.fixture
def batched():
    """A link on the batched path only (sendmmsg, UDP segmentation, recvmmsg), with its peer."""
    g = GuestLink()
    g.resolve_gateway()
    p = Peer(g)
    assert g.net._udp._out is not None and g.net._udp._out.gso, "this host should batch and segment"
    yield g, p
    p.close()
    g.close()


def answer(link: GuestLink, shown: str, port: int, payload: bytes, mac: bytes = nf.GUEST_MAC) -> bytes:
    return nf.eth(link.gateway_mac, mac, nf.ETH_IPV4, nf.udp4(link.ip, shown, GUEST_PORT, port, payload))


def test_a_burst_from_the_host_reaches_the_guest_whole_and_in_order(link, peer):
    peer.open_flow()
    sent = [bytes([i]) * (1 + (i * 37) % 1472) for i in range(100)]
    for data in sent:
        peer.send(data)
    got = []
    deadline = time.monotonic() + HOST_WAIT_SEC
    while len(got) < len(sent) and time.monotonic() < deadline:
        link.pump(1)
        while True:
            f = link.take(lambda f: f.udp is not None and f.udp.dport == GUEST_PORT)
            if f is None:
                break
            assert f.ip.src == nf.GATEWAY_IP and f.ip.dst == link.ip and f.dst == link.mac
            got.append(f.udp.payload)
    assert got == sent  # GuestLink.close() also finds every IPv4 header checksum right


def test_answers_in_one_batch_reach_the_host_whole_and_in_order(link, peer):
    """Runs of one size, a shorter one ending a run, and a frame for libslirp in the middle."""
    shown, port = peer.open_flow()
    payloads = [b"a" * 1024] * 20 + [b"b" * 1024] * 10 + [b"c" * 100] + [b"d" * 1472] * 5 + [b""] + [b"e" * 7] * 3
    frames = [answer(link, shown, port, p) for p in payloads]
    ping = nf.eth(link.gateway_mac, link.mac, nf.ETH_IPV4, nf.icmp4_echo(link.ip, nf.GATEWAY_IP, 7, 1, b"hi"))
    frames.insert(25, ping)
    link.net.input_many(frames)
    assert peer.recv_all(len(payloads)) == payloads
    assert peer.nothing_more()
    link.wait_for(lambda f: f.icmp is not None and f.icmp.type == 0, "the gateway's echo reply")


def test_answers_are_the_same_without_udp_segmentation(batched):
    link, peer = batched
    link.net._udp._out.gso = False
    shown, port = peer.open_flow()
    payloads = [bytes([i]) * 1000 for i in range(70)]  # more than one sendmmsg batch
    link.net.input_many([answer(link, shown, port, p) for p in payloads])
    assert peer.recv_all(len(payloads)) == payloads


def test_an_answer_padded_to_the_ethernet_minimum_carries_only_its_udp_payload(link, peer):
    shown, port = peer.open_flow()
    frame = answer(link, shown, port, b"x")
    assert len(frame) < 60
    link.send(frame + bytes(60 - len(frame)))
    assert peer.recv_all(1) == [b"x"]


def test_an_answer_with_ip_options_still_reaches_the_host(link, peer):
    shown, port = peer.open_flow()
    seg = struct.pack("!HHHH", GUEST_PORT, port, 8 + 5, 0) + b"hello"
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP END
    header = struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(seg), 9, 0x4000, 64, nf.PROTO_UDP, 0,
                         nf.ip4(link.ip), nf.ip4(shown)) + options
    header = header[:10] + struct.pack("!H", nf.checksum(header)) + header[12:]
    link.send(nf.eth(link.gateway_mac, link.mac, nf.ETH_IPV4, header + seg))
    assert peer.recv_all(1) == [b"hello"]


def test_a_guest_that_changes_its_mac_is_answered_at_the_new_one(link, peer):
    shown, port = peer.open_flow()
    link.send(answer(link, shown, port, b"old mac"))
    assert peer.recv_all(1) == [b"old mac"]
    new_mac = bytes.fromhex("525400abcdef")
    link.send(answer(link, shown, port, b"new mac", mac=new_mac))
    assert peer.recv_all(1) == [b"new mac"]
    peer.send(b"to the new mac")
    f = link.wait_for(lambda f: f.udp is not None and f.udp.payload == b"to the new mac", "the datagram")
    assert f.dst == new_mac


def test_while_the_guest_has_no_room_datagrams_wait_in_the_socket(link, peer):
    budget = [0]

    def delivered():
        return [f.udp.payload for f in link.rx if f.udp is not None]

    peer.open_flow()
    link.net.guest_room = lambda: max(0, budget[0] - len(delivered()))
    for i in range(10):
        peer.send(b"held %d" % i)
    for _ in range(5):
        link.pump(5)
    assert delivered() == []
    assert link.net._udp.dropped == 0
    budget[0] = 3
    for _ in range(5):
        link.pump(5)
    assert delivered() == [b"held 0", b"held 1", b"held 2"]
    budget[0] = 100
    link.run_until(lambda: len(delivered()) == 10, "the rest")
    assert delivered() == [b"held %d" % i for i in range(10)]
    assert link.net._udp.dropped == 0


def test_a_datagram_longer_than_a_frame_is_dropped_counted_and_the_next_arrives(link, peer):
    peer.open_flow()
    peer.send(b"z" * 1473)  # one byte over MTU 1500 less the IPv4 and UDP headers
    peer.send(b"small")
    f = link.wait_for(lambda f: f.udp is not None and f.udp.dport == GUEST_PORT, "the next datagram")
    assert f.udp.payload == b"small"
    assert link.net._udp.dropped == 1


def test_an_idle_flow_expires_and_the_guest_can_no_longer_answer_through_it(monkeypatch):
    now = [1000 * 10**9]
    g = GuestLink(clock_ns=lambda: now[0])
    p = None
    try:
        g.resolve_gateway()
        p = Peer(g)
        shown, port = p.open_flow()
        g.send(answer(g, shown, port, b"while alive"))
        assert p.recv_all(1) == [b"while alive"]
        now[0] += int((udpfwd.UDP_FLOW_IDLE_SEC + udpfwd.EXPIRE_SCAN_SEC + 1) * 10**9)
        g.pump(1)  # a turn of the loop looks for idle flows
        g.send(answer(g, shown, port, b"too late"))
        g.wait_for(lambda f: f.icmp is not None and f.icmp.type == 3, "ICMP unreachable from libslirp")
        assert p.nothing_more()
    finally:
        if p is not None:
            p.close()
        g.close()


def test_beyond_the_flow_limit_the_least_recently_used_flow_goes(monkeypatch):
    monkeypatch.setattr(udpfwd, "FLOWS_MAX", 3)
    now = [1000 * 10**9]
    g = GuestLink(clock_ns=lambda: now[0])
    peers = []
    try:
        g.resolve_gateway()
        port = free_port(socket.SOCK_DGRAM)
        assert g.net.add_hostfwd("udp:127.0.0.1:%d-:%d" % (port, GUEST_PORT)) is None
        flows = []
        for i in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            peers.append(s)
            s.sendto(b"open %d" % i, ("127.0.0.1", port))
            f = g.wait_for(lambda f, i=i: f.udp is not None and f.udp.payload == b"open %d" % i, "flow %d" % i)
            flows.append((f.ip.src, f.udp.sport))
            now[0] += 10**9
        g.send(answer(g, flows[0][0], flows[0][1], b"keep the first"))  # now the second is the oldest in use
        now[0] += 10**9
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        peers.append(s)
        s.sendto(b"open 3", ("127.0.0.1", port))
        g.wait_for(lambda f: f.udp is not None and f.udp.payload == b"open 3", "flow 3")
        g.send(answer(g, flows[1][0], flows[1][1], b"evicted"))
        g.wait_for(lambda f: f.icmp is not None and f.icmp.type == 3, "ICMP unreachable for the evicted flow")
        g.send(answer(g, flows[0][0], flows[0][1], b"still here"))
        deadline = time.monotonic() + HOST_WAIT_SEC
        got = []
        while b"still here" not in got:
            assert time.monotonic() < deadline
            try:
                got.append(peers[0].recv(100))
            except BlockingIOError:
                g.pump(1)
    finally:
        for s in peers:
            s.close()
        g.close()


def test_removing_a_forward_sends_the_answers_already_taken(batched):
    link, peer = batched
    shown, port = peer.open_flow()
    udp = link.net._udp
    assert udp.from_guest(answer(link, shown, port, b"queued"))
    assert udp._out.count == 1
    assert link.net.remove_hostfwd("udp:127.0.0.1:%d-:%d" % (peer.port, GUEST_PORT))
    assert peer.recv_all(1) == [b"queued"]


def test_answers_to_two_peers_interleaved_in_one_batch_each_reach_their_peer_in_order(link, peer):
    shown_a, port_a = peer.open_flow()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    other.setblocking(False)
    try:
        other.sendto(b"open b", ("127.0.0.1", peer.port))
        f = link.wait_for(lambda f: f.udp is not None and f.udp.payload == b"open b", "the second flow")
        shown_b, port_b = f.ip.src, f.udp.sport
        plan = ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 4 + ["a"] * 2 + ["b"]
        frames, want = [], {"a": [], "b": []}
        for k, who in enumerate(plan):
            data = (b"%s%d-" % (who.encode(), k)) * 50 if k % 5 else b""
            want[who].append(data)
            shown, port = (shown_a, port_a) if who == "a" else (shown_b, port_b)
            frames.append(answer(link, shown, port, data))
        link.net.input_many(frames)
        assert peer.recv_all(len(want["a"])) == want["a"]
        got_b = []
        deadline = time.monotonic() + HOST_WAIT_SEC
        while len(got_b) < len(want["b"]):
            assert time.monotonic() < deadline
            try:
                got_b.append(other.recv(65536))
            except BlockingIOError:
                link.pump(1)
        assert got_b == want["b"]
    finally:
        other.close()


def test_a_segmented_run_the_kernel_refuses_goes_datagram_by_datagram(batched, monkeypatch):
    link, peer = batched
    out = link.net._udp._out
    monkeypatch.setattr(out, "_send_run", lambda *a: False)
    shown, port = peer.open_flow()
    payloads = [b"r" * 500] * 8
    link.net.input_many([answer(link, shown, port, p) for p in payloads])
    assert peer.recv_all(8) == payloads


def test_a_forward_socket_asks_for_room_for_bursts(link, peer):
    f = next(iter(link.net._udp._forwards.values()))
    with open("/proc/sys/net/core/rmem_max") as fh:
        rmem_max = int(fh.read())
    # Linux doubles what it grants (bookkeeping overhead) and caps the request at rmem_max.
    assert f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * min(udpfwd.FORWARD_RCVBUF_BYTES, rmem_max)
