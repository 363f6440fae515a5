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
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Union

import psutil

from tenbox_supervisor.cgroups import Cgroups, ResourceLimits, WorkerCgroup
from tenbox_supervisor.imagetool_child import run_imagetool
from tenbox_supervisor.standby import (ForkedWorker, Standby, StandbyPool, StandbyRefused, become_subreaper,
                                       move_to_scope, send_go)
from tenbox_vmm.protocol.standby import OrderError, encode_order
from tenbox_supervisor.worker_files import WorkerFile, close_all, open_all
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.sandbox import PassedFile

log = logging.getLogger("tenboxd.host")

EXIT_POLL_SEC = 0.5  # without pidfd (Python 3.8), how often to look for dead workers
# runtime.log: rotated here when a worker starts, and by the worker itself while it runs.
LOG_ROTATE_BYTES = Limits.RUNTIME_LOG_MAX_BYTES
LOG_KEEP = Limits.RUNTIME_LOG_KEEP
# Environment a worker must not inherit: it is not the service's main process.
DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# Test hooks (tenbox_vmm/sandbox: SECCOMP_PROBE_ENV) reach no worker of the packaged service.
DROP_ENV_PREFIXES_UNDER_SYSTEMD = ("TENBOX_TEST_",)
CGROUP_PREFIX = "tenbox-vm-"  # a worker's scope or cgroup: tenbox-vm-<id>-<time>
RUNTIME_ARGV = (sys.executable, "-m", "tenbox_vmm")  # tenbox-vm-runtime, on tenboxd's own interpreter
STANDBY_ARG = "--standby"


