"""The virtqueue fast paths network frames take: one-descriptor chains, views reused, batch completions, un-pop."""

import pytest

from tenbox_vmm.devices.virtio.queue import DESC_F_WRITE, VIEW_CACHE_MAX, VirtqueueError
from tenbox_vmm.memory import MIB, GuestMemory
from tests.virtio_driver import HEAP, queue_pair



@pytest.fixture
def mem():
    m = GuestMemory(16 * MIB)
    yield m
    m.close()


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
