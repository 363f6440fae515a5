"""Frames a guest addresses to the host's own loopback are recognised; nothing else is."""

import pytest

from tenbox_vmm.net.loopback import targets_host_loopback
from tenbox_vmm.net.udpfwd import ipv4_header_checksum
from tests import net_frames as nf

MAC = bytes.fromhex("52550a000202")


def v4(dst):
    return nf.eth(MAC, nf.GUEST_MAC, nf.ETH_IPV4, nf.tcp4(nf.GUEST_IP, dst, 1000, 22, 1, 0, nf.TCP_SYN))


def v6(dst):
    return nf.eth(MAC, nf.GUEST_MAC, nf.ETH_IPV6, nf.icmp6("fec0::15", dst, 128, 0, b"\0\0\0\0"))


@pytest.mark.parametrize("dst", ["127.0.0.1", "127.1.2.3", "0.0.0.0"])
def test_ipv4_loopback_and_any_destinations_are_caught(dst):
    assert targets_host_loopback(v4(dst))
    assert targets_host_loopback(memoryview(v4(dst)))


@pytest.mark.parametrize("dst", ["::1", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"])
def test_ipv6_loopback_any_and_mapped_destinations_are_caught(dst):
    assert targets_host_loopback(v6(dst))


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
