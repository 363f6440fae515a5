"""The vm.* methods of the control socket and the cloud link (daemon, root).

Each handler checks its parameters (params.py), then asks the
WorkerManager; it never changes a ManagedVm or the manager's tables
itself. Images come in through the narrow `ImageLookup` (the image
methods' lock and lookup), the update check through `StartGate`, the files
a request names through `CallerFiles` (opened with the caller's rights).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from typing import Any, Dict, List, Optional, Protocol, Union

from tenbox_supervisor import cloudinit, doctor, params as P, snapshots, telemetry
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.caller_files import CallerFiles, Credentials, Rights, Use
from tenbox_supervisor.errors import ApiError, OperationError
from tenbox_supervisor.events import EventSink
from tenbox_supervisor.fsutil import log_files, tail_lines
from tenbox_supervisor.imagetool_child import run_imagetool
from tenbox_supervisor.images import Image
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.modes import PRIVATE_FILE_MODE
from tenbox_supervisor.protocol import HOST_SHUTDOWN_REASON, ErrorCode, Event, EventKind, FailureCode, Method
from tenbox_supervisor.spec import OVERLAY_NAME, SpecError, VmSpec, new_mac
from tenbox_supervisor.worker_manager import SHUTDOWN_TIMEOUT_SEC, STOP_TIMEOUT_SEC, WorkerManager
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.link import CommandName

log = logging.getLogger("tenboxd.api")

DEFAULT_MEMORY_MB = 256
LINK_WAIT_SEC = 10.0  # console attach: how long a worker may take to reconnect after tenboxd restarts
LINK_POLL_SEC = 0.1


class ImageLookup(Protocol):
    """What vm.create --image needs of the image store's methods."""

    lock: asyncio.Lock  # held from the lookup until the VM is stored: image.remove waits

    def get(self, name: str) -> Image:
        """The image, or ApiError(image_not_found)."""


class StartGate(Protocol):
    def check_start_allowed(self) -> None:
        """ApiError(update_in_progress) while tenbox updates itself."""


class PendingStarts(Protocol):
    """The restart policy's waiting starts (restarter.py)."""

    def cancel(self, vm: ManagedVm) -> bool:
        """Drop the VM's waiting start; whether there was one."""

    def hold(self) -> None:
        """Start nothing more (the host is shutting down): waiting starts are dropped."""


class VmFolders(Protocol):
    """The VM store's folders, for a new VM's overlay and the log files."""

    def vm_dir(self, vm_id: str) -> str:
        ...

    def make_folder(self, vm_id: str) -> str:
        ...

    def delete(self, vm_id: str) -> None:
        ...


def _stored(e: Exception) -> ApiError:
    return ApiError(ErrorCode.STORE_FAILED, "cannot store the VM: %s" % (getattr(e, "strerror", None) or e))


def view(vm: ManagedVm, now: float) -> Dict[str, Any]:
    """A VM as vm.list and the other vm.* methods show it."""
    s = vm.spec
    pid = vm.pid
    out = {
        "id": s.id,
        "name": s.name,
        "state": vm.state.value,
        "state_reason": vm.state_reason,
        "cpus": s.cpus,
        "memory_mb": s.memory_mb,
        "kernel": s.kernel,
        "initrd": s.initrd,
        "cmdline": s.cmdline,
        "disks": s.disks,
        "net": s.net,
        "image": s.image,
        "created_at": s.created_at,
        "pid": pid,
        "started_at": vm.started_at if vm.active else None,
        "uptime_sec": vm.uptime(now),
        "last_failure": vm.last_failure,
        "autostart": s.autostart,
        "restart": s.restart,
        "restart_status": vm.restart_status,
        "net_status": vm.net_status.to_wire() if vm.net_status is not None else None,
        "cloud_init": _provision_view(s.cloud_init),
    }
    if pid is not None:
        out["resources"] = telemetry.process_resources(pid)
    return out


