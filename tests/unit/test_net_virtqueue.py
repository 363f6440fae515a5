"""The virtqueue fast paths: one-descriptor chains, views reused, batch completions, un-pop, ordered indirect tables."""

import struct

import pytest

from tenbox_vmm.devices.virtio.queue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, VIEW_CACHE_MAX, Virtqueue,
                                             VirtqueueError)
from tenbox_vmm.memory import MIB, GuestMemoryError
from tests.virtio_driver import HEAP, queue_pair


make = queue_pair


def test_a_buffer_offered_again_gives_the_same_view_and_its_current_bytes(mem):
    drv, q = make(mem)
    addr, n = drv.alloc(b"first")
    drv.write_desc(0, addr, n, 0, 0)
    drv.publish(0)
    v1 = q.pop().readable[0]
    q.push(0, 0)
    mem.write(addr, b"again")
    drv.publish(0)
    chain = q.pop()
    assert chain.readable[0] is v1 and bytes(chain.readable[0]) == b"again"


def test_a_descriptor_moved_elsewhere_is_checked_and_viewed_anew(mem):
    drv, q = make(mem)
    a, n = drv.alloc(b"aaaa")
    b, _ = drv.alloc(b"bbbb")
    drv.write_desc(0, a, n, DESC_F_WRITE, 0)
    drv.publish(0)
    assert q.pop().writable[0].tobytes() == b"aaaa"
    q.push(0, 0)
    drv.write_desc(0, b, n, DESC_F_WRITE, 0)
    drv.publish(0)
    assert q.pop().writable[0].tobytes() == b"bbbb"
    q.push(0, 0)
    drv.write_desc(0, 16 * MIB - 2, n, DESC_F_WRITE, 0)  # runs past the end of RAM
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="outside memory"):
        q.pop()


def test_the_view_cache_is_bounded_and_dropped_with_the_memory(mem):
    drv, q = make(mem)
    for i in range(VIEW_CACHE_MAX + 5):
        drv.write_desc(0, HEAP + i, 1, 0, 0)
        drv.publish(0)
        q.pop()
        q.push(0, 0)
    assert 0 < len(q._views) <= VIEW_CACHE_MAX
    q.mem = mem  # vhost-user hands a queue new memory: nothing of the old may be reused
    assert q._views == {}
    q.pop()  # nothing offered; the queue still works
    q.reset()
    assert q._views == {}


def test_push_many_completes_in_order_with_nothing_written(mem):
    drv, q = make(mem)
    heads = [drv.offer([b"x%d" % i], [])[0] for i in range(5)]
    chains = [q.pop() for _ in range(5)]
    assert [c.head for c in chains] == heads
    q.push_many([c.head for c in chains])
    assert drv.take_used() == [(h, 0) for h in heads]
    q.push_many([])
    assert drv.used_idx() == 5


def test_unpop_gives_the_same_chains_again_and_available_counts_them(mem):
    drv, q = make(mem)
    heads = [drv.offer([], [16])[0] for _ in range(3)]
    assert q.available() == 3
    q.pop()
    q.pop()
    assert q.available() == 1
    q.unpop(2)
    assert q.available() == 3
    assert [q.pop().head for _ in range(3)] == heads


# Indirect tables in order (as Linux writes them): checked by columns, every view in one call.

def offer_table(drv, entries):
    """An indirect chain from (addr, len, write) entries linked in order; its head."""
    table = b"".join(struct.pack("<QIHH", a, n, (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k < len(entries) - 1 else 0),
                                 k + 1 if k < len(entries) - 1 else 0)
                     for k, (a, n, w) in enumerate(entries))
    taddr, tlen = drv.alloc(table)
    head = drv.next_desc
    drv.next_desc = (head + 1) % drv.size
    drv.write_desc(head, taddr, tlen, DESC_F_INDIRECT, 0)
    drv.publish(head)
    return head


def streams(chain):
    return b"".join(bytes(v) for v in chain.readable), b"".join(bytes(v) for v in chain.writable)


def general_walk(monkeypatch, q, head):
    with monkeypatch.context() as m:
        m.setattr(Virtqueue, "_walk_linear_table", lambda *a: None)
        return q._walk(head)


def test_an_ordered_indirect_table_reads_as_the_general_walk_reads_it(mem, monkeypatch):
    drv, q = make(mem)
    page = 0x400000
    mem.write(page, bytes(range(256)) * 64)  # 4 pages of data, then the status byte right after
    hdr, _ = drv.alloc(b"H" * 16)
    head = offer_table(drv, [(hdr, 16, False)] + [(page + 4096 * k, 4096, True) for k in range(4)]
                       + [(page + 4 * 4096, 1, True)])
    chain = q.pop()
    assert chain.head == head
    assert [len(v) for v in chain.readable] == [16] and [len(v) for v in chain.writable] == [4096] * 4 + [1]
    assert streams(chain) == streams(general_walk(monkeypatch, q, head))


def test_scattered_or_out_of_order_tables_read_as_the_general_walk_reads_them(mem):
    drv, q = make(mem)
    bufs = [drv.alloc(bytes([k]) * 100) for k in range(3)] + [drv.alloc(size=50), drv.alloc(size=1)]
    head = offer_table(drv, [(a, n, k >= 3) for k, (a, n) in enumerate(bufs)])
    chain = q.pop()
    assert chain.head == head
    assert [len(v) for v in chain.readable] == [100, 100, 100] and [len(v) for v in chain.writable] == [50, 1]
    # Links out of order (0 -> 2 -> 1): the general walk takes over and follows them.
    table = b"".join(struct.pack("<QIHH", a, n, f, nx) for a, n, f, nx in
                     [(bufs[0][0], 100, DESC_F_NEXT, 2), (bufs[2][0], 100, 0, 0), (bufs[1][0], 100, DESC_F_NEXT, 1)])
    taddr, tlen = drv.alloc(table)
    drv.write_desc(5, taddr, tlen, DESC_F_INDIRECT, 0)
    drv.publish(5)
    chain = q.pop()
    assert streams(chain)[0] == bytes([0]) * 100 + bytes([1]) * 100 + bytes([2]) * 100


def test_buffers_in_two_memory_regions_get_a_view_each(mem):
    class TwoRegions:
        """Guest memory as two regions meeting at 8 MiB: no view may span both."""

        def view(self, gpa, length):
            if gpa < 8 * MIB < gpa + length:
                raise GuestMemoryError("spans two regions")
            return mem.view(gpa, length)

        def views(self, starts, ends):
            return [self.view(a, e - a) for a, e in zip(starts, ends)]

    drv, q = make(mem)
    q.mem = TwoRegions()
    head = offer_table(drv, [(8 * MIB - 4096, 4096, True), (8 * MIB, 4096, True)])
    chain = q.pop()
    assert chain.head == head and [len(v) for v in chain.writable] == [4096, 4096]


def test_readable_after_writable_in_an_ordered_table_is_refused(mem):
    drv, q = make(mem)
    a, _ = drv.alloc(size=64)
    b, _ = drv.alloc(b"late")
    offer_table(drv, [(a, 64, True), (b, 4, False)])
    with pytest.raises(VirtqueueError, match="readable descriptor after a writable"):
        q.pop()
