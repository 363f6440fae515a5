"""Every OS effect of the worker supervisor behind one seam: spawn, signal, watch, identify, clocks (daemon, root).

The WorkerManager talks only to a `Host`; the unit tests give it a fake one
(tests/unit/supervisor_fakes.py) to drive it by tables, and the daemon and
the integration tests use `SystemHost`, the real one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence

import psutil

from tenbox_vmm.protocol import Limits

log = logging.getLogger("tenboxd.host")

EXIT_POLL_SEC = 0.5  # without pidfd (Python 3.8), how often to look for dead workers
# runtime.log: rotated here when a worker starts, and by the worker itself while it runs.
LOG_ROTATE_BYTES = Limits.RUNTIME_LOG_MAX_BYTES
LOG_KEEP = Limits.RUNTIME_LOG_KEEP
# Environment a worker must not inherit: it is not the service's main process.
DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@dataclass
class Proc:
    """A worker process: ours (popen set) or adopted from a previous tenboxd."""

    pid: int
    create_time: float
    popen: Optional[subprocess.Popen] = None
    pidfd: Optional[int] = None

    @property
    def is_child(self) -> bool:
        return self.popen is not None


def rotate(path: str, max_bytes: int = LOG_ROTATE_BYTES, keep: int = LOG_KEEP) -> None:
    try:
        if os.path.getsize(path) <= max_bytes:
            return
    except OSError:
        return
    for i in range(keep, 0, -1):
        src = path if i == 1 else "%s.%d" % (path, i - 1)
        if os.path.exists(src):
            os.replace(src, "%s.%d" % (path, i))


class Host(Protocol):
    """What the WorkerManager asks of the operating system."""

    def spawn(self, argv: Sequence[str], log_path: str, scope_name: str) -> Proc:
        """Start a worker; OSError if it cannot be started."""

    def adopt(self, pid: int, create_time: float, vm_id: str) -> Optional[Proc]:
        """A Proc for a live worker of `vm_id` we did not start, or None."""

    def alive(self, proc: Proc) -> bool:
        ...

    def kill(self, proc: Proc, sig: int) -> None:
        ...

    def exit_status(self, proc: Proc) -> Optional[int]:
        """Exit code (negative: killed by that signal) of a child that ended; None when unknown."""

    def watch(self, loop: asyncio.AbstractEventLoop, proc: Proc, on_exit: Callable[[], None]) -> Callable[[], None]:
        """Call on_exit once when the process ends; returns a function that stops watching."""

    def monotonic(self) -> float:
        ...

    def time(self) -> float:
        ...


class SystemHost:
    """The real host: Popen, kill, pidfd, psutil, the system clocks."""

    def __init__(self) -> None:
        self.use_scopes = (
            os.geteuid() == 0 and os.path.isdir("/run/systemd/system") and shutil.which("systemd-run") is not None
            and os.environ.get("TENBOX_NO_SCOPES") != "1"
        )

    def worker_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
        return env

    def spawn(self, argv: Sequence[str], log_path: str, scope_name: str) -> Proc:
        """Start a worker in its own session (and, under systemd, its own scope)."""
        rotate(log_path)
        argv = list(argv)
        if self.use_scopes:
            # Its own scope: restarting or stopping tenboxd.service never takes the VM with it.
            argv = ["systemd-run", "--scope", "--quiet", "--collect", "--unit", scope_name, "--"] + argv
        with open(log_path, "ab") as logf:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=self.worker_env(),
                close_fds=True,
                start_new_session=True,
            )
        try:
            ctime = psutil.Process(p.pid).create_time()
        except psutil.Error:
            ctime = 0.0
        return Proc(pid=p.pid, create_time=ctime, popen=p)

    def adopt(self, pid: int, create_time: float, vm_id: str) -> Optional[Proc]:
        """A Proc for a live worker of `vm_id` we did not start, or None if it is gone or not ours."""
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - create_time) > 0.01:
                return None
            cmd = p.cmdline()
        except psutil.Error:
            return None
        if "tenbox_vmm" not in " ".join(cmd) and "tenbox-vm-runtime" not in " ".join(cmd):
            return None
        if vm_id not in cmd:
            return None
        return Proc(pid=pid, create_time=create_time)

    def alive(self, proc: Proc) -> bool:
        if proc.popen is not None:
            return proc.popen.poll() is None
        try:
            p = psutil.Process(proc.pid)
            return abs(p.create_time() - proc.create_time) <= 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def kill(self, proc: Proc, sig: int) -> None:
        if not self.alive(proc):
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def exit_status(self, proc: Proc) -> Optional[int]:
        """Exit code (negative: killed by that signal) of a child we reaped; None for adopted workers."""
        if proc.popen is None:
            return None
        return proc.popen.poll()

    def watch(self, loop: asyncio.AbstractEventLoop, proc: Proc, on_exit: Callable[[], None]) -> Callable[[], None]:
        """Call on_exit once when the process ends; returns a function that stops watching."""
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(proc.pid)  # novermin: guarded by hasattr (Python 3.9+)
            except OSError:
                fd = None
            if fd is not None:
                proc.pidfd = fd
                fired = []

                def ready() -> None:
                    if fired:
                        return
                    fired.append(1)
                    loop.remove_reader(fd)
                    os.close(fd)
                    proc.pidfd = None
                    on_exit()

                loop.add_reader(fd, ready)

                def cancel() -> None:
                    if not fired:
                        fired.append(1)
                        loop.remove_reader(fd)
                        os.close(fd)
                        proc.pidfd = None

                return cancel
        # Python 3.8 or no pidfd: poll.
        handle: List[asyncio.TimerHandle] = []

        def check() -> None:
            if self.alive(proc):
                handle[0] = loop.call_later(EXIT_POLL_SEC, check)
            else:
                on_exit()

        handle.append(loop.call_later(EXIT_POLL_SEC, check))
        return lambda: handle[0].cancel()

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
