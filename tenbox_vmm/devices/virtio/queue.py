"""Split virtqueues, checked against guest memory at every step (worker, device I/O threads).

Everything the guest hands over is distrusted: ring addresses and sizes are
checked when the queue goes live, every descriptor's range against guest RAM,
chains against the queue size (loops), indirect tables against nesting and
their own size, and a readable descriptor after a writable one. A violation
raises VirtqueueError; the transport then marks the device DEVICE_NEEDS_RESET.
Nothing a guest does here can make the worker touch memory outside guest RAM.
A chain of one plain descriptor (most network frames and receive buffers)
is checked once per address and length: its view is kept for the next time
the driver offers the same buffer, and dropped with the queue's memory.

The ring indexes and event fields the guest reads while we write them (and
the other way round) go through native-format memoryviews, one 16-bit load
or store each: the struct module packs '<H' a byte at a time, and a guest
polling the used index from another CPU would see it torn (0x00ff -> 0x0000
-> 0x0100) and take garbage for completions. Native order is the ring's
little-endian order on every host tenbox runs on (x86-64, arm64).
"""

from __future__ import annotations

import mmap
import operator
import struct
import threading
from typing import Dict, List, Optional, Tuple

from tenbox_vmm.memory import GuestMemory, GuestMemoryError

QUEUE_SIZE_MAX = 32768
INDIRECT_MAX = 1024  # descriptors in one indirect table
VIEW_CACHE_MAX = 1024  # views of single-descriptor chains kept per queue (drivers reuse their buffers)
TABLE_CACHE_VIEWS = 4096  # views of indirect tables kept per queue that asks for them (~0.8 MiB at most)

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

_DESC = struct.Struct("<QIHH")
_LINKS: Dict[int, List[int]] = {}  # the links of an ordered table of n entries (1, 2, ..., n - 1), by n


class VirtqueueError(Exception):
    """The guest broke the virtqueue rules; the device needs a reset."""


