"""The VM store: <data_dir>/vms/<id>/ with vm.json and runtime.json (daemon, root).

Specs are written atomically. A vm.json that cannot be read or makes no
sense is reported as a broken entry with the reason; it never stops the
daemon and never hides the other VMs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

from tenbox_supervisor.fsutil import atomic_write_json, entry_folders
from tenbox_supervisor.modes import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, make_log_dir
from tenbox_supervisor.protocol import NAME_RE
from tenbox_supervisor.spec import SpecError, VmSpec

log = logging.getLogger("tenboxd.store")

SPEC_FILE = "vm.json"
RUNTIME_FILE = "runtime.json"
SPEC_MAX_BYTES = 1 << 20


class Store:
    """VM folders under `vms_dir`, 0700 each; their logs go to group `log_gid` (modes.py)."""

    def __init__(self, vms_dir: str, log_gid: Optional[int] = None) -> None:
        self.vms_dir = vms_dir
        self.log_gid = log_gid
        os.makedirs(vms_dir, mode=PRIVATE_DIR_MODE, exist_ok=True)

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
        self.make_logs(spec.id)
        atomic_write_json(os.path.join(d, SPEC_FILE), spec.to_json(), PRIVATE_FILE_MODE)

    def make_folder(self, vm_id: str) -> str:
        """A new VM's empty folder (FileExistsError if the id is taken); its vm.json comes with save()."""
        d = self.vm_dir(vm_id)
        os.mkdir(d, PRIVATE_DIR_MODE)
        return d

    def make_logs(self, vm_id: str) -> str:
        """The VM's logs/ folder, made if missing, with its mode and group; its path."""
        path = os.path.join(self.vm_dir(vm_id), "logs")
        make_log_dir(path, self.log_gid)
        return path

    def delete(self, vm_id: str) -> None:
        d = self.vm_dir(vm_id)
        # Rename first: a crash half-way leaves a hidden folder, not a broken VM.
        trash = os.path.join(self.vms_dir, ".deleted-%s-%d" % (vm_id, int(time.time() * 1000)))
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def save_runtime(self, vm_id: str, state: Dict[str, Any]) -> None:
        atomic_write_json(os.path.join(self.vm_dir(vm_id), RUNTIME_FILE), state, PRIVATE_FILE_MODE)

    def load_runtime(self, vm_id: str) -> Dict[str, Any]:
        try:
            with open(os.path.join(self.vm_dir(vm_id), RUNTIME_FILE)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}
