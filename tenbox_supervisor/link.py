"""The supervisor's end of the worker link: a ZeroMQ ROUTER on an ipc:// endpoint (daemon, root).

Workers connect DEALER sockets. The endpoint lives in a folder only root
and the worker group may enter (0710 root:tenbox-vm; 0700 for a daemon
that is not root). Frames are checked (size, msgpack, known type) before
anything looks inside them.

A worker speaks only for its own VM. A connection says nothing for any
VM until its HELLO is accepted, and a HELLO is judged by the kernel's
peer credentials of the connection (SO_PEERCRED, which libzmq gives as
the message's Peer-Address), not by what it claims: its pid must be the
one the HELLO names, and the WorkerManager accepts it only from the pid
of the VM's own worker. The VM's messages are then routed to that
connection, by the routing id ZeroMQ gave it. No ROUTER_HANDOVER: a
connection that names itself after a VM (as workers before 0.9 did)
takes over nothing; without a HELLO accepted it is only asked who it is.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Optional

import zmq

from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.link import Hello, Message, Who, decode, encode

log = logging.getLogger("tenboxd.link")

PEER_ADDRESS = "Peer-Address"  # libzmq's metadata: "ADDRESS:uid:gid:pid" for a unix-socket peer
FOLDER_MODE_SHARED = 0o710  # root: rwx; the worker group: search, so that workers reach the socket
SOCKET_MODE_SHARED = 0o660


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it connect."""

    uid: int
    gid: int
    pid: int


def peer_of(frame) -> Optional[Peer]:
    """The peer credentials of the connection a zmq.Frame came on; None if libzmq has none."""
    try:
        address = frame.get(PEER_ADDRESS)
    except Exception:  # zmq.ZMQError (EINVAL) where libzmq has no such metadata
        return None
    parts = (address or "").rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return Peer(uid=int(parts[1]), gid=int(parts[2]), pid=int(parts[3]))


class LinkBusy(Exception):
    """Another tenboxd owns this worker endpoint."""


class LinkServer:
    """The ROUTER socket, driven from the asyncio loop through its ZMQ_FD.

    ZMQ_FD is edge-triggered and any operation on the socket may consume the
    edge, so after every wake-up and every send the socket is drained while
    ZMQ_EVENTS says a message is waiting. One plain socket, one thread: no
    shadow sockets whose sends could swallow the loop's wake-ups.
    """

    def __init__(self, endpoint: str, on_message: Callable[[str, Message], bool],
                 worker_gid: Optional[int] = None, peer_uids: Collection[int] = ()) -> None:
        """`on_message(vm_id, msg)` answers, for a HELLO, whether it is accepted. With `worker_gid`
        (root), workers of that group may reach the socket; `peer_uids` are the users a worker may
        run as (root and the daemon's own user always may)."""
        if not endpoint.startswith("ipc://"):
            raise ValueError("the worker link must be an ipc:// endpoint")
        self.endpoint = endpoint
        self.path = endpoint[len("ipc://") :]
        self.on_message = on_message
        self.worker_gid = worker_gid
        self.peer_uids = {0, os.getuid()} | set(peer_uids)
        self._vm_of_route: Dict[bytes, str] = {}
        self._route_of_vm: Dict[str, bytes] = {}
        self._ctx: Optional[zmq.Context] = None
        self._sock: Optional[zmq.Socket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock_fd: Optional[int] = None
        self._drain_scheduled = False

    def start(self) -> None:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self._share(folder, 0o700, FOLDER_MODE_SHARED)
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
        # No ROUTER_HANDOVER: a routing id already connected is never handed to a newcomer.
        sock.bind(self.endpoint)
        self._share(self.path, 0o600, SOCKET_MODE_SHARED)
        self._sock = sock
        self._loop = asyncio.get_event_loop()
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        self._loop.call_soon(self._drain)

    def _share(self, path: str, private: int, shared: int) -> None:
        """Mode `private`, or `shared` with the worker group as its group (the owner stays root)."""
        if self.worker_gid is None:
            os.chmod(path, private)
            return
        os.chown(path, 0, self.worker_gid)
        os.chmod(path, shared)

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
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)  # Frames: they carry the peer's credentials
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
        route, frame = frames[0].bytes, frames[1]
        try:
            msg = decode(frame.bytes)
        except ValueError as e:
            log.warning("dropped a bad worker frame: %s", e)
            return
        if isinstance(msg, Hello):
            self._hello(route, peer_of(frame), msg)
            return
        vm_id = self._vm_of_route.get(route)
        if vm_id is None:
            self._send_route(route, Who())  # a connection we do not know yet (a restarted tenboxd): ask
            return
        self._handle(vm_id, msg)

    def _hello(self, route: bytes, peer: Optional[Peer], msg: Hello) -> None:
        """Route the VM's messages to this connection if its HELLO is its own worker's."""
        if peer is None or peer.pid != msg.pid or peer.uid not in self.peer_uids:
            log.warning("dropped a HELLO for VM %r claiming pid %s from %s", msg.vm_id[:64], msg.pid,
                        "pid %d uid %d" % (peer.pid, peer.uid) if peer else "a peer without credentials")
            return
        if self._handle(msg.vm_id, msg):
            old = self._route_of_vm.get(msg.vm_id)
            if old is not None and old != route:
                self._vm_of_route.pop(old, None)
            self._route_of_vm[msg.vm_id] = route
            self._vm_of_route[route] = msg.vm_id

    def _handle(self, vm_id: str, msg: Message) -> bool:
        try:
            return bool(self.on_message(vm_id, msg))
        except Exception:
            log.exception("handling a worker message from %s failed", vm_id)
            return False

    def send(self, vm_id: str, msg: Message) -> bool:
        route = self._route_of_vm.get(vm_id)
        return route is not None and self._send_route(route, msg)

    def _send_route(self, route: bytes, msg: Message) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send_multipart([route, encode(msg)], zmq.NOBLOCK)
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
