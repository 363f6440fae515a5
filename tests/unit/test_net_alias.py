"""Alias rewriting readdresses only matching guest TCP and keeps every checksum valid."""

import ipaddress
import random

from tenbox_vmm.net.alias import TcpAliases, checksum_replace32
from tests import net_frames as nf

DNS = ipaddress.IPv4Address("10.0.2.3")
ALIAS = ipaddress.IPv4Address("10.0.2.253")
GW_MAC = bytes.fromhex("52550a000202")


def guest_tcp(dst="10.0.2.3", dport=80, payload=b"GET /"):
    return nf.eth(GW_MAC, nf.GUEST_MAC, nf.ETH_IPV4,
                  nf.tcp4(nf.GUEST_IP, dst, 40000, dport, 7, 9, nf.TCP_ACK | nf.TCP_PSH, payload))


def slirp_tcp(src="10.0.2.253", sport=80, payload=b"200 OK"):
    return nf.eth(nf.GUEST_MAC, GW_MAC, nf.ETH_IPV4,
                  nf.tcp4(src, nf.GUEST_IP, sport, 40000, 9, 12, nf.TCP_ACK, payload))


def test_incremental_checksum_equals_full_recompute():
    rng = random.Random(1624)
    for _ in range(2000):
        words = [rng.randrange(1 << 16) for _ in range(10)]
        data = b"".join(w.to_bytes(2, "big") for w in words)
        old = int.from_bytes(data[4:8], "big")
        new = rng.randrange(1 << 32)
        changed = data[:4] + new.to_bytes(4, "big") + data[8:]
        assert checksum_replace32(nf.checksum(data), old, new) == nf.checksum(changed)


def test_guest_segments_to_the_forwarded_port_go_to_the_alias_with_valid_checksums():
    a = TcpAliases()
    a.add(DNS, ALIAS, 80)
    out = a.from_guest(guest_tcp())
    f = nf.parse(bytes(out))
    assert f.ip.dst == "10.0.2.253" and f.tcp.dport == 80
    assert f.checksums_ok() and f.tcp.payload == b"GET /"


def test_replies_from_the_alias_reach_the_guest_from_the_public_address():
    a = TcpAliases()
    a.add(DNS, ALIAS, 80)
    f = nf.parse(bytes(a.to_guest(slirp_tcp())))
    assert f.ip.src == "10.0.2.3" and f.tcp.sport == 80 and f.checksums_ok()


def test_other_traffic_is_passed_through_untouched_and_uncopied():
    a = TcpAliases()
    a.add(DNS, ALIAS, 80)
    frames = [
        guest_tcp(dport=81),
        guest_tcp(dst="10.0.2.2"),
        nf.eth(GW_MAC, nf.GUEST_MAC, nf.ETH_IPV4, nf.udp4(nf.GUEST_IP, "10.0.2.3", 5353, 80, b"q")),
        nf.eth(GW_MAC, nf.GUEST_MAC, nf.ETH_ARP, nf.arp(1, nf.GUEST_MAC, nf.GUEST_IP, bytes(6), "10.0.2.3")),
        b"\x00" * 20,
    ]
    for frame in frames:
        assert a.from_guest(frame) is frame
    reply = slirp_tcp(sport=81)
    assert a.to_guest(reply) is reply
    mv = memoryview(guest_tcp(dport=81))
    assert a.from_guest(mv) is mv


def test_memoryview_input_is_copied_not_modified():
    a = TcpAliases()
    a.add(DNS, ALIAS, 80)
    original = bytearray(guest_tcp())
    out = a.from_guest(memoryview(original))
    assert nf.parse(bytes(out)).ip.dst == "10.0.2.253"
    assert nf.parse(bytes(original)).ip.dst == "10.0.2.3"


def test_non_first_fragments_are_left_alone():
    a = TcpAliases()
    a.add(DNS, ALIAS, 80)
    frame = bytearray(guest_tcp())
    frame[14 + 6:14 + 8] = (0x2000 | 185).to_bytes(2, "big")  # MF, offset 185*8
    assert a.from_guest(bytes(frame)) == bytes(frame)


def test_remove_stops_rewriting():
    a = TcpAliases()
    a.add(DNS, ALIAS, 80)
    assert a.remove(DNS, 80) and not a.remove(DNS, 80)
    frame = guest_tcp()
    assert a.from_guest(frame) is frame and not a
