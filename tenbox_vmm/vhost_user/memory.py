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
        try:
            for gpa, size, uva, offset, fd in regions:
                page = mmap.PAGESIZE
                base = offset - offset % page
                m = mmap.mmap(fd, size + (offset - base), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=base)
                os.close(fd)
                view = memoryview(m)[offset - base : offset - base + size]
                self.regions.append(_Region(gpa, size, uva, view, m))
        except BaseException:
            self.close()
            raise

    def _find(self, addr: int, length: int, key: str) -> Tuple[_Region, int]:
        if length < 0:
            raise GuestMemoryError("negative length")
        for r in self.regions:
            start = getattr(r, key)
            if start <= addr and addr + length <= start + r.size:
                return r, addr - start
        raise GuestMemoryError("%s range %#x+%#x is outside the shared memory" % (key, addr, length))

    def view(self, gpa: int, length: int) -> memoryview:
        r, off = self._find(gpa, length, "gpa")
        return r.view[off : off + length]

    def uva_to_gpa(self, uva: int, length: int) -> int:
        r, off = self._find(uva, length, "uva")
        return r.gpa + off

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def close(self) -> None:
        regions, self.regions = self.regions, []
        for r in regions:
            try:
                r.view.release()
                r.map.close()
            except BufferError:
                pass  # a virtqueue still holds a view; the mapping goes with it
