"""Split virtqueues: chains, indirect tables, notification suppression, and a hostile driver."""

import struct

import pytest

from tenbox_vmm.devices.virtio.queue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Virtqueue, VirtqueueError,
                                            WriteLog, byte_runs)
from tenbox_vmm.memory import MIB
from tests.virtio_driver import HEAP, queue_pair



make = queue_pair


def test_chain_with_readable_then_writable_buffers(mem):
    drv, q = make(mem)
    head, writable = drv.offer([b"hdr!", b"payload"], [3, 1])
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hdr!", b"payload"]
    assert [len(v) for v in chain.writable] == [3, 1]
    chain.writable[0][:] = b"abc"
    assert mem.read(writable[0][0], 3) == b"abc"
    assert chain.read(6) == b"hdr!pa"
    assert q.pop() is None
    q.push(chain.head, 4)
    assert drv.take_used() == [(head, 4)]


def test_indirect_table(mem):
    drv, q = make(mem)
    head, _ = drv.offer_indirect([b"req"], [8, 1])
    chain = q.pop()
    assert chain.head == head and bytes(chain.readable[0]) == b"req" and [len(v) for v in chain.writable] == [8, 1]


def test_indirect_refused_unless_negotiated(mem):
    drv, q = make(mem, indirect=False)
    drv.offer_indirect([b"req"], [1])
    with pytest.raises(VirtqueueError, match="indirect"):
        q.pop()


def test_descriptor_loop_is_caught(mem):
    drv, q = make(mem, size=4)
    a, _ = drv.alloc(b"x")
    drv.write_desc(0, a, 1, DESC_F_NEXT, 1)
    drv.write_desc(1, a, 1, DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="loop"):
        q.pop()


def test_nested_indirect_is_refused(mem):
    drv, q = make(mem)
    inner, _ = drv.alloc(struct.pack("<QIHH", HEAP, 16, 0, 0))
    outer, _ = drv.alloc(struct.pack("<QIHH", inner, 16, DESC_F_INDIRECT, 0))
    drv.write_desc(0, outer, 16, DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="indirect"):
        q.pop()


@pytest.mark.parametrize("addr, length", [(16 * MIB - 4, 8), (0xD0000000, 16), ((1 << 64) - 8, 4)])
def test_buffers_outside_guest_memory_are_refused(mem, addr, length):
    drv, q = make(mem)
    drv.write_desc(0, addr, length, 0, 0)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="outside"):
        q.pop()


def test_head_and_next_out_of_range(mem):
    drv, q = make(mem, size=4)
    drv.publish(9)
    with pytest.raises(VirtqueueError, match="head"):
        q.pop()
    drv2, q2 = make(mem, size=4)
    a, _ = drv2.alloc(b"x")
    drv2.write_desc(0, a, 1, DESC_F_NEXT, 7)
    drv2.publish(0)
    with pytest.raises(VirtqueueError, match="next"):
        q2.pop()


def test_readable_after_writable_is_refused(mem):
    drv, q = make(mem)
    a, _ = drv.alloc(b"xx")
    drv.write_desc(0, a, 1, DESC_F_WRITE | DESC_F_NEXT, 1)
    drv.write_desc(1, a, 1, 0, 0)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="readable descriptor after"):
        q.pop()


def test_avail_index_jumping_past_the_queue_size_is_refused(mem):
    drv, q = make(mem, size=4)
    mem.write_u16(drv.avail + 2, 100)
    with pytest.raises(VirtqueueError, match="jumped"):
        q.pop()


def test_rings_must_be_inside_memory_and_aligned(mem):
    q = Virtqueue(mem, 0, 256)
    q.size = 256
    q.desc_addr, q.avail_addr, q.used_addr = 16 * MIB - 16, 0x1000, 0x2000
    with pytest.raises(VirtqueueError, match="outside"):
        q.activate(False, False)
    q.desc_addr = 0x3008
    with pytest.raises(VirtqueueError, match="misaligned"):
        q.activate(False, False)
    q.desc_addr, q.size = 0x3000, 100
    with pytest.raises(VirtqueueError, match="power of two"):
        q.activate(False, False)


