"""Device models save their state as snapshot records and take it back: the restored device behaves as the saved one.

Each record must pass the snapshot reader's own range checks
(tenbox_vmm/snapshot/records.py), so a field a device adds without a
bound, or a bound that refuses what the device really holds, fails here.
"""

import os
import struct
import time

import pytest

from tenbox_vmm.devices import serial as s
from tenbox_vmm.devices.acpi_pm import PWRBTN_STS, AcpiPm, ResetControl
from tenbox_vmm.devices.debug_port import DebugPort
from tenbox_vmm.devices.i8042 import I8042
from tenbox_vmm.devices.rtc import CmosRtc
from tenbox_vmm.devices.virtio import blk as vblk
from tenbox_vmm.devices.virtio import mmio as m
from tenbox_vmm.memory import MIB, GuestMemory
from tenbox_vmm.snapshot import SnapshotError, records
from tests.unit.test_virtio_mmio_blk import Driver, RamDisk
from tests.virtio_driver import MmioHost


def roundtrip(schema, old, new):
    state = old.save_state()
    records.check_fields("dev", state, schema)
    new.load_state(state)
    assert new.save_state() == state
    return state


def test_serial_keeps_its_registers_pending_input_and_raised_line():
    levels = []
    old = s.Serial16550(lambda level: None, lambda data: None)
    old.write(s.LCR, 1, 0x80)
    old.write(s.RBR_THR, 1, 0x01)  # divisor latch: 115200 baud
    old.write(s.LCR, 1, 0x03)
    old.write(s.IER, 1, s.IER_RDA)
    old.receive(b"typed ahead")
    new = s.Serial16550(levels.append, lambda data: None)
    roundtrip(records.SERIAL, old, new)
    assert levels[-1] == 1  # the receive interrupt is still asserted
    assert bytes(new.read(s.RBR_THR, 1) for _ in range(5)) == b"typed"
    while new.read(s.LSR, 1) & s.LSR_DR:
        new.read(s.RBR_THR, 1)
    new.write(s.LCR, 1, 0x80)
    assert new.read(s.RBR_THR, 1) == 0x01


def test_serial_input_typed_before_the_restore_follows_the_saved_input():
    old = s.Serial16550(lambda level: None, lambda data: None)
    old.write(s.IER, 1, s.IER_RDA)
    old.receive(b"ab")
    levels = []
    new = s.Serial16550(levels.append, lambda data: None)
    new.receive(b"cd")  # the console's input, before the machine loaded its state
    new.load_state(old.save_state())
    assert levels[-1] == 1
    assert bytes(new.read(s.RBR_THR, 1) for _ in range(4)) == b"abcd"


def test_rtc_keeps_nvram_and_the_guests_clock_offset():
    old = CmosRtc(clock=lambda: 1_000_000.0)
    old.write(0, 1, 0x38)
    old.write(1, 1, 0x5A)
    old.offset = -3600
    new = CmosRtc(clock=lambda: 1_000_000.0)
    roundtrip(records.RTC, old, new)
    new.write(0, 1, 0x38)
    assert new.read(1, 1) == 0x5A
    new.write(0, 1, 0x04)
    old.write(0, 1, 0x04)
    assert new.read(1, 1) == old.read(1, 1) == 0x12  # 13:46:40 UTC less the guest's hour


def test_acpi_pm_keeps_a_pressed_power_button_and_its_sci():
    levels = []
    old = AcpiPm(lambda level: None, lambda: None)
    old.write(2, 2, PWRBTN_STS)  # PM1_EN
    old.press_power_button()
    new = AcpiPm(levels.append, lambda: None)
    roundtrip(records.ACPI_PM, old, new)
    assert levels[-1] == 1 and new.read(0, 2) & PWRBTN_STS


def test_i8042_keeps_a_reply_the_guest_has_not_read():
    old = I8042(lambda: None)
    old.write(4, 1, 0xAA)  # self-test: 0x55 waits in the output buffer
    new = I8042(lambda: None)
    roundtrip(records.I8042, old, new)
    assert new.read(4, 1) & 1 and new.read(0, 1) == 0x55


