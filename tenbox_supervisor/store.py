"""The VM store: <data_dir>/vms/<id>/vm.json and runtime.json (daemon, root).

Specs are written atomically. A vm.json that cannot be read or makes no
sense is reported as a broken entry with the reason; it never stops the
daemon and never hides the other VMs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tenbox_supervisor.fsutil import atomic_write_json, entry_folders
from tenbox_supervisor.protocol import NAME_RE
from tenbox_vmm.protocol import DiskArg, Limits

log = logging.getLogger("tenboxd.store")

SPEC_FILE = "vm.json"
RUNTIME_FILE = "runtime.json"
SPEC_MAX_BYTES = 1 << 20


class SpecError(ValueError):
    """A VM spec field is missing or invalid."""


@dataclass
class VmSpec:
    id: str
    name: str
    kernel: str
    initrd: Optional[str] = None
    cmdline: Optional[str] = None  # None: the runtime's default
    memory_mb: int = 256
    cpus: int = 1
    disks: List[Dict[str, Any]] = field(default_factory=list)
    net: Dict[str, Any] = field(default_factory=dict)
    image: Optional[str] = None
    created_at: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)  # keys from newer versions, kept as they are

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        for k, v in extra.items():
            d.setdefault(k, v)
        return d

    @classmethod
    def from_json(cls, d: Any) -> "VmSpec":
        if not isinstance(d, dict):
            raise SpecError("vm.json is not a JSON object")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        spec = cls(**{k: d[k] for k in known if k in d}, extra={k: v for k, v in d.items() if k not in known})
        spec.validate()
        return spec

    def validate(self) -> None:
        if not isinstance(self.id, str) or not NAME_RE.match(self.id):
            raise SpecError("bad id %r" % (self.id,))
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise SpecError("bad name %r" % (self.name,))
        if not isinstance(self.kernel, str) or not self.kernel:
            raise SpecError("kernel is missing")
        if self.initrd is not None and not isinstance(self.initrd, str):
            raise SpecError("initrd must be a path")
        if self.cmdline is not None and not isinstance(self.cmdline, str):
            raise SpecError("cmdline must be a string")
        if not isinstance(self.memory_mb, int) or isinstance(self.memory_mb, bool) or self.memory_mb < Limits.MEMORY_MIN_MB:
            raise SpecError("memory_mb must be an integer of at least %d" % Limits.MEMORY_MIN_MB)
        if not isinstance(self.cpus, int) or isinstance(self.cpus, bool) or not Limits.CPUS_MIN <= self.cpus <= Limits.CPUS_MAX:
            raise SpecError("cpus must be an integer in 1..%d" % Limits.CPUS_MAX)
        if not isinstance(self.disks, list) or not isinstance(self.net, dict):
            raise SpecError("disks must be a list and net an object")
        if len(self.disks) > DISKS_MAX:
            raise SpecError("at most %d disks" % DISKS_MAX)
        for d in self.disks:
            check_disk(d)
        if self.net:
            check_net(self.net)
        if not isinstance(self.created_at, (int, float)):
            raise SpecError("created_at must be a number")


DISKS_MAX = Limits.DISKS_MAX


def check_disk(d: Any) -> None:
    """A disk entry: {"path": absolute, "read_only": bool, "serial": str, "owned": bool, "format": "raw"|"qcow2"}.

    "format" is absent only in specs stored before formats were recorded:
    the worker then probes the image.
    """
    if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not os.path.isabs(d["path"]):
        raise SpecError("each disk needs an absolute path")
    if "," in d["path"] or "\0" in d["path"]:
        raise SpecError("disk path %r contains a comma or NUL" % d["path"])
    if not isinstance(d.get("read_only", False), bool) or not isinstance(d.get("owned", False), bool):
        raise SpecError("disk read_only and owned are booleans")
    if d.get("format", "raw") not in Limits.DISK_FORMATS:
        raise SpecError("disk format must be %s" % " or ".join(Limits.DISK_FORMATS))
    serial = d.get("serial", "")
    if not isinstance(serial, str) or len(serial) > Limits.DISK_SERIAL_MAX or not all(32 < ord(c) < 127 and c != "," for c in serial):
        raise SpecError("disk serial must be up to %d printable ASCII characters without commas" % Limits.DISK_SERIAL_MAX)




def check_net(n: Any) -> None:
    """{"enabled": bool, "mac": "52:54:00:..", "link_up": bool, "hostfwds": [spec], "guestfwds": [spec]}."""
    if not isinstance(n, dict) or not isinstance(n.get("enabled", False), bool):
        raise SpecError("net must be an object with a boolean 'enabled'")
    if n.get("enabled"):
        if not isinstance(n.get("mac"), str) or not Limits.MAC_RE.match(n["mac"]):
            raise SpecError("net.mac must look like 52:54:00:12:34:56")
        if not isinstance(n.get("link_up", True), bool):
            raise SpecError("net.link_up must be a boolean")
    for key in ("hostfwds", "guestfwds"):
        specs = n.get(key, [])
        if not isinstance(specs, list) or len(specs) > Limits.FORWARDS_MAX or not all(isinstance(s, str) for s in specs):
            raise SpecError("net.%s must be a list of at most %d forward specs" % (key, Limits.FORWARDS_MAX))


def new_mac() -> str:
    """A stable, locally administered unicast MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join("%02x" % b for b in secrets.token_bytes(3))


