"""Guest frames addressed to the host's own loopback (pure; I/O thread).

libslirp's disable_host_loopback stops the gateway address (10.0.2.2) and
the broadcast address from being mapped to 127.0.0.1. It does not stop a
guest that writes 127.0.0.1 (or 0.0.0.0, which connect() treats as this
host, or ::1) into the destination field itself: libslirp connects such a
flow like any other, straight to the host's loopback services. With the
security default on, SlirpNetwork drops those frames before libslirp sees
them. Cost: two header bytes compared per frame.
"""

from __future__ import annotations

from typing import Union

ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"
_IPV4_DST = 14 + 16
_IPV6_DST = 14 + 24
_ANY4 = b"\0\0\0\0"
_LOOP6 = bytes(15) + b"\x01"
_ANY6 = bytes(16)
_V4MAPPED = bytes(10) + b"\xff\xff"

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
