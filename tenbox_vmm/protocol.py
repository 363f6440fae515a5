"""What tenbox-vm-runtime tells the world: exit codes and VM states (worker; imported by the daemon).

The worker link's messages join this module with the supervisor issue; the
exit codes are the runtime's contract with anyone who starts it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit status of tenbox-vm-runtime. Documented in docs/runtime.md."""

    POWEROFF = 0  # the guest powered itself off
    ERROR = 1  # an unexpected error inside tenbox-vm-runtime (a bug: see the log)
    USAGE = 2  # bad command line or input: kernel, initrd, memory, cpus, /dev/kvm
    STOPPED = 3  # stopped by the host: SIGTERM/SIGINT/SIGHUP, Ctrl-], or a stop command
    TRIPLE_FAULT = 4  # the guest triple-faulted (KVM_EXIT_SHUTDOWN); vCPU state in the log
    KVM_ERROR = 5  # KVM internal error, failed entry or unhandled exit; vCPU state in the log
    GUEST_CRASH = 6  # the guest reported a crash (KVM system event "crash")

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
}


class VmState(str, enum.Enum):
    """Lifecycle states of a VM, shared by worker and daemon."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    CRASHED = "crashed"