def test_reset_control_and_debug_port_round_trip():
    rc = ResetControl(lambda: None)
    rc.write(0, 1, 0x02)
    roundtrip(records.RESET_CONTROL, rc, ResetControl(lambda: None))
    dp = DebugPort()
    dp.write(0, 1, 0x99)
    roundtrip(records.DEBUG_PORT, dp, DebugPort())


@pytest.fixture
def blk_rig():
    mem = GuestMemory(16 * MIB)
    disk = RamDisk(1 * MIB)
    made = []

    def transport():
        t = m.VirtioMmio(vblk.VirtioBlk(disk, serial="snap"), mem, MmioHost())
        made.append(t)
        return t

    yield mem, disk, transport
    for t in made:
        t.reset()
    mem.close()


def test_a_live_virtio_blk_device_continues_from_its_saved_queue(blk_rig):
    """Saved while the driver has a request offered but not kicked, loaded into a new transport over
    the same RAM: the request completes there, and the driver's later requests too."""
    mem, disk, transport = blk_rig
    old = transport()
    d = Driver(old, mem)
    d.setup(size=8, event_idx=True)
    assert d.request(vblk.T_OUT, 2, b"\x5a" * 512)[0] == vblk.S_OK
    hdr = struct.pack("<IIQ", vblk.T_IN, 0, 2)
    head, writable = d.ring.offer([hdr], [512, 1])  # offered, not kicked: the device has not seen it
    old.pause()
    state = old.save_state()
    records.check_virtio("virtio0", state)
    old.reset()

    new = transport()
    new.check_state("virtio0", state)
    new.load_state(state)
    d.t = new
    (h, written), = d.wait_used()  # the new I/O thread takes what was offered before the snapshot
    assert h == head and written == 513 and mem.read(writable[0][0], 512) == b"\x5a" * 512
    status, _, data = d.request(vblk.T_IN, 2, read_len=512)
    assert status == vblk.S_OK and data == b"\x5a" * 512
    assert new.save_state()["queues"][0]["last_avail"] == state["queues"][0]["last_avail"] + 2


def test_a_virtio_record_for_another_device_or_a_bigger_queue_is_refused(blk_rig):
    mem, disk, transport = blk_rig
    t = transport()
    Driver(t, mem).setup(size=8)
    t.pause()
    state = t.save_state()
    other = dict(state, device=dict(state["device"], name="net", device_id=1))
    with pytest.raises(SnapshotError, match="virtio0 is a virtio-net, the VM has a virtio-blk there"):
        t.check_state("virtio0", other)
    big = dict(state, queues=[dict(state["queues"][0], size=1024)])
    with pytest.raises(SnapshotError, match=r"virtio0.queue0.size = 1024 \(at most 256\)"):
        t.check_state("virtio0", big)


def test_pause_waits_for_a_slow_batch_to_end_however_long_it_takes(blk_rig, monkeypatch):
    """A snapshot pauses the devices before the last pass: a request still reading into guest RAM then would
    be missed, and a resume beside a thread still running would start a second one. pause() waits for the
    batch itself, not a timeout (here the I/O thread's usual wait is made shorter than the slow read)."""
    import threading

    from tenbox_vmm.devices.virtio import iothread

    monkeypatch.setattr(iothread.IoThread.stop, "__defaults__", (0.05,))
    mem, disk, t = blk_rig
    t = t()
    d = Driver(t, mem)
    d.setup(size=8)
    reading, done = threading.Event(), threading.Event()
    readv = disk.readv

    def slow_readv(offset, bufs):
        reading.set()
        time.sleep(0.5)
        readv(offset, bufs)
        done.set()

    disk.readv = slow_readv
    d.ring.offer([struct.pack("<IIQ", vblk.T_IN, 0, 0)], [512, 1])
    d.kick()
    assert reading.wait(5)
    t.pause()
    assert done.is_set(), "pause() returned while the device was still reading into guest RAM"
    t.resume()
    assert d.wait_used()[0][1] == 513
