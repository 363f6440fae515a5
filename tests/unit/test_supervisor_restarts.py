"""Restart policies and autostart on a fake host: which ends restart a VM, the backoff on the Host's clock, giving up."""

import json
import signal

import pytest

from tenbox_supervisor import params as P
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import ErrorCode, FailureCode
from tenbox_supervisor.restart_policy import RESET_WINDOW_SEC, RestartName, RestartPolicy, backoff_sec
from tenbox_supervisor.restarter import first_start_since_boot
from tenbox_supervisor.spec import SpecError, VmSpec
from tenbox_vmm.protocol import ExitCode, VmState
from tenbox_vmm.protocol.link import WorkerExit

S = VmState


def answer_every_spawn(rig, vm):
    """Every worker of `vm` says HELLO as running, as a real one would once its guest boots."""
    rig.host.on_spawn = lambda proc: rig.hello(vm, proc.pid)


def running(rig, name="web", **fields):
    """A VM created with `fields` (its policy) and started; its workers say HELLO as running."""
    vm = rig.create(name, **fields)
    answer_every_spawn(rig, vm)
    rig.run(rig.workers.start(vm))
    return vm


def crash(rig, vm, status=-signal.SIGKILL):
    rig.host.exit(vm.pid, status)
    rig.settle()


def elapse(rig, seconds):
    """Time passes on the host's clocks; the restarter looks for due starts and they run."""
    rig.host.advance(seconds)
    rig.restarter.tick()
    rig.settle()


def due_in(rig, vm):
    return rig.restarter.pending()[vm.id] - rig.host.mono


# The policy's words ---------------------------------------------------------------------


@pytest.mark.parametrize("text, name, most", [
    ("no", RestartName.NO, None), ("always", RestartName.ALWAYS, None),
    ("on-failure", RestartName.ON_FAILURE, None), ("on-failure:3", RestartName.ON_FAILURE, 3),
])
def test_policies_parse_and_print_as_written(text, name, most):
    policy = RestartPolicy.parse(text)
    assert (policy.name, policy.max_retries, str(policy)) == (name, most, text)


@pytest.mark.parametrize("text, words", [
    ("sometimes", "restart must be no, on-failure[:N]"), ("on-failure:0", "must be 1 to"),
    ("on-failure:-1", "restart must be"), ("always:3", "only on-failure takes a retry count"),
    ("", "restart must be"), (3, "restart must be"), ("on-failure:1001", "must be 1 to 1000"),
])
def test_a_bad_policy_is_one_line_invalid_argument(text, words):
    with pytest.raises(ApiError) as e:
        P.restart_policy({"restart": text})
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and words in e.value.message and "\n" not in e.value.message


def test_backoff_doubles_from_one_second_up_to_a_minute():
    assert [backoff_sec(n) for n in (1, 2, 3, 4, 7, 8, 50)] == [1, 2, 4, 8, 60, 60, 60]


def test_a_vm_json_without_the_fields_loads_with_no_policy_and_a_bad_one_is_refused(rig):
    spec = rig.new_spec("old")
    stored = {k: v for k, v in spec.to_json().items() if k not in ("autostart", "restart")}
    loaded = VmSpec.from_json(json.loads(json.dumps(stored)))
    assert (loaded.autostart, loaded.restart, loaded.extra) == (False, "no", {})
    with pytest.raises(SpecError):
        VmSpec.from_json(dict(stored, restart="on-failure:0"))
    with pytest.raises(SpecError):
        VmSpec.from_json(dict(stored, autostart="yes"))


# Which ends restart a VM ----------------------------------------------------------------


def test_on_failure_restarts_with_doubling_backoff_and_gives_up_after_n(rig):
    """Each crash waits 1 s, 2 s, 4 s on the host's clock; the crash after the third restart ends it crashed."""
    rig.with_restarter()
    vm = running(rig, restart="on-failure:3")
    for attempt, delay in ((1, 1.0), (2, 2.0), (3, 4.0)):
        crash(rig, vm)
        status = vm.restart_status
        assert vm.state == S.CRASHED and vm.last_failure["code"] == FailureCode.KILLED.value
        assert status["attempts"] == attempt - 1 and status["max_retries"] == 3 and status["gave_up"] is None
        assert status["next_retry_at"] - vm.last_failure["time"] == delay and due_in(rig, vm) == delay
        spawns = len(rig.host.spawned)
        elapse(rig, delay - 0.1)
        assert len(rig.host.spawned) == spawns and vm.state == S.CRASHED  # not before its time
        elapse(rig, 0.1)
        assert len(rig.host.spawned) == spawns + 1 and vm.state == S.RUNNING
        assert vm.restart_status["attempts"] == attempt and vm.restart_status["next_retry_at"] is None
    crash(rig, vm)
    assert vm.state == S.CRASHED and rig.restarter.pending() == {}
    assert vm.restart_status["gave_up"] == "on-failure:3: gave up after 3 restarts"
    assert vm.last_failure["code"] == FailureCode.KILLED.value
    assert rig.store.load_runtime(vm.id)["restart"]["gave_up"] == "on-failure:3: gave up after 3 restarts"