def test_interrupt_suppression_without_event_idx(mem):
    drv, q = make(mem)
    drv.offer([b"a"], [1])
    q.push(q.pop().head, 1)
    assert q.needs_interrupt()
    mem.write_u16(drv.avail, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    drv.offer([b"b"], [1])
    q.push(q.pop().head, 1)
    assert not q.needs_interrupt()


def test_event_idx_interrupts_only_when_used_passes_used_event(mem):
    drv, q = make(mem, event_idx=True)
    drv.set_used_event(1)  # "interrupt me once the second buffer is used"
    for _ in range(3):
        drv.offer([b"a"], [1])
    q.push(q.pop().head, 1)
    assert not q.needs_interrupt()
    q.push(q.pop().head, 1)
    assert q.needs_interrupt()
    q.push(q.pop().head, 1)
    assert not q.needs_interrupt()


def test_kick_suppression_and_the_late_buffer_race(mem):
    drv, q = make(mem, event_idx=True)
    drv.offer([b"a"], [1])
    q.disable_kicks()
    q.pop()
    assert not q.enable_kicks()
    assert drv.avail_event() == 1  # the driver kicks again once it publishes index 1
    drv.offer([b"late"], [1])
    assert q.enable_kicks()  # a buffer arrived while kicks were off: process it now


# --- indirect tables whose inner entries were seen before (virtio-blk's reused buffers) ---------------------------

def blk_table(drv, data, hdr_flags=DESC_F_NEXT, status_flags=DESC_F_WRITE, first_next=1):
    """A header, the given data buffers (addr, len, writable) and a status byte, as Linux lays them out."""
    hdr, _ = drv.alloc(b"H" * 16)
    status, _ = drv.alloc(size=1)
    n = len(data) + 2
    entries = [(hdr, 16, hdr_flags, first_next)]
    entries += [(a, ln, DESC_F_NEXT | (DESC_F_WRITE if w else 0), i + 2) for i, (a, ln, w) in enumerate(data)]
    entries.append((status, 1, status_flags, 0))
    assert len(entries) == n
    return drv.offer_table(entries), hdr, status


def test_a_table_with_known_inner_entries_reuses_their_views(mem, monkeypatch):
    drv, q = make(mem)
    q.cache_tables = True
    bufs = [(drv.alloc(size=4096)[0], 4096, True) for _ in range(3)]
    walks = []
    full = Virtqueue._walk_linear_table
    monkeypatch.setattr(Virtqueue, "_walk_linear_table", lambda self, *a: walks.append(1) or full(self, *a))
    for _ in range(3):  # a new header and status each time, as each request has its own
        head, hdr, status = blk_table(drv, bufs)
        chain = q.pop()
        assert chain.head == head and bytes(chain.readable[0]) == b"H" * 16 and len(chain.readable) == 1
        assert [len(v) for v in chain.writable] == [4096, 4096, 4096, 1]
        chain.writable[1][:4] = b"abcd"
        chain.writable[3][:] = b"\x07"
        assert mem.read(bufs[1][0], 4) == b"abcd" and mem.read(status, 1) == b"\x07"
        q.push(chain.head, 0)
    assert len(walks) == 1  # only the first table was walked in full
    q.mem = mem  # new memory (vhost-user SET_MEM_TABLE): nothing known any more
    blk_table(drv, bufs)
    q.pop()
    assert len(walks) == 2


@pytest.mark.parametrize("case", ["writable header before readable data", "readable status after writable data",
                                  "status outside memory"])
def test_known_inner_entries_do_not_excuse_a_bad_first_or_last_entry(mem, case):
    drv, q = make(mem)
    q.cache_tables = True
    readable_data = case == "writable header before readable data"
    bufs = [(drv.alloc(size=512)[0], 512, not readable_data) for _ in range(2)]
    blk_table(drv, bufs)
    q.push(q.pop().head, 0)  # known now
    if case == "writable header before readable data":
        blk_table(drv, bufs, hdr_flags=DESC_F_NEXT | DESC_F_WRITE)
    elif case == "readable status after writable data":
        blk_table(drv, bufs, status_flags=0)
    else:
        hdr, _ = drv.alloc(b"H" * 16)
        inner = [(a, ln, DESC_F_NEXT | (DESC_F_WRITE if w else 0), i + 2) for i, (a, ln, w) in enumerate(bufs)]
        drv.offer_table([(hdr, 16, DESC_F_NEXT, 1)] + inner + [(mem.size - 1, 2, DESC_F_WRITE, 0)])
    with pytest.raises(VirtqueueError):
        q.pop()


def test_known_inner_entries_with_a_first_entry_linking_elsewhere_take_the_general_walk(mem):
    drv, q = make(mem)
    q.cache_tables = True
    bufs = [(drv.alloc(size=512)[0], 512, True) for _ in range(2)]
    blk_table(drv, bufs)
    q.push(q.pop().head, 0)
    blk_table(drv, bufs, first_next=2)  # header -> second buffer -> status: the first buffer is skipped
    chain = q.pop()
    assert [len(v) for v in chain.readable] == [16] and [len(v) for v in chain.writable] == [512, 1]


# Marking what devices write during a live snapshot (queue.WriteLog) -----------------------------


def test_while_tracked_a_chain_pushed_back_marks_the_pages_of_its_writable_buffers_only(mem):
    drv, q = make(mem)
    wlog = WriteLog(mem)
    q.track_writes(wlog)
    head, writable = drv.offer([b"x" * 5000], [9000, 1])  # the readable buffer spans two pages, not marked
    chain = q.pop()
    assert byte_runs(wlog.take()) == [], "popping marks nothing: the device has not written yet"
    q.push(chain.head, 9001)
    (a0, n0), (a1, _) = writable
    pages = set()
    for runs in byte_runs(wlog.take()):
        pages.update(range(runs[0], runs[0] + runs[1]))
    assert pages == set(range(a0 // 4096, (a0 + n0 - 1) // 4096 + 1)) | {a1 // 4096}
    assert byte_runs(wlog.take()) == [], "a take leaves a clean slate"
    assert drv.take_used() == [(head, 9001)]


def test_marks_follow_the_chain_through_an_indirect_table_and_stop_when_tracking_does(mem):
    drv, q = make(mem)
    wlog = WriteLog(mem)
    q.track_writes(wlog)
    _, writable = drv.offer_indirect([b"req"], [4096 * 3])
    q.push(q.pop().head, 1)
    addr, n = writable[0]
    assert byte_runs(wlog.take()) == [(addr // 4096, (addr + n - 1) // 4096 - addr // 4096 + 1)]
    q.track_writes(None)
    assert "pop" not in vars(q) and "push" not in vars(q), "untracked, the class's own methods run"
    drv.offer([], [100])
    q.push(q.pop().head, 100)
    assert byte_runs(wlog.take()) == []


def test_the_used_ring_is_where_the_device_writes_in_the_rings(mem):
    drv, q = make(mem)
    assert q.used_ring() == (q.used_addr, 6 + 8 * q.size)
    q.reset()
    assert q.used_ring() is None


def test_byte_runs():
    assert byte_runs(bytearray(b"\0\1\1\0\0\1")) == [(1, 2), (5, 1)]
    assert byte_runs(bytearray(b"\1\1")) == [(0, 2)]
    assert byte_runs(bytearray(4)) == []
