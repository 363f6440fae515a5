"""Guest RAM and guest-physical address translation (worker).

RAM is one anonymous mapping, laid out in guest-physical regions by the
architecture: on x86-64 (`ram_regions`, the default) it stops below 4 GiB
at the 32-bit MMIO hole (MMIO_HOLE_START..4 GiB) and the rest continues at
4 GiB; arm64 puts it in one piece above its devices. Every access
from devices goes through `GuestMemory.view`, which checks the whole range
against one region and hands out a memoryview into the mapping: data paths
(virtqueues, disk and network I/O) read and write guest memory in place.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import List, NamedTuple, Optional, Tuple

MIB = 1 << 20
GIB = 1 << 30
MMIO_HOLE_START = 3 * GIB
MMIO_HOLE_END = 4 * GIB
CLEAR_CHUNK = 2 * MIB

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """A guest-physical range is not backed by RAM."""


class Region(NamedTuple):
    gpa: int
    size: int
    offset: int  # into the host mapping


def ram_regions(size: int) -> List[Region]:
    """Where `size` bytes of RAM appear in the guest-physical address space."""
    low = min(size, MMIO_HOLE_START)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(MMIO_HOLE_END, size - low, low))
    return regions


class GuestMemory:
    """The guest's RAM: an anonymous mapping and its guest-physical layout."""

    def __init__(self, size: int, mapping: Optional[mmap.mmap] = None,
                 regions: Optional[List[Region]] = None) -> None:
        """`size` bytes of zeroed RAM, or `mapping` (a snapshot's RAM, mapped MAP_PRIVATE from its file).

        `regions`: where the RAM appears to the guest; x86-64's `ram_regions(size)` if not given.
        """
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError("guest memory size must be a positive multiple of the page size")
        self.size = size
        self.regions = ram_regions(size) if regions is None else regions
        if sum(r.size for r in self.regions) != size:
            raise ValueError("RAM regions of %d bytes for %d bytes of RAM" % (sum(r.size for r in self.regions), size))
        self.file_backed = mapping is not None
        if mapping is not None:
            if len(mapping) != size:
                raise ValueError("a RAM mapping of %d bytes for %d bytes of RAM" % (len(mapping), size))
            self._map = mapping
        else:
            self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_DONTFORK"):
            # Worker helpers (fork/exec) must not copy guest RAM.
            self._map.madvise(mmap.MADV_DONTFORK)
        self._view = memoryview(self._map)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.host_address = ctypes.addressof(anchor)  # where the mapping starts: its line in smaps
        del anchor  # the mapping must not stay exported (close() would fail)

    def touched_bytes(self, smaps: str = "/proc/self/smaps") -> int:
        """Bytes of guest RAM with host pages behind them (Rss of the mapping): what the guest has used.

        A guest reset gives every page back (`clear`), so this is what it has
        touched since its last boot. 0 if /proc cannot be read.
        """
        start = b"%x-" % self.host_address
        try:
            with open(smaps, "rb") as f:
                inside = False
                for line in f:
                    if line[:1] in b"0123456789abcdef" and b"-" in line.split(b" ", 1)[0]:
                        inside = line.startswith(start)
                    elif inside and line.startswith(b"Rss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0

    @property
    def host_buffer(self) -> mmap.mmap:
        return self._map

    def slots(self) -> List[Tuple[int, int, int]]:
        """(guest address, size, offset in the host mapping) for each KVM memory slot."""
        return [(r.gpa, r.size, r.offset) for r in self.regions]

    def ram_end_below_4g(self) -> int:
        return self.regions[0].size

    def _offset(self, gpa: int, length: int) -> int:
        if length < 0:
            raise GuestMemoryError("negative length %d at %#x" % (length, gpa))
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.offset + (gpa - r.gpa)
        raise GuestMemoryError("guest range %#x+%#x is outside RAM" % (gpa, length))

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._offset(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM [gpa, gpa+length); no copy."""
        off = self._offset(gpa, length)
        return self._view[off : off + length]

    def views(self, starts: List[int], ends: List[int]) -> List[memoryview]:
        """Views of guest RAM [starts[i], ends[i]) (each end >= its start); one bounds check when all share a region."""
        if starts:
            lo, hi = min(starts), max(ends)
            for r in self.regions:
                if r.gpa <= lo and hi <= r.gpa + r.size:
                    base = r.gpa - r.offset
                    v = self._view
                    return [v[a - base : e - base] for a, e in zip(starts, ends)]
        return [self.view(a, e - a) for a, e in zip(starts, ends)]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack_from(self._view, self._offset(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack_from(self._view, self._offset(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack_from(self._view, self._offset(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self._view, self._offset(gpa, 2), value)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self._view, self._offset(gpa, 4), value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self._view, self._offset(gpa, 8), value)

    def clear(self) -> None:
        """Give back every page: the guest sees zeroed RAM, as after power-on.

        RAM mapped from a snapshot would read the file again after MADV_DONTNEED, so
        it is zeroed by writing (every page becomes the process's own: a reset of a
        restored VM costs its RAM once).
        """
        if not self.file_backed:
            self._map.madvise(mmap.MADV_DONTNEED)
            return
        zero = bytes(CLEAR_CHUNK)
        for off in range(0, self.size, CLEAR_CHUNK):
            n = min(CLEAR_CHUNK, self.size - off)
            self._view[off : off + n] = zero[:n]

    def close(self) -> None:
        """Unmap guest RAM; if views are still out (a device kept one), the last of them unmaps it."""
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass
