"""The supervisor's end of the worker link: a ZeroMQ ROUTER on an ipc:// endpoint (daemon, root).

Workers connect DEALER sockets named by their VM id. The endpoint lives in
a 0700 folder, so only root's processes can reach it. Frames are checked
(size, msgpack, known type) before anything looks inside them.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from typing import Callable, Optional

import zmq

from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.link import Message, decode, encode

log = logging.getLogger("tenboxd.link")


class LinkBusy(Exception):
    """Another tenboxd owns this worker endpoint."""


class LinkServer:
    """The ROUTER socket, driven from the asyncio loop through its ZMQ_FD.

    ZMQ_FD is edge-triggered and any operation on the socket may consume the
    edge, so after every wake-up and every send the socket is drained while
    ZMQ_EVENTS says a message is waiting. One plain socket, one thread: no
    shadow sockets whose sends could swallow the loop's wake-ups.
    """

    def __init__(self, endpoint: str, on_message: Callable[[str, Message], None]) -> None:
        if not endpoint.startswith("ipc://"):
            raise ValueError("the worker link must be an ipc:// endpoint")
        self.endpoint = endpoint
        self.path = endpoint[len("ipc://") :]
        self.on_message = on_message
        self._ctx: Optional[zmq.Context] = None
        self._sock: Optional[zmq.Socket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock_fd: Optional[int] = None
        self._drain_scheduled = False

    def start(self) -> None:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        self._lock_fd = os.open(os.path.join(folder, "link.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise LinkBusy("another tenboxd uses the worker endpoint %s" % self.path) from None
        if os.path.exists(self.path):
            os.unlink(self.path)  # stale, from a tenboxd that died: we hold the lock
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, Limits.LINK_MESSAGE_MAX_BYTES)
        sock.setsockopt(zmq.SNDHWM, Limits.LINK_QUEUE_MAX)
        sock.setsockopt(zmq.RCVHWM, Limits.LINK_QUEUE_MAX * 4)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a worker that is gone raises, not drops
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker replaces its old pipe
        sock.bind(self.endpoint)
        os.chmod(self.path, 0o600)
        self._sock = sock
        self._loop = asyncio.get_event_loop()
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        self._loop.call_soon(self._drain)

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sock = self._sock
        if sock is None:
            return
        for _ in range(Limits.LINK_QUEUE_MAX):  # yield to the loop now and then under a flood
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                log.error("worker link receive failed: %s", e)
                return
            self._dispatch(frames)
        self._schedule_drain()

    def _dispatch(self, frames) -> None:
        if len(frames) != 2:
            log.warning("dropped a worker frame with %d parts", len(frames))
            return
        ident, frame = frames
        try:
            vm_id = ident.decode("ascii")
            msg = decode(frame)
        except (UnicodeDecodeError, ValueError) as e:
            log.warning("dropped a bad worker frame: %s", e)
            return
        try:
            self.on_message(vm_id, msg)
        except Exception:
            log.exception("handling a worker message from %s failed", vm_id)

    def send(self, vm_id: str, msg: Message) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send_multipart([vm_id.encode("ascii"), encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False  # not connected (ROUTER_MANDATORY) or its queue is full
        finally:
            self._schedule_drain()  # the send may have eaten the edge of an incoming message

    async def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
