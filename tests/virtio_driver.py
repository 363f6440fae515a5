"""A virtio driver in Python, for tests: split rings in guest memory, the virtio-mmio handshake, a net backend that records (tests only).

`RingDriver` lays out one queue's rings and offers chains; `MmioDriver`
brings a device up through the virtio-mmio registers as a guest driver
does; `MmioHost` is the transport's host side without KVM; `NetDriver` and
`RecordingBackend` drive virtio-net.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Callable, List, Optional, Sequence, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.devices.virtio import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK
from tenbox_vmm.devices.virtio import mmio as m
from tenbox_vmm.devices.virtio import net as vnet
from tenbox_vmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Virtqueue
from tenbox_vmm.memory import GuestMemory

WAIT_SEC = 5.0
POLL_SEC = 0.001


class RingDriver:
    """Owns one queue's rings at `base` and a bump allocator for buffers after them."""

    def __init__(self, mem: GuestMemory, base: int, size: int, heap: int) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.heap = heap
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))

    def alloc(self, data: bytes = b"", size: Optional[int] = None) -> Tuple[int, int]:
        n = len(data) if size is None else size
        addr = self.heap
        self.heap = (self.heap + n + 15) & ~15
        if data:
            self.mem.write(addr, data)
        return addr, n

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, readable: Sequence[bytes], writable_sizes: Sequence[int]) -> Tuple[int, List[Tuple[int, int]]]:
        """Make a chain available; returns (head, [(addr, len) of each writable buffer])."""
        bufs = [(self.alloc(d), 0) for d in readable] + [(self.alloc(size=n), DESC_F_WRITE) for n in writable_sizes]
        head = self.next_desc
        idxs = [(head + k) % self.size for k in range(len(bufs))]
        self.next_desc = (head + len(bufs)) % self.size
        for k, ((addr, n), flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.write_desc(idxs[k], addr, n, flags | (0 if last else DESC_F_NEXT), 0 if last else idxs[k + 1])
        self.publish(head)
        return head, [b for b, f in bufs if f]

    def offer_indirect(self, readable: Sequence[bytes], writable_sizes: Sequence[int]) -> Tuple[int, List[Tuple[int, int]]]:
        bufs = [(self.alloc(d), 0) for d in readable] + [(self.alloc(size=n), DESC_F_WRITE) for n in writable_sizes]
        entries = []
        for k, ((addr, n), flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            entries.append((addr, n, flags | (0 if last else DESC_F_NEXT), 0 if last else k + 1))
        return self.offer_table(entries), [b for b, f in bufs if f]

    def offer_table(self, entries: Sequence[Tuple[int, int, int, int]]) -> int:
        """Make an indirect table of (addr, len, flags, next) entries available, as given; returns the head."""
        taddr, tlen = self.alloc(b"".join(struct.pack("<QIHH", *e) for e in entries))
        head = self.next_desc
        self.next_desc = (head + 1) % self.size
        self.write_desc(head, taddr, tlen, DESC_F_INDIRECT, 0)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def take_used(self) -> List[Tuple[int, int]]:
        out = []
        while self.used_seen != self.used_idx():
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.used_seen % self.size), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)


RING = 0x10000  # where queue_pair() lays out the rings
HEAP = 0x100000  # and where its buffers start


def queue_pair(mem: GuestMemory, size: int = 8, event_idx: bool = False,
               indirect: bool = True) -> Tuple[RingDriver, Virtqueue]:
    """A driver and the device's live Virtqueue on the same rings."""
    drv = RingDriver(mem, RING, size, HEAP)
    q = Virtqueue(mem, 0, 256)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = drv.desc, drv.avail, drv.used
    q.activate(event_idx, indirect)
    return drv, q


# --- virtio-mmio ------------------------------------------------------------------------------

MMIO_RING = 0x10000  # where MmioDriver lays out its queue's rings
MMIO_HEAP = 0x200000  # and where its buffers start
F_EVENT_IDX = 1 << 29


def wait_until(cond: Callable[[], object], timeout: float = WAIT_SEC) -> None:
    """Poll cond until it is true (the device's I/O thread answers asynchronously)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(POLL_SEC)


class MmioHost(m.MmioHost):
    """The transport's host side without KVM: a real eventfd for the interrupt, no ioeventfd."""

    def __init__(self) -> None:
        self.irq: Optional[int] = None

    def irqfd(self) -> int:
        self.irq = eventfd.eventfd()
        return self.irq

    def ioeventfd(self, offset, datamatch):
        return None  # the register write kicks the I/O thread

    def release(self) -> None:
        if self.irq is not None:
            os.close(self.irq)
            self.irq = None


