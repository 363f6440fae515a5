"""How a worker ended, judged: the VM's next state and its `last_failure` (daemon, root; pure).

Everything the judgement needs is passed in (the exit status the host
reported, the worker's own EXIT message, whether a stop was asked for or the
worker was declared lost), so tests/unit/test_supervisor_failures.py drives
it by tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from tenbox_supervisor.protocol import FailureCode
from tenbox_vmm.protocol import ExitCode, VmState

F = FailureCode
FAILURE_BY_EXIT = {
    ExitCode.ERROR: (F.WORKER_ERROR, "tenbox-vm-runtime failed"),
    ExitCode.USAGE: (F.START_FAILED, "tenbox-vm-runtime refused the VM's configuration"),
    ExitCode.TRIPLE_FAULT: (F.TRIPLE_FAULT, "the guest triple-faulted"),
    ExitCode.KVM_ERROR: (F.KVM_ERROR, "KVM reported an error"),
    ExitCode.GUEST_CRASH: (F.GUEST_CRASH, "the guest reported a crash"),
    ExitCode.SANDBOX: (F.SANDBOX_FAILED, "tenbox-vm-runtime could not enter its sandbox"),
}
# SECCOMP_RET_KILL_PROCESS ends the worker with SIGSYS; nothing else in a worker raises it.
SECCOMP_SIGNAL = "SIGSYS"


@dataclass(frozen=True)
class Failure:
    code: FailureCode
    message: str
    time: float
    exit_code: Optional[int] = None
    signal: Optional[str] = None
    console: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {
            "code": self.code.value,
            "message": self.message,
            "time": self.time,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "console": self.console,
        }


@dataclass(frozen=True)
class WorkerEnd:
    """What is known when a worker process has ended."""

    status: Optional[int]  # from the host: exit code, or -signal; None for a worker we did not start
    exit_msg: Optional[Tuple[int, str]] = None  # the worker's EXIT message: (ExitCode, reason)
    stop_requested: Optional[str] = None  # the reason of the vm.stop / vm.shutdown that ended it
    lost: Optional[Failure] = None  # declared lost (heartbeat, start timeout) and killed by us


def judge_exit(end: WorkerEnd, now: float, signal_names: Dict[int, str],
               runtime_error: Callable[[], Optional[str]]) -> Tuple[VmState, Optional[Failure], str]:
    """(the VM's next state, its failure or None, the reason for the log and the listeners).

    `runtime_error` reads the worker's last error line from its log, asked
    only when it refused its configuration without saying why on the link.
    The failure's console lines are the caller's to add.
    """
    code: Optional[int] = None
    reason = ""
    if end.exit_msg is not None:
        code, reason = end.exit_msg
    elif end.status is not None and end.status >= 0:
        code = end.status
    failure: Optional[Failure] = None
    if end.stop_requested:
        return VmState.STOPPED, None, end.stop_requested
    if end.lost is not None:
        failure = end.lost
    elif end.status is not None and end.status < 0:
        name = signal_names.get(-end.status, str(-end.status))
        if name == SECCOMP_SIGNAL:
            failure = Failure(F.SANDBOX_VIOLATION, "the worker made a system call outside its seccomp filter and "
                              "was killed (SIGSYS); the kernel log names the call (audit type=1326)", now, signal=name)
        else:
            failure = Failure(F.KILLED, "the worker was killed by %s" % name, now, signal=name)
    elif code in (ExitCode.POWEROFF, ExitCode.STOPPED):
        return VmState.STOPPED, None, reason or "guest powered off"
    elif code is None:
        failure = Failure(F.WORKER_EXITED, "the worker exited; its status is unknown (it was started by an "
                          "earlier tenboxd)", now)
    else:
        try:
            fcode, fmsg = FAILURE_BY_EXIT[ExitCode(code)]
        except (ValueError, KeyError):
            fcode, fmsg = F.WORKER_ERROR, "tenbox-vm-runtime exited with status %s" % code
        message = "%s: %s" % (fmsg, reason) if reason else fmsg
        if code == ExitCode.USAGE and not reason:
            message = runtime_error() or fmsg
        failure = Failure(fcode, message, now, exit_code=code)
    if failure.exit_code is None and code is not None:
        failure = replace(failure, exit_code=code)
    return VmState.CRASHED, failure, "%s: %s" % (failure.code.value, failure.message)