@pytest.mark.parametrize("policy, restarts", [("no", False), ("on-failure", False), ("always", True)])
def test_a_guest_poweroff_is_not_a_failure_only_always_restarts_it(rig, policy, restarts):
    rig.with_restarter()
    vm = running(rig, restart=policy)
    rig.workers.on_link_message(vm.id, WorkerExit(ExitCode.POWEROFF, "guest powered off"))
    crash(rig, vm, ExitCode.POWEROFF)
    assert vm.state == S.STOPPED and vm.last_failure is None
    assert (vm.id in rig.restarter.pending()) is restarts


@pytest.mark.parametrize("status", [-signal.SIGKILL, ExitCode.KVM_ERROR, ExitCode.ERROR])
def test_no_policy_leaves_a_crash_alone(rig, status):
    rig.with_restarter()
    vm = running(rig)
    crash(rig, vm, status)
    assert vm.state == S.CRASHED and rig.restarter.pending() == {} and vm.restart_status is None


def test_a_requested_stop_is_never_undone_even_with_always(rig):
    rig.with_restarter()
    vm = running(rig, restart="always")
    crash(rig, vm)
    elapse(rig, 1.0)
    assert vm.state == S.RUNNING and vm.restart_status["attempts"] == 1
    rig.loop.call_later(0.02, rig.host.exit, vm.pid, ExitCode.STOPPED)
    rig.run(rig.workers.stop(vm, "vm.stop by test"))
    assert vm.state == S.STOPPED and rig.restarter.pending() == {} and vm.restart_status is None


def test_a_lost_heartbeat_is_a_failure(rig):
    rig.with_restarter()
    vm = running(rig, restart="on-failure")
    rig.host.exit_on_kill = True
    rig.host.advance(10)
    rig.workers.tick()
    rig.settle()
    assert vm.last_failure["code"] == FailureCode.HEARTBEAT_LOST.value and due_in(rig, vm) == 1.0


def test_a_vm_that_ran_through_the_reset_window_counts_from_one_again(rig):
    rig.with_restarter()
    vm = running(rig, restart="on-failure:2")
    crash(rig, vm)
    elapse(rig, 1.0)
    assert vm.state == S.RUNNING and vm.restart_status["attempts"] == 1
    rig.host.advance(RESET_WINDOW_SEC)
    rig.restarter.tick()
    assert vm.restart_status is None  # recovered: nothing to show
    crash(rig, vm)
    assert vm.restart_status["attempts"] == 0 and due_in(rig, vm) == 1.0


def test_a_crash_the_runtime_calls_a_bad_configuration_gives_up_at_once(rig):
    rig.with_restarter()
    vm = running(rig, restart="always")
    rig.workers.on_link_message(vm.id, WorkerExit(ExitCode.USAGE, "kernel is not a Linux kernel"))
    crash(rig, vm, ExitCode.USAGE)
    assert vm.state == S.CRASHED and rig.restarter.pending() == {}
    assert vm.restart_status["gave_up"] == "always: start_failed cannot be fixed by starting it again"


def test_a_vanished_kernel_ends_the_policy_after_one_refused_start_no_hot_loop(rig):
    """vm.start's file check refuses (file_missing): no worker is spawned, nothing more is scheduled."""
    calls = []

    async def refuse(vm):
        calls.append(vm.id)
        rig.workers.record_failure(vm, FailureCode.FILE_MISSING, "kernel /boot/vmlinuz: No such file or directory")
        raise ApiError(ErrorCode.FILE_MISSING, "kernel /boot/vmlinuz: No such file or directory")

    rig.with_restarter(refuse)
    vm = running(rig, restart="always")
    crash(rig, vm)
    elapse(rig, 1.0)
    for _ in range(5):
        elapse(rig, 60)
    assert calls == [vm.id] and len(rig.host.spawned) == 1 and vm.state == S.CRASHED
    assert vm.last_failure["code"] == FailureCode.FILE_MISSING.value
    assert vm.restart_status["gave_up"] == ("always: kernel /boot/vmlinuz: No such file or directory (file_missing)")
    assert rig.restarter.pending() == {}


def test_a_refusal_that_may_pass_counts_as_an_attempt_and_waits_longer(rig):
    async def refuse(vm):
        raise ApiError(ErrorCode.INSUFFICIENT_MEMORY, "VM needs 64 MiB; the host has 10 MiB available")

    rig.with_restarter(refuse)
    vm = running(rig, restart="on-failure")
    crash(rig, vm)
    elapse(rig, 1.0)
    assert vm.restart_status["attempts"] == 1 and due_in(rig, vm) == 2.0