@dataclass
class Proc:
    """A worker process: ours (popen set) or adopted from a previous tenboxd."""

    pid: int
    create_time: float
    popen: Optional[Union[subprocess.Popen, ForkedWorker]] = None
    pidfd: Optional[int] = None
    cgroup: Optional[WorkerCgroup] = None  # made by tenboxd (no systemd): removed when the worker ends
    standby: bool = False  # forked by a standby (standby.py)

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

    def spawn(self, argv: Sequence[str], log_path: str, scope_name: str, files: Sequence[WorkerFile] = (),
              limits: Optional[ResourceLimits] = None) -> Proc:
        """Start a worker with `files` passed open (--fd) in a cgroup with `limits`.

        WorkerFileError if a file cannot be opened, OSError if the worker cannot be started.
        """

    async def backing_chain(self, path: str) -> List[str]:
        """The backing files of disk image `path`, nearest first (the image tool's answer); ApiError if unreadable."""

    def adopt(self, pid: int, create_time: float, vm_id: str) -> Optional[Proc]:
        """A Proc for a live worker of `vm_id` we did not start, or None."""

    def clear_leftovers(self, vm_id: str) -> None:
        """Remove what workers of `vm_id` that ended while no tenboxd ran left behind (their cgroups)."""

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
    """The real host: Popen, kill, pidfd, psutil, the system clocks; `standby_workers` started ahead of need."""

    def __init__(self, standby_workers: int = 0, link_endpoint: Optional[str] = None) -> None:
        self.use_scopes = (
            os.geteuid() == 0 and os.path.isdir("/run/systemd/system") and shutil.which("systemd-run") is not None
            and os.environ.get("TENBOX_NO_SCOPES") != "1"
        )
        self.under_systemd = bool(os.environ.get("INVOCATION_ID"))
        # Without scopes, a root tenboxd makes each worker's cgroup itself (cgroups.py).
        self.cgroups = Cgroups() if os.geteuid() == 0 and not self.use_scopes else None
        if self.cgroups is not None:
            log.info("worker limits: %s", self.cgroups.describe())
        self.link_endpoint = link_endpoint  # the standbys' spares are sandboxed for workers on this link
        self.standby = StandbyPool(standby_workers, self._start_standby, self.monotonic) if standby_workers else None
        if self.standby is not None:
            try:
                become_subreaper()  # the standbys' forked workers become tenboxd's children
            except OSError as e:
                log.warning("standby workers off: cannot become the workers' subreaper: %s", e.strerror)
                self.standby = None

    def worker_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
        if self.under_systemd:
            env = {k: v for k, v in env.items() if not k.startswith(DROP_ENV_PREFIXES_UNDER_SYSTEMD)}
        return env

    def spawn(self, argv: Sequence[str], log_path: str, scope_name: str, files: Sequence[WorkerFile] = (),
              limits: Optional[ResourceLimits] = None) -> Proc:
        """Start a worker in its own session and its own scope or cgroup, with its files passed open.

        A ready standby (standby.py) takes it when there is one; else a new process starts cold.
        """
        rotate(log_path)
        opened = open_all(files)
        try:
            proc = self._from_standby(argv, log_path, scope_name, opened, limits)
            if proc is None:
                proc = self._cold(argv, log_path, scope_name, opened, limits)
        finally:
            close_all(opened)
        return proc

    def _cold(self, argv: Sequence[str], log_path: str, scope_name: str, opened: Sequence[PassedFile],
              limits: Optional[ResourceLimits]) -> Proc:
        argv = list(argv) + [a for pf in opened for a in ("--fd", pf.to_arg())]
        if self.use_scopes:
            argv = _in_scope(scope_name, limits, argv)
        cgroup = self.cgroups.create(scope_name, limits) if self.cgroups and limits else None
        try:
            with open(log_path, "ab") as logf:
                p = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    env=self.worker_env(),
                    close_fds=True,
                    pass_fds=[pf.fd for pf in opened],
                    start_new_session=True,
                )
            if cgroup is not None:
                _join(p, cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        return Proc(pid=p.pid, create_time=_create_time(p.pid), popen=p, cgroup=cgroup)

    def _from_standby(self, argv: Sequence[str], log_path: str, scope_name: str, opened: Sequence[PassedFile],
                      limits: Optional[ResourceLimits]) -> Optional[Proc]:
        """The worker forked by a standby, in its scope or cgroup before it runs; None when none can."""
        prefix = len(RUNTIME_ARGV)
        if self.standby is None or tuple(argv[:prefix]) != RUNTIME_ARGV:
            return None
        try:  # before a standby is asked: an order too large for one never costs one
            payload = encode_order(argv[prefix:], [pf.path for pf in opened])
        except OrderError as e:
            log.info("worker started cold: %s", e)
            return None
        sb = self.standby.take()
        if sb is None:
            return None
        try:
            with open(log_path, "ab") as logf:
                worker, go = sb.fork(payload, [pf.fd for pf in opened], logf.fileno())
        except (OSError, StandbyRefused) as e:
            self.standby.drop(sb, getattr(e, "strerror", None) or e)
            return None
        cgroup = None
        try:
            if self.use_scopes:
                move_to_scope(scope_name, limits, worker.pid)
            elif self.cgroups is not None and limits is not None:
                cgroup = self.cgroups.create(scope_name, limits)
            send_go(go, cgroup.join_files() if cgroup is not None else ())  # the worker joins its cgroup itself
        except (OSError, StandbyRefused, subprocess.SubprocessError) as e:
            why = getattr(e, "strerror", None) or getattr(e, "stderr", None) or e
            worker.kill()
            worker.wait()
            if cgroup is not None:
                cgroup.remove()
            if self.use_scopes:  # systemd would refuse the next as well: every start stays cold from now on
                log.warning("standby workers off: a forked worker cannot be put in its scope (%s)", why)
                self.standby.close()
                self.standby = None
            else:
                log.warning("worker forked by standby pid %d not used (%s); starting it cold", sb.pid, why)
            return None
        finally:
            go.close()
        return Proc(pid=worker.pid, create_time=_create_time(worker.pid), popen=worker, cgroup=cgroup, standby=True)

    def _start_standby(self) -> Standby:
        """A new standby (zygote), tenboxd's child; OSError if it cannot start."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            link = ["--link", self.link_endpoint] if self.link_endpoint else []
            p = subprocess.Popen(list(RUNTIME_ARGV) + [STANDBY_ARG] + link, stdin=theirs, stdout=subprocess.DEVNULL,
                                 env=self.worker_env(), close_fds=True, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return Standby(popen=p, sock=ours)

    def close(self) -> None:
        """Let the standbys go (the VMs' workers run on)."""
        if self.standby is not None:
            self.standby.close()

    async def backing_chain(self, path: str) -> List[str]:
        info = await run_imagetool("info", path)
        return [entry[0] for entry in info.get("backing_chain") or []]

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
        if vm_id not in cmd and STANDBY_ARG not in cmd:  # a standby's command line names no VM
            return None
        cgroup = self.cgroups.of_pid(pid, CGROUP_PREFIX) if self.cgroups else None
        return Proc(pid=pid, create_time=create_time, cgroup=cgroup)

    def clear_leftovers(self, vm_id: str) -> None:
        if self.cgroups is None:
            return  # scopes: systemd removes a scope whose processes are gone
        removed = self.cgroups.sweep("%s%s-" % (CGROUP_PREFIX, vm_id))
        if removed:
            log.info("vm %s: removed %d cgroup(s) a worker left while tenboxd was not running", vm_id, removed)

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
        """Call on_exit once when the process ends, then remove the cgroup we made; a function that stops watching."""
        if proc.cgroup is not None:
            on_exit = _then_remove(on_exit, proc.cgroup)
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


def _in_scope(unit: str, limits: Optional[ResourceLimits], argv: List[str]) -> List[str]:
    """argv run by systemd-run in a scope of its own: restarting or stopping tenboxd.service never takes it along."""
    props = [] if limits is None else ["--property", "MemoryMax=%d" % limits.memory_max,
                                       "--property", "TasksMax=%d" % limits.tasks_max]
    return ["systemd-run", "--scope", "--quiet", "--collect", "--unit", unit] + props + ["--"] + argv


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _join(p: subprocess.Popen, cgroup: WorkerCgroup) -> None:
    """Move the new worker into its cgroup; a worker that cannot be bounded is not left running."""
    try:
        cgroup.add(p.pid)
    except OSError:
        p.kill()
        p.wait()
        raise


def _then_remove(on_exit: Callable[[], None], cgroup: WorkerCgroup) -> Callable[[], None]:
    def both() -> None:
        try:
            on_exit()
        finally:
            cgroup.remove()

    return both


SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
