"""Port 0x80, the POST-code port: writes are counted and dropped (worker).

Old kernels use it for I/O delays and firmware for progress codes; the exit
benchmark's guest hammers it from user mode.
"""

from __future__ import annotations


class DebugPort:
    def __init__(self) -> None:
        self.writes = 0
        self.last = 0

    def reset(self) -> None:
        self.writes = 0
        self.last = 0

    def save_state(self) -> dict:
        return dict(writes=self.writes, last=self.last)

    def load_state(self, s: dict) -> None:
        self.writes, self.last = s["writes"], s["last"]

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.last = value & 0xFF
