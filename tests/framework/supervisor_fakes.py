"""A fake host and worker link for the supervisor's unit tests (tests only).

`FakeHost` implements tenbox_supervisor.oshost.Host without a process: a
spawn is recorded (or fails as told), an exit happens when the test says so,
the clocks move when the test moves them. `Rig` puts a WorkerManager on it
with a real Store in a temporary folder and a recording worker link.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Tuple

from tenbox_supervisor.config import Config
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.oshost import Proc
from tenbox_supervisor.restarter import Restarter
from tenbox_supervisor.spec import VmSpec
from tenbox_supervisor.store import Store
from tenbox_supervisor.worker_manager import WorkerManager
from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.link import Hello, Message, StateReport

CREATE_TIME = 1700000000.5


class FakeHost:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1700000100.0
        self.spawn_error: Optional[OSError] = None
        self.spawned: List[Tuple[List[str], str, str]] = []
        self.spawn_files: List[list] = []  # the WorkerFiles and ResourceLimits of each spawn
        self.spawn_limits: List[object] = []
        self.chains: Dict[str, List[str]] = {}  # disk path -> its backing files, as the image tool would say
        self.killed: List[Tuple[int, int]] = []
        self.adoptable: Dict[Tuple[int, str], float] = {}  # (pid, vm_id) -> create time
        self.exit_on_kill = False  # a kill ends the process at once, with -signal
        self.on_spawn: Optional[Callable[[Proc], None]] = None
        self._statuses: Dict[int, Optional[int]] = {}
        self._watchers: Dict[int, Callable[[], None]] = {}
        self._next_pid = 4001
        self.cleared: List[str] = []  # clear_leftovers calls, by VM id

    # The Host seam

    def spawn(self, argv, log_path, scope_name, files=(), limits=None) -> Proc:
        if self.spawn_error is not None:
            raise self.spawn_error
        self.spawned.append((list(argv), log_path, scope_name))
        self.spawn_files.append(list(files))
        self.spawn_limits.append(limits)
        proc = Proc(pid=self._next_pid, create_time=CREATE_TIME, popen=None)
        self._next_pid += 1
        if self.on_spawn is not None:
            asyncio.get_event_loop().call_soon(self.on_spawn, proc)
        return proc

    async def backing_chain(self, path) -> List[str]:
        return list(self.chains.get(path, []))

    def adopt(self, pid, create_time, vm_id) -> Optional[Proc]:
        known = self.adoptable.get((pid, vm_id))
        if known is None or abs(known - create_time) > 0.01:
            return None
        return Proc(pid=pid, create_time=create_time)

    def clear_leftovers(self, vm_id) -> None:
        self.cleared.append(vm_id)

    def alive(self, proc) -> bool:
        return proc.pid not in self._statuses

    def kill(self, proc, sig) -> None:
        self.killed.append((proc.pid, int(sig)))
        if self.exit_on_kill:
            asyncio.get_event_loop().call_soon(self.exit, proc.pid, -int(sig))

    def exit_status(self, proc) -> Optional[int]:
        return self._statuses.get(proc.pid)

    def watch(self, loop, proc, on_exit) -> Callable[[], None]:
        self._watchers[proc.pid] = on_exit
        return lambda: self._watchers.pop(proc.pid, None)

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    # The test's hand on the world

    def exit(self, pid: int, status: Optional[int]) -> None:
        """Process `pid` ends with `status` (negative: a signal; None: unknown, as for an adopted worker)."""
        self._statuses[pid] = status
        watcher = self._watchers.pop(pid, None)
        if watcher is not None:
            watcher()

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def watched(self) -> List[int]:
        return sorted(self._watchers)


class Rig:
    """A WorkerManager on a FakeHost, its Store in `root`, its link recorded."""

    def __init__(self, root, loop: asyncio.AbstractEventLoop) -> None:
        self.root = root
        self.loop = loop
        self.host = FakeHost()
        self.sent: List[Tuple[str, Message]] = []
        self.connected = True
        self.events: List[Tuple[str, VmState, VmState, str]] = []
        config = Config(data_dir=str(root), socket_path=str(root / "s.sock"), run_dir=str(root / "run"),
                        socket_group=None, cloud_url="")
        self.store = Store(config.vms_dir)
        self.workers = WorkerManager(config, self.store, self.host, self._send)
        self.workers.add_listener(lambda vm, old, new, why: self.events.append((vm.id, old, new, why)))
        self.successors: List["Rig"] = []
        self.restarter: Optional[Restarter] = None

    def with_restarter(self, start: Optional[Callable[[ManagedVm], Awaitable[Any]]] = None) -> Restarter:
        """A Restarter on this rig; it starts VMs with `start` (default: WorkerManager.start, no vm.start checks)."""
        self.restarter = Restarter(self.workers, self.host, start or self.workers.start)
        return self.restarter

    def restarted(self) -> "Rig":
        """A new WorkerManager on the same store and host: tenboxd restarted (restore() is the caller's)."""
        self.run(self.workers.close())
        again = Rig(self.root, self.loop)
        again.host = again.workers.host = self.host
        self.successors.append(again)
        return again

    def close(self) -> None:
        for each in [self] + self.successors:
            if each.restarter is not None:
                each.run(each.restarter.close())
            each.run(each.workers.close())

    def _send(self, vm_id: str, msg: Message) -> bool:
        self.sent.append((vm_id, msg))
        return self.connected

    def run(self, coro, timeout: float = 5.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def settle(self) -> None:
        """Let scheduled callbacks and notifications run."""
        self.loop.run_until_complete(asyncio.sleep(0.01))

    def new_spec(self, name: str = "web", **fields) -> VmSpec:
        spec = VmSpec(id="vm-" + name, name=name, kernel="/boot/vmlinuz", memory_mb=64,
                      net={"enabled": True, "mac": "52:54:00:12:34:56", "link_up": True, "hostfwds": [],
                           "guestfwds": []}, **fields)
        self.store.make_folder(spec.id)
        return spec

    def create(self, name: str = "web", **fields) -> ManagedVm:
        return self.workers.create(self.new_spec(name, **fields))

    def hello(self, vm: ManagedVm, pid: int, state: VmState = VmState.RUNNING, **fields) -> None:
        """The worker `pid` introduces itself."""
        msg = Hello(vm_id=vm.id, pid=pid, create_time=fields.pop("create_time", CREATE_TIME), state=state,
                    started_at=self.host.wall, boots=1, version="test", **fields)
        self.workers.on_link_message(vm.id, msg)

    def report(self, vm: ManagedVm, state: VmState, reason: str = "") -> None:
        self.workers.on_link_message(vm.id, StateReport(state, reason))

    def start_running(self, vm: ManagedVm) -> int:
        """vm.start with a worker that says HELLO in state running; its pid."""
        self.host.on_spawn = lambda proc: self.hello(vm, proc.pid)
        self.run(self.workers.start(vm))
        self.host.on_spawn = None
        return vm.pid


@contextlib.contextmanager
def open_rig(root) -> Iterator[Rig]:
    """A Rig on its own event loop, closed with everything it started (the tests' `rig` fixture)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    rig = Rig(root, loop)
    try:
        yield rig
    finally:
        rig.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        asyncio.set_event_loop(None)
