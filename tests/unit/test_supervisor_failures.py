"""How a worker's end becomes the VM's next state and last_failure: one row per way a worker can end."""

import signal

import pytest

from tenbox_supervisor.failures import Failure, WorkerEnd, judge_exit
from tenbox_supervisor.oshost import SIGNAL_NAMES
from tenbox_supervisor.protocol import FailureCode as F
from tenbox_vmm.protocol import ExitCode, VmState

NOW = 1700000000.0
LOST = Failure(F.HEARTBEAT_LOST, "the worker stopped answering for 6s", NOW - 1)

# (case, end, next state, failure code or None, exit code, signal, message or reason)
CASES = [
    ("guest powered off", WorkerEnd(0, (ExitCode.POWEROFF, "guest powered off")),
     VmState.STOPPED, None, None, None, "guest powered off"),
    ("stopped by the host, EXIT sent", WorkerEnd(3, (ExitCode.STOPPED, "stopped by tenboxd")),
     VmState.STOPPED, None, None, None, "stopped by tenboxd"),
    ("powered off, no EXIT message", WorkerEnd(0), VmState.STOPPED, None, None, None, "guest powered off"),
    ("a stop we asked for wins over the status", WorkerEnd(-9, stop_requested="vm.stop by uid=0"),
     VmState.STOPPED, None, None, None, "vm.stop by uid=0"),
    ("killed by SIGKILL", WorkerEnd(-signal.SIGKILL), VmState.CRASHED, F.KILLED, None, "SIGKILL",
     "the worker was killed by SIGKILL"),
    ("killed by SIGSEGV", WorkerEnd(-signal.SIGSEGV), VmState.CRASHED, F.KILLED, None, "SIGSEGV",
     "the worker was killed by SIGSEGV"),
    ("declared lost, then killed", WorkerEnd(-signal.SIGKILL, lost=LOST), VmState.CRASHED, F.HEARTBEAT_LOST, None,
     None, LOST.message),
    ("adopted worker, status unknown", WorkerEnd(None), VmState.CRASHED, F.WORKER_EXITED, None, None,
     "the worker exited; its status is unknown (it was started by an earlier tenboxd)"),
    ("internal error", WorkerEnd(1, (ExitCode.ERROR, "internal error: boom")), VmState.CRASHED, F.WORKER_ERROR, 1,
     None, "tenbox-vm-runtime failed: internal error: boom"),
    ("bad configuration, reason on the link", WorkerEnd(2, (ExitCode.USAGE, "not a Linux kernel")), VmState.CRASHED,
     F.START_FAILED, 2, None, "tenbox-vm-runtime refused the VM's configuration: not a Linux kernel"),
    ("bad configuration, reason in the log", WorkerEnd(2), VmState.CRASHED, F.START_FAILED, 2, None,
     "--memory 8 is too small"),
    ("triple fault", WorkerEnd(4, (ExitCode.TRIPLE_FAULT, "guest triple fault at rip 0x1000")), VmState.CRASHED,
     F.TRIPLE_FAULT, 4, None, "the guest triple-faulted: guest triple fault at rip 0x1000"),
    ("KVM error", WorkerEnd(5), VmState.CRASHED, F.KVM_ERROR, 5, None, "KVM reported an error"),
    ("guest crash", WorkerEnd(6), VmState.CRASHED, F.GUEST_CRASH, 6, None, "the guest reported a crash"),
    ("killed by its seccomp filter", WorkerEnd(-signal.SIGSYS), VmState.CRASHED, F.SANDBOX_VIOLATION, None, "SIGSYS",
     "the worker made a system call outside its seccomp filter and was killed (SIGSYS); the kernel log names the "
     "call (audit type=1326)"),
    ("no sandbox", WorkerEnd(7, (ExitCode.SANDBOX, "cannot unshare the mount and IPC namespaces: Operation not "
                                 "permitted")), VmState.CRASHED, F.SANDBOX_FAILED, 7, None,
     "tenbox-vm-runtime could not enter its sandbox: cannot unshare the mount and IPC namespaces: Operation not "
     "permitted"),
    ("an undocumented status", WorkerEnd(77), VmState.CRASHED, F.WORKER_ERROR, 77, None,
     "tenbox-vm-runtime exited with status 77"),
]


@pytest.mark.parametrize("case, end, state, code, exit_code, sig, text", CASES, ids=[c[0] for c in CASES])
def test_each_way_a_worker_ends_has_its_state_and_failure(case, end, state, code, exit_code, sig, text):
    final, failure, why = judge_exit(end, NOW, SIGNAL_NAMES, lambda: "--memory 8 is too small")
    assert final == state
    if code is None:
        assert failure is None and why == text
        return
    assert (failure.code, failure.exit_code, failure.signal, failure.message) == (code, exit_code, sig, text)
    assert why == "%s: %s" % (code.value, text)


def test_a_failure_is_stored_with_the_keys_vm_list_shows():
    failure = Failure(F.KILLED, "the worker was killed by SIGKILL", NOW, signal="SIGKILL", console=["idle: ready"])
    assert list(failure.to_json().items()) == [("code", "killed"), ("message", "the worker was killed by SIGKILL"),
                                               ("time", NOW), ("exit_code", None), ("signal", "SIGKILL"),
                                               ("console", ["idle: ready"])]
