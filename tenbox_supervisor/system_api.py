"""The doctor and system.info methods: the host, the daemon and a summary of its VMs (daemon, root)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Protocol

from tenbox_supervisor import doctor, telemetry
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.config import Config
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.protocol import VERSION, Method


class VmCounts(Protocol):
    def all(self) -> List[ManagedVm]:
        ...

    def broken(self) -> Dict[str, str]:
        ...


class SystemMethods:
    def __init__(self, config: Config, started_at: float, vms: VmCounts,
                 standby: Optional[Callable[[], Dict[str, Any]]] = None) -> None:
        self.config = config
        self.started_at = started_at
        self.vms = vms
        self.standby = standby  # the standby workers' counts (standby.py), where there are any

    def method_specs(self) -> List[MethodSpec]:
        return [
            MethodSpec(Method.DOCTOR, self.doctor, mutating=False),
            MethodSpec(Method.SYSTEM_INFO, self.system_info, mutating=False),
        ]

    async def doctor(self, params, caller: Caller):
        return doctor.run_checks()

    async def system_info(self, params, caller: Caller):
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_sec": time.time() - self.started_at,
            "data_dir": self.config.data_dir,
            "socket_path": self.config.socket_path,
            "cloud_url": self.config.cloud_url,
            "vm_summary": telemetry.vm_summary(self.vms.all(), len(self.vms.broken())),
            "resources": telemetry.host_resources(self.config.data_dir),
            "doctor": doctor.run_checks(),
            "standby_workers": self.standby() if self.standby else {"wanted": 0, "ready": 0, "pids": [], "spares": []},
            "ksm": telemetry.ksm_state(),
        }
