"""A minimal ACPI Machine Language encoder for the DSDT tenbox builds (worker).

Only what the DSDT needs: names, integers, strings, packages, buffers,
scopes, devices, resource templates, and methods whose body is Notify
(ACPI 6.x, chapters 6.4 and 20).
"""

from __future__ import annotations

import struct
from typing import Iterable, Union

ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
METHOD_OP = 0x14
NOTIFY_OP = 0x86
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = 0x5C
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F

Value = Union[int, str, bytes]


def pkg_length(payload_len: int) -> bytes:
    """PkgLength encoding for a payload; the encoded length counts its own bytes."""
    if payload_len + 1 < 0x40:
        return bytes([payload_len + 1])
    for extra in (1, 2, 3):
        total = payload_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError("AML package too large: %d bytes" % payload_len)


def name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError("bad ACPI name segment %r" % seg)
    if not all(ch.isupper() or ch.isdigit() or ch == "_" for ch in seg):
        raise ValueError("bad ACPI name segment %r" % seg)
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """Encode `\\_SB_.VR00`, `_HID`, ... as an AML NameString."""
    prefix = b""
    if path.startswith("\\"):
        prefix = bytes([ROOT_CHAR])
        path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if not segs:
        return prefix + b"\0"
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError("AML integer out of range: %d" % value)
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("AML strings cannot hold NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> bytes:
    """Compressed EISA ID, e.g. EisaId("PNP0501"), as an AML integer."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError("bad EISA id %r" % text)
    mfg = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    prod = int(text[3:], 16)
    raw = struct.pack(">HH", mfg, prod)
    return integer(struct.unpack("<I", raw)[0])


def _value(v: Value) -> bytes:
    if isinstance(v, bytes):
        return v  # already encoded
    if isinstance(v, int):
        return integer(v)
    return string(v)


def name(path: str, value: Value) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + _value(value)


def package(items: Iterable[Value]) -> bytes:
    items = list(items)
    if len(items) > 255:
        raise ValueError("AML package with more than 255 elements")
    body = bytes([len(items)]) + b"".join(_value(i) for i in items)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, args: int, *terms: bytes) -> bytes:
    """Method (path, args, NotSerialized) { terms }."""
    if not 0 <= args <= 7:
        raise ValueError("an AML method takes 0..7 arguments, not %d" % args)
    body = name_string(path) + bytes([args]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def notify(path: str, value: int) -> bytes:
    """Notify (path, value)."""
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


# Resource descriptors (ACPI 6.x section 6.4) --------------------------------

END_TAG = b"\x79\x00"  # checksum 0: "treat as correct"


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length)."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags () {irq}: an ISA edge, active-high interrupt."""
    return struct.pack("<BH", 0x22, 1 << irq)


def memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, size)


def extended_interrupt(gsi: int, edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsi}."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    return buffer(b"".join(descriptors) + END_TAG)
