"""Zygotes started ahead of need: a VM's start forks its worker from one instead of starting Python (daemon, root).

A cold worker spends tens of milliseconds before its guest's first
instruction on the interpreter's start and tenbox's imports, and each
holds its own copy of both. tenboxd keeps `TENBOX_STANDBY_WORKERS`
(config.py) `tenbox-vm-runtime --standby` processes that have done both and
serve orders (tenbox_vmm/standby.py says how). `SystemHost.spawn` sends a
ready one the VM's order: the worker's command line, its runtime log, a GO
socket and its files, passed as descriptors. The standby forks the worker,
which tenboxd (the child subreaper) then holds as its own child, and
replies with its pid; tenboxd puts it in its VM's cgroup or scope and sends
GO. The workers share the standby's pages (the interpreter, tenbox's
modules) until they write them: ten clones cost little more than one.

No standby ready, one that does not answer, a VM with more files than one
message carries, or a worker that cannot be placed: the worker starts
cold, as without standbys. A standby that ended is logged and replaced no
sooner than RETRY_SEC later, so a broken installation does not fork in a
loop.

Each standby is started with the worker link's endpoint and keeps a spare:
a worker forked and sandboxed before any order, so that the sandbox is not
on a start's path. The spare is tenboxd's child from its fork; the standby
names it (SPARE) and tenboxd kills and reaps the spares of a standby that
ended or was let go: nothing else would.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from tenbox_supervisor.cgroups import ResourceLimits, pid_paths
from tenbox_vmm.protocol.standby import (FORKED_MAX_BYTES, GO, GO_MAX_FDS, GO_REPLY_MAX_BYTES, JOINED, READY, SPARE,
                                         OrderError, parse_forked, parse_spare)

log = logging.getLogger("tenboxd.standby")

RETRY_SEC = 30.0  # after a standby ended
FORK_REPLY_SEC = 5.0  # a standby's reply to an order: a fork, milliseconds
GO_REPLY_SEC = 5.0  # a forked worker's answer to a GO with cgroup files: a write to each
SCOPE_SEC = 5.0  # systemd's move of a forked worker into its new scope
PR_SET_CHILD_SUBREAPER = 36


class StandbyRefused(Exception):
    """This standby cannot take the order; the worker starts cold. The message says why."""


def become_subreaper() -> None:
    """Orphaned descendants become tenboxd's children (the standbys' forked workers); OSError if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class ForkedWorker:
    """A worker a standby forked, re-parented to tenboxd: what tenboxd asks of a Popen, by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        """Its exit code once it ended (negative: the signal), reaped; None while it runs."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours (cannot happen once checked), or reaped elsewhere
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0.0)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


@dataclass
class Standby:
    """One zygote: tenboxd's child, tenboxd's end of its socket, and the pids of its spares (tenboxd's children)."""

    popen: subprocess.Popen
    sock: socket.socket
    ready: bool = False
    spares: Set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def is_ready(self) -> bool:
        """Whether it has said READY and still runs (never blocks)."""
        if self.alive():
            try:
                while True:
                    self._note(self.sock.recv(FORKED_MAX_BYTES, socket.MSG_DONTWAIT))
            except (OSError, OrderError):  # BlockingIOError: nothing more said (still importing, if not READY)
                pass
        self._reap_spares(kill=False)
        return self.ready and self.alive()

    def _note(self, message: bytes) -> bool:
        """Take in READY or SPARE: True if it was one of them; OrderError if a SPARE is malformed."""
        if message == READY:
            self.ready = True
            return True
        if message.startswith(SPARE):
            self.spares.add(parse_spare(message))
            return True
        return False

    def fork(self, payload: bytes, fds: Sequence[int], log_fd: int) -> Tuple[ForkedWorker, socket.socket]:
        """A worker forked for the encoded order (encode_order), with the runtime log and the files' descriptors
        in the order's order, and tenboxd's end of its GO socket; StandbyRefused or OSError if there is none."""
        go, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            passed = array.array("i", [log_fd, theirs.fileno()] + list(fds))
            self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
            theirs.close()
            deadline = time.monotonic() + FORK_REPLY_SEC
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise StandbyRefused("no answer within %.0f s" % FORK_REPLY_SEC)
                reply = self.sock.recv(FORKED_MAX_BYTES, socket.MSG_DONTWAIT)
                if not reply:
                    raise StandbyRefused("it closed its socket (exit status %s)" % self.popen.poll())
                if not self._note(reply):
                    break
            worker = ForkedWorker(parse_forked(reply))
            self.spares.discard(worker.pid)  # a spare that took the order: the VM's worker now
        except BaseException as e:
            theirs.close()
            go.close()  # a forked worker sees it end and runs nothing
            if isinstance(e, OrderError):
                raise StandbyRefused(str(e)) from None
            raise
        try:
            ended = os.waitpid(worker.pid, os.WNOHANG)[0]  # it waits for GO: it cannot have ended
        except ChildProcessError:
            ended = -1
        if ended:
            go.close()
            raise StandbyRefused("its worker pid %d %s" % (worker.pid, "ended at once" if ended > 0
                                                            else "is not tenboxd's child"))
        return worker, go

    def dismiss(self) -> None:
        """Let it go: it exits when its socket ends; killed if it has not within a second. Its spares are ended."""
        self.sock.close()
        try:
            self.popen.wait(1.0)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reap_spares(kill=True)

    def _reap_spares(self, kill: bool) -> None:
        """Reap the spares that ended (a spare that could not enter its sandbox ends); with `kill`, end them all
        first (they hold no VM)."""
        for pid in list(self.spares):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:  # it runs (a child of ours: its pid stays its own)
                    if not kill:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            except ChildProcessError:  # not tenboxd's child: a SPARE that named another process
                pass
            self.spares.discard(pid)


