"""The qcow2 backend: guest reads and writes through L1/L2 tables, allocation, ordered flush (worker).

Reads map each guest cluster through the L1 table (in memory) and the L2
cache, coalesce clusters that are contiguous in the file into one preadv
straight into the caller's views, and fall through to the backing file for
unallocated clusters (zeros past its end, or with no backing file).

Writes to clusters this image owns (L2 flag "copied": refcount 1) go in
place. Everything else (unallocated, zero, compressed, shared) gets fresh
clusters: the partial head and tail are filled from the old contents
(backing file, zeros, or the decompressed cluster) in temporary buffers, and
the whole run goes out in one pwritev together with the guest's views.

Crash consistency. On-disk references are only ever made to clusters whose
refcount is durably >= 1, and clusters are only reused after the reference
that pointed to them is durably gone. Concretely:

  1. allocate: refcount set to 1 (in the refcount cache);
  2. write the guest data (and COW fill) to the new clusters;
  3. set the L2 entry (in the L2 cache); a new L2 table is written as zeros
     at once, its L1 entry is set in memory only;
  4. flush (guest flush, dirty L2 eviction, or too many pending frees):
       a. write dirty refcount blocks, fdatasync: data, refcounts and
          zeroed L2 tables are durable;
       b. write dirty L2 slices and L1 entries, fdatasync;
       c. only now decrement the refcounts of clusters the L2 updates
          dropped (discard, overwritten compressed clusters): until then they
          cannot be handed out again.

A process killed at any instant therefore leaves at worst leaked clusters
(refcount 1, no reference), which `qemu-img check` reports as leaks, never
as corruption; everything written before a completed flush is there.

With lazy_refcounts (compatible bit 0) step 4a skips writing refcount
blocks: the image is marked dirty (incompatible bit 0) before its first L2
update reaches the disk, refcount blocks are written at eviction and close,
and the dirty bit is cleared on a clean close. An image opened read-write
while dirty has its refcounts rebuilt from the L1/L2 tables first, as QEMU
does (see check.py).

Discard works on whole clusters; the partial clusters at either end of a
discarded range are left as they are. A discarded cluster reads as zeros,
except in a version 2 image with a backing file, where qcow2 cannot say
"zero" and the backing file's data shows through again (as in QEMU).
write_zeroes always leaves zeros: whole clusters become zero clusters (v3;
with may_unmap=False an owned cluster keeps its allocation), partial ones
are written.

L2 cache size: l2_cache_bytes = min(ceil(size / cluster_size) * 8,
L2_CACHE_MAX_BYTES), so the whole disk is mapped up to 32 GiB at 64 KiB
clusters (4 MiB), held in 4 KiB slices, never fewer than
L2_CACHE_MIN_SLICES. Each backing image has its own cache by the same rule.
"""

from __future__ import annotations

import functools
import struct
from array import array
from typing import Callable, List, Optional, Sequence, Set, Tuple

from tenbox_vmm.disk import lock
from tenbox_vmm.disk.base import Disk
from tenbox_vmm.disk.errors import DiskCorrupt, DiskError, DiskIOError, ImageLocked
from tenbox_vmm.disk.fileio import ImageFile
from tenbox_vmm.disk.iov import Cursor, as_views, copy_into, total, zero_fill, zero_views
from tenbox_vmm.disk.qcow2 import format as F
from tenbox_vmm.disk.qcow2.cache import SLICE_BYTES, SliceCache
from tenbox_vmm.disk.qcow2.check import repair
from tenbox_vmm.disk.qcow2.compress import decompress
from tenbox_vmm.disk.qcow2.header import Header, check_writable, read_header
from tenbox_vmm.disk.qcow2.refcount import Refcounts, load_table, table_bytes

L2_CACHE_MAX_BYTES = 4 << 20
L2_CACHE_MIN_SLICES = 16
PENDING_FREES_MAX = 16384  # freed clusters waiting for their L2 change to be durable: then a flush is forced

# Cluster kinds
UNALLOCATED, ZERO, NORMAL, COMPRESSED = 0, 1, 2, 3

_U64 = struct.Struct(">Q")
_L1_FIELDS = struct.Struct(">IQ")  # l1_size, l1_table_offset
_INPLACE_MASK = F.OFLAG_COPIED | F.OFLAG_COMPRESSED | F.OFLAG_ZERO

OpenBacking = Callable[[str, Optional[str]], Disk]


