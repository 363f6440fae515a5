"""The vm.snapshot*, vm.restore and vm.clone methods: a VM's state and disks frozen, put back, multiplied (daemon, root).

A snapshot is the machine (the worker's `snapshot` command: vCPUs, devices,
RAM) and a disk layer, taken together: the worker writes RAM to its staging
folder while the guest runs, then, with the guest paused for the last
pages, the machine state, and moves each of the VM's own qcow2 disks onto a
new overlay that tenboxd made on it, then the guest runs on. The image the
disk had becomes the snapshot's read-only layer. A restore or a clone gives each layered disk a new overlay on the layer and
starts a worker with `--restore` (RAM mapped MAP_PRIVATE from the snapshot
file, shared by every clone until written). Files and their order:
snapshots.py. The records and the folder layout: docs/daemon.md, Snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Dict, List, Optional, Protocol, Set, Tuple

from tenbox_supervisor import params as P, snapshots
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.errors import ApiError, CommandTimeout, OperationError
from tenbox_supervisor.events import EventSink
from tenbox_supervisor.imagetool_child import run_imagetool
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.modes import PRIVATE_FILE_MODE
from tenbox_supervisor.protocol import ErrorCode, EventKind, Method
from tenbox_supervisor.snapshots import SnapshotRecord
from tenbox_supervisor.spec import SEED_KEY, SpecError, VmSpec, new_mac
from tenbox_supervisor.vm_api import StartGate, VmFolders, build_seed, new_provision
from tenbox_supervisor.worker_manager import WorkerManager
from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.forwards import ForwardSpecError, parse_hostfwd
from tenbox_vmm.protocol.link import CommandName

log = logging.getLogger("tenboxd.snapshots")

CLONES_MAX = 64  # VMs one vm.clone makes
# A worker writes RAM at disk speed while its guest is paused; 256 MiB took 0.1 s here. The
# bound allows a slow disk (32 MiB/s) with a minute to spare.
SNAPSHOT_TIMEOUT_BASE_SEC = 60.0
SNAPSHOT_WRITE_MIB_PER_SEC = 32
MACHINE_KEYS = ("memory_mb", "cpus", "kernel", "initrd", "cmdline", "net", "image")


def _store_error(e: Exception) -> ApiError:
    return ApiError(ErrorCode.STORE_FAILED, "cannot store the snapshot: %s" % (getattr(e, "strerror", None) or e))


def layered_disks(spec: VmSpec) -> List[int]:
    """The indexes of the disks a snapshot layers: every writable one, which must be the VM's own qcow2.

    SNAPSHOT_UNSUPPORTED for a writable disk tenboxd did not make (its file is the caller's: a
    layer cannot be made of it) or that is raw: its contents would not match the snapshot.
    """
    out = []
    for i, d in enumerate(spec.disks):
        if d.get("read_only"):
            continue
        if not d.get("owned") or d.get("format") != "qcow2":
            raise ApiError(ErrorCode.SNAPSHOT_UNSUPPORTED,
                           "disk %d (%s) of VM %s is a writable %s disk tenboxd did not make: a snapshot cannot "
                           "freeze it; make it read-only or remove it (vm edit)"
                           % (i, d["path"], spec.name, d.get("format") or "unprobed"))
        out.append(i)
    return out


def record_view(rec: SnapshotRecord, vm: Optional[ManagedVm] = None) -> Dict[str, Any]:
    m = rec.machine
    return {"name": rec.name, "vm_id": rec.vm_id, "vm_name": vm.spec.name if vm is not None else None,
            "created_at": rec.created_at, "running": rec.running, "file_bytes": rec.file_bytes,
            "paused_ms": rec.paused_ms, "memory_mb": m.get("memory_mb"), "cpus": m.get("cpus"),
            "layers": rec.layers()}


class VmAccess(Protocol):
    """What these methods need of the vm.* methods (VmMethods)."""

    def find(self, params: P.Params) -> ManagedVm:
        """The VM a request names; ApiError vm_not_found or vm_broken."""

    async def start_vm(self, vm: ManagedVm, restore: Optional[str] = None) -> None:
        """vm.start's whole path; ApiError if the VM does not run."""

    def view(self, vm: ManagedVm) -> Dict[str, Any]:
        """The VM as vm.list shows it."""