def send_go(go: socket.socket, join: Sequence[str] = ()) -> None:
    """Let a forked worker go. With `join` (cgroup files, cgroups.WorkerCgroup.join_files), the worker joins
    them itself before it runs anything, and says so: StandbyRefused or OSError if it has not."""
    if len(join) > GO_MAX_FDS:
        raise StandbyRefused("%d cgroup files are more than a GO passes" % len(join))
    fds: List[int] = []
    try:
        for path in join:
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        go.sendmsg([GO], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    finally:
        for fd in fds:
            os.close(fd)
    if not fds:
        return
    if not select.select([go], [], [], GO_REPLY_SEC)[0]:
        raise StandbyRefused("its worker did not answer GO within %.0f s" % GO_REPLY_SEC)
    reply = go.recv(GO_REPLY_MAX_BYTES, socket.MSG_DONTWAIT)
    if reply != JOINED:
        why = reply[1:].decode("utf-8", "replace") or "ended before it joined its cgroup"
        raise StandbyRefused("its worker %s" % why)


def move_to_scope(unit: str, limits: Optional[ResourceLimits], pid: int) -> None:
    """Put process `pid` alone in a new systemd scope `unit` with the limits (systemd's StartTransientUnit, by
    busctl), and wait until it is there; StandbyRefused, OSError or SubprocessError if it is not."""
    busctl = shutil.which("busctl")
    if busctl is None:
        raise StandbyRefused("no busctl to make the worker's scope")
    props = [("PIDs", "au", "1", str(pid)), ("CollectMode", "s", "inactive-or-failed")]
    if limits is not None:
        props += [("MemoryMax", "t", str(limits.memory_max)), ("TasksMax", "t", str(limits.tasks_max))]
    subprocess.run([busctl, "call", "--quiet", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
                    unit + ".scope", "fail", str(len(props))] + [a for p in props for a in p] + ["0"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=SCOPE_SEC, check=True)
    deadline = time.monotonic() + SCOPE_SEC  # the call queues a job: the move comes when it runs
    while not any(path.endswith("/%s.scope" % unit) for path in pid_paths(pid).values()):
        if time.monotonic() > deadline:
            raise StandbyRefused("systemd did not move it into %s.scope within %.0f s" % (unit, SCOPE_SEC))
        time.sleep(0.002)


class StandbyPool:
    """Keeps `count` standbys started; `take()` gives a ready one, if any; `drop()` ends one that failed."""

    def __init__(self, count: int, start: Callable[[], Standby], monotonic: Callable[[], float]) -> None:
        self.count = count
        self._start = start
        self._monotonic = monotonic
        self._waiting: List[Standby] = []
        self._retry_at = 0.0
        self._refill: Optional[asyncio.TimerHandle] = None
        self._turn = 0
        self.closed = False

    def describe(self) -> Dict[str, Any]:
        """For system.info: how many are wanted, how many wait ready, and their pids."""
        self._drop_ended()
        return {"wanted": self.count, "ready": sum(1 for s in self._waiting if s.is_ready()),
                "pids": [s.pid for s in self._waiting], "spares": sorted(p for s in self._waiting for p in s.spares)}

    def fill(self) -> None:
        """Start standbys up to the count (not while a failed one's RETRY_SEC runs)."""
        self._refill = None
        self._drop_ended()
        while not self.closed and len(self._waiting) < self.count and self._monotonic() >= self._retry_at:
            try:
                self._waiting.append(self._start())
            except OSError as e:
                log.warning("cannot start a standby worker: %s; the next try in %.0f s", e.strerror or e, RETRY_SEC)
                self._retry_at = self._monotonic() + RETRY_SEC

    def take(self) -> Optional[Standby]:
        """A ready standby (it stays the pool's: it forks a worker per order); None if there is none."""
        self._drop_ended()
        ready = [s for s in self._waiting if s.is_ready()]
        if not ready:
            return None
        self._turn = (self._turn + 1) % len(ready)
        return ready[self._turn]

    def drop(self, standby: Standby, why: object) -> None:
        """End a standby that failed an order; its replacement comes no sooner than RETRY_SEC."""
        log.warning("standby worker pid %d dropped (%s); the next in %.0f s at the earliest", standby.pid, why,
                    RETRY_SEC)
        if standby in self._waiting:
            self._waiting.remove(standby)
        standby.popen.kill()
        standby.dismiss()
        self._retry_at = self._monotonic() + RETRY_SEC
        self._plan_refill()

    def close(self) -> None:
        self.closed = True
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        for s in self._waiting:
            s.dismiss()
        self._waiting = []

    def _drop_ended(self) -> None:
        for s in [s for s in self._waiting if not s.alive()]:
            self._waiting.remove(s)
            s.dismiss()  # its socket closed, its spares ended
            log.warning("standby worker pid %d ended on its own (exit %s); the next in %.0f s at the earliest",
                        s.pid, s.popen.returncode, RETRY_SEC)
            self._retry_at = self._monotonic() + RETRY_SEC
            self._plan_refill()

    def _plan_refill(self) -> None:
        if self._refill is not None or self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.fill()  # no loop (a direct call): now
            return
        self._refill = loop.call_later(max(0.0, self._retry_at - self._monotonic()), self.fill)
