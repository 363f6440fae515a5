"""Refcount consistency: count every reference, compare, repair a dirty image (worker; tests).

`count_references` walks what the image refers to (header cluster, L1
table, L2 tables, data and compressed clusters, refcount table and blocks)
and counts references per host cluster, as `qemu-img check` does. `check`
compares that with the stored refcounts and the "copied" flags and reports
corruptions and leaks in QEMU's terms. `repair` makes the stored refcounts
equal to the counted ones: in place when every referenced cluster already
has a refcount block, otherwise by writing a new refcount table and blocks
past the end of the file and switching the header to them. It runs while
the image is still marked dirty, so a crash during repair just repairs again
at the next open. Internal snapshots are not walked: images that have them
are never opened for writing.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import List, Tuple

from tenbox_vmm.disk.errors import DiskCorrupt
from tenbox_vmm.disk.qcow2 import format as F
from tenbox_vmm.disk.qcow2.refcount import Refcounts, plan_area, set_entry, table_bytes

_TABLE_FIELDS = struct.Struct(">QI")


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    messages: List[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


def _l2_entries(d, l2off: int):
    """Every entry of the L2 table at `l2off`, through the image's cache (it may hold newer slices)."""
    sb, se = d._slice_bytes, d._slice_entries
    fmt = struct.Struct(">%dQ" % se)
    for si in range(d.cs // sb):
        yield from fmt.unpack_from(d._l2.get(l2off + si * sb), 0)


def count_references(d, with_refcount_structures: bool = True) -> Tuple[array, List[str]]:
    """References per host cluster of the open image `d`, and problems found while walking."""
    cs, cb = d.cs, d.cb
    nclusters = (d._file.end + cs - 1) // cs
    refs = array("L", bytes(array("L").itemsize * nclusters))
    problems: List[str] = []

    def inc(off: int, length: int, what: str) -> None:
        last = (off + length - 1) >> cb
        if last >= nclusters:
            problems.append("%s at %#x lies past the end of the file" % (what, off))
            return
        for c in range(off >> cb, last + 1):
            refs[c] += 1

    h = d.header
    inc(0, cs, "header")
    if h.l1_size:
        inc(h.l1_table_offset, h.l1_size * 8, "L1 table")
    for l1i in range(h.l1_size):
        e = d._l1[l1i]
        l2off = e & F.OFFSET_MASK
        if not l2off:
            continue
        if l2off % cs:
            problems.append("L1 entry %d (%#x) is not cluster aligned" % (l1i, e))
            continue
        inc(l2off, cs, "L2 table")
        if (l2off >> cb) >= nclusters:
            continue
        for e2 in _l2_entries(d, l2off):
            if not e2:
                continue
            if e2 & F.OFLAG_COMPRESSED:
                coff, nsect = d._compressed_span(e2)
                inc(coff & ~(F.SECTOR - 1), nsect * F.SECTOR, "compressed cluster")
                continue
            host = e2 & F.OFFSET_MASK
            if host:
                if host % cs:
                    problems.append("L2 entry %#x is not cluster aligned" % e2)
                else:
                    inc(host, cs, "data cluster")
    if with_refcount_structures:
        rc = _refcounts(d)
        inc(rc.table_offset, rc.table_clusters * cs, "refcount table")
        for bi, boff in enumerate(rc.table):
            if boff:
                inc(boff, cs, "refcount block %d" % bi)
    return refs, problems


def _refcounts(d) -> Refcounts:
    rc = d._refcounts
    if rc is None:  # opened read-only: read the refcounts without ever writing them
        h = d.header
        rc = Refcounts(d._file, d.path, d.cb, h.refcount_order, h.refcount_table_offset, h.refcount_table_clusters)
    return rc


def check(d) -> CheckResult:
    """Compare stored refcounts and copied flags with the references (after a flush)."""
    res = CheckResult()
    refs, problems = count_references(d)
    res.corruptions += len(problems)
    res.messages += problems
    rc = _refcounts(d)
    covered = len(rc.table) * rc.per_block
    for c in range(max(len(refs), min(covered, (d._file.end + d.cs - 1) // d.cs))):
        want = refs[c] if c < len(refs) else 0
        have = rc.get(c)
        if have < want:
            res.corruptions += 1
            res.messages.append("cluster %d refcount=%d reference=%d" % (c, have, want))
        elif have > want:
            res.leaks += 1
            res.messages.append("leaked cluster %d refcount=%d reference=%d" % (c, have, want))
    for l1i in range(d.header.l1_size):
        e = d._l1[l1i]
        l2off = e & F.OFFSET_MASK
        if not l2off or l2off % d.cs or (l2off >> d.cb) >= len(refs):
            continue
        if bool(e & F.OFLAG_COPIED) != (rc.get(l2off >> d.cb) == 1):
            res.corruptions += 1
            res.messages.append("OFLAG_COPIED L2 table: l1 index %d" % l1i)
        for e2 in _l2_entries(d, l2off):
            host = e2 & F.OFFSET_MASK
            if not host or e2 & F.OFLAG_COMPRESSED or host % d.cs:
                continue
            if bool(e2 & F.OFLAG_COPIED) != (rc.get(host >> d.cb) == 1):
                res.corruptions += 1
                res.messages.append("OFLAG_COPIED data cluster: entry %#x" % e2)
    return res


def repair(d) -> None:
    """Rewrite the refcounts of the dirty image `d` (open for writing) from its references."""
    rc = d._refcounts
    cs = d.cs
    refs, problems = count_references(d, with_refcount_structures=False)
    if problems:
        raise DiskCorrupt("%s: the image is dirty and cannot be repaired: %s; run 'qemu-img check -r all'"
                          % (d.path, problems[0]))
    n = rc.per_block
    covered = True
    full = array("L", refs)
    for c in range(rc.table_offset // cs, rc.table_offset // cs + rc.table_clusters):
        if c < len(full):
            full[c] += 1
    for boff in rc.table:
        if boff and (boff // cs) < len(full):
            full[boff // cs] += 1
    for c, r in enumerate(full):
        if r > rc.max:
            raise DiskCorrupt("%s: cluster %d has %d references, over the %d-bit refcount limit"
                              % (d.path, c, r, rc.bits))
        if r and not rc.block_offset(c // n):
            covered = False
            break
    if covered:
        _repair_in_place(d, rc, full)
    else:
        _rebuild(d, rc, refs)
    d._file.datasync()
    rc.hint = 0


def _repair_in_place(d, rc: Refcounts, full: array) -> None:
    cs, n = d.cs, rc.per_block
    for bi, boff in enumerate(rc.table):
        if not boff:
            continue
        want = bytearray(cs)
        for c in range(bi * n, min((bi + 1) * n, len(full))):
            if full[c]:
                set_entry(want, c - bi * n, rc.bits, full[c])
        if d._file.read(boff, cs) != want:
            d._file.write(boff, want)
    rc.cache.clear()


def _rebuild(d, rc: Refcounts, refs: array) -> None:
    """New refcount table and blocks after the end of the file; the old ones become free space."""
    cs, n = d.cs, rc.per_block
    start = (d._file.end + cs - 1) // cs
    need = {c // n for c, r in enumerate(refs) if r}
    blocks, tclusters, entries = plan_area(start, n, cs, need, 1)
    area_end = start + len(blocks) + tclusters
    table = array("Q", [0] * entries)
    for k, bi in enumerate(blocks):
        buf = bytearray(cs)
        for c in range(bi * n, (bi + 1) * n):
            r = refs[c] if c < len(refs) else 0
            if start <= c < area_end:
                r += 1
            if r:
                set_entry(buf, c - bi * n, rc.bits, r)
        boff = (start + k) * cs
        d._file.write(boff, buf)
        table[bi] = boff
    table_off = (start + len(blocks)) * cs
    d._file.write(table_off, table_bytes(table))
    d._file.datasync()
    d._file.write(F.OFF_REFCOUNT_TABLE, _TABLE_FIELDS.pack(table_off, tclusters))
    rc.cache.clear()
    rc.table, rc.table_offset, rc.table_clusters = table, table_off, tclusters
    d.header.refcount_table_offset, d.header.refcount_table_clusters = table_off, tclusters

