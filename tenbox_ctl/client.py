"""Talk to tenboxd over its control socket (CLI; any user, root or the tenbox group).

Finds the socket the seed's way and turns every way of not reaching the
daemon into one line that names the path and the fix, with its own exit code.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import stat
import struct
from typing import Any, Dict, Iterator, Optional

from tenbox_supervisor.protocol import (
    FALLBACK_SOCKET,
    REQUEST_MAX_BYTES,
    SOCKET_ENV,
    ErrorCode,
    ExitCode,
    Method,
    default_socket_candidates,
    exit_code_for,
)

DEFAULT_TIMEOUT_SEC = 60.0


class CliError(Exception):
    """A failure to show the operator: one line, the exit code it maps to, and tenboxd's error code if it sent one."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.FAILED, reply: Optional[dict] = None,
                 error_code: Optional[ErrorCode] = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.reply = reply
        self.error_code = error_code


def resolve_socket(explicit: Optional[str] = None) -> str:
    if explicit:
        return explicit
    return default_socket_candidates()[0]


def _lookup_note() -> str:
    if os.environ.get(SOCKET_ENV):
        return "from $%s" % SOCKET_ENV
    return "lookup: $%s, /run/tenbox/tenbox.sock if /run/tenbox exists, $XDG_RUNTIME_DIR/tenbox.sock, /tmp/tenbox-<uid>.sock" % SOCKET_ENV


class Client:
    def __init__(self, path: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_SEC) -> None:
        self.path = resolve_socket(path)
        self.timeout = timeout
        self._ids = itertools.count(1)

    def connect(self) -> socket.socket:
        fallback = self.path == FALLBACK_SOCKET % os.getuid()
        if fallback:
            self._check_owner(self._fallback_owner())
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
            if fallback:  # what answered, not only what was there a moment ago
                self._check_owner(struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))[1])
        except OSError as e:
            s.close()
            raise self._connect_error(e) from None
        except CliError:
            s.close()
            raise
        return s

    def _fallback_owner(self) -> Optional[int]:
        """The owner of the socket file at the /tmp fallback; None if there is none (connect says so)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        if not stat.S_ISSOCK(st.st_mode):
            raise CliError("refusing %s: it is not a socket (anyone can create files in /tmp); remove it, "
                           "or set %s" % (self.path, SOCKET_ENV), ExitCode.UNREACHABLE)
        return st.st_uid

    def _check_owner(self, uid: Optional[int]) -> None:
        if uid is not None and uid not in (os.getuid(), 0):
            raise CliError("refusing %s: it belongs to uid %d, not to you or root (anyone can create files in "
                           "/tmp); remove it, or set %s" % (self.path, uid, SOCKET_ENV), ExitCode.UNREACHABLE)

    def _connect_error(self, e: OSError) -> CliError:
        if e.errno in (errno.EACCES, errno.EPERM):
            return CliError(
                "permission denied on %s: add your user to the tenbox group (sudo usermod -aG tenbox $USER), "
                "then open a new shell or run 'newgrp tenbox'" % self.path, ExitCode.PERMISSION)
        if e.errno == errno.ENOENT:
            return CliError("tenboxd is not running: no socket at %s (%s); start it with 'systemctl start tenboxd'"
                            % (self.path, _lookup_note()), ExitCode.UNREACHABLE)
        if e.errno == errno.ECONNREFUSED:
            return CliError("tenboxd is not running: %s refuses connections (left by a daemon that died?); "
                            "start it with 'systemctl start tenboxd'" % self.path, ExitCode.UNREACHABLE)
        return CliError("cannot reach tenboxd at %s: %s" % (self.path, e.strerror or e), ExitCode.UNREACHABLE)

    def request(self, method: Method, payload: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """One request, one reply; CliError unless the daemon says ok."""
        s = self.connect()
        try:
            self._send(s, {"id": next(self._ids), "type": method.value, "payload": payload or {}})
            reply = self._read(s.makefile("rb"))
        finally:
            s.close()
        return self._check(reply)

    def _send(self, s: socket.socket, obj: Dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        if len(data) > REQUEST_MAX_BYTES:
            raise CliError("the request is larger than 1 MiB", ExitCode.USAGE)
        try:
            s.sendall(data)
        except socket.timeout:
            raise CliError("tenboxd did not accept the request within %.0fs" % self.timeout) from None
        except OSError as e:
            raise CliError("lost the connection to tenboxd: %s" % (e.strerror or e), ExitCode.UNREACHABLE) from None

    def _read(self, f) -> Dict[str, Any]:
        try:
            line = f.readline(REQUEST_MAX_BYTES * 64)
        except socket.timeout:
            raise CliError("tenboxd did not answer within %.0fs (--timeout to wait longer)" % self.timeout) from None
        except OSError as e:
            raise CliError("lost the connection to tenboxd: %s" % (e.strerror or e), ExitCode.UNREACHABLE) from None
        if not line:
            raise CliError("tenboxd closed the connection without answering", ExitCode.UNREACHABLE)
        try:
            reply = json.loads(line)
        except ValueError:
            raise CliError("tenboxd sent something that is not JSON") from None
        if not isinstance(reply, dict):
            raise CliError("tenboxd sent an unexpected reply")
        return reply

    @staticmethod
    def _check(reply: Dict[str, Any]) -> Dict[str, Any]:
        if reply.get("ok"):
            payload = reply.get("payload")
            return payload if isinstance(payload, dict) else {}
        text = reply.get("error_code") or "error"
        try:
            code: Optional[ErrorCode] = ErrorCode(text)
        except ValueError:
            code = None  # a newer tenboxd's code: shown as it is, exit FAILED
        raise CliError("%s (%s)" % (reply.get("error") or "request failed", text), exit_code_for(code), reply, code)

    def stream(self, method: Method, payload: Dict[str, Any]) -> "StreamConnection":
        s = self.connect()
        self._send(s, {"id": next(self._ids), "type": method.value, "payload": payload})
        # Unbuffered for the first line: the events right behind it must stay in the socket.
        first = self._check(self._read(s.makefile("rb", buffering=0)))
        s.settimeout(None)
        return StreamConnection(s, first)


class StreamConnection:
    def __init__(self, sock: socket.socket, first: Dict[str, Any]) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.first = first

    def events(self) -> Iterator[Dict[str, Any]]:
        while True:
            line = self.file.readline(REQUEST_MAX_BYTES * 64)
            if not line:
                return
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj

    def send(self, obj: Dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(obj) + "\n").encode())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
