"""Device models: 16550A UART, i8042, CMOS RTC, ACPI PM block, reset port, buses, guest memory."""

import calendar

import pytest

from tenbox_vmm.devices import acpi_pm as pm
from tenbox_vmm.devices import serial as s
from tenbox_vmm.devices.bus import BusConflict, MmioBus, PioBus
from tenbox_vmm.devices.i8042 import I8042
from tenbox_vmm.devices.rtc import CmosRtc
from tenbox_vmm.memory import GIB, MIB, GuestMemory, GuestMemoryError


class Recorder:
    def __init__(self):
        self.levels = []
        self.out = bytearray()
        self.events = []

    def irq(self, level):
        self.levels.append(level)

    def output(self, data):
        self.out += data


@pytest.fixture
def uart():
    rec = Recorder()
    return s.Serial16550(rec.irq, rec.output), rec


def test_uart_transmits_every_thr_write(uart):
    dev, rec = uart
    for ch in b"hi\n":
        assert dev.read(s.LSR, 1) & s.LSR_THRE
        dev.write(s.RBR_THR, 1, ch)
    assert bytes(rec.out) == b"hi\n"


def test_uart_receive_sets_data_ready_and_rx_interrupt(uart):
    dev, rec = uart
    dev.write(s.IER, 1, s.IER_RDA)
    assert dev.receive(b"ab") == 2
    assert rec.levels[-1] == 1
    assert dev.read(s.LSR, 1) & s.LSR_DR
    assert dev.read(s.IIR_FCR, 1) & 0x0F == s.IIR_RDA
    assert dev.read(s.RBR_THR, 1) == ord("a")
    assert dev.read(s.RBR_THR, 1) == ord("b")
    assert rec.levels[-1] == 0
    assert not dev.read(s.LSR, 1) & s.LSR_DR


def test_uart_thre_interrupt_is_acknowledged_by_reading_iir(uart):
    dev, rec = uart
    dev.write(s.IER, 1, s.IER_THRE)  # enabling THRE with an empty THR interrupts at once
    assert rec.levels[-1] == 1
    assert dev.read(s.IIR_FCR, 1) & 0x0F == s.IIR_THRE
    assert rec.levels[-1] == 0
    assert dev.read(s.IIR_FCR, 1) & 0x0F == s.IIR_NONE
    dev.write(s.RBR_THR, 1, ord("x"))  # transmit completes at once: THRE again
    assert rec.levels[-1] == 1


def test_uart_fifo_enabled_shows_in_iir(uart):
    dev, _ = uart
    dev.write(s.IIR_FCR, 1, s.FCR_ENABLE)
    assert dev.read(s.IIR_FCR, 1) & 0xC0 == 0xC0


def test_uart_loopback_as_linux_probes_it(uart):
    dev, rec = uart
    dev.write(s.MCR, 1, s.MCR_LOOP | 0x0A)
    assert dev.read(s.MSR, 1) & 0xF0 == 0x90
    dev.write(s.RBR_THR, 1, 0x5A)
    assert rec.out == b""  # looped back, not sent
    assert dev.read(s.RBR_THR, 1) == 0x5A
    dev.write(s.MCR, 1, 0)
    assert dev.read(s.MSR, 1) & 0xB0 == 0xB0


def test_uart_divisor_latch(uart):
    dev, _ = uart
    dev.write(s.LCR, 1, s.LCR_DLAB | 3)
    dev.write(s.RBR_THR, 1, 1)
    dev.write(s.IER, 1, 0)
    assert (dev.read(s.RBR_THR, 1), dev.read(s.IER, 1)) == (1, 0)
    dev.write(s.LCR, 1, 3)
    dev.write(s.RBR_THR, 1, ord("z"))


def test_uart_scratch_register(uart):
    dev, _ = uart
    dev.write(s.SCR, 1, 0xA5)
    assert dev.read(s.SCR, 1) == 0xA5


def test_uart_receive_queue_is_bounded_and_says_what_it_took(uart):
    dev, _ = uart
    assert dev.receive(b"x" * (s.RX_QUEUE_MAX + 10)) == s.RX_QUEUE_MAX
    assert dev.receive(b"y") == 0
    assert dev.rx_space() == 0
    dev.read(s.RBR_THR, 1)
    assert dev.receive(b"yz") == 1


