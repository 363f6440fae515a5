"""A bounded LRU cache of qcow2 metadata slices, for L2 tables and refcount blocks (worker).

Tables are cached in slices of `slice_bytes` (4 KiB, or the whole cluster
when clusters are smaller), keyed by their offset in the image file, as
QEMU's l2-cache-entry-size does: a 2 MiB-cluster image does not pull 2 MiB
per table into memory. Modified slices are marked dirty and written back
by the owner's ordered flush; when a dirty slice must be evicted, the
owner's `on_dirty_evict(offset)` makes it clean first (for L2 slices that
is a full ordered metadata sync, so eviction never breaks write ordering).
Callers never keep a slice across another `get`: it may be evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Set

SLICE_BYTES = 4096


class SliceCache:
    def __init__(self, file, slice_bytes: int, capacity: int, on_dirty_evict: Callable[[int], None]) -> None:
        self._file = file
        self.slice_bytes = slice_bytes
        self.capacity = max(2, capacity)
        self._slices: "OrderedDict[int, bytearray]" = OrderedDict()
        self._dirty: Set[int] = set()
        self._on_dirty_evict = on_dirty_evict

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def __len__(self) -> int:
        return len(self._slices)

    def get(self, offset: int) -> bytearray:
        s = self._slices.get(offset)
        if s is not None:
            self._slices.move_to_end(offset)
            return s
        self._make_room()
        s = self._file.read(offset, self.slice_bytes)
        self._slices[offset] = s
        return s

    def put(self, offset: int, data: bytearray, dirty: bool = False) -> None:
        """Insert a slice whose contents are known (a table just created)."""
        if offset not in self._slices:
            self._make_room()
        self._slices[offset] = data
        self._slices.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    def _make_room(self) -> None:
        while len(self._slices) >= self.capacity:
            victim = next(iter(self._slices))
            if victim in self._dirty:
                self._on_dirty_evict(victim)
                if victim in self._dirty:  # the owner chose to write just this one
                    self.write_one(victim)
            del self._slices[victim]

    def write_one(self, offset: int) -> None:
        self._file.write(offset, self._slices[offset])
        self._dirty.discard(offset)

    def write_dirty(self) -> None:
        """Write every dirty slice, adjacent ones in one pwritev."""
        if not self._dirty:
            return
        offs = sorted(self._dirty)
        sb = self.slice_bytes
        i = 0
        while i < len(offs):
            j = i
            while j + 1 < len(offs) and offs[j + 1] == offs[j] + sb:
                j += 1
            views: List[memoryview] = [memoryview(self._slices[o]) for o in offs[i:j + 1]]
            self._file.writev(offs[i], views)
            for o in offs[i:j + 1]:
                self._dirty.discard(o)
            i = j + 1

    def drop_range(self, start: int, end: int) -> None:
        """Forget clean slices in [start, end) (a cluster is getting new contents)."""
        for off in [o for o in self._slices if start <= o < end]:
            if off in self._dirty:  # pragma: no cover - owners never reuse a cluster with dirty slices
                raise AssertionError("dropping a dirty metadata slice at %#x" % off)
            del self._slices[off]

    def clear(self) -> None:
        if self._dirty:  # pragma: no cover
            raise AssertionError("clearing a cache with dirty slices")
        self._slices.clear()