def test_vm_stop_cancels_a_waiting_restart_and_a_manual_start_clears_the_count(rig):
    rig.with_restarter()
    vm = running(rig, restart="always")
    crash(rig, vm)
    assert rig.restarter.cancel(vm) is True and rig.restarter.pending() == {} and vm.restart_status is None
    assert rig.restarter.cancel(vm) is False
    crash_again = rig.create("other", restart="always")
    answer_every_spawn(rig, crash_again)
    rig.run(rig.workers.start(crash_again))
    crash(rig, crash_again)
    rig.run(rig.workers.start(crash_again))  # the operator starts it before the policy does
    assert crash_again.state == S.RUNNING and crash_again.restart_status is None and rig.restarter.pending() == {}


def test_a_policy_edited_to_no_drops_the_waiting_restart(rig):
    rig.with_restarter()
    vm = running(rig, restart="on-failure")
    crash(rig, vm)
    rig.workers.update_spec(vm, VmSpec.from_json(dict(vm.spec.to_json(), restart="no")))
    elapse(rig, 1.0)
    assert len(rig.host.spawned) == 1 and vm.state == S.CRASHED and vm.restart_status is None


# Host boot and tenboxd restarts -------------------------------------------------------------


def test_the_first_start_of_a_boot_starts_autostart_and_always_vms_later_ones_nothing(rig, tmp_path):
    rig.with_restarter()
    plain, auto, always, failing = (rig.create("plain"), rig.create("auto", autostart=True),
                                    rig.create("always", restart="always"), rig.create("failing", restart="on-failure"))
    for vm in (plain, always, failing):
        answer_every_spawn(rig, vm)
        rig.run(rig.workers.start(vm))  # they ran when the host went down; auto was stopped
    again = rig.restarted()  # no worker is adoptable: the host rebooted
    again.with_restarter()
    again.workers.restore()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert first_start_since_boot(str(run_dir)) is True and first_start_since_boot(str(run_dir)) is False
    again.restarter.boot(True)
    vms = {v.spec.name: v for v in again.workers.all()}
    again.host.on_spawn = None
    again.restarter.tick()
    again.settle()
    started = sorted(argv[argv.index("--vm-id") + 1] for argv, _, _ in again.host.spawned[3:])
    assert started == sorted([auto.id, always.id])
    assert vms["plain"].state == S.CRASHED and vms["plain"].last_failure["code"] == FailureCode.WORKER_LOST.value
    assert vms["failing"].state == S.CRASHED and again.restarter.pending()[failing.id] - again.host.mono == 1.0


def test_a_tenboxd_restart_in_the_same_boot_starts_nothing_and_keeps_a_waiting_restart(rig):
    rig.with_restarter()
    auto = rig.create("auto", autostart=True)
    vm = running(rig, "web", restart="on-failure")
    crash(rig, vm)
    rig.host.advance(0.25)
    again = rig.restarted()
    again.with_restarter()
    again.workers.restore()
    again.restarter.boot(False)
    assert again.restarter.pending() == {vm.id: again.host.mono + 0.75}
    again.restarter.tick()
    again.settle()
    assert len(again.host.spawned) == 1 and again.workers.get(auto.id).state == S.STOPPED


def test_a_host_shutdown_stops_with_its_reason_and_holds_every_restart(rig):
    """The power button with reason host_shutdown: stopped, not crashed, also if the worker dies on the way;
    after hold() no policy starts anything, not even a crash's restart."""
    rig.with_restarter()
    vm = running(rig, restart="always")
    other = running(rig, "other", restart="on-failure")
    third = running(rig, "third", restart="always")
    crash(rig, third)
    assert third.id in rig.restarter.pending()
    rig.restarter.hold()
    rig.loop.call_later(0.02, rig.host.exit, vm.pid, ExitCode.POWEROFF)
    assert rig.run(rig.workers.shutdown(vm, 5, reason="host_shutdown")) is True
    assert vm.state == S.STOPPED and vm.state_reason == "host_shutdown" and vm.last_failure is None
    rig.loop.call_later(0.02, rig.host.exit, other.pid, -signal.SIGKILL)
    rig.run(rig.workers.shutdown(other, 5, reason="host_shutdown"))
    assert other.state == S.STOPPED and other.state_reason == "host_shutdown"
    assert rig.store.load_runtime(vm.id)["reason"] == "host_shutdown"
    elapse(rig, 120)
    assert len(rig.host.spawned) == 3 and rig.restarter.pending() == {} and third.state == S.CRASHED