class MmioDriver:
    """A guest driver of one virtio-mmio device with one queue: the status handshake, features, the queue."""

    def __init__(self, transport: m.VirtioMmio, mem: GuestMemory, features: Optional[int] = None) -> None:
        self.t = transport
        self.mem = mem
        self.features = features

    def w(self, reg: int, value: int) -> None:
        self.t.write(reg, 4, value)

    def r(self, reg: int) -> int:
        return self.t.read(reg, 4)

    def setup(self, size: int = 8, event_idx: bool = False) -> Optional[int]:
        """Features (all offered, or `features`), queue 0 of `size`, DRIVER_OK; the features, None if refused."""
        assert self.r(m.R_MAGIC) == m.MAGIC and self.r(m.R_VERSION) == 2
        self.w(m.R_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        self.w(m.R_DEVICE_FEATURES_SEL, 0)
        lo = self.r(m.R_DEVICE_FEATURES)
        self.w(m.R_DEVICE_FEATURES_SEL, 1)
        hi = self.r(m.R_DEVICE_FEATURES)
        offered = lo | hi << 32
        want = offered if self.features is None else self.features
        if not event_idx:
            want &= ~F_EVENT_IDX
        for sel in (0, 1):
            self.w(m.R_DRIVER_FEATURES_SEL, sel)
            self.w(m.R_DRIVER_FEATURES, (want >> (32 * sel)) & 0xFFFFFFFF)
        self.w(m.R_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not self.r(m.R_STATUS) & STATUS_FEATURES_OK:
            return None
        self.ring = RingDriver(self.mem, MMIO_RING, size, MMIO_HEAP)
        self.w(m.R_QUEUE_SEL, 0)
        assert self.r(m.R_QUEUE_NUM_MAX) >= size
        self.w(m.R_QUEUE_NUM, size)
        for reg, addr in ((m.R_QUEUE_DESC_LOW, self.ring.desc), (m.R_QUEUE_DRIVER_LOW, self.ring.avail),
                          (m.R_QUEUE_DEVICE_LOW, self.ring.used)):
            self.w(reg, addr & 0xFFFFFFFF)
            self.w(reg + 4, addr >> 32)
        self.w(m.R_QUEUE_READY, 1)
        self.w(m.R_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        return want

    def kick(self) -> None:
        self.w(m.R_QUEUE_NOTIFY, 0)

    def wait_used(self, n: int = 1, timeout: float = WAIT_SEC) -> List[Tuple[int, int]]:
        deadline = time.monotonic() + timeout
        got: List[Tuple[int, int]] = []
        while len(got) < n:
            got += self.ring.take_used()
            if time.monotonic() > deadline:
                raise AssertionError("no completion")
            time.sleep(POLL_SEC)
        return got


# --- virtio-net -------------------------------------------------------------------------------

MAC = bytes.fromhex("525400123456")
BROADCAST_FRAME = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x06" + b"a" * 28  # an ARP-sized broadcast


class RecordingBackend:
    """A FrameBackend that records what the guest sends and emits queued frames when polled (as libslirp does)."""

    guest_room = None

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send
        self.sent: List[bytes] = []
        self.outgoing: List[bytes] = []
        self.closed = False

    def input(self, frame) -> None:
        self.sent.append(bytes(frame))

    def input_many(self, frames) -> None:
        for frame in frames:
            self.input(frame)

    def release_thread(self) -> None:
        pass

    def poll_prepare(self):
        return [], (0 if self.outgoing else 50)

    def poll_done(self, revents) -> None:
        while self.outgoing:
            self.send(self.outgoing.pop(0))

    def close(self) -> None:
        self.closed = True


class NetDriver(MmioDriver):
    """A virtio-net driver: RX (queue 0) and TX (queue 1) of 16 entries each."""

    def setup_net(self, features_off: int = 0) -> int:
        self.w(m.R_STATUS, 3)
        feats = 0
        for sel in (0, 1):
            self.w(m.R_DEVICE_FEATURES_SEL, sel)
            feats |= self.r(m.R_DEVICE_FEATURES) << (32 * sel)
        feats &= ~features_off & ~F_EVENT_IDX
        for sel in (0, 1):
            self.w(m.R_DRIVER_FEATURES_SEL, sel)
            self.w(m.R_DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFFFFFF)
        self.w(m.R_STATUS, 3 | 8)
        self.rx = RingDriver(self.mem, 0x10000, 16, 0x200000)
        self.tx = RingDriver(self.mem, 0x20000, 16, 0x400000)
        for i, ring in enumerate((self.rx, self.tx)):
            self.w(m.R_QUEUE_SEL, i)
            self.w(m.R_QUEUE_NUM, 16)
            for reg, addr in ((m.R_QUEUE_DESC_LOW, ring.desc), (m.R_QUEUE_DRIVER_LOW, ring.avail),
                              (m.R_QUEUE_DEVICE_LOW, ring.used)):
                self.w(reg, addr)
                self.w(reg + 4, 0)
            self.w(m.R_QUEUE_READY, 1)
        self.w(m.R_STATUS, 3 | 8 | 4)
        return feats

    def kick(self, q: int) -> None:  # type: ignore[override]  # net has two queues
        self.w(m.R_QUEUE_SEL, q)
        self.w(m.R_QUEUE_NOTIFY, q)


def net_device(mem: GuestMemory, backend_cls: Callable[[Callable[[bytes], None]], RecordingBackend]
               ) -> Tuple[vnet.VirtioNet, m.VirtioMmio, RecordingBackend]:
    """A VirtioNet with MAC on a virtio-mmio transport in `mem`, and the backend it made with backend_cls(send)."""
    backends: List[RecordingBackend] = []
    dev = vnet.VirtioNet(MAC, lambda send: backends.append(backend_cls(send)) or backends[-1])
    t = m.VirtioMmio(dev, mem, MmioHost())
    return dev, t, backends[0]