@functools.lru_cache(maxsize=None)
def _entries_struct(n: int) -> struct.Struct:
    return struct.Struct(">%dQ" % n)


def l2_cache_slices(size: int, cluster_bits: int) -> int:
    """Slices of the L2 cache (see the module docstring for the formula)."""
    cs = 1 << cluster_bits
    slice_bytes = min(cs, SLICE_BYTES)
    mapping_bytes = (size + cs - 1) // cs * 8
    return max(L2_CACHE_MIN_SLICES, (min(mapping_bytes, L2_CACHE_MAX_BYTES) + slice_bytes - 1) // slice_bytes)


class Qcow2Disk(Disk):
    format = "qcow2"

    def __init__(self, path: str, read_only: bool = False, *, open_backing: Optional[OpenBacking] = None,
                 file_factory: Callable[[str, bool], ImageFile] = ImageFile) -> None:
        self.path = path
        self.read_only = read_only
        self.backing: Optional[Disk] = None
        self._closed = False
        self._failed: Optional[str] = None
        self._refcounts: Optional[Refcounts] = None
        self._file: ImageFile = file_factory(path, not read_only)
        try:
            try:
                lock.acquire(self._file.fd, not read_only)
            except lock.LockConflict as e:
                raise ImageLocked("%s: %s: the image is in use by another process (a QEMU or another tenbox VM)"
                                  % (path, e)) from None
            except OSError as e:
                raise DiskError("%s: cannot lock the image: %s" % (path, e.strerror)) from None
            self._open(open_backing)
        except BaseException:
            self._release_files()
            raise

    # Opening ----------------------------------------------------------------------------

    def _open(self, open_backing: Optional[OpenBacking]) -> None:
        h = read_header(self._file, self.path)
        if not self.read_only:
            check_writable(h, self.path)
        self.header: Header = h
        self.size = h.size
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self._v3 = h.version >= 3
        self._l2_entries = h.l2_entries
        self._slice_bytes = min(self.cs, SLICE_BYTES)
        self._slice_entries = self._slice_bytes // 8
        self._csize_shift = 62 - (self.cb - 8)
        self._csize_mask = (1 << (self.cb - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._l1 = load_table(bytes(self._file.read(h.l1_table_offset, h.l1_size * 8))) if h.l1_size else \
            load_table(b"")
        self._l1_dirty: Set[int] = set()
        self._l2 = SliceCache(self._file, self._slice_bytes, l2_cache_slices(h.size, self.cb), self._evict_l2)
        self._decompressed_last: Tuple[int, bytes] = (-1, b"")
        self._pending_frees: List[int] = []
        self._data_unsynced = False
        self._lazy = self._v3 and h.lazy_refcounts
        self._marked_dirty = False
        if not self.read_only:
            self._refcounts = Refcounts(self._file, self.path, self.cb, h.refcount_order,
                                        h.refcount_table_offset, h.refcount_table_clusters)
            if h.autoclear_features:
                # We maintain none of the autoclear features (bitmaps): clear them before writing, as the
                # spec requires. QEMU then treats persistent bitmaps as inconsistent (their clusters leak).
                h.autoclear_features = 0
                self._file.write(F.OFF_AUTOCLEAR, _U64.pack(0))
                self._file.datasync()
            if h.dirty:
                repair(self)
                self._write_incompatible(h.incompatible_features & ~F.INCOMPAT_DIRTY)
        if h.backing_file:
            if open_backing is None:
                raise DiskError("%s: has a backing file but no way to open it was given" % self.path)
            self.backing = open_backing(h.backing_file, h.backing_format)

    # Mapping ----------------------------------------------------------------------------

    def _corrupt(self, what: str) -> DiskCorrupt:
        """Report corruption; an image open for writing is marked corrupt, as QEMU does."""
        msg = "%s: corrupt image: %s" % (self.path, what)
        if not self.read_only and self._failed is None:
            self._failed = msg
            try:
                self._write_incompatible(self.header.incompatible_features | F.INCOMPAT_CORRUPT)
            except DiskIOError:
                pass  # already failing; the error we raise names the corruption
        return DiskCorrupt(msg + "; run 'qemu-img check -r all'")

    def _l2_offset(self, l1i: int) -> int:
        e = self._l1[l1i]
        off = e & F.OFFSET_MASK
        if off and (off % self.cs or off + self.cs > self._file.end):  # tables are written whole
            raise self._corrupt("L1 entry %d points to %#x, not a cluster inside the file" % (l1i, off))
        return off

    def _entries(self, gc: int, count: int) -> Tuple[int, ...]:
        """L2 entries of up to `count` clusters from `gc`, stopping at the end of its L2 slice."""
        l1i, l2i = divmod(gc, self._l2_entries)
        si, k = divmod(l2i, self._slice_entries)
        n = min(count, self._slice_entries - k)
        l2off = self._l2_offset(l1i)
        if not l2off:
            return (0,) * n
        return _entries_struct(n).unpack_from(self._l2.get(l2off + si * self._slice_bytes), k * 8)

    def _classify(self, e: int) -> Tuple[int, int]:
        """(kind, host offset) of an L2 entry; for compressed clusters the entry itself."""
        if not e:
            return UNALLOCATED, 0
        if e & F.OFLAG_COMPRESSED:
            return COMPRESSED, e
        off = e & F.OFFSET_MASK
        if e & F.OFLAG_ZERO:
            if not self._v3:
                raise self._corrupt("zero cluster flag in a version 2 image (entry %#x)" % e)
            return ZERO, off
        if not off:
            if e & F.OFLAG_COPIED:
                raise self._corrupt("L2 entry %#x has the copied flag but no offset" % e)
            return UNALLOCATED, 0
        if off % self.cs:
            raise self._corrupt("L2 entry %#x is not cluster aligned" % e)
        return NORMAL, off

    def _check_data(self, host: int, length: int) -> None:
        limit = (self._file.end + self.cs - 1) // self.cs * self.cs
        if host + length > limit:
            raise self._corrupt("data cluster at %#x lies past the end of the file" % (host - host % self.cs))

    def _compressed_span(self, e: int) -> Tuple[int, int]:
        coff = e & self._coffset_mask
        nsect = ((e >> self._csize_shift) & self._csize_mask) + 1
        return coff, nsect

    def _decompressed(self, e: int) -> bytes:
        if self._decompressed_last[0] == e:
            return self._decompressed_last[1]
        coff, nsect = self._compressed_span(e)
        if coff >= self._file.end:
            raise self._corrupt("compressed cluster at %#x lies past the end of the file" % coff)
        csize = nsect * F.SECTOR - (coff & (F.SECTOR - 1))
        data = decompress(self.header.compression_type, bytes(self._file.read(coff, csize)), self.cs,
                          "%s: cluster at %#x" % (self.path, coff))
        self._decompressed_last = (e, data)
        return data

    # Reading ----------------------------------------------------------------------------

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = as_views(bufs)
        n = total(views)
        self._check_range(offset, n)
        self._check_open()
        if not n:
            return
        cur = Cursor(views, n)
        cb, cs = self.cb, self.cs
        end = offset + n
        if self._read_one_extent(offset, end, cur):
            return
        pos = offset
        ext_kind = -1
        ext_start = ext_host = ext_len = 0
        while pos < end:
            gc = pos >> cb
            entries = self._entries(gc, ((end - 1) >> cb) - gc + 1)
            for e in entries:
                cstart = gc << cb
                s = pos if pos > cstart else cstart
                t = end if end < cstart + cs else cstart + cs
                kind, host = self._classify(e)
                if kind == NORMAL:
                    host += s - cstart
                if kind == ext_kind and kind != COMPRESSED and (kind != NORMAL or host == ext_host + ext_len):
                    ext_len += t - s
                else:
                    if ext_kind >= 0:
                        self._read_extent(ext_kind, ext_start, ext_len, ext_host, cur)
                    ext_kind, ext_start, ext_host, ext_len = kind, s, host, t - s
                gc += 1
                pos = t
        self._read_extent(ext_kind, ext_start, ext_len, ext_host, cur)

    def _read_one_extent(self, offset: int, end: int, cur: Cursor) -> bool:
        """Read [offset, end) if its clusters are all unallocated or all one contiguous run; else False.

        That is the usual sequential request (a 1 MiB read is 16 clusters of
        64 KiB): one comparison over its L2 entries instead of a loop per cluster.
        """
        cb, cs = self.cb, self.cs
        gc = offset >> cb
        count = ((end - 1) >> cb) - gc + 1
        if count < 2:
            return False
        entries = self._entries(gc, count)
        if len(entries) < count:
            return False  # crosses an L2 slice
        e = entries[0]
        if not e:
            if entries.count(0) != count:
                return False
            self._read_extent(UNALLOCATED, offset, end - offset, 0, cur)
            return True
        kind, host = self._classify(e)
        # Same flags in every entry and offsets one cluster apart: the entries are e, e + cs, ...
        if kind != NORMAL or entries != tuple(range(e, e + count * cs, cs)):
            return False
        self._read_extent(NORMAL, offset, end - offset, host + offset - (gc << cb), cur)
        return True

    def _read_extent(self, kind: int, gstart: int, length: int, host: int, cur: Cursor) -> None:
        views = cur.take(length)
        if kind == NORMAL:
            self._check_data(host, length)
            self._file.readv(host, views)
        elif kind == ZERO:
            zero_fill(views)
        elif kind == UNALLOCATED:
            self._read_backing(gstart, views, length)
        else:
            off = gstart & (self.cs - 1)
            copy_into(views, memoryview(self._decompressed(host))[off:off + length])

    def _read_backing(self, gstart: int, views: List[memoryview], length: int) -> None:
        b = self.backing
        if b is None or gstart >= b.size:
            zero_fill(views)
        elif gstart + length <= b.size:
            b.readv(gstart, views)
        else:
            inside = b.size - gstart
            c = Cursor(views)
            b.readv(gstart, c.take(inside))
            zero_fill(c.take(length - inside))

    # Writing ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        self._check_writable()
        self._check_open()
        failed = self._failed or self._file.sync_error
        if failed:
            raise DiskIOError("%s: refusing writes after an earlier failure (%s); reopen the disk"
                              % (self.path, failed))

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._check_usable()
        views = as_views(bufs)
        n = total(views)
        self._check_range(offset, n)
        if n:
            self._write(offset, n, Cursor(views, n))
            self._maybe_release()

    def _write(self, offset: int, n: int, cur: Cursor) -> None:
        cb, cs = self.cb, self.cs
        end = offset + n
        pos = offset
        while pos < end:
            gc0 = pos >> cb
            entries = self._entries(gc0, ((end - 1) >> cb) - gc0 + 1)
            cnt = len(entries)
            i = 0
            while i < cnt:
                e = entries[i]
                inplace = (e & _INPLACE_MASK) == F.OFLAG_COPIED and e & F.OFFSET_MASK
                j = i + 1
                if inplace:
                    host0 = e & F.OFFSET_MASK
                    if host0 % cs:
                        raise self._corrupt("L2 entry %#x is not cluster aligned" % e)
                    while (j < cnt and (entries[j] & _INPLACE_MASK) == F.OFLAG_COPIED
                           and entries[j] & F.OFFSET_MASK == host0 + (j - i) * cs):
                        j += 1
                else:
                    while j < cnt and not ((entries[j] & _INPLACE_MASK) == F.OFLAG_COPIED
                                           and entries[j] & F.OFFSET_MASK):
                        j += 1
                cstart = (gc0 + i) << cb
                s = pos if pos > cstart else cstart
                t = min(end, (gc0 + j) << cb)
                if inplace:
                    host = host0 + s - cstart
                    self._check_data(host, t - s)
                    self._file.writev(host, cur.take(t - s))
                else:
                    self._write_allocating(gc0 + i, entries[i:j], s, t, cur)
                self._data_unsynced = True
                pos = t
                i = j

    def _reusable(self, e: int) -> bool:
        """A preallocated zero cluster this image owns: written in place, no new allocation."""
        return (e & (F.OFLAG_COPIED | F.OFLAG_ZERO | F.OFLAG_COMPRESSED)) == (F.OFLAG_COPIED | F.OFLAG_ZERO) \
            and bool(e & F.OFFSET_MASK) and self._v3

    def _write_allocating(self, gc0: int, entries: Tuple[int, ...], s: int, t: int, cur: Cursor) -> None:
        """Write [s, t) over clusters gc0.. that need new clusters (or reuse preallocated zero ones)."""
        cb, cs = self.cb, self.cs
        rc = self._refcounts
        assert rc is not None
        m = len(entries)
        targets = [0] * m
        fresh: List[int] = []
        try:
            k = 0
            while k < m:
                if self._reusable(entries[k]):
                    targets[k] = entries[k] & F.OFFSET_MASK
                    self._check_data(targets[k], cs)
                    k += 1
                    continue
                r = k
                while r < m and not self._reusable(entries[r]):
                    r += 1
                while k < r:
                    ci, got = rc.alloc_run(r - k)
                    for x in range(got):
                        targets[k + x] = (ci + x) << cb
                        fresh.append(ci + x)
                    k += got
            segments: List[list] = []  # [host, views, length]
            for k in range(m):
                cstart = (gc0 + k) << cb
                ws = s if s > cstart else cstart
                we = t if t < cstart + cs else cstart + cs
                iov: List[memoryview] = []
                if ws > cstart:
                    iov.extend(self._cow_source(entries[k], cstart, ws - cstart))
                iov.extend(cur.take(we - ws))
                if we < cstart + cs:
                    iov.extend(self._cow_source(entries[k], we, cstart + cs - we))
                if segments and segments[-1][0] + segments[-1][2] == targets[k]:
                    segments[-1][1].extend(iov)
                    segments[-1][2] += cs
                else:
                    segments.append([targets[k], iov, cs])
            for host, iov, _ in segments:
                self._file.writev(host, iov)
        except BaseException:
            if fresh:
                rc.release_unused(fresh)
            raise
        linked = 0
        try:
            for k in range(m):
                self._set_l2(gc0 + k, targets[k] | F.OFLAG_COPIED)
                linked += 1
        except BaseException:
            unlinked = set(h >> cb for h in targets[linked:])
            rc.release_unused([ci for ci in fresh if ci in unlinked])
            raise

    def _cow_source(self, e: int, gstart: int, length: int) -> List[memoryview]:
        """The old contents of [gstart, gstart+length) within one cluster, in temporary buffers."""
        kind, host = self._classify(e)
        if kind == ZERO or (kind == UNALLOCATED and self.backing is None):
            return zero_views(length)
        if kind == COMPRESSED:
            off = gstart & (self.cs - 1)
            return [memoryview(self._decompressed(host))[off:off + length]]
        buf = bytearray(length)
        if kind == UNALLOCATED:
            self._read_backing(gstart, [memoryview(buf)], length)
        else:  # a shared cluster (refcount > 1): copy it
            src = host + (gstart & (self.cs - 1))
            self._check_data(src, length)
            self._file.readv(src, [memoryview(buf)])
        return [memoryview(buf)]

    def _l2_offset_for_write(self, l1i: int) -> int:
        e = self._l1[l1i]
        off = self._l2_offset(l1i)
        if not off:
            return self._alloc_l2(l1i)
        if not e & F.OFLAG_COPIED:
            raise self._corrupt("L2 table at %#x is shared (L1 entry without the copied flag)" % off)
        return off

    def _alloc_l2(self, l1i: int) -> int:
        rc = self._refcounts
        assert rc is not None
        ci, _ = rc.alloc_run(1)
        off = ci << self.cb
        try:
            self._file.write_zeros(off, self.cs)  # durable (flush step a) before the L1 entry is written
        except BaseException:
            rc.release_unused([ci])
            raise
        self._l2.drop_range(off, off + self.cs)
        self._l1[l1i] = off | F.OFLAG_COPIED
        self._l1_dirty.add(l1i)
        return off

    def _set_l2(self, gc: int, new: int) -> None:
        l1i, l2i = divmod(gc, self._l2_entries)
        l2off = self._l2_offset_for_write(l1i)
        si, k = divmod(l2i, self._slice_entries)
        key = l2off + si * self._slice_bytes
        buf = self._l2.get(key)
        old = _U64.unpack_from(buf, k * 8)[0]
        if old == new:
            return
        _U64.pack_into(buf, k * 8, new)
        self._l2.mark_dirty(key)
        self._release(old, new)

    def _release(self, old: int, new: int) -> None:
        """Queue the clusters `old` referred to and `new` does not; freed after the L2 change is durable."""
        if old & F.OFLAG_COMPRESSED:
            coff, nsect = self._compressed_span(old)
            start = coff & ~(F.SECTOR - 1)
            last = start + nsect * F.SECTOR - 1
            self._pending_frees.extend(range(start >> self.cb, (last >> self.cb) + 1))
            return
        host = old & F.OFFSET_MASK
        if host and (new & F.OFLAG_COMPRESSED or host != new & F.OFFSET_MASK):
            self._pending_frees.append(host >> self.cb)

    def _maybe_release(self) -> None:
        if len(self._pending_frees) > PENDING_FREES_MAX:
            self._sync_metadata()

    # Discard and write-zeroes ---------------------------------------------------------------

    def _full_clusters(self, offset: int, length: int) -> Tuple[int, int]:
        """First and end guest cluster wholly inside the range (the image's last cluster counts whole)."""
        cs = self.cs
        first = (offset + cs - 1) >> self.cb
        end = offset + length
        last = ((end + cs - 1) >> self.cb) if end == self.size else (end >> self.cb)
        return first, last

    def _update_clusters(self, first: int, last: int, decide: Callable[[int], Optional[int]],
                         skip_unmapped: bool) -> None:
        """Set each L2 entry in [first, last) to decide(old) unless that is None."""
        gc = first
        while gc < last:
            l1i, l2i = divmod(gc, self._l2_entries)
            if skip_unmapped and not self._l2_offset(l1i):
                gc = (l1i + 1) * self._l2_entries
                continue
            l2off = self._l2_offset_for_write(l1i)
            si, k = divmod(l2i, self._slice_entries)
            key = l2off + si * self._slice_bytes
            n = min(last - gc, self._slice_entries - k)
            buf = self._l2.get(key)
            for idx in range(k, k + n):
                old = _U64.unpack_from(buf, idx * 8)[0]
                new = decide(old)
                if new is None or new == old:
                    continue
                _U64.pack_into(buf, idx * 8, new)
                self._l2.mark_dirty(key)  # before the release: a flush must carry this change
                self._release(old, new)
            gc += n
        self._maybe_release()

    def discard(self, offset: int, length: int) -> None:
        self._check_usable()
        self._check_range(offset, length)
        first, last = self._full_clusters(offset, length)
        if first >= last:
            return
        new = F.OFLAG_ZERO if (self.backing is not None and self._v3) else 0
        self._update_clusters(first, last, lambda old: new, skip_unmapped=(new == 0))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check_usable()
        self._check_range(offset, length)
        if not length:
            return
        first, last = self._full_clusters(offset, length)
        if first >= last:
            self._write_zero_range(offset, length)
            return
        head_end = first << self.cb
        tail_start = min(last << self.cb, self.size)
        if offset < head_end:
            self._write_zero_range(offset, head_end - offset)
        if tail_start < offset + length:
            self._write_zero_range(tail_start, offset + length - tail_start)
        has_backing = self.backing is not None
        if self._v3:
            def decide(old: int) -> Optional[int]:
                kind, host = self._classify(old)
                if kind == ZERO:
                    return F.OFLAG_ZERO if (may_unmap and host) else None
                if kind == UNALLOCATED and not has_backing:
                    return None
                if kind == NORMAL and old & F.OFLAG_COPIED and not may_unmap:
                    return host | F.OFLAG_COPIED | F.OFLAG_ZERO  # keep the allocation
                return F.OFLAG_ZERO
            self._update_clusters(first, last, decide, skip_unmapped=not has_backing)
            return
        # Version 2 has no zero flag: unallocate where that reads as zeros, else write zeros.
        if may_unmap and not has_backing:
            self._update_clusters(first, last, lambda old: 0, skip_unmapped=True)
            return
        gc = first
        while gc < last:
            entries = self._entries(gc, last - gc)
            for idx, e in enumerate(entries):
                if e or has_backing:
                    start = (gc + idx) << self.cb
                    self._write_zero_range(start, min(self.size, start + self.cs) - start)
            gc += len(entries)

    def _write_zero_range(self, offset: int, length: int) -> None:
        self._write(offset, length, Cursor(zero_views(length)))
        self._maybe_release()

    # Growing ----------------------------------------------------------------------------

    def grow(self, size: int) -> None:
        """A larger virtual size, as `qemu-img resize` makes it: a larger L1 table first if needed, then the size.

        Crash-safe in the module's order: a new L1 table is written and made
        durable before the header points to it (one write of l1_size and
        l1_table_offset), the old table is freed only after; the size field
        is written last. A crash in between leaves the old size, at worst a
        leaked cluster range.
        """
        self._check_growth(size)
        self._check_usable()
        rc = self._refcounts
        assert rc is not None
        self._sync_metadata()
        per_l1 = self.cs * self._l2_entries
        want = (size + per_l1 - 1) // per_l1
        if want > len(self._l1):
            if want * 8 > F.L1_MAX_BYTES:
                raise DiskError("%s: %d bytes needs an L1 table over QEMU's 32 MiB limit" % (self.path, size))
            self._move_l1(want)
        self._file.write(F.OFF_SIZE, _U64.pack(size))
        self._file.datasync()
        self.header.size = size
        self.size = size

    def _move_l1(self, entries: int) -> None:
        rc = self._refcounts
        assert rc is not None
        clusters = (entries * 8 + self.cs - 1) // self.cs
        runs = []
        while True:  # contiguous clusters: runs too short are given back once one fits
            ci, count = rc.alloc_run(clusters)
            if count == clusters:
                break
            runs.append((ci, count))
        for c0, n in runs:
            rc.release_unused(range(c0, c0 + n))
        new = array("Q", self._l1)
        new.extend([0] * (entries - len(new)))
        off = ci << self.cb
        try:
            self._file.write(off, table_bytes(new) + bytes(clusters * self.cs - entries * 8))
            rc.write_dirty()
            self._file.datasync()  # the table and its refcounts are durable before the header names them
        except BaseException:
            rc.release_unused(range(ci, ci + clusters))
            raise
        self._file.write(F.OFF_L1_TABLE, _L1_FIELDS.pack(entries, off))
        self._file.datasync()
        old_off, old_entries = self.header.l1_table_offset, self.header.l1_size
        self.header.l1_table_offset, self.header.l1_size = off, entries
        self._l1 = new
        if old_entries:
            first = old_off >> self.cb
            for c in range(first, first + (old_entries * 8 + self.cs - 1) // self.cs):
                rc.decref(c)
            rc.write_dirty()
            self._file.datasync()

    # Flushing ---------------------------------------------------------------------------

    def _evict_l2(self, offset: int) -> None:
        self._sync_metadata()

    def _write_l1(self) -> None:
        if not self._l1_dirty:
            return
        idx = sorted(self._l1_dirty)
        base = self.header.l1_table_offset
        i = 0
        while i < len(idx):
            j = i
            while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                j += 1
            data = b"".join(_U64.pack(self._l1[x]) for x in idx[i:j + 1])
            self._file.write(base + idx[i] * 8, data)
            i = j + 1
        self._l1_dirty.clear()

    def _write_incompatible(self, value: int) -> None:
        self._file.write(F.OFF_INCOMPATIBLE, _U64.pack(value))
        self._file.datasync()
        self.header.incompatible_features = value

    def _sync_metadata(self) -> None:
        """Make data and metadata durable in the safe order (module docstring, step 4)."""
        rc = self._refcounts
        if rc is None:
            return
        l2_dirty = self._l2.dirty or bool(self._l1_dirty)
        if not (l2_dirty or self._pending_frees or self._data_unsynced or (rc.dirty and not self._lazy)):
            return
        if self._lazy:
            if l2_dirty and not self._marked_dirty:
                self._write_incompatible(self.header.incompatible_features | F.INCOMPAT_DIRTY)
                self._marked_dirty = True
        else:
            rc.write_dirty()
        self._file.datasync()
        self._data_unsynced = False
        self._l2.write_dirty()
        self._write_l1()
        self._file.datasync()
        frees, self._pending_frees = self._pending_frees, []
        for ci in frees:
            rc.decref(ci)

    def flush(self) -> None:
        if self.read_only:
            return
        self._check_usable()
        self._sync_metadata()

    def freeze(self) -> None:
        """Become read-only for good, synced and marked clean: the image is a snapshot's layer from now on
        (a new overlay's backing file), and other VMs may open it read-only beside us."""
        if self.read_only:
            return
        self._check_usable()
        rc = self._refcounts
        self._sync_metadata()
        if rc is not None and rc.dirty:
            rc.write_dirty()
            self._file.datasync()
        if self._marked_dirty:
            self._write_incompatible(self.header.incompatible_features & ~F.INCOMPAT_DIRTY)
            self._marked_dirty = False
            self._file.datasync()
        self.read_only = True
        self._refcounts = None
        lock.downgrade(self._file.fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            rc = self._refcounts
            if rc is not None and self._failed is None and self._file.sync_error is None:
                self._sync_metadata()
                if rc.dirty:
                    rc.write_dirty()
                    self._file.datasync()
                if self._marked_dirty:
                    self._write_incompatible(self.header.incompatible_features & ~F.INCOMPAT_DIRTY)
                    self._marked_dirty = False
        finally:
            self._release_files()

    def _release_files(self) -> None:
        b, self.backing = self.backing, None
        try:
            if b is not None:
                b.close()
        finally:
            self._file.close()
