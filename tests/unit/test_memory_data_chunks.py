"""GuestMemory.data_chunks: which MiB of guest RAM may hold data, by the kernel's page tables and the
snapshot file's holes (a live snapshot's first pass reads only those). Real mappings, the real pagemap."""

import mmap
import os

import pytest

from tenbox_vmm import memory
from tenbox_vmm.memory import MIB, GuestMemory
from tenbox_vmm.sandbox import libc

RAM = 16 * MIB
FILE_RAM_AT = 8192  # where RAM starts in the test's "snapshot" file


def marked(mem):
    chunks = mem.data_chunks(MIB)
    assert chunks is not None and len(chunks) == RAM // MIB
    return [i for i, b in enumerate(chunks) if b]


@pytest.fixture
def anon():
    mem = GuestMemory(RAM)
    yield mem
    mem.close()


def test_anonymous_ram_marks_the_chunks_written_or_read_and_none_after_a_reset(anon):
    assert marked(anon) == []
    anon.write(3 * MIB + 4095, b"x")  # one byte, the last page of chunk 3
    anon.write(9 * MIB, bytes(1))  # a zero written is still a page behind it: read, found zero, a hole
    anon.read(12 * MIB + 100, 8)  # a read maps the shared zero page: the kernel cannot tell it from data
    assert marked(anon) == [3, 9, 12]
    anon.clear()  # MADV_DONTNEED: the guest sees zeros again
    assert marked(anon) == []


def test_a_chunk_that_is_not_whole_pages_is_refused(anon):
    with pytest.raises(ValueError, match="whole pages"):
        anon.data_chunks(MIB + 1)


def test_the_last_chunk_may_be_part_of_one():
    mem = GuestMemory(RAM + 8192)
    try:
        mem.write(RAM + 4096, b"y")
        chunks = mem.data_chunks(MIB)
        assert len(chunks) == RAM // MIB + 1 and chunks[-1] == 1 and chunks.count(1) == 1
    finally:
        mem.close()


@pytest.fixture
def from_file(tmp_path):
    """RAM mapped MAP_PRIVATE from a sparse file with data in its chunks 2 and 7 (a restored guest's)."""
    path = tmp_path / "ram.snap"
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, FILE_RAM_AT + RAM)
    os.pwrite(fd, b"data", FILE_RAM_AT + 2 * MIB + 10)
    os.pwrite(fd, b"more" * 2048, FILE_RAM_AT + 7 * MIB - 4096)  # the last page of 6 and the first of 7
    os.pwrite(fd, b"before RAM", 0)  # the header's place: not RAM
    mapping = mmap.mmap(fd, RAM, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=FILE_RAM_AT)
    mem = GuestMemory(RAM, mapping, None, (fd, FILE_RAM_AT))
    yield mem
    mem.close()


def test_ram_from_a_file_marks_the_files_data_and_the_guests_own_pages(from_file):
    data = marked(from_file)
    # A file system may keep a little more than the bytes written as data (whole blocks, never less).
    assert {2, 6, 7} <= set(data) and len(data) <= 4, data
    from_file.read(11 * MIB, 4096)  # the file's page, a hole: still zeros, not the guest's
    from_file.write(14 * MIB, b"z")  # copied on write: the guest's own now
    assert set(marked(from_file)) == set(data) | {14}


def test_ram_from_a_file_it_was_not_given_a_descriptor_of_cannot_say(from_file):
    mem = GuestMemory(RAM, mmap.mmap(from_file._backing[0], RAM, mmap.MAP_PRIVATE, offset=FILE_RAM_AT))
    try:
        assert mem.data_chunks(MIB) is None
    finally:
        mem.close()


def test_without_pagemap_it_cannot_say(anon, monkeypatch):
    monkeypatch.setattr(memory, "_pagemap_fd", None)
    monkeypatch.setattr(memory, "PAGEMAP", "/nonexistent/pagemap")
    assert anon.data_chunks(MIB) is None


def test_a_pagemap_opened_ahead_is_used_after_its_path_is_gone(anon, monkeypatch):
    monkeypatch.setattr(memory, "_pagemap_fd", None)
    fd = os.open(memory.PAGEMAP, os.O_RDONLY)
    memory.keep_pagemap(fd)
    try:
        monkeypatch.setattr(memory, "PAGEMAP", "/nonexistent/pagemap")
        anon.write(5 * MIB, b"x")
        assert marked(anon) == [5]
    finally:
        os.close(fd)


def frame_number(fd, address):
    entry = int.from_bytes(os.pread(fd, 8, 8 * (address // mmap.PAGESIZE)), "little")
    assert entry >> 63, "the page is there"
    return entry & ((1 << 55) - 1)


def test_the_sandbox_opens_pagemap_without_the_right_to_see_frame_numbers(anon):
    """The worker keeps its pagemap (sandbox._keep_pagemap) opened without CAP_SYS_ADMIN: it says which pages
    are there, never where they sit in host memory. Its capabilities are as they were after the open."""
    anon.write(0, b"x")
    caps = [line for line in open("/proc/self/status") if line.startswith("Cap")]
    fd = libc.open_without_capability(memory.PAGEMAP, os.O_RDONLY, libc.CAP_SYS_ADMIN)
    plain = os.open(memory.PAGEMAP, os.O_RDONLY)
    try:
        assert [line for line in open("/proc/self/status") if line.startswith("Cap")] == caps
        assert frame_number(fd, anon.host_address) == 0
        if os.geteuid() == 0:  # root's own open sees it, which shows the one above could
            assert frame_number(plain, anon.host_address) != 0
    finally:
        os.close(fd)
        os.close(plain)
