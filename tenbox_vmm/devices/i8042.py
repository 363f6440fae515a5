"""An i8042 keyboard controller with no keyboard: enough for `reboot=k` (worker).

Linux resets a PC by pulsing the CPU reset line through the controller's
output port (command 0xFE, or 0xD1 with bit 0 clear). The controller also
answers the probes firmware and drivers make (self-test, CTR read/write)
honestly, with no keyboard or mouse behind it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

DATA_PORT_OFFSET = 0  # port 0x60
STATUS_PORT_OFFSET = 4  # port 0x64

STS_OBF = 0x01
STS_SYS = 0x04
STS_CMD = 0x08
STS_UNLOCKED = 0x10

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
INTERFACE_NO_DEVICE = 0x01  # "clock line stuck low": nothing attached
OUTPUT_RESET_LINE = 0x01  # active low: clearing it resets the CPU


class I8042:
    """Ports 0x60 (offset 0) and 0x64 (offset 4)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.status = STS_SYS | STS_UNLOCKED
            self.ctr = 0x30  # both ports disabled, no interrupts
            self.output_port = OUTPUT_RESET_LINE | 0x02
            self._out: Optional[int] = None
            self._pending: Optional[int] = None  # command awaiting its data byte

    def save_state(self) -> dict:
        """Status, command byte, output port and a reply or command in progress (snapshot/records.py I8042)."""
        with self._lock:
            return dict(status=self.status, ctr=self.ctr, output_port=self.output_port, out=self._out,
                        pending=self._pending)

    def load_state(self, s: dict) -> None:
        with self._lock:
            self.status, self.ctr, self.output_port = s["status"], s["ctr"], s["output_port"]
            self._out, self._pending = s["out"], s["pending"]

    def _reply(self, value: int) -> None:
        self._out = value
        self.status |= STS_OBF

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == STATUS_PORT_OFFSET:
                return self.status
            if offset == DATA_PORT_OFFSET:
                value = self._out if self._out is not None else 0
                self._out = None
                self.status &= ~STS_OBF
                return value
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == STATUS_PORT_OFFSET:
                self.status |= STS_CMD
                reset = self._command(value)
            elif offset == DATA_PORT_OFFSET:
                self.status &= ~STS_CMD
                command, self._pending = self._pending, None
                if command == CMD_WRITE_CTR:
                    self.ctr = value
                elif command == CMD_WRITE_OUTPUT:
                    self.output_port = value
                    reset = not value & OUTPUT_RESET_LINE
                # Bytes for the keyboard itself go nowhere: there is none.
        if reset:
            self._on_reset()

    def _command(self, cmd: int) -> bool:
        if cmd == CMD_READ_CTR:
            self._reply(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT):
            self._pending = cmd
        elif cmd == CMD_SELF_TEST:
            self._reply(SELF_TEST_OK)
        elif cmd == CMD_TEST_KBD:
            self._reply(INTERFACE_OK)
        elif cmd == CMD_TEST_AUX:
            self._reply(INTERFACE_NO_DEVICE)
        elif cmd == CMD_DISABLE_KBD:
            self.ctr |= 0x10
        elif cmd == CMD_ENABLE_KBD:
            self.ctr &= ~0x10
        elif cmd == CMD_DISABLE_AUX:
            self.ctr |= 0x20
        elif cmd == CMD_ENABLE_AUX:
            self.ctr &= ~0x20
        elif cmd == CMD_READ_OUTPUT:
            self._reply(self.output_port)
        elif 0xF0 <= cmd <= 0xFF:
            # Pulse output lines whose bit is clear; bit 0 is the reset line.
            return not cmd & OUTPUT_RESET_LINE
        return False
