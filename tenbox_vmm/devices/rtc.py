"""The CMOS real-time clock and NVRAM at ports 0x70/0x71 (worker).

Time registers show the host's UTC clock (BCD, 24-hour, as PC firmware
leaves them; the guest may switch to binary or 12-hour through register B).
The guest may set the clock: the difference to the host clock is kept as an
offset. NVRAM keeps its contents across a guest reset, as CMOS does.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict

INDEX_OFFSET = 0
DATA_OFFSET = 1
CMOS_SIZE = 128

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
DAY_OF_WEEK, DAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32

REG_B_SET = 0x80
REG_B_BINARY = 0x04
REG_B_24H = 0x02
REG_D_VALID = 0x80
HOUR_PM = 0x80


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class CmosRtc:
    """Index register at offset 0, data at offset 1."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.nvram = bytearray(CMOS_SIZE)
        self.offset = 0  # seconds the guest's clock is ahead of the host's
        self.reg_a = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.reg_b = REG_B_24H
        self.index = 0
        self._frozen: Dict[int, int] = {}

    def reset(self) -> None:
        """A guest reset leaves time and NVRAM alone, like a battery-backed CMOS."""
        with self._lock:
            self.index = 0

    def save_state(self) -> dict:
        """NVRAM, the guest's clock offset and registers (snapshot/records.py RTC)."""
        with self._lock:
            return dict(nvram=bytes(self.nvram), offset=self.offset, reg_a=self.reg_a, reg_b=self.reg_b,
                        index=self.index, frozen=[[k, v] for k, v in sorted(self._frozen.items())])

    def load_state(self, s: dict) -> None:
        with self._lock:
            self.nvram[:] = s["nvram"]
            self.offset, self.reg_a, self.reg_b, self.index = s["offset"], s["reg_a"], s["reg_b"], s["index"]
            self._frozen = {k: v for k, v in s["frozen"]}

    def _encode(self, value: int) -> int:
        return value if self.reg_b & REG_B_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.reg_b & REG_B_BINARY else _from_bcd(value)

    def _time_registers(self) -> Dict[int, int]:
        t = time.gmtime(int(self._clock()) + self.offset)
        hour = t.tm_hour
        hour_reg = self._encode(hour)
        if not self.reg_b & REG_B_24H:
            h12 = hour % 12 or 12
            hour_reg = self._encode(h12) | (HOUR_PM if hour >= 12 else 0)
        return {
            SECONDS: self._encode(t.tm_sec),
            MINUTES: self._encode(t.tm_min),
            HOURS: hour_reg,
            DAY_OF_WEEK: self._encode((t.tm_wday + 1) % 7 + 1),
            DAY: self._encode(t.tm_mday),
            MONTH: self._encode(t.tm_mon),
            YEAR: self._encode(t.tm_year % 100),
            CENTURY: self._encode(t.tm_year // 100),
        }

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == INDEX_OFFSET:
                return 0xFF  # the index port is write-only
            i = self.index
            if i in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY, MONTH, YEAR, CENTURY):
                if self.reg_b & REG_B_SET and i in self._frozen:
                    return self._frozen[i]
                return self._time_registers()[i]
            if i == REG_A:
                return self.reg_a & 0x7F  # update-in-progress never set
            if i == REG_B:
                return self.reg_b
            if i == REG_C:
                return 0
            if i == REG_D:
                return REG_D_VALID
            return self.nvram[i]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == INDEX_OFFSET:
                self.index = value & 0x7F  # bit 7 masks NMIs
                return
            i = self.index
            if i in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY, MONTH, YEAR, CENTURY):
                if not self._frozen:
                    self._frozen = self._time_registers()
                self._frozen[i] = value
                if not self.reg_b & REG_B_SET:
                    self._apply_frozen()
            elif i == REG_A:
                self.reg_a = value & 0x7F
            elif i == REG_B:
                was_set = self.reg_b & REG_B_SET
                self.reg_b = value
                if was_set and not value & REG_B_SET and self._frozen:
                    self._apply_frozen()
            elif i not in (REG_C, REG_D):
                self.nvram[i] = value

    def _apply_frozen(self) -> None:
        """The guest finished setting the clock: keep the new time as an offset."""
        import calendar  # only when a guest sets the clock

        f = self._frozen
        self._frozen = {}
        try:
            hour_raw = f[HOURS]
            if self.reg_b & REG_B_24H:
                hour = self._decode(hour_raw)
            else:
                hour = self._decode(hour_raw & 0x7F) % 12 + (12 if hour_raw & HOUR_PM else 0)
            year = self._decode(f[CENTURY]) * 100 + self._decode(f[YEAR])
            guest = calendar.timegm(
                (year, self._decode(f[MONTH]), self._decode(f[DAY]), hour, self._decode(f[MINUTES]), self._decode(f[SECONDS]))
            )
        except (ValueError, OverflowError):
            return  # nonsense from the guest: keep the clock as it was
        self.offset = guest - int(self._clock())