async def probe_disk(files: CallerFiles, key: str, path: str, who: Rights) -> Dict[str, Any]:
    """The image tool's `info` on a disk, run with the rights of whoever named it (`who`; None: the daemon's).

    With a user's rights, every file of the disk's backing chain is opened
    with them too: the tool reads the header of each qcow2 in the chain
    but only locates its last, raw, file.
    """
    try:
        info = await run_imagetool("info", path, as_user=who.setpriv_argv() if who else None)
    except ApiError as e:
        raise ApiError(e.code, "%s: %s" % (key, e.message)) from None
    if who is not None:
        chain = info.get("backing_chain") or []
        plan = [(Use("%s backing[%d]" % (key, i + 1), entry[0]), who) for i, entry in enumerate(chain)]
        (await files.open_planned(plan)).close()
    return info


async def probe_formats(files: CallerFiles, disks: Optional[List[Dict[str, Any]]], rights: Dict[str, Rights]) -> None:
    """Record each disk's format (probed now when not given), so the worker never probes a raw image.

    A raw image opened by probing could be turned into a qcow2 image by its
    guest, naming any host file as backing; declared formats rule that out
    (libvirt does the same). A declared format must match the file. The
    probe runs with the rights of whoever named the disk (`rights` by path):
    a backing chain reaching a file that user cannot read is refused.
    """
    for i, d in enumerate(disks or []):
        found = (await probe_disk(files, "disks[%d]" % i, d["path"], rights.get(d["path"])))["format"]
        if d.get("format") not in (None, found):
            # qcow2 declared on a raw file, or raw declared on a qcow2 file: the latter is allowed
            # (the guest then sees the qcow2 bytes), as QEMU allows it, but never silently.
            if d["format"] != "raw":
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "disks[%d]: %s is %s, not %s" % (i, d["path"], found, d["format"]))
        else:
            d["format"] = found


def _provision_view(stored: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What vm views show of a VM's cloud-init: never the user-data or network-config themselves
    (they may hold secrets, and every member of the tenbox group sees vm.list), only their sizes."""
    if not stored:
        return None
    user_data = stored.get("user_data_b64")
    return {"instance_id": stored.get("instance_id"), "user": stored.get("user"), "hostname": stored.get("hostname"),
            "ssh_keys": len((stored.get("ssh_keys") or "").splitlines()),
            "ssh_key_fingerprints": [cloudinit.key_fingerprint(k) for k in (stored.get("ssh_keys") or "").splitlines()],
            "user_data_bytes": len(base64.b64decode(user_data)) if user_data else 0,
            "network_config_bytes": len((stored.get("network_config") or "").encode())}


def image_has_cloud_init(manifest: Dict[str, Any]) -> bool:
    """Whether VMs of the image get a NoCloud seed even without cloud-init options: an imported cloud
    image, or a make-rootfs-debian.sh --layout cloud build."""
    return manifest.get("cloud_init") is True or manifest.get("layout") == "cloud"


def new_provision(provision: Dict[str, Optional[str]], name: str) -> Dict[str, Any]:
    """A new VM's stored cloud_init: the operator's values, a fresh instance-id, and the VM's name as
    its host name unless one was given (and the name is one)."""
    stored: Dict[str, Any] = {k: v for k, v in provision.items() if v is not None}
    stored["instance_id"] = cloudinit.new_instance_id()
    if "hostname" not in stored:
        try:
            stored["hostname"] = cloudinit.check_hostname(name)
        except cloudinit.ProvisionError:
            pass  # an all-digit name, say: the image keeps its own
    return stored


async def build_seed(folder: str, stored: Dict[str, Any]) -> Dict[str, Any]:
    """The VM's seed.iso (re)built in `folder` off the event loop; its disk entry."""
    try:
        path = await asyncio.get_running_loop().run_in_executor(None, cloudinit.seed_for, folder, stored)
    except cloudinit.ProvisionError as e:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, str(e)) from None
    except cloudinit.SeedBuildError as e:
        raise ApiError(ErrorCode.STORE_FAILED, "cannot make the cloud-init seed disk: %s" % e) from None
    return cloudinit.seed_entry(path)


def file_uses(kernel: Optional[str], initrd: Optional[str], disks: Optional[List[Dict[str, Any]]],
              template: Optional[str] = None) -> List[Use]:
    """The files a vm.create or vm.edit names, and which of them the guest writes."""
    uses = [Use(key, path) for key, path in (("kernel", kernel), ("initrd", initrd), ("template", template)) if path]
    uses += [Use("disks[%d]" % i, d["path"], write=not d.get("read_only")) for i, d in enumerate(disks or [])]
    return uses