def test_i8042_self_test_and_ctr():
    resets = []
    kbc = I8042(lambda: resets.append(1))
    kbc.write(4, 1, 0xAA)
    assert kbc.read(4, 1) & 1
    assert kbc.read(0, 1) == 0x55
    assert not kbc.read(4, 1) & 1
    kbc.write(4, 1, 0x60)
    kbc.write(0, 1, 0x47)
    kbc.write(4, 1, 0x20)
    assert kbc.read(0, 1) == 0x47
    assert resets == []


@pytest.mark.parametrize("sequence", [[(4, 0xFE)], [(4, 0xD1), (0, 0xFE)], [(4, 0xF0)]])
def test_i8042_resets_the_cpu(sequence):
    resets = []
    kbc = I8042(lambda: resets.append(1))
    for port, value in sequence:
        kbc.write(port, 1, value)
    assert resets == [1]


def test_i8042_pulse_without_reset_line_does_nothing():
    resets = []
    kbc = I8042(lambda: resets.append(1))
    kbc.write(4, 1, 0xFF)  # pulse no lines
    kbc.write(4, 1, 0xD1)
    kbc.write(0, 1, 0x03)  # reset line kept high
    assert resets == []


def rtc_read(rtc, index):
    rtc.write(0, 1, index)
    return rtc.read(1, 1)


def test_rtc_shows_host_time_in_bcd():
    t = calendar.timegm((2026, 11, 25, 19, 45, 7))
    rtc = CmosRtc(clock=lambda: t)
    got = [rtc_read(rtc, i) for i in (0, 2, 4, 7, 8, 9, 0x32)]
    assert got == [0x07, 0x45, 0x19, 0x25, 0x11, 0x26, 0x20]
    assert rtc_read(rtc, 0x0D) & 0x80


def test_rtc_binary_and_12_hour_modes():
    t = calendar.timegm((2026, 11, 25, 19, 45, 7))
    rtc = CmosRtc(clock=lambda: t)
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x04)  # binary, 12-hour
    assert rtc_read(rtc, 0) == 7
    assert rtc_read(rtc, 4) == 0x80 | 7


def test_rtc_guest_can_set_the_clock():
    now = [calendar.timegm((2026, 11, 25, 19, 45, 7))]
    rtc = CmosRtc(clock=lambda: now[0])
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x82)  # SET, 24h, BCD
    for index, value in ((9, 0x30), (8, 0x01), (7, 0x02), (4, 0x03), (2, 0x04), (0, 0x05)):
        rtc.write(0, 1, index)
        rtc.write(1, 1, value)
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x02)
    now[0] += 10
    assert [rtc_read(rtc, i) for i in (9, 8, 7, 4, 2, 0)] == [0x30, 0x01, 0x02, 0x03, 0x04, 0x15]


def test_rtc_nvram_survives_a_guest_reset():
    rtc = CmosRtc()
    rtc.write(0, 1, 0x38)
    rtc.write(1, 1, 0x42)
    rtc.reset()
    assert rtc_read(rtc, 0x38) == 0x42


def make_pm():
    rec = Recorder()
    dev = pm.AcpiPm(rec.irq, lambda: rec.events.append("poweroff"), clock_ns=lambda: 10**9)
    return dev, rec


def test_pm_poweroff_on_s5():
    dev, rec = make_pm()
    dev.write(4, 2, (pm.SLP_TYP_S5 << 10) | pm.SLP_EN)
    assert rec.events == ["poweroff"]


def test_pm_other_sleep_states_do_not_power_off():
    dev, rec = make_pm()
    dev.write(4, 2, (3 << 10) | pm.SLP_EN)
    dev.write(4, 2, pm.SLP_TYP_S5 << 10)  # type without SLP_EN
    assert rec.events == []
    assert not dev.read(4, 2) & pm.SLP_EN


def test_pm_power_button_raises_sci_until_acknowledged():
    dev, rec = make_pm()
    dev.press_power_button()
    assert rec.levels[-1] == 0  # not enabled yet: status only
    assert dev.read(0, 2) & pm.PWRBTN_STS
    dev.write(2, 2, pm.PWRBTN_STS)  # PM1_EN
    assert rec.levels[-1] == 1
    dev.write(0, 2, pm.PWRBTN_STS)  # write one to clear
    assert rec.levels[-1] == 0
    assert not dev.read(0, 2) & pm.PWRBTN_STS


