"""A guest on the user-mode network gets DHCP, ARP, ping and IPv6 from libslirp (real libslirp, loopback only).

The "guest" is this test writing Ethernet frames into SlirpNetwork.input()
and reading what send_to_guest() receives, through a small poll loop.
"""

import ipaddress
import socket
import struct
import threading
import time

import pytest

from tenbox_vmm.net import NetConfig, SlirpNetwork
from tests import net_frames as nf
from tests.framework.ports import free_port
from tests.net_frames import GuestLink


@pytest.fixture
def link():
    g = GuestLink()
    yield g
    g.close()


def _dhcp_reply(link, msg_type, xid):
    f = link.wait_for(lambda f: f.udp is not None and f.udp.dport == 68 and f.udp.sport == 67
                      and struct.unpack("!I", f.udp.payload[4:8])[0] == xid
                      and nf.dhcp_options(f.udp.payload).get(53) == bytes([msg_type]),
                      "DHCP message type %d" % msg_type)
    return nf.dhcp_options(f.udp.payload)


def test_dhcp_offers_the_guest_address_with_router_and_dns_then_acks_the_request(link):
    link.send(nf.dhcp_frame(nf.dhcp(nf.DHCP_DISCOVER, link.mac, 0x1234)))
    offer = _dhcp_reply(link, nf.DHCP_OFFER, 0x1234)
    assert offer["yiaddr"] == "10.0.2.15"
    assert offer[1] == nf.ip4("255.255.255.0")
    assert offer[3] == nf.ip4("10.0.2.2")  # router
    assert offer[6] == nf.ip4("10.0.2.3")  # DNS
    assert offer[54] == nf.ip4("10.0.2.2")  # server id
    request = bytes([50, 4]) + nf.ip4(offer["yiaddr"]) + bytes([54, 4]) + offer[54]
    link.send(nf.dhcp_frame(nf.dhcp(nf.DHCP_REQUEST, link.mac, 0x1235, request)))
    ack = _dhcp_reply(link, nf.DHCP_ACK, 0x1235)
    assert ack["yiaddr"] == "10.0.2.15" and ack[3] == nf.ip4("10.0.2.2")
    assert struct.unpack("!I", ack[51])[0] > 0  # a lease time


def test_dhcp_hands_out_the_configured_hostname():
    g = GuestLink(NetConfig(hostname="tenbox-vm"))
    try:
        g.send(nf.dhcp_frame(nf.dhcp(nf.DHCP_DISCOVER, g.mac, 7)))
        assert _dhcp_reply(g, nf.DHCP_OFFER, 7)[12] == b"tenbox-vm"
    finally:
        g.close()


@pytest.mark.parametrize("target", ["10.0.2.2", "10.0.2.3"])
def test_arp_for_gateway_and_dns_is_answered(link, target):
    link.send(nf.eth(nf.BROADCAST_MAC, link.mac, nf.ETH_ARP, nf.arp(1, link.mac, link.ip, bytes(6), target)))
    f = link.wait_for(lambda f: f.arp is not None and f.arp.op == 2 and f.arp.spa == target, "ARP reply")
    assert f.dst == link.mac and f.arp.tpa == link.ip and f.arp.tha == link.mac
    assert f.arp.sha == bytes.fromhex("5255") + nf.ip4(target)


def test_arp_for_an_unused_address_is_not_answered(link):
    link.send(nf.eth(nf.BROADCAST_MAC, link.mac, nf.ETH_ARP, nf.arp(1, link.mac, link.ip, bytes(6), "10.0.2.77")))
    for _ in range(10):
        link.pump(5)
    assert not [f for f in link.rx if f.arp is not None]


def test_gateway_answers_ping_itself(link):
    link.resolve_gateway()
    link.send_ip(nf.icmp4_echo(link.ip, "10.0.2.2", 0x77, 3, b"tenbox ping"))
    f = link.wait_for(lambda f: f.icmp is not None and f.icmp.type == 0, "echo reply")
    assert f.ip.src == "10.0.2.2" and f.ip.dst == link.ip
    assert f.icmp.body == struct.pack("!HH", 0x77, 3) + b"tenbox ping"


def _ra_prefix(f):
    """(prefix, length) from the prefix-information option of a Router Advertisement."""
    opts = f.icmp.body[12:]
    while opts:
        kind, length = opts[0], opts[1] * 8
        if kind == 3:
            return str(ipaddress.IPv6Address(opts[16:32])), opts[2]
        opts = opts[length:]
    return None


