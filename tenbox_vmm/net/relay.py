"""Guest-forward relay: libslirp's unix sockets ⇄ host TCP connections (I/O thread).

For every guest forward, libslirp is told (`slirp_add_unix`) to connect to
a unix socket of ours whenever the guest opens a TCP connection to the
forwarded address. We accept that connection, connect a TCP socket to the
host target and move bytes both ways, with half-close and back-pressure:
a side is read only when what was read from it before has been written out.
Each guest connection gets its own host connection (QEMU's chardev-based
guestfwd serves one stream per forward; this serves many).

Everything here is non-blocking and driven by the owner's poll loop through
`poll_fds()` and `handle()`; nothing blocks and there are no threads. The
unix sockets live in a private 0700 directory removed by `close()`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import tempfile
import time
from typing import Dict, List, Optional, Set, Tuple

from tenbox_vmm.guest_log import GuestLog

log = logging.getLogger("tenbox.net")

CHUNK_BYTES = 64 * 1024
CONNECTIONS_MAX = 256  # concurrent relayed connections per network
CONNECT_TIMEOUT_SEC = 10.0
LISTEN_BACKLOG = 16
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL

_IN = select.POLLIN
_OUT = select.POLLOUT
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _Half:
    """One direction of a relayed connection: read src, write dst."""

    __slots__ = ("src", "dst", "pending", "eof", "shut")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""
        self.eof = False  # nothing more will be read from src
        self.shut = False  # dst got shutdown(SHUT_WR), or is gone

    @property
    def wants_read(self) -> bool:
        return not self.eof and not self.pending

    def pump(self, readable: bool) -> None:
        """Move what can be moved without blocking; OSError on a broken socket."""
        if readable and self.wants_read:
            try:
                data = self.src.recv(CHUNK_BYTES)
            except OSError as e:
                if e.errno not in _RETRY:
                    raise
            else:
                if data:
                    self.pending = data
                else:
                    self.eof = True
        if self.pending and not self.shut:
            try:
                sent = self.dst.send(self.pending)
            except OSError as e:
                if e.errno not in _RETRY:
                    raise
            else:
                self.pending = self.pending[sent:]
        if self.eof and not self.pending and not self.shut:
            self.dst.shutdown(socket.SHUT_WR)
            self.shut = True

    def drain_src(self) -> None:
        """src hung up: take what it still holds (bounded by its receive buffer)."""
        chunks = [self.pending]
        while not self.eof:
            try:
                data = self.src.recv(CHUNK_BYTES)
            except OSError as e:
                if e.errno in _RETRY:
                    break
                raise
            if data:
                chunks.append(data)
            else:
                self.eof = True
        self.eof = True
        self.pending = b"".join(chunks)

    def lose_dst(self) -> None:
        """dst hung up: nothing can be written to it any more."""
        self.pending = b""
        self.eof = True
        self.shut = True


class _Connection:
    """One guest TCP connection: libslirp's unix socket and our host TCP socket."""

    def __init__(self, key: object, forward: str, inner: socket.socket, target: Tuple[str, int],
                 now: float) -> None:
        self.key = key
        self.forward = forward
        self.target = target
        self.inner = inner
        self.outer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.outer.setblocking(False)
        self.connecting = True
        self.deadline = now + CONNECT_TIMEOUT_SEC
        self.up = _Half(inner, self.outer)  # guest → host
        self.down = _Half(self.outer, inner)  # host → guest
        self.hung_up: Set[socket.socket] = set()  # sockets poll(2) reported POLLHUP for: not polled again
        err = self.outer.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            self.outer.close()
            raise OSError(err, os.strerror(err))

    def fds(self) -> List[Tuple[int, int]]:
        out: List[Tuple[int, int]] = []
        if self.connecting:
            # Guest data waits in the unix socket until the host side is up.
            out.append((self.outer.fileno(), _OUT))
            return out
        if self.inner not in self.hung_up:
            out.append((self.inner.fileno(), (_IN if self.up.wants_read else 0) | (_OUT if self.down.pending else 0)))
        if self.outer not in self.hung_up:
            out.append((self.outer.fileno(), (_IN if self.down.wants_read else 0) | (_OUT if self.up.pending else 0)))
        return out

    def handle(self, inner_rev: int, outer_rev: int) -> bool:
        """Do the I/O the events allow; False when the connection is finished."""
        if self.connecting:
            if not outer_rev:
                return True
            err = self.outer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            self.connecting = False
            outer_rev = _OUT
            inner_rev = _IN
        for sock, rev, reader, writer in ((self.inner, inner_rev, self.up, self.down),
                                          (self.outer, outer_rev, self.down, self.up)):
            if rev & select.POLLERR:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EIO
                raise OSError(err, os.strerror(err))
            if rev & select.POLLHUP and sock not in self.hung_up:
                # Both directions are closed: poll(2) would report it forever.
                self.hung_up.add(sock)
                reader.drain_src()
                writer.lose_dst()
        self.up.pump(bool(inner_rev & _READABLE))
        self.down.pump(bool(outer_rev & _READABLE))
        return not (self.up.shut and self.down.shut)

    def close(self) -> None:
        self.inner.close()
        self.outer.close()


