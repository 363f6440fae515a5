"""virtio-net's device logic with a recording backend: TX, RX (mergeable or not), link state."""

import struct
import time

import pytest

from tenbox_vmm.devices.virtio import mmio as m
from tenbox_vmm.devices.virtio import net as vnet
from tenbox_vmm.memory import MIB, GuestMemory
from tests.virtio_driver import BROADCAST_FRAME, NetDriver, RecordingBackend, net_device, wait_until


@pytest.fixture
def rig():
    mem = GuestMemory(16 * MIB)
    dev, t, backend = net_device(mem, RecordingBackend)
    yield NetDriver(t, mem), t, dev, backend
    t.close()
    mem.close()


def test_config_has_the_mac_and_link_up(rig):
    d, t, _, _ = rig
    assert d.r(m.R_DEVICE_ID) == 1
    assert bytes(t.read(m.CONFIG_OFFSET + i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert t.read(m.CONFIG_OFFSET + 6, 2) & vnet.S_LINK_UP


def test_transmit_strips_the_header(rig):
    d, _, dev, backend = rig
    d.setup_net()
    d.tx.offer([bytes(vnet.HDR_LEN) + BROADCAST_FRAME], [])
    d.tx.offer([bytes(vnet.HDR_LEN), BROADCAST_FRAME[:20], BROADCAST_FRAME[20:]], [])  # split across descriptors
    d.kick(vnet.TX)
    wait_until(lambda: len(backend.sent) == 2)
    assert backend.sent == [BROADCAST_FRAME, BROADCAST_FRAME]
    assert len(d.tx.take_used()) == 2


def test_receive_with_mergeable_buffers_spans_chains(rig):
    d, _, dev, backend = rig
    feats = d.setup_net()
    assert feats & vnet.F_MRG_RXBUF
    bufs = [d.rx.offer([], [64])[1][0] for _ in range(4)]
    d.kick(vnet.RX)
    big = BROADCAST_FRAME + b"z" * 100  # 142 bytes + 12-byte header: three 64-byte buffers
    backend.outgoing.append(big)
    dev.wake()
    wait_until(lambda: d.rx.used_idx() == 3)
    used = d.rx.take_used()
    data = b"".join(d.mem.read(bufs[i][0], n) for i, (_, n) in enumerate(used))
    flags, _, _, _, _, _, nbufs = struct.unpack("<BBHHHHH", data[:12])
    assert nbufs == 3 and data[12:] == big
    assert flags & vnet.HDR_F_DATA_VALID


def test_receive_waits_for_buffers_and_drops_oversize_without_mergeable(rig):
    d, _, dev, backend = rig
    d.setup_net(features_off=vnet.F_MRG_RXBUF)
    backend.outgoing.append(BROADCAST_FRAME)
    dev.wake()
    time.sleep(0.05)
    assert d.rx.used_idx() == 0 and len(dev._rx_backlog) == 1  # no buffers yet: the frame waits
    small = d.rx.offer([], [20])[1][0]
    d.kick(vnet.RX)
    wait_until(lambda: d.rx.used_idx() == 1)
    assert d.rx.take_used()[0][1] == 0 and dev.rx_dropped == 1  # 54 bytes never fit 20
    good = d.rx.offer([], [2048])[1][0]
    backend.outgoing.append(BROADCAST_FRAME)
    dev.wake()
    wait_until(lambda: d.rx.used_idx() == 2)
    (_, n), = d.rx.take_used()
    assert d.mem.read(good[0] + 12, n - 12) == BROADCAST_FRAME


def test_link_down_drops_both_ways_and_raises_a_config_interrupt(rig):
    d, t, dev, backend = rig
    d.setup_net()
    gen = d.r(m.R_CONFIG_GENERATION)
    dev.set_link(False)
    assert not t.read(m.CONFIG_OFFSET + 6, 2) & vnet.S_LINK_UP
    assert d.r(m.R_CONFIG_GENERATION) != gen and d.r(m.R_INTERRUPT_STATUS) & 2
    d.tx.offer([bytes(vnet.HDR_LEN) + BROADCAST_FRAME], [])
    d.kick(vnet.TX)
    wait_until(lambda: d.tx.used_idx() == 1)
    assert backend.sent == [] and dev.tx_dropped == 1
    dev.set_link(True)
    d.tx.offer([bytes(vnet.HDR_LEN) + BROADCAST_FRAME], [])
    d.kick(vnet.TX)
    wait_until(lambda: len(backend.sent) == 1)


def test_the_polling_back_end_watches_transmit_only_after_full_frames(rig):
    # tenbox-vhost-user-net spins on the transmit ring only while the guest sends data: bare ACKs
    # (a download) leave the core to the guest.
    from tenbox_vmm.vhost_user.backend import POLL_NET_TX_MIN_BYTES, AdaptivePoller

    d, t, dev, backend = rig
    d.setup_net()
    poller = AdaptivePoller(dev, [])
    ack = BROADCAST_FRAME[:14] + bytes(40)  # an Ethernet header and a 40-byte TCP/IP ACK
    for _ in range(3):
        d.tx.offer([bytes(vnet.HDR_LEN) + ack], [])
    d.kick(vnet.TX)
    wait_until(lambda: len(backend.sent) == 3)
    wait_until(lambda: dev.tx_last_bytes == 3 * len(ack))
    assert 3 * len(ack) < POLL_NET_TX_MIN_BYTES and not poller.worth_polling()
    data = BROADCAST_FRAME[:14] + bytes(1500)
    d.tx.offer([bytes(vnet.HDR_LEN) + data], [])
    d.kick(vnet.TX)
    wait_until(lambda: len(backend.sent) == 4)
    wait_until(lambda: dev.tx_last_bytes == len(data))
    assert poller.worth_polling()


def test_a_transmit_chain_naming_the_same_memory_many_times_is_dropped_without_a_copy(rig):
    """64 descriptors over one 1 MiB buffer (64 MiB): counted before any join, dropped, nothing allocated."""
    import tracemalloc

    from tenbox_vmm.devices.virtio.queue import DESC_F_NEXT

    d, _, dev, backend = rig
    d.setup_net()
    addr, n = d.tx.alloc(size=MIB)
    entries = [(addr, n, DESC_F_NEXT, k + 1) for k in range(63)] + [(addr, n, 0, 0)]
    tracemalloc.start()
    try:
        d.tx.offer_table(entries)
        d.kick(vnet.TX)
        wait_until(lambda: d.tx.used_idx() == 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dev.tx_dropped == 1 and backend.sent == []
    assert peak < MIB, "%d bytes allocated for a frame that is dropped" % peak
    d.tx.offer([bytes(vnet.HDR_LEN), BROADCAST_FRAME], [])  # the device still works
    d.kick(vnet.TX)
    wait_until(lambda: backend.sent == [BROADCAST_FRAME])


def test_counters_count_frames_and_bytes_both_ways(rig):
    """What vm stats shows for the card: frames and their bytes (without the virtio-net header), and drops."""
    d, _, dev, backend = rig
    d.setup_net()
    d.tx.offer([bytes(vnet.HDR_LEN) + BROADCAST_FRAME], [])
    d.tx.offer([bytes(vnet.HDR_LEN) + b"short"], [])  # under 14 bytes: dropped
    d.kick(vnet.TX)
    wait_until(lambda: dev.tx_dropped == 1 and dev.tx_frames == 1)
    d.rx.offer([], [2048])
    d.kick(vnet.RX)
    backend.outgoing.append(BROADCAST_FRAME + b"y" * 10)
    dev.wake()
    wait_until(lambda: d.rx.used_idx() == 1)
    c = dev.counters()
    assert (c.tx_packets, c.tx_bytes, c.tx_dropped) == (1, len(BROADCAST_FRAME), 1)
    assert (c.rx_packets, c.rx_bytes, c.rx_dropped) == (1, len(BROADCAST_FRAME) + 10, 0)
