"""An ARM PrimeCell PL061 GPIO controller: the arm64 machine's power button line (worker).

Eight lines. The host drives input lines (`set_input`; `pulse` for a
button press); the guest reads them, drives its output lines, and takes an
interrupt on edges or levels as it configures them (Linux's gpio-pl061;
gpio-keys asks for both edges). Registers (ARM DDI 0190), 8 bits each:

    0x000-0x3fc DATA: address bits 9..2 mask the lines read or written
    0x400 DIR (1: output)   0x404 IS (1: level)   0x408 IBE (both edges)
    0x40c IEV (1: rising or high)   0x410 IE (unmasked)   0x414 RIS raw
    0x418 MIS masked   0x41c IC clear (edges)   0x420 AFSEL   0xfe0.. IDs

A press is one timer in the worker (the release), replaced by the next press.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from tenbox_vmm.devices import primecell

DATA_END = 0x400
DIR, IS, IBE, IEV, IE, RIS, MIS, IC, AFSEL = 0x400, 0x404, 0x408, 0x40C, 0x410, 0x414, 0x418, 0x41C, 0x420
ID_BASE = primecell.ID_BASE
ID_BYTES = primecell.id_bytes(0x00041061)
PRESS_SEC = 0.1  # how long a pulse holds the line high (QEMU's gpio-key holds it 100 ms)


class Pl061:
    def __init__(self, raise_irq: Callable[[int], None]) -> None:
        self._irq = raise_irq
        self._lock = threading.Lock()
        self._release: Optional[threading.Timer] = None
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._cancel()
            self.inputs = 0  # the levels the host drives
            self.outputs = 0  # what the guest wrote to its output lines
            self.dir = self.sense = self.both = self.event = self.enable = self.raw = self.afsel = 0
        self._irq(0)

    def save_state(self) -> dict:
        return {k: getattr(self, k) for k in ("inputs", "outputs", "dir", "sense", "both", "event", "enable", "raw",
                                              "afsel")}

    def load_state(self, s: dict) -> None:
        with self._lock:
            for k in self.save_state():
                setattr(self, k, int(s[k]) & 0xFF)
        self._update()

    def _levels(self) -> int:
        return (self.outputs & self.dir) | (self.inputs & ~self.dir & 0xFF)

    def read(self, offset: int, size: int) -> int:
        if offset >= ID_BASE:
            ident = primecell.id_register(offset, ID_BYTES)
            return 0 if ident is None else ident
        with self._lock:
            if offset < DATA_END:
                return self._levels() & (offset >> 2)
            return {DIR: self.dir, IS: self.sense, IBE: self.both, IEV: self.event, IE: self.enable, RIS: self.raw,
                    MIS: self.raw & self.enable, AFSEL: self.afsel}.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            before = self._levels()
            if offset < DATA_END:
                mask = (offset >> 2) & self.dir
                self.outputs = (self.outputs & ~mask) | (value & mask)
            elif offset == DIR:
                self.dir = value
            elif offset == IS:
                self.sense = value
            elif offset == IBE:
                self.both = value
            elif offset == IEV:
                self.event = value
            elif offset == IE:
                self.enable = value
            elif offset == IC:
                self.raw &= ~(value & ~self.sense)  # edges only: a level stays raised while it holds
            elif offset == AFSEL:
                self.afsel = value
            else:
                return
            self._detect(before)
        self._update()

    def set_input(self, line: int, level: int) -> None:
        """The host drives input `line` (0..7) to `level`."""
        with self._lock:
            before = self._levels()
            bit = 1 << line
            self.inputs = (self.inputs | bit) if level else (self.inputs & ~bit)
            self._detect(before)
        self._update()

    def pulse(self, line: int, seconds: float = PRESS_SEC) -> None:
        """A button press: `line` high now, low `seconds` later."""
        self.set_input(line, 1)
        t = threading.Timer(seconds, self.set_input, (line, 0))
        t.daemon = True
        with self._lock:
            self._cancel()
            self._release = t
        t.start()

    def _detect(self, before: int) -> None:
        """(Under the lock.) Latch the edges between `before` and now, and the levels that hold."""
        now = self._levels()
        changed = before ^ now
        rising = changed & now
        edges = changed & (self.both | (rising & self.event) | (changed & ~now & ~self.event))
        self.raw |= edges & ~self.sense
        level_match = ~(now ^ self.event) & 0xFF  # high where IEV says high, low where it says low
        self.raw = (self.raw & ~self.sense) | (level_match & self.sense)

    def _update(self) -> None:
        self._irq(1 if self.raw & self.enable else 0)

    def _cancel(self) -> None:
        t, self._release = self._release, None
        if t is not None:
            t.cancel()

    def close(self) -> None:
        with self._lock:
            self._cancel()