def test_pm_timer_counts_at_3_58_mhz():
    dev, _ = make_pm()
    assert dev.read(8, 4) == pm.PM_TIMER_HZ
    assert dev.read(4, 2) & pm.SCI_EN


def test_reset_port():
    resets = []
    dev = pm.ResetControl(lambda: resets.append(1))
    dev.write(0, 1, 0x02)
    assert resets == []
    dev.write(0, 1, pm.RESET_VALUE)
    assert resets == [1]


class Reg:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return offset

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_pio_bus_routes_by_offset_and_refuses_overlaps():
    bus = PioBus()
    dev = Reg()
    bus.register(0x60, 1, dev, offset=0)
    bus.register(0x64, 1, dev, offset=4)
    assert bus.read(0x64, 1) == 4
    bus.write(0x60, 1, 9)
    assert dev.writes == [(0, 1, 9)]
    with pytest.raises(BusConflict):
        bus.register(0x5F, 2, Reg())


def test_unhandled_access_reads_all_ones_and_drops_writes():
    bus, mm = PioBus(), MmioBus()
    assert bus.read(0x1234, 1) == 0xFF and bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 2, 5)
    assert mm.read(0xD0000000, 8) == (1 << 64) - 1
    mm.write(0xD0000000, 4, 1)


def test_mmio_bus_finds_ranges_and_refuses_overlaps():
    mm = MmioBus()
    a, b = Reg(), Reg()
    mm.register(0xD0000000, 0x200, a)
    mm.register(0xD0001000, 0x200, b)
    assert mm.read(0xD0001010, 4) == 0x10
    mm.write(0xD00001FC, 4, 7)
    assert a.writes == [(0x1FC, 4, 7)]
    assert mm.read(0xD00001FE, 4) == 0xFFFFFFFF  # straddles the end
    with pytest.raises(BusConflict):
        mm.register(0xD0000100, 0x1000, Reg())


def test_guest_memory_views_are_bounds_checked():
    mem = GuestMemory(16 * MIB)
    mem.write(0x1000, b"abc")
    assert bytes(mem.view(0x1000, 3)) == b"abc"
    mem.view(0x2000, 2)[:] = b"zz"
    assert mem.read(0x2000, 2) == b"zz"
    for gpa, n in ((16 * MIB - 1, 2), (-1, 1), (16 * MIB, 1), (0, -1)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, n)
    mem.clear()
    assert mem.read(0x1000, 3) == b"\0\0\0"
    mem.close()


def test_guest_memory_skips_the_mmio_hole():
    mem = GuestMemory(4 * GIB)
    (gpa0, size0, off0), (gpa1, size1, off1) = mem.slots()
    assert (gpa0, size0) == (0, 3 * GIB) and (gpa1, size1, off1) == (4 * GIB, GIB, 3 * GIB)
    mem.write_u32(4 * GIB, 0xAABBCCDD)
    assert mem.read_u32(4 * GIB) == 0xAABBCCDD
    with pytest.raises(GuestMemoryError):
        mem.read_u32(3 * GIB)
    mem.close()


def test_uart_reports_transmit_interrupt_changes_once_each():
    """The machine coalesces THR writes only while the transmit interrupt is off: the UART
    says when the guest turns it on or off, and only then."""
    rec = Recorder()
    dev = s.Serial16550(rec.irq, rec.output, rec.events.append)
    assert not dev.tx_interrupts
    dev.write(s.IER, 1, s.IER_RDA)  # receive interrupt only: no change to transmit
    dev.write(s.IER, 1, s.IER_RDA | s.IER_THRE)
    dev.write(s.IER, 1, s.IER_RDA | s.IER_THRE)
    assert dev.tx_interrupts
    dev.write(s.LCR, 1, s.LCR_DLAB)
    dev.write(s.IER, 1, 0)  # the divisor's high byte, not IER
    dev.write(s.LCR, 1, 0x03)
    dev.write(s.IER, 1, 0)
    assert rec.events == [True, False]
    dev.write(s.IER, 1, s.IER_THRE)
    dev.reset()
    assert not dev.tx_interrupts  # after a reset it is off; the machine reads this at boot
