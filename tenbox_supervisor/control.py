"""The control socket: a unix stream socket speaking newline-delimited JSON (daemon, root).

Created as the seed says: listen, then (with TENBOX_SOCKET_GROUP) chown to
the group and chmod 0660, in that order; its folder stays 0755 so others
get an honest "permission denied". A lock file beside the socket keeps a
second tenboxd away; a socket file left by a dead daemon is replaced.
Every client is served by its own task: no request blocks the others.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import json
import logging
import os
import socket
import struct
from typing import Any, Dict, Optional

from tenbox_supervisor.api import Api, Caller
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import CLIENT_IDLE_SEC, CLIENTS_MAX, REQUEST_MAX_BYTES, ErrorCode

log = logging.getLogger("tenboxd.control")

# TenBox's clients put these at the top level; everything else goes in "payload".
TOP_LEVEL_PARAMS = ("vm_id", "lines", "data_hex", "force", "timeout", "source", "version")


class SocketBusy(Exception):
    """Another tenboxd serves this socket."""


def peer_credentials(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid)


def _encode(obj: Dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


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
            self.writer.write(_encode({"id": self.req_id, "ok": True, "payload": payload}))
            await self.writer.drain()
            return True
        except ConnectionError:
            return False

    async def event(self, obj: Dict[str, Any]) -> None:
        self.writer.write(_encode(obj))
        await self.writer.drain()

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


class ControlServer:
    def __init__(self, path: str, group: Optional[str], api: Api) -> None:
        self.path = path
        self.group = group
        self.api = api
        self._server: Optional[asyncio.AbstractServer] = None
        self._lock_fd: Optional[int] = None
        self._inode: Optional[int] = None
        self._clients = 0
        self._tasks: set = set()

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        self._tasks.add(task)
        self._clients += 1
        try:
            if self._clients > CLIENTS_MAX:
                await self._send(writer, {"id": None, "ok": False, "error_code": ErrorCode.TOO_MANY_CLIENTS.value,
                                          "error": ErrorCode.TOO_MANY_CLIENTS.message})
                return
            try:
                caller = peer_credentials(writer.get_extra_info("socket"))
            except OSError:
                return
            await self._serve(reader, writer, caller)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("control client failed")
        finally:
            self._clients -= 1
            self._tasks.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, obj: Dict[str, Any]) -> None:
        writer.write(_encode(obj))
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: Caller) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), CLIENT_IDLE_SEC)
            except asyncio.TimeoutError:
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
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("request %r failed", req.get("type"))
            return {"id": req_id, "ok": False, "error_code": ErrorCode.INTERNAL_ERROR.value, "error": "internal error: %s" % e}
        if stream is not None:
            return None
        return {"id": req_id, "ok": True, "payload": payload_out}