class SnapshotMethods:
    def __init__(self, workers: WorkerManager, vms: VmAccess, folders: VmFolders, gate: StartGate,
                 events: Optional[EventSink] = None) -> None:
        self.workers = workers
        self.vms = vms
        self.folders = folders
        self.gate = gate
        self.events = events

    def method_specs(self) -> List[MethodSpec]:
        return [
            MethodSpec(Method.VM_SNAPSHOT, self.vm_snapshot, mutating=True),
            MethodSpec(Method.VM_SNAPSHOT_LIST, self.vm_snapshot_list, mutating=False),
            MethodSpec(Method.VM_SNAPSHOT_REMOVE, self.vm_snapshot_remove, mutating=True),
            MethodSpec(Method.VM_RESTORE, self.vm_restore, mutating=True),
            MethodSpec(Method.VM_CLONE, self.vm_clone, mutating=True),
        ]

    def _tell(self, vm: ManagedVm, snapshot: str, action: str, **details: Any) -> None:
        if self.events is not None:
            self.events.emit(EventKind.VM_SNAPSHOT, vm_id=vm.id, name=vm.spec.name, snapshot=snapshot,
                             action=action, **details)

    # Lookups ------------------------------------------------------------------------------------

    def _record(self, vm: ManagedVm, name: str) -> SnapshotRecord:
        try:
            return snapshots.read_record(self.workers.vm_dir(vm.id), name)
        except FileNotFoundError:
            raise ApiError(ErrorCode.SNAPSHOT_NOT_FOUND, "VM %s has no snapshot %s (vm snapshot ls %s lists them)"
                           % (vm.spec.name, name, vm.spec.name)) from None
        except (OSError, snapshots.RecordError) as e:
            raise ApiError(ErrorCode.SNAPSHOT_NOT_FOUND, "snapshot %s of VM %s is unreadable: %s"
                           % (name, vm.spec.name, getattr(e, "strerror", None) or e)) from None

    def _free_name(self, vm: ManagedVm) -> str:
        taken = {r.name for r in snapshots.list_records(self.workers.vm_dir(vm.id))}
        n = len(taken) + 1
        while "snap-%d" % n in taken:
            n += 1
        return "snap-%d" % n

    def _find_snapshot(self, params: P.Params) -> Tuple[ManagedVm, SnapshotRecord]:
        """vm.clone's `snapshot`: "VM/NAME", or NAME with `vm_id`, or a NAME only one VM has."""
        text = P.get(params, "snapshot", str, required=True)
        vm_key, _, name = text.rpartition("/")
        if vm_key:
            params = dict(params, vm_id=vm_key)
        if not snapshots.NAME_RE.match(name):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "snapshot must be NAME or VM/NAME, NAME matching "
                                                        "[A-Za-z0-9-]{1,64}")
        if params.get("vm_id") is not None:
            vm = self.vms.find(params)
            return vm, self._record(vm, name)
        found = []
        for vm in self.workers.all():
            if os.path.exists(snapshots.record_path(self.workers.vm_dir(vm.id), name)):
                found.append(vm)
        if not found:
            raise ApiError(ErrorCode.SNAPSHOT_NOT_FOUND, "no VM has a snapshot %s (vm snapshot ls VM lists them)" % name)
        if len(found) > 1:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "VMs %s each have a snapshot %s: give VM/%s"
                           % (", ".join(sorted(v.spec.name for v in found)), name, name))
        return found[0], self._record(found[0], name)

    # vm.snapshot ---------------------------------------------------------------------------------

    async def vm_snapshot(self, params, caller: Caller):
        vm = self.vms.find(params)
        name = P.name(params, "name")
        async with vm.lock:
            vm_dir = self.workers.vm_dir(vm.id)
            name = name or self._free_name(vm)
            if os.path.lexists(snapshots.record_path(vm_dir, name)):
                raise ApiError(ErrorCode.SNAPSHOT_EXISTS, "VM %s already has a snapshot %s" % (vm.spec.name, name))
            if len(snapshots.list_records(vm_dir)) >= snapshots.SNAPSHOTS_PER_VM_MAX:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "VM %s has %d snapshots, the most it may have; remove one "
                               "first" % (vm.spec.name, snapshots.SNAPSHOTS_PER_VM_MAX))
            layered = layered_disks(vm.spec)
            if vm.active and vm.state is not VmState.RUNNING:
                raise ApiError(ErrorCode.VM_BUSY, "VM %s is %s; snapshot it once it runs or has stopped"
                               % (vm.spec.name, vm.state.value))
            timed_out = False
            try:
                if vm.active:
                    rec = await self._snapshot_running(vm, vm_dir, name, layered)
                else:
                    rec = await self._snapshot_stopped(vm, vm_dir, name, layered)
            except _WorkerSilent as e:
                timed_out, message = True, str(e)
        if timed_out:
            # It may have moved its disks onto overlays we are about to forget: a hard stop
            # leaves them as the spec says (the images it had, synced before the move).
            with contextlib.suppress(OperationError):
                await self.workers.stop(vm, "vm.snapshot: the worker did not answer")
            raise ApiError(ErrorCode.SNAPSHOT_FAILED, message)
        log.info("vm %s: snapshot %s taken (%s, %d bytes, guest paused %.0f ms)", vm.id, name,
                 "running" if rec.running else "stopped", rec.file_bytes, rec.paused_ms)
        self._tell(vm, name, "taken", running=rec.running, paused_ms=rec.paused_ms)
        return record_view(rec, vm)

    def _machine(self, spec: VmSpec, layered: List[int]) -> Dict[str, Any]:
        m = {k: getattr(spec, k) for k in MACHINE_KEYS}
        m["disks"] = [dict(d, layer=True) if i in layered else dict(d) for i, d in enumerate(spec.disks)]
        return m

    async def _new_overlay(self, backing: str, out: str, in_use: bool = False) -> None:
        """A qcow2 overlay at `out` on `backing`; `in_use`: a running worker holds `backing` locked."""
        try:
            await run_imagetool("overlay", "--backing", backing, "--out", out, *(["--in-use"] if in_use else []))
        except ApiError as e:
            raise ApiError(ErrorCode.SNAPSHOT_FAILED, "cannot make an overlay of %s: %s" % (backing, e.message))

    def _layered_spec(self, spec: VmSpec, new_paths: Dict[int, str]) -> VmSpec:
        disks = []
        for i, d in enumerate(spec.disks):
            if i in new_paths:
                d = dict(d, path=new_paths[i], backing=[d["path"]] + list(d.get("backing") or []))
            disks.append(d)
        return VmSpec.from_json(dict(spec.to_json(), disks=disks))

    def _commit(self, vm: ManagedVm, vm_dir: str, rec: SnapshotRecord, new_paths: Dict[int, str]) -> None:
        """The VM on its new overlays (vm.json), then the record: the snapshot exists once both are stored."""
        old = vm.spec
        try:
            self.workers.update_spec(vm, self._layered_spec(old, new_paths))
            snapshots.write_record(vm_dir, rec)
        except (OSError, SpecError) as e:
            raise _store_error(e)
        for i in new_paths:
            with contextlib.suppress(OSError):
                os.chmod(old.disks[i]["path"], snapshots.LAYER_MODE)

    async def _snapshot_stopped(self, vm: ManagedVm, vm_dir: str, name: str, layered: List[int]) -> SnapshotRecord:
        new_paths: Dict[int, str] = {}
        fresh: Dict[int, str] = {}
        try:
            for i in layered:
                path = os.path.join(vm_dir, snapshots.new_overlay_name(i) + ".qcow2")
                await self._new_overlay(vm.spec.disks[i]["path"], path)
                new_paths[i] = path
                os.chmod(path, PRIVATE_FILE_MODE)
            fresh = _keep_fresh(vm_dir, name, new_paths)
            rec = SnapshotRecord(name, vm.id, self.workers.host.time(), False, None, 0, 0.0,
                                 self._machine(vm.spec, layered))
            self._commit(vm, vm_dir, rec, new_paths)
        except BaseException:
            _unlink_all(list(new_paths.values()) + list(fresh.values()))
            raise
        _publish_fresh(vm_dir, name, fresh)
        return rec

    async def _snapshot_running(self, vm: ManagedVm, vm_dir: str, name: str, layered: List[int]) -> SnapshotRecord:
        try:
            staging = snapshots.prepare_staging(vm_dir)
        except OSError as e:
            raise ApiError(ErrorCode.SNAPSHOT_FAILED, "cannot prepare the staging folder: %s" % e.strerror) from None
        made: Dict[int, int] = {}  # disk index -> a descriptor of the overlay made for it, held to the end
        try:
            return await self._snapshot_worker(vm, vm_dir, staging, name, layered, made)
        finally:
            for fd in made.values():
                os.close(fd)

    async def _snapshot_worker(self, vm: ManagedVm, vm_dir: str, staging: str, name: str, layered: List[int],
                               made: Dict[int, int]) -> SnapshotRecord:
        overlays: List[Optional[str]] = [None] * len(vm.spec.disks)
        fresh: Dict[int, str] = {}
        try:
            for i in layered:
                overlays[i] = snapshots.new_overlay_name(i)
                path = os.path.join(staging, overlays[i])
                await self._new_overlay(vm.spec.disks[i]["path"], path, in_use=True)
                fresh.update(_keep_fresh(vm_dir, name, {i: path}))  # before the worker writes it
                made[i] = snapshots.hand_to_worker(path)
            rec = await self._snapshot_handed(vm, vm_dir, name, layered, overlays, made)
        except BaseException:
            _unlink_all(list(fresh.values()))
            raise
        _publish_fresh(vm_dir, name, fresh)
        return rec

    async def _snapshot_handed(self, vm: ManagedVm, vm_dir: str, name: str, layered: List[int],
                               overlays: List[Optional[str]], made: Dict[int, int]) -> SnapshotRecord:
        timeout = SNAPSHOT_TIMEOUT_BASE_SEC + vm.spec.memory_mb / SNAPSHOT_WRITE_MIB_PER_SEC
        try:
            reply = await self.workers.command(vm, CommandName.SNAPSHOT, {"name": name, "overlays": overlays},
                                               timeout=timeout)
        except CommandTimeout:
            raise _WorkerSilent("VM %s's worker did not finish the snapshot within %.0f s; the VM was stopped"
                                % (vm.spec.name, timeout)) from None
        except OperationError as e:
            with contextlib.suppress(OSError):
                snapshots.prepare_staging(vm_dir)
            # A refusal, or a worker that ended on the way: the VM's disks are the images it had (a
            # worker that died after moving its disks lost only what it wrote since, as in a crash).
            code = ErrorCode.SNAPSHOT_FAILED if e.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.VM_NOT_RUNNING) \
                else e.code
            raise ApiError(code, e.message) from None
        # The guest runs on its new overlays from here: nothing below may lose them.
        new_paths: Dict[int, str] = {}
        try:
            os.makedirs(snapshots.snapshots_dir(vm_dir), mode=0o700, exist_ok=True)
            size = snapshots.take_from_staging(vm_dir, name + snapshots.MEMORY_SUFFIX,
                                               snapshots.memory_path(vm_dir, name))
            for i in layered:
                dest = os.path.join(vm_dir, overlays[i] + ".qcow2")
                snapshots.take_from_staging(vm_dir, overlays[i], dest, made[i])
                new_paths[i] = dest
        except (OSError, ValueError) as e:
            # The overlays the worker writes must not be lost: stop it, and keep the VM on its images
            # (the overlays moved already are nobody's then).
            _unlink_all(list(new_paths.values()))
            raise _WorkerSilent("cannot move the snapshot of VM %s into place: %s"
                                % (vm.spec.name, getattr(e, "strerror", None) or e)) from None
        rec = SnapshotRecord(name, vm.id, self.workers.host.time(), True, name + snapshots.MEMORY_SUFFIX, size,
                             float(reply.get("paused_ms") or 0.0), self._machine(vm.spec, layered))
        self._commit(vm, vm_dir, rec, new_paths)
        return rec

    # vm.snapshot.list, vm.snapshot.remove ---------------------------------------------------------

    async def vm_snapshot_list(self, params, caller: Caller):
        vm = self.vms.find(params)
        return {"vm_id": vm.id, "snapshots": [record_view(r, vm) for r in
                                              snapshots.list_records(self.workers.vm_dir(vm.id))]}

    async def vm_snapshot_remove(self, params, caller: Caller):
        vm = self.vms.find(params)
        name = P.name(params, "name", required=True)
        async with vm.lock:
            vm_dir = self.workers.vm_dir(vm.id)
            rec = self._record(vm, name)
            try:
                snapshots.remove_record(vm_dir, name)
            except OSError as e:
                raise _store_error(e)
            gone = snapshots.remove_unreferenced(rec.layers(), self._referenced())
        log.info("vm %s: snapshot %s removed (%d layer file(s) no longer used deleted)", vm.id, name, len(gone))
        self._tell(vm, name, "removed")
        return {"vm_id": vm.id, "name": name, "removed": True, "files_removed": gone}

    def _referenced(self) -> Set[str]:
        vms = self.workers.all()
        return snapshots.referenced_paths([v.spec for v in vms], [self.workers.vm_dir(v.id) for v in vms])

    # vm.restore -------------------------------------------------------------------------------------

    async def vm_restore(self, params, caller: Caller):
        vm = self.vms.find(params)
        name = P.name(params, "name", required=True)
        rec = self._record(vm, name)
        if vm.active:
            await self.workers.stop(vm, "vm.restore %s by %s" % (name, caller))
        async with vm.lock:
            if vm.active:
                raise ApiError(ErrorCode.VM_BUSY, "VM %s started again meanwhile" % vm.spec.name)
            vm_dir = self.workers.vm_dir(vm.id)
            rec = self._record(vm, name)  # again, under the lock
            # The overlays the VM runs on now go (their state is what the restore discards); a disk
            # added since the snapshot is not an overlay on a layer: it is detached, its file kept.
            layers = {p for r in snapshots.list_records(vm_dir) for p in r.layers()}
            old_own = [d["path"] for d in vm.spec.disks if d.get("owned") and (d.get("backing") or [None])[0] in layers]
            detached = [d["path"] for d in vm.spec.disks if d.get("owned") and d["path"] not in old_own
                        and not any(d["path"] == x["path"] for x in rec.machine["disks"])]
            disks, new = await self._overlays_on(rec, vm_dir)
            machine = {k: v for k, v in rec.machine.items() if k in MACHINE_KEYS}
            try:
                self.workers.update_spec(vm, VmSpec.from_json(dict(vm.spec.to_json(), disks=disks, **machine)))
            except (OSError, SpecError) as e:
                _unlink_all(new)
                raise _store_error(e)
            snapshots.remove_unreferenced(old_own, self._referenced())
        log.info("vm %s: restored to snapshot %s", vm.id, name)
        self._tell(vm, name, "restored")
        if rec.memory_file:
            await self.vms.start_vm(vm, restore=snapshots.memory_path(vm_dir, name))
        return dict(self.vms.view(vm), restored=name, detached=detached)

    async def _overlays_on(self, rec: SnapshotRecord, folder: str,
                           like: Optional[List[Dict[str, Any]]] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
        """The snapshot's disks for a VM in `folder`: a new overlay on each layer, the others as they were;
        and the new overlays' paths. Each new overlay is a copy of the snapshot's fresh overlay
        (snapshots.fresh_overlay_path) or, without one, of `like`'s (another clone's disks, made just
        before), or the image tool's: the same backing file, the same size, the same bytes."""
        disks: List[Dict[str, Any]] = []
        new: List[str] = []
        try:
            for i, d in enumerate(rec.machine["disks"]):
                entry = {k: v for k, v in d.items() if k != "layer"}
                if d.get("layer"):
                    path = os.path.join(folder, snapshots.new_overlay_name(len(disks)) + ".qcow2")
                    kept = snapshots.fresh_overlay_path(self.workers.vm_dir(rec.vm_id), rec.name, i)
                    copy_of = like[i]["path"] if like is not None else kept if os.path.exists(kept) else None
                    new.append(path)
                    if copy_of is None:  # an older snapshot, or its copy failed
                        await self._new_overlay(d["path"], path)
                        os.chmod(path, PRIVATE_FILE_MODE)
                    else:
                        _copy_new(copy_of, path)
                    entry = dict(entry, path=path, backing=[d["path"]] + list(d.get("backing") or []), owned=True)
                disks.append(entry)
        except BaseException:
            _unlink_all(new)
            raise
        return disks, new

    # vm.clone ---------------------------------------------------------------------------------------

    async def vm_clone(self, params, caller: Caller):
        source, rec = self._find_snapshot(params)
        base = P.name(params, "name", required=True)
        count = P.integer(params, "count", 1, CLONES_MAX, default=1)
        keep_hostfwds = not P.get(params, "no_hostfwds", bool, default=False)
        names = [base] if count == 1 else ["%s-%d" % (base, n) for n in range(1, count + 1)]
        for n in names:
            if not snapshots.NAME_RE.match(n):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "clone name %s is longer than 64 characters" % n)
        net = dict(rec.machine.get("net") or {})
        hostfwds = list(net.get("hostfwds") or []) if keep_hostfwds else []
        self._check_forwards(hostfwds, count)
        self.gate.check_start_allowed()
        memory = snapshots.memory_path(self.workers.vm_dir(source.id), rec.name) if rec.memory_file else None
        with contextlib.ExitStack() as claims:
            for n in names:
                claims.enter_context(self.workers.claim_name(n))
            # The first clone's overlays are made by the image tool, the others' are copies of them; all or none
            # are kept.
            clone_net = dict(net, hostfwds=hostfwds)
            outcome: List[Any] = [await _outcome(self._make_clone(source, rec, names[0], clone_net))]
            if isinstance(outcome[0], ManagedVm):
                like = outcome[0].spec.disks
                outcome += [await _outcome(self._make_clone(source, rec, n, clone_net, like)) for n in names[1:]]
        made = [vm for vm in outcome if isinstance(vm, ManagedVm)]
        failed = [e for e in outcome if isinstance(e, BaseException)]
        if failed:
            for vm in made:
                with contextlib.suppress(OSError):
                    self.workers.delete(vm)
                if self.events is not None:
                    self.events.emit(EventKind.VM_DELETED, vm_id=vm.id, name=vm.spec.name)
            raise failed[0]
        started = time.monotonic()
        results = await asyncio.gather(*(self.vms.start_vm(vm, restore=memory) for vm in made),
                                       return_exceptions=True)
        elapsed = time.monotonic() - started
        out = []
        for vm, res in zip(made, results):
            entry = self.vms.view(vm)
            if isinstance(res, BaseException):
                if not isinstance(res, (ApiError, OperationError)):
                    raise res
                entry["error"] = "%s (%s)" % (res.message, res.code.value)
            out.append(entry)
        log.info("snapshot %s of vm %s: %d clone(s) made, started in %.2f s", rec.name, source.id, len(made), elapsed)
        self._tell(source, rec.name, "cloned", clones=[vm.spec.name for vm in made], start_sec=round(elapsed, 3))
        return {"snapshot": rec.name, "source": source.id, "vms": out, "start_sec": round(elapsed, 3)}

    def _check_forwards(self, hostfwds: List[str], count: int) -> None:
        """FORWARD_CONFLICT if a clone's host forward listens where another VM's does (or another clone's)."""
        if not hostfwds:
            return
        try:
            mine = {parse_hostfwd(s).key: s for s in hostfwds}
        except ForwardSpecError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(e)) from None
        if count > 1:
            raise ApiError(ErrorCode.FORWARD_CONFLICT, "%d clones cannot all listen on host forward %s; clone with "
                           "no_hostfwds (tenbox vm clone --no-hostfwds) and add forwards per clone"
                           % (count, sorted(mine.values())[0]))
        for vm in self.workers.all():
            for spec in (vm.spec.net or {}).get("hostfwds", []):
                try:
                    key = parse_hostfwd(spec).key
                except ForwardSpecError:
                    continue
                if key in mine:
                    raise ApiError(ErrorCode.FORWARD_CONFLICT, "host forward %s is VM %s's (%s); clone with no_hostfwds"
                                   " (tenbox vm clone --no-hostfwds)" % (mine[key], vm.spec.name, spec))

    async def _make_clone(self, source: ManagedVm, rec: SnapshotRecord, name: str, net: Dict[str, Any],
                          like: Optional[List[Dict[str, Any]]] = None) -> ManagedVm:
        m = rec.machine
        spec = VmSpec(id=self.workers.new_id(), name=name, kernel=m["kernel"], initrd=m.get("initrd"),
                      cmdline=m.get("cmdline"), memory_mb=m["memory_mb"], cpus=m["cpus"], image=m.get("image"),
                      net=dict(net, mac=new_mac()) if net.get("enabled") else net,
                      autostart=False, restart="no",
                      extra={"cloned_from": {"vm_id": source.id, "snapshot": rec.name}})
        # The files the source's caller named (kernel, read-only disks) keep being opened with their rights.
        spec.named_by = {p: uid for p, uid in source.spec.named_by.items()
                         if p in (m["kernel"], m.get("initrd")) or any(p == d["path"] for d in m["disks"])}
        try:
            folder = self.folders.make_folder(spec.id)
        except OSError as e:
            raise _store_error(e)
        try:
            spec.disks, _ = await self._overlays_on(rec, folder, like)
            await self._own_seed(source, spec, folder)
            vm = self.workers.create(spec)
        except (OSError, SpecError) as e:
            self.folders.delete(spec.id)
            raise _store_error(e)
        except BaseException:
            self.folders.delete(spec.id)
            raise
        if self.events is not None:
            self.events.emit(EventKind.VM_CREATED, vm_id=vm.id, name=name)
        return vm

    @staticmethod
    async def _own_seed(source: ManagedVm, spec: VmSpec, folder: str) -> None:
        """A clone of a VM with a cloud-init seed gets its own: a new instance-id, so the image's
        cloud-init provisions it as a new machine at its next boot, and its own name as host name."""
        at = next((i for i, d in enumerate(spec.disks) if d.get(SEED_KEY)), None)
        if at is None or not source.spec.cloud_init:
            return
        given = {k: v for k, v in source.spec.cloud_init.items() if k not in ("instance_id", "hostname")}
        spec.cloud_init = new_provision(given, spec.name)
        spec.disks[at] = await build_seed(folder, spec.cloud_init)


