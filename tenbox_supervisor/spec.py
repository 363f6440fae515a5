"""A VM's spec: the dataclass stored as vm.json and the checks every stored spec passes (daemon, root).

The model of one VM's configuration, after Firecracker's vmm_config: what a
VM is made of, validated whole whenever it is read or written. Request
parameters are turned into these values by params.py; the limits come from
the worker's protocol (tenbox_vmm.protocol.Limits), so the store never
accepts what the runtime would refuse.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from tenbox_supervisor.protocol import NAME_RE
from tenbox_supervisor.restart_policy import RestartPolicy
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.disk_arg import DiskArg


OVERLAY_NAME = "disk.qcow2"  # a VM's own qcow2 overlay of its template, in its folder
# A VM's cloud-init inputs (cloudinit.py), as vm.create checked them, and its instance-id.
CLOUD_INIT_STORED = ("instance_id", "user", "hostname", "ssh_keys", "user_data_b64", "network_config")
SEED_KEY = "cloud_init_seed"  # marks the disk entry of a VM's NoCloud seed (its folder's seed.iso)


class SpecError(ValueError):
    """A VM spec field is missing or invalid."""


@dataclass
class VmSpec:
    id: str
    name: str
    kernel: str
    initrd: Optional[str] = None
    cmdline: Optional[str] = None  # None: the runtime's default
    memory_mb: int = Limits.MEMORY_DEFAULT_MB
    cpus: int = 1
    disks: List[Dict[str, Any]] = field(default_factory=list)
    net: Dict[str, Any] = field(default_factory=dict)
    image: Optional[str] = None
    template: Optional[str] = None  # the file the owned overlay (the first disk) is backed by
    # Paths named by a user other than root, with that user's uid: vm.start opens them
    # again with that user's rights (caller_files.py). Absent: named by root or the daemon.
    named_by: Dict[str, int] = field(default_factory=dict)
    created_at: float = 0.0
    autostart: bool = False  # started when tenboxd starts after a host boot
    restart: str = "no"  # the restart policy (restart_policy.py): no, on-failure[:N], always
    # Provisioning by the image's cloud-init (CLOUD_INIT_STORED); empty: the VM has no seed disk.
    cloud_init: Dict[str, Any] = field(default_factory=dict)
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
        if len(self.disks) > Limits.DISKS_MAX:
            raise SpecError("at most %d disks" % Limits.DISKS_MAX)
        for d in self.disks:
            check_disk(d)
        if self.net:
            check_net(self.net)
        if not isinstance(self.created_at, (int, float)):
            raise SpecError("created_at must be a number")
        if self.template is not None and not (isinstance(self.template, str) and os.path.isabs(self.template)):
            raise SpecError("template must be an absolute path")
        if not isinstance(self.named_by, dict) or not all(
                isinstance(p, str) and isinstance(u, int) and not isinstance(u, bool) and u >= 0
                for p, u in self.named_by.items()):
            raise SpecError("named_by must map paths to uids")
        if not isinstance(self.autostart, bool):
            raise SpecError("autostart must be a boolean")
        try:
            RestartPolicy.parse(self.restart)
        except ValueError as e:
            raise SpecError(str(e)) from None
        if not isinstance(self.cloud_init, dict) or not all(
                k in CLOUD_INIT_STORED and (v is None or isinstance(v, str)) for k, v in self.cloud_init.items()):
            raise SpecError("cloud_init must map %s to strings" % ", ".join(CLOUD_INIT_STORED))
        if self.cloud_init and not self.cloud_init.get("instance_id"):
            raise SpecError("cloud_init has no instance_id")

    def seed_disk(self) -> Optional[Dict[str, Any]]:
        """The disk entry of the VM's cloud-init seed, if it has one."""
        return next((d for d in self.disks if d.get(SEED_KEY)), None)

    @property
    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy.parse(self.restart)

    def paths(self) -> List[str]:
        """Every host file the VM's worker opens by name: kernel, initrd, disks, the overlay's template."""
        out = [self.kernel] + ([self.initrd] if self.initrd else []) + [d["path"] for d in self.disks]
        if self.template and any(d.get("owned") for d in self.disks):
            out.append(self.template)
        return out


def check_disk(d: Any) -> None:
    """A disk entry: {"path": absolute, "read_only": bool, "serial": str, "owned": bool, "format": "raw"|"qcow2",
    "backing": [absolute, ...]}.

    "format" is absent only in specs stored before formats were recorded:
    the worker then probes the image. "backing", the image's backing files
    nearest first, is recorded for the overlays tenboxd makes (worker_files.py).
    """
    if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not os.path.isabs(d["path"]):
        raise SpecError("each disk needs an absolute path")
    if "," in d["path"] or "\0" in d["path"]:
        raise SpecError("disk path %r contains a comma or NUL" % d["path"])
    if not isinstance(d.get("read_only", False), bool) or not isinstance(d.get("owned", False), bool):
        raise SpecError("disk read_only and owned are booleans")
    if d.get("format", "raw") not in Limits.DISK_FORMATS:
        raise SpecError("disk format must be %s" % " or ".join(Limits.DISK_FORMATS))
    backing = d.get("backing", [])
    if not isinstance(backing, list) or len(backing) > Limits.BACKING_CHAIN_MAX or not all(
            isinstance(p, str) and os.path.isabs(p) and "\0" not in p for p in backing):
        raise SpecError("disk backing must be a list of at most %d absolute paths" % Limits.BACKING_CHAIN_MAX)
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
