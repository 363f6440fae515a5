"""Port-I/O and MMIO buses: route a vCPU's access to the device that decodes it (worker).

An access nobody decodes reads as all ones and its writes are dropped, as on
a PC; it is logged once per address at debug level and never stops the VM.
"""

from __future__ import annotations

import bisect
import logging
from typing import Dict, List, Protocol, Set, Tuple

log = logging.getLogger("tenbox.bus")


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflict(ValueError):
    """Two devices claim the same addresses."""


class _Unhandled:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.seen: Set[int] = set()

    def note(self, addr: int, what: str) -> None:
        if addr not in self.seen and len(self.seen) < 4096:
            self.seen.add(addr)
            log.debug("unhandled %s %s at %#x", self.kind, what, addr)


class PioBus:
    """The 64 KiB x86 I/O port space; a direct table, one lookup per access."""

    def __init__(self) -> None:
        self._ports: Dict[int, Tuple[Device, int]] = {}
        self._unhandled = _Unhandled("port")

    def register(self, base: int, length: int, device: Device, offset: int = 0) -> None:
        """Ports base..base+length-1 reach `device` at offsets offset..offset+length-1."""
        if base < 0 or length <= 0 or base + length > 0x10000:
            raise ValueError("bad port range %#x+%d" % (base, length))
        clash = [p for p in range(base, base + length) if p in self._ports]
        if clash:
            raise BusConflict("port %#x is already taken" % clash[0])
        for port in range(base, base + length):
            self._ports[port] = (device, base - offset)

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            self._unhandled.note(port, "read")
            return (1 << (8 * size)) - 1
        device, base = entry
        return device.read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is None:
            self._unhandled.note(port, "write")
            return
        device, base = entry
        device.write(port - base, size, value)


class MmioBus:
    """Guest-physical MMIO ranges, found by bisection."""

    def __init__(self) -> None:
        self._starts: List[int] = []
        self._ranges: List[Tuple[int, int, Device]] = []
        self._unhandled = _Unhandled("mmio")

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise ValueError("bad MMIO range %#x+%d" % (base, length))
        i = bisect.bisect_right(self._starts, base)
        if i > 0:
            pbase, plen, _ = self._ranges[i - 1]
            if pbase + plen > base:
                raise BusConflict("MMIO %#x is already taken" % base)
        if i < len(self._starts) and self._starts[i] < base + length:
            raise BusConflict("MMIO %#x+%#x overlaps %#x" % (base, length, self._starts[i]))
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, length, device))

    def _find(self, addr: int, size: int):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, length, device = self._ranges[i]
            if addr + size <= base + length:
                return device, addr - base
        return None, 0

    def read(self, addr: int, size: int) -> int:
        device, offset = self._find(addr, size)
        if device is None:
            self._unhandled.note(addr, "read")
            return (1 << (8 * size)) - 1
        return device.read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        device, offset = self._find(addr, size)
        if device is None:
            self._unhandled.note(addr, "write")
            return
        device.write(offset, size, value)
