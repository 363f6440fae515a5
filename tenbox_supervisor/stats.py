"""vm.stats: what each VM uses, from psutil (CPU, memory) and its worker's device counters (daemon, root).

CPU time and RSS are read from the worker process with psutil. The
virtio devices' counters and the guest RAM touched can only be counted
inside the worker: the STATS command of the worker link asks for them.
A percentage needs two samples: the sampler keeps each worker's last one,
and a request with no recent sample for a VM waits CPU_SAMPLE_SEC once
(for all of its VMs together) for a second.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import psutil

from tenbox_supervisor import params as P
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.errors import ApiError, OperationError
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.protocol import STATS_VMS_MAX, ErrorCode, Method
from tenbox_vmm.protocol.link import CommandName, WorkerStats

log = logging.getLogger("tenboxd.stats")

STATS_WORKER_TIMEOUT_SEC = 2.0  # a worker that does not answer its STATS in time shows `error`, the rest do not wait
CPU_SAMPLE_SEC = 0.5  # the wait for a second CPU sample when a VM has no recent one
CPU_SAMPLE_MAX_AGE_SEC = 30.0  # an older sample is no base for "CPU % now"
CPU_SAMPLE_MIN_AGE_SEC = 0.2  # nor a younger one: too few clock ticks in between


class StatsVms(Protocol):
    """What vm.stats needs of the WorkerManager."""

    def all(self) -> List[ManagedVm]:
        ...

    def find(self, key: str) -> Optional[ManagedVm]:
        ...

    async def command(self, vm: ManagedVm, name: CommandName, args: Dict[str, Any],
                      timeout: float = ...) -> Dict[str, Any]:
        ...


def worker_usage(pid: int) -> Optional[Tuple[float, int]]:
    """(CPU seconds, user and system, of every thread; RSS bytes) of a worker, or None if it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return t.user + t.system, p.memory_info().rss
    except psutil.Error:
        return None


class CpuSampler:
    """Each worker's last CPU sample (pid, CPU seconds, monotonic time), and percentages since it."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last: Dict[str, Tuple[int, float, float]] = {}

    def has_base(self, vm_id: str, pid: int) -> bool:
        last = self._last.get(vm_id)
        return last is not None and last[0] == pid and \
            CPU_SAMPLE_MIN_AGE_SEC <= self.clock() - last[2] <= CPU_SAMPLE_MAX_AGE_SEC

    def sample(self, vm_id: str, pid: int, cpu_seconds: float) -> Optional[float]:
        """Record a sample; the CPU % (100 = one core busy) since the previous one if that is a base."""
        now = self.clock()
        percent = None
        if self.has_base(vm_id, pid):
            _, cpu, at = self._last[vm_id]
            percent = max(0.0, (cpu_seconds - cpu) / (now - at) * 100.0)
        self._last[vm_id] = (pid, cpu_seconds, now)
        return percent

    def forget_except(self, vm_ids) -> None:
        for vm_id in set(self._last) - set(vm_ids):
            del self._last[vm_id]


def _disk_entries(vm: ManagedVm, ws: Optional[WorkerStats]) -> List[Dict[str, Any]]:
    out = []
    for i, disk in enumerate(vm.spec.disks):
        path = disk.get("path") if isinstance(disk, dict) else str(disk)
        entry: Dict[str, Any] = {"index": i, "path": path}
        if ws is not None and i < len(ws.disks):
            entry.update(ws.disks[i].to_wire())
        out.append(entry)
    return out


class StatsMethods:
    def __init__(self, vms: StatsVms, clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.vms = vms
        self.cpu = CpuSampler(clock)
        self.wall = wall

    def method_specs(self) -> List[MethodSpec]:
        return [MethodSpec(Method.VM_STATS, self.vm_stats, mutating=False)]

    def _chosen(self, params: P.Params) -> List[ManagedVm]:
        keys = params.get("vm_ids")
        if keys is None:
            return sorted((vm for vm in self.vms.all() if vm.active), key=lambda v: (v.spec.name, v.id))
        if not isinstance(keys, list) or len(keys) > STATS_VMS_MAX:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "vm_ids: give a list of at most %d VM names or ids"
                           % STATS_VMS_MAX)
        out: List[ManagedVm] = []
        for key in keys:
            name = P.name({"vm_id": key}, "vm_id", required=True)
            vm = self.vms.find(name)
            if vm is None:
                raise ApiError(ErrorCode.VM_NOT_FOUND, "no VM with id or name %r" % name)
            if vm not in out:
                out.append(vm)
        return out

    async def vm_stats(self, params, caller: Caller):
        return {"vms": await self.collect(self._chosen(params), cpu_percent=True)}

    async def collect(self, vms: List[ManagedVm], cpu_percent: bool) -> List[Dict[str, Any]]:
        """One entry per VM; counters are null for a VM that is not running or whose worker did not answer."""
        running = [vm for vm in vms if vm.active and vm.pid is not None]
        replies = await asyncio.gather(*(self._worker_stats(vm) for vm in running))
        worker: Dict[str, Tuple[Optional[WorkerStats], Optional[str]]] = {
            vm.id: reply for vm, reply in zip(running, replies)}
        if cpu_percent:
            missing = [vm for vm in running if not self.cpu.has_base(vm.id, vm.pid)]
            for vm in missing:
                usage = worker_usage(vm.pid)
                if usage is not None:
                    self.cpu.sample(vm.id, vm.pid, usage[0])
            if missing:
                await asyncio.sleep(CPU_SAMPLE_SEC)
            self.cpu.forget_except(vm.id for vm in self.vms.all() if vm.active)
        now = self.wall()
        out = []
        for vm in vms:
            ws, error = worker.get(vm.id, (None, None))
            pid = vm.pid if vm.active else None
            usage = worker_usage(pid) if pid is not None else None
            entry: Dict[str, Any] = {
                "id": vm.id, "name": vm.spec.name, "state": vm.state.value, "pid": pid,
                "uptime_sec": vm.uptime(now), "cpu_seconds": None, "cpu_percent": None,
                "memory": None, "disks": _disk_entries(vm, ws), "net": None,
            }
            if usage is not None:
                cpu_seconds, rss = usage
                entry["cpu_seconds"] = cpu_seconds
                if cpu_percent:
                    entry["cpu_percent"] = self.cpu.sample(vm.id, pid, cpu_seconds)
                entry["memory"] = {"rss_bytes": rss, "rss_outside_guest_bytes": None,
                                   "guest_ram_bytes": vm.spec.memory_mb << 20, "guest_ram_touched_bytes": None}
            if ws is not None:
                if entry["memory"] is not None:
                    touched = ws.guest_ram_touched_bytes
                    entry["memory"].update(guest_ram_bytes=ws.guest_ram_bytes, guest_ram_touched_bytes=touched,
                                           rss_outside_guest_bytes=max(0, entry["memory"]["rss_bytes"] - touched))
                entry["net"] = ws.net.to_wire() if ws.net is not None else None
            if error:
                entry["error"] = error
            out.append(entry)
        return out

    async def _worker_stats(self, vm: ManagedVm) -> Tuple[Optional[WorkerStats], Optional[str]]:
        try:
            reply = await self.vms.command(vm, CommandName.STATS, {}, timeout=STATS_WORKER_TIMEOUT_SEC)
            return WorkerStats.from_wire(reply), None
        except OperationError as e:
            return None, e.message
        except ValueError as e:  # a reply that does not parse: the worker's fault, shown, not fatal
            log.warning("vm %s: bad stats reply: %s", vm.id, e)
            return None, "bad stats reply from the worker"
