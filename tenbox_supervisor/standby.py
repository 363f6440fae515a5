"""Workers started ahead of need: a VM's start hands one its order instead of starting Python (daemon, root).

A cold worker spends tens of milliseconds before its guest's first
instruction on the interpreter's start and tenbox's imports. tenboxd keeps
`TENBOX_STANDBY_WORKERS` (config.py) `tenbox-vm-runtime --standby`
processes that have done both and wait (tenbox_vmm/standby.py says what
they wait for). `SystemHost.spawn` takes a ready one, gives it its VM's
limits (cgroup or scope), then its order: the worker's command line and its
files, passed as descriptors. The process is tenboxd's child, as a cold
worker is, so its exit status is known. A new standby is started a moment
later, when the new VM's worker has had the cores.

A standby not ready yet, one that ended, or a VM with more files than one
message carries: the worker starts cold, as without standbys. A standby
that ended without an order is logged and replaced no sooner than
RETRY_SEC later, so a broken installation does not fork in a loop.
"""

from __future__ import annotations

import array
import asyncio
import logging
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from tenbox_supervisor.cgroups import ResourceLimits
from tenbox_vmm.protocol.standby import READY

log = logging.getLogger("tenboxd.standby")

REFILL_DELAY_SEC = 0.5  # after a start: the new worker has the cores first
RETRY_SEC = 30.0  # after a standby ended without an order
SCOPE_PREFIX = "tenbox-standby-"  # its systemd scope, where tenboxd runs workers in scopes
SET_PROPERTY_TIMEOUT_SEC = 10.0


class StandbyRefused(Exception):
    """This standby cannot take the order; the worker starts cold. The message says why."""


@dataclass
class Standby:
    """One waiting worker: tenboxd's child, and tenboxd's end of its socket."""

    popen: subprocess.Popen
    sock: socket.socket
    scope: Optional[str] = None  # its systemd scope's unit, when it runs in one
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def is_ready(self) -> bool:
        """Whether it has said READY and still runs (never blocks)."""
        if not self.ready and self.alive():
            try:
                self.ready = self.sock.recv(1, socket.MSG_DONTWAIT) == READY
            except OSError:  # BlockingIOError: still importing
                pass
        return self.ready and self.alive()

    def order(self, payload: bytes, fds: Sequence[int], log_fd: int) -> None:
        """Hand it its VM: the encoded order (encode_order), the runtime log, the files' descriptors in the
        order's order; OSError if it is gone."""
        fds = array.array("i", [log_fd] + list(fds))
        self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        self.sock.close()

    def dismiss(self) -> None:
        """Let it go: it exits when its socket ends; killed if it has not within a second."""
        self.sock.close()
        try:
            self.popen.wait(1.0)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def set_scope_limits(scope: str, limits: ResourceLimits) -> None:
    """MemoryMax= and TasksMax= on a running scope (systemctl); OSError or CalledProcessError if refused."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise StandbyRefused("no systemctl to set the scope's limits")
    subprocess.run([systemctl, "set-property", "--runtime", scope + ".scope",
                    "MemoryMax=%d" % limits.memory_max, "TasksMax=%d" % limits.tasks_max],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=SET_PROPERTY_TIMEOUT_SEC, check=True)


class StandbyPool:
    """Keeps `count` standbys started; `take()` gives a ready one, if any, and plans its replacement."""

    def __init__(self, count: int, start: Callable[[], Standby], monotonic: Callable[[], float]) -> None:
        self.count = count
        self._start = start
        self._monotonic = monotonic
        self._waiting: List[Standby] = []
        self._retry_at = 0.0
        self._refill: Optional[asyncio.TimerHandle] = None
        self.closed = False

    def describe(self) -> Dict[str, Any]:
        """For system.info: how many are wanted, how many wait ready, and their pids."""
        self._drop_ended()
        return {"wanted": self.count, "ready": sum(1 for s in self._waiting if s.is_ready()),
                "pids": [s.pid for s in self._waiting]}

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
        """A ready standby, now no longer the pool's; None if there is none. Either way a refill is planned."""
        self._drop_ended()
        found = next((s for s in self._waiting if s.is_ready()), None)
        if found is not None:
            self._waiting.remove(found)
        self._plan_refill()
        return found

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
            s.sock.close()
            log.warning("standby worker pid %d ended on its own (exit %s); the next in %.0f s at the earliest",
                        s.pid, s.popen.returncode, RETRY_SEC)
            self._retry_at = self._monotonic() + RETRY_SEC

    def _plan_refill(self) -> None:
        if self._refill is not None or self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.fill()  # no loop (a direct call): now
            return
        self._refill = loop.call_later(max(REFILL_DELAY_SEC, self._retry_at - self._monotonic()), self.fill)
