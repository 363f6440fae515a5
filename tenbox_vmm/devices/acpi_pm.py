"""ACPI fixed-hardware power management registers and the PC reset port (worker).

PM1a event block (status + enable), PM1a control block (SCI_EN, SLP_TYP,
SLP_EN), the 24/32-bit PM timer, and the reset control register at 0xCF9
that the FADT names as RESET_REG. A guest poweroff writes SLP_TYP=S5 with
SLP_EN; the host's "power button" raises PWRBTN_STS and the SCI.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

PM1A_EVT_BLK = 0x600  # 4 bytes: PM1_STS (2) then PM1_EN (2)
PM1_EVT_LEN = 4
PM1A_CNT_BLK = 0x604  # 2 bytes
PM1_CNT_LEN = 2
PM_TMR_BLK = 0x608  # 4 bytes
PM_TMR_LEN = 4
PM_BLOCK_LEN = 0x0C
RESET_PORT = 0xCF9
RESET_VALUE = 0x06  # RST_CPU | SYS_RST
SCI_IRQ = 9
SLP_TYP_S5 = 5  # the value \_S5 hands the guest

PM_TIMER_HZ = 3579545

# PM1_STS / PM1_EN bits
TMR_STS = 1 << 0
PWRBTN_STS = 1 << 8
WAK_STS = 1 << 15
STS_WRITE_CLEAR = TMR_STS | (1 << 4) | (1 << 5) | PWRBTN_STS | (1 << 9) | (1 << 10) | WAK_STS
EN_MASK = TMR_STS | (1 << 5) | PWRBTN_STS | (1 << 9) | (1 << 10)
# PM1_CNT bits
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
RST_CPU = 1 << 2


class AcpiPm:
    """The PM1a register block at PM1A_EVT_BLK..+PM_BLOCK_LEN."""

    def __init__(
        self,
        set_sci: Callable[[int], None],
        on_poweroff: Callable[[], None],
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._set_sci = set_sci
        self._on_poweroff = on_poweroff
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.sts = 0
            self.en = 0
            self.cnt = SCI_EN  # no SMI_CMD: ACPI mode from power-on
            self._sci = 0
        self._set_sci(0)

    def save_state(self) -> dict:
        """PM1 status, enable and control, and the SCI level (snapshot/records.py ACPI_PM).

        The PM timer is not kept: it follows the host's monotonic clock, as it does across a reset.
        """
        with self._lock:
            return dict(sts=self.sts, en=self.en, cnt=self.cnt, sci=self._sci)

    def load_state(self, s: dict) -> None:
        with self._lock:
            self.sts, self.en, self.cnt, self._sci = s["sts"], s["en"] & EN_MASK, s["cnt"] | SCI_EN, s["sci"]
        if self._sci:
            self._set_sci(1)

    def _update_sci(self) -> None:
        level = 1 if (self.sts & self.en & EN_MASK) and self.cnt & SCI_EN else 0
        if level != self._sci:
            self._sci = level
            self._set_sci(level)

    def press_power_button(self) -> None:
        with self._lock:
            self.sts |= PWRBTN_STS
            self._update_sci()

    def _timer(self) -> int:
        return (self._clock_ns() * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFFFF

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            regs = (self.sts | (self.en << 16)).to_bytes(4, "little") + self.cnt.to_bytes(2, "little") + b"\0\0"
            regs += self._timer().to_bytes(4, "little")
        if offset + size > len(regs):
            return (1 << (8 * size)) - 1
        return int.from_bytes(regs[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        poweroff = False
        with self._lock:
            data = value.to_bytes(size, "little")
            for i, byte in enumerate(data):
                pos = offset + i
                if pos < 2:  # PM1_STS: write one to clear
                    self.sts &= ~((byte << (8 * pos)) & STS_WRITE_CLEAR)
                elif pos < 4:  # PM1_EN
                    shift = 8 * (pos - 2)
                    self.en = ((self.en & ~(0xFF << shift)) | (byte << shift)) & EN_MASK
                elif pos < 6:  # PM1_CNT; SCI_EN is fixed at one
                    shift = 8 * (pos - 4)
                    self.cnt = (self.cnt & ~(0xFF << shift)) | (byte << shift) | SCI_EN
            if self.cnt & SLP_EN:
                self.cnt &= ~SLP_EN  # SLP_EN always reads as zero
                poweroff = (self.cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_S5
            self._update_sci()
        if poweroff:
            self._on_poweroff()


class ResetControl:
    """Port 0xCF9: writing RST_CPU resets the machine (the FADT's RESET_REG)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.value = 0

    def reset(self) -> None:
        self.value = 0

    def save_state(self) -> dict:
        return dict(value=self.value)

    def load_state(self, s: dict) -> None:
        self.value = s["value"]

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & 0xFF & ~RST_CPU
        if value & RST_CPU:
            self._on_reset()
