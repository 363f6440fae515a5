"""virtio-net's batched data path: TX in batches, chains back after; RX straight in, in order; RX kicks only when starved."""

import struct
import threading

import pytest

from tenbox_vmm.devices.virtio import net as vnet
from tenbox_vmm.memory import MIB, GuestMemory
from tests.virtio_driver import BROADCAST_FRAME, NetDriver, RecordingBackend, net_device, wait_until

USED_F_NO_NOTIFY = 1


class BatchBackend(RecordingBackend):
    """Takes frames in batches, and checks none of their chains went back to the driver meanwhile."""

    def __init__(self, send):
        super().__init__(send)
        self.batches = []
        self.used_at_call = []
        self.room_seen = []
        self.ask_room = False
        self.tx_used = None  # set by the test: the driver's used index of the TX ring

    def input_many(self, frames):
        self.used_at_call.append(self.tx_used())
        self.batches.append([bytes(f) for f in frames])
        self.sent.extend(self.batches[-1])

    def poll_done(self, revents):
        if self.ask_room:
            self.room_seen.append(self.room())
        super().poll_done(revents)


@pytest.fixture
def rig():
    mem = GuestMemory(16 * MIB)
    dev, t, backend = net_device(mem, BatchBackend)
    d = NetDriver(t, mem)
    backend.tx_used = lambda: d.tx.used_idx()
    backend.room = dev.rx_room
    yield d, t, dev, backend
    t.close()
    mem.close()


def frame(i: int) -> bytes:
    return BROADCAST_FRAME[:12] + b"\x08\x00" + struct.pack("!H", i) + b"p" * 40


def used_flags(d) -> int:
    return d.mem.read_u16(d.rx.used)


def test_transmit_hands_frames_over_in_batches_and_returns_chains_only_after(rig):
    d, _, dev, backend = rig
    d.setup_net()
    for i in range(16):  # the ring holds 16
        d.tx.offer([bytes(vnet.HDR_LEN) + frame(i)], [])
    d.kick(vnet.TX)
    wait_until(lambda: d.tx.used_idx() == 16)
    assert backend.sent == [frame(i) for i in range(16)]
    assert backend.used_at_call[0] == 0  # the first batch's chains were still the device's
    assert all(len(b) <= vnet.TX_BATCH for b in backend.batches)
    assert [n for _, n in d.tx.take_used()] == [0] * 16


def test_a_batch_bigger_than_tx_batch_is_split(rig, monkeypatch):
    monkeypatch.setattr(vnet, "TX_BATCH", 4)
    d, _, dev, backend = rig
    d.setup_net()
    for i in range(10):
        d.tx.offer([bytes(vnet.HDR_LEN) + frame(i)], [])
    d.kick(vnet.TX)
    wait_until(lambda: d.tx.used_idx() == 10)
    assert [len(b) for b in backend.batches] == [4, 4, 2]
    assert backend.used_at_call == [0, 4, 8]
    assert backend.sent == [frame(i) for i in range(10)]


def test_runts_and_link_down_frames_are_dropped_but_their_chains_go_back(rig):
    d, _, dev, backend = rig
    d.setup_net()
    d.tx.offer([bytes(vnet.HDR_LEN) + b"short"], [])
    d.tx.offer([bytes(vnet.HDR_LEN) + frame(1)], [])
    d.kick(vnet.TX)
    wait_until(lambda: d.tx.used_idx() == 2)
    assert backend.sent == [frame(1)] and dev.tx_dropped == 1


def test_frames_keep_their_order_when_some_waited_for_buffers(rig):
    d, _, dev, backend = rig
    d.setup_net()
    backend.outgoing.extend(frame(i) for i in range(3))
    dev.wake()
    wait_until(lambda: len(dev._rx_backlog) == 3)  # no buffers yet
    bufs = [d.rx.offer([], [256])[1][0] for _ in range(5)]
    backend.outgoing.extend(frame(i) for i in range(3, 5))  # emitted in the same turn as the buffers arrive
    d.kick(vnet.RX)
    wait_until(lambda: d.rx.used_idx() == 5)
    got = [d.mem.read(bufs[k][0] + vnet.HDR_LEN, n - vnet.HDR_LEN) for k, (_, n) in enumerate(d.rx.take_used())]
    assert got == [frame(i) for i in range(5)]
    assert not dev._rx_backlog


