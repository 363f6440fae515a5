"""What tenbox-vm-runtime promises the world: exit codes, states, link messages, limits, argument grammar (worker; imported by the daemon).

The one part of tenbox_vmm that tenboxd may import (docs/architecture.md):
exit codes (here), VM states and the worker link's messages (link.py), the
limits of a VM (limits.py), the --disk value (disk_arg.py) and the
port-forward grammar (forwards.py, imported by name: it is the only
module here that pulls in more of the standard library).
"""

from __future__ import annotations

import enum

from tenbox_vmm import __version__ as VERSION
from tenbox_vmm.protocol.disk_arg import DiskArg
from tenbox_vmm.protocol.limits import Limits
from tenbox_vmm.protocol.link import (
    HEARTBEAT_INTERVAL_SEC,
    HEARTBEAT_LIVENESS,
    LINK_VERSION,
    Command,
    CommandName,
    ConsoleData,
    Heartbeat,
    Hello,
    Message,
    Msg,
    NetReport,
    NetStatus,
    Reply,
    StateReport,
    UnknownCommand,
    VmState,
    WorkerExit,
    Who,
    decode,
    encode,
)


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

__all__ = [
    "Command", "CommandName", "ConsoleData", "DiskArg", "ExitCode", "HEARTBEAT_INTERVAL_SEC", "HEARTBEAT_LIVENESS",
    "Heartbeat", "Hello", "LINK_VERSION", "Limits", "Message", "Msg", "NetReport", "NetStatus", "Reply",
    "StateReport", "UnknownCommand", "VERSION", "VmState", "WorkerExit", "Who", "decode", "encode",
]
