"""TCP address aliases for guest forwards on the gateway or DNS address (pure; I/O thread).

libslirp refuses a guest forward on its own gateway (10.0.2.2) or DNS
(10.0.2.3) address, yet TenBox's LLM proxy lives on 10.0.2.3:80. So such a
forward is registered with libslirp on a spare alias address of the guest
network, and this table rewrites the frames in between: guest TCP segments
to (10.0.2.3, 80) are readdressed to (alias, 80) on their way into libslirp,
and libslirp's segments from (alias, 80) are readdressed to (10.0.2.3, 80)
on their way to the guest. Only the matching (address, port) pairs are
touched; the IPv4 and TCP checksums are patched incrementally (RFC 1624),
so the cost is a few header reads per frame and nothing per payload byte.

Frames must carry complete checksums (libslirp verifies them anyway).
IP fragments other than the first are passed through untouched; guests do
not fragment TCP in practice (they do path-MTU discovery).
"""

from __future__ import annotations

import ipaddress
from typing import Dict, Union

ETH_HEADER = 14
ETHERTYPE_IPV4 = b"\x08\x00"
IPPROTO_TCP = 6
IP_SRC = ETH_HEADER + 12
IP_DST = ETH_HEADER + 16
IP_CSUM = ETH_HEADER + 10
TCP_MIN_HEADER = 20

Buffer = Union[bytes, bytearray, memoryview]


def checksum_replace32(csum: int, old: int, new: int) -> int:
    """An Internet checksum after one 32-bit word of the data went from old to new.

    RFC 1624 equation 3: HC' = ~(~HC + ~m + m'), one 16-bit half at a time.
    """
    s = (~csum & 0xFFFF) + (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _key(addr: int, port: int) -> int:
    return (addr << 16) | port


class TcpAliases:
    """(public address, port) ↔ (alias address, port) for guest TCP."""

    def __init__(self) -> None:
        self._to_alias: Dict[int, int] = {}  # key(public, port) -> alias
        self._to_public: Dict[int, int] = {}  # key(alias, port) -> public
        self._publics: Dict[int, int] = {}  # public -> number of ports
        self._aliases: Dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._to_alias)

    def add(self, public: ipaddress.IPv4Address, alias: ipaddress.IPv4Address, port: int) -> None:
        p, a = int(public), int(alias)
        if _key(p, port) in self._to_alias:
            raise ValueError("%s:%d already has an alias" % (public, port))
        self._to_alias[_key(p, port)] = a
        self._to_public[_key(a, port)] = p
        self._publics[p] = self._publics.get(p, 0) + 1
        self._aliases[a] = self._aliases.get(a, 0) + 1

    def remove(self, public: ipaddress.IPv4Address, port: int) -> bool:
        p = int(public)
        a = self._to_alias.pop(_key(p, port), None)
        if a is None:
            return False
        del self._to_public[_key(a, port)]
        for table, addr in ((self._publics, p), (self._aliases, a)):
            table[addr] -= 1
            if not table[addr]:
                del table[addr]
        return True

    def from_guest(self, frame: Buffer) -> Buffer:
        """The frame to give libslirp: readdressed to the alias if it matches."""
        return _rewrite(frame, IP_DST, 2, self._publics, self._to_alias)

    def to_guest(self, frame: Buffer) -> Buffer:
        """The frame to give the guest: readdressed from the alias if it matches."""
        return _rewrite(frame, IP_SRC, 0, self._aliases, self._to_public)


def _rewrite(frame: Buffer, addr_at: int, port_at: int, addrs: Dict[int, int], table: Dict[int, int]) -> Buffer:
    if len(frame) < ETH_HEADER + 20 + TCP_MIN_HEADER or frame[12:14] != ETHERTYPE_IPV4:
        return frame
    if frame[ETH_HEADER + 9] != IPPROTO_TCP:
        return frame
    addr = int.from_bytes(frame[addr_at:addr_at + 4], "big")
    if addr not in addrs:
        return frame
    vihl = frame[ETH_HEADER]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20:
        return frame
    if (frame[ETH_HEADER + 6] & 0x1F) or frame[ETH_HEADER + 7]:
        return frame  # not the first fragment: no TCP header here
    tcp = ETH_HEADER + ihl
    if len(frame) < tcp + TCP_MIN_HEADER:
        return frame
    port = (frame[tcp + port_at] << 8) | frame[tcp + port_at + 1]
    new = table.get(_key(addr, port))
    if new is None:
        return frame
    out = bytearray(frame)
    out[addr_at:addr_at + 4] = new.to_bytes(4, "big")
    ip_csum = (out[IP_CSUM] << 8) | out[IP_CSUM + 1]
    out[IP_CSUM:IP_CSUM + 2] = checksum_replace32(ip_csum, addr, new).to_bytes(2, "big")
    # The TCP checksum covers the pseudo-header, which holds both addresses.
    at = tcp + 16
    tcp_csum = (out[at] << 8) | out[at + 1]
    out[at:at + 2] = checksum_replace32(tcp_csum, addr, new).to_bytes(2, "big")
    return out
