"""The worker's resource limits that need no cgroup: rlimits (worker, set while root or by any user).

tenboxd puts each worker in a cgroup with MemoryMax and TasksMax (a
systemd scope, or a cgroup of its own without systemd). These rlimits
apply in every case, standalone runs included, as the bound of last
resort where no cgroup could be made (docs/security-sandbox.md):
RLIMIT_DATA for memory, RLIMIT_NPROC for tasks (per user: all workers
together), and no core files (a core of a worker is its guest's memory).
"""

from __future__ import annotations

import resource
from typing import Dict, Optional

from tenbox_vmm.protocol.limits import Limits
from tenbox_vmm.protocol.sandbox import worker_data_max


class LimitError(Exception):
    """An rlimit could not be set; the message names it."""


def worker_rlimits(memory_mb: Optional[int], cpus: int) -> Dict[int, int]:
    """The rlimits of a worker of that size; with `memory_mb` None, all but RLIMIT_DATA (a spare's: its
    machine is not known yet)."""
    limits = {
        resource.RLIMIT_NPROC: Limits.WORKER_USER_TASKS_MAX,
        resource.RLIMIT_CORE: 0,
    }
    if memory_mb is not None:
        limits[resource.RLIMIT_DATA] = worker_data_max(memory_mb, cpus)
    return limits


def apply(limits: Dict[int, int]) -> None:
    """Set soft and hard limits; a hard limit already lower (the caller's ulimit) is kept."""
    for which, value in limits.items():
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as e:
            raise LimitError("cannot set rlimit %d to %d: %s" % (which, value, e)) from None
