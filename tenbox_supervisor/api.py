"""One table of control methods, shared by the local socket and the cloud link (daemon, root).

Each method is registered once with its parameter checks and whether it
changes anything (mutating calls are logged with the caller's credentials)
or needs root. Nothing is ever dispatched by name lookup on an object:
unknown types are refused before any handler runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional

# Everything at module level: a request must never import code while dpkg
# replaces the package under a running daemon (host.update, a manual upgrade).
from tenbox_supervisor import doctor, telemetry
from tenbox_supervisor.fsutil import tail_lines
from tenbox_supervisor.protocol import NAME_RE, ErrorCode, Event, Method
from tenbox_supervisor.store import (
    DISKS_MAX,
    SpecError,
    VmSpec,
    check_disk,
    new_mac,
    new_vm_id,
)
from tenbox_supervisor.workers import ACTIVE_STATES, STOP_TIMEOUT_SEC, SHUTDOWN_TIMEOUT_SEC, OperationError, VmRuntime
from tenbox_vmm import __version__
from tenbox_vmm.protocol import CommandName, Limits
from tenbox_vmm.protocol.forwards import ForwardSpecError, parse_guestfwd, parse_hostfwd

log = logging.getLogger("tenboxd.api")

LOG_LINES_DEFAULT = 200
LOG_LINES_MAX = 10000
CMDLINE_MAX = 4096
PATH_MAX = 4096
TIMEOUT_MAX_SEC = 3600
IMAGETOOL_TIMEOUT_SEC = 120
OVERLAY_NAME = "disk.qcow2"


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: Optional[str] = None, **extra: Any) -> None:
        super().__init__(message or code.message)
        self.code = code
        self.message = message or code.message
        self.extra = extra


@dataclass(frozen=True)
class Caller:
    """Who is asking: peer credentials on the local socket, or the cloud."""

    uid: int
    gid: int
    pid: int
    transport: str = "local"

    def __str__(self) -> str:
        if self.transport != "local":
            return self.transport
        return "uid=%d gid=%d pid=%d" % (self.uid, self.gid, self.pid)


Handler = Callable[..., Awaitable[Dict[str, Any]]]


@dataclass(frozen=True)
class MethodSpec:
    name: Method
    handler: Handler
    mutating: bool
    root_only: bool = False
    stream: bool = False


# Parameter checks ---------------------------------------------------------------


def _get(params: Dict[str, Any], key: str, types, required: bool = False, default: Any = None) -> Any:
    if key not in params or params[key] is None:
        if required:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s is required" % key)
        return default
    value = params[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s has the wrong type" % key)
    if not isinstance(value, types):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s has the wrong type" % key)
    return value


def _name(params, key: str, required: bool = False) -> Optional[str]:
    value = _get(params, key, str, required)
    if value is not None and not NAME_RE.match(value):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s must match [A-Za-z0-9-]{1,64}" % key)
    return value


def _int(params, key: str, lo: int, hi: int, default: Optional[int] = None, required: bool = False) -> Optional[int]:
    value = _get(params, key, int, required, default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s must be in %d..%d" % (key, lo, hi))
    return value


def _file(params, key: str, required: bool = False) -> Optional[str]:
    path = _get(params, key, str, required)
    if path is None:
        return None
    if not path or len(path) > PATH_MAX or "\0" in path:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s is not a usable path" % key)
    if not os.path.isabs(path):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s must be an absolute path" % key)
    if not os.path.exists(path):
        raise ApiError(ErrorCode.FILE_MISSING, "%s %s does not exist" % (key, path))
    if not os.path.isfile(path):
        raise ApiError(ErrorCode.FILE_MISSING, "%s %s is not a regular file" % (key, path))
    if not os.access(path, os.R_OK):
        raise ApiError(ErrorCode.FILE_MISSING, "%s %s is not readable" % (key, path))
    return os.path.normpath(path)


def _disks(params) -> Optional[List[Dict[str, Any]]]:
    """`disks`: [{"path", "read_only", "serial"} or "path"]; TenBox's single `disk` path is accepted too."""
    raw = params.get("disks")
    if raw is None and params.get("disk") is not None:
        raw = [params["disk"]]
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > DISKS_MAX:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "disks must be a list of at most %d disks" % DISKS_MAX)
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "disks[%d] must be a path or an object" % i)
        entry = {
            "path": _file({"path": item.get("path")}, "path", required=True),
            "read_only": _get(item, "read_only", bool, default=False),
            "serial": _get(item, "serial", str, default=""),
            "owned": False,
        }
        fmt = _get(item, "format", str)
        if fmt is not None:
            entry["format"] = fmt
        try:
            check_disk(entry)
        except SpecError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "disks[%d]: %s" % (i, e))
        out.append(entry)
    return out


