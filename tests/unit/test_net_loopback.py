"""Frames a guest addresses to the host's own loopback, or to the DNS address for anything but DNS, are recognised; nothing else is."""

import pytest

from tenbox_vmm.net.icmp import port_unreachable
from tenbox_vmm.net.loopback import DROP, PASS, UNREACHABLE, HostGuard, targets_host_loopback
from tenbox_vmm.net.udpfwd import ipv4_header_checksum
from tests import net_frames as nf

MAC = bytes.fromhex("52550a000202")
GUARD = HostGuard(nf.ip4("10.0.2.3"), nf.ip6("fec0::3"))  # both checks, as SlirpNetwork makes them


def v4(dst):
    return nf.eth(MAC, nf.GUEST_MAC, nf.ETH_IPV4, nf.tcp4(nf.GUEST_IP, dst, 1000, 22, 1, 0, nf.TCP_SYN))


def v6(dst):
    return nf.eth(MAC, nf.GUEST_MAC, nf.ETH_IPV6, nf.icmp6("fec0::15", dst, 128, 0, b"\0\0\0\0"))


@pytest.mark.parametrize("dst", ["127.0.0.1", "127.1.2.3", "0.0.0.0"])
def test_ipv4_loopback_and_any_destinations_are_caught(dst):
    assert targets_host_loopback(v4(dst))
    assert targets_host_loopback(memoryview(v4(dst)))
    assert GUARD.verdict(v4(dst)) == GUARD.verdict(memoryview(v4(dst))) == DROP


