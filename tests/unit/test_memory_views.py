"""Batched views of guest memory (`views`): the worker's GuestMemory and the vhost-user back end's VhostMemory."""

import os

import pytest

from tenbox_vmm.memory import GIB, MIB, MMIO_HOLE_END, MMIO_HOLE_START, GuestMemory, GuestMemoryError
from tenbox_vmm.vhost_user.memory import VhostMemory


@pytest.fixture
def big():
    """RAM below the MMIO hole and above 4 GiB (an anonymous mapping: untouched pages cost nothing)."""
    m = GuestMemory(MMIO_HOLE_START + GIB)
    yield m
    m.close()


@pytest.fixture
def vhost():
    """Two memfd regions meeting at 1 MiB, as a front end may hand them over."""
    regions = []
    for gpa in (0, MIB):
        fd = os.memfd_create("region")
        os.ftruncate(fd, MIB)
        regions.append((gpa, MIB, 0x7F0000000000 + gpa, 0, fd))
    m = VhostMemory(regions)
    yield m
    m.close()


def test_views_in_one_region_are_the_views_view_gives(big):
    big.write(0x1000, b"abcdef")
    big.write(MMIO_HOLE_END + 0x2000, b"ghij")
    got = big.views([0x1000, 0x1003], [0x1003, 0x1006])
    assert [bytes(v) for v in got] == [b"abc", b"def"]
    got = big.views([MMIO_HOLE_END + 0x2000], [MMIO_HOLE_END + 0x2004])
    assert bytes(got[0]) == b"ghij"
    got[0][:1] = b"G"  # writable, into guest RAM
    assert big.read(MMIO_HOLE_END + 0x2000, 4) == b"Ghij"


def test_views_spread_over_both_regions_are_each_checked(big):
    big.write(0x10, b"lo")
    big.write(MMIO_HOLE_END + 0x10, b"hi")
    got = big.views([0x10, MMIO_HOLE_END + 0x10], [0x12, MMIO_HOLE_END + 0x12])
    assert [bytes(v) for v in got] == [b"lo", b"hi"]


@pytest.mark.parametrize("start, end", [
    (MMIO_HOLE_START - 8, MMIO_HOLE_START + 8),  # into the MMIO hole
    (MMIO_HOLE_END + GIB - 4, MMIO_HOLE_END + GIB + 4),  # past the end of RAM
])
def test_a_range_outside_ram_is_refused(big, start, end):
    with pytest.raises(GuestMemoryError):
        big.views([0x1000, start], [0x1010, end])


def test_vhost_views_within_and_across_regions(vhost):
    vhost.write(MIB - 2, b"ab")
    vhost.write(MIB, b"cd")
    assert [bytes(v) for v in vhost.views([MIB - 2, MIB], [MIB, MIB + 2])] == [b"ab", b"cd"]
    with pytest.raises(GuestMemoryError):
        vhost.views([MIB - 2], [MIB + 2])  # one range over two mappings
    with pytest.raises(GuestMemoryError):
        vhost.views([0], [2 * MIB + 1])
    assert vhost.views([], []) == []
