"""Guest frames addressed to the host's own loopback, directly or through the DNS address (pure; I/O thread).

libslirp's disable_host_loopback stops the gateway address (10.0.2.2) and
the broadcast address from being mapped to 127.0.0.1. It does not stop a
guest that writes 127.0.0.1 (or 0.0.0.0, which connect() treats as this
host, or ::1) into the destination field itself: libslirp connects such a
flow like any other, straight to the host's loopback services. With the
security default on, SlirpNetwork drops those frames before libslirp sees
them. Cost: two header bytes compared per frame.

The DNS address (10.0.2.3, fec0::3) is the other way in: libslirp connects
what the guest sends there to the first nameserver of the host's
resolv.conf, which is often on loopback (dnsmasq and unbound on 127.0.0.1,
systemd-resolved on 127.0.0.53). libslirp 4.7 (measured: Debian 12) takes
only port 53 there; the releases of Debian 11 (4.4) and Ubuntu 20.04 (4.1)
are not tested here, so the guard does not rely on it. `HostGuard` lets only
DNS through to that address (TCP and UDP to port 53, and ICMP, which
libslirp answers itself): any other transport or port is kept from libslirp,
whatever resolv.conf says and whichever libslirp runs, and answered with
ICMP port unreachable (icmp.py), so that the guest hears at once that
nothing is there, as libslirp 4.7 tells it for TCP.

`HostGuard.verdict` makes both checks; an IPv4 frame costs it one struct
unpack of the ethertype and destination and integer compares (~0.2 us, less
than the loopback check alone took with slices of the frame).
"""

from __future__ import annotations

import struct
from typing import Union

ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"
_IPV4_DST = 14 + 16
_IPV6_DST = 14 + 24
_ANY4 = b"\0\0\0\0"
_LOOP6 = bytes(15) + b"\x01"
_ANY6 = bytes(16)
_V4MAPPED = bytes(10) + b"\xff\xff"
_IPV4 = 14  # the IP header after the Ethernet header
_IPV6_NEXT = 14 + 6
_IPV6_PAYLOAD = 14 + 40
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
DNS_PORT = b"\x00\x35"  # 53, as it is on the wire
_HEAD = struct.Struct("!12xH16xI")  # the ethertype and, for IPv4, the destination address
_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD

Buffer = Union[bytes, bytearray, memoryview]


def targets_host_loopback(frame: Buffer) -> bool:
    """Whether an IPv4/IPv6 frame's destination is this host's loopback or 'any' address."""
    ethertype = frame[12:14]
    if ethertype == ETHERTYPE_IPV4:
        if len(frame) < _IPV4_DST + 4:
            return False
        return frame[_IPV4_DST] == 127 or frame[_IPV4_DST:_IPV4_DST + 4] == _ANY4
    if ethertype == ETHERTYPE_IPV6:
        if len(frame) < _IPV6_DST + 16:
            return False
        dst = bytes(frame[_IPV6_DST:_IPV6_DST + 16])
        if dst == _LOOP6 or dst == _ANY6:
            return True
        return dst[:12] == _V4MAPPED and (dst[12] == 127 or dst[12:] == _ANY4)
    return False


PASS, DROP, UNREACHABLE = 0, 1, 2  # HostGuard's verdicts


class HostGuard:
    """Refuses guest frames to the host's loopback (DROP), and frames to the DNS address that are not DNS (UNREACHABLE)."""

    def __init__(self, dns4: bytes, dns6: bytes) -> None:
        self._dns4 = int.from_bytes(dns4, "big")
        self._dns6 = bytes(dns6)

    def verdict(self, frame: Buffer) -> int:
        """PASS, DROP (the host's loopback or 'any' address) or UNREACHABLE (the DNS address, not DNS)."""
        if len(frame) < _HEAD.size:
            return DROP if targets_host_loopback(frame) else PASS
        ethertype, dst = _HEAD.unpack_from(frame)
        if ethertype == _ETH_IPV4:
            if dst >> 24 == 127 or dst == 0:
                return DROP  # 127.0.0.0/8, 0.0.0.0
            return UNREACHABLE if dst == self._dns4 and self._not_dns4(frame) else PASS
        if ethertype == _ETH_IPV6:
            if targets_host_loopback(frame):
                return DROP
            return UNREACHABLE if self._not_dns6(frame) else PASS
        return PASS

    @staticmethod
    def _not_dns4(frame: Buffer) -> bool:
        """An IPv4 frame to the DNS address: True unless TCP/UDP to port 53 or ICMP."""
        proto = frame[_IPV4 + 9]
        if proto == IPPROTO_ICMP:
            return False
        if proto != IPPROTO_TCP and proto != IPPROTO_UDP:
            return True
        if (frame[_IPV4 + 6] & 0x1F) or frame[_IPV4 + 7]:
            return False  # a later fragment: bytes 8 on of the datagram; its first fragment holds the port
        port = _IPV4 + (frame[_IPV4] & 0x0F) * 4 + 2
        # Within the IP packet, not the Ethernet padding after it.
        end = _IPV4 + int.from_bytes(frame[_IPV4 + 2:_IPV4 + 4], "big")
        return port + 2 > min(end, len(frame)) or frame[port:port + 2] != DNS_PORT

    def _not_dns6(self, frame: Buffer) -> bool:
        """True for an IPv6 frame to the DNS address other than TCP/UDP to port 53 or ICMPv6."""
        if len(frame) < _IPV6_PAYLOAD or frame[_IPV6_DST:_IPV6_DST + 16] != self._dns6:
            return False
        nxt = frame[_IPV6_NEXT]
        if nxt == IPPROTO_ICMPV6:
            return False
        if nxt != IPPROTO_TCP and nxt != IPPROTO_UDP:
            return True  # extension headers and fragments are not how a resolver is asked
        port = _IPV6_PAYLOAD + 2
        return len(frame) < port + 2 or frame[port:port + 2] != DNS_PORT
