"""KVM's coalesced-write ring: guest port writes that KVM queued instead of exiting (worker).

For a port registered with `Vm.coalesce_pio`, KVM appends each guest write
to a ring in a page shared with user space and resumes the guest at once;
no exit reaches the VMM. The VMM must then play those writes to the device
model before it handles anything else the guest did, so that the device
sees every access in the guest's order: the vCPU loop drains the ring on
each exit it handles, and the machine drains it on a timer for a guest that
writes and then only halts (HLT stays in the kernel). When the ring is
full, KVM exits for the write as usual: nothing is lost and the ring needs
no bound of ours.

Layout (struct kvm_coalesced_mmio_ring): u32 first (ours to advance), u32
last (KVM's), then entries of struct kvm_coalesced_mmio: u64 address, u32
length, u32 pio, u8 data[8].
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

_HEADER_BYTES = 8
_ENTRY = struct.Struct("<QII8s")  # phys_addr (the port for pio), len, pio, data

Write = Callable[[int, int, int], None]  # (address or port, size, value)


class CoalescedRing:
    """The ring in `page` (a memoryview of the vCPU mapping's ring page)."""

    def __init__(self, page: memoryview, pio_write: Write, mmio_write: Write) -> None:
        self._page = page
        self._index = page[:_HEADER_BYTES].cast("I")  # [first, last]
        self._slots = (len(page) - _HEADER_BYTES) // _ENTRY.size
        self._pio_write = pio_write
        self._mmio_write = mmio_write
        self._lock = threading.Lock()

    def pending(self) -> bool:
        index = self._index
        return index[0] != index[1]

    def drain(self) -> int:
        """Play every queued write to its bus, oldest first; how many there were.

        Any thread may call it: one drains at a time, so writes from the
        ring never overtake each other.
        """
        with self._lock:
            index = self._index
            first, last = index[0], index[1]
            done = 0
            while first != last:
                if first >= self._slots or last >= self._slots:
                    raise ValueError("coalesced ring index out of range: first %d last %d" % (first, last))
                addr, length, pio, data = _ENTRY.unpack_from(self._page, _HEADER_BYTES + first * _ENTRY.size)
                if length in (1, 2, 4, 8):
                    value = int.from_bytes(data[:length], "little")
                    (self._pio_write if pio else self._mmio_write)(addr, length, value)
                first = (first + 1) % self._slots
                index[0] = first  # the slot is KVM's again
                done += 1
            return done

    def release(self) -> None:
        """Let go of the mapping (before the vCPU that owns it is closed)."""
        self._index.release()
        self._page.release()