@pytest.mark.parametrize("dst", ["::1", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"])
def test_ipv6_loopback_any_and_mapped_destinations_are_caught(dst):
    assert targets_host_loopback(v6(dst))
    assert GUARD.verdict(v6(dst)) == DROP


@pytest.mark.parametrize("frame", [
    v4("10.0.2.2"), v4("10.0.2.3"), v4("192.0.2.10"), v4("255.255.255.255"), v4("128.0.0.1"),
    v6("fec0::2"), v6("ff02::1"), v6("::ffff:10.0.2.2"), v6("::2"),
    nf.eth(nf.BROADCAST_MAC, nf.GUEST_MAC, nf.ETH_ARP, nf.arp(1, nf.GUEST_MAC, nf.GUEST_IP, bytes(6), "127.0.0.1")),
    nf.dhcp_frame(nf.dhcp(nf.DHCP_DISCOVER, nf.GUEST_MAC, 1)),
    b"\0" * 14,
])
def test_everything_else_passes(frame):
    assert not targets_host_loopback(frame)


def test_udp_forward_ip_header_checksum_verifies():
    packet = nf.udp4("10.0.2.2", "10.0.2.15", 1, 2, b"x")
    header = packet[:10] + b"\0\0" + packet[12:20]
    assert ipv4_header_checksum(header) == int.from_bytes(packet[10:12], "big")


# -- the DNS address: only DNS gets through ---------------------------------------

SLAAC = "fec0::5055:55ff:fe12:3456"


def e4(packet):
    return nf.eth(MAC, nf.GUEST_MAC, nf.ETH_IPV4, packet)


def e6(packet):
    return nf.eth(MAC, nf.GUEST_MAC, nf.ETH_IPV6, packet)


def _fragment(packet, offset_units, more):
    """The IPv4 packet with its fragment field set (checksum left stale: the guard does not read it)."""
    field = (0x2000 if more else 0) | offset_units
    return packet[:6] + field.to_bytes(2, "big") + packet[8:]


@pytest.mark.parametrize("frame", [
    e4(nf.udp4(nf.GUEST_IP, "10.0.2.3", 40000, 53, nf.dns_query(1, "example.org"))),
    e4(nf.tcp4(nf.GUEST_IP, "10.0.2.3", 40000, 53, 1, 0, nf.TCP_SYN)),
    e4(nf.icmp4_echo(nf.GUEST_IP, "10.0.2.3", 1, 1, b"ping")),
    e4(_fragment(nf.udp4(nf.GUEST_IP, "10.0.2.3", 40000, 9999, b"x" * 64), 2, False)),  # not the first fragment
    e4(nf.udp4(nf.GUEST_IP, "10.0.2.2", 40000, 9999, b"x")),  # other addresses are not its business
    e4(nf.tcp4(nf.GUEST_IP, "192.0.2.1", 40000, 22, 1, 0, nf.TCP_SYN)),
    e6(nf.udp6(SLAAC, "fec0::3", 40000, 53, nf.dns_query(1, "example.org"))),
    e6(nf.tcp6(SLAAC, "fec0::3", 40000, 53, 1, 0, nf.TCP_SYN)),
    e6(nf.icmp6(SLAAC, "fec0::3", 128, 0, b"\0\0\0\0")),
    e6(nf.udp6(SLAAC, "fec0::2", 40000, 9999, b"x")),
    nf.dhcp_frame(nf.dhcp(nf.DHCP_DISCOVER, nf.GUEST_MAC, 1)),
    b"\0" * 14,
])
def test_dns_and_other_addresses_pass_the_dns_guard(frame):
    assert GUARD.verdict(frame) == GUARD.verdict(memoryview(frame)) == PASS


@pytest.mark.parametrize("frame", [
    e4(nf.udp4(nf.GUEST_IP, "10.0.2.3", 40000, 9999, b"x")),
    e4(nf.tcp4(nf.GUEST_IP, "10.0.2.3", 40000, 22, 1, 0, nf.TCP_SYN)),
    e4(nf.tcp4(nf.GUEST_IP, "10.0.2.3", 53, 80, 1, 0, nf.TCP_SYN)),  # the source port is not the point
    e4(nf.ipv4(nf.GUEST_IP, "10.0.2.3", 132, b"\0" * 16)),  # SCTP
    e4(_fragment(nf.udp4(nf.GUEST_IP, "10.0.2.3", 40000, 9999, b"x" * 64), 0, True)),  # a first fragment
    e4(nf.ipv4(nf.GUEST_IP, "10.0.2.3", nf.PROTO_UDP, b"\x9c\x40")),  # no room for the port; padded below
    e6(nf.udp6(SLAAC, "fec0::3", 40000, 9999, b"x")),
    e6(nf.tcp6(SLAAC, "fec0::3", 40000, 8080, 1, 0, nf.TCP_SYN)),
    e6(nf.ipv6(SLAAC, "fec0::3", 44, b"\x11\0\0\0\0\0\0\0" + b"\x9c\x40\x00\x35" + bytes(4))),  # a fragment header
])
def test_anything_but_dns_to_the_dns_address_is_refused(frame):
    assert GUARD.verdict(frame) == UNREACHABLE
    # Ethernet pads short frames to 60 bytes: padding that reads as port 53 is not the packet.
    padded = frame + (b"\x00\x35" * 30)[:max(0, 60 - len(frame))]
    assert GUARD.verdict(padded) == UNREACHABLE


@pytest.mark.parametrize("frame", [
    e4(nf.tcp4(nf.GUEST_IP, "10.0.2.3", 40000, 22, 1, 0, nf.TCP_SYN, options=nf.MSS_OPTION)),
    e4(nf.udp4(nf.GUEST_IP, "10.0.2.3", 40000, 9999, b"knock" * 100)),
    e6(nf.udp6(SLAAC, "fec0::3", 40000, 9999, b"knock" * 400)),
], ids=["tcp4", "udp4", "udp6"])
def test_a_refused_frame_is_answered_with_port_unreachable_quoting_it(frame):
    """The guest hears at once that nothing is there: ICMP port unreachable from the address it asked."""
    sent = nf.parse(frame)
    answer = nf.parse(port_unreachable(memoryview(frame)))
    assert answer.checksums_ok()
    assert (answer.dst, answer.src) == (sent.src, sent.dst)
    assert (answer.ip.src, answer.ip.dst) == (sent.ip.dst, sent.ip.src)
    if sent.ip.version == 4:
        assert (answer.icmp.type, answer.icmp.code) == (3, 3)
        ihl = (frame[14] & 0x0F) * 4
        assert answer.icmp.body[4:] == frame[14:14 + ihl + 8]  # the header and 64 bits of data
    else:
        assert (answer.icmp.type, answer.icmp.code) == (1, 4)
        assert answer.icmp.body[4:] == frame[14:14 + 1280 - 48]  # as much as fits in IPv6's minimum MTU
        assert len(answer.raw) - 14 == 1280


def test_only_ip_frames_get_an_answer():
    assert port_unreachable(nf.eth(nf.BROADCAST_MAC, nf.GUEST_MAC, nf.ETH_ARP,
                                   nf.arp(1, nf.GUEST_MAC, nf.GUEST_IP, bytes(6), "10.0.2.3"))) is None