class VmMethods:
    def __init__(self, workers: WorkerManager, folders: VmFolders, images: ImageLookup, gate: StartGate,
                 files: CallerFiles, restarts: Optional[PendingStarts] = None,
                 events: Optional[EventSink] = None) -> None:
        self.workers = workers
        self.restarts = restarts
        self.events = events
        self.folders = folders
        self.images = images
        self.gate = gate
        self.files = files

    def method_specs(self) -> List[MethodSpec]:
        return [
            MethodSpec(Method.VM_LIST, self.vm_list, mutating=False),
            MethodSpec(Method.VM_CREATE, self.vm_create, mutating=True),
            MethodSpec(Method.VM_EDIT, self.vm_edit, mutating=True),
            MethodSpec(Method.VM_START, self.vm_start, mutating=True),
            MethodSpec(Method.VM_STOP, self.vm_stop, mutating=True),
            MethodSpec(Method.VM_REBOOT, self.vm_reboot, mutating=True),
            MethodSpec(Method.VM_SHUTDOWN, self.vm_shutdown, mutating=True),
            MethodSpec(Method.VM_DELETE, self.vm_delete, mutating=True),
            MethodSpec(Method.VM_LOGS, self.vm_logs, mutating=False),
            MethodSpec(Method.VM_LOGS_FOLLOW, self.vm_logs_follow, mutating=False, stream=True),
            MethodSpec(Method.VM_CONSOLE_ATTACH, self.vm_console_attach, mutating=True, stream=True),
            MethodSpec(Method.HOST_SHUTDOWN, self.host_shutdown, mutating=True, root_only=True),
        ]

    def now(self) -> float:
        return self.workers.host.time()

    def view(self, vm: ManagedVm) -> Dict[str, Any]:
        return view(vm, self.now())

    # Lookups ------------------------------------------------------------------------------

    def find(self, params: P.Params) -> ManagedVm:
        key = P.name(params, "vm_id", required=True)
        vm = self.workers.find(key)
        if vm is None:
            broken = self.workers.broken()
            if key in broken:
                raise ApiError(ErrorCode.VM_BROKEN, "VM %s is broken: %s" % (key, broken[key]))
            raise ApiError(ErrorCode.VM_NOT_FOUND, "no VM with id or name %r" % key)
        return vm

    def find_or_broken(self, params: P.Params) -> Union[ManagedVm, str]:
        """The VM, or the id of a broken store entry (which only vm.delete may name)."""
        key = P.name(params, "vm_id", required=True)
        if key in self.workers.broken() and self.workers.get(key) is None:
            return key
        return self.find(params)

    # Methods ------------------------------------------------------------------------------

    async def vm_list(self, params, caller: Caller):
        now = self.now()
        vms = [view(vm, now) for vm in sorted(self.workers.all(), key=lambda v: (v.spec.name, v.id))]
        for vm_id, reason in sorted(self.workers.broken().items()):
            vms.append({"id": vm_id, "name": None, "state": "broken", "error": reason})
        return {"vms": vms}

    async def vm_create(self, params, caller: Caller):
        image_name = P.name(params, "image")
        if image_name is None:
            return await self._vm_create(params, caller, None)
        if params.get("template") is not None:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "give image or template, not both")
        # Held until the VM is stored: image.remove cannot slip in between.
        async with self.images.lock:
            return await self._vm_create(params, caller, self.images.get(image_name))

    async def _vm_create(self, params, caller: Caller, image: Optional[Image]):
        """vm.create; with an image, its kernel, initrd and command line are the defaults and its rootfs the template."""
        name = P.name(params, "name", required=True)
        self.gate.check_start_allowed()
        with self.workers.claim_name(name):  # held across every await below: one create per name
            return await self._vm_create_named(params, caller, image, name)

    async def _vm_create_named(self, params, caller: Caller, image: Optional[Image], name: str):
        kernel = P.file_path(params, "kernel", required=image is None)
        initrd = P.file_path(params, "initrd")
        cmdline = P.cmdline(params)
        if image is not None:
            kernel = kernel or image.kernel
            initrd = initrd or image.initrd
            if cmdline is None:
                cmdline = image.manifest.get("cmdline")
        spec = VmSpec(
            id=self.workers.new_id(),
            name=name,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            image=image.name if image is not None else None,
            memory_mb=P.memory_mb(params, telemetry.host_memory_mb(), default=DEFAULT_MEMORY_MB),
            cpus=P.cpus(params, default=1),
            disks=P.disks(params) or [],
            autostart=P.get(params, "autostart", bool, default=False),
            restart=P.restart_policy(params) or "no",
        )
        hostfwds, guestfwds = P.forwards(params, "hostfwds"), P.forwards(params, "guestfwds")
        net_on = P.net_flag(params)
        if net_on is None:
            net_on = True  # as TenBox: a VM has the network unless told otherwise
        spec.net = {"enabled": True, "mac": new_mac(), "link_up": net_on,
                    "hostfwds": hostfwds or [], "guestfwds": guestfwds or []}
        template = image.rootfs if image is not None else P.file_path(params, "template")
        if template and len(spec.disks) >= Limits.DISKS_MAX:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "no room for the template's overlay: at most %d disks"
                           % Limits.DISKS_MAX)
        provision = P.cloud_init(params)
        if provision is None and image is not None and image_has_cloud_init(image.manifest):
            provision = {}  # every VM of a cloud-init image is its own instance, named after the VM
        if provision is not None:
            if len(spec.disks) + bool(template) >= Limits.DISKS_MAX:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "no room for the cloud-init seed disk: at most %d disks"
                               % Limits.DISKS_MAX)
            spec.cloud_init = new_provision(provision, name)
        plan = self.files.plan(caller, file_uses(kernel, initrd, spec.disks, template))
        (await self.files.open_planned(plan)).close()
        spec.named_by = {use.path: rights.uid for use, rights in plan if rights is not None}
        spec.template = template or None
        await probe_formats(self.files, spec.disks, {use.path: rights for use, rights in plan})
        try:
            spec.validate()
            folder = self.folders.make_folder(spec.id)
        except (OSError, SpecError) as e:
            raise _stored(e)
        try:
            if template:
                overlay = os.path.join(folder, OVERLAY_NAME)
                try:
                    made = await run_imagetool("overlay", "--backing", template, "--out", overlay)
                except ApiError as e:
                    raise ApiError(e.code, "cannot make an overlay of %s: %s" % (template, e.message))
                os.chmod(overlay, PRIVATE_FILE_MODE)  # the guest's writes: root's only
                # Its backing files, recorded: the worker gets them open at each start (worker_files.py).
                backing = [entry[0] for entry in made.get("backing_chain") or []]
                spec.disks.insert(0, {"path": overlay, "read_only": False, "serial": "", "owned": True,
                                      "format": "qcow2", "backing": backing})
            if spec.cloud_init:
                spec.disks.append(await build_seed(folder, spec.cloud_init))
            self.gate.check_start_allowed()  # again: no await from here to the VM being listed
            try:
                vm = self.workers.create(spec)
            except (OSError, SpecError) as e:
                raise _stored(e)
        except BaseException:
            self.folders.delete(spec.id)
            raise
        self._tell(EventKind.VM_CREATED, vm)
        return self.view(vm)

    def _tell(self, kind: EventKind, vm: ManagedVm) -> None:
        if self.events is not None:
            self.events.emit(kind, vm_id=vm.id, name=vm.spec.name)

    async def vm_edit(self, params, caller: Caller):
        vm = self.find(params)
        async with vm.lock:
            s = vm.spec
            changes: Dict[str, Any] = {}
            new_name = P.name(params, "name")
            if new_name is not None and new_name != s.name:
                changes["name"] = new_name
            with self.workers.claim_name(new_name, renaming=vm) if "name" in changes else contextlib.nullcontext():
                return await self._vm_edit_locked(vm, params, caller, changes)

    async def _vm_edit_locked(self, vm: ManagedVm, params, caller: Caller, changes: Dict[str, Any]):
        """vm.edit with the VM's lock held and its new name (if any) claimed."""
        s = vm.spec
        hw = {
            "disks": P.disks(params),
            "kernel": P.file_path(params, "kernel"),
            "initrd": P.file_path(params, "initrd"),
            "cmdline": P.cmdline(params),
            "memory_mb": P.memory_mb(params, telemetry.host_memory_mb()),
            "cpus": P.cpus(params),
        }
        own = [d["path"] for d in s.disks if d.get("owned")]
        seed = s.seed_disk()
        if hw["disks"] is not None and seed is not None:  # the seed stays, last, whatever the new list
            hw["disks"] = [d for d in hw["disks"] if d["path"] != seed["path"]] + [dict(seed)]
        for d in hw["disks"] or []:
            d["owned"] = d["path"] in own  # its own overlay, listed again, stays its own
        plan = self.files.plan(caller, file_uses(hw["kernel"], hw["initrd"], hw["disks"]), own)
        (await self.files.open_planned(plan)).close()
        await probe_formats(self.files, hw["disks"], {use.path: rights for use, rights in plan})
        hw = {k: v for k, v in hw.items() if v is not None and v != getattr(s, k)}
        if hw and vm.active:
            raise ApiError(ErrorCode.VM_RUNNING, "stop VM %s before changing %s" % (vm.id, ", ".join(sorted(hw))))
        changes.update(hw)
        # The policy and autostart change at once, also while the VM runs: they act when it next ends or boots.
        for key, value in (("autostart", P.get(params, "autostart", bool)), ("restart", P.restart_policy(params))):
            if value is not None and value != getattr(s, key):
                changes[key] = value
        provision = self._provision_change(vm, params)
        if provision is not None:
            changes["cloud_init"] = provision
        net = dict(s.net or {"enabled": True, "mac": new_mac(), "link_up": True, "hostfwds": [], "guestfwds": []})
        link = P.net_flag(params)
        hostfwds, guestfwds = P.forwards(params, "hostfwds"), P.forwards(params, "guestfwds")
        net_changes = {}
        if link is not None and link != net.get("link_up", True):
            net_changes["link_up"] = link
        if hostfwds is not None and hostfwds != net.get("hostfwds", []):
            net_changes["hostfwds"] = hostfwds
        if guestfwds is not None and guestfwds != net.get("guestfwds", []):
            net_changes["guestfwds"] = guestfwds
        failures: List[Any] = []
        if net_changes and vm.active and vm.session is not None:
            failures = await self._apply_net(vm, net, net_changes)
        if net_changes:
            net.update(net_changes)
            changes["net"] = net
        if "cloud_init" in changes:
            # Rebuilt now, read by the guest at its next boot (a running worker keeps the old file open).
            entry = await build_seed(self.folders.vm_dir(vm.id), changes["cloud_init"])
            if seed is None:
                changes["disks"] = list(changes.get("disks", s.disks)) + [entry]
        if changes:
            edited = VmSpec.from_json(dict(s.to_json(), **changes))
            named = {use.path: rights.uid for use, rights in plan if rights is not None}
            renamed = {use.path for use, _ in plan}  # named again: by whom counts now
            kept = {p: uid for p, uid in s.named_by.items() if p not in renamed}
            edited.named_by = {p: uid for p, uid in dict(kept, **named).items() if p in edited.paths()}
            try:
                self.workers.update_spec(vm, edited)
            except (OSError, SpecError) as e:
                if "cloud_init" in changes and seed is not None:
                    with contextlib.suppress(ApiError):  # the seed as the stored spec describes it
                        await build_seed(self.folders.vm_dir(vm.id), s.cloud_init)
                raise _stored(e)
            log.info("vm %s: edited %s", vm.id, ", ".join(sorted(changes)))
        return dict(self.view(vm), forward_failures=failures)

    def _provision_change(self, vm: ManagedVm, params) -> Optional[Dict[str, Any]]:
        """vm.edit's new cloud_init for the VM, or None when it does not change.

        The values given replace the stored ones (null removes one); the
        instance-id stays, so the guest's cloud-init does not run its
        once-per-instance steps again, unless `reprovision` asks for a new
        one. A VM without a seed gets one: a new disk, so only while it is
        stopped.
        """
        s = vm.spec
        given = P.cloud_init(params)
        reprovision = P.get(params, "reprovision", bool, default=False)
        if given is None and not reprovision:
            return None
        if not s.cloud_init:
            if vm.active:
                raise ApiError(ErrorCode.VM_RUNNING, "stop VM %s before giving it cloud-init: its seed is a new disk"
                               % vm.id)
            if len(s.disks) >= Limits.DISKS_MAX:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "no room for the cloud-init seed disk: at most %d disks"
                               % Limits.DISKS_MAX)
            return new_provision(given or {}, s.name)
        stored = dict(s.cloud_init)
        for key, value in (given or {}).items():
            if value is None:
                stored.pop(key, None)
            else:
                stored[key] = value
        if reprovision:
            stored["instance_id"] = cloudinit.new_instance_id()
        return stored if stored != s.cloud_init else None

    async def _apply_net(self, vm: ManagedVm, net: Dict[str, Any], changes: Dict[str, Any]) -> List[Any]:
        """Carry network changes into the running worker; the forwards that failed there."""
        if not net.get("enabled"):
            raise ApiError(ErrorCode.VM_RUNNING, "VM %s has no network card; stop it to add one" % vm.id)
        if "link_up" in changes:
            await self.workers.command(vm, CommandName.NET_LINK, {"up": changes["link_up"]})
        if "hostfwds" in changes or "guestfwds" in changes:
            result = await self.workers.command(vm, CommandName.NET_FORWARDS, {
                "hostfwds": changes.get("hostfwds", net.get("hostfwds", [])),
                "guestfwds": changes.get("guestfwds", net.get("guestfwds", [])),
            })
            return result.get("failures", [])
        return []

    async def vm_start(self, params, caller: Caller):
        vm = self.find(params)
        await self.start_vm(vm)
        return self.view(vm)

    async def start_vm(self, vm: ManagedVm, restore: Optional[str] = None) -> None:
        """vm.start's whole path, also taken by the restart policy and autostart; ApiError if the VM does not run.

        `restore`: a snapshot file the guest continues from instead of booting (vm.restore, vm.clone).
        """
        self.gate.check_start_allowed()
        await self._preflight(vm)
        try:
            await self.workers.start(vm, self.gate.check_start_allowed, restore)
        except OperationError as e:
            raise ApiError(e.code, e.message, last_failure=vm.last_failure)

    async def _check_files(self, vm: ManagedVm) -> None:
        """Every file the worker will open, opened now with the rights of whoever named it.

        A user who named a file of theirs at vm.create may have put a link to
        another file in its place since, or made their qcow2 disk name a
        backing file they cannot read: both are refused here, before every
        start, with that user's rights as they are today.
        """
        s = vm.spec
        owned = any(d.get("owned") for d in s.disks)  # the overlay of a template, a disk added, a seed
        # Every disk keyed by its place in the VM's list: descriptors are kept by key.
        uses = file_uses(s.kernel, s.initrd, s.disks, s.template if owned else None)
        plan = []
        for use in uses:
            uid = s.named_by.get(use.path)
            try:
                plan.append((use, Credentials.of_uid(uid) if uid is not None else None))
            except KeyError:
                raise ApiError(ErrorCode.PERMISSION_DENIED, "%s %s was named by uid %d, which is no longer a user"
                               % (use.key, use.path, uid)) from None
        (await self.files.open_planned(plan)).close()
        rights = {use.path: who for use, who in plan}
        for i, d in enumerate(s.disks):
            who = rights.get(d["path"])
            if who is not None and d.get("format") == "qcow2" and not d.get("owned"):
                await probe_disk(self.files, "disks[%d]" % i, d["path"], who)

    async def _preflight(self, vm: ManagedVm) -> None:
        """What vm.start checks before a worker runs; a refusal is recorded as the VM's last_failure."""
        checks = doctor.run_checks()
        if not checks["supported"]:
            failed = [c["message"] for c in checks["checks"] if c["required"] and not c["ok"]]
            self._refuse_start(vm, ErrorCode.KVM_UNSUPPORTED, FailureCode.KVM_UNSUPPORTED,
                               "KVM is not usable: %s" % "; ".join(failed))
        try:
            await self._check_files(vm)
        except ApiError as e:
            self._refuse_start(vm, e.code, FailureCode.FILE_MISSING, e.message)
        available = telemetry.host_memory_available_mb()
        if vm.spec.memory_mb > available:
            self._refuse_start(vm, ErrorCode.INSUFFICIENT_MEMORY, FailureCode.INSUFFICIENT_MEMORY,
                               "VM %s needs %d MiB; the host has %d MiB available" % (vm.id, vm.spec.memory_mb, available))

    def _refuse_start(self, vm: ManagedVm, code: ErrorCode, failure: FailureCode, message: str) -> None:
        self.workers.record_failure(vm, failure, message)
        raise ApiError(code, message)

    async def vm_stop(self, params, caller: Caller):
        vm = self.find(params)
        if not vm.active and self.restarts is not None and self.restarts.cancel(vm):
            log.info("vm %s: its waiting restart was cancelled by vm.stop from %s", vm.id, caller)
            return self.view(vm)
        await self.workers.stop(vm, "vm.stop by %s" % caller, P.timeout(params, STOP_TIMEOUT_SEC))
        return self.view(vm)

    async def vm_shutdown(self, params, caller: Caller):
        vm = self.find(params)
        graceful = await self.workers.shutdown(vm, P.timeout(params, SHUTDOWN_TIMEOUT_SEC))
        return dict(self.view(vm), graceful=graceful)

    async def host_shutdown(self, params, caller: Caller):
        """Every active VM at once: the power button, a hard stop after `timeout`; they end stopped, host_shutdown.

        tenbox-guests.service asks this when the system shuts down, never on a
        package upgrade (docs/daemon.md). Restarts and autostarts stay off
        until tenboxd starts again.
        """
        timeout = P.timeout(params, SHUTDOWN_TIMEOUT_SEC)
        if self.restarts is not None:
            self.restarts.hold()
        vms = self.workers.active()
        log.info("host shutdown: powering off %d VM(s), %d s each before a hard stop", len(vms), timeout)
        results = await asyncio.gather(*(self._host_shutdown_one(vm, timeout) for vm in vms))
        return {"vms": sorted(results, key=lambda r: (r["name"], r["id"]))}

    async def _host_shutdown_one(self, vm: ManagedVm, timeout: int) -> Dict[str, Any]:
        try:
            graceful: Optional[bool] = await self.workers.shutdown(vm, timeout, reason=HOST_SHUTDOWN_REASON)
            error = None
        except OperationError as e:  # it stopped meanwhile (vm_not_running), or survived SIGKILL
            graceful, error = None, "%s (%s)" % (e.message, e.code.value)
        return dict(self.view(vm), graceful=graceful, error=error)

    async def vm_reboot(self, params, caller: Caller):
        vm = self.find(params)
        await self.workers.reboot(vm)
        return self.view(vm)

    async def vm_delete(self, params, caller: Caller):
        vm = self.find_or_broken(params)
        force = P.get(params, "force", bool, default=False)
        if isinstance(vm, str):
            try:
                await self.workers.delete_broken(vm, force)
            except OSError as e:
                raise ApiError(ErrorCode.STORE_FAILED, "cannot delete VM %s: %s" % (vm, e.strerror))
            return {"id": vm, "deleted": True}
        if vm.active:
            if not force:
                raise ApiError(ErrorCode.VM_RUNNING, "VM %s is %s; stop it first (or force)" % (vm.id, vm.state.value))
            await self.workers.stop(vm, "vm.delete --force by %s" % caller)
        async with vm.lock:
            if vm.active:
                raise ApiError(ErrorCode.VM_BUSY, "VM %s started again meanwhile" % vm.id)
            users = self._built_on(vm)
            if users:
                raise ApiError(ErrorCode.SNAPSHOT_IN_USE, "VMs %s have disks built on VM %s's snapshots; delete them "
                               "first" % (", ".join(users), vm.spec.name), vms=users)
            chained = [p for d in vm.spec.disks for p in d.get("backing") or []]
            vms_dir = os.path.dirname(self.folders.vm_dir(vm.id))
            try:
                self.workers.delete(vm)
            except OSError as e:
                raise ApiError(ErrorCode.STORE_FAILED, "cannot delete VM %s: %s" % (vm.id, e.strerror))
            self._drop_unused_layers(chained, vms_dir)
        self._tell(EventKind.VM_DELETED, vm)
        return {"id": vm.id, "deleted": True}

    def _built_on(self, vm: ManagedVm) -> List[str]:
        """The names of the other VMs whose disks chain through a file in `vm`'s folder (a clone's layers)."""
        prefix = self.folders.vm_dir(vm.id) + os.sep
        users = []
        for other in self.workers.all():
            if other.id != vm.id and any(p.startswith(prefix) for d in other.spec.disks
                                         for p in [d["path"]] + list(d.get("backing") or [])):
                users.append(other.spec.name)
        return sorted(users)

    def _drop_unused_layers(self, chained: List[str], vms_dir: str) -> None:
        """A deleted clone's layers in other VM folders whose snapshot was removed: deleted once unused."""
        vms = self.workers.all()
        used = snapshots.referenced_paths([v.spec for v in vms], [self.folders.vm_dir(v.id) for v in vms])
        snapshots.remove_unreferenced([p for p in chained if p.startswith(vms_dir + os.sep)], used)

    async def vm_logs(self, params, caller: Caller):
        lines = P.integer(params, "lines", 0, P.LOG_LINES_MAX, default=P.LOG_LINES_DEFAULT)
        source = P.log_source(params)
        vm = self.find(params)
        paths = log_files(self.folders.vm_dir(vm.id), source)
        return {"vm_id": vm.id, "source": source, "lines": tail_lines(paths, lines)}

    async def vm_logs_follow(self, params, caller: Caller, stream):
        vm = self.find(params)
        with self.workers.subscribe_logs(vm) as q:
            await stream.reply({"vm_id": vm.id})
            if await stream.follow(q, lambda lines: stream.event(
                    {"type": Event.LOGS_APPEND.value, "vm_id": vm.id, "payload": {"lines": lines}})):
                await stream.event({"type": Event.LOGS_CLOSED.value, "vm_id": vm.id})
            return {}

    async def _until_linked(self, vm: ManagedVm) -> None:
        """Wait (bounded) for the worker's link: a worker that runs while tenboxd restarts
        reconnects within a heartbeat or two, and input sent before then would be lost."""
        waited = 0.0
        while vm.active and vm.session is not None and not vm.session.hello:
            if waited >= LINK_WAIT_SEC:
                raise ApiError(ErrorCode.VM_BUSY, "VM %s's worker has not connected to tenboxd within %.0f s"
                               % (vm.id, LINK_WAIT_SEC))
            await asyncio.sleep(LINK_POLL_SEC)
            waited += LINK_POLL_SEC
        if not vm.active:
            raise ApiError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)

    async def vm_console_attach(self, params, caller: Caller, stream):
        vm = self.find(params)
        if not vm.active:
            raise ApiError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)
        await self._until_linked(vm)
        with self.workers.subscribe_console(vm) as q:
            await stream.reply({"vm_id": vm.id})
            ring = vm.console.ring()
            if ring:
                await stream.event({"type": Event.CONSOLE_DATA.value, "vm_id": vm.id, "data_hex": ring.hex()})
            reader = asyncio.ensure_future(stream.next_event())
            getter = asyncio.ensure_future(q.get())
            while True:
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    item = getter.result()
                    if item is None:
                        reader.cancel()
                        await stream.event({"type": Event.CONSOLE_CLOSED.value, "vm_id": vm.id,
                                            "reason": "VM %s is %s" % (vm.id, vm.state.value)})
                        return {}
                    await stream.event({"type": Event.CONSOLE_DATA.value, "vm_id": vm.id, "data_hex": item.hex()})
                    getter = asyncio.ensure_future(q.get())
                if reader in done:
                    event = reader.result()
                    if event is None:  # the client went away
                        getter.cancel()
                        return {}
                    if event.get("type") == Event.CONSOLE_INPUT.value:
                        try:
                            data = bytes.fromhex(str(event.get("data_hex", "")))
                        except ValueError:
                            data = b""
                        if data:
                            self.workers.console_input(vm, data)
                    reader = asyncio.ensure_future(stream.next_event())
