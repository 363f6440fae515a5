"""ManagedVm: tenboxd's record of one VM, its spec, state, worker session and console (daemon, root).

Not to be confused with tenbox-vm-runtime, the worker process that runs
the VM: this is what the daemon knows about it. Handlers read a ManagedVm;
the WorkerManager alone changes it, through the methods here. Every state
change goes through `change_state`, checked against states.TRANSITIONS,
persisted to runtime.json, logged and announced.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from tenbox_supervisor.console_feed import ConsoleFeed
from tenbox_supervisor.failures import Failure
from tenbox_supervisor.oshost import Proc
from tenbox_supervisor.spec import VmSpec
from tenbox_supervisor.states import ACTIVE_STATES, check_transition
from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.link import NetStatus

log = logging.getLogger("tenboxd.workers")

FAILURE_CONSOLE_LINES = 20

StateListener = Callable[["ManagedVm", VmState, VmState, str], None]


@dataclass
class WorkerSession:
    """One worker process of a VM, from spawn (or adoption) to its exit; owned by the WorkerManager."""

    proc: Proc
    spawned_mono: float  # host monotonic time of the spawn or adoption: the start deadline counts from it
    hello: bool = False  # it has introduced itself on the link
    last_heard: float = 0.0  # host monotonic time of its last message
    exit_msg: Optional[Tuple[int, str]] = None  # its EXIT message, if it sent one
    stop_requested: Optional[str] = None  # why we asked it to stop
    lost: Optional[Failure] = None  # declared lost (and killed) by us
    kill_at: Optional[float] = None  # host monotonic time of the SIGKILL that follows a lost worker's stack dump
    unwatch: Optional[Callable[[], None]] = None

    def stop_watching(self) -> None:
        if self.unwatch is not None:
            self.unwatch()
            self.unwatch = None


class ManagedVm:
    def __init__(self, spec: VmSpec, save: Callable[["ManagedVm"], None], announce: StateListener) -> None:
        self._spec = spec
        self._save = save
        self._announce = announce
        self._state = VmState.STOPPED
        self._reason = ""  # why it reached its state: the last change's reason
        self.session: Optional[WorkerSession] = None
        self.started_at: Optional[float] = None
        self._last_failure: Optional[Dict[str, Any]] = None
        self._restart: Optional[Dict[str, Any]] = None  # the restart policy's attempts (restarter.py)
        self.net_status: Optional[NetStatus] = None  # what the worker last said about its network
        self.console = ConsoleFeed()
        self.lock = asyncio.Lock()  # held across an operation's steps (start, stop, edit, delete)
        self.changed = asyncio.Condition()

    # What handlers read -------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._spec.id

    @property
    def spec(self) -> VmSpec:
        return self._spec

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def state_reason(self) -> str:
        return self._reason

    @property
    def active(self) -> bool:
        return self._state in ACTIVE_STATES

    @property
    def proc(self) -> Optional[Proc]:
        return self.session.proc if self.session is not None else None

    @property
    def pid(self) -> Optional[int]:
        return self.session.proc.pid if self.session is not None else None

    @property
    def last_failure(self) -> Optional[Dict[str, Any]]:
        return self._last_failure

    @property
    def restart_status(self) -> Optional[Dict[str, Any]]:
        """{"attempts", "max_retries", "next_retry_at", "backoff_sec", "gave_up"} while a policy acts on the VM."""
        return self._restart

    def uptime(self, now: float) -> Optional[float]:
        if self.active and self.started_at:
            return max(0.0, now - self.started_at)
        return None

    def console_tail(self, lines: int = FAILURE_CONSOLE_LINES) -> List[str]:
        return self.console.tail(lines)

    # What the WorkerManager changes ---------------------------------------------------------

    def change_state(self, new: VmState, reason: str) -> None:
        """The one way a state changes: checked against the table, persisted, logged, announced."""
        old = self._state
        if new == old:
            return
        check_transition(self.id, old, new, reason)
        self._state = new
        self._reason = reason
        log.info("vm %s: %s -> %s: %s", self.id, old.value, new.value, reason)
        self.persist()
        self._announce(self, old, new, reason)
        asyncio.ensure_future(self._notify_changed())

    def restore_state(self, state: VmState, reason: str) -> None:
        """The state runtime.json recorded, set when tenboxd starts.

        Not a transition: nothing happened to the VM while tenboxd was away,
        so the table is not consulted, nothing is announced and nothing is
        written. Only WorkerManager.restore calls this, once per VM.
        """
        log.debug("vm %s: restored as %s: %s", self.id, state.value, reason)
        self._state = state
        self._reason = reason

    def set_spec(self, spec: VmSpec) -> None:
        self._spec = spec

    def record_failure(self, failure: Optional[Failure]) -> None:
        """Set (or clear, with None) last_failure; written with the next persist() or state change."""
        self._last_failure = failure.to_json() if failure is not None else None

    def restore_failure(self, saved: Optional[Dict[str, Any]]) -> None:
        self._last_failure = saved if isinstance(saved, dict) else None

    def record_restart(self, status: Optional[Dict[str, Any]]) -> None:
        """Set (or clear, with None) the restart policy's status; written with the next persist() or state change."""
        self._restart = dict(status) if status is not None else None

    def restore_restart(self, saved: Optional[Dict[str, Any]]) -> None:
        self._restart = saved if isinstance(saved, dict) else None

    def persist(self) -> None:
        self._save(self)

    def runtime_record(self) -> Dict[str, Any]:
        """What runtime.json holds."""
        proc = self.proc
        return {
            "state": self._state.value,
            "reason": self._reason,
            "pid": proc.pid if proc else None,
            "create_time": proc.create_time if proc else None,
            "started_at": self.started_at,
            "last_failure": self._last_failure,
            "restart": self._restart,
        }

    async def _notify_changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()
