"""Split virtqueues: chains, indirect tables, notification suppression, and a hostile driver."""

import struct

import pytest

from tenbox_vmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Virtqueue, VirtqueueError
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