async def _probe_formats(disks: Optional[List[Dict[str, Any]]]) -> None:
    """Record each disk's format (probed now when not given), so the worker never probes a raw image.

    A raw image opened by probing could be turned into a qcow2 image by its
    guest, naming any host file as backing; declared formats rule that out
    (libvirt does the same). A declared format must match the file.
    """
    for i, d in enumerate(disks or []):
        try:
            found = (await run_imagetool("info", d["path"]))["format"]
        except ApiError as e:
            raise ApiError(e.code, "disks[%d]: %s" % (i, e.message))
        if d.get("format") not in (None, found):
            # qcow2 declared on a raw file, or raw declared on a qcow2 file: the latter is allowed
            # (the guest then sees the qcow2 bytes), as QEMU allows it, but never silently.
            if d["format"] != "raw":
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "disks[%d]: %s is %s, not %s" % (i, d["path"], found, d["format"]))
        else:
            d["format"] = found


def _forwards(params, key: str) -> Optional[List[str]]:
    """A list of forward specs, checked with the worker's own grammar (tenbox_vmm.protocol.forwards)."""
    raw = params.get(key)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or len(raw) > Limits.FORWARDS_MAX or not all(isinstance(s, str) for s in raw):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s must be a list of at most %d specs" % (key, Limits.FORWARDS_MAX))
    parse = parse_hostfwd if key == "hostfwds" else parse_guestfwd
    for spec in raw:
        try:
            parse(spec)
        except ForwardSpecError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(e))
    return list(raw)


def _net_flag(params) -> Optional[bool]:
    """`net`: true/false, or "on"/"off" (TenBox's CLI); also TenBox's `net_enabled`/`nat_enabled`."""
    for key in ("net", "net_enabled", "nat_enabled"):
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "up", "down"):
            return value.lower() in ("on", "true", "up")
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "%s must be on or off" % key)
    return None