def test_the_receive_queue_asks_for_kicks_only_while_frames_wait(rig):
    d, _, dev, backend = rig
    d.setup_net()
    bufs = [d.rx.offer([], [256])[1][0] for _ in range(2)]
    d.kick(vnet.RX)
    wait_until(lambda: used_flags(d) == USED_F_NO_NOTIFY)  # buffers in hand: no kicks wanted
    backend.outgoing.extend(frame(i) for i in range(3))
    dev.wake()
    wait_until(lambda: d.rx.used_idx() == 2 and len(dev._rx_backlog) == 1)
    wait_until(lambda: used_flags(d) == 0)  # starved with a frame waiting: kick me
    third = d.rx.offer([], [256])[1][0]
    d.kick(vnet.RX)
    wait_until(lambda: d.rx.used_idx() == 3)
    assert d.mem.read(third[0] + vnet.HDR_LEN, len(frame(2))) == frame(2)
    assert bufs


def test_rx_room_counts_buffers_on_the_io_thread_and_arms_a_kick_at_zero(rig):
    d, _, dev, backend = rig
    d.setup_net()
    assert dev.rx_room() == vnet.RX_BACKLOG_MAX  # not the I/O thread: the backlog's room
    for _ in range(4):
        d.rx.offer([], [256])
    d.kick(vnet.RX)
    backend.ask_room = True
    dev.wake()
    wait_until(lambda: 4 in backend.room_seen)
    backend.outgoing.extend(frame(i) for i in range(4))
    dev.wake()
    wait_until(lambda: d.rx.used_idx() == 4)
    backend.room_seen.clear()
    dev.wake()
    wait_until(lambda: 0 in backend.room_seen)
    assert used_flags(d) == 0  # the next buffer kicks the I/O thread


def test_rx_room_with_the_link_down_lets_the_backend_read_and_drop(rig):
    d, _, dev, backend = rig
    d.setup_net()
    dev.set_link(False)
    backend.ask_room = True
    dev.wake()
    wait_until(lambda: vnet.RX_BACKLOG_MAX in backend.room_seen)


def test_frames_from_another_thread_wait_in_the_backlog_and_arrive(rig):
    d, _, dev, backend = rig
    d.setup_net()
    buf = d.rx.offer([], [256])[1][0]
    d.kick(vnet.RX)
    t = threading.Thread(target=dev._from_backend, args=(frame(9),))
    t.start()
    t.join()
    wait_until(lambda: d.rx.used_idx() == 1 or len(dev._rx_backlog) == 1)
    dev.wake()
    wait_until(lambda: d.rx.used_idx() == 1)
    assert d.mem.read(buf[0] + vnet.HDR_LEN, len(frame(9))) == frame(9)


def test_mergeable_frame_waits_for_enough_buffers_without_losing_its_place(rig):
    d, _, dev, backend = rig
    d.setup_net()
    first = d.rx.offer([], [64])[1][0]
    d.kick(vnet.RX)
    big = BROADCAST_FRAME + b"z" * 100  # 154 bytes with the header: three 64-byte buffers
    backend.outgoing.extend([big, frame(1)])
    dev.wake()
    wait_until(lambda: len(dev._rx_backlog) == 2)
    assert d.rx.used_idx() == 0  # one buffer is not enough: it stays offered
    rest = [d.rx.offer([], [size])[1][0] for size in (64, 64, 128)]
    d.kick(vnet.RX)
    wait_until(lambda: d.rx.used_idx() == 4)
    used = d.rx.take_used()
    bufs = [first] + rest
    data = b"".join(d.mem.read(bufs[k][0], n) for k, (_, n) in enumerate(used[:3]))
    assert struct.unpack_from("<H", data, 10)[0] == 3 and data[vnet.HDR_LEN:] == big
    assert d.mem.read(rest[2][0] + vnet.HDR_LEN, len(frame(1))) == frame(1)


class SleepyBackend(BatchBackend):
    """A backend with nothing to poll and no timeout: the I/O thread sleeps until something wakes it."""

    def poll_prepare(self):
        return [], -1


def test_a_frame_sent_from_a_call_on_the_io_thread_is_signalled_without_waiting():
    mem = GuestMemory(16 * MIB)
    dev, t, backend = net_device(mem, SleepyBackend)
    try:
        d = NetDriver(t, mem)
        d.setup_net()
        buf = d.rx.offer([], [256])[1][0]
        d.kick(vnet.RX)
        dev.run_on_backend(lambda: backend.send(frame(3)))  # e.g. a forward change answering at once
        wait_until(lambda: d.rx.used_idx() == 1 and t.interrupt_status & 1)
        assert d.mem.read(buf[0] + vnet.HDR_LEN, len(frame(3))) == frame(3)
    finally:
        t.close()
        mem.close()
