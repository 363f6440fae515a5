"""The virtio-mmio transport and the virtio-blk device, driven by a Python driver (no KVM needed)."""

import os
import select
import struct
import time

import pytest

from tenbox_vmm.devices.virtio import STATUS_DEVICE_NEEDS_RESET
from tenbox_vmm.devices.virtio import blk as vblk
from tenbox_vmm.devices.virtio import blk_io
from tenbox_vmm.devices.virtio import mmio as m
from tenbox_vmm.memory import MIB, GuestMemory
from tests.virtio_driver import MmioDriver, MmioHost


class RamDisk:
    """The Disk interface over a bytearray, with an optional injected error."""

    concurrent_io = False

    def __init__(self, size, read_only=False):
        self.path = "ram"
        self.format = "raw"
        self.size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.flushes = 0
        self.fail = None
        self.closed = False

    def _check(self):
        if self.fail:
            raise OSError(5, self.fail)

    def readv(self, offset, bufs):
        self._check()
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)

    def writev(self, offset, bufs):
        self._check()
        for b in bufs:
            self.data[offset : offset + len(b)] = b
            offset += len(b)

    def flush(self):
        self._check()
        self.flushes += 1

    def discard(self, offset, length):
        self.data[offset : offset + length] = bytes(length)

    def grow(self, size):
        self.data.extend(bytes(size - self.size))
        self.size = size

    def write_zeroes(self, offset, length, may_unmap):
        self.data[offset : offset + length] = bytes(length)

    def close(self):
        self.closed = True


class Driver(MmioDriver):
    """A virtio-blk driver: one request at a time, waited for."""

    def request(self, rtype, sector, data=b"", read_len=0):
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        readable = [hdr] + ([data] if data else [])
        head, writable = self.ring.offer(readable, ([read_len] if read_len else []) + [1])
        self.kick()
        (h, written), = self.wait_used()
        assert h == head
        status = self.mem.read(writable[-1][0], 1)[0]
        payload = self.mem.read(writable[0][0], read_len) if read_len else b""
        return status, written, payload


@pytest.fixture
def rig():
    mem = GuestMemory(16 * MIB)
    host = MmioHost()
    disk = RamDisk(1 * MIB)
    t = m.VirtioMmio(vblk.VirtioBlk(disk, serial="tenbox-serial-01"), mem, host)
    yield Driver(t, mem), t, disk, host
    t.close()
    mem.close()


def test_blk_identifies_itself_and_its_config(rig):
    d, t, disk, _ = rig
    assert d.r(m.R_DEVICE_ID) == 2
    assert t.read(m.CONFIG_OFFSET, 8) == 1 * MIB // 512  # capacity in sectors
    assert t.read(m.CONFIG_OFFSET + 20, 4) == 512


def test_write_read_flush_get_id(rig):
    d, _, disk, host = rig
    assert d.setup() is not None
    status, _, _ = d.request(vblk.T_OUT, 3, b"\xab" * 1024)
    assert status == vblk.S_OK and disk.data[3 * 512 : 5 * 512] == b"\xab" * 1024
    status, written, data = d.request(vblk.T_IN, 3, read_len=1024)
    assert (status, written, data) == (vblk.S_OK, 1025, b"\xab" * 1024)
    assert d.request(vblk.T_FLUSH, 0)[0] == vblk.S_OK and disk.flushes == 1
    status, _, ident = d.request(vblk.T_GET_ID, 0, read_len=20)
    assert ident.rstrip(b"\0") == b"tenbox-serial-01"
    assert select.select([host.irq], [], [], 1)[0]  # the interrupt went out through the irqfd
    assert d.r(m.R_INTERRUPT_STATUS) & 1
    d.w(m.R_INTERRUPT_ACK, 1)
    assert not d.r(m.R_INTERRUPT_STATUS) & 1


def test_discard_and_write_zeroes(rig):
    d, _, disk, _ = rig
    d.setup()
    disk.data[:4096] = b"\xff" * 4096
    seg = struct.pack("<QII", 0, 4, 0)
    assert d.request(vblk.T_DISCARD, 0, seg)[0] == vblk.S_OK
    assert disk.data[:2048] == bytes(2048) and disk.data[2048:4096] == b"\xff" * 2048
    seg = struct.pack("<QII", 4, 4, vblk.WZ_FLAG_UNMAP)
    assert d.request(vblk.T_WRITE_ZEROES, 0, seg)[0] == vblk.S_OK
    assert disk.data[:4096] == bytes(4096)


def test_out_of_range_and_unknown_requests(rig):
    d, _, _, _ = rig
    d.setup()
    assert d.request(vblk.T_IN, 2047, read_len=1024)[0] == vblk.S_IOERR  # crosses the end
    assert d.request(vblk.T_IN, 0, read_len=100)[0] == vblk.S_IOERR  # not whole sectors
    assert d.request(77, 0)[0] == vblk.S_UNSUPP


