"""virtio-net's device logic with a recording backend: TX, RX (mergeable or not), link state."""

import struct
import time

import pytest

from tenbox_vmm.devices.virtio import mmio as m
from tenbox_vmm.devices.virtio import net as vnet
from tenbox_vmm.memory import MIB, GuestMemory
from tests.unit.test_virtio_mmio_blk import Driver, Host
from tests.virtio_driver import RingDriver

FRAME = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x06" + b"a" * 28


class Backend:
    """A FrameBackend that records what the guest sends and emits queued frames when polled (as libslirp does)."""

    guest_room = None

    def __init__(self, send):
        self.send = send
        self.sent = []
        self.outgoing = []
        self.closed = False

    def input(self, frame):
        self.sent.append(bytes(frame))

    def input_many(self, frames):
        for frame in frames:
            self.input(frame)

    def release_thread(self):
        pass

    def poll_prepare(self):
        return [], (0 if self.outgoing else 50)

    def poll_done(self, revents):
        while self.outgoing:
            self.send(self.outgoing.pop(0))

    def close(self):
        self.closed = True


class NetDriver(Driver):
    def setup_net(self, features_off=0):
        self.w(m.R_STATUS, 3)
        feats = 0
        for sel in (0, 1):
            self.w(m.R_DEVICE_FEATURES_SEL, sel)
            feats |= self.r(m.R_DEVICE_FEATURES) << (32 * sel)
        feats &= ~features_off & ~(1 << 29)
        for sel in (0, 1):
            self.w(m.R_DRIVER_FEATURES_SEL, sel)
            self.w(m.R_DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFFFFFF)
        self.w(m.R_STATUS, 3 | 8)
        self.rx = RingDriver(self.mem, 0x10000, 16, 0x200000)
        self.tx = RingDriver(self.mem, 0x20000, 16, 0x400000)
        for i, ring in enumerate((self.rx, self.tx)):
            self.w(m.R_QUEUE_SEL, i)
            self.w(m.R_QUEUE_NUM, 16)
            for reg, addr in ((m.R_QUEUE_DESC_LOW, ring.desc), (m.R_QUEUE_DRIVER_LOW, ring.avail),
                              (m.R_QUEUE_DEVICE_LOW, ring.used)):
                self.w(reg, addr)
                self.w(reg + 4, 0)
            self.w(m.R_QUEUE_READY, 1)
        self.w(m.R_STATUS, 3 | 8 | 4)
        return feats

    def kick(self, q):
        self.w(m.R_QUEUE_SEL, q)
        self.w(m.R_QUEUE_NOTIFY, q)


@pytest.fixture
def rig():
    mem = GuestMemory(16 * MIB)
    backends = []
    dev = vnet.VirtioNet(bytes.fromhex("525400123456"), lambda send: backends.append(Backend(send)) or backends[-1])
    t = m.VirtioMmio(dev, mem, Host())
    yield NetDriver(t, mem), t, dev, backends[0]
    t.close()
    mem.close()


