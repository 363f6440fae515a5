"""The vhost-user back end: one front end on a unix socket, one virtio device (vhost-user backend process).

The socket thread answers the front end's messages; a ring starts when its
kick fd arrives (and, with PROTOCOL_FEATURES, when it is enabled) and stops
on GET_VRING_BASE. The started rings are served by the same IoThread the KVM
worker uses, with the front end's eventfds as kicks and calls. A message we
cannot accept ends the session with one line in the log; a ring the guest
set up wrongly only stops that ring (its error eventfd is signalled). The
process exits when the front end disconnects.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
import time
from typing import Callable, List, Optional, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.passed_files import received_fds
from tenbox_vmm.devices.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from tenbox_vmm.devices.virtio.device import VirtioDevice
from tenbox_vmm.devices.virtio.iothread import IoThread
from tenbox_vmm.devices.virtio.net import TX as NET_TX
from tenbox_vmm.devices.virtio.net import VirtioNet
from tenbox_vmm.devices.virtio.queue import QUEUE_SIZE_MAX, Virtqueue, VirtqueueError
from tenbox_vmm.memory import GuestMemoryError
from tenbox_vmm.vhost_user import protocol as P
from tenbox_vmm.vhost_user.memory import VhostMemory

log = logging.getLogger("tenbox.vhost-user")

_FD_KINDS = {P.SET_VRING_KICK: "kick", P.SET_VRING_CALL: "call", P.SET_VRING_ERR: "err"}


class ProtocolError(Exception):
    """The front end sent something we cannot accept; the session ends."""


class _Ring:
    def __init__(self, queue: Virtqueue) -> None:
        self.queue = queue
        self.kick: Optional[int] = None
        self.call: Optional[int] = None
        self.err: Optional[int] = None
        self.enabled = False
        self.started = False
        self.addr: Optional[Tuple[int, int, int]] = None  # desc, avail, used (front-end addresses)


POLL_MAX_SEC = 200e-6  # the longest an idle queue is watched before the thread sleeps
POLL_MIN_SEC = 5e-6  # shorter windows are not worth it: polling stops until kicks come fast again
POLL_NET_TX_MIN_BYTES = 1024  # a transmit pass smaller than one full frame (ACKs only) is not polled after


class AdaptivePoller:
    """The vhost-user backend's IdlePoller: watch the avail index a while before kicks are re-armed.

    A kick costs the guest an exit (under QEMU TCG an emulated MMIO write),
    the front end an eventfd write and this thread a cross-process wake-up.
    So after serving a queue we watch its avail index for a while, kicks
    still disabled: a guest that submits its next request within the window
    needs none of that. The window adapts as QEMU's iothread polling does:
    it halves each time it runs out without work (an idle guest costs
    nothing after a few misses) and grows towards the gap seen between going
    to sleep and the next kick, up to `poll_max`.
    """

    def __init__(self, device: VirtioDevice, queues: List[Virtqueue], poll_max: float = POLL_MAX_SEC) -> None:
        self.device = device
        self.poll_max = poll_max
        # Receive queues are left alone: new buffers there are no work until frames come.
        self.polled = {NET_TX} if isinstance(device, VirtioNet) else {q.index for q in queues}
        self._window = 0.0
        self._slept_at = 0.0

    def woken(self) -> None:
        if self._slept_at:
            gap = time.perf_counter() - self._slept_at  # woken by a kick after this long
            if gap < self.poll_max:
                self._window = min(self.poll_max, max(self._window * 2, gap * 1.5, POLL_MIN_SEC))

    def sleeping(self) -> None:
        self._slept_at = time.perf_counter()

    def poll(self, q: Virtqueue, seen: int, stopping: Callable[[], bool]) -> bool:
        """Watch the avail index for the current window; True if the driver published meanwhile."""
        if self._window <= 0 or q.index not in self.polled or not self.worth_polling():
            return False
        avail_idx = q.avail_idx
        clock = time.perf_counter
        deadline = clock() + self._window
        while avail_idx() == seen and not stopping():
            if clock() >= deadline:
                self._window /= 2
                if self._window < POLL_MIN_SEC:
                    self._window = 0.0
                return False
        return True

    def worth_polling(self) -> bool:
        """Whether the queue just served is busy enough to watch.

        A guest that only acknowledges what it receives sends a few small
        frames at a time; spinning for them takes the core that the guest's
        vCPU and the front end need to deliver its downloads (measured: 0.97
        -> 1.09 of QEMU on tcp-rx without polling, while a bulk sender still gains from it).
        """
        device = self.device
        if isinstance(device, VirtioNet):
            return device.tx_last_bytes >= POLL_NET_TX_MIN_BYTES
        return True


class Backend:
    def __init__(self, device: VirtioDevice, protocol_features: int) -> None:
        self.device = device
        self.offered_protocol = protocol_features | P.PF_REPLY_ACK
        self.features = 0
        self.protocol = 0
        self.memory: Optional[VhostMemory] = None
        # The front end picks the ring sizes (QEMU's queue-size); the device's
        # queue_size is only what its virtio-mmio transport offers.
        self.rings = [_Ring(Virtqueue(_NoMemory(), i, QUEUE_SIZE_MAX)) for i in range(device.num_queues)]
        self.io: Optional[IoThread] = None
        self.messages = 0
        # The I/O thread signals call/err fds while the socket thread may swap them.
        self._fd_lock = threading.Lock()

    def offered_features(self) -> int:
        return self.device.device_features() | F_VERSION_1 | P.F_PROTOCOL_FEATURES

    # The session ---------------------------------------------------------------------------

    def serve(self, conn: socket.socket) -> None:
        """Answer messages until the front end goes away."""
        try:
            while True:
                msg = self._recv(conn)
                if msg is None:
                    log.info("the front end disconnected after %d messages", self.messages)
                    return
                self.messages += 1
                request, flags, payload, fds = msg
                log.debug("<- %s (%d bytes, %d fds)", P.NAMES.get(request, request), len(payload), len(fds))
                try:
                    reply = self.handle(request, payload, fds)
                except ProtocolError:
                    raise
                except (VirtqueueError, GuestMemoryError, ValueError, OSError) as e:
                    raise ProtocolError("%s: %s" % (P.NAMES.get(request, request), e)) from None
                if reply is not None:
                    self._send(conn, request, reply)
                elif flags & P.FLAG_NEED_REPLY and self.protocol & P.PF_REPLY_ACK:
                    self._send(conn, request, P.U64.pack(0))
        finally:
            self.stop()

    def _recv(self, conn: socket.socket):
        fd_space = socket.CMSG_SPACE(P.FDS_MAX * array.array("i").itemsize)
        try:
            data, ancdata, msg_flags, _ = conn.recvmsg(P.HEADER_SIZE, fd_space)
        except ConnectionResetError:
            return None
        fds = received_fds(ancdata)
        if not data:
            _close_all(fds)
            return None
        try:
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError("more than %d file descriptors in one message" % P.FDS_MAX)
            if len(data) < P.HEADER_SIZE:
                data += self._recv_exact(conn, P.HEADER_SIZE - len(data))
            request, flags, size = P.HEADER.unpack(data)
            if flags & P.FLAG_VERSION_MASK != P.VERSION or size > P.PAYLOAD_MAX:
                raise ProtocolError("bad header: request %d flags %#x size %d" % (request, flags, size))
            payload = self._recv_exact(conn, size) if size else b""
        except BaseException:
            _close_all(fds)
            raise
        return request, flags, payload, fds

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ProtocolError("the front end closed the socket mid-message")
            buf += chunk
        return buf

    @staticmethod
    def _send(conn: socket.socket, request: int, payload: bytes) -> None:
        conn.sendall(P.HEADER.pack(request, P.VERSION | P.FLAG_REPLY, len(payload)) + payload)

    # Messages ---------------------------------------------------------------------------------

    def handle(self, request: int, payload: bytes, fds: List[int]) -> Optional[bytes]:
        """Carry out one request; the reply payload, or None if it has none.

        Takes ownership of `fds`: each is kept or closed.
        """
        if request == P.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if request in _FD_KINDS:
            return self._set_vring_fd(request, payload, fds)
        _close_all(fds)
        if request in P.NO_FD_PAYLOAD and len(payload) < P.NO_FD_PAYLOAD[request]:
            raise ProtocolError("%s with a payload of %d bytes" % (P.NAMES[request], len(payload)))
        if request == P.GET_FEATURES:
            return P.U64.pack(self.offered_features())
        if request == P.SET_FEATURES:
            (value,) = P.U64.unpack_from(payload)
            if value & ~self.offered_features():
                raise ProtocolError("features %#x were not offered" % (value & ~self.offered_features()))
            self.features = value
            return None
        if request == P.GET_PROTOCOL_FEATURES:
            return P.U64.pack(self.offered_protocol)
        if request == P.SET_PROTOCOL_FEATURES:
            (value,) = P.U64.unpack_from(payload)
            self.protocol = value & self.offered_protocol
            return None
        if request in (P.SET_OWNER, P.RESET_OWNER):
            return None
        if request == P.GET_QUEUE_NUM:
            return P.U64.pack(len(self.rings))
        if request == P.SET_VRING_NUM:
            index, num = P.VRING_STATE.unpack_from(payload)
            self._ring(index, stopped=True).queue.size = num
            return None
        if request == P.SET_VRING_BASE:
            index, num = P.VRING_STATE.unpack_from(payload)
            self._ring(index, stopped=True).queue.last_avail = num & 0xFFFF
            return None
        if request == P.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = P.VRING_ADDR.unpack_from(payload)
            self._ring(index, stopped=True).addr = (desc, avail, used)
            return None
        if request == P.SET_VRING_ENABLE:
            index, num = P.VRING_STATE.unpack_from(payload)
            ring = self._ring(index)
            if ring.enabled != bool(num):
                ring.enabled = bool(num)
                self._restart()
            return None
        if request == P.GET_VRING_BASE:
            index, _ = P.VRING_STATE.unpack_from(payload)
            ring = self._ring(index)
            if ring.started:
                self._halt()
                ring.started = False
                ring.queue.ready = False
                self._close_fd(ring, "kick")
                self._restart()
            else:
                self._close_fd(ring, "kick")
            return P.VRING_STATE.pack(index, ring.queue.last_avail)
        if request == P.GET_CONFIG:
            offset, size, _flags = P.CONFIG_HEADER.unpack_from(payload)
            if size > P.PAYLOAD_MAX - P.CONFIG_HEADER.size:
                raise ProtocolError("GET_CONFIG of %d bytes" % size)
            cfg = self.device.config_bytes().ljust(offset + size, b"\0")[offset : offset + size]
            return P.CONFIG_HEADER.pack(offset, size, 0) + cfg
        if request == P.SET_CONFIG:
            return None  # nothing of ours is writable (blk's writeback mode is fixed)
        if request in (P.SEND_RARP, P.NET_SET_MTU):
            return None
        if request in (P.SET_LOG_BASE, P.SET_LOG_FD):
            raise ProtocolError("live migration logging is not supported")
        raise ProtocolError("unsupported request %d" % request)

    def _ring(self, index: int, stopped: bool = False) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError("no ring %d (this device has %d)" % (index, len(self.rings)))
        ring = self.rings[index]
        if stopped and ring.started:
            raise ProtocolError("ring %d changed while started" % index)
        return ring

    def _set_mem_table(self, payload: bytes, fds: List[int]) -> None:
        if len(payload) < P.MEM_HEADER.size:
            _close_all(fds)
            raise ProtocolError("SET_MEM_TABLE without its header")
        nregions, _ = P.MEM_HEADER.unpack_from(payload)
        if (not 1 <= nregions <= P.FDS_MAX or len(fds) != nregions
                or len(payload) < P.MEM_HEADER.size + nregions * P.MEM_REGION.size):
            _close_all(fds)
            raise ProtocolError("memory table with %d regions, %d fds, %d bytes" % (nregions, len(fds), len(payload)))
        regions = []
        for i in range(nregions):
            gpa, size, uva, offset = P.MEM_REGION.unpack_from(payload, P.MEM_HEADER.size + i * P.MEM_REGION.size)
            regions.append((gpa, size, uva, offset, fds[i]))
        self._halt()
        memory = VhostMemory(regions)  # owns the fds from here, even if it fails
        old, self.memory = self.memory, memory
        for ring in self.rings:
            ring.queue.mem = memory
            # A started ring keeps its indexes but must map its rings again in the new table.
            ring.started = False
        if old is not None:
            old.close()
        self._restart()
        log.info("memory table: %s", ", ".join("%#x+%#x" % (r[0], r[1]) for r in regions))

    def _set_vring_fd(self, request: int, payload: bytes, fds: List[int]) -> None:
        if len(payload) < P.U64.size:
            _close_all(fds)
            raise ProtocolError("%s with a payload of %d bytes" % (P.NAMES[request], len(payload)))
        (value,) = P.U64.unpack_from(payload)
        index = value & P.VRING_INDEX_MASK
        fd = None
        if not value & P.VRING_NOFD:
            if len(fds) != 1:
                _close_all(fds)
                raise ProtocolError("%s for ring %d with %d fds" % (P.NAMES[request], index, len(fds)))
            fd = fds[0]
        else:
            _close_all(fds)
        try:
            ring = self._ring(index)
        except ProtocolError:
            _close_all([fd] if fd is not None else [])
            raise
        kind = _FD_KINDS[request]
        if kind == "kick":
            self._halt()
            if ring.started:  # a new kick for a running ring: keep its state, serve it with the new fd
                ring.started = False
                ring.queue.ready = False
            self._close_fd(ring, "kick")
            ring.kick = fd
            if fd is not None:
                os.set_blocking(fd, False)
            if not self.features & P.F_PROTOCOL_FEATURES:
                ring.enabled = True  # without PROTOCOL_FEATURES a ring runs once it has its kick
            self._restart()
        else:
            with self._fd_lock:
                old = getattr(ring, kind)
                setattr(ring, kind, fd)
            if old is not None:
                os.close(old)
        return None

    def _close_fd(self, ring: _Ring, kind: str) -> None:
        with self._fd_lock:
            fd = getattr(ring, kind)
            setattr(ring, kind, None)
        if fd is not None:
            os.close(fd)

    # Rings and the I/O thread ------------------------------------------------------------------

    def _halt(self) -> None:
        io, self.io = self.io, None
        if io is not None:
            io.stop()

    def _restart(self) -> None:
        """(Re)start the I/O thread over every ring that can run."""
        self._halt()
        memory = self.memory
        if memory is None:
            return
        for ring in self.rings:
            if ring.started or ring.kick is None or not ring.enabled or ring.addr is None:
                continue
            q = ring.queue
            desc, avail, used = ring.addr
            try:
                q.desc_addr = memory.uva_to_gpa(desc, 16 * q.size)
                q.avail_addr = memory.uva_to_gpa(avail, 6 + 2 * q.size)
                q.used_addr = memory.uva_to_gpa(used, 6 + 8 * q.size)
                q.activate(bool(self.features & F_RING_EVENT_IDX), bool(self.features & F_RING_INDIRECT_DESC))
            except (GuestMemoryError, VirtqueueError) as e:
                q.ready = False
                log.error("ring %d cannot start: %s", ring.queue.index, e)
                self._signal_err(ring)
                continue
            ring.started = True
        running = [r for r in self.rings if r.started and r.kick is not None and r.enabled]
        if not running:
            self.device.deactivate()
            return
        self.device.activate(self.features & ~P.F_PROTOCOL_FEATURES, [r.queue for r in self.rings])
        poller = AdaptivePoller(self.device, [r.queue for r in running],
                                float(os.environ.get("TENBOX_VU_POLL_US", "200")) / 1e6)
        self.io = IoThread("vhost-user-%s" % self.device.name, self.device, [r.queue for r in running],
                           [r.kick for r in running], self._signal_used, self._ring_error, idle_poller=poller)
        self.io.start()

    def _signal_used(self, index: int) -> None:
        with self._fd_lock:
            fd = self.rings[index].call
            if fd is not None:
                eventfd.signal(fd)

    def _signal_err(self, ring: _Ring) -> None:
        with self._fd_lock:
            if ring.err is not None:
                eventfd.signal(ring.err)

    def _ring_error(self, reason: str) -> None:
        """The I/O thread stopped on a broken ring (it has left its loop)."""
        log.error("ring error, the device stops until the front end resets it: %s", reason)
        for ring in self.rings:
            if ring.started:
                ring.queue.ready = False
                self._signal_err(ring)

    def stop(self) -> None:
        self._halt()
        self.device.deactivate()
        for ring in self.rings:
            ring.started = False
            ring.queue.ready = False
            for kind in ("kick", "call", "err"):
                self._close_fd(ring, kind)
        if self.memory is not None:
            self.memory.close()
            self.memory = None


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _NoMemory:
    """Until SET_MEM_TABLE, a queue has no memory to look at."""

    def view(self, gpa: int, length: int):
        raise GuestMemoryError("no memory table yet")
