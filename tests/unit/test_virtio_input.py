"""virtio-input: the arm64 board's power key, driven by a Python driver as Linux's virtio_input drives it (no KVM needed)."""

import select
import struct

import pytest

from tenbox_vmm.devices.virtio import input as vin
from tenbox_vmm.devices.virtio import mmio as m
from tenbox_vmm.memory import MIB, GuestMemory
from tests.virtio_driver import MmioHost, NetDriver, wait_until

EVENT = struct.Struct("<HHi")
PRESS_AND_RELEASE = [(vin.EV_KEY, vin.KEY_POWER, 1), (vin.EV_SYN, vin.SYN_REPORT, 0),
                     (vin.EV_KEY, vin.KEY_POWER, 0), (vin.EV_SYN, vin.SYN_REPORT, 0)]


class InputDriver(NetDriver):
    """The same handshake as the net driver's: queue 0 the events, queue 1 the status."""

    def select(self, sel, subsel=0):
        self.t.write(m.CONFIG_OFFSET, 1, sel)
        self.t.write(m.CONFIG_OFFSET + 1, 1, subsel)
        size = self.t.read(m.CONFIG_OFFSET + 2, 1)
        return bytes(self.t.read(m.CONFIG_OFFSET + 8 + i, 1) for i in range(size))

    def offer_buffers(self, n, size=8):
        heads = [self.rx.offer([], [size]) for _ in range(n)]
        self.kick(0)
        return heads

    def events(self, heads, n):
        used = []
        wait_until(lambda: used.extend(self.rx.take_used()) or len(used) >= n)
        by_head = dict((h, addr) for h, [(addr, _)] in heads)
        return [EVENT.unpack(self.mem.read(by_head[h], 8)) if written == 8 else None for h, written in used]


@pytest.fixture
def rig():
    mem = GuestMemory(16 * MIB)
    host = MmioHost()
    dev = vin.VirtioPowerKey()
    t = m.VirtioMmio(dev, mem, host)
    yield InputDriver(t, mem), dev, host
    t.close()
    mem.close()


def test_the_device_describes_a_keyboard_with_one_key_the_power_key(rig):
    d, dev, _ = rig
    assert d.r(m.R_DEVICE_ID) == 18
    assert d.select(vin.CFG_ID_NAME) == b"tenbox power button"
    bits = d.select(vin.CFG_EV_BITS, vin.EV_KEY)
    assert [i for i in range(len(bits) * 8) if bits[i // 8] >> (i % 8) & 1] == [116]  # KEY_POWER alone
    assert struct.unpack("<HHHH", d.select(vin.CFG_ID_DEVIDS))[0] == vin.BUS_VIRTUAL
    for sel, sub in ((vin.CFG_EV_BITS, 2), (vin.CFG_EV_BITS, 3), (vin.CFG_ABS_INFO, 0), (vin.CFG_PROP_BITS, 0),
                     (vin.CFG_ID_SERIAL, 0), (vin.CFG_UNSET, 0), (0x7F, 0)):
        assert d.select(sel, sub) == b"", (sel, sub)  # size 0: relative axes, absolute ones, ... none
    assert dev.config_read(200, 4) == 0


def test_a_press_reaches_the_driver_as_press_syn_release_syn_with_an_interrupt(rig):
    d, dev, host = rig
    assert not dev.listening()
    d.setup_net()
    assert dev.listening()
    heads = d.offer_buffers(8)
    assert dev.press()
    assert d.events(heads, 4) == PRESS_AND_RELEASE
    assert select.select([host.irq], [], [], 1)[0]
    assert d.r(m.R_INTERRUPT_STATUS) & 1


def test_a_press_before_buffers_waits_for_them_and_excess_presses_are_dropped(rig):
    d, dev, _ = rig
    d.setup_net()
    for _ in range(16):  # 64 events
        assert dev.press()
    assert not dev.press() and dev.dropped == 1  # bounded: a guest that posts no buffers costs 64 events
    heads = d.offer_buffers(16)
    assert d.events(heads, 16) == PRESS_AND_RELEASE * 4
    heads = d.offer_buffers(16)
    assert d.events(heads, 16) == PRESS_AND_RELEASE * 4
    heads += d.offer_buffers(4)
    assert dev.press()
    got = d.events(heads[16:], 4)
    assert got == PRESS_AND_RELEASE


def test_a_buffer_too_small_is_returned_empty_and_the_event_waits_for_the_next(rig):
    d, dev, _ = rig
    d.setup_net()
    small = d.offer_buffers(1, size=4)
    heads = small + d.offer_buffers(4)
    dev.press()
    got = d.events(heads, 5)
    assert got[0] is None and got[1:] == PRESS_AND_RELEASE


def test_the_status_queue_is_answered_unread(rig):
    d, dev, _ = rig
    d.setup_net()
    led = EVENT.pack(0x11, 0, 1)  # EV_LED LED_NUML on: nothing here has LEDs
    head, _ = d.tx.offer([led], [])
    d.kick(1)
    used = []
    wait_until(lambda: used.extend(d.tx.take_used()) or used)
    assert used == [(head, 0)]


def test_a_reset_forgets_waiting_events_and_stops_listening(rig):
    d, dev, _ = rig
    d.setup_net()
    dev.press()
    d.w(m.R_STATUS, 0)
    assert not dev.listening()
    d.setup_net()
    heads = d.offer_buffers(4)
    dev.press()
    assert d.events(heads, 4) == PRESS_AND_RELEASE  # the press before the reset is gone
