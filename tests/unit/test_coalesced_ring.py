"""KVM's coalesced-write ring as tenbox drains it (tenbox_vmm.kvm.coalesced), on a page laid out as KVM does."""

import struct
import threading

import pytest

from tenbox_vmm.kvm.coalesced import CoalescedRing

PAGE = 4096
ENTRY = struct.Struct("<QII8s")
SLOTS = (PAGE - 8) // ENTRY.size


class KvmSide:
    """What KVM does: append an entry at `last` unless the ring is full, then advance `last`."""

    def __init__(self, page: bytearray) -> None:
        self.page = page

    def indexes(self):
        return struct.unpack_from("<II", self.page, 0)

    def write(self, addr: int, data: bytes, pio: bool = True) -> bool:
        first, last = self.indexes()
        if (last + 1) % SLOTS == first:
            return False  # full: KVM exits to user space for this write instead
        ENTRY.pack_into(self.page, 8 + last * ENTRY.size, addr, len(data), 1 if pio else 0, data.ljust(8, b"\0"))
        struct.pack_into("<I", self.page, 4, (last + 1) % SLOTS)
        return True


@pytest.fixture
def ring():
    page = bytearray(PAGE)
    played = []
    r = CoalescedRing(memoryview(page), lambda port, size, value: played.append(("pio", port, size, value)),
                      lambda addr, size, value: played.append(("mmio", addr, size, value)))
    yield r, KvmSide(page), played
    r.release()


def test_queued_writes_are_played_in_order_to_their_bus(ring):
    r, kvm, played = ring
    assert not r.pending()
    for ch in b"boot":
        assert kvm.write(0x3F8, bytes([ch]))
    assert kvm.write(0xD0000050, (7).to_bytes(4, "little"), pio=False)
    assert r.pending()
    assert r.drain() == 5
    assert not r.pending()
    assert played == [("pio", 0x3F8, 1, ch) for ch in b"boot"] + [("mmio", 0xD0000050, 4, 7)]
    assert kvm.indexes()[0] == kvm.indexes()[1]  # every slot handed back to KVM


def test_a_full_ring_refuses_more_until_drained_and_wraps_around(ring):
    r, kvm, played = ring
    n = 0
    while kvm.write(0x3F8, bytes([n & 0xFF])):
        n += 1
    assert n == SLOTS - 1  # one slot always stays free, as in KVM
    assert r.drain() == n
    for i in range(SLOTS // 2):  # these wrap past the end of the page
        assert kvm.write(0x3F8, bytes([i]))
    assert r.drain() == SLOTS // 2
    assert [v for _, _, _, v in played] == [i & 0xFF for i in range(n)] + list(range(SLOTS // 2))


def test_an_index_outside_the_ring_is_refused_not_followed(ring):
    r, kvm, played = ring
    struct.pack_into("<II", kvm.page, 0, 0, SLOTS + 5)
    with pytest.raises(ValueError):
        r.drain()
    assert played == []


def test_two_threads_draining_never_play_a_write_twice(ring):
    r, kvm, played = ring
    for round_ in range(50):
        for i in range(100):
            assert kvm.write(0x3F8, bytes([i]))
        threads = [threading.Thread(target=r.drain) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(played) == 50 * 100
