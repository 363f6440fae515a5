"""The control socket: a unix stream socket speaking newline-delimited JSON (daemon, root).

Created as the seed says: listen, then (with TENBOX_SOCKET_GROUP) chown to
the group and chmod 0660, in that order; its folder stays 0755 so others
get an honest "permission denied". A lock file beside the socket keeps a
second tenboxd away; a socket file left by a dead daemon is replaced.
Every client is served by its own task: no request blocks the others.

Bounds on clients (docs/security.md): a connection that sends no request
for the idle time is closed (blank lines do not count as requests); one
that takes no byte of its replies for CLIENT_WRITE_STALL_SEC is dropped;
each non-root uid may hold CLIENTS_PER_UID_MAX connections and all of
them together CLIENTS_MAX, while root's connections are counted apart, so
group members can never lock root (or the package's postinst) out.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections import Counter
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from tenbox_supervisor.api import Api, Caller
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import (
    CLIENT_IDLE_SEC,
    CLIENT_WRITE_STALL_SEC,
    CLIENTS_MAX,
    CLIENTS_PER_UID_MAX,
    REQUEST_MAX_BYTES,
    ROOT_CLIENTS_MAX,
    ErrorCode,
)

log = logging.getLogger("tenboxd.control")

# TenBox's clients put these at the top level; everything else goes in "payload".
TOP_LEVEL_PARAMS = ("vm_id", "lines", "data_hex", "force", "timeout", "source", "version")


# Linux's SO_PEERGROUPS (4.13+, the same number on x86-64 and arm64); Python's socket module lacks it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
PEER_GROUPS_MAX = 256  # Python reads at most 1024 bytes of an option; more groups: looked up instead


class SocketBusy(Exception):
    """Another tenboxd serves this socket."""


class ClientStalled(Exception):
    """A client took nothing of its replies for CLIENT_WRITE_STALL_SEC."""


def peer_groups(sock: socket.socket, uid: int, gid: int) -> Tuple[int, ...]:
    """The peer's supplementary groups when it connected; its user's groups from the database if unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * PEER_GROUPS_MAX)
        return tuple(struct.unpack("%dI" % (len(raw) // 4), raw[: len(raw) // 4 * 4]))
    except OSError:  # ENOPROTOOPT on old kernels, ERANGE beyond PEER_GROUPS_MAX
        pass
    try:
        return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        return (gid,)


def peer_credentials(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid, groups=peer_groups(sock, uid, gid))


def _encode(obj: Dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


async def drain(writer: asyncio.StreamWriter) -> None:
    """writer.drain() bounded by progress: ClientStalled once the peer took nothing for CLIENT_WRITE_STALL_SEC.

    A reader that is slow but keeps taking bytes is waited for; one that
    stopped reading is not (drain() alone would wait for ever, holding the
    client's task and its buffers).
    """
    transport = writer.transport
    while True:
        pending = transport.get_write_buffer_size()
        try:
            await asyncio.wait_for(writer.drain(), CLIENT_WRITE_STALL_SEC)
            return
        except asyncio.TimeoutError:
            if transport.get_write_buffer_size() >= pending:
                raise ClientStalled() from None


async def send_line(writer: asyncio.StreamWriter, obj: Dict[str, Any]) -> None:
    writer.write(_encode(obj))
    await drain(writer)


class Stream:
    """What a streaming method sees of its connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req_id: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.req_id = req_id
        self.request_id = req_id
        self.replied = False

    async def reply(self, payload: Dict[str, Any]) -> bool:
        """Send the ok reply now; True once it is handed to the kernel."""
        self.replied = True
        try:
            await send_line(self.writer, {"id": self.req_id, "ok": True, "payload": payload})
            return True
        except (ConnectionError, ClientStalled):
            return False

    async def event(self, obj: Dict[str, Any]) -> None:
        await send_line(self.writer, obj)

    async def next_event(self) -> Optional[Dict[str, Any]]:
        """The client's next JSON line; None when it closed the connection or sent garbage."""
        try:
            line = await self.reader.readline()
        except (ValueError, ConnectionError):
            return None
        if not line:
            return None
        try:
            obj = json.loads(line)
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    async def wait_closed(self) -> None:
        while await self.next_event() is not None:
            pass

    async def follow(self, q: asyncio.Queue, send: Callable[[Any], Awaitable[None]]) -> bool:
        """Hand each item of a subscriber queue to `send` as it comes (console_feed.Subscriber).

        True when the queue ended (its None: the source closed, or this client
        fell behind and was cut off), False when the client closed the connection.
        """
        reader = asyncio.ensure_future(self.wait_closed())
        try:
            while True:
                getter = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    getter.cancel()
                    return False
                item = getter.result()
                if item is None:
                    return True
                await send(item)
        finally:
            reader.cancel()


class ClientCounts:
    """Open connections by uid, and the admission rule (pure: unit-tested by table)."""

    def __init__(self, total_max: int = CLIENTS_MAX, per_uid_max: int = CLIENTS_PER_UID_MAX,
                 root_max: int = ROOT_CLIENTS_MAX) -> None:
        self.total_max = total_max
        self.per_uid_max = per_uid_max
        self.root_max = root_max
        self.by_uid: Counter = Counter()

    def admit(self, uid: int) -> Optional[str]:
        """Count a new connection of `uid` and return None, or why it is refused (nothing counted)."""
        if uid == 0:
            if self.by_uid[0] >= self.root_max:
                return "root has %d connections open" % self.root_max
        elif self.by_uid[uid] >= self.per_uid_max:
            return "uid %d has %d connections open" % (uid, self.per_uid_max)
        elif sum(n for u, n in self.by_uid.items() if u != 0) >= self.total_max:
            return "%d connections of users other than root are open" % self.total_max
        self.by_uid[uid] += 1
        return None

    def release(self, uid: int) -> None:
        self.by_uid[uid] -= 1
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]


class ControlServer:
    def __init__(self, path: str, group: Optional[str], api: Api, idle_sec: float = CLIENT_IDLE_SEC) -> None:
        self.path = path
        self.group = group
        self.api = api
        self.idle_sec = idle_sec
        self._server: Optional[asyncio.AbstractServer] = None
        self._lock_fd: Optional[int] = None
        self._inode: Optional[int] = None
        self.clients = ClientCounts()
        self._tasks: set = set()

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        # Never through a link, and only our own file: the socket may be at /tmp/tenbox-<uid>.sock.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            os.close(fd)
            raise SocketBusy("refusing %s: it belongs to uid %d, not to this tenboxd; remove it" % (lock_path, owner))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode().strip() or "?"
            except OSError:
                holder = "?"
            os.close(fd)
            raise SocketBusy("another tenboxd (pid %s) is serving %s" % (holder, self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._lock_fd = fd

    async def start(self) -> None:
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o755)
        self._take_lock()
        try:
            os.unlink(self.path)  # left by a daemon that died: the lock says nobody serves it
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # the socket starts 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path, limit=REQUEST_MAX_BYTES + 1)
        finally:
            os.umask(old_umask)
        self._inode = os.stat(self.path).st_ino
        self._apply_group()
        log.info("listening on %s", self.path)

    def _apply_group(self) -> None:
        if not self.group:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.error("group %r does not exist; %s stays root-only (0600)", self.group, self.path)
            return
        try:
            os.chown(self.path, -1, gid)  # group first: never 0660 with the wrong group
            os.chmod(self.path, 0o660)
        except OSError as e:
            log.error("cannot give %s to group %s: %s", self.path, self.group, e.strerror)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        if self._inode is not None:
            try:
                if os.stat(self.path).st_ino == self._inode:  # ours, not a successor's
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task() if hasattr(asyncio, "current_task") else asyncio.Task.current_task()
        try:
            caller = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        refused = self.clients.admit(caller.uid)
        if refused is not None:
            # Written without waiting: a line fits in the socket's buffer, and a client that does
            # not read it must not hold a task either.
            log.warning("refused a connection from %s: %s", caller, refused)
            writer.write(_encode({"id": None, "ok": False, "error_code": ErrorCode.TOO_MANY_CLIENTS.value,
                                  "error": "%s: %s" % (ErrorCode.TOO_MANY_CLIENTS.message, refused)}))
            writer.close()
            return
        self._tasks.add(task)
        try:
            await self._serve(reader, writer, caller)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except ClientStalled:
            log.warning("client %s took nothing of its replies for %.0fs; disconnected", caller, CLIENT_WRITE_STALL_SEC)
            writer.transport.abort()  # close() would wait for ever to hand over what is buffered
        except Exception:
            log.exception("control client failed")
        finally:
            self.clients.release(caller.uid)
            self._tasks.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, obj: Dict[str, Any]) -> None:
        await send_line(writer, obj)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: Caller) -> None:
        loop = asyncio.get_event_loop()
        deadline = loop.time() + self.idle_sec  # moved by requests only, never by blank lines
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("client %s sent no request for %.0fs; disconnected", caller, self.idle_sec)
                return
            except (ValueError, asyncio.LimitOverrunError):
                await self._send(writer, {"id": None, "ok": False, "error_code": ErrorCode.REQUEST_TOO_LARGE.value,
                                          "error": ErrorCode.REQUEST_TOO_LARGE.message})
                return
            if not line:
                return
            if not line.strip():
                continue
            if not line.endswith(b"\n"):
                return  # the client left mid-line
            try:
                req = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                await self._send(writer, {"id": None, "ok": False, "error_code": ErrorCode.BAD_JSON.value,
                                          "error": ErrorCode.BAD_JSON.message})
                continue
            if not isinstance(req, dict):
                await self._send(writer, {"id": None, "ok": False, "error_code": ErrorCode.BAD_REQUEST.value,
                                          "error": "a request is a JSON object"})
                continue
            req_id = req.get("id")
            if not isinstance(req_id, (str, int, type(None))) or isinstance(req_id, bool):
                req_id = None
            reply = await self._dispatch(req, req_id, caller, reader, writer)
            if reply is None:
                return  # a stream ended: its connection ends with it
            await self._send(writer, reply)
            deadline = loop.time() + self.idle_sec

    async def _dispatch(self, req, req_id, caller, reader, writer) -> Optional[Dict[str, Any]]:
        payload = req.get("payload", {})
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            return {"id": req_id, "ok": False, "error_code": ErrorCode.BAD_REQUEST.value, "error": "payload must be an object"}
        params = dict(payload)
        for key in TOP_LEVEL_PARAMS:
            if key in req:
                params.setdefault(key, req[key])
        stream = None
        try:
            spec = self.api.lookup(req.get("type"))
            if spec.stream:
                stream = Stream(reader, writer, req_id)
            payload_out = await self.api.call(req.get("type"), params, caller, stream)
        except ApiError as e:
            reply = {"id": req_id, "ok": False, "error_code": e.code.value, "error": e.message}
            reply.update(e.extra)
            if stream is not None and stream.replied:
                return None
            return reply
        except (ConnectionError, asyncio.CancelledError, ClientStalled):
            raise
        except Exception as e:
            log.exception("request %r failed", req.get("type"))
            return {"id": req_id, "ok": False, "error_code": ErrorCode.INTERNAL_ERROR.value, "error": "internal error: %s" % e}
        if stream is not None:
            return None
        return {"id": req_id, "ok": True, "payload": payload_out}
