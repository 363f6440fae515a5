"""virtio-net over a frame backend (libslirp) (worker; frames move on the device's I/O thread).

TX: each chain is a 12-byte virtio_net_hdr_v1 and one Ethernet frame; up to
TX_BATCH frames go to the backend in one call (views of guest memory, no
copy), and their chains go back to the driver only when it returns. RX: a
frame the backend emits on the I/O thread goes straight into the driver's
next receive buffer; frames that find no buffer (or come from another
thread) wait in a bounded queue until the driver offers some, and only
then does the device ask for receive-queue kicks. `rx_room()` tells the
backend how many frames the driver can take, so it can leave the rest in
its sockets. With MRG_RXBUF a frame may span several chains (num_buffers
says how many). Link state is a config bit the host flips at run time;
while the link is down frames are dropped both ways.
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
from typing import Callable, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

from tenbox_vmm.devices.virtio import ID_NET
from tenbox_vmm.devices.virtio.device import COMMON_FEATURES, VirtioDevice
from tenbox_vmm.devices.virtio.queue import Virtqueue
from tenbox_vmm.protocol.link import NetCounters

log = logging.getLogger("tenbox.virtio.net")

QUEUE_SIZE = 256
RX, TX = 0, 1
HDR_LEN = 12  # virtio_net_hdr_v1 (VERSION_1 always has num_buffers)
FRAME_MAX = 65535 + 14
RX_BACKLOG_MAX = 512  # frames waiting for guest buffers before new ones are dropped
TX_BATCH = 64  # transmit chains handed to the backend at once (a UDP forward sends them in one system call)
MTU = 1500

F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16

S_LINK_UP = 1
HDR_F_DATA_VALID = 2

_HDR = struct.Struct("<BBHHHHH")


class FrameBackend(Protocol):
    """What virtio-net asks of its backend (net/slirp.py's SlirpNetwork implements it).

    The backend belongs to one thread at a time: the device's I/O thread
    while it runs, else whoever called run_on_backend.
    """

    # Set by the device: how many frames the driver can take now (a backend reads no more from its sockets).
    guest_room: Optional[Callable[[], int]]

    def input_many(self, frames: Sequence[memoryview]) -> None:
        """Frames from the guest, valid only until this returns (views of guest memory)."""

    def poll_prepare(self) -> Tuple[List[Tuple[int, int]], int]:
        """The backend's fds and events to poll, and a timeout in ms (-1: none)."""

    def poll_done(self, revents: Dict[int, int]) -> None:
        """Handle the polled fds; frames for the guest go to the `send` callback the backend was built with."""

    def release_thread(self) -> None:
        """The calling thread is done with the backend for now; another may use it next."""

    def close(self) -> None:
        ...


class VirtioNet(VirtioDevice):
    device_id = ID_NET
    num_queues = 2
    queue_size = QUEUE_SIZE
    name = "net"

    def __init__(self, mac: bytes, backend_factory: Callable[[Callable[[bytes], None]], FrameBackend],
                 link_up: bool = True) -> None:
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        self.mac = bytes(mac)
        self._link_up = link_up
        self._lock = threading.Lock()
        self._rx_backlog: Deque[bytes] = collections.deque()
        self.backend = backend_factory(self._from_backend)
        self.backend.guest_room = self.rx_room
        self._queues: List[Virtqueue] = []
        self.tx_frames = self.rx_frames = self.rx_dropped = self.tx_dropped = 0
        self.tx_bytes = self.rx_bytes = 0  # frame bytes, without the virtio-net header
        self.tx_last_bytes = 0  # frame bytes the last transmit pass moved (a bulk sender, or ACKs only?)
        self._pending_calls: Deque[Callable[[], None]] = collections.deque()
        # The backend (libslirp) belongs to one thread at a time: the I/O thread
        # while the driver is up, else whoever holds this lock.
        self._backend_lock = threading.Lock()
        self._io_running = False
        self._io_ident: Optional[int] = None  # the I/O thread, once its loop runs: frames go straight in
        self._rx_queue: Optional[Virtqueue] = None
        self._rx_moved = False  # frames went straight in since poll_done() last said so
        self._mergeable = False
        self._hdr_flags = 0
        self._hdr_one = _HDR.pack(0, 0, 0, 0, 0, 0, 1)

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
        q = self._rx_queue
        if q is not None and not self._rx_backlog and threading.get_ident() == self._io_ident and q.ready:
            if self._put(q, frame) is not None:
                self._rx_moved = True
                return
        with self._lock:
            if len(self._rx_backlog) >= RX_BACKLOG_MAX:
                self.rx_dropped += 1
                return
            self._rx_backlog.append(bytes(frame))

    def _put(self, q: Virtqueue, frame: bytes) -> Optional[bool]:
        """Write one frame into the driver's receive buffers (I/O thread).

        True when it went in, False when it was dropped (too big for the
        buffers without MRG_RXBUF), None when the driver has not offered
        enough buffers yet (nothing is taken from the ring then).
        """
        total = HDR_LEN + len(frame)
        chain = q.pop()
        if chain is None:
            return None
        writable = chain.writable
        if writable and len(writable[0]) >= total:
            v = writable[0]  # the usual case: header and frame fit the first buffer
            v[:HDR_LEN] = self._hdr_one
            v[HDR_LEN:total] = frame
            q.push(chain.head, total)
            self.rx_frames += 1
            self.rx_bytes += len(frame)
            return True
        chains = [chain]
        room = chain.writable_len()
        while room < total and self._mergeable:
            chain = q.pop()
            if chain is None:
                # Not enough buffers for the whole frame yet: they are still in the avail
                # ring (nothing was pushed); wait for more.
                q.unpop(len(chains))
                return None
            chains.append(chain)
            room += chain.writable_len()
        if room < total:
            # Without mergeable buffers a frame that does not fit one chain is dropped.
            for c in chains:
                q.push(c.head, 0)
            self.rx_dropped += 1
            return False
        data = _HDR.pack(self._hdr_flags, 0, 0, 0, 0, 0, len(chains)) + frame
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
        self.rx_frames += 1
        self.rx_bytes += len(frame)
        return True

    def _deliver(self, q: Virtqueue) -> bool:
        """Move backlog frames into the driver's receive buffers; True if any went in (or were dropped).

        Out of buffers with frames left, it asks for a kick on the driver's
        next buffer (and looks once more, for one published meanwhile).
        """
        moved = False
        backlog = self._rx_backlog
        while backlog:
            seen = q.avail_idx()
            if self._put(q, backlog[0]) is None:
                q.enable_kicks()
                if q.avail_idx() != seen:
                    continue
                return moved
            backlog.popleft()
            moved = True
        return moved

    def rx_room(self) -> int:
        """How many frames the driver can take now, at least one buffer each (backends read no more).

        On the I/O thread, 0 means its receive ring is empty, and its next
        buffers will kick the thread. Elsewhere, the room left in the backlog.
        """
        if not self._link_up:
            return RX_BACKLOG_MAX  # dropped anyway: nothing to wait for
        q = self._rx_queue
        if q is None or not q.ready or threading.get_ident() != self._io_ident:
            return max(0, RX_BACKLOG_MAX - len(self._rx_backlog))
        if self._rx_backlog:
            with self._lock:
                if self._deliver(q):
                    self._rx_moved = True
            if self._rx_backlog:
                return 0
        room = q.available()
        if not room:
            q.enable_kicks()
            room = q.available()
        return room

    def wants_kicks(self, q: Virtqueue) -> bool:
        """Kicks from the transmit queue always; from the receive queue only while frames wait for buffers."""
        return q.index != RX or bool(self._rx_backlog)

    # I/O thread -----------------------------------------------------------------------------

    def activate(self, features: int, queues: List[Virtqueue]) -> None:
        super().activate(features, queues)
        self._mergeable = bool(features & F_MRG_RXBUF)
        self._hdr_flags = HDR_F_DATA_VALID if features & F_GUEST_CSUM else 0
        self._hdr_one = _HDR.pack(self._hdr_flags, 0, 0, 0, 0, 0, 1)
        self._queues = queues
        self._rx_queue = queues[RX] if len(queues) > RX else None

    def process(self, queue: Virtqueue) -> None:
        if queue.index == TX:
            self._transmit(queue)
        elif self._rx_backlog:
            with self._lock:
                self._deliver(queue)

    def _transmit(self, q: Virtqueue) -> None:
        input_many = self.backend.input_many
        self.tx_last_bytes = 0
        while True:
            heads: List[int] = []
            frames: List[memoryview] = []
            try:
                while len(heads) < TX_BATCH:
                    chain = q.pop()
                    if chain is None:
                        break
                    heads.append(chain.head)
                    readable = chain.readable
                    if len(readable) == 1 and len(readable[0]) > HDR_LEN:
                        frame = readable[0][HDR_LEN:]  # the usual layout: no copy at all
                    elif HDR_LEN + 14 <= sum(map(len, readable)) <= HDR_LEN + FRAME_MAX:
                        # Counted first: descriptors may name the same guest memory many times.
                        frame = memoryview(b"".join(readable))[HDR_LEN:]
                    else:
                        self.tx_dropped += 1
                        continue
                    if not self._link_up or not 14 <= len(frame) <= FRAME_MAX:
                        self.tx_dropped += 1
                        continue
                    frames.append(frame)
                if frames:
                    self.tx_frames += len(frames)
                    moved = sum(map(len, frames))
                    self.tx_last_bytes += moved
                    self.tx_bytes += moved
                    input_many(frames)
            finally:
                # Only now: the backend may have read the frames in place until it returned.
                q.push_many(heads)
            if len(heads) < TX_BATCH:
                return

    def counters(self) -> NetCounters:
        """Frames moved and dropped since the device was made; read from any thread (each field is one int)."""
        return NetCounters(rx_bytes=self.rx_bytes, rx_packets=self.rx_frames, rx_dropped=self.rx_dropped,
                           tx_bytes=self.tx_bytes, tx_packets=self.tx_frames, tx_dropped=self.tx_dropped)

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
                    self.backend.release_thread()
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
        self._io_ident = threading.get_ident()
        with self._backend_lock:
            self._io_running = True
            while self._pending_calls:
                self._pending_calls.popleft()()
            fds, timeout = self.backend.poll_prepare()
        q = self._rx_queue
        if self._rx_moved or (self._rx_backlog and q is not None and q.ready and q.available()):
            # Frames went in (from the calls above, or rx_room()) and the guest must hear
            # of them, or frames and buffers are both waiting: poll_done() sees to it now.
            timeout = 0
        return fds, timeout

    def poll_done(self, revents: Dict[int, int]) -> bool:
        self.backend.poll_done(revents)
        moved, self._rx_moved = self._rx_moved, False
        # The receive ring may not be live (vhost-user starts rings one by one).
        q = self._rx_queue
        if self._rx_backlog and q is not None and q.ready:
            with self._lock:
                moved = self._deliver(q) or moved
        return moved

    def deactivate(self) -> None:
        super().deactivate()
        with self._backend_lock:
            self._io_running = False  # its I/O thread has been joined: the backend is free again
            calls, self._pending_calls = list(self._pending_calls), collections.deque()
        self._io_ident = None
        self._rx_queue = None
        self._rx_moved = False
        for call in calls:
            self.run_on_backend(call)
        self._queues = []
        with self._lock:
            self._rx_backlog.clear()

    def close(self) -> None:
        with self._backend_lock:
            self._io_running = False
            self.backend.close()