def wait(cond, timeout=5):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_config_has_the_mac_and_link_up(rig):
    d, t, _, _ = rig
    assert d.r(m.R_DEVICE_ID) == 1
    assert bytes(t.read(m.CONFIG_OFFSET + i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert t.read(m.CONFIG_OFFSET + 6, 2) & vnet.S_LINK_UP


def test_transmit_strips_the_header(rig):
    d, _, dev, backend = rig
    d.setup_net()
    d.tx.offer([bytes(vnet.HDR_LEN) + FRAME], [])
    d.tx.offer([bytes(vnet.HDR_LEN), FRAME[:20], FRAME[20:]], [])  # split across descriptors
    d.kick(vnet.TX)
    wait(lambda: len(backend.sent) == 2)
    assert backend.sent == [FRAME, FRAME]
    assert len(d.tx.take_used()) == 2


def test_receive_with_mergeable_buffers_spans_chains(rig):
    d, _, dev, backend = rig
    feats = d.setup_net()
    assert feats & vnet.F_MRG_RXBUF
    bufs = [d.rx.offer([], [64])[1][0] for _ in range(4)]
    d.kick(vnet.RX)
    big = FRAME + b"z" * 100  # 142 bytes + 12-byte header: three 64-byte buffers
    backend.outgoing.append(big)
    dev.wake()
    wait(lambda: d.rx.used_idx() == 3)
    used = d.rx.take_used()
    data = b"".join(d.mem.read(bufs[i][0], n) for i, (_, n) in enumerate(used))
    flags, _, _, _, _, _, nbufs = struct.unpack("<BBHHHHH", data[:12])
    assert nbufs == 3 and data[12:] == big
    assert flags & vnet.HDR_F_DATA_VALID


def test_receive_waits_for_buffers_and_drops_oversize_without_mergeable(rig):
    d, _, dev, backend = rig
    d.setup_net(features_off=vnet.F_MRG_RXBUF)
    backend.outgoing.append(FRAME)
    dev.wake()
    time.sleep(0.05)
    assert d.rx.used_idx() == 0 and len(dev._rx_backlog) == 1  # no buffers yet: the frame waits
    small = d.rx.offer([], [20])[1][0]
    d.kick(vnet.RX)
    wait(lambda: d.rx.used_idx() == 1)
    assert d.rx.take_used()[0][1] == 0 and dev.rx_dropped == 1  # 54 bytes never fit 20
    good = d.rx.offer([], [2048])[1][0]
    backend.outgoing.append(FRAME)
    dev.wake()
    wait(lambda: d.rx.used_idx() == 2)
    (_, n), = d.rx.take_used()
    assert d.mem.read(good[0] + 12, n - 12) == FRAME


def test_link_down_drops_both_ways_and_raises_a_config_interrupt(rig):
    d, t, dev, backend = rig
    d.setup_net()
    gen = d.r(m.R_CONFIG_GENERATION)
    dev.set_link(False)
    assert not t.read(m.CONFIG_OFFSET + 6, 2) & vnet.S_LINK_UP
    assert d.r(m.R_CONFIG_GENERATION) != gen and d.r(m.R_INTERRUPT_STATUS) & 2
    d.tx.offer([bytes(vnet.HDR_LEN) + FRAME], [])
    d.kick(vnet.TX)
    wait(lambda: d.tx.used_idx() == 1)
    assert backend.sent == [] and dev.tx_dropped == 1
    dev.set_link(True)
    d.tx.offer([bytes(vnet.HDR_LEN) + FRAME], [])
    d.kick(vnet.TX)
    wait(lambda: len(backend.sent) == 1)


def test_the_polling_back_end_watches_transmit_only_after_full_frames(rig):
    # tenbox-vhost-user-net spins on the transmit ring only while the guest sends data: bare ACKs
    # (a download) leave the core to the guest.
    from tenbox_vmm.vhost_user.backend import POLL_NET_TX_MIN_BYTES, AdaptivePoller

    d, t, dev, backend = rig
    d.setup_net()
    poller = AdaptivePoller(dev, [])
    ack = FRAME[:14] + bytes(40)  # an Ethernet header and a 40-byte TCP/IP ACK
    for _ in range(3):
        d.tx.offer([bytes(vnet.HDR_LEN) + ack], [])
    d.kick(vnet.TX)
    wait(lambda: len(backend.sent) == 3)
    wait(lambda: dev.tx_last_bytes == 3 * len(ack))
    assert 3 * len(ack) < POLL_NET_TX_MIN_BYTES and not poller.worth_polling()
    data = FRAME[:14] + bytes(1500)
    d.tx.offer([bytes(vnet.HDR_LEN) + data], [])
    d.kick(vnet.TX)
    wait(lambda: len(backend.sent) == 4)
    wait(lambda: dev.tx_last_bytes == len(data))
    assert poller.worth_polling()
