"""The arm64 machine's real-time clock: an ARM PrimeCell PL031 (worker).

A 32-bit seconds counter that starts at the host's time (UTC), which the
guest may set (RTCLR), with the match alarm Linux's rtc-pl031 driver uses
(RTCMR, an SPI when the counter reaches it and the guest unmasked it).
The PrimeCell ID registers at the end of the page are what Linux's AMBA
bus reads to bind the driver (peripheral 0x00041031).

Registers (ARM DDI 0224), 32-bit:
    0x00 DR data (the counter)    0x04 MR match      0x08 LR load
    0x0c CR control (bit 0 on)    0x10 IMSC mask     0x14 RIS raw status
    0x18 MIS masked status        0x1c ICR clear     0xfe0.. the ID registers

The alarm is one timer at a time, re-armed by each write of MR, LR or IMSC:
the guest cannot make the worker keep more.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from tenbox_vmm.devices import primecell

DR, MR, LR, CR, IMSC, RIS, MIS, ICR = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C
ID_BASE = primecell.ID_BASE
# PeriphID0..3 then PCellID0..3: part 0x031, designer 0x41 (ARM), revision 0, and the PrimeCell marker.
ID_BYTES = primecell.id_bytes(0x00041031)
MASK32 = 0xFFFFFFFF


class Pl031:
    def __init__(self, raise_irq: Callable[[int], None], clock: Callable[[], float] = time.time) -> None:
        self._irq = raise_irq
        self._clock = clock
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._cancel()
            self.offset = 0.0  # the counter is the host's time plus this
            self.match = 0
            self.load = 0
            self.mask = 0
            self.raw = 0
        self._irq(0)

    def save_state(self) -> dict:
        return {"offset": self.offset, "match": self.match, "load": self.load, "mask": self.mask, "raw": self.raw}

    def load_state(self, s: dict) -> None:
        with self._lock:
            self.offset = float(s["offset"])
            self.match, self.load = int(s["match"]) & MASK32, int(s["load"]) & MASK32
            self.mask, self.raw = int(s["mask"]) & 1, int(s["raw"]) & 1
            self._arm()
        self._update()

    def counter(self) -> int:
        return int(self._clock() + self.offset) & MASK32

    def read(self, offset: int, size: int) -> int:
        if offset >= ID_BASE:
            ident = primecell.id_register(offset, ID_BYTES)
            return 0 if ident is None else ident
        with self._lock:
            if offset == DR:
                return self.counter()
            if offset == MR:
                return self.match
            if offset == LR:
                return self.load
            if offset == CR:
                return 1  # always counting: the enable bit cannot be cleared (as on the PL031 r1)
            if offset == IMSC:
                return self.mask
            if offset == RIS:
                return self.raw
            if offset == MIS:
                return self.raw & self.mask
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= MASK32
        with self._lock:
            if offset == MR:
                self.match = value
            elif offset == LR:
                self.load = value
                self.offset = value - self._clock()
            elif offset == IMSC:
                self.mask = value & 1
            elif offset == ICR:
                if value & 1:
                    self.raw = 0
            else:
                return  # DR, CR, the status and ID registers: read-only or no effect
            self._arm()
        self._update()

    def _arm(self) -> None:
        """(Under the lock.) One timer for the match alarm, if the guest unmasked it."""
        self._cancel()
        if not self.mask or self.raw:
            return
        delay = (self.match - self.counter()) & MASK32
        if delay == 0 or delay > 1 << 31:
            return  # the match is the counter's tick into MR: not now, nor 68 years on after a wrap
        t = threading.Timer(delay - (self._clock() + self.offset) % 1.0, self._fire)
        t.daemon = True
        t.start()
        self._timer = t

    def _cancel(self) -> None:
        t, self._timer = self._timer, None
        if t is not None:
            t.cancel()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            if self.mask and (self.counter() - self.match) & MASK32 < 1 << 31:  # reached it (or a late timer passed it)
                self.raw = 1
            else:
                self._arm()  # the guest's load moved the counter meanwhile
        self._update()

    def _update(self) -> None:
        self._irq(self.raw & self.mask)

    def close(self) -> None:
        with self._lock:
            self._cancel()
