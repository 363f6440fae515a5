"""qcow2 cluster allocation: refcount table, refcount blocks of any width, growth (worker).

Refcounts are 1..64 bits wide (refcount_order 0..6); sub-byte entries are
packed least significant bits first. The refcount table is held in memory
(QEMU caps it at 8 MiB); refcount blocks go through a `SliceCache` of
REFCOUNT_CACHE_BYTES.

Ordering rules kept here (the image's flush keeps the others):
  * a new refcount block is written and fdatasync'd before the table entry
    that points to it is written;
  * a grown refcount table (with the blocks that count it) is written and
    fdatasync'd before the header points to it, the header update is one
    12-byte write of offset and size, and the old table is freed only after
    that write is durable;
  * refcount blocks themselves may be written at any time: increments only
    ever make on-disk refcounts too high (a leak), and decrements are
    applied by the image only after the L2 change that dropped the
    reference is durable.
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from typing import Iterable, List, Set, Tuple

from tenbox_vmm.disk.errors import DiskCorrupt, DiskIOError
from tenbox_vmm.disk.qcow2 import format as F
from tenbox_vmm.disk.qcow2.cache import SLICE_BYTES, SliceCache

REFCOUNT_CACHE_BYTES = 256 << 10  # 16-bit refcounts: maps 8 GiB of 64 KiB clusters
TABLE_GROWTH_NUM, TABLE_GROWTH_DEN = 3, 2  # grow the refcount table by half at a time

_U64 = struct.Struct(">Q")
_TABLE_FIELDS = struct.Struct(">QI")


def get_entry(buf: bytearray, i: int, bits: int) -> int:
    if bits == 16:
        return (buf[2 * i] << 8) | buf[2 * i + 1]
    if bits >= 8:
        n = bits >> 3
        return int.from_bytes(buf[i * n:(i + 1) * n], "big")
    per = 8 // bits
    return (buf[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)


def set_entry(buf: bytearray, i: int, bits: int, value: int) -> None:
    if bits >= 8:
        n = bits >> 3
        buf[i * n:(i + 1) * n] = value.to_bytes(n, "big")
        return
    per = 8 // bits
    shift = (i % per) * bits
    j = i // per
    buf[j] = (buf[j] & ~(((1 << bits) - 1) << shift) & 0xFF) | (value << shift)


def load_table(raw: bytes) -> array:
    table = array("Q")
    table.frombytes(raw)
    if table.itemsize != 8:  # pragma: no cover - 'Q' is 8 bytes on every Linux ABI
        raise AssertionError("array('Q') is not 64-bit")
    if sys.byteorder == "little":
        table.byteswap()
    return table


def table_bytes(table: array) -> bytes:
    t = array("Q", table)
    if sys.byteorder == "little":
        t.byteswap()
    return t.tobytes()


def plan_area(start: int, per_block: int, cluster_size: int, need: Set[int], min_entries: int
              ) -> Tuple[List[int], int, int]:
    """Lay out a self-describing refcount area at cluster `start`: new blocks, then the table.

    The blocks must count every block index in `need` and every cluster of
    the area itself. Returns (block indices to create, table clusters,
    table entries).
    """
    per_cluster = cluster_size // 8
    nblocks, tclusters = max(1, len(need)), 1
    while True:
        end = start + nblocks + tclusters
        blocks = set(need)
        blocks.update(range(start // per_block, (end - 1) // per_block + 1))
        entries = max(min_entries, max(blocks) + 1)
        t2 = (entries + per_cluster - 1) // per_cluster
        if len(blocks) == nblocks and t2 == tclusters:
            return sorted(blocks), tclusters, tclusters * per_cluster
        nblocks, tclusters = max(nblocks, len(blocks)), max(tclusters, t2)


class Refcounts:
    """The refcounts of one image opened read-write."""

    def __init__(self, file, path: str, cluster_bits: int, refcount_order: int, table_offset: int,
                 table_clusters: int, cache_bytes: int = REFCOUNT_CACHE_BYTES) -> None:
        self._file = file
        self.path = path
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.slice_bytes = min(self.cs, SLICE_BYTES)
        self.per_slice = self.slice_bytes * 8 // self.bits
        self._zero = bytes(self.bits // 8) if self.bits >= 8 else b""
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = self._read_table()
        self.cache = SliceCache(file, self.slice_bytes, cache_bytes // self.slice_bytes, self._evict)
        self.hint = 0  # no free cluster below this one

    # Table ----------------------------------------------------------------------------

    def _read_table(self) -> array:
        table = load_table(bytes(self._file.read(self.table_offset, self.table_clusters * self.cs)))
        end = self._file.end
        for i, e in enumerate(table):
            if not e:
                continue
            if e & 0x1FF or e % self.cs:
                raise DiskCorrupt("%s: refcount table entry %d (%#x) is not cluster aligned" % (self.path, i, e))
            if e + self.cs > end:
                raise DiskCorrupt("%s: refcount block %d at %#x lies past the end of the file" % (self.path, i, e))
        return table

    def block_offset(self, bi: int) -> int:
        return self.table[bi] if bi < len(self.table) else 0

    # Entries --------------------------------------------------------------------------

    def _locate(self, ci: int) -> Tuple[int, int]:
        """(slice offset, index in slice) of cluster `ci`, whose block must exist."""
        bi, idx = divmod(ci, self.per_block)
        si, k = divmod(idx, self.per_slice)
        return self.table[bi] + si * self.slice_bytes, k

    def get(self, ci: int) -> int:
        bi = ci // self.per_block
        if bi >= len(self.table) or not self.table[bi]:
            return 0
        off, k = self._locate(ci)
        return get_entry(self.cache.get(off), k, self.bits)

    def set(self, ci: int, value: int) -> None:
        if value > self.max:
            raise DiskIOError("%s: refcount of cluster %d would exceed %d-bit refcounts"
                              % (self.path, ci, self.bits), errno.EOVERFLOW)
        off, k = self._locate(ci)
        buf = self.cache.get(off)
        set_entry(buf, k, self.bits, value)
        self.cache.mark_dirty(off)

    def _evict(self, offset: int) -> None:
        self.cache.write_one(offset)

    @property
    def dirty(self) -> bool:
        return self.cache.dirty

    def write_dirty(self) -> None:
        self.cache.write_dirty()

    # Allocation -----------------------------------------------------------------------

    def _find_zero(self, buf: bytearray, start: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            pos = start * n
            while True:
                k = buf.find(self._zero, pos)
                if k < 0:
                    return -1
                r = k % n
                if not r:
                    return k // n
                pos = k + n - r
        for i in range(start, self.per_slice):
            if not get_entry(buf, i, bits):
                return i
        return -1

    def next_free(self, ci: int) -> int:
        """The first cluster at or after `ci` with refcount 0."""
        while True:
            bi, idx = divmod(ci, self.per_block)
            if bi >= len(self.table) or not self.table[bi]:
                return ci
            si, k = divmod(idx, self.per_slice)
            j = self._find_zero(self.cache.get(self.table[bi] + si * self.slice_bytes), k)
            base = bi * self.per_block + si * self.per_slice
            if j >= 0:
                return base + j
            ci = base + self.per_slice

    def alloc_run(self, n: int) -> Tuple[int, int]:
        """Up to `n` contiguous free clusters, refcounts set to 1: (first cluster, count)."""
        while True:
            ci = self.next_free(self.hint)
            count = 1
            while count < n and not self.get(ci + count):
                count += 1
            if self._ensure_blocks(ci, count):
                continue  # metadata was placed: search again
            for k in range(count):
                self.set(ci + k, 1)
            self.hint = ci + count
            return ci, count

    def _ensure_blocks(self, ci: int, count: int) -> bool:
        """Create missing refcount blocks for [ci, ci+count); True if anything was created."""
        for bi in range(ci // self.per_block, (ci + count - 1) // self.per_block + 1):
            if bi >= len(self.table):
                self._grow_table(bi + 1)
                return True
            if not self.table[bi]:
                self._create_block(bi)
                return True
        return False

    def _create_block(self, bi: int) -> None:
        """A self-describing block: it is the first cluster it counts (which was free)."""
        off = bi * self.per_block * self.cs
        buf = bytearray(self.cs)
        set_entry(buf, 0, self.bits, 1)
        self.cache.drop_range(off, off + self.cs)
        self._file.write(off, buf)
        self._file.datasync()  # the block is durable before anything points to it
        self._file.write(self.table_offset + bi * 8, _U64.pack(off))
        self.table[bi] = off  # only once the table entry is written: a failed write leaves no trace

    def _grow_table(self, min_entries: int) -> None:
        old_len = len(self.table)
        cs = self.cs
        start = max((self._file.end + cs - 1) // cs, old_len * self.per_block)
        want = max(min_entries, old_len * TABLE_GROWTH_NUM // TABLE_GROWTH_DEN)
        blocks, tclusters, entries = plan_area(start, self.per_block, cs, set(), want)
        if tclusters * cs > F.REFTABLE_MAX_BYTES:
            raise DiskIOError("%s: the refcount table would exceed QEMU's 8 MiB limit: image full"
                              % self.path, errno.ENOSPC)
        new_table = array("Q", self.table)
        new_table.extend([0] * (entries - old_len))
        area_end = start + len(blocks) + tclusters
        for k, bi in enumerate(blocks):
            boff = (start + k) * cs
            buf = bytearray(cs)
            for c in range(max(start, bi * self.per_block), min(area_end, (bi + 1) * self.per_block)):
                set_entry(buf, c - bi * self.per_block, self.bits, 1)
            self._file.write(boff, buf)
            new_table[bi] = boff
        table_off = (start + len(blocks)) * cs
        self._file.write(table_off, table_bytes(new_table))
        self._file.datasync()  # new blocks and table are durable before the header points to them
        self._file.write(F.OFF_REFCOUNT_TABLE, _TABLE_FIELDS.pack(table_off, tclusters))
        self._file.datasync()
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table, self.table_offset, self.table_clusters = new_table, table_off, tclusters
        # Nothing refers to the old table any more, durably: free it now.
        for c in range(old_off // cs, old_off // cs + old_clusters):
            self.decref(c)

    # Freeing --------------------------------------------------------------------------

    def decref(self, ci: int) -> None:
        v = self.get(ci)
        if v == 0:
            raise DiskCorrupt("%s: freeing cluster %d whose refcount is already 0" % (self.path, ci))
        self.set(ci, v - 1)
        if v == 1 and ci < self.hint:
            self.hint = ci

    def release_unused(self, clusters: Iterable[int]) -> None:
        """Give back clusters allocated but never referenced (a failed write)."""
        for ci in clusters:
            self.set(ci, 0)
            if ci < self.hint:
                self.hint = ci
