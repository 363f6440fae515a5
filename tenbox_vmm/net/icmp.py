"""ICMP "port unreachable" for a frame the guest sent to a port nothing serves (pure; I/O thread).

When the host guard (loopback.py) refuses a frame to the DNS address, the
guest hears at once that nothing is there, as from a host without that
service: ICMP destination unreachable, port unreachable (RFC 792; for IPv6,
RFC 4443 type 1 code 4), quoting the refused packet. A connect() in the
guest then fails with ECONNREFUSED instead of waiting out its retries.
"""

from __future__ import annotations

import struct
from typing import Optional, Union

Buffer = Union[bytes, bytearray, memoryview]

ETH_HEADER = 14
IPV6_HEADER = 40
IPV4_QUOTE_EXTRA = 8  # RFC 792: the IP header and the first 64 bits of its data
IPV6_MIN_MTU = 1280  # RFC 4443: as much of the packet as fits in the minimum MTU
TTL = 64
_IPV4 = struct.Struct("!BBHHHBBH4s4s")


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def port_unreachable(frame: Buffer) -> Optional[bytes]:
    """The Ethernet frame that answers `frame` (IPv4 or IPv6) with port unreachable; None for anything else."""
    frame = bytes(frame)
    eth = frame[6:12] + frame[0:6] + frame[12:14]  # back to the sender
    if frame[12:14] == b"\x08\x00" and len(frame) >= ETH_HEADER + 20:
        packet = frame[ETH_HEADER:]
        ihl = (packet[0] & 0x0F) * 4
        total = min(int.from_bytes(packet[2:4], "big"), len(packet))
        quote = packet[:min(total, ihl + IPV4_QUOTE_EXTRA)]
        icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quote
        icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
        header = _IPV4.pack(0x45, 0, 20 + len(icmp), 0, 0, TTL, 1, 0, packet[16:20], packet[12:16])
        header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
        return eth + header + icmp
    if frame[12:14] == b"\x86\xdd" and len(frame) >= ETH_HEADER + IPV6_HEADER:
        packet = frame[ETH_HEADER:]
        src, dst = packet[24:40], packet[8:24]  # the answer comes from the address asked
        quote = packet[:IPV6_MIN_MTU - IPV6_HEADER - 8]
        icmp = struct.pack("!BBHI", 1, 4, 0, 0) + quote
        pseudo = src + dst + struct.pack("!IxxxB", len(icmp), 58)
        icmp = icmp[:2] + struct.pack("!H", internet_checksum(pseudo + icmp)) + icmp[4:]
        header = struct.pack("!IHBB", 6 << 28, len(icmp), 58, TTL) + src + dst
        return eth + header + icmp
    return None