class _Listener:
    __slots__ = ("key", "name", "sock", "path", "target")

    def __init__(self, key: object, name: str, sock: socket.socket, path: str, target: Tuple[str, int]) -> None:
        self.key = key
        self.name = name
        self.sock = sock
        self.path = path
        self.target = target


class GuestForwardRelay:
    """The unix listeners libslirp connects to, and the connections they carry."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        # The guest opens the connections: what they make us log is rate-limited.
        self._guest_log = GuestLog(log, "guestfwd connections")
        self._dir: Optional[str] = None
        self._serial = 0
        self._listeners: Dict[object, _Listener] = {}
        self._conns: Set[_Connection] = set()
        self._snapshot: Dict[int, object] = {}  # fd -> listener or connection, as last polled

    def _private_dir(self) -> str:
        if self._dir is None:
            d = tempfile.mkdtemp(prefix="tenbox-net-")
            if len(d) + 16 > SUN_PATH_MAX:  # a long $TMPDIR: unix paths are short
                os.rmdir(d)
                d = tempfile.mkdtemp(prefix="tenbox-net-", dir="/tmp")
            os.chmod(d, 0o700)
            self._dir = d
        return self._dir

    def add(self, key: object, name: str, target: Tuple[str, int]) -> str:
        """Listen for libslirp's connections for forward `key`; the socket path."""
        self._serial += 1
        path = os.path.join(self._private_dir(), "g%d.sock" % self._serial)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listeners[key] = _Listener(key, name, sock, path, target)
        return path

    def remove(self, key: object) -> None:
        """Stop listening for `key` and cut the connections it carries."""
        listener = self._listeners.pop(key, None)
        if listener is None:
            return
        listener.sock.close()
        _unlink(listener.path)
        for conn in [c for c in self._conns if c.key == key]:
            self._drop(conn)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def poll_fds(self) -> Tuple[List[Tuple[int, int]], Optional[float]]:
        """(fd, poll events) to watch, and seconds until the next connect deadline."""
        fds: List[Tuple[int, int]] = []
        snap: Dict[int, object] = {}
        for listener in self._listeners.values():
            fd = listener.sock.fileno()
            fds.append((fd, _IN))
            snap[fd] = listener
        deadline = None
        for conn in self._conns:
            for fd, ev in conn.fds():
                fds.append((fd, ev))
                snap[fd] = conn
            if conn.connecting:
                deadline = conn.deadline if deadline is None else min(deadline, conn.deadline)
        self._snapshot = snap
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        return fds, timeout

    def handle(self, revents: Dict[int, int]) -> None:
        """Act on the revents of the fds the last poll_fds() returned."""
        seen = set()
        for fd, owner in self._snapshot.items():
            if isinstance(owner, _Listener):
                if revents.get(fd, 0) and self._listeners.get(owner.key) is owner:
                    self._accept(owner)
                continue
            conn = owner
            if conn in seen or conn not in self._conns:
                continue
            seen.add(conn)
            inner_rev = revents.get(conn.inner.fileno(), 0)
            outer_rev = revents.get(conn.outer.fileno(), 0)
            try:
                alive = conn.handle(inner_rev, outer_rev)
            except OSError as e:
                self._guest_log.info("guestfwd %s: connection to %s:%d ended: %s",
                         conn.forward, conn.target[0], conn.target[1], e.strerror or e)
                alive = False
            if not alive:
                self._drop(conn)
        now = self._clock()
        for conn in [c for c in self._conns if c.connecting and now >= c.deadline]:
            self._guest_log.info("guestfwd %s: connecting to %s:%d timed out after %.0f s",
                     conn.forward, conn.target[0], conn.target[1], CONNECT_TIMEOUT_SEC)
            self._drop(conn)
        self._snapshot = {}

    def _accept(self, listener: _Listener) -> None:
        while True:
            try:
                inner, _ = listener.sock.accept()
            except OSError as e:
                if e.errno in _RETRY:
                    return
                raise
            inner.setblocking(False)
            if len(self._conns) >= CONNECTIONS_MAX:
                self._guest_log.warning("guestfwd %s: %d connections open already; refusing one more",
                            listener.name, CONNECTIONS_MAX)
                inner.close()
                continue
            try:
                conn = _Connection(listener.key, listener.name, inner, listener.target, self._clock())
            except OSError as e:
                self._guest_log.info("guestfwd %s: cannot connect to %s:%d: %s",
                         listener.name, listener.target[0], listener.target[1], e.strerror or e)
                inner.close()
                continue
            self._conns.add(conn)

    def _drop(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        conn.close()

    def close(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
        for key in list(self._listeners):
            self.remove(key)
        if self._dir is not None:
            try:
                os.rmdir(self._dir)  # its sockets were unlinked by remove()
            except OSError as e:
                log.warning("cannot remove the relay directory %s: %s", self._dir, e)
            self._dir = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