def test_host_io_error_fails_only_that_request(rig):
    d, _, disk, _ = rig
    d.setup()
    disk.fail = "injected EIO"
    assert d.request(vblk.T_IN, 0, read_len=512)[0] == vblk.S_IOERR
    disk.fail = None
    assert d.request(vblk.T_IN, 0, read_len=512)[0] == vblk.S_OK


def test_read_only_disk_refuses_writes():
    mem = GuestMemory(16 * MIB)
    disk = RamDisk(MIB, read_only=True)
    t = m.VirtioMmio(vblk.VirtioBlk(disk), mem, MmioHost())
    d = Driver(t, mem)
    feats = d.setup()
    assert feats & vblk.F_RO and not feats & vblk.F_DISCARD
    assert d.request(vblk.T_OUT, 0, b"x" * 512)[0] == vblk.S_IOERR
    assert disk.data[:512] == bytes(512)
    assert d.request(vblk.T_IN, 0, read_len=512)[0] == vblk.S_OK
    t.close()
    mem.close()


def test_features_the_device_did_not_offer_are_refused(rig):
    d, _, _, _ = rig
    d.features = (1 << 32) | (1 << 63)
    assert d.setup() is None
    d.features = 1 << 9  # FLUSH without VERSION_1
    assert d.setup() is None


def test_a_hostile_chain_marks_the_device_needs_reset(rig):
    d, _, _, _ = rig
    d.setup()
    d.ring.write_desc(0, 0xFFFFFFF000, 16, 0, 0)
    d.ring.publish(0)
    d.kick()
    deadline = time.monotonic() + 5
    while not d.r(m.R_STATUS) & STATUS_DEVICE_NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert d.r(m.R_INTERRUPT_STATUS) & 2  # config-change interrupt
    d.w(m.R_STATUS, 0)  # reset, then the device works again
    d.setup()
    assert d.request(vblk.T_IN, 0, read_len=512)[0] == vblk.S_OK


