"""Restarter: carries out each VM's restart policy and autostart (daemon, root).

It watches every state change (WorkerManager.add_listener). A VM whose
worker ended on its own, failed (crashed) or because the guest powered off
(stopped without passing through `stopping`), is started again when its
policy says so (restart_policy.py), after the policy's backoff; the wait,
the attempt count and a policy that gave up are the VM's restart status,
shown by vm.list and kept in runtime.json. Due attempts are looked for by
`tick()` on the Host's monotonic clock, so the unit tests move time
instead of sleeping. Starting goes through the same path as vm.start
(`StartVm`: the update gate, the file and KVM checks, the spawn).

At the first tenboxd start of a host boot (no BOOT_MARKER in the run
directory, which is on tmpfs under systemd and survives tenboxd restarts)
the VMs with autostart or `--restart always` are started; a tenboxd restart
later in the same boot starts nothing and takes running workers back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Set

from tenbox_supervisor.errors import ApiError, OperationError
from tenbox_supervisor.managed_vm import ManagedVm, StateListener
from tenbox_supervisor.oshost import Host
from tenbox_supervisor.restart_policy import (
    PERMANENT_FAILURES,
    PERMANENT_REFUSALS,
    RESET_WINDOW_SEC,
    RESTART_TICK_SEC,
    RestartName,
    backoff_sec,
)
from tenbox_supervisor.states import ACTIVE_STATES
from tenbox_vmm.protocol import VmState

log = logging.getLogger("tenboxd.restart")

S = VmState
BOOT_MARKER = "booted"  # in the run directory: a tenboxd already ran since the host booted
AUTOSTART = "autostart"
RESTART = "restart"

StartVm = Callable[[ManagedVm], Awaitable[Any]]  # vm.start's whole path; ApiError if refused or failed
# Told of what the policy does: (vm, what, details); the event log listens (events.py).
RestartListener = Callable[[ManagedVm, str, Dict[str, Any]], None]


class RestartTarget(Protocol):
    """What the Restarter needs of the WorkerManager."""

    def all(self) -> List[ManagedVm]:
        ...

    def get(self, vm_id: str) -> Optional[ManagedVm]:
        ...

    def add_listener(self, listener: StateListener) -> None:
        ...

    def record_restart(self, vm: ManagedVm, status: Optional[Dict[str, Any]]) -> None:
        ...


def first_start_since_boot(run_dir: str) -> bool:
    """Whether no tenboxd ran since the host booted; marks that one does now."""
    path = os.path.join(run_dir, BOOT_MARKER)
    if os.path.exists(path):
        return False
    with open(path, "w") as f:
        f.write("tenboxd autostarted the VMs of this boot\n")
    return True


class Restarter:
    def __init__(self, workers: RestartTarget, host: Host, start: StartVm) -> None:
        self.workers = workers
        self.host = host
        self._start = start
        self._due: Dict[str, float] = {}  # VM id -> host monotonic time its start is due
        self._why: Dict[str, str] = {}  # VM id -> AUTOSTART or RESTART
        self._running_since: Dict[str, float] = {}  # VM id -> host monotonic time it reached running
        self._ours: Set[str] = set()  # VMs being started by us
        self._tasks: Set["asyncio.Future[None]"] = set()
        self._ticker: Optional[asyncio.Task] = None
        self._listeners: List[RestartListener] = []
        self._held = False  # the host is shutting down: start nothing more
        workers.add_listener(self._on_change)

    def add_listener(self, listener: RestartListener) -> None:
        self._listeners.append(listener)

    def pending(self) -> Dict[str, float]:
        """VM id -> host monotonic time of its next start."""
        return dict(self._due)

    # Start-up --------------------------------------------------------------------------------

    def boot(self, first_since_boot: bool) -> None:
        """After WorkerManager.restore: at a host boot, start the autostart and restart=always VMs."""
        if first_since_boot:
            now = self.host.monotonic()
            for vm in self.workers.all():
                if vm.active or not (vm.spec.autostart or vm.spec.restart_policy.name is RestartName.ALWAYS):
                    continue
                log.info("vm %s: starting it: %s", vm.id, "autostart" if vm.spec.autostart else "restart always")
                self.workers.record_restart(vm, None)
                self._due[vm.id] = now
                self._why[vm.id] = AUTOSTART
        else:
            # Attempts that were waiting when the previous tenboxd stopped: due when they were due.
            for vm in self.workers.all():
                status = vm.restart_status or {}
                if vm.id in self._due or vm.active or status.get("next_retry_at") is None:
                    continue
                wait = max(0.0, float(status["next_retry_at"]) - self.host.time())
                self._due[vm.id] = self.host.monotonic() + wait
                self._why[vm.id] = RESTART

    def start(self) -> None:
        self._ticker = asyncio.get_event_loop().create_task(self._tick_loop())

    async def close(self) -> None:
        for t in [self._ticker] + list(self._tasks):
            if t is not None:
                t.cancel()

    async def _tick_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("the restart check failed")
            await asyncio.sleep(RESTART_TICK_SEC)

    # What happens to VMs -----------------------------------------------------------------------

    def _on_change(self, vm: ManagedVm, old: VmState, new: VmState, reason: str) -> None:
        now = self.host.monotonic()
        if new == S.STARTING and vm.id not in self._ours:
            # Started by someone (vm.start, a re-adopted worker): the policy's count starts again.
            self._cancel(vm)
        elif new == S.RUNNING:
            self._running_since.setdefault(vm.id, now)
        elif new == S.CRASHED and old in ACTIVE_STATES:
            self._ended(vm, failed=True)
        elif new == S.STOPPED and old == S.STOPPING:
            self._cancel(vm)  # stopped as asked: the series of attempts is over
        elif new == S.STOPPED and old in ACTIVE_STATES:
            self._ended(vm, failed=False)  # the guest powered off: a requested stop passes through stopping
        if new not in (S.RUNNING, S.REBOOTING):
            self._running_since.pop(vm.id, None)

    def hold(self) -> None:
        """Start nothing more until tenboxd starts again (host.shutdown); waiting starts are dropped."""
        self._held = True
        self._due.clear()
        self._why.clear()

    def cancel(self, vm: ManagedVm) -> bool:
        """Drop the VM's waiting start (vm.stop on a VM waiting for one); whether there was one."""
        waiting = vm.id in self._due
        self._cancel(vm)
        return waiting

    def _cancel(self, vm: ManagedVm) -> None:
        self._due.pop(vm.id, None)
        self._why.pop(vm.id, None)
        if vm.restart_status is not None:
            self.workers.record_restart(vm, None)

    def _ended(self, vm: ManagedVm, failed: bool) -> None:
        """The VM's worker ended on its own: schedule its next start if its policy says so, or give up."""
        if self._held:
            return
        policy = vm.spec.restart_policy
        since = self._running_since.pop(vm.id, None)
        if not policy.restarts_after(failed):
            self._cancel(vm)
            return
        status = dict(vm.restart_status or {})
        now = self.host.monotonic()
        if since is not None and now - since >= RESET_WINDOW_SEC:
            status = {}  # it ran long enough: a new series of attempts
        attempts = int(status.get("attempts", 0))
        code = (vm.last_failure or {}).get("code") if failed else None
        if code in {c.value for c in PERMANENT_FAILURES}:
            self._give_up(vm, status, "%s: %s cannot be fixed by starting it again" % (policy, code))
            return
        if not policy.allows(attempts + 1):
            plural = "" if attempts == 1 else "s"
            self._give_up(vm, status, "%s: gave up after %d restart%s" % (policy, attempts, plural))
            return
        delay = backoff_sec(attempts + 1)
        self._due[vm.id] = now + delay
        self._why[vm.id] = RESTART
        status.update(attempts=attempts, max_retries=policy.max_retries, backoff_sec=delay,
                      next_retry_at=self.host.time() + delay, gave_up=None)
        self.workers.record_restart(vm, status)
        log.warning("vm %s: %s; restart %d in %.0fs (%s)", vm.id, "failed" if failed else "powered off",
                    attempts + 1, delay, policy)
        self._tell(vm, "scheduled", {"attempt": attempts + 1, "backoff_sec": delay,
                                     "next_retry_at": status["next_retry_at"]})

    def _give_up(self, vm: ManagedVm, status: Dict[str, Any], why: str) -> None:
        self._due.pop(vm.id, None)
        self._why.pop(vm.id, None)
        status = dict(status, attempts=int(status.get("attempts", 0)), next_retry_at=None, gave_up=why)
        status.setdefault("max_retries", vm.spec.restart_policy.max_retries)
        self.workers.record_restart(vm, status)
        log.error("vm %s: %s", vm.id, why)
        self._tell(vm, "gave_up", {"reason": why, "attempts": status["attempts"]})

    def _tell(self, vm: ManagedVm, what: str, details: Dict[str, Any]) -> None:
        for cb in self._listeners:
            try:
                cb(vm, what, details)
            except Exception:
                log.exception("a restart listener failed")

    # Due starts ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Start the VMs whose start is due (on the Host's monotonic clock); reset the count of VMs that recovered."""
        now = self.host.monotonic()
        for vm_id, since in list(self._running_since.items()):
            vm = self.workers.get(vm_id)
            if vm is not None and now - since >= RESET_WINDOW_SEC and vm.restart_status is not None \
                    and vm.id not in self._due:
                self.workers.record_restart(vm, None)
        for vm_id, due in sorted(self._due.items(), key=lambda item: item[1]):
            if due > now:
                continue
            del self._due[vm_id]
            why = self._why.pop(vm_id, RESTART)
            vm = self.workers.get(vm_id)
            if vm is None or vm.active:
                continue
            task = asyncio.ensure_future(self._attempt(vm, why))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _attempt(self, vm: ManagedVm, why: str) -> None:
        policy = vm.spec.restart_policy
        if why == RESTART:
            if not policy.restarts_after(failed=True):  # edited to `no` meanwhile
                self._cancel(vm)
                return
            status = dict(vm.restart_status or {})
            status.update(attempts=int(status.get("attempts", 0)) + 1, next_retry_at=None)
            self.workers.record_restart(vm, status)
            log.info("vm %s: restart %d (%s)", vm.id, status["attempts"], policy)
        self._tell(vm, "starting", {"why": why, "attempt": (vm.restart_status or {}).get("attempts", 0)})
        self._ours.add(vm.id)
        try:
            await self._start(vm)
        except (ApiError, OperationError) as e:
            self._refused(vm, why, e.code, e.message)
        except Exception as e:  # a bug of ours: said, and handled as a refusal that may pass
            log.exception("vm %s: the %s start failed unexpectedly", vm.id, why)
            self._refused(vm, why, None, "internal error: %s" % e)
        finally:
            self._ours.discard(vm.id)

    def _refused(self, vm: ManagedVm, why: str, code: Any, message: str) -> None:
        """A start of ours did not lead to a running VM."""
        if vm.active or vm.id in self._due or (vm.restart_status or {}).get("gave_up"):
            return  # started meanwhile, or its worker's end was judged already (_on_change)
        log.error("vm %s: the %s start failed: %s", vm.id, why, message)
        if not vm.spec.restart_policy.restarts_after(failed=True):
            return
        status = dict(vm.restart_status or {})
        if code in PERMANENT_REFUSALS:
            self._give_up(vm, status, "%s: %s (%s)" % (vm.spec.restart_policy, message, code.value))
            return
        self._ended(vm, failed=True)
