"""The front end's guest memory, shared with us as file descriptors (vhost-user backend).

SET_MEM_TABLE hands over up to eight regions; each is mmap'ed once. Guest
physical addresses (in descriptors) and the front end's own virtual
addresses (in SET_VRING_ADDR) are both translated here, with the same
bounds checks as the worker's GuestMemory: a range must lie inside one region.
"""

from __future__ import annotations

import mmap
import os
from typing import List, NamedTuple, Sequence, Tuple

from tenbox_vmm.memory import GuestMemoryError


class _Region(NamedTuple):
    gpa: int
    size: int
    uva: int
    view: memoryview
    map: mmap.mmap


class VhostMemory:
    """Duck-types tenbox_vmm.memory.GuestMemory for the virtqueue and devices."""

    def __init__(self, regions: Sequence[Tuple[int, int, int, int, int]]) -> None:
        """regions: (guest_phys_addr, size, userspace_addr, mmap_offset, fd); takes ownership of the fds."""
        self.regions: List[_Region] = []
        fds = [r[4] for r in regions]
        try:
            for gpa, size, uva, offset, fd in regions:
                if size <= 0 or offset < 0:
                    raise GuestMemoryError("memory region %#x+%#x at offset %#x" % (gpa, size, offset))
                base = offset - offset % mmap.PAGESIZE
                try:
                    m = mmap.mmap(fd, size + (offset - base), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                  offset=base)
                except (OSError, ValueError, OverflowError) as e:
                    raise GuestMemoryError("cannot map region %#x+%#x: %s" % (gpa, size, e)) from None
                view = memoryview(m)[offset - base : offset - base + size]
                self.regions.append(_Region(gpa, size, uva, view, m))
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)  # a mapping outlives its fd
        # (start, end, view) per region, the hot path of every descriptor.
        self._by_gpa = [(r.gpa, r.gpa + r.size, r.view) for r in self.regions]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest memory [gpa, gpa+length); no copy."""
        if length >= 0:
            end = gpa + length
            for start, stop, view in self._by_gpa:
                if start <= gpa and end <= stop:
                    return view[gpa - start : end - start]
        raise GuestMemoryError("guest range %#x+%#x is outside the shared memory" % (gpa, length))

    def views(self, starts: List[int], ends: List[int]) -> List[memoryview]:
        """Views of [starts[i], ends[i]) (each end >= its start); one bounds check when all share a region."""
        if starts:
            lo, hi = min(starts), max(ends)
            for start, stop, view in self._by_gpa:
                if start <= lo and hi <= stop:
                    return [view[a - start : e - start] for a, e in zip(starts, ends)]
        return [self.view(a, e - a) for a, e in zip(starts, ends)]

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """The guest address of the front end's virtual address (vring addresses)."""
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size and length >= 0:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError("front-end range %#x+%#x is outside the shared memory" % (uva, length))

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def close(self) -> None:
        regions, self.regions = self.regions, []
        self._by_gpa = []
        for r in regions:
            try:
                r.view.release()
                r.map.close()
            except BufferError:
                pass  # a virtqueue still holds a view; the mapping goes with it
