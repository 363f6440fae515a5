"""What tenbox-vm-runtime promises the world: exit codes, states, link messages, limits, argument grammar (worker; imported by the daemon and the CLI).

The one part of tenbox_vmm that tenboxd may import (docs/architecture.md):
exit codes and VM states (here), the limits of a VM (limits.py, also here),
the worker link's messages (link.py), the --disk value (disk_arg.py), the
port-forward grammar (forwards.py) and the image tool's answer
(imagetool.py). Those are imported by their module's name: this package's
own import stays light, because the CLI loads it at every start.
"""

from __future__ import annotations

import enum

from tenbox_vmm import __version__ as VERSION
from tenbox_vmm.protocol.limits import Limits


class ExitCode(enum.IntEnum):
    """Exit status of tenbox-vm-runtime. Documented in docs/runtime.md."""

    POWEROFF = 0  # the guest powered itself off
    ERROR = 1  # an unexpected error inside tenbox-vm-runtime (a bug: see the log)
    USAGE = 2  # bad command line or input: kernel, initrd, memory, cpus, /dev/kvm
    STOPPED = 3  # stopped by the host: SIGTERM/SIGINT/SIGHUP, Ctrl-], or a stop command
    TRIPLE_FAULT = 4  # the guest triple-faulted (KVM_EXIT_SHUTDOWN); vCPU state in the log
    KVM_ERROR = 5  # KVM internal error, failed entry or unhandled exit; vCPU state in the log
    GUEST_CRASH = 6  # the guest reported a crash (KVM system event "crash")
    SANDBOX = 7  # the worker sandbox could not be set up (namespaces, user, seccomp): the guest never ran

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    ExitCode.POWEROFF: "guest powered off",
    ExitCode.ERROR: "internal error in tenbox-vm-runtime",
    ExitCode.USAGE: "bad command line or input",
    ExitCode.STOPPED: "stopped by the host",
    ExitCode.TRIPLE_FAULT: "guest triple fault",
    ExitCode.KVM_ERROR: "KVM error",
    ExitCode.GUEST_CRASH: "guest crashed",
    ExitCode.SANDBOX: "worker sandbox failed",
}



class VmState(str, enum.Enum):
    """Lifecycle states of a VM, shared by worker and daemon."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    CRASHED = "crashed"


__all__ = ["ExitCode", "Limits", "VERSION", "VmState"]
