"""WorkerManager: the VMs tenboxd manages and their tenbox-vm-runtime workers: spawn, adopt, watch, stop (daemon, root).

The narrow interface the method handlers, the image methods, the updater
and the cloud link talk to, after Firecracker's rpc_interface calling its
Vmm: create, start, stop, shutdown, reboot, delete, record_failure,
subscribe_console and a few lookups. Each running VM is one worker process
in its own session (and systemd scope), talking to us over the worker link;
a worker outlives tenboxd, and a restarted daemon finds it through
runtime.json and its HELLO and takes it back. Every OS effect goes through
the `Host` seam (oshost.py), every state change through
ManagedVm.change_state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

from tenbox_supervisor import snapshots, worker_files
from tenbox_supervisor.cgroups import ResourceLimits
from tenbox_supervisor.config import Config
from tenbox_supervisor.console_feed import CONSOLE_RING_BYTES
from tenbox_supervisor.errors import ApiError, CommandTimeout, OperationError
from tenbox_supervisor.failures import Failure, WorkerEnd, judge_exit
from tenbox_supervisor.fsutil import log_files, tail_lines
from tenbox_supervisor.managed_vm import FAILURE_CONSOLE_LINES, ManagedVm, StateListener, WorkerSession
from tenbox_supervisor.oshost import CGROUP_PREFIX, RUNTIME_ARGV, SIGNAL_NAMES, Host, Proc
from tenbox_supervisor.protocol import ErrorCode, FailureCode
from tenbox_supervisor.spec import SpecError, VmSpec, disk_arg, new_vm_id
from tenbox_supervisor.states import ACTIVE_STATES, InvalidTransition
from tenbox_supervisor.store import Store
from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.sandbox import worker_memory_max, worker_tasks_max
from tenbox_vmm.protocol.link import (
    HEARTBEAT_INTERVAL_SEC,
    HEARTBEAT_LIVENESS,
    LINK_VERSION,
    Command,
    CommandName,
    ConsoleData,
    Heartbeat,
    Hello,
    Message,
    NetReport,
    Reply,
    StateReport,
    WorkerExit,
    Who,
)

log = logging.getLogger("tenboxd.workers")

S = VmState
START_TIMEOUT_SEC = 30.0  # spawn -> first HELLO, and spawn -> running
# A worker that hangs gets SIGUSR2 first (its threads' Python stacks to runtime.log) and SIGKILL
# at the first liveness check this long after: the operator sees where it was stuck.
DUMP_GRACE_SEC = 1.0
STACKS_HINT = "; its threads' stacks are in logs/runtime.log"
STOP_TIMEOUT_SEC = 10.0  # stop command -> exit, before SIGKILL
KILL_WAIT_SEC = 5.0
SHUTDOWN_TIMEOUT_SEC = 60.0  # power button -> exit, before a hard stop

# Test hook (dropped under systemd, oshost.py): a longer start deadline where everything is
# emulated, as in the nested lane, whose worker can spend 30 s importing pyzmq over 9p.
START_TIMEOUT_ENV = "TENBOX_TEST_START_TIMEOUT_SEC"
# The same for the silence that counts as a lost worker (HEARTBEAT_LIVENESS intervals): an
# in-process guest reset there has kept a worker busy past 5 s.
LIVENESS_ENV = "TENBOX_TEST_HEARTBEAT_LIVENESS"


def _test_hook(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if 0 < value <= 3600 else default


def start_timeout() -> float:
    return _test_hook(START_TIMEOUT_ENV, START_TIMEOUT_SEC)


def heartbeat_liveness() -> float:
    return _test_hook(LIVENESS_ENV, HEARTBEAT_LIVENESS)


COMMAND_TIMEOUT_SEC = 15.0  # a worker command -> its reply
CREATE_TIME_SLACK_SEC = 0.01  # psutil's and /proc's start times of one process differ by rounding

Send = Callable[[str, Message], bool]


class WorkerManager:
    def __init__(self, config: Config, store: Store, host: Host, send: Send) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.send = send
        self._vms: Dict[str, ManagedVm] = {}
        self._broken: Dict[str, str] = {}
        self._claimed: Set[str] = set()  # names of VMs being created or renamed (claim_name)
        # Workers of broken entries (vm.json unreadable) that still run: nobody supervises them,
        # so their folder is not deleted under them (delete_broken).
        self._orphans: Dict[str, Proc] = {}
        self._listeners: List[StateListener] = []
        self.runtime_argv = list(RUNTIME_ARGV)
        self.start_timeout = start_timeout()
        self.liveness = heartbeat_liveness()
        self._tick_task: Optional[asyncio.Task] = None
        self._next_id = 1
        self._pending: Dict[int, asyncio.Future] = {}

    # Lookups --------------------------------------------------------------------------------

    def all(self) -> List[ManagedVm]:
        return list(self._vms.values())

    def get(self, vm_id: str) -> Optional[ManagedVm]:
        return self._vms.get(vm_id)

    def find(self, key: str) -> Optional[ManagedVm]:
        """The VM with this id, or the only one with this name."""
        vm = self._vms.get(key)
        if vm is None:
            matches = [v for v in self._vms.values() if v.spec.name == key]
            if len(matches) == 1:
                vm = matches[0]
        return vm

    def name_taken(self, name: str, renaming: Optional[ManagedVm] = None) -> bool:
        """Whether `name` is a VM's name or id, a broken entry's id, or claimed by a create or rename in progress.

        Ids are never names: `vm_id` takes either, and a name that is another
        VM's id would make requests reach the wrong VM. `renaming` is the VM
        whose own name and id do not count.
        """
        if name in self._claimed or name in self._broken:
            return True
        holder = self._vms.get(name)
        if holder is not None and holder is not renaming:
            return True
        return any(v.spec.name == name for v in self._vms.values() if v is not renaming)

    @contextlib.contextmanager
    def claim_name(self, name: str, renaming: Optional[ManagedVm] = None) -> Iterator[None]:
        """Hold `name` for a VM being created (or renamed) until the block ends; OperationError(vm_exists) if taken.

        The check and the claim happen together, before the creation awaits
        anything: two concurrent creates with one name cannot both pass.
        """
        if self.name_taken(name, renaming):
            raise OperationError(ErrorCode.VM_EXISTS, "a VM named %r already exists (or a VM has that id)" % name)
        self._claimed.add(name)
        try:
            yield
        finally:
            self._claimed.discard(name)

    def new_id(self) -> str:
        """A fresh VM id that is nobody's id or name."""
        while True:
            vm_id = new_vm_id()
            if not self.name_taken(vm_id):
                return vm_id

    def broken(self) -> Dict[str, str]:
        """Store entries that could not be read: reason by id."""
        return dict(self._broken)

    def active(self) -> List[ManagedVm]:
        return [vm for vm in self._vms.values() if vm.state in ACTIVE_STATES]

    def running_count(self) -> int:
        return sum(1 for vm in self._vms.values() if vm.state == S.RUNNING)

    def vm_dir(self, vm_id: str) -> str:
        return self.store.vm_dir(vm_id)

    def add_listener(self, listener: StateListener) -> None:
        """Called after every state change of every VM, with (vm, old, new, reason)."""
        self._listeners.append(listener)

    # Start-up -------------------------------------------------------------------------------

    def restore(self) -> None:
        """Load the store; take back workers that outlived the previous tenboxd."""
        specs, self._broken = self.store.load()
        loop = asyncio.get_event_loop()
        for vm_id in self._broken:
            proc = self._recorded_worker(vm_id)
            if proc is not None:
                self._orphans[vm_id] = proc
                log.error("vm %s: vm.json is unreadable but its worker pid %d still runs; vm.delete refuses the "
                          "entry unless forced, which stops the worker first", vm_id, proc.pid)
        for vm_id, spec in specs.items():
            vm = self._new_vm(spec)
            self._vms[vm_id] = vm
            self.host.clear_leftovers(vm_id)  # a live worker's cgroup stays: it is not empty
            saved = self.store.load_runtime(vm_id)
            try:
                saved_state = VmState(saved.get("state", "stopped"))
            except ValueError:
                saved_state = S.STOPPED
            vm.restore_failure(saved.get("last_failure"))
            vm.restore_restart(saved.get("restart"))
            vm.started_at = saved.get("started_at")
            reason = saved.get("reason") if isinstance(saved.get("reason"), str) else ""
            if saved_state not in ACTIVE_STATES:
                vm.restore_state(saved_state if saved_state == S.CRASHED else S.STOPPED, reason)
                continue
            proc = self._recorded_worker(vm_id, saved)
            vm.restore_state(saved_state, reason)
            if proc is not None:
                # The worker kept running while we were away: watch it, wait for its HELLO.
                session = vm.session = WorkerSession(proc, spawned_mono=self.host.monotonic())
                session.unwatch = self.host.watch(loop, proc, lambda vm=vm: self._on_exit(vm))
                self._load_console_tail(vm)
                log.info("vm %s: worker pid %d still running; waiting for it to reconnect", vm_id, proc.pid)
            else:
                vm.record_failure(Failure(FailureCode.WORKER_LOST, "the worker exited while tenboxd was not running",
                                          self.host.time(), console=[]))
                vm.change_state(S.CRASHED, "worker gone after a tenboxd restart")
        self._tick_task = loop.create_task(self._ticker())

    def _recorded_worker(self, vm_id: str, saved: Optional[Dict[str, Any]] = None) -> Optional[Proc]:
        """The live worker runtime.json names for `vm_id` (same pid and start time, a tenbox worker for it), or None."""
        saved = self.store.load_runtime(vm_id) if saved is None else saved
        if isinstance(saved.get("pid"), int) and isinstance(saved.get("create_time"), (int, float)):
            return self.host.adopt(saved["pid"], saved["create_time"], vm_id)
        return None

    def _new_vm(self, spec: VmSpec) -> ManagedVm:
        return ManagedVm(spec, self._save_runtime, self._announce)

    def _save_runtime(self, vm: ManagedVm) -> None:
        try:
            self.store.save_runtime(vm.id, vm.runtime_record())
        except OSError as e:
            log.error("vm %s: cannot save runtime state: %s", vm.id, e.strerror)

    def _announce(self, vm: ManagedVm, old: VmState, new: VmState, reason: str) -> None:
        for cb in self._listeners:
            try:
                cb(vm, old, new, reason)
            except Exception:
                log.exception("a state listener failed")

    def _load_console_tail(self, vm: ManagedVm) -> None:
        path = os.path.join(self.store.vm_dir(vm.id), "logs", "console.log")
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - CONSOLE_RING_BYTES))
                vm.console.reset(f.read())
        except OSError:
            pass

    # The VM set -------------------------------------------------------------------------------

    def create(self, spec: VmSpec) -> ManagedVm:
        """A new stopped VM: its spec written to its folder (made by the caller), then listed.

        OSError or SpecError if the spec cannot be stored; nothing is listed then.
        """
        spec.created_at = spec.created_at or self.host.time()
        self.store.save(spec)
        vm = self._new_vm(spec)
        vm.persist()
        self._vms[spec.id] = vm
        log.info("vm %s: created as %r", spec.id, spec.name)
        return vm

    def update_spec(self, vm: ManagedVm, spec: VmSpec) -> None:
        """Store a changed spec and use it from the next start; OSError or SpecError if it cannot be stored."""
        self.store.save(spec)
        vm.set_spec(spec)

    def delete(self, vm: ManagedVm) -> None:
        """Remove a stopped VM and its folder; OSError if the folder cannot be removed (the VM stays)."""
        self.store.delete(vm.id)
        self._vms.pop(vm.id, None)
        vm.console.close()
        log.info("vm %s: deleted", vm.id)

    async def delete_broken(self, vm_id: str, force: bool) -> None:
        """Remove a broken store entry's folder; OSError if it cannot be.

        A worker of the entry that still runs is refused (vm_running), or with
        `force` stopped first (SIGTERM, SIGKILL after STOP_TIMEOUT_SEC): its
        folder is never deleted under it.
        """
        proc = self._orphans.get(vm_id)
        if proc is not None and self.host.alive(proc):
            if not force:
                raise OperationError(ErrorCode.VM_RUNNING, "broken VM %s still has a running worker (pid %d); "
                                     "delete it with force to stop the worker first" % (vm_id, proc.pid))
            log.warning("vm %s: stopping the worker pid %d of a broken entry before deleting it", vm_id, proc.pid)
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_SEC), (signal.SIGKILL, KILL_WAIT_SEC)):
                self.host.kill(proc, sig)
                if await self._ended(proc, wait):
                    break
            else:
                raise OperationError(ErrorCode.VM_STOP_FAILED, "worker pid %d survived SIGKILL" % proc.pid)
        self.store.delete(vm_id)
        self._broken.pop(vm_id, None)
        self._orphans.pop(vm_id, None)

    async def _ended(self, proc: Proc, timeout: float) -> bool:
        deadline = self.host.monotonic() + timeout
        while self.host.alive(proc):
            if self.host.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def record_failure(self, vm: ManagedVm, code: FailureCode, message: str) -> None:
        """A failure found before any worker ran (vm.start's checks): shown as last_failure, persisted."""
        vm.record_failure(Failure(code, message, self.host.time(), console=[]))
        vm.persist()

    def record_restart(self, vm: ManagedVm, status: Optional[Dict[str, Any]]) -> None:
        """The restart policy's status of `vm` (restarter.py): shown in vm.list, persisted."""
        vm.record_restart(status)
        vm.persist()

    # Operations ---------------------------------------------------------------------------

    def worker_argv(self, vm: ManagedVm, restore: Optional[str] = None) -> List[str]:
        """The worker's command line; `restore`: a snapshot file it starts from instead of booting."""
        s = vm.spec
        argv = self.runtime_argv + [
            "--link", self.config.worker_endpoint,
            "--vm-id", s.id,
            "--vm-dir", self.store.vm_dir(s.id),
            "--kernel", s.kernel,
            "--memory", str(s.memory_mb),
            "--cpus", str(s.cpus),
            "--snapshot-dir", snapshots.staging_dir(self.store.vm_dir(s.id)),
        ]
        if restore:
            argv += ["--restore", restore]
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

    async def start(self, vm: ManagedVm, allowed: Optional[Callable[[], None]] = None,
                    restore: Optional[str] = None) -> None:
        """Spawn the VM's worker and wait until the guest runs; OperationError with the reason if it does not.

        `allowed` is asked under the VM's lock, with no await between it and the
        spawn (the updater's check: a start queued behind the lock must not
        spawn while tenbox updates itself); it raises to refuse. `restore`: a
        snapshot file the guest continues from (vm.restore, vm.clone).
        """
        async with vm.lock:
            await self.start_locked(vm, allowed, restore)
        await self.until_started(vm)

    async def start_locked(self, vm: ManagedVm, allowed: Optional[Callable[[], None]] = None,
                           restore: Optional[str] = None) -> None:
        """start() with the VM's lock held, up to the spawn; then await until_started() without the lock."""
        if vm.active:
            raise OperationError(ErrorCode.VM_RUNNING, "VM %s is already %s" % (vm.id, vm.state.value))
        chains = await self._backing_chains(vm)
        if allowed is not None:
            allowed()  # after the last await: nothing may come between it and the spawn
        vm_dir = self.store.vm_dir(vm.id)
        log_path = os.path.join(self.store.make_logs(vm.id), "runtime.log")
        vm.console.reset()
        # The worker opens none of its files (its sandbox hides them): we pass them open.
        try:
            staging = snapshots.prepare_staging(vm_dir)
        except OSError as e:
            raise OperationError(ErrorCode.VM_START_FAILED, "cannot prepare the snapshot staging folder of "
                                 "VM %s: %s" % (vm.id, e.strerror)) from None
        files = worker_files.wanted(vm.spec, vm_dir, chains, restore, staging)
        limits = ResourceLimits(worker_memory_max(vm.spec.memory_mb), worker_tasks_max(vm.spec.cpus))
        try:
            proc = self.host.spawn(self.worker_argv(vm, restore), log_path,
                                   "%s%s-%d" % (CGROUP_PREFIX, vm.id, int(self.host.time())), files, limits)
        except worker_files.WorkerFileError as e:
            raise OperationError(ErrorCode.VM_START_FAILED, str(e)) from None
        except OSError as e:
            raise OperationError(ErrorCode.VM_START_FAILED,
                                 "cannot start tenbox-vm-runtime: %s" % e.strerror) from None
        session = vm.session = WorkerSession(proc, spawned_mono=self.host.monotonic())
        vm.started_at = self.host.time()
        vm.change_state(S.STARTING, "vm.start (worker pid %d%s)" % (proc.pid, ", a standby" if proc.standby else ""))
        session.unwatch = self.host.watch(asyncio.get_event_loop(), proc, lambda: self._on_exit(vm))

    async def until_started(self, vm: ManagedVm) -> None:
        await self.wait_for(vm, lambda: vm.state != S.STARTING, self.start_timeout + 5)
        if vm.state == S.CRASHED:
            failure = vm.last_failure or {}
            raise OperationError(ErrorCode.VM_START_FAILED, failure.get("message") or "the VM failed to start")

    async def _backing_chains(self, vm: ManagedVm) -> Dict[str, List[str]]:
        """Backing files of the disks whose spec does not record them, read by the image tool now.

        A chain read for a disk tenboxd made (an overlay of a template: only
        root can change its header) is recorded in the spec, so that the next
        start does not read it again.
        """
        chains: Dict[str, List[str]] = {}
        recorded = False
        disks = [dict(d) for d in vm.spec.disks]
        for d in disks:
            if not worker_files.needs_chain(d):
                continue
            try:
                chains[d["path"]] = await self.host.backing_chain(d["path"])
            except ApiError as e:
                raise OperationError(ErrorCode.VM_START_FAILED, "disk %s: %s" % (d["path"], e.message)) from None
            if d.get("owned"):
                d["backing"] = chains[d["path"]]
                recorded = True
        if recorded:
            try:
                self.update_spec(vm, VmSpec.from_json(dict(vm.spec.to_json(), disks=disks)))
            except (OSError, SpecError) as e:
                log.warning("vm %s: cannot record its disks' backing files: %s", vm.id, e)
        return chains

    async def wait_for(self, vm: ManagedVm, predicate: Callable[[], bool], timeout: float) -> bool:
        try:
            async with vm.changed:
                await asyncio.wait_for(vm.changed.wait_for(predicate), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, vm: ManagedVm, reason: str = "vm.stop", timeout: float = STOP_TIMEOUT_SEC) -> None:
        """Hard stop: the worker halts the guest and exits; SIGKILL if it does not in time."""
        async with vm.lock:
            if not vm.active or vm.session is None:
                raise OperationError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)
            await self._stop_locked(vm, reason, timeout)

    async def _stop_locked(self, vm: ManagedVm, reason: str, timeout: float) -> None:
        session = vm.session
        session.stop_requested = reason
        if vm.state != S.STOPPING:
            vm.change_state(S.STOPPING, reason)
        proc = session.proc
        if not self.send(vm.id, Command(0, CommandName.STOP, {"reason": reason})):
            self.host.kill(proc, signal.SIGTERM)  # no link: the worker stops cleanly on SIGTERM too
        if not await self.wait_for(vm, lambda: vm.session is not session, timeout):
            log.warning("vm %s: worker pid %d did not stop within %.0fs; killing it", vm.id, proc.pid, timeout)
            self.host.kill(proc, signal.SIGKILL)
            if not await self.wait_for(vm, lambda: vm.session is not session, KILL_WAIT_SEC):
                raise OperationError(ErrorCode.VM_STOP_FAILED, "worker pid %d survived SIGKILL" % proc.pid)

    async def shutdown(self, vm: ManagedVm, timeout: float = SHUTDOWN_TIMEOUT_SEC, reason: str = "vm.shutdown") -> bool:
        """ACPI power button; a hard stop if the guest is still up after `timeout`. True if the guest obeyed.

        `reason` is the stop's: the VM ends `stopped` with it (also if its worker fails on the way).
        """
        async with vm.lock:
            if not vm.active or vm.session is None:
                raise OperationError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)
            session = vm.session
            session.stop_requested = reason
            vm.change_state(S.STOPPING, "%s: power button" % reason)
            if not self.send(vm.id, Command(0, CommandName.SHUTDOWN)):
                self.host.kill(session.proc, signal.SIGPWR)
            if await self.wait_for(vm, lambda: vm.session is not session, timeout):
                return True
            log.warning("vm %s: guest ignored the power button for %.0fs; stopping it", vm.id, timeout)
            await self._stop_locked(vm, reason, STOP_TIMEOUT_SEC)
            return False

    async def reboot(self, vm: ManagedVm) -> None:
        async with vm.lock:
            if vm.state not in (S.RUNNING, S.STARTING, S.REBOOTING) or vm.session is None:
                raise OperationError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)
            if not self.send(vm.id, Command(0, CommandName.REBOOT)):
                raise OperationError(ErrorCode.VM_BUSY, "VM %s's worker is not connected" % vm.id)

    async def command(self, vm: ManagedVm, name: CommandName, args: Dict[str, Any],
                      timeout: float = COMMAND_TIMEOUT_SEC) -> Dict[str, Any]:
        """Send a worker command and wait for its reply; OperationError if it fails or never comes.

        A worker that ends before it answers fails the command at once (VM_NOT_RUNNING), not
        after `timeout`: a snapshot command waits minutes for a big guest.
        """
        session = vm.session
        if not vm.active or session is None or not session.hello:
            raise OperationError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)
        req_id = self._next_id
        self._next_id += 1
        fut = asyncio.get_event_loop().create_future()
        self._pending[req_id] = fut
        ended = asyncio.ensure_future(self.wait_for(vm, lambda: vm.session is not session, timeout))
        try:
            if not self.send(vm.id, Command(req_id, name, args)):
                raise OperationError(ErrorCode.VM_BUSY, "VM %s's worker is not connected" % vm.id)
            await asyncio.wait({fut, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not fut.done():
                if vm.session is not session:
                    raise OperationError(ErrorCode.VM_NOT_RUNNING, "VM %s's worker ended before it answered %s"
                                         % (vm.id, name.value))
                raise CommandTimeout(ErrorCode.VM_BUSY, "VM %s's worker did not answer %s" % (vm.id, name.value))
            reply = fut.result()
        finally:
            ended.cancel()
            self._pending.pop(req_id, None)
        if not reply.ok:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, reply.error or "the worker refused %s" % name.value)
        return reply.result or {}

    def console_input(self, vm: ManagedVm, data: bytes) -> bool:
        if not vm.active:
            return False
        return self.send(vm.id, Command(0, CommandName.CONSOLE_INPUT, {"data": data}))

    @contextlib.contextmanager
    def subscribe_console(self, vm: ManagedVm) -> Iterator[asyncio.Queue]:
        """Console bytes as the worker sends them, until None."""
        with vm.console.subscribe_console() as q:
            yield q

    @contextlib.contextmanager
    def subscribe_logs(self, vm: ManagedVm) -> Iterator[asyncio.Queue]:
        """Whole console lines as they complete, until None."""
        with vm.console.subscribe_logs() as q:
            yield q

    # Worker link ------------------------------------------------------------------------------

    def on_link_message(self, vm_id: str, msg: Message) -> bool:
        """A message of VM `vm_id`'s worker; for a HELLO, whether it is accepted as that worker's.

        The link has checked that a HELLO's pid is the sender's; accepted, the
        link routes the VM's messages to its connection (link.py).
        """
        vm = self._vms.get(vm_id)
        if vm is None:
            if isinstance(msg, Hello):
                log.warning("worker pid %s speaks for VM %r, which is not in the store; leaving it alone",
                            msg.pid, vm_id[:64])
            return False
        if isinstance(msg, Hello):
            return self._on_hello(vm, msg)
        session = vm.session
        if session is None or not session.hello:
            self.send(vm_id, Who())  # a worker we do not know yet: ask
            return False
        session.last_heard = self.host.monotonic()
        if isinstance(msg, ConsoleData):
            vm.console.add(msg.data)
        elif isinstance(msg, StateReport):
            self._on_worker_state(vm, msg.state, msg.reason)
        elif isinstance(msg, WorkerExit):
            session.exit_msg = (msg.code, msg.reason)
        elif isinstance(msg, NetReport):
            vm.net_status = msg.status
        elif isinstance(msg, Reply):
            fut = self._pending.get(msg.id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Heartbeat) and msg.state is not None:
            self._on_worker_state(vm, msg.state, "heartbeat")
        return True

    def _worker_of_another_vm(self, vm: ManagedVm, pid: int) -> Optional[ManagedVm]:
        for other in self._vms.values():
            if other is not vm and other.session is not None and other.session.proc.pid == pid:
                return other
        return None

    def _on_hello(self, vm: ManagedVm, msg: Hello) -> bool:
        pid, ctime = msg.pid, msg.create_time
        session = vm.session
        ours = session is not None and session.proc.pid == pid
        if msg.link_version != LINK_VERSION:
            text = "worker pid %d speaks worker-link version %d, this tenboxd %d" % (pid, msg.link_version, LINK_VERSION)
            if ours and session.lost is None:
                self._declare_lost(vm, Failure(FailureCode.LINK_VERSION, text, self.host.time()))
            else:
                log.error("vm %s: %s; ignored", vm.id, text)
            return False
        if session is not None:
            proc = session.proc
            if proc.pid != pid or abs(proc.create_time - ctime) > CREATE_TIME_SLACK_SEC:
                if proc.create_time == 0.0 and proc.pid == pid:
                    proc.create_time = ctime  # psutil could not read it at spawn; the worker knows it
                else:
                    log.warning("vm %s: HELLO from pid %s does not match worker pid %d; ignored", vm.id, pid, proc.pid)
                    return False
        else:
            other = self._worker_of_another_vm(vm, pid)
            if other is not None:  # a worker speaks for its own VM only, whatever its command line says
                log.warning("vm %s: HELLO from pid %s, the worker of VM %s; ignored", vm.id, pid, other.id)
                return False
            proc = self.host.adopt(pid, ctime, vm.id)
            if proc is None:
                log.warning("vm %s: HELLO from pid %s, which is not a tenbox worker for it; ignored", vm.id, pid)
                return False
            session = vm.session = WorkerSession(proc, spawned_mono=self.host.monotonic())
            session.unwatch = self.host.watch(asyncio.get_event_loop(), proc, lambda: self._on_exit(vm))
            if msg.started_at is not None:
                vm.started_at = msg.started_at
            if not vm.active:
                vm.change_state(S.STARTING, "re-adopted worker pid %d" % pid)
            log.info("vm %s: re-adopted worker pid %d", vm.id, pid)
        if msg.net is not None:
            vm.net_status = msg.net
        first = not session.hello
        session.hello = True
        session.last_heard = self.host.monotonic()
        if first:
            log.info("vm %s: worker pid %d connected", vm.id, pid)
        self._on_worker_state(vm, msg.state, "worker hello")
        return True

    def _on_worker_state(self, vm: ManagedVm, ws: VmState, reason: str) -> None:
        try:
            if ws == S.RUNNING and vm.state in (S.STARTING, S.REBOOTING):
                if vm.state == S.STARTING:
                    vm.record_failure(None)  # a clean start supersedes the previous failure
                vm.change_state(S.RUNNING, reason)
            elif ws == S.REBOOTING and vm.state in (S.STARTING, S.RUNNING):
                vm.change_state(S.REBOOTING, reason)
        except InvalidTransition as e:
            log.error("%s", e)

    # Process exit and liveness ------------------------------------------------------------------

    def _on_exit(self, vm: ManagedVm) -> None:
        session = vm.session
        if session is None:
            return
        status = self.host.exit_status(session.proc)
        session.stop_watching()
        vm.session = None
        vm.net_status = None
        end = WorkerEnd(status, session.exit_msg, session.stop_requested, session.lost)
        final, failure, why = judge_exit(end, self.host.time(), SIGNAL_NAMES, lambda: self._last_runtime_error(vm))
        if failure is not None:
            vm.record_failure(dataclasses.replace(failure, console=self._failure_console(vm)))
        if vm.state in (S.STOPPED, S.CRASHED):
            vm.persist()
        else:
            vm.change_state(final, why)
        vm.console.close()

    def _failure_console(self, vm: ManagedVm) -> List[str]:
        """The console log's last lines, as vm.logs shows them.

        From the files, not the ring: the worker writes the log itself, and
        its last output may never have reached tenboxd before it died.
        """
        lines = tail_lines(log_files(self.store.vm_dir(vm.id), "console"), FAILURE_CONSOLE_LINES)
        return lines or vm.console_tail()

    def _last_runtime_error(self, vm: ManagedVm) -> Optional[str]:
        lines = tail_lines(log_files(self.store.vm_dir(vm.id), "runtime")[-1:], 5)
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
        """Heartbeat every connected worker; declare lost one silent too long, or one that never said HELLO."""
        now = self.host.monotonic()
        for vm in list(self._vms.values()):
            session = vm.session
            if session is None:
                continue
            if session.lost is not None:
                if session.kill_at is not None and now >= session.kill_at:
                    session.kill_at = None
                    self.host.kill(session.proc, signal.SIGKILL)
                continue
            if session.hello:
                self.send(vm.id, Heartbeat())
                silent = now - session.last_heard
                if silent > HEARTBEAT_INTERVAL_SEC * self.liveness:
                    self._declare_lost(vm, Failure(FailureCode.HEARTBEAT_LOST, "the worker stopped answering for "
                                                   "%.0fs%s" % (silent, STACKS_HINT), self.host.time()), dump=True)
            elif now - session.spawned_mono > self.start_timeout:
                self._declare_lost(vm, Failure(FailureCode.START_TIMEOUT, "the worker did not connect within %.0fs%s"
                                               % (self.start_timeout, STACKS_HINT), self.host.time()), dump=True)

    def _declare_lost(self, vm: ManagedVm, failure: Failure, dump: bool = False) -> None:
        """Kill the worker; its exit is then judged with this failure.

        `dump`: a hung worker; SIGUSR2 now (faulthandler writes every thread's stack to
        runtime.log and the worker runs on), SIGKILL from tick() DUMP_GRACE_SEC later.
        """
        session = vm.session
        session.lost = failure
        if dump:
            log.error("vm %s: %s; worker pid %d: stacks asked for (SIGUSR2), killed in %.0fs", vm.id,
                      failure.message, session.proc.pid, DUMP_GRACE_SEC)
            session.kill_at = self.host.monotonic() + DUMP_GRACE_SEC
            self.host.kill(session.proc, signal.SIGUSR2)
            return
        log.error("vm %s: %s; killing worker pid %d", vm.id, failure.message, session.proc.pid)
        self.host.kill(session.proc, signal.SIGKILL)

    async def close(self) -> None:
        if self._tick_task:
            self._tick_task.cancel()
        for vm in self._vms.values():
            if vm.session is not None:
                vm.session.stop_watching()

