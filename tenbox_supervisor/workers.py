"""VM workers: spawn, adopt, watch and stop them; the VM state machine (daemon, root).

Each running VM is one `tenbox-vm-runtime` process in its own session (and
systemd scope), talking to us over the worker link. A worker outlives
tenboxd: a restarted daemon finds it through runtime.json and its HELLO and
takes it back. Every state change goes through `VmRuntime.change_state`,
checked against TRANSITIONS, persisted, logged and announced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set

from tenbox_supervisor.config import Config
from tenbox_supervisor.fsutil import tail_lines
from tenbox_supervisor.oshost import SIGNAL_NAMES, Host, Proc
from tenbox_supervisor.store import Store, VmSpec, disk_arg
from tenbox_vmm.protocol import (
    HEARTBEAT_INTERVAL_SEC,
    HEARTBEAT_LIVENESS,
    LINK_VERSION,
    Command,
    CommandName,
    ConsoleData,
    ExitCode,
    Heartbeat,
    Hello,
    Message,
    NetReport,
    Reply,
    StateReport,
    VmState,
    WorkerExit,
    Who,
)

log = logging.getLogger("tenboxd.workers")

S = VmState
TRANSITIONS: Dict[VmState, FrozenSet[VmState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.CRASHED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.REBOOTING, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.RUNNING: frozenset({S.REBOOTING, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.REBOOTING: frozenset({S.RUNNING, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.STOPPING: frozenset({S.STOPPED, S.CRASHED}),
}
ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.STOPPING, S.REBOOTING})

CONSOLE_RING_BYTES = 256 << 10
FAILURE_CONSOLE_LINES = 20
START_TIMEOUT_SEC = 30.0  # spawn -> first HELLO, and spawn -> running
STOP_TIMEOUT_SEC = 10.0  # stop command -> exit, before SIGKILL
KILL_WAIT_SEC = 5.0
SHUTDOWN_TIMEOUT_SEC = 60.0  # power button -> exit, before a hard stop
SUBSCRIBER_QUEUE_MAX = 1024

FAILURE_BY_EXIT = {
    ExitCode.ERROR: ("worker_error", "tenbox-vm-runtime failed"),
    ExitCode.USAGE: ("start_failed", "tenbox-vm-runtime refused the VM's configuration"),
    ExitCode.TRIPLE_FAULT: ("triple_fault", "the guest triple-faulted"),
    ExitCode.KVM_ERROR: ("kvm_error", "KVM reported an error"),
    ExitCode.GUEST_CRASH: ("guest_crash", "the guest reported a crash"),
}


class InvalidTransition(Exception):
    pass


class OperationError(Exception):
    """An operation on a VM failed; `code` is a control-protocol error code."""

    def __init__(self, code, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Failure:
    code: str
    message: str
    time: float
    exit_code: Optional[int] = None
    signal: Optional[str] = None
    console: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "time": self.time,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "console": self.console,
        }


class VmRuntime:
    """What the daemon knows about one VM beyond its spec."""

    def __init__(self, spec: VmSpec, manager: "WorkerManager") -> None:
        self.spec = spec
        self.manager = manager
        self.state = S.STOPPED
        self.proc: Optional[Proc] = None
        self.started_at: Optional[float] = None
        self.last_failure: Optional[Dict[str, Any]] = None
        self.ring = bytearray()
        self._partial_line = b""
        self.console_subs: Set[asyncio.Queue] = set()
        self.log_subs: Set[asyncio.Queue] = set()
        self.hello = False
        self.spawned_mono = 0.0
        self.last_heard = 0.0
        self.exit_msg: Optional[tuple] = None
        self.stop_requested: Optional[str] = None
        self.lost: Optional[Failure] = None
        self.lock = asyncio.Lock()
        self.changed = asyncio.Condition()
        self.net_status: Optional[Dict[str, Any]] = None  # what the worker last said about its network
        self._unwatch: Optional[Callable[[], None]] = None

    @property
    def id(self) -> str:
        return self.spec.id

    def change_state(self, new: VmState, reason: str) -> None:
        old = self.state
        if new == old:
            return
        if new not in TRANSITIONS[old]:
            raise InvalidTransition("%s: %s -> %s (%s)" % (self.id, old.value, new.value, reason))
        self.state = new
        log.info("vm %s: %s -> %s: %s", self.id, old.value, new.value, reason)
        self.persist()
        self.manager.announce(self, old, new, reason)
        asyncio.ensure_future(self._notify_changed())

    async def _notify_changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def persist(self) -> None:
        state = {
            "state": self.state.value,
            "pid": self.proc.pid if self.proc else None,
            "create_time": self.proc.create_time if self.proc else None,
            "started_at": self.started_at,
            "last_failure": self.last_failure,
        }
        try:
            self.manager.store.save_runtime(self.id, state)
        except OSError as e:
            log.error("vm %s: cannot save runtime state: %s", self.id, e.strerror)

    def console_tail(self, lines: int = FAILURE_CONSOLE_LINES) -> List[str]:
        text = bytes(self.ring[-16384:]).decode("utf-8", "replace").replace("\r", "")
        return [l for l in text.split("\n") if l.strip()][-lines:]

    def add_console(self, data: bytes) -> None:
        self.ring += data
        if len(self.ring) > CONSOLE_RING_BYTES:
            del self.ring[: len(self.ring) - CONSOLE_RING_BYTES]
        for q in list(self.console_subs):
            _offer(q, data)
        if self.log_subs:
            buf = self._partial_line + data
            *lines, self._partial_line = buf.split(b"\n")
            if lines:
                text = [l.decode("utf-8", "replace").rstrip("\r") for l in lines]
                for q in list(self.log_subs):
                    _offer(q, text)
        elif len(self._partial_line) > 0:
            self._partial_line = b""

    def close_streams(self, reason: str) -> None:
        for q in list(self.console_subs) + list(self.log_subs):
            _offer(q, None, force=True)
        self.console_subs.clear()
        self.log_subs.clear()

    def uptime(self) -> Optional[float]:
        if self.state in ACTIVE_STATES and self.started_at:
            return max(0.0, time.time() - self.started_at)
        return None


def _offer(q: asyncio.Queue, item, force: bool = False) -> None:
    """Give a subscriber an item; a subscriber that stopped reading is cut off, not waited for."""
    try:
        q.put_nowait(item)
    except asyncio.QueueFull:
        if force:
            try:
                q.get_nowait()
                q.put_nowait(item)
            except (asyncio.QueueEmpty, asyncio.QueueFull):
                pass
        else:
            # Mark the subscriber as too slow: drain and leave only the end marker.
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)


class WorkerManager:
    def __init__(self, config: Config, store: Store, host: Host, send: Callable[[str, Message], bool]) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.send = send
        self.vms: Dict[str, VmRuntime] = {}
        self.broken: Dict[str, str] = {}
        self.listeners: List[Callable[[VmRuntime, VmState, VmState, str], None]] = []
        self.runtime_argv = [sys.executable, "-m", "tenbox_vmm"]
        self._tick_task: Optional[asyncio.Task] = None
        self._next_id = 1
        self._pending: Dict[int, asyncio.Future] = {}

    # Start-up ---------------------------------------------------------------

    def restore(self) -> None:
        """Load the store; take back workers that outlived the previous tenboxd."""
        specs, self.broken = self.store.load()
        loop = asyncio.get_event_loop()
        for vm_id, spec in specs.items():
            vm = VmRuntime(spec, self)
            self.vms[vm_id] = vm
            saved = self.store.load_runtime(vm_id)
            try:
                saved_state = VmState(saved.get("state", "stopped"))
            except ValueError:
                saved_state = S.STOPPED
            vm.last_failure = saved.get("last_failure")
            vm.started_at = saved.get("started_at")
            if saved_state in ACTIVE_STATES:
                proc = None
                if isinstance(saved.get("pid"), int) and isinstance(saved.get("create_time"), (int, float)):
                    proc = self.host.adopt(saved["pid"], saved["create_time"], vm_id)
                if proc is not None:
                    # Restoring, not transitioning: the worker kept running while we were away.
                    vm.state = saved_state
                    vm.proc = proc
                    vm.spawned_mono = time.monotonic()
                    vm._unwatch = self.host.watch(loop, proc, lambda vm=vm: self._on_exit(vm))
                    self._load_console_tail(vm)
                    log.info("vm %s: worker pid %d still running; waiting for it to reconnect", vm_id, proc.pid)
                else:
                    vm.state = saved_state
                    vm.last_failure = Failure(
                        "worker_lost",
                        "the worker exited while tenboxd was not running",
                        time.time(),
                        console=[],
                    ).to_json()
                    vm.change_state(S.CRASHED, "worker gone after a tenboxd restart")
            else:
                vm.state = saved_state if saved_state in (S.STOPPED, S.CRASHED) else S.STOPPED
        self._tick_task = loop.create_task(self._ticker())

    def _load_console_tail(self, vm: VmRuntime) -> None:
        path = os.path.join(self.store.vm_dir(vm.id), "logs", "console.log")
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - CONSOLE_RING_BYTES))
                vm.ring = bytearray(f.read())
        except OSError:
            pass

    # Bookkeeping --------------------------------------------------------------

    def announce(self, vm: VmRuntime, old: VmState, new: VmState, reason: str) -> None:
        for cb in self.listeners:
            try:
                cb(vm, old, new, reason)
            except Exception:
                log.exception("a state listener failed")

    def active(self) -> List[VmRuntime]:
        return [vm for vm in self.vms.values() if vm.state in ACTIVE_STATES]

    def running_count(self) -> int:
        return sum(1 for vm in self.vms.values() if vm.state == S.RUNNING)

    # Operations -----------------------------------------------------------

    def worker_argv(self, vm: VmRuntime) -> List[str]:
        s = vm.spec
        argv = self.runtime_argv + [
            "--link", self.config.worker_endpoint,
            "--vm-id", s.id,
            "--vm-dir", self.store.vm_dir(s.id),
            "--kernel", s.kernel,
            "--memory", str(s.memory_mb),
            "--cpus", str(s.cpus),
        ]
        if s.initrd:
            argv += ["--initrd", s.initrd]
        for d in s.disks:
            argv += ["--disk", disk_arg(d).to_arg()]
        net = s.net or {}
        if net.get("enabled"):
            argv += ["--net", "--mac", net["mac"], "--net-link", "up" if net.get("link_up", True) else "down"]
            for spec in net.get("hostfwds", []):
                argv += ["--hostfwd", spec]
            for spec in net.get("guestfwds", []):
                argv += ["--guestfwd", spec]
        if s.cmdline is not None:
            argv += ["--cmdline", s.cmdline]
        return argv

    async def start(self, vm: VmRuntime) -> None:
        async with vm.lock:
            if vm.state in ACTIVE_STATES:
                raise OperationError("vm_running", "VM %s is already %s" % (vm.id, vm.state.value))
            log_path = os.path.join(self.store.vm_dir(vm.id), "logs", "runtime.log")
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            vm.hello = False
            vm.exit_msg = None
            vm.stop_requested = None
            vm.lost = None
            vm.ring = bytearray()
            try:
                proc = self.host.spawn(self.worker_argv(vm), log_path, "tenbox-vm-%s-%d" % (vm.id, int(time.time())))
            except OSError as e:
                raise OperationError("vm_start_failed", "cannot start tenbox-vm-runtime: %s" % e.strerror) from None
            vm.proc = proc
            vm.started_at = time.time()
            vm.spawned_mono = time.monotonic()
            vm.change_state(S.STARTING, "vm.start (worker pid %d)" % proc.pid)
            vm._unwatch = self.host.watch(asyncio.get_event_loop(), proc, lambda: self._on_exit(vm))
        await self.wait_for(vm, lambda: vm.state != S.STARTING, START_TIMEOUT_SEC + 5)
        if vm.state == S.CRASHED:
            failure = vm.last_failure or {}
            raise OperationError("vm_start_failed", failure.get("message") or "the VM failed to start")

    async def wait_for(self, vm: VmRuntime, predicate: Callable[[], bool], timeout: float) -> bool:
        try:
            async with vm.changed:
                await asyncio.wait_for(vm.changed.wait_for(predicate), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, vm: VmRuntime, reason: str = "vm.stop", timeout: float = STOP_TIMEOUT_SEC) -> None:
        """Hard stop: the worker halts the guest and exits; SIGKILL if it does not in time."""
        async with vm.lock:
            if vm.state not in ACTIVE_STATES or vm.proc is None:
                raise OperationError("vm_not_running", "VM %s is not running" % vm.id)
            await self._stop_locked(vm, reason, timeout)

    async def _stop_locked(self, vm: VmRuntime, reason: str, timeout: float) -> None:
        vm.stop_requested = reason
        if vm.state != S.STOPPING:
            vm.change_state(S.STOPPING, reason)
        proc = vm.proc
        if not self.send(vm.id, Command(0, CommandName.STOP, {"reason": reason})):
            self.host.kill(proc, signal.SIGTERM)  # no link: the worker stops cleanly on SIGTERM too
        if not await self.wait_for(vm, lambda: vm.proc is not proc, timeout):
            log.warning("vm %s: worker pid %d did not stop within %.0fs; killing it", vm.id, proc.pid, timeout)
            self.host.kill(proc, signal.SIGKILL)
            if not await self.wait_for(vm, lambda: vm.proc is not proc, KILL_WAIT_SEC):
                raise OperationError("vm_stop_failed", "worker pid %d survived SIGKILL" % proc.pid)

    async def shutdown(self, vm: VmRuntime, timeout: float = SHUTDOWN_TIMEOUT_SEC) -> bool:
        """ACPI power button; a hard stop if the guest is still up after `timeout`. True if the guest obeyed."""
        async with vm.lock:
            if vm.state not in ACTIVE_STATES or vm.proc is None:
                raise OperationError("vm_not_running", "VM %s is not running" % vm.id)
            proc = vm.proc
            vm.change_state(S.STOPPING, "vm.shutdown: power button")
            if not self.send(vm.id, Command(0, CommandName.SHUTDOWN)):
                self.host.kill(proc, signal.SIGPWR)
            if await self.wait_for(vm, lambda: vm.proc is not proc, timeout):
                return True
            log.warning("vm %s: guest ignored the power button for %.0fs; stopping it", vm.id, timeout)
            await self._stop_locked(vm, "vm.shutdown timed out", STOP_TIMEOUT_SEC)
            return False

    async def reboot(self, vm: VmRuntime) -> None:
        async with vm.lock:
            if vm.state not in (S.RUNNING, S.STARTING, S.REBOOTING) or vm.proc is None:
                raise OperationError("vm_not_running", "VM %s is not running" % vm.id)
            if not self.send(vm.id, Command(0, CommandName.REBOOT)):
                raise OperationError("vm_busy", "VM %s's worker is not connected" % vm.id)

    async def command(self, vm: VmRuntime, name: CommandName, args: Dict[str, Any], timeout: float = 15.0) -> Dict[str, Any]:
        """Send a worker command and wait for its reply; OperationError if it fails or never comes."""
        if vm.state not in ACTIVE_STATES or vm.proc is None or not vm.hello:
            raise OperationError("vm_not_running", "VM %s is not running" % vm.id)
        req_id = self._next_id
        self._next_id += 1
        fut = asyncio.get_event_loop().create_future()
        self._pending[req_id] = fut
        try:
            if not self.send(vm.id, Command(req_id, name, args)):
                raise OperationError("vm_busy", "VM %s's worker is not connected" % vm.id)
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise OperationError("vm_busy", "VM %s's worker did not answer %s" % (vm.id, name.value)) from None
        finally:
            self._pending.pop(req_id, None)
        if not reply.ok:
            raise OperationError("invalid_argument", reply.error or "the worker refused %s" % name.value)
        return reply.result or {}

    def console_input(self, vm: VmRuntime, data: bytes) -> bool:
        if vm.state not in ACTIVE_STATES:
            return False
        return self.send(vm.id, Command(0, CommandName.CONSOLE_INPUT, {"data": data}))

    # Worker link ------------------------------------------------------------

    def on_link_message(self, vm_id: str, msg: Message) -> None:
        vm = self.vms.get(vm_id)
        if vm is None:
            if isinstance(msg, Hello):
                log.warning("worker pid %s speaks for VM %s, which is not in the store; leaving it alone",
                            msg.pid, vm_id)
            return
        now = time.monotonic()
        if isinstance(msg, Hello):
            self._on_hello(vm, msg)
            return
        if vm.proc is None or not vm.hello:
            self.send(vm_id, Who())  # a worker we do not know yet: ask
            return
        vm.last_heard = now
        if isinstance(msg, ConsoleData):
            vm.add_console(msg.data)
        elif isinstance(msg, StateReport):
            self._on_worker_state(vm, msg.state, msg.reason)
        elif isinstance(msg, WorkerExit):
            vm.exit_msg = (msg.code, msg.reason)
        elif isinstance(msg, NetReport):
            vm.net_status = msg.status.to_wire()
        elif isinstance(msg, Reply):
            fut = self._pending.get(msg.id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Heartbeat) and msg.state is not None:
            self._on_worker_state(vm, msg.state, "heartbeat")

    def _on_hello(self, vm: VmRuntime, msg: Hello) -> None:
        pid, ctime = msg.pid, msg.create_time
        if msg.link_version != LINK_VERSION:
            log.error("vm %s: worker pid %d speaks worker-link version %d, this tenboxd %d; ignored",
                      vm.id, pid, msg.link_version, LINK_VERSION)
            return
        if vm.proc is not None:
            if vm.proc.pid != pid or abs(vm.proc.create_time - ctime) > 0.01:
                if vm.proc.create_time == 0.0 and vm.proc.pid == pid:
                    vm.proc.create_time = ctime
                else:
                    log.warning("vm %s: HELLO from pid %s does not match worker pid %d; ignored", vm.id, pid, vm.proc.pid)
                    return
        else:
            proc = self.host.adopt(pid, ctime, vm.id)
            if proc is None:
                log.warning("vm %s: HELLO from pid %s, which is not a tenbox worker for it; ignored", vm.id, pid)
                return
            vm.proc = proc
            vm._unwatch = self.host.watch(asyncio.get_event_loop(), proc, lambda: self._on_exit(vm))
            if msg.started_at is not None:
                vm.started_at = msg.started_at
            vm.state = S.STARTING if vm.state not in ACTIVE_STATES else vm.state
            log.info("vm %s: re-adopted worker pid %d", vm.id, pid)
        if msg.net is not None:
            vm.net_status = msg.net.to_wire()
        first = not vm.hello
        vm.hello = True
        vm.last_heard = time.monotonic()
        if first:
            log.info("vm %s: worker pid %d connected", vm.id, pid)
        self._on_worker_state(vm, msg.state, "worker hello")

    def _on_worker_state(self, vm: VmRuntime, ws: VmState, reason: str) -> None:
        try:
            if ws == S.RUNNING and vm.state in (S.STARTING, S.REBOOTING):
                if vm.state == S.STARTING:
                    vm.last_failure = None  # a clean start supersedes the previous failure
                vm.change_state(S.RUNNING, reason)
            elif ws == S.REBOOTING and vm.state in (S.STARTING, S.RUNNING):
                vm.change_state(S.REBOOTING, reason)
        except InvalidTransition as e:
            log.error("%s", e)

    # Process exit and liveness ---------------------------------------------------

    def _on_exit(self, vm: VmRuntime) -> None:
        proc = vm.proc
        if proc is None:
            return
        status = self.host.exit_status(proc)
        if vm._unwatch:
            vm._unwatch()
            vm._unwatch = None
        code = None
        reason = ""
        if vm.exit_msg is not None:
            code, reason = vm.exit_msg
        elif status is not None and status >= 0:
            code = status
        vm.proc = None
        vm.hello = False
        vm.net_status = None
        failure: Optional[Failure] = None
        now = time.time()
        if vm.stop_requested:
            final, why = S.STOPPED, vm.stop_requested
        elif vm.lost is not None:
            final, failure = S.CRASHED, vm.lost
        elif status is not None and status < 0:
            name = SIGNAL_NAMES.get(-status, str(-status))
            final = S.CRASHED
            failure = Failure("killed", "the worker was killed by %s" % name, now, signal=name)
        elif code in (ExitCode.POWEROFF, ExitCode.STOPPED):
            final, why = S.STOPPED, reason or "guest powered off"
        elif code is None:
            final = S.CRASHED
            failure = Failure("worker_exited", "the worker exited; its status is unknown (it was started by an "
                              "earlier tenboxd)", now)
        else:
            try:
                fcode, fmsg = FAILURE_BY_EXIT[ExitCode(code)]
            except (ValueError, KeyError):
                fcode, fmsg = "worker_error", "tenbox-vm-runtime exited with status %s" % code
            final = S.CRASHED
            failure = Failure(fcode, "%s: %s" % (fmsg, reason) if reason else fmsg, now, exit_code=code)
            if code == ExitCode.USAGE and not reason:
                failure.message = self._last_runtime_error(vm) or fmsg
        if failure is not None:
            if failure.exit_code is None and code is not None:
                failure.exit_code = code
            failure.console = vm.console_tail()
            vm.last_failure = failure.to_json()
            why = "%s: %s" % (failure.code, failure.message)
        elif final == S.STOPPED:
            pass
        if vm.state == S.STOPPED or vm.state == S.CRASHED:
            vm.persist()
        else:
            vm.change_state(final, why)
        vm.close_streams(why)

    def _last_runtime_error(self, vm: VmRuntime) -> Optional[str]:
        lines = tail_lines([os.path.join(self.store.vm_dir(vm.id), "logs", "runtime.log")], 5)
        for line in reversed(lines):
            if "error:" in line:
                return line.split("error:", 1)[1].strip()
        return None

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_SEC)
            try:
                self.tick()
            except Exception:
                log.exception("worker liveness check failed")

    def tick(self) -> None:
        now = time.monotonic()
        for vm in list(self.vms.values()):
            if vm.proc is None or vm.lost is not None:
                continue
            if vm.hello:
                self.send(vm.id, Heartbeat())
                silent = now - vm.last_heard
                if silent > HEARTBEAT_INTERVAL_SEC * HEARTBEAT_LIVENESS:
                    self._declare_lost(vm, Failure("heartbeat_lost", "the worker stopped answering for %.0fs" % silent,
                                                   time.time()))
            elif now - vm.spawned_mono > START_TIMEOUT_SEC:
                self._declare_lost(vm, Failure("start_timeout", "the worker did not connect within %.0fs"
                                               % START_TIMEOUT_SEC, time.time()))

    def _declare_lost(self, vm: VmRuntime, failure: Failure) -> None:
        log.error("vm %s: %s; killing worker pid %d", vm.id, failure.message, vm.proc.pid)
        vm.lost = failure
        self.host.kill(vm.proc, signal.SIGKILL)
        if vm.proc is not None and not vm.proc.is_child:
            # Not our child: no pidfd on 3.8 may lag; the watcher still reports the exit.
            pass

    async def close(self) -> None:
        if self._tick_task:
            self._tick_task.cancel()
        for vm in self.vms.values():
            if vm._unwatch:
                vm._unwatch()
                vm._unwatch = None