def disk_arg(d: Dict[str, Any]) -> DiskArg:
    """The runtime's --disk value for a disk entry."""
    return DiskArg(path=d["path"], read_only=bool(d.get("read_only")), serial=d.get("serial") or "",
                   format=d.get("format") or None)


def new_vm_id() -> str:
    return secrets.token_hex(6)


class Store:
    """VM folders under `vms_dir`."""

    def __init__(self, vms_dir: str) -> None:
        self.vms_dir = vms_dir
        os.makedirs(vms_dir, mode=0o755, exist_ok=True)

    def vm_dir(self, vm_id: str) -> str:
        if not NAME_RE.match(vm_id):
            raise ValueError("bad VM id")
        return os.path.join(self.vms_dir, vm_id)

    def load(self) -> Tuple[Dict[str, VmSpec], Dict[str, str]]:
        """(specs by id, reasons by id for broken entries)."""
        specs: Dict[str, VmSpec] = {}
        broken: Dict[str, str] = {}
        for name in entry_folders(self.vms_dir, NAME_RE, log):
            try:
                spec = self.read(name)
            except (OSError, ValueError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                broken[name] = reason
                log.error("vm %s: broken entry: %s", name, reason)
                continue
            specs[name] = spec
        return specs, broken

    def read(self, vm_id: str) -> VmSpec:
        path = os.path.join(self.vm_dir(vm_id), SPEC_FILE)
        with open(path, "rb") as f:
            raw = f.read(SPEC_MAX_BYTES + 1)
        if len(raw) > SPEC_MAX_BYTES:
            raise SpecError("vm.json is larger than 1 MiB")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpecError("vm.json is not valid JSON: %s" % e) from None
        spec = VmSpec.from_json(data)
        if spec.id != vm_id:
            raise SpecError("vm.json says id %r but lives in %r" % (spec.id, vm_id))
        return spec

    def save(self, spec: VmSpec) -> None:
        spec.validate()
        d = self.vm_dir(spec.id)
        os.makedirs(os.path.join(d, "logs"), mode=0o755, exist_ok=True)
        atomic_write_json(os.path.join(d, SPEC_FILE), spec.to_json())

    def create(self, spec: VmSpec) -> None:
        d = self.vm_dir(spec.id)
        os.makedirs(d, mode=0o755)
        try:
            spec.created_at = spec.created_at or time.time()
            self.save(spec)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def delete(self, vm_id: str) -> None:
        d = self.vm_dir(vm_id)
        # Rename first: a crash half-way leaves a hidden folder, not a broken VM.
        trash = os.path.join(self.vms_dir, ".deleted-%s-%d" % (vm_id, int(time.time() * 1000)))
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def save_runtime(self, vm_id: str, state: Dict[str, Any]) -> None:
        atomic_write_json(os.path.join(self.vm_dir(vm_id), RUNTIME_FILE), state)

    def load_runtime(self, vm_id: str) -> Dict[str, Any]:
        try:
            with open(os.path.join(self.vm_dir(vm_id), RUNTIME_FILE)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}