class Chain:
    """One descriptor chain: what the device may read, then what it may write."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: List[memoryview], writable: List[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read(self, n: int) -> bytes:
        """Copy the first n readable bytes (headers); VirtqueueError if there are fewer."""
        out = bytearray()
        for v in self.readable:
            take = min(len(v), n - len(out))
            out += v[:take]
            if len(out) == n:
                return bytes(out)
        raise VirtqueueError("chain %d has %d readable bytes, needs %d" % (self.head, len(out), n))


class WriteLog:
    """The guest pages devices wrote while a live snapshot copies RAM (Machine._save_live): a byte a page,
    marked when a chain goes back to the driver, after the device's last write into it; taken pass by pass.

    KVM's dirty log sees what vCPUs write, not what the worker writes into guest RAM itself. A pass that
    takes the marks copies those pages after the take: a chain returned before it was written before it,
    and one returned after it is marked for the next pass. The used rings are not marked here: the last
    pass, with the devices stopped, copies each live queue's whole (`Virtqueue.used_ring`).
    """

    def __init__(self, mem: GuestMemory) -> None:
        self._mem = mem
        self._pages = -(-mem.size // mmap.PAGESIZE)
        self._lock = threading.Lock()
        self._marks = bytearray(self._pages)

    def mark(self, views: List[memoryview]) -> None:
        offset_of = self._mem.offset_of
        with self._lock:
            marks = self._marks
            for v in views:
                n = len(v)
                if n:
                    off = offset_of(v)
                    first, end = off // mmap.PAGESIZE, (off + n - 1) // mmap.PAGESIZE + 1
                    marks[first:end] = b"\x01" * (end - first)

    def take(self) -> bytearray:
        """The marks since the last take (a byte a page of the host mapping), and a clean slate."""
        with self._lock:
            marks, self._marks = self._marks, bytearray(self._pages)
        return marks


def byte_runs(marks: bytearray) -> List[Tuple[int, int]]:
    """(first index, count) of each run of non-zero bytes in `marks`."""
    runs = []
    at = marks.find(1)
    while at >= 0:
        end = marks.find(0, at)
        if end < 0:
            end = len(marks)
        runs.append((at, end - at))
        at = marks.find(1, end)
    return runs


def _need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did used move past `event` between old and new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class Virtqueue:
    """Driver-configured fields (set through the transport) and the device's view of the rings."""

    def __init__(self, mem: GuestMemory, index: int, max_size: int) -> None:
        if not 1 <= max_size <= QUEUE_SIZE_MAX or max_size & (max_size - 1):
            raise ValueError("queue size must be a power of two up to 32768")
        self._drop_views()
        # Set by a device whose drivers hand over the same buffers again and again (virtio-blk:
        # O_DIRECT programs and databases reuse theirs): see _known_table.
        self.cache_tables = False
        self._mem = mem
        self.index = index
        self.max_size = max_size
        self.reset()

    @property
    def mem(self) -> GuestMemory:
        return self._mem

    @mem.setter
    def mem(self, mem: GuestMemory) -> None:
        self._drop_views()  # views into the old memory must not be handed out again
        self._mem = mem

    def _drop_views(self) -> None:
        """Forget the kept views of plain descriptors and of indirect tables."""
        self._views: Dict[tuple, memoryview] = {}
        self._tables: Dict[bytes, Tuple[tuple, tuple]] = {}
        self._table_views = 0

    def reset(self) -> None:
        self._drop_views()
        self.size = self.max_size
        self._avail16: Optional[memoryview] = None
        self._used16: Optional[memoryview] = None
        self._used32: Optional[memoryview] = None
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0
        self._desc: Optional[memoryview] = None
        self._avail: Optional[memoryview] = None
        self._used: Optional[memoryview] = None

    def save_state(self) -> dict:
        """What the driver configured and where the device is in the rings (snapshot/records.py QUEUE)."""
        return dict(size=self.size, ready=self.ready, desc_addr=self.desc_addr, avail_addr=self.avail_addr,
                    used_addr=self.used_addr, event_idx=self.event_idx, indirect=self.indirect,
                    last_avail=self.last_avail, used_idx=self.used_idx, signalled=self._signalled)

    def load_state(self, s: dict) -> None:
        """Take a checked record back, not live: the transport activates the queue if it was ready."""
        self.reset()
        self.size, self.desc_addr, self.avail_addr, self.used_addr = (
            s["size"], s["desc_addr"], s["avail_addr"], s["used_addr"])
        self.event_idx, self.indirect = s["event_idx"], s["indirect"]
        self.last_avail, self.used_idx, self._signalled = s["last_avail"], s["used_idx"], s["signalled"]
        self.ready = s["ready"]

    def activate(self, event_idx: bool, indirect: bool) -> None:
        """Check the rings the driver set up and map them; called when the queue goes live."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError("queue %d: size %d is not a power of two up to %d" % (self.index, size, self.max_size))
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise VirtqueueError("queue %d: misaligned ring addresses" % self.index)
        try:
            self._desc = self.mem.view(self.desc_addr, 16 * size)
            self._avail = self.mem.view(self.avail_addr, 6 + 2 * size)
            self._used = self.mem.view(self.used_addr, 6 + 8 * size)
        except GuestMemoryError as e:
            raise VirtqueueError("queue %d: ring outside guest memory: %s" % (self.index, e)) from None
        self._avail16 = self._avail.cast("H")  # [1] idx, [2 + i] ring, [2 + size] used_event
        self._used16 = self._used.cast("H")  # [1] idx, [2 + 4 * size] avail_event
        self._used32 = self._used[4 : 4 + 8 * size].cast("I")  # [2 * i] id, [2 * i + 1] len
        self._drop_views()
        self.event_idx = event_idx
        self.indirect = indirect
        # last_avail stays as reset() or the front end (vhost-user SET_VRING_BASE) left it.
        self.used_idx = self._used16[1]
        self._signalled = self.used_idx
        self.ready = True

    def used_ring(self) -> Optional[Tuple[int, int]]:
        """(guest address, length) of the used ring, everything the device writes in the rings; None if not live."""
        return (self.used_addr, 6 + 8 * self.size) if self.ready else None

    def track_writes(self, wlog: Optional[WriteLog]) -> None:
        """From now on mark in `wlog` the writable buffers of each chain pushed back; None: stop marking.

        Call with the device stopped (no chain popped and not pushed): what was popped before is not known.
        While marking, pop and push are this queue's own wrappers; otherwise the class's, with nothing added.
        """
        for name in ("pop", "push"):
            self.__dict__.pop(name, None)
        if wlog is None:
            return
        popped: Dict[int, List[memoryview]] = {}  # head -> its writable views: at most one per head
        pop, push = self.pop, self.push

        def tracked_pop() -> Optional[Chain]:
            chain = pop()
            if chain is not None and chain.writable:
                popped[chain.head] = chain.writable
            return chain

        def tracked_push(head: int, written: int) -> None:
            views = popped.pop(head, None)
            if views is not None:
                wlog.mark(views)
            push(head, written)

        self.pop = tracked_pop  # type: ignore[assignment]
        self.push = tracked_push  # type: ignore[assignment]

    # Device side -----------------------------------------------------------------

    def avail_idx(self) -> int:
        return self._avail16[1]

    def has_work(self) -> bool:
        return self.ready and self.avail_idx() != self.last_avail

    def available(self) -> int:
        """Chains the driver has offered and the device has not popped yet."""
        return (self._avail16[1] - self.last_avail) & 0xFFFF

    def pop(self) -> Optional[Chain]:
        """The next available chain, or None when the driver has offered nothing new."""
        avail = self._avail16
        last = self.last_avail
        pending = (avail[1] - last) & 0xFFFF
        if pending == 0:
            return None
        size = self.size
        if pending > size:
            raise VirtqueueError("queue %d: avail index jumped by %d" % (self.index, pending))
        head = avail[2 + last % size]
        self.last_avail = (last + 1) & 0xFFFF
        if head < size:
            # The usual chain is one plain descriptor (a network frame, a receive buffer):
            # checked here without the general walk, its view reused while the driver
            # keeps offering the same buffer.
            desc = _DESC.unpack_from(self._desc, 16 * head)
            flags = desc[2]
            if not flags & (DESC_F_NEXT | DESC_F_INDIRECT):
                buf = self._views.get(desc)
                if buf is None:
                    buf = self._plain_view(desc[0], desc[1], desc)
                return Chain(head, [], [buf]) if flags & DESC_F_WRITE else Chain(head, [buf], [])
        return self._walk(head)

    def _plain_view(self, addr: int, length: int, desc: tuple) -> memoryview:
        try:
            buf = self.mem.view(addr, length)
        except GuestMemoryError as e:
            raise VirtqueueError("queue %d: descriptor outside memory: %s" % (self.index, e)) from None
        views = self._views
        if len(views) >= VIEW_CACHE_MAX:
            views.clear()  # the driver moves its buffers around: start over
        views[desc] = buf
        return buf

    def unpop(self, count: int) -> None:
        """Put back the last `count` chains popped and not pushed: the next pops return them again."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise VirtqueueError("queue %d: head %d out of range" % (self.index, head))
        table, table_len, limit = self._desc, size, size
        readable: List[memoryview] = []
        writable: List[memoryview] = []
        i, count, in_indirect = head, 0, False
        view = self.mem.view
        unpack = _DESC.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, 16 * i)
            count += 1
            if count > limit:
                raise VirtqueueError("queue %d: chain from %d is longer than %d (a loop?)" % (self.index, head, limit))
            if flags & DESC_F_INDIRECT:
                if not self.indirect or in_indirect or flags & DESC_F_NEXT:
                    raise VirtqueueError("queue %d: bad indirect descriptor in chain %d" % (self.index, head))
                if length == 0 or length % 16 or length // 16 > INDIRECT_MAX:
                    raise VirtqueueError("queue %d: indirect table of %d bytes" % (self.index, length))
                try:
                    table = view(addr, length)
                except GuestMemoryError as e:
                    raise VirtqueueError("queue %d: indirect table outside memory: %s" % (self.index, e)) from None
                table_len = limit = length // 16
                if not readable and not writable:
                    chain = None
                    if self.cache_tables and table_len >= 3:
                        chain = self._known_table(head, table, table_len)
                    if chain is None:
                        chain = self._walk_linear_table(head, table, table_len)
                    if chain is not None:
                        return chain
                i, count, in_indirect = 0, 0, True
                continue
            try:
                buf = view(addr, length)
            except GuestMemoryError as e:
                raise VirtqueueError("queue %d: descriptor outside memory: %s" % (self.index, e)) from None
            if flags & DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                raise VirtqueueError("queue %d: readable descriptor after a writable one" % self.index)
            else:
                readable.append(buf)
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= table_len:
                raise VirtqueueError("queue %d: next %d out of range" % (self.index, nxt))
            i = nxt

    def _known_table(self, head: int, table: memoryview, n: int) -> Optional[Chain]:
        """A linear table whose inner entries (all but the first and last) were seen before; else None.

        virtio-blk's first entry is the request header and its last the
        status byte, both in the driver's per-request structure, which
        changes from request to request; the entries between name the data
        buffers, and a program that reads into one buffer sends the same
        ones again. Their views were checked when first seen; here only the
        first and the last entry are, against the same rules as
        _walk_linear_table. Anything else returns None and the full walk decides.
        """
        known = self._tables.get(bytes(table[16 : 16 * (n - 1)]))
        if known is None:
            return None
        inner, inner_readable = known
        addr0, len0, flags0, next0 = _DESC.unpack_from(table, 0)
        addr1, len1, flags1, _ = _DESC.unpack_from(table, 16 * (n - 1))
        if next0 != 1:
            return None
        if flags0 == DESC_F_NEXT | DESC_F_WRITE:
            if inner_readable:
                return None  # a readable entry after a writable one
            split = 0
        elif flags0 == DESC_F_NEXT:
            split = 1 + inner_readable
        else:
            return None
        if flags1 == 0:
            if split != n - 1:
                return None  # a readable last entry after writable ones
            split = n
        elif flags1 != DESC_F_WRITE:
            return None
        try:
            first, last = self.mem.view(addr0, len0), self.mem.view(addr1, len1)
        except GuestMemoryError:
            return None
        views = [first]
        views += inner
        views.append(last)
        return Chain(head, views[:split], views[split:])

    def _remember(self, table: memoryview, n: int, views: List[memoryview], k: int) -> None:
        """Keep the inner views of a linear table that passed every check (see _known_table)."""
        if self._table_views + n > TABLE_CACHE_VIEWS:
            self._tables = {}  # the driver moves its buffers around: start over
            self._table_views = 0
        inner_readable = min(max(k - 1, 0), n - 2)
        self._tables[bytes(table[16 : 16 * (n - 1)])] = (tuple(views[1 : n - 1]), inner_readable)
        self._table_views += n

    def _walk_linear_table(self, head: int, table: memoryview, n: int) -> Optional[Chain]:
        """An indirect table laid out as Linux writes it, checked and cut into views without a loop per entry.

        The layout: entry i links to i + 1, readable entries first, the
        last entry ends the chain. The checks run over whole columns of the
        table (C loops), and guest memory hands out all the views with one
        bounds check: ~18 us for the ~95 segments of a 1 MiB request from
        Linux, whose block layer has already merged adjacent pages. Anything
        else (links out of order, a chain ending early) returns None, and
        the general walk decides.
        """
        # Columns by native-format casts (little-endian on every host tenbox runs on).
        h16 = table.cast("H")
        nexts = h16[7::8].tolist()
        last = n - 1
        links = _LINKS.get(n)
        if links is None:
            links = _LINKS[n] = list(range(1, n))
        if nexts[:last] != links:
            return None
        flags = h16[6::8].tolist()
        # Flags: readable entries (NEXT), then writable ones (NEXT|WRITE), then the last without NEXT.
        try:
            k = flags.index(DESC_F_NEXT | DESC_F_WRITE, 0, last)
        except ValueError:
            k = last
        if flags[:k].count(DESC_F_NEXT) != k or flags[k:last].count(DESC_F_NEXT | DESC_F_WRITE) != last - k:
            return None
        end_flags = flags[last]
        if end_flags not in (0, DESC_F_WRITE) or (k < last and end_flags != DESC_F_WRITE):
            return None
        if end_flags == 0:
            k = n  # everything readable
        addrs = table.cast("Q")[0::2].tolist()
        ends = list(map(operator.add, addrs, table.cast("I")[2::4].tolist()))
        try:
            views = self.mem.views(addrs, ends)
        except GuestMemoryError:
            return None
        if self.cache_tables and n >= 3:
            self._remember(table, n, views, k)
        readable, writable = views[:k], views[k:]
        return Chain(head, readable, writable)

    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes filled in."""
        idx = self.used_idx
        slot = 2 * (idx % self.size)
        elem = self._used32
        elem[slot] = head
        elem[slot + 1] = written
        self.used_idx = (idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx  # one 16-bit store, after the element (x86 keeps store order)

    def push_many(self, heads: List[int]) -> None:
        """Return chains the device only read (0 bytes written), publishing them with one index store."""
        if not heads:
            return
        idx = self.used_idx
        size = self.size
        elem = self._used32
        for head in heads:
            slot = 2 * (idx % size)
            elem[slot] = head
            elem[slot + 1] = 0
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self._used16[1] = idx  # after every element, as in push()

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        if self.used_idx == self._signalled:
            return False
        if self.event_idx:
            used_event = self._avail16[2 + self.size]
            notify = _need_event(used_event, self.used_idx, self._signalled)
        else:
            notify = not self._avail16[0] & AVAIL_F_NO_INTERRUPT
        self._signalled = self.used_idx
        return notify

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if unprocessed buffers are waiting."""
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self.last_avail
        else:
            self._used16[0] = 0
        return self.avail_idx() != self.last_avail

    def disable_kicks(self) -> None:
        if not self.event_idx:
            self._used16[0] = USED_F_NO_NOTIFY
