"""The vm.disk.* methods: list a VM's disks, add a new qcow2, grow a disk (live through its worker) (daemon, root).

Image work runs in the image tool's child process, never in the daemon:
with the daemon's rights for the VM's own disks (in its folder), with the
rights of the user who named the disk otherwise (as vm.start opens it).
A running VM's disk is grown by its worker, which holds the disk open and
locked: the guest gets a configuration interrupt and sees the new size.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from tenbox_supervisor import params as P
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.caller_files import Credentials
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.events import EventSink
from tenbox_supervisor.imagetool_child import run_imagetool
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.modes import PRIVATE_FILE_MODE
from tenbox_supervisor.protocol import ErrorCode, EventKind, Method
from tenbox_supervisor.spec import SpecError, VmSpec
from tenbox_supervisor.worker_manager import WorkerManager
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.imagetool import parse_new_size, parse_size
from tenbox_vmm.protocol.link import CommandName

log = logging.getLogger("tenboxd.disks")

ADDED_DISK = "disk-%d.qcow2"  # vm.disk.add's files in the VM folder: disk-1.qcow2, disk-2.qcow2, ...
SIZE_TEXT_MAX = 32  # characters of a size parameter ("10G", "+5G")
DISK_KEY_MAX = 4096  # characters of a disk parameter (an index, a file name or a path)
GROW_TIMEOUT_SEC = 60.0  # a worker growing a qcow2 writes and syncs a new L1 table: seconds at most


def _size_text(params: P.Params) -> str:
    text = P.get(params, "size", str, required=True)
    if len(text) > SIZE_TEXT_MAX:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "size: at most %d characters" % SIZE_TEXT_MAX)
    return text


def find_disk(spec: VmSpec, key: str) -> int:
    """The index of the disk `key` names: its index, its path, or its file name if only one disk has it."""
    disks = spec.disks
    if key.isdigit() and int(key) < len(disks):
        return int(key)
    for i, d in enumerate(disks):
        if d["path"] == key:
            return i
    same = [i for i, d in enumerate(disks) if os.path.basename(d["path"]) == key]
    if len(same) == 1:
        return same[0]
    if len(same) > 1:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "VM %s has %d disks named %s: give the index or the path"
                       % (spec.name, len(same), key))
    shown = key if key.isprintable() and len(key) <= 256 else "(the disk given)"
    raise ApiError(ErrorCode.DISK_NOT_FOUND, "VM %s has no disk %s (its disks: %s)"
                   % (spec.name, shown, ", ".join("%d %s" % (i, os.path.basename(d["path"]))
                                                 for i, d in enumerate(disks)) or "none"))


class DiskMethods:
    def __init__(self, workers: WorkerManager, find, events: Optional[EventSink] = None) -> None:
        """`find(params)`: the VM a request names (VmMethods.find: vm_not_found, vm_broken)."""
        self.workers = workers
        self.find = find
        self.events = events

    def _tell(self, kind: EventKind, vm: ManagedVm, index: int, path: str, **fields: Any) -> None:
        if self.events is not None:  # the file's name only: whoever follows events may not see the host's paths
            self.events.emit(kind, vm_id=vm.id, name=vm.spec.name, index=index, disk=os.path.basename(path), **fields)

    def method_specs(self) -> List[MethodSpec]:
        return [
            MethodSpec(Method.VM_DISK_LIST, self.vm_disk_list, mutating=False),
            MethodSpec(Method.VM_DISK_ADD, self.vm_disk_add, mutating=True),
            MethodSpec(Method.VM_DISK_RESIZE, self.vm_disk_resize, mutating=True),
        ]

    def _as(self, vm: ManagedVm, disk: Dict[str, Any]) -> Optional[List[str]]:
        """The image tool's prefix for `disk`: None (the daemon's rights) or setpriv to the user who named it."""
        if disk.get("owned"):
            return None
        uid = vm.spec.named_by.get(disk["path"])
        if uid is None:
            return None
        try:
            return Credentials.of_uid(uid).setpriv_argv()
        except KeyError:
            raise ApiError(ErrorCode.PERMISSION_DENIED, "disk %s was named by uid %d, which is no longer a user"
                           % (disk["path"], uid)) from None

    async def vm_disk_list(self, params, caller: Caller):
        vm = self.find(params)
        out = []
        for i, d in enumerate(vm.spec.disks):
            entry = {"index": i, "name": os.path.basename(d["path"]), "path": d["path"], "format": d.get("format"),
                     "read_only": bool(d.get("read_only")), "serial": d.get("serial", ""),
                     "owned": bool(d.get("owned")), "size_bytes": None, "file_bytes": None, "error": None}
            try:
                info = await run_imagetool("info", d["path"], as_user=self._as(vm, d))
                entry.update(size_bytes=info.get("virtual_size"), file_bytes=info.get("actual_size"))
            except ApiError as e:  # a disk gone or unreadable: listed with the reason, the others still shown
                entry["error"] = e.message
            out.append(entry)
        return {"vm_id": vm.id, "disks": out}

    async def vm_disk_add(self, params, caller: Caller):
        vm = self.find(params)
        text = _size_text(params)
        try:
            size = parse_size(text)
        except ValueError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "size: %s" % e) from None
        async with vm.lock:
            if vm.active:
                raise ApiError(ErrorCode.VM_RUNNING, "stop VM %s before adding a disk" % vm.id)
            s = vm.spec
            if len(s.disks) >= Limits.DISKS_MAX:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "VM %s has %d disks, the most a VM may have"
                               % (vm.id, len(s.disks)))
            folder = self.workers.vm_dir(vm.id)
            taken = {d["path"] for d in s.disks}
            n = 1
            while os.path.join(folder, ADDED_DISK % n) in taken or os.path.lexists(os.path.join(folder, ADDED_DISK % n)):
                n += 1
            path = os.path.join(folder, ADDED_DISK % n)
            await run_imagetool("create", path, "--size", str(size), "--format", "qcow2")
            try:
                os.chmod(path, PRIVATE_FILE_MODE)
                disk = {"path": path, "read_only": False, "serial": "", "owned": True, "format": "qcow2",
                        "backing": []}
                self.workers.update_spec(vm, VmSpec.from_json(dict(s.to_json(), disks=s.disks + [disk])))
            except (OSError, SpecError) as e:
                os.unlink(path)
                raise ApiError(ErrorCode.STORE_FAILED, "cannot store the VM: %s" % (getattr(e, "strerror", None) or e))
        log.info("vm %s: added disk %s (%d bytes)", vm.id, path, size)
        self._tell(EventKind.VM_DISK_ADDED, vm, len(s.disks), path, size_bytes=size)
        return {"vm_id": vm.id, "index": len(s.disks), "path": path, "size_bytes": size}

    async def vm_disk_resize(self, params, caller: Caller):
        vm = self.find(params)
        key = P.get(params, "disk", str, required=True)
        if len(key) > DISK_KEY_MAX:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "disk: at most %d characters" % DISK_KEY_MAX)
        text = _size_text(params)
        try:
            parse_new_size(text, 0)  # the grammar now; whether it shrinks the disk, below
        except ValueError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "size: %s" % e) from None
        async with vm.lock:
            index = find_disk(vm.spec, key)
            disk = vm.spec.disks[index]
            if disk.get("read_only"):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "disk %s of VM %s is read-only: it cannot grow"
                               % (disk["path"], vm.id))
            if vm.active:
                reply = await self.workers.command(vm, CommandName.DISK_GROW, {"index": index, "size": text},
                                                   timeout=GROW_TIMEOUT_SEC)
                size = reply.get("size")
                live = True
            else:
                info = await run_imagetool("resize", disk["path"], "--size", text,
                                           *(["--format", disk["format"]] if disk.get("format") else []),
                                           as_user=self._as(vm, disk))
                size = info.get("virtual_size")
                live = False
        log.info("vm %s: disk %s grown to %s bytes%s", vm.id, disk["path"], size, " (live)" if live else "")
        self._tell(EventKind.VM_DISK_RESIZED, vm, index, disk["path"], size_bytes=size, live=live)
        return {"vm_id": vm.id, "index": index, "path": disk["path"], "size_bytes": size, "live": live}
