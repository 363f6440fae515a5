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
import errno
import mmap
import os
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

# /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst): 8 bytes a page, whose top byte holds
# bit 63 "present", 62 "swapped" and 61 "file page or shared anonymous". A page of a private mapping
# with neither of the first two has never been written (or was given back): it reads as zeros.
PAGEMAP = "/proc/self/pagemap"
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 0x80, 0x40, 0x20
_PM_READ_PAGES = 1 << 15  # pagemap entries read at once: 256 KiB of them for 128 MiB of RAM
# Top byte -> 1 where the page may hold the process's own data: for anonymous RAM any page behind it
# or swapped out; for RAM mapped from a file, those that are not the file's (the file is asked itself).
_ANON_DATA = bytes(1 if b & (_PM_PRESENT | _PM_SWAPPED) else 0 for b in range(256))
_COPIED_DATA = bytes(1 if b & (_PM_PRESENT | _PM_SWAPPED) and not b & _PM_FILE else 0 for b in range(256))
_pagemap_fd: Optional[int] = None


def keep_pagemap(fd: int) -> None:
    """Use `fd`, /proc/self/pagemap opened ahead, for every later `data_chunks`: the sandbox opens it before
    the worker stops being dumpable (its /proc entries then belong to root). Without it each call opens
    the file."""
    global _pagemap_fd
    _pagemap_fd = fd


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
                 regions: Optional[List[Region]] = None, backing: Optional[Tuple[int, int]] = None) -> None:
        """`size` bytes of zeroed RAM, or `mapping` (a snapshot's RAM, mapped MAP_PRIVATE from its file).

        `regions`: where the RAM appears to the guest; x86-64's `ram_regions(size)` if not given.
        `backing`: with `mapping`, (a descriptor of its file, where RAM starts in it), which the memory
        now owns (`data_chunks` asks the file where its data is).
        """
        self._backing = backing
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

    def data_chunks(self, chunk: int) -> Optional[bytearray]:
        """One byte per `chunk` bytes of RAM (a multiple of the page size): 0 where every page surely reads
        as zeros, 1 where the guest may have left data. None if the kernel does not say (no pagemap).

        Surely zeros: a page never written (no page behind it and none swapped out, by pagemap), or,
        for RAM mapped from a snapshot, a page still the file's where the file has a hole. What the
        guest writes after the call is not in it: a live snapshot has KVM log writes first.
        """
        if chunk <= 0 or chunk % mmap.PAGESIZE:
            raise ValueError("chunks must be whole pages")
        if self.file_backed and self._backing is None:
            return None  # the file's data cannot be told from its holes
        per = chunk // mmap.PAGESIZE
        pages = self.size // mmap.PAGESIZE
        out = bytearray(-(-pages // per))
        table = _COPIED_DATA if self.file_backed else _ANON_DATA
        step = max(per, _PM_READ_PAGES // per * per)
        first = self.host_address // mmap.PAGESIZE
        own = _pagemap_fd is None
        try:
            fd = os.open(PAGEMAP, os.O_RDONLY | os.O_CLOEXEC) if own else _pagemap_fd
            try:
                for p in range(0, pages, step):
                    n = min(step, pages - p)
                    entries = os.pread(fd, 8 * n, 8 * (first + p))
                    if len(entries) != 8 * n:
                        return None
                    flags = entries[7::8].translate(table)
                    at = flags.find(1)
                    while at >= 0:  # from one chunk with data to the next
                        out[(p + at) // per] = 1
                        at = flags.find(1, (at // per + 1) * per)
            finally:
                if own:
                    os.close(fd)
            if self._backing is not None and not self._file_data(out, chunk):
                return None
        except OSError:
            return None
        return out

    def _file_data(self, out: bytearray, chunk: int) -> bool:
        """Mark in `out` the chunks where the backing file has data (SEEK_DATA); False if it cannot say."""
        assert self._backing is not None
        fd, base = self._backing
        pos, end = base, base + self.size
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return True
                return False
            if data >= end:
                return True
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            lo, hi = (data - base) // chunk, (hole - 1 - base) // chunk + 1
            out[lo:hi] = b"\x01" * (hi - lo)
            pos = hole
        return True

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

    def offset(self, gpa: int, length: int) -> int:
        """Where guest RAM [gpa, gpa+length) lies in the host mapping; GuestMemoryError if it is not RAM."""
        return self._offset(gpa, length)

    def offset_of(self, view: memoryview) -> int:
        """Where a non-empty view that view() or views() handed out starts in the host mapping."""
        anchor = ctypes.c_char.from_buffer(view)
        try:
            return ctypes.addressof(anchor) - self.host_address
        finally:
            del anchor  # the mapping must not stay exported

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
        if self._backing is not None:
            os.close(self._backing[0])
            self._backing = None
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass
