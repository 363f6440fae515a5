"""The vhost-user back end: one front end on a unix socket, one virtio device (vhost-user backend process).

The socket thread answers the front end's messages; a ring starts when its
kick fd arrives (and, with PROTOCOL_FEATURES, when it is enabled) and stops
on GET_VRING_BASE. The started rings are served by the same IoThread the KVM
worker uses, with the front end's eventfds as kicks and calls. Anything
malformed ends the session with one line in the log; the process exits when
the front end disconnects.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from typing import Dict, List, Optional, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.devices.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from tenbox_vmm.devices.virtio.device import VirtioDevice
from tenbox_vmm.devices.virtio.iothread import IoThread
from tenbox_vmm.devices.virtio.queue import Virtqueue, VirtqueueError
from tenbox_vmm.memory import GuestMemoryError
from tenbox_vmm.vhost_user import protocol as P
from tenbox_vmm.vhost_user.memory import VhostMemory

log = logging.getLogger("tenbox.vhost-user")


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


class Backend:
    def __init__(self, device: VirtioDevice, protocol_features: int) -> None:
        self.device = device
        self.offered_protocol = protocol_features | P.PF_REPLY_ACK | P.PF_CONFIG
        self.features = 0
        self.protocol = 0
        self.memory: Optional[VhostMemory] = None
        self.rings = [_Ring(Virtqueue(_NoMemory(), i, device.queue_size)) for i in range(device.num_queues)]
        self.io: Optional[IoThread] = None
        self.messages = 0

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
        fd_space = socket.CMSG_SPACE(P.FDS_MAX * 4)
        data, ancdata, msg_flags, _ = conn.recvmsg(P.HEADER_SIZE, fd_space)
        fds: List[int] = []
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        if len(data) < P.HEADER_SIZE:
            data += self._recv_exact(conn, P.HEADER_SIZE - len(data))
        request, flags, size = P.HEADER.unpack(data)
        if flags & P.FLAG_VERSION_MASK != P.VERSION or size > P.PAYLOAD_MAX:
            raise ProtocolError("bad header: request %d flags %#x size %d" % (request, flags, size))
        payload = self._recv_exact(conn, size) if size else b""
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
        """Carry out one request; the reply payload, or None if it has none."""
        if request == P.GET_FEATURES:
            return P.U64.pack(self.device.device_features() | F_VERSION_1 | P.F_PROTOCOL_FEATURES)
        if request == P.SET_FEATURES:
            (value,) = P.U64.unpack_from(payload)
            offered = self.device.device_features() | F_VERSION_1 | P.F_PROTOCOL_FEATURES
            if value & ~offered:
                raise ProtocolError("features %#x were not offered" % (value & ~offered))
            self.features = value
            return None
        if request == P.GET_PROTOCOL_FEATURES:
            return P.U64.pack(self.offered_protocol)
        if request == P.SET_PROTOCOL_FEATURES:
            (self.protocol,) = P.U64.unpack_from(payload)
            self.protocol &= self.offered_protocol
            return None
        if request in (P.SET_OWNER, P.RESET_OWNER):
            return None
        if request == P.GET_QUEUE_NUM:
            return P.U64.pack(len(self.rings))
        if request == P.GET_MAX_MEM_SLOTS:
            return P.U64.pack(P.FDS_MAX)
        if request == P.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
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
        if request in (P.SET_VRING_KICK, P.SET_VRING_CALL, P.SET_VRING_ERR):
            return self._set_vring_fd(request, payload, fds)
        if request == P.SET_VRING_ENABLE:
            index, num = P.VRING_STATE.unpack_from(payload)
            self._ring(index).enabled = bool(num)
            self._restart()
            return None
        if request == P.GET_VRING_BASE:
            index, _ = P.VRING_STATE.unpack_from(payload)
            ring = self._ring(index)
            if ring.started:
                self._halt()
                ring.started = False
                self._restart()
            base = ring.queue.last_avail
            ring.queue.ready = False
            self._close_fd(ring, "kick")
            return P.VRING_STATE.pack(index, base)
        if request == P.GET_CONFIG:
            offset, size, _flags = P.CONFIG_HEADER.unpack_from(payload)
            cfg = self.device.config_bytes().ljust(offset + size, b"\0")[offset : offset + size]
            return P.CONFIG_HEADER.pack(offset, size, 0) + cfg
        if request == P.SET_CONFIG:
            return None  # nothing of ours is writable (blk's writeback mode is fixed)
        if request in (P.SEND_RARP, P.NET_SET_MTU):
            return None
        if request in (P.SET_LOG_BASE, P.SET_LOG_FD):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("live migration logging is not supported")
        for fd in fds:
            os.close(fd)
        raise ProtocolError("unsupported request %d" % request)

    def _ring(self, index: int, stopped: bool = False) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError("no ring %d (this device has %d)" % (index, len(self.rings)))
        ring = self.rings[index]
        if stopped and ring.started:
            raise ProtocolError("ring %d changed while started" % index)
        return ring

    def _set_mem_table(self, payload: bytes, fds: List[int]) -> None:
        nregions, _ = P.MEM_HEADER.unpack_from(payload)
        if not 1 <= nregions <= P.FDS_MAX or len(fds) != nregions:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("memory table with %d regions and %d fds" % (nregions, len(fds)))
        regions = []
        for i in range(nregions):
            gpa, size, uva, offset = P.MEM_REGION.unpack_from(payload, P.MEM_HEADER.size + i * P.MEM_REGION.size)
            regions.append((gpa, size, uva, offset, fds[i]))
        self._halt()
        old, self.memory = self.memory, VhostMemory(regions)
        for ring in self.rings:
            ring.queue.mem = self.memory
        if old is not None:
            old.close()
        self._restart()
        log.info("memory table: %s", ", ".join("%#x+%#x" % (r[0], r[1]) for r in regions))

    def _set_vring_fd(self, request: int, payload: bytes, fds: List[int]) -> None:
        (value,) = P.U64.unpack_from(payload)
        index = value & P.VRING_INDEX_MASK
        ring = self._ring(index)
        fd = None
        if not value & P.VRING_NOFD:
            if len(fds) != 1:
                raise ProtocolError("%s for ring %d without its fd" % (P.NAMES[request], index))
            fd = fds[0]
        elif fds:
            for extra in fds:
                os.close(extra)
        kind = {P.SET_VRING_KICK: "kick", P.SET_VRING_CALL: "call", P.SET_VRING_ERR: "err"}[request]
        if kind == "kick":
            self._halt()
            self._close_fd(ring, "kick")
            ring.kick = fd
            if fd is not None:
                os.set_blocking(fd, False)
            if not self.features & P.F_PROTOCOL_FEATURES:
                ring.enabled = True  # without PROTOCOL_FEATURES a ring runs once it has its kick
            self._restart()
        else:
            self._close_fd(ring, kind)
            setattr(ring, kind, fd)
        return None

    @staticmethod
    def _close_fd(ring: _Ring, kind: str) -> None:
        fd = getattr(ring, kind)
        if fd is not None:
            os.close(fd)
            setattr(ring, kind, None)

    # Rings and the I/O thread ------------------------------------------------------------------

    def _halt(self) -> None:
        io, self.io = self.io, None
        if io is not None:
            io.stop()

    def _restart(self) -> None:
        """(Re)start the I/O thread over every ring that can run."""
        self._halt()
        if self.memory is None:
            return
        runnable = [r for r in self.rings if r.kick is not None and r.enabled and r.addr is not None]
        if not runnable:
            self.device.deactivate()
            return
        for ring in runnable:
            if not ring.started:
                q = ring.queue
                desc, avail, used = ring.addr
                q.desc_addr = self.memory.uva_to_gpa(desc, 16 * q.size)
                q.avail_addr = self.memory.uva_to_gpa(avail, 6 + 2 * q.size)
                q.used_addr = self.memory.uva_to_gpa(used, 6 + 8 * q.size)
                q.activate(bool(self.features & F_RING_EVENT_IDX), bool(self.features & F_RING_INDIRECT_DESC))
                ring.started = True
        self.device.activate(self.features & ~P.F_PROTOCOL_FEATURES, [r.queue for r in self.rings])
        self.io = IoThread("vhost-user-%s" % self.device.name, self.device, [r.queue for r in runnable],
                           [r.kick for r in runnable], self._signal_used, self._ring_error)
        self.io.start()

    def _signal_used(self, index: int) -> None:
        fd = self.rings[index].call
        if fd is not None:
            eventfd.signal(fd)

    def _ring_error(self, reason: str) -> None:
        log.error("ring error: %s", reason)
        for ring in self.rings:
            if ring.err is not None:
                eventfd.signal(ring.err)

    def stop(self) -> None:
        self._halt()
        for ring in self.rings:
            for kind in ("kick", "call", "err"):
                self._close_fd(ring, kind)
        if self.memory is not None:
            self.memory.close()
            self.memory = None


class _NoMemory:
    """Until SET_MEM_TABLE, a queue has no memory to look at."""

    def view(self, gpa: int, length: int):
        raise GuestMemoryError("no memory table yet")