class _WorkerSilent(Exception):
    """The worker may have moved its disks without our knowing: the VM is stopped, the snapshot failed."""


def _keep_fresh(vm_dir: str, name: str, overlays: Dict[int, str]) -> Dict[int, str]:
    """Copies of new overlays nothing wrote yet, under temporary names in the snapshots folder: index -> path.
    A copy that fails is left out (its clones and restores run the image tool)."""
    os.makedirs(snapshots.snapshots_dir(vm_dir), mode=0o700, exist_ok=True)
    kept = {}
    for i, src in overlays.items():
        tmp = snapshots.fresh_overlay_path(vm_dir, name, i) + ".tmp"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a crash's leftover
            _copy_new(src, tmp)
            kept[i] = tmp
        except OSError as e:
            log.warning("snapshot %s: no fresh overlay kept for disk %d: %s", name, i, e.strerror or e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return kept


def _publish_fresh(vm_dir: str, name: str, kept: Dict[int, str]) -> None:
    """The kept copies under their names, once the snapshot's record is stored."""
    for i, tmp in kept.items():
        try:
            os.replace(tmp, snapshots.fresh_overlay_path(vm_dir, name, i))
        except OSError as e:
            log.warning("snapshot %s: no fresh overlay kept for disk %d: %s", name, i, e.strerror or e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


async def _outcome(aw: Any) -> Any:
    """What `aw` returns, or the exception it raises (a cancellation goes on)."""
    try:
        return await aw
    except Exception as e:  # noqa: BLE001 - handed back, as gather does
        return e


def _copy_new(src: str, dst: str) -> None:
    """A new file `dst` (private, durable) with `src`'s bytes; OSError if `dst` exists."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as fout:
            while True:
                chunk = fin.read(1 << 20)
                if not chunk:
                    break
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())


def _unlink_all(paths: List[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
