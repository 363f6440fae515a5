"""The arm64 machine's PL031 clock (tenbox_vmm/devices/pl031.py): what Linux's rtc-pl031 reads and writes."""

import threading
import time

from tenbox_vmm.devices import pl031
from tenbox_vmm.devices.pl031 import CR, DR, ICR, IMSC, LR, MIS, MR, RIS, Pl031


class Line:
    def __init__(self):
        self.levels = []
        self.raised = threading.Event()

    def __call__(self, level):
        self.levels.append(level)
        if level:
            self.raised.set()


def test_the_primecell_ids_are_what_linuxs_amba_bus_matches():
    rtc = Pl031(Line())
    ids = [rtc.read(pl031.ID_BASE + 4 * i, 4) for i in range(8)]
    periph = ids[0] | ids[1] << 8 | ids[2] << 16 | ids[3] << 24
    cell = ids[4] | ids[5] << 8 | ids[6] << 16 | ids[7] << 24
    assert (periph & 0x000FFFFF, cell) == (0x00041031, 0xB105F00D)  # rtc-pl031's amba_id; AMBA_CID


def test_the_counter_is_the_hosts_time_until_the_guest_loads_another():
    now = [1_700_000_000.25]
    rtc = Pl031(Line(), clock=lambda: now[0])
    assert rtc.read(DR, 4) == 1_700_000_000 and rtc.read(CR, 4) == 1
    now[0] += 5
    assert rtc.read(DR, 4) == 1_700_000_005
    rtc.write(LR, 4, 1000)
    assert rtc.read(DR, 4) == 1000 and rtc.read(LR, 4) == 1000
    now[0] += 2
    assert rtc.read(DR, 4) == 1002
    rtc.write(DR, 4, 5)  # read-only
    assert rtc.read(DR, 4) == 1002
    rtc.reset()
    assert rtc.read(DR, 4) == int(now[0]) and rtc.read(LR, 4) == 0


def test_the_match_alarm_raises_the_line_until_the_guest_clears_it():
    line = Line()
    rtc = Pl031(line)
    rtc.write(IMSC, 4, 1)
    rtc.write(MR, 4, rtc.read(DR, 4) + 1)
    assert line.raised.wait(3), "no alarm"
    assert (rtc.read(RIS, 4), rtc.read(MIS, 4), line.levels[-1]) == (1, 1, 1)
    rtc.write(ICR, 4, 1)
    assert (rtc.read(RIS, 4), line.levels[-1]) == (0, 0)


def test_a_masked_or_past_alarm_raises_nothing_and_rewrites_keep_one_timer():
    line = Line()
    rtc = Pl031(line)
    rtc.write(MR, 4, rtc.read(DR, 4) + 1)  # masked
    rtc.write(IMSC, 4, 1)
    rtc.write(MR, 4, rtc.read(DR, 4) - 10)  # behind the counter
    threads = threading.active_count()
    for i in range(200):
        rtc.write(MR, 4, rtc.read(DR, 4) + 100 + i)  # each write replaces the last timer
    time.sleep(0.1)
    assert threading.active_count() <= threads + 1
    assert not line.raised.wait(1.5) and rtc.read(RIS, 4) == 0
    rtc.close()
