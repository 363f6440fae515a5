"""virtio-net over a frame backend (libslirp) (worker; frames move on the device's I/O thread).

TX: each chain is a 12-byte virtio_net_hdr_v1 and one Ethernet frame, handed
to the backend in one call. RX: frames the backend emits wait in a bounded
queue until the driver offers buffers; with MRG_RXBUF a frame may span
several chains (num_buffers says how many). Link state is a config bit the
host flips at run time; while the link is down frames are dropped both ways.
Offloads: the backend emits frames with complete checksums, so RX frames are
marked DATA_VALID when the guest negotiated GUEST_CSUM. TX checksum and
segmentation offloads are not offered: honouring them would mean computing
checksums or splitting segments in Python, per byte.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from typing import Callable, Deque, Dict, List, Optional, Tuple

from tenbox_vmm.devices.virtio import ID_NET
from tenbox_vmm.devices.virtio.device import COMMON_FEATURES, VirtioDevice
from tenbox_vmm.devices.virtio.queue import Virtqueue

log = logging.getLogger("tenbox.virtio.net")

QUEUE_SIZE = 256
RX, TX = 0, 1
HDR_LEN = 12  # virtio_net_hdr_v1 (VERSION_1 always has num_buffers)
FRAME_MAX = 65535 + 14
RX_BACKLOG_MAX = 512  # frames waiting for guest buffers before new ones are dropped
MTU = 1500

F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16

S_LINK_UP = 1
HDR_F_DATA_VALID = 2

_HDR = struct.Struct("<BBHHHHH")


class VirtioNet(VirtioDevice):
    device_id = ID_NET
    num_queues = 2
    queue_size = QUEUE_SIZE
    name = "net"

    def __init__(self, mac: bytes, backend_factory: Callable[[Callable[[bytes], None]], object], link_up: bool = True) -> None:
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        self.mac = bytes(mac)
        self._link_up = link_up
        self._lock = threading.Lock()
        self._rx_backlog: Deque[bytes] = collections.deque()
        self.backend = backend_factory(self._from_backend)
        self._queues: List[Virtqueue] = []
        self.tx_frames = self.rx_frames = self.rx_dropped = self.tx_dropped = 0
        self._pending_calls: Deque[Callable[[], None]] = collections.deque()
        # The backend (libslirp) belongs to one thread at a time: the I/O thread
        # while the driver is up, else whoever holds this lock.
        self._backend_lock = threading.Lock()
        self._io_running = False

    # Config -------------------------------------------------------------------------------

    def device_features(self) -> int:
        return COMMON_FEATURES | F_MAC | F_STATUS | F_MRG_RXBUF | F_GUEST_CSUM | F_MTU

    def config_bytes(self) -> bytes:
        status = S_LINK_UP if self._link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, MTU)

    @property
    def link_up(self) -> bool:
        return self._link_up

    def set_link(self, up: bool) -> None:
        """Link up or down at run time (any thread): the guest sees a config change."""
        if up == self._link_up:
            return
        self._link_up = up
        if not up:
            with self._lock:
                self._rx_backlog.clear()
        self.config_changed()

    # Backend -> guest (called on the I/O thread, inside the backend's poll processing) ------

    def _from_backend(self, frame: bytes) -> None:
        if not self._link_up:
            self.rx_dropped += 1
            return
        with self._lock:
            if len(self._rx_backlog) >= RX_BACKLOG_MAX:
                self.rx_dropped += 1
                return
            self._rx_backlog.append(bytes(frame))

    def _deliver(self, q: Virtqueue) -> bool:
        """Move backlog frames into the driver's receive buffers; True if any went in."""
        moved = False
        mergeable = bool(self.features & F_MRG_RXBUF)
        flags = HDR_F_DATA_VALID if self.features & F_GUEST_CSUM else 0
        while self._rx_backlog:
            frame = self._rx_backlog[0]
            total = HDR_LEN + len(frame)
            chains = []
            room = 0
            while room < total:
                chain = q.pop()
                if chain is None:
                    if chains:
                        # Not enough buffers for the whole frame yet: un-pop these (they are
                        # still in the avail ring, nothing was pushed) and wait for more.
                        q.last_avail = (q.last_avail - len(chains)) & 0xFFFF
                    return moved
                chains.append(chain)
                room += chain.writable_len()
                if not mergeable:
                    break
            if room < total:
                # Without mergeable buffers a frame that does not fit one chain is dropped.
                for c in chains:
                    q.push(c.head, 0)
                self._rx_backlog.popleft()
                self.rx_dropped += 1
                moved = True
                continue
            data = _HDR.pack(flags, 0, 0, 0, 0, 0, len(chains)) + frame
            pos = 0
            for c in chains:
                start = pos
                for v in c.writable:
                    take = min(len(v), len(data) - pos)
                    if take <= 0:
                        break
                    v[:take] = data[pos : pos + take]
                    pos += take
                q.push(c.head, pos - start)
            self._rx_backlog.popleft()
            self.rx_frames += 1
            moved = True
        return moved

    # I/O thread -----------------------------------------------------------------------------

    def activate(self, features: int, queues: List[Virtqueue]) -> None:
        super().activate(features, queues)
        self._queues = queues

    def process(self, queue: Virtqueue) -> None:
        if queue.index == TX:
            self._transmit(queue)
        elif self._rx_backlog:
            with self._lock:
                self._deliver(queue)

    def _transmit(self, q: Virtqueue) -> None:
        backend_input = self.backend.input
        while True:
            chain = q.pop()
            if chain is None:
                return
            readable = chain.readable
            if len(readable) == 1 and len(readable[0]) > HDR_LEN:
                frame = readable[0][HDR_LEN:]  # the usual layout: no copy at all
            else:
                frame = b"".join(readable)[HDR_LEN:]
            q.push(chain.head, 0)
            if not self._link_up or not 14 <= len(frame) <= FRAME_MAX:
                self.tx_dropped += 1
                continue
            self.tx_frames += 1
            backend_input(frame)

    def run_on_backend(self, fn: Callable[[], object], timeout: float = 10.0) -> object:
        """Run `fn` where the backend may be used (any thread); its result.

        While the I/O thread runs, `fn` runs there at its next wake-up;
        otherwise it runs here, holding the backend and handing it back after.
        """
        with self._backend_lock:
            if not self._io_running:
                try:
                    return fn()
                finally:
                    release = getattr(self.backend, "release_thread", None)
                    if release is not None:
                        release()
            done = threading.Event()
            box: list = []

            def call() -> None:
                try:
                    box.append((True, fn()))
                except Exception as e:  # handed back to the caller
                    box.append((False, e))
                done.set()

            self._pending_calls.append(call)
        self.wake()
        if not done.wait(timeout):
            raise TimeoutError("the network's I/O thread did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def poll_prepare(self) -> Tuple[List[Tuple[int, int]], int]:
        with self._backend_lock:
            self._io_running = True
            while self._pending_calls:
                self._pending_calls.popleft()()
            return self.backend.poll_prepare()

    def poll_done(self, revents: Dict[int, int]) -> bool:
        self.backend.poll_done(revents)
        if self._rx_backlog and self._queues:
            with self._lock:
                return self._deliver(self._queues[RX])
        return False

    def deactivate(self) -> None:
        super().deactivate()
        with self._backend_lock:
            self._io_running = False  # its I/O thread has been joined: the backend is free again
            calls, self._pending_calls = list(self._pending_calls), collections.deque()
        for call in calls:
            self.run_on_backend(call)
        self._queues = []
        with self._lock:
            self._rx_backlog.clear()

    def close(self) -> None:
        with self._backend_lock:
            self._io_running = False
            self.backend.close()