def test_ipv6_router_solicitation_gets_the_fec0_prefix_and_the_gateway_answers_ping6(link):
    ll = nf.link_local(link.mac)
    rs = nf.icmp6(ll, "ff02::2", 133, 0, bytes(4) + bytes([1, 1]) + link.mac)
    link.send(nf.eth(bytes.fromhex("333300000002"), link.mac, nf.ETH_IPV6, rs))
    ra = link.wait_for(lambda f: f.icmp is not None and f.ip.version == 6 and f.icmp.type == 134, "RA")
    assert _ra_prefix(ra) == ("fec0::", 64)
    slaac = str(ipaddress.IPv6Address("fec0::" + ll.split("fe80::")[1]))
    link.ip6.add(slaac)
    ping = nf.icmp6(slaac, "fec0::2", 128, 0, struct.pack("!HH", 9, 1) + b"v6")
    link.send(nf.eth(ra.src, link.mac, nf.ETH_IPV6, ping))
    reply = link.wait_for(lambda f: f.icmp is not None and f.ip.version == 6 and f.icmp.type == 129, "echo6 reply")
    assert reply.ip.src == "fec0::2" and reply.ip.dst == slaac and reply.icmp.body.endswith(b"v6")


def test_without_ipv6_router_solicitations_go_unanswered():
    g = GuestLink(NetConfig(ipv6=False))
    try:
        rs = nf.icmp6(nf.link_local(g.mac), "ff02::2", 133, 0, bytes(4))
        g.send(nf.eth(bytes.fromhex("333300000002"), g.mac, nf.ETH_IPV6, rs))
        for _ in range(10):
            g.pump(5)
        assert not [f for f in g.rx if f.ip is not None and f.ip.version == 6]
    finally:
        g.close()


class SteppedClock:
    """libslirp's clock, advanced by the test instead of by waiting."""

    def __init__(self):
        self.offset_ns = 0

    def __call__(self):
        return time.monotonic_ns() + self.offset_ns


@pytest.mark.parametrize("config_version", [4, 3], ids=["timer_new_opaque", "timer_new"])
def test_libslirp_timers_fire_on_its_clock(config_version):
    """The IPv6 RA timer (armed for 200..600 s) fires once the clock passes it, by either timer API."""
    clock = SteppedClock()
    g = GuestLink(clock_ns=clock, config_version=config_version)
    try:
        assert g.net.config_version == config_version
        g.pump(1)
        assert not [f for f in g.rx if f.icmp is not None and f.icmp.type == 134]
        clock.offset_ns += 601 * 10 ** 9
        fds, timeout = g.net.poll_prepare()
        assert timeout == 0  # the timer is due: do not sleep
        g.net.poll_done({})
        ra = g.wait_for(lambda f: f.icmp is not None and f.icmp.type == 134, "unsolicited RA", timeout=1)
        assert ra.dst == bytes.fromhex("333300000001") and _ra_prefix(ra) == ("fec0::", 64)
        fds, timeout = g.net.poll_prepare()  # re-armed by libslirp, far away again
        assert timeout > 0
        g.net.poll_done({})
    finally:
        g.close()


def test_poll_prepare_lists_libslirp_sockets_with_poll_bits():
    g = GuestLink(NetConfig(hostfwds=["udp::%d-:9" % free_port(socket.SOCK_DGRAM)]))
    try:
        fds, timeout = g.net.poll_prepare()
        assert fds and all(ev & nf.select.POLLIN for fd, ev in fds)
        assert len({fd for fd, ev in fds}) == len(fds)
        assert 0 <= timeout <= 1000
        g.net.poll_done({})
    finally:
        g.close()


def test_once_the_io_thread_runs_calls_from_other_threads_are_refused():
    g = GuestLink()
    errors = []
    try:
        ready = threading.Event()

        def io_thread():
            g.pump(1)
            ready.set()
            time.sleep(0.3)

        t = threading.Thread(target=io_thread, name="net-io")
        t.start()
        assert ready.wait(5)
        for call in (lambda: g.net.poll_prepare(), lambda: g.net.input(b"\0" * 60),
                     lambda: g.net.add_hostfwd("tcp::1-:1")):
            try:
                call()
            except RuntimeError as e:
                errors.append(str(e))
        t.join(5)
        g.pump(1)  # the owner has ended: another thread may take over (close, here)
    finally:
        g.close()
    assert len(errors) == 3 and all("net-io" in e for e in errors)


def test_an_exception_in_send_to_guest_reaches_the_caller_of_input():
    class Boom(Exception):
        pass

    def send(frame):
        raise Boom("device queue broken")

    net = SlirpNetwork(NetConfig(), send)
    try:
        with pytest.raises(Boom):
            net.input(nf.eth(nf.BROADCAST_MAC, nf.GUEST_MAC, nf.ETH_ARP,
                             nf.arp(1, nf.GUEST_MAC, nf.GUEST_IP, bytes(6), "10.0.2.2")))
        net.poll_prepare()
        net.poll_done({})  # nothing left over from the first exception
    finally:
        net.close()


def test_runt_and_oversized_frames_are_dropped_and_counted(link):
    link.send(b"\x01\x02")
    link.send(b"\0" * (nf.ETH_IPV4 + 70000))
    assert link.net.frames_dropped == 2


def test_close_is_idempotent_and_a_closed_network_refuses_use():
    g = GuestLink()
    g.close()
    g.net.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.net.poll_prepare()
    with pytest.raises(RuntimeError, match="closed"):
        g.net.input(b"\0" * 60)
