"""virtio-input: a power key the host presses (worker).

The arm64 board's power button for guests whose kernel has no gpio-keys:
Debian's arm64 *cloud* kernel has virtio_input (a module udev loads from the
device's modalias) but not KEYBOARD_GPIO, so the PL061 line reaches nothing
there. The device is a keyboard with one key, KEY_POWER (virtio spec 1.2,
5.8): its configuration answers the driver's questions (name, which events,
which keys), `press()` queues a press and a release, each followed by a
SYN_REPORT, for the event queue's buffers. The guest's input layer then
does what it does with any power key (systemd-logind powers off).

Guest-driven work is bounded: a status queue chain (LEDs, sounds: nothing
here has any) is returned unread, and at most PENDING_MAX events wait for
buffers; presses beyond that are dropped.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from tenbox_vmm.devices.virtio import ID_INPUT
from tenbox_vmm.devices.virtio.device import VirtioDevice
from tenbox_vmm.devices.virtio.queue import Virtqueue

# Configuration selectors (virtio_input_config_select).
CFG_UNSET = 0x00
CFG_ID_NAME = 0x01
CFG_ID_SERIAL = 0x02
CFG_ID_DEVIDS = 0x03
CFG_PROP_BITS = 0x10
CFG_EV_BITS = 0x11
CFG_ABS_INFO = 0x12
CONFIG_SIZE = 8 + 128  # select, subsel, size, 5 reserved, then the 128-byte union

# Linux input event codes (include/uapi/linux/input-event-codes.h).
EV_SYN = 0x00
EV_KEY = 0x01
SYN_REPORT = 0
KEY_POWER = 116
BUS_VIRTUAL = 0x06

NAME = b"tenbox power button"
EVENTQ = 0
STATUSQ = 1
PENDING_MAX = 64  # events (16 presses) waiting for the driver's buffers
_EVENT = struct.Struct("<HHi")  # virtio_input_event: le16 type, le16 code, le32 value


def _bitmap(*bits: int) -> bytes:
    out = bytearray(max(bits) // 8 + 1)
    for b in bits:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out)


class VirtioPowerKey(VirtioDevice):
    device_id = ID_INPUT
    num_queues = 2
    queue_size = 64
    name = "input"

    def __init__(self) -> None:
        super().__init__()
        self._select = CFG_UNSET
        self._subsel = 0
        self._lock = threading.Lock()
        self._pending: Deque[bytes] = deque()
        self._eventq: Optional[Virtqueue] = None
        self.dropped = 0

    # Configuration space -------------------------------------------------

    def _answer(self) -> bytes:
        """The union's contents for the current select/subsel (empty: size 0, "not supported")."""
        sel, sub = self._select, self._subsel
        if sel == CFG_ID_NAME:
            return NAME
        if sel == CFG_ID_DEVIDS:
            return struct.pack("<HHHH", BUS_VIRTUAL, 0, 1, 1)  # bustype, vendor, product, version
        if sel == CFG_EV_BITS and sub == EV_KEY:
            return _bitmap(KEY_POWER)
        return b""

    def config_bytes(self) -> bytes:
        answer = self._answer()
        head = bytes([self._select, self._subsel, len(answer)]) + bytes(5)
        return head + answer + bytes(CONFIG_SIZE - len(head) - len(answer))

    def config_write(self, offset: int, size: int, value: int) -> None:
        # The driver writes select and subsel (one byte each, or both at once); the rest is read-only.
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            if offset + i == 0:
                self._select = byte
            elif offset + i == 1:
                self._subsel = byte

    # Queues ----------------------------------------------------------------

    def activate(self, features: int, queues: List[Virtqueue]) -> None:
        super().activate(features, queues)
        self._eventq = queues[EVENTQ]

    def deactivate(self) -> None:
        super().deactivate()
        self._eventq = None
        with self._lock:
            self._pending.clear()

    def listening(self) -> bool:
        """Whether a driver runs the device: a press reaches the guest's input layer."""
        q = self._eventq
        return q is not None and q.ready

    def press(self, code: int = KEY_POWER) -> bool:
        """Queue a press and a release of `code`; False if too many events already wait (dropped)."""
        events = [_EVENT.pack(EV_KEY, code, 1), _EVENT.pack(EV_SYN, SYN_REPORT, 0),
                  _EVENT.pack(EV_KEY, code, 0), _EVENT.pack(EV_SYN, SYN_REPORT, 0)]
        with self._lock:
            if len(self._pending) + len(events) > PENDING_MAX:
                self.dropped += 1
                return False
            self._pending.extend(events)
        self.wake()
        return True

    def _deliver(self, q: Virtqueue) -> bool:
        """Move pending events into the driver's buffers; True if any was used."""
        used = False
        while True:
            with self._lock:
                if not self._pending:
                    return used
                chain = q.pop()
                if chain is None:
                    return used
                event = self._pending.popleft()
            if chain.writable_len() < len(event):
                q.push(chain.head, 0)  # a buffer too small for an event: returned empty, the event kept
                with self._lock:
                    self._pending.appendleft(event)
                used = True
                continue
            pos = 0
            for view in chain.writable:
                take = min(len(view), len(event) - pos)
                view[:take] = event[pos : pos + take]
                pos += take
                if pos == len(event):
                    break
            q.push(chain.head, len(event))
            used = True

    def process(self, queue: Virtqueue) -> None:
        if queue.index == EVENTQ:
            self._deliver(queue)  # the I/O thread interrupts the driver if it wants it
            return
        while True:  # status queue: nothing to act on; every chain back, unread
            chain = queue.pop()
            if chain is None:
                return
            queue.push(chain.head, 0)

    def poll_prepare(self) -> Tuple[List[Tuple[int, int]], int]:
        q = self._eventq
        with self._lock:
            waiting = bool(self._pending)
        return [], 0 if waiting and q is not None and q.ready and q.has_work() else -1

    def poll_done(self, revents: Dict[int, int]) -> bool:
        q = self._eventq
        return q is not None and q.ready and self._deliver(q)
