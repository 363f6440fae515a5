"""A virtio driver in Python, for tests: lays out split rings in guest memory and offers chains (tests only)."""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

from tenbox_vmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Virtqueue
from tenbox_vmm.memory import GuestMemory


class RingDriver:
    """Owns one queue's rings at `base` and a bump allocator for buffers after them."""

    def __init__(self, mem: GuestMemory, base: int, size: int, heap: int) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.heap = heap
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))

    def alloc(self, data: bytes = b"", size: Optional[int] = None) -> Tuple[int, int]:
        n = len(data) if size is None else size
        addr = self.heap
        self.heap = (self.heap + n + 15) & ~15
        if data:
            self.mem.write(addr, data)
        return addr, n

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, readable: Sequence[bytes], writable_sizes: Sequence[int]) -> Tuple[int, List[Tuple[int, int]]]:
        """Make a chain available; returns (head, [(addr, len) of each writable buffer])."""
        bufs = [(self.alloc(d), 0) for d in readable] + [(self.alloc(size=n), DESC_F_WRITE) for n in writable_sizes]
        head = self.next_desc
        idxs = [(head + k) % self.size for k in range(len(bufs))]
        self.next_desc = (head + len(bufs)) % self.size
        for k, ((addr, n), flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.write_desc(idxs[k], addr, n, flags | (0 if last else DESC_F_NEXT), 0 if last else idxs[k + 1])
        self.publish(head)
        return head, [b for b, f in bufs if f]

    def offer_indirect(self, readable: Sequence[bytes], writable_sizes: Sequence[int]) -> Tuple[int, List[Tuple[int, int]]]:
        bufs = [(self.alloc(d), 0) for d in readable] + [(self.alloc(size=n), DESC_F_WRITE) for n in writable_sizes]
        entries = []
        for k, ((addr, n), flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            entries.append((addr, n, flags | (0 if last else DESC_F_NEXT), 0 if last else k + 1))
        return self.offer_table(entries), [b for b, f in bufs if f]

    def offer_table(self, entries: Sequence[Tuple[int, int, int, int]]) -> int:
        """Make an indirect table of (addr, len, flags, next) entries available, as given; returns the head."""
        taddr, tlen = self.alloc(b"".join(struct.pack("<QIHH", *e) for e in entries))
        head = self.next_desc
        self.next_desc = (head + 1) % self.size
        self.write_desc(head, taddr, tlen, DESC_F_INDIRECT, 0)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def take_used(self) -> List[Tuple[int, int]]:
        out = []
        while self.used_seen != self.used_idx():
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.used_seen % self.size), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)


RING = 0x10000  # where queue_pair() lays out the rings
HEAP = 0x100000  # and where its buffers start


def queue_pair(mem: GuestMemory, size: int = 8, event_idx: bool = False,
               indirect: bool = True) -> Tuple[RingDriver, Virtqueue]:
    """A driver and the device's live Virtqueue on the same rings."""
    drv = RingDriver(mem, RING, size, HEAP)
    q = Virtqueue(mem, 0, 256)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = drv.desc, drv.avail, drv.used
    q.activate(event_idx, indirect)
    return drv, q