def test_moving_a_live_queue_marks_the_device_needs_reset(rig):
    d, _, _, _ = rig
    d.setup()
    d.w(m.R_QUEUE_DESC_LOW, 0x40000)
    assert d.r(m.R_STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_event_idx_and_indirect_are_negotiated(rig):
    d, t, _, _ = rig
    feats = d.setup(event_idx=True)
    assert feats & (1 << 29) and feats & (1 << 28)
    head, writable = d.ring.offer_indirect([struct.pack("<IIQ", vblk.T_IN, 0, 0)], [512, 1])
    d.kick()
    d.wait_used()
    assert d.mem.read(writable[-1][0], 1) == b"\0"


class ThreadedRamDisk(RamDisk):
    """A RamDisk that takes concurrent requests, as raw does, and records which thread did what."""

    concurrent_io = True

    def __init__(self, size):
        super().__init__(size)
        import threading

        self._lock = threading.Lock()
        self.log = []

    def _note(self, op, offset):
        import threading

        time.sleep(0.002)  # long enough that requests on several threads overlap
        with self._lock:
            self.log.append((op, offset, threading.current_thread().name))

    def writev(self, offset, bufs):
        self._note("write", offset)
        super().writev(offset, bufs)

    def readv(self, offset, bufs):
        self._note("read", offset)
        super().readv(offset, bufs)

    def flush(self):
        with self._lock:
            self.log.append(("flush", 0, None))
        super().flush()


def test_a_batch_runs_on_helper_threads_and_a_flush_waits_for_what_came_before():
    mem = GuestMemory(16 * MIB)
    disk = ThreadedRamDisk(1 * MIB)
    t = m.VirtioMmio(vblk.VirtioBlk(disk, runner=blk_io.HelperPool(2)), mem, MmioHost())
    d = Driver(t, mem)
    try:
        d.setup(size=64)  # 17 chains of 2 or 3 descriptors
        heads = {}
        for i in range(8):  # eight writes, a flush, eight reads of what they wrote: one kick
            hdr = struct.pack("<IIQ", vblk.T_OUT, 0, 8 * i)
            heads[d.ring.offer([hdr, bytes([i + 1]) * 4096], [1])[0]] = ("write", i, None)
        heads[d.ring.offer([struct.pack("<IIQ", vblk.T_FLUSH, 0, 0)], [1])[0]] = ("flush", 0, None)
        for i in range(8):
            head, writable = d.ring.offer([struct.pack("<IIQ", vblk.T_IN, 0, 8 * i)], [4096, 1])
            heads[head] = ("read", i, writable)
        d.kick()
        used = d.wait_used(len(heads))
        assert sorted(h for h, _ in used) == sorted(heads)
        for head, (op, i, writable) in heads.items():
            if op == "read":
                assert mem.read(writable[1][0], 1)[0] == vblk.S_OK
                assert mem.read(writable[0][0], 4096) == bytes([i + 1]) * 4096
        ops = [op for op, _, _ in disk.log]
        assert ops == ["write"] * 8 + ["flush"] + ["read"] * 8  # the flush is a barrier both ways
        workers = {name for op, _, name in disk.log if op != "flush"}
        assert len(workers) > 1 and any(n.startswith("virtio-blk-io") for n in workers), workers
    finally:
        t.close()
        mem.close()


def test_no_helper_threads_without_cores_to_spare_or_for_a_disk_that_cannot_share(monkeypatch):
    monkeypatch.setattr(blk_io.os, "cpu_count", lambda: 2)
    assert blk_io.default_io_helpers() == 0
    assert isinstance(blk_io.runner_for(ThreadedRamDisk(1 * MIB)), blk_io.InOrder)
    monkeypatch.setattr(blk_io.os, "cpu_count", lambda: 64)
    assert blk_io.default_io_helpers() == blk_io.IO_HELPERS_MAX - 1
    assert isinstance(blk_io.runner_for(RamDisk(1 * MIB)), blk_io.InOrder)  # concurrent_io = False
    pool = blk_io.runner_for(ThreadedRamDisk(1 * MIB))
    assert isinstance(pool, blk_io.HelperPool) and pool.helpers == blk_io.IO_HELPERS_MAX - 1
    pool.close()


class WatchedRamDisk(RamDisk):
    """Records, as each read starts, how many requests the ring shows done and whether an interrupt is pending."""

    def __init__(self, size, mem, host):
        super().__init__(size)
        self.mem, self.host, self.ring = mem, host, None
        self.seen = []

    def readv(self, offset, bufs):
        used_idx = struct.unpack("<H", self.mem.read(self.ring.used + 2, 2))[0]
        try:
            irq = int.from_bytes(os.read(self.host.irq, 8), "little")
        except BlockingIOError:
            irq = 0
        self.seen.append((used_idx, irq))
        super().readv(offset, bufs)


def test_each_completion_interrupts_before_the_next_request_runs():
    # Two reads offered with one kick: the driver hears of the first before the
    # second starts, so it can submit more while the device works.
    mem = GuestMemory(16 * MIB)
    host = MmioHost()
    disk = WatchedRamDisk(1 * MIB, mem, host)
    t = m.VirtioMmio(vblk.VirtioBlk(disk), mem, host)
    d = Driver(t, mem)
    try:
        d.setup(size=8)
        disk.ring = d.ring
        for sector in (0, 8):
            d.ring.offer([struct.pack("<IIQ", vblk.T_IN, 0, sector)], [4096, 1])
        d.kick()
        assert len(d.wait_used(2)) == 2
        assert disk.seen == [(0, 0), (1, 1)]
    finally:
        t.close()
        mem.close()


def _overlapping_request(d, rtype, data_addr, data_len, copies, read_len=0):
    """A request whose data is `copies` descriptors over the same guest buffer, in an indirect table."""
    from tenbox_vmm.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE

    hdr_addr, hdr_len = d.ring.alloc(struct.pack("<IIQ", rtype, 0, 0))
    status_addr, _ = d.ring.alloc(size=1)
    flags = DESC_F_NEXT | (DESC_F_WRITE if read_len else 0)
    entries = [(hdr_addr, hdr_len, DESC_F_NEXT, 1)]
    entries += [(data_addr, data_len, flags, k + 2) for k in range(copies)]
    entries.append((status_addr, 1, DESC_F_WRITE, 0))
    d.ring.offer_table(entries)
    d.kick()
    d.wait_used()
    return d.mem.read(status_addr, 1)[0]


@pytest.mark.parametrize("rtype", [vblk.T_DISCARD, vblk.T_WRITE_ZEROES])
def test_discard_with_more_segments_than_advertised_is_refused_before_any_copy(rig, rtype):
    """max_discard_seg is 1: 16 descriptors over one 1 MiB buffer (a million segments) are refused, not copied."""
    import tracemalloc

    d, t, disk, _ = rig
    d.setup(event_idx=True)
    assert t.read(m.CONFIG_OFFSET + 40, 4) == vblk.DISCARD_SEG_MAX == 1
    calls = []
    disk.discard = lambda offset, length: calls.append((offset, length))
    disk.write_zeroes = lambda offset, length, unmap: calls.append((offset, length))
    addr, n = d.ring.alloc(size=MIB)  # zeros: every 16 bytes a valid segment of 0 sectors at 0
    tracemalloc.start()
    try:
        status = _overlapping_request(d, rtype, addr, n, 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == vblk.S_UNSUPP
    assert calls == []
    assert peak < MIB, "%d bytes allocated for a refused request" % peak
    two = struct.pack("<QII", 0, 1, 0) * 2
    assert d.request(rtype, 0, two)[0] == vblk.S_UNSUPP  # two segments: more than advertised
    assert d.request(rtype, 0, struct.pack("<QII", 8, 2, 0))[0] == vblk.S_OK and calls == [(4096, 1024)]


def test_a_read_larger_than_seg_max_times_size_max_fails_before_any_io():
    """Overlapping descriptors make a 512 MiB read of one 4 MiB buffer of a large disk: refused, nothing read."""

    class LargeDisk(RamDisk):
        def __init__(self):
            super().__init__(0)
            self.size = 1 << 40
            self.reads = []

        def readv(self, offset, bufs):
            self.reads.append((offset, sum(map(len, bufs))))

    mem = GuestMemory(16 * MIB)
    disk = LargeDisk()
    t = m.VirtioMmio(vblk.VirtioBlk(disk), mem, MmioHost())
    try:
        d = Driver(t, mem)
        d.setup(event_idx=True)
        addr, n = d.ring.alloc(size=4 * MIB)
        assert 128 * n > vblk.REQUEST_MAX_BYTES
        assert _overlapping_request(d, vblk.T_IN, addr, n, 128, read_len=n) == vblk.S_IOERR
        assert disk.reads == []
        assert _overlapping_request(d, vblk.T_IN, addr, n, 2, read_len=n) == vblk.S_OK  # 8 MiB: within the bound
        assert disk.reads == [(0, 8 * MIB)]
    finally:
        t.close()
        mem.close()


def test_failed_requests_are_logged_at_most_a_burst_per_window(rig, caplog):
    """A guest that makes 500 requests fail gets GUEST_LOG_BURST lines in the worker's log, not 500."""
    import logging

    from tenbox_vmm.protocol import Limits

    d, _, _, _ = rig
    d.setup(event_idx=True)
    with caplog.at_level(logging.WARNING, logger="tenbox.virtio.blk"):
        for _ in range(500):
            assert d.request(vblk.T_IN, 4096, read_len=512)[0] == vblk.S_IOERR  # past the end
    lines = [r.getMessage() for r in caplog.records if r.name == "tenbox.virtio.blk"]
    assert len(lines) == Limits.GUEST_LOG_BURST, lines[:3]
    assert all("beyond the end" in l for l in lines)


def test_counters_count_completed_reads_writes_and_flushes_not_failures(rig):
    """What vm stats shows per disk: bytes and requests that completed; a failed one counts as an error only."""
    d, t, disk, _ = rig
    d.setup()
    dev = t.device
    assert d.request(vblk.T_OUT, 0, b"\x01" * 4096)[0] == vblk.S_OK
    assert d.request(vblk.T_IN, 0, read_len=1024)[0] == vblk.S_OK
    assert d.request(vblk.T_IN, 8, read_len=512)[0] == vblk.S_OK
    assert d.request(vblk.T_FLUSH, 0)[0] == vblk.S_OK
    assert d.request(vblk.T_IN, 1 * MIB // 512, read_len=512)[0] == vblk.S_IOERR  # past the end
    c = dev.counters()
    assert (c.read_bytes, c.read_ops, c.write_bytes, c.write_ops, c.flush_ops, c.errors) == (1536, 2, 4096, 1, 1, 1)
    assert c.capacity_bytes == 1 * MIB


def test_growing_the_disk_changes_the_capacity_and_raises_a_config_interrupt(rig):
    """A live resize: the config says the new capacity, ConfigGeneration moves, INT_CONFIG is set, sectors past the old end work."""
    d, t, disk, host = rig
    d.setup()
    gen = d.r(m.R_CONFIG_GENERATION)
    assert d.request(vblk.T_IN, 1 * MIB // 512, read_len=512)[0] == vblk.S_IOERR
    d.w(m.R_INTERRUPT_ACK, d.r(m.R_INTERRUPT_STATUS))
    assert t.device.grow(2 * MIB) == 2 * MIB
    assert t.read(m.CONFIG_OFFSET, 8) == 2 * MIB // 512
    assert d.r(m.R_CONFIG_GENERATION) != gen
    assert d.r(m.R_INTERRUPT_STATUS) & 2  # VIRTIO_MMIO_INT_CONFIG
    assert d.request(vblk.T_OUT, 1 * MIB // 512, b"\x07" * 512)[0] == vblk.S_OK
    assert disk.data[1 * MIB : 1 * MIB + 512] == b"\x07" * 512
    assert t.device.counters().capacity_bytes == 2 * MIB
