"""Host and per-VM resource figures from psutil (daemon)."""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Iterable, Optional

import psutil


def host_memory_mb() -> int:
    return psutil.virtual_memory().total // (1 << 20)


def host_memory_available_mb() -> int:
    return psutil.virtual_memory().available // (1 << 20)


def host_resources(data_dir: str) -> Dict[str, Any]:
    vm = psutil.virtual_memory()
    try:
        disk = shutil.disk_usage(data_dir)
        disk_total, disk_free = disk.total, disk.free
    except OSError:
        disk_total = disk_free = 0
    return {
        "memory_total_bytes": vm.total,
        "memory_available_bytes": vm.available,
        "disk_total_bytes": disk_total,
        "disk_available_bytes": disk_free,
        "cpu_count": psutil.cpu_count() or 1,
        "load_1m": os.getloadavg()[0],
    }


def ksm_state(sysfs: str = "/sys/kernel/mm/ksm") -> Optional[Dict[str, int]]:
    """The host's KSM, which merges the standby workers' identical pages when the operator runs it
    (docs/daemon.md): {"run": 0, 1 or 2, "saved_bytes": what its merges save host-wide}, or None without KSM
    in the kernel."""
    try:
        with open(os.path.join(sysfs, "run")) as f:
            run = int(f.read())
        with open(os.path.join(sysfs, "pages_sharing")) as f:
            sharing = int(f.read())
    except (OSError, ValueError):
        return None
    return {"run": run, "saved_bytes": sharing * os.sysconf("SC_PAGE_SIZE")}


_procs: Dict[int, psutil.Process] = {}


def process_resources(pid: int) -> Optional[Dict[str, Any]]:
    """RSS, CPU% (100 = one core, since the previous call) and USS of a worker."""
    try:
        p = _procs.get(pid)
        if p is None:
            p = _procs[pid] = psutil.Process(pid)
            p.cpu_percent(None)
        mem = p.memory_info()
        return {"rss_bytes": mem.rss, "cpu_percent": p.cpu_percent(None)}
    except psutil.Error:
        _procs.pop(pid, None)
        return None


def vm_summary(vms: Iterable, broken: int = 0) -> Dict[str, int]:
    out = {"total": 0, "running": 0, "starting": 0, "stopping": 0, "rebooting": 0, "stopped": 0, "crashed": 0,
           "broken": broken}
    for vm in vms:
        out["total"] += 1
        out[vm.state.value] = out.get(vm.state.value, 0) + 1
    return out


def dir_usage(path: str) -> int:
    """Bytes allocated by the files under `path` (what a VM's folder costs on disk)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total