async def run_imagetool(*args: str, timeout: float = IMAGETOOL_TIMEOUT_SEC) -> Dict[str, Any]:
    """Run `python3 -m tenbox_vmm.imagetool ARGS` in a child; its JSON, or ApiError with its message."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tenbox_vmm.imagetool", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise ApiError(ErrorCode.INTERNAL_ERROR, "image tool timed out after %.0fs" % timeout)
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        text = message[-1] if message else "image tool failed with status %d" % proc.returncode
        raise ApiError(ErrorCode.INVALID_ARGUMENT, text.replace("tenbox-image: error: ", ""))
    try:
        return json.loads(out)
    except ValueError:
        raise ApiError(ErrorCode.INTERNAL_ERROR, "image tool printed something that is not JSON")


def _cmdline(params) -> Optional[str]:
    value = _get(params, "cmdline", str)
    if value is not None and (len(value) > CMDLINE_MAX or any(ord(ch) < 32 or ord(ch) > 126 for ch in value)):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "cmdline must be printable ASCII, at most %d bytes" % CMDLINE_MAX)
    return value


class Api:
    """The method table and its handlers."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.workers = daemon.workers
        self.store = daemon.store
        self.methods: Dict[str, MethodSpec] = {}
        for spec in (
            MethodSpec(Method.DOCTOR, self.doctor, mutating=False),
            MethodSpec(Method.SYSTEM_INFO, self.system_info, mutating=False),
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
        ):
            self.register(spec)

    def register(self, spec: MethodSpec) -> None:
        self.methods[spec.name.value] = spec

    def lookup(self, type_: Any) -> MethodSpec:
        if not isinstance(type_, str) or type_ not in self.methods:
            raise ApiError(ErrorCode.UNKNOWN_REQUEST, "unknown request type %r" % (type_,) if isinstance(type_, str)
                           else "the request has no type")
        return self.methods[type_]

    async def call(self, type_: Any, params: Dict[str, Any], caller: Caller, stream=None) -> Dict[str, Any]:
        """Validate and run one method; ApiError for anything the caller did wrong."""
        spec = self.lookup(type_)
        if spec.root_only and caller.transport == "local" and caller.uid != 0:
            raise ApiError(ErrorCode.PERMISSION_DENIED, "%s is for root only" % spec.name.value)
        if spec.mutating:
            log.info("request %s %s from %s", spec.name.value, params.get("vm_id") or params.get("name") or "", caller)
        if spec.stream:
            return await spec.handler(params, caller, stream)
        return await spec.handler(params, caller)

    # Lookups and views -----------------------------------------------------------

    def find(self, params: Dict[str, Any]) -> VmRuntime:
        key = _name(params, "vm_id", required=True)
        vm = self.workers.vms.get(key)
        if vm is None:
            matches = [v for v in self.workers.vms.values() if v.spec.name == key]
            if len(matches) == 1:
                vm = matches[0]
        if vm is None:
            if key in self.workers.broken:
                raise ApiError(ErrorCode.VM_BROKEN, "VM %s is broken: %s" % (key, self.workers.broken[key]))
            raise ApiError(ErrorCode.VM_NOT_FOUND, "no VM with id or name %r" % key)
        return vm

    def view(self, vm: VmRuntime) -> Dict[str, Any]:
        s = vm.spec
        out = {
            "id": s.id,
            "name": s.name,
            "state": vm.state.value,
            "cpus": s.cpus,
            "memory_mb": s.memory_mb,
            "kernel": s.kernel,
            "initrd": s.initrd,
            "cmdline": s.cmdline,
            "disks": s.disks,
            "net": s.net,
            "image": s.image,
            "created_at": s.created_at,
            "pid": vm.proc.pid if vm.proc else None,
            "started_at": vm.started_at if vm.state in ACTIVE_STATES else None,
            "uptime_sec": vm.uptime(),
            "last_failure": vm.last_failure,
            "net_status": vm.net_status,
        }
        if vm.proc is not None:
            out["resources"] = telemetry.process_resources(vm.proc.pid)
        return out

    # Methods -------------------------------------------------------------------

    async def doctor(self, params, caller):
        return doctor.run_checks()

    async def system_info(self, params, caller):
        vms = list(self.workers.vms.values())
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_sec": time.time() - self.daemon.started_at,
            "data_dir": self.daemon.config.data_dir,
            "socket_path": self.daemon.config.socket_path,
            "cloud_url": self.daemon.config.cloud_url,
            "vm_summary": telemetry.vm_summary(vms, len(self.workers.broken)),
            "resources": telemetry.host_resources(self.daemon.config.data_dir),
            "doctor": doctor.run_checks(),
        }

    async def vm_list(self, params, caller):
        vms = [self.view(vm) for vm in sorted(self.workers.vms.values(), key=lambda v: (v.spec.name, v.id))]
        for vm_id, reason in sorted(self.workers.broken.items()):
            vms.append({"id": vm_id, "name": None, "state": "broken", "error": reason})
        return {"vms": vms}

    async def vm_create(self, params, caller):
        image_name = _name(params, "image")
        if image_name is None:
            return await self._vm_create(params, None)
        if params.get("template") is not None:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "give image or template, not both")
        images = self.daemon.image_api
        # Held until the VM is stored: image.remove cannot slip in between.
        async with images.lock:
            return await self._vm_create(params, images.get(image_name))

    async def _vm_create(self, params, image):
        """vm.create; with an image, its kernel, initrd and command line are the defaults and its rootfs the template."""
        name = _name(params, "name", required=True)
        if any(v.spec.name == name for v in self.workers.vms.values()) or name in self.workers.vms:
            raise ApiError(ErrorCode.VM_EXISTS, "a VM named %r already exists" % name)
        kernel = _file(params, "kernel", required=image is None)
        initrd = _file(params, "initrd")
        cmdline = _cmdline(params)
        if image is not None:
            kernel = kernel or image.kernel
            initrd = initrd or image.initrd
            if cmdline is None:
                cmdline = image.manifest.get("cmdline")
        spec = VmSpec(
            id=new_vm_id(),
            name=name,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            image=image.name if image is not None else None,
            memory_mb=_int(params, "memory_mb", Limits.MEMORY_MIN_MB, telemetry.host_memory_mb(), default=256),
            cpus=_int(params, "cpus", Limits.CPUS_MIN, Limits.CPUS_MAX, default=1),
            disks=_disks(params) or [],
        )
        await _probe_formats(spec.disks)
        hostfwds, guestfwds = _forwards(params, "hostfwds"), _forwards(params, "guestfwds")
        net_on = _net_flag(params)
        if net_on is None:
            net_on = True  # as TenBox: a VM has the network unless told otherwise
        spec.net = {"enabled": True, "mac": new_mac(), "link_up": net_on,
                    "hostfwds": hostfwds or [], "guestfwds": guestfwds or []}
        template = image.rootfs if image is not None else _file(params, "template")
        if template and len(spec.disks) >= DISKS_MAX:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "no room for the template's overlay: at most %d disks" % DISKS_MAX)
        try:
            self.store.create(spec)
        except (OSError, SpecError) as e:
            raise ApiError(ErrorCode.STORE_FAILED, "cannot store the VM: %s" % (getattr(e, "strerror", None) or e))
        if template:
            overlay = os.path.join(self.store.vm_dir(spec.id), OVERLAY_NAME)
            try:
                await run_imagetool("overlay", "--backing", template, "--out", overlay)
                spec.disks.insert(0, {"path": overlay, "read_only": False, "serial": "", "owned": True,
                                      "format": "qcow2"})
                self.store.save(spec)
            except (ApiError, OSError, SpecError) as e:
                self.store.delete(spec.id)
                if isinstance(e, ApiError):
                    raise ApiError(e.code, "cannot make an overlay of %s: %s" % (template, e.message))
                raise ApiError(ErrorCode.STORE_FAILED, "cannot store the VM: %s" % (getattr(e, "strerror", None) or e))
        vm = VmRuntime(spec, self.workers)
        vm.persist()
        self.workers.vms[spec.id] = vm
        log.info("vm %s: created as %r", spec.id, spec.name)
        return self.view(vm)

    async def vm_edit(self, params, caller):
        vm = self.find(params)
        async with vm.lock:
            s = vm.spec
            changes: Dict[str, Any] = {}
            new_name = _name(params, "name")
            if new_name is not None and new_name != s.name:
                if any(v.spec.name == new_name for v in self.workers.vms.values()):
                    raise ApiError(ErrorCode.VM_EXISTS, "a VM named %r already exists" % new_name)
                changes["name"] = new_name
            hw = {
                "disks": _disks(params),
                "kernel": _file(params, "kernel"),
                "initrd": _file(params, "initrd"),
                "cmdline": _cmdline(params),
                "memory_mb": _int(params, "memory_mb", Limits.MEMORY_MIN_MB, telemetry.host_memory_mb()),
                "cpus": _int(params, "cpus", Limits.CPUS_MIN, Limits.CPUS_MAX),
            }
            await _probe_formats(hw["disks"])
            hw = {k: v for k, v in hw.items() if v is not None and v != getattr(s, k)}
            if hw and vm.state in ACTIVE_STATES:
                raise ApiError(ErrorCode.VM_RUNNING, "stop VM %s before changing %s" % (vm.id, ", ".join(sorted(hw))))
            changes.update(hw)
            net = dict(s.net or {"enabled": True, "mac": new_mac(), "link_up": True, "hostfwds": [], "guestfwds": []})
            link = _net_flag(params)
            hostfwds, guestfwds = _forwards(params, "hostfwds"), _forwards(params, "guestfwds")
            net_changes = {}
            if link is not None and link != net.get("link_up", True):
                net_changes["link_up"] = link
            if hostfwds is not None and hostfwds != net.get("hostfwds", []):
                net_changes["hostfwds"] = hostfwds
            if guestfwds is not None and guestfwds != net.get("guestfwds", []):
                net_changes["guestfwds"] = guestfwds
            failures: List[Any] = []
            if net_changes and vm.state in ACTIVE_STATES and vm.proc is not None:
                failures = await self._apply_net(vm, net, net_changes)
            if net_changes:
                net.update(net_changes)
                changes["net"] = net
            if changes:
                updated = VmSpec.from_json(dict(s.to_json(), **changes))
                try:
                    self.store.save(updated)
                except (OSError, SpecError) as e:
                    raise ApiError(ErrorCode.STORE_FAILED, "cannot store the VM: %s" % (getattr(e, "strerror", None) or e))
                vm.spec = updated
                log.info("vm %s: edited %s", vm.id, ", ".join(sorted(changes)))
        return dict(self.view(vm), forward_failures=failures)

    async def _apply_net(self, vm: VmRuntime, net: Dict[str, Any], changes: Dict[str, Any]) -> List[Any]:
        """Carry network changes into the running worker; the forwards that failed there."""
        if not net.get("enabled"):
            raise ApiError(ErrorCode.VM_RUNNING, "VM %s has no network card; stop it to add one" % vm.id)
        try:
            if "link_up" in changes:
                await self.workers.command(vm, CommandName.NET_LINK, {"up": changes["link_up"]})
            if "hostfwds" in changes or "guestfwds" in changes:
                result = await self.workers.command(vm, CommandName.NET_FORWARDS, {
                    "hostfwds": changes.get("hostfwds", net.get("hostfwds", [])),
                    "guestfwds": changes.get("guestfwds", net.get("guestfwds", [])),
                })
                return result.get("failures", [])
        except OperationError as e:
            raise ApiError(ErrorCode(e.code), str(e))
        return []

    async def vm_start(self, params, caller):
        vm = self.find(params)
        self.daemon.check_start_allowed()
        self._preflight(vm)
        try:
            await self.workers.start(vm)
        except OperationError as e:
            raise ApiError(ErrorCode(e.code), str(e), last_failure=vm.last_failure)
        return self.view(vm)

    def _preflight(self, vm: VmRuntime) -> None:
        checks = doctor.run_checks()
        if not checks["supported"]:
            failed = [c["message"] for c in checks["checks"] if c["required"] and not c["ok"]]
            self._fail(vm, ErrorCode.KVM_UNSUPPORTED, "KVM is not usable: %s" % "; ".join(failed))
        for key in ("kernel", "initrd"):
            path = getattr(vm.spec, key)
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                self._fail(vm, ErrorCode.FILE_MISSING, "%s %s is missing or unreadable" % (key, path))
        for d in vm.spec.disks:
            if not os.path.isfile(d["path"]):
                self._fail(vm, ErrorCode.FILE_MISSING, "disk %s is missing" % d["path"])
        available = telemetry.host_memory_available_mb()
        if vm.spec.memory_mb > available:
            self._fail(vm, ErrorCode.INSUFFICIENT_MEMORY, "VM %s needs %d MiB; the host has %d MiB available"
                       % (vm.id, vm.spec.memory_mb, available))

    def _fail(self, vm: VmRuntime, code: ErrorCode, message: str) -> None:
        vm.last_failure = {"code": code.value, "message": message, "time": time.time(), "exit_code": None,
                           "signal": None, "console": []}
        vm.persist()
        raise ApiError(code, message)

    async def vm_stop(self, params, caller):
        vm = self.find(params)
        timeout = _int(params, "timeout", 1, TIMEOUT_MAX_SEC, default=int(STOP_TIMEOUT_SEC))
        try:
            await self.workers.stop(vm, "vm.stop by %s" % caller, timeout)
        except OperationError as e:
            raise ApiError(ErrorCode(e.code), str(e))
        return self.view(vm)

    async def vm_shutdown(self, params, caller):
        vm = self.find(params)
        timeout = _int(params, "timeout", 1, TIMEOUT_MAX_SEC, default=int(SHUTDOWN_TIMEOUT_SEC))
        try:
            graceful = await self.workers.shutdown(vm, timeout)
        except OperationError as e:
            raise ApiError(ErrorCode(e.code), str(e))
        return dict(self.view(vm), graceful=graceful)

    async def vm_reboot(self, params, caller):
        vm = self.find(params)
        try:
            await self.workers.reboot(vm)
        except OperationError as e:
            raise ApiError(ErrorCode(e.code), str(e))
        return self.view(vm)

    async def vm_delete(self, params, caller):
        vm = self.find_or_broken(params)
        if isinstance(vm, str):
            self._delete_dir(vm)
            self.workers.broken.pop(vm, None)
            return {"id": vm, "deleted": True}
        force = _get(params, "force", bool, default=False)
        if vm.state in ACTIVE_STATES:
            if not force:
                raise ApiError(ErrorCode.VM_RUNNING, "VM %s is %s; stop it first (or force)" % (vm.id, vm.state.value))
            try:
                await self.workers.stop(vm, "vm.delete --force by %s" % caller)
            except OperationError as e:
                raise ApiError(ErrorCode(e.code), str(e))
        async with vm.lock:
            if vm.state in ACTIVE_STATES:
                raise ApiError(ErrorCode.VM_BUSY, "VM %s started again meanwhile" % vm.id)
            self._delete_dir(vm.id)
            self.workers.vms.pop(vm.id, None)
            vm.close_streams("deleted")
        log.info("vm %s: deleted", vm.id)
        return {"id": vm.id, "deleted": True}

    def find_or_broken(self, params):
        key = _name(params, "vm_id", required=True)
        if key in self.workers.broken and key not in self.workers.vms:
            return key
        return self.find(params)

    def _delete_dir(self, vm_id: str) -> None:
        try:
            self.store.delete(vm_id)
        except OSError as e:
            raise ApiError(ErrorCode.STORE_FAILED, "cannot delete VM %s: %s" % (vm_id, e.strerror))

    async def vm_logs(self, params, caller):
        lines = _int(params, "lines", 0, LOG_LINES_MAX, default=LOG_LINES_DEFAULT)
        source = _get(params, "source", str, default="console")
        if source not in ("console", "runtime"):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "source must be console or runtime")
        vm = self.find(params)
        base = os.path.join(self.store.vm_dir(vm.id), "logs", "%s.log" % source)
        paths = ["%s.2" % base, "%s.1" % base, base]
        return {"vm_id": vm.id, "source": source, "lines": tail_lines(paths, lines)}

    async def vm_logs_follow(self, params, caller, stream):
        vm = self.find(params)
        q: asyncio.Queue = asyncio.Queue(maxsize=1024)
        vm.log_subs.add(q)
        try:
            await stream.reply({"vm_id": vm.id})
            reader = asyncio.ensure_future(stream.wait_closed())
            while True:
                getter = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    getter.cancel()
                    return {}
                item = getter.result()
                if item is None:
                    await stream.event({"type": Event.LOGS_CLOSED.value, "vm_id": vm.id})
                    return {}
                await stream.event({"type": Event.LOGS_APPEND.value, "vm_id": vm.id, "payload": {"lines": item}})
        finally:
            vm.log_subs.discard(q)

    async def vm_console_attach(self, params, caller, stream):
        vm = self.find(params)
        if vm.state not in ACTIVE_STATES:
            raise ApiError(ErrorCode.VM_NOT_RUNNING, "VM %s is not running" % vm.id)
        q: asyncio.Queue = asyncio.Queue(maxsize=1024)
        vm.console_subs.add(q)
        try:
            await stream.reply({"vm_id": vm.id})
            if vm.ring:
                await stream.event({"type": Event.CONSOLE_DATA.value, "vm_id": vm.id, "data_hex": bytes(vm.ring).hex()})
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
        finally:
            vm.console_subs.discard(q)
