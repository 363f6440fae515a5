"""The WorkerManager on a fake host: spawning, adoption, heartbeats, stops and exits, without a process."""

import errno
import os
import signal

import pytest

from tenbox_supervisor.errors import OperationError
from tenbox_supervisor.protocol import ErrorCode, FailureCode
from tenbox_supervisor.worker_files import WorkerFileError
from tenbox_supervisor.worker_manager import DUMP_GRACE_SEC, START_TIMEOUT_SEC
from tenbox_vmm.protocol import ExitCode, VmState
from tenbox_vmm.protocol.sandbox import worker_memory_max, worker_tasks_max
from tenbox_vmm.protocol.link import (
    HEARTBEAT_INTERVAL_SEC,
    HEARTBEAT_LIVENESS,
    LINK_VERSION,
    Command,
    CommandName,
    ConsoleData,
    Heartbeat,
    Hello,
    WorkerExit,
    Who,
)
from tests.framework.supervisor_fakes import CREATE_TIME

S = VmState


def transitions(rig, vm):
    return [(old, new) for vm_id, old, new, _ in rig.events if vm_id == vm.id]


def commands(rig, vm):
    return [m for vm_id, m in rig.sent if vm_id == vm.id and isinstance(m, Command)]


# Start ----------------------------------------------------------------------------------


def test_start_spawns_the_worker_and_the_vm_runs_when_it_says_so(rig):
    vm = rig.create(disks=[{"path": "/d/data.raw", "read_only": True, "serial": "s1", "owned": False,
                            "format": "raw"}])
    pid = rig.start_running(vm)
    assert vm.state == S.RUNNING and vm.session.hello and vm.last_failure is None
    assert transitions(rig, vm) == [(S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING)]
    argv, log_path, _ = rig.host.spawned[0]
    assert argv[argv.index("--vm-id") + 1] == vm.id and argv[argv.index("--disk") + 1] == "/d/data.raw,ro,serial=s1,format=raw"
    assert log_path.endswith("/logs/runtime.log")
    saved = rig.store.load_runtime(vm.id)
    assert saved["state"] == "running" and saved["pid"] == pid and saved["create_time"] == CREATE_TIME


def test_start_passes_the_vms_files_open_and_bounds_the_worker_by_the_vm_size(rig):
    vm = rig.create(disks=[{"path": "/d/data.raw", "read_only": True, "serial": "", "owned": False,
                            "format": "raw"}], cpus=2)
    rig.start_running(vm)
    files = rig.host.spawn_files[0]
    assert [(f.path, f.writable) for f in files[:2]] == [("/boot/vmlinuz", False), ("/d/data.raw", False)]
    assert [f.what for f in files[2:]] == ["console log"] * 3 + ["snapshot staging folder"] + ["runtime log"] * 3
    assert all(f.create for f in files[2:] if f.what != "snapshot staging folder")
    staging = [f for f in files if f.directory]
    assert len(staging) == 1 and staging[0].path.endswith("/snapshot-staging") and not staging[0].writable
    limits = rig.host.spawn_limits[0]
    assert (limits.memory_max, limits.tasks_max) == (worker_memory_max(64), worker_tasks_max(2))
    assert rig.host.spawned[0][2].startswith("tenbox-vm-%s-" % vm.id)


def test_a_disk_chain_is_read_at_each_start_and_recorded_for_the_overlays_tenboxd_made(rig):
    vm = rig.create(disks=[{"path": "/v/disk.qcow2", "format": "qcow2", "owned": True},
                           {"path": "/d/mine.qcow2", "format": "qcow2"}])
    rig.host.chains = {"/v/disk.qcow2": ["/i/rootfs.qcow2"], "/d/mine.qcow2": ["/d/base.qcow2"]}
    rig.start_running(vm)
    passed = [f.path for f in rig.host.spawn_files[0] if f.what.startswith("backing file")]
    assert passed == ["/i/rootfs.qcow2", "/d/base.qcow2"]
    assert vm.spec.disks[0]["backing"] == ["/i/rootfs.qcow2"] and "backing" not in vm.spec.disks[1]
    assert rig.store.load()[0][vm.id].disks[0]["backing"] == ["/i/rootfs.qcow2"]


def test_a_file_that_cannot_be_opened_fails_the_start_naming_it(rig):
    vm = rig.create()
    rig.host.spawn_error = WorkerFileError("cannot open kernel /boot/vmlinuz: Permission denied")
    with pytest.raises(OperationError) as e:
        rig.run(rig.workers.start(vm))
    assert e.value.code is ErrorCode.VM_START_FAILED
    assert e.value.message == "cannot open kernel /boot/vmlinuz: Permission denied"
    assert vm.state == S.STOPPED


def test_spawn_failing_with_emfile_is_vm_start_failed_and_the_vm_stays_stopped(rig):
    vm = rig.create()
    rig.host.spawn_error = OSError(errno.EMFILE, "Too many open files")
    with pytest.raises(OperationError) as e:
        rig.run(rig.workers.start(vm))
    assert e.value.code is ErrorCode.VM_START_FAILED
    assert e.value.message == "cannot start tenbox-vm-runtime: Too many open files"
    assert vm.state == S.STOPPED and vm.session is None and rig.events == []
    assert rig.store.load_runtime(vm.id)["state"] == "stopped"


def test_a_second_start_is_refused_while_the_vm_runs(rig):
    vm = rig.create()
    rig.start_running(vm)
    with pytest.raises(OperationError) as e:
        rig.run(rig.workers.start(vm))
    assert e.value.code is ErrorCode.VM_RUNNING and len(rig.host.spawned) == 1


def test_a_worker_that_refuses_its_configuration_fails_the_start_with_its_reason(rig):
    vm = rig.create()

    def refuse(proc):
        rig.hello(vm, proc.pid, state=S.STOPPED)
        rig.workers.on_link_message(vm.id, WorkerExit(ExitCode.USAGE, "kernel /boot/vmlinuz is not a Linux kernel"))
        rig.host.exit(proc.pid, ExitCode.USAGE)

    rig.host.on_spawn = refuse
    with pytest.raises(OperationError) as e:
        rig.run(rig.workers.start(vm))
    assert e.value.code is ErrorCode.VM_START_FAILED and "not a Linux kernel" in e.value.message
    assert vm.state == S.CRASHED and vm.last_failure["code"] == FailureCode.START_FAILED.value
    assert vm.last_failure["exit_code"] == ExitCode.USAGE


def test_a_worker_that_never_says_hello_is_killed_after_the_start_timeout(rig):
    vm = rig.create()
    rig.host.exit_on_kill = True
    starting = rig.loop.create_task(rig.workers.start(vm))
    rig.settle()
    assert vm.state == S.STARTING
    rig.workers.tick()
    assert rig.host.killed == []  # not yet
    rig.host.advance(START_TIMEOUT_SEC + 1)
    rig.workers.tick()
    assert rig.host.killed == [(vm.pid, signal.SIGUSR2)]  # its stacks to runtime.log first
    rig.workers.tick()
    assert rig.host.killed == [(vm.pid, signal.SIGUSR2)]
    rig.host.advance(DUMP_GRACE_SEC)
    rig.workers.tick()
    assert rig.host.killed == [(vm.pid, signal.SIGUSR2), (vm.pid, signal.SIGKILL)]
    with pytest.raises(OperationError) as e:
        rig.run(starting)
    assert vm.state == S.CRASHED and vm.last_failure["code"] == FailureCode.START_TIMEOUT.value
    assert e.value.code is ErrorCode.VM_START_FAILED and "did not connect within 30s" in e.value.message


# Heartbeats and exits ---------------------------------------------------------------------


def test_a_worker_silent_for_five_intervals_is_killed_and_the_vm_crashes_with_heartbeat_lost(rig):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.workers.on_link_message(vm.id, ConsoleData(b"idle: ready\n"))
    rig.host.advance(HEARTBEAT_INTERVAL_SEC * HEARTBEAT_LIVENESS - 0.5)
    rig.workers.tick()
    assert rig.host.killed == [] and isinstance(rig.sent[-1][1], Heartbeat)
    rig.workers.on_link_message(vm.id, Heartbeat(S.RUNNING))  # it answers: the silence starts again
    rig.host.advance(HEARTBEAT_INTERVAL_SEC * HEARTBEAT_LIVENESS - 0.5)
    rig.workers.tick()
    assert rig.host.killed == []
    rig.host.advance(1.0)
    rig.workers.tick()
    assert rig.host.killed == [(pid, signal.SIGUSR2)]
    rig.host.advance(DUMP_GRACE_SEC)
    rig.workers.tick()
    assert rig.host.killed == [(pid, signal.SIGUSR2), (pid, signal.SIGKILL)]
    rig.host.exit(pid, -signal.SIGKILL)
    rig.settle()
    f = vm.last_failure
    assert vm.state == S.CRASHED and f["code"] == FailureCode.HEARTBEAT_LOST.value and f["signal"] is None
    assert f["console"] == ["idle: ready"] and vm.session is None


def test_a_killed_workers_failure_carries_the_console_log_end_not_what_reached_tenboxd(rig):
    """The worker writes the console log itself; output it wrote but never sent
    (killed in between) is in the failure, which ends exactly as vm.logs does."""
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.workers.on_link_message(vm.id, ConsoleData(b"line 1\npartial"))
    logs = os.path.join(rig.workers.store.vm_dir(vm.id), "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "console.log"), "wb") as f:
        f.write(b"line 1\npartial line, finished\n\nline 3 cut")
    rig.host.exit(pid, -signal.SIGKILL)
    rig.settle()
    assert vm.last_failure["console"] == ["line 1", "partial line, finished", "", "line 3 cut"]


@pytest.mark.parametrize("status, code, sig", [
    (-signal.SIGKILL, FailureCode.KILLED, "SIGKILL"),
    (-signal.SIGSEGV, FailureCode.KILLED, "SIGSEGV"),
    (ExitCode.TRIPLE_FAULT, FailureCode.TRIPLE_FAULT, None),
    (ExitCode.KVM_ERROR, FailureCode.KVM_ERROR, None),
    (ExitCode.ERROR, FailureCode.WORKER_ERROR, None),
])
def test_an_exit_status_becomes_the_vms_failure(rig, status, code, sig):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.host.exit(pid, status)
    assert vm.state == S.CRASHED and vm.last_failure["code"] == code.value and vm.last_failure["signal"] == sig
    assert transitions(rig, vm)[-1] == (S.RUNNING, S.CRASHED)


def test_a_guest_poweroff_stops_the_vm_without_a_failure(rig):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.workers.on_link_message(vm.id, WorkerExit(ExitCode.POWEROFF, "guest powered off"))
    rig.host.exit(pid, ExitCode.POWEROFF)
    assert vm.state == S.STOPPED and vm.last_failure is None


def test_stop_asks_the_worker_and_the_vm_stops_when_it_exits(rig):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.loop.call_later(0.02, rig.host.exit, pid, ExitCode.STOPPED)
    rig.run(rig.workers.stop(vm, "vm.stop by test"))
    assert commands(rig, vm)[-1] == Command(0, CommandName.STOP, {"reason": "vm.stop by test"})
    assert vm.state == S.STOPPED and rig.host.killed == [] and vm.last_failure is None
    assert transitions(rig, vm)[-2:] == [(S.RUNNING, S.STOPPING), (S.STOPPING, S.STOPPED)]


def test_stop_without_a_link_sends_sigterm_and_a_deaf_worker_gets_sigkill(rig):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.connected = False
    rig.host.exit_on_kill = False
    rig.loop.call_later(0.05, lambda: setattr(rig.host, "exit_on_kill", True))
    rig.run(rig.workers.stop(vm, "vm.stop", timeout=0.1))
    assert rig.host.killed == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    assert vm.state == S.STOPPED


def test_stop_of_a_stopped_vm_is_vm_not_running(rig):
    vm = rig.create()
    with pytest.raises(OperationError) as e:
        rig.run(rig.workers.stop(vm))
    assert e.value.code is ErrorCode.VM_NOT_RUNNING


def test_reboot_goes_through_rebooting_as_the_worker_reports_it(rig):
    vm = rig.create()
    rig.start_running(vm)
    rig.run(rig.workers.reboot(vm))
    assert commands(rig, vm)[-1] == Command(0, CommandName.REBOOT)
    rig.report(vm, S.REBOOTING, "reset by the host")
    rig.report(vm, S.RUNNING, "boot 2")
    assert transitions(rig, vm)[-2:] == [(S.RUNNING, S.REBOOTING), (S.REBOOTING, S.RUNNING)]


# Adoption -------------------------------------------------------------------------------


def restart(rig, tmp_path):
    """A new WorkerManager on the same store and host: tenboxd restarted."""
    return rig.restarted()


def test_a_restarted_tenboxd_takes_back_a_worker_that_kept_running(rig, tmp_path):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.host.adoptable[(pid, vm.id)] = CREATE_TIME
    again = restart(rig, tmp_path)
    again.workers.restore()
    vm2 = again.workers.get(vm.id)
    assert vm2.state == S.RUNNING and vm2.pid == pid and not vm2.session.hello
    assert again.events == []  # restored, not transitioned
    again.workers.on_link_message(vm.id, Heartbeat(S.RUNNING))  # before its HELLO: asked who it is
    assert isinstance(again.sent[-1][1], Who)
    again.hello(vm2, pid)
    assert vm2.session.hello and vm2.state == S.RUNNING and again.events == []


def test_a_worker_gone_while_tenboxd_was_away_is_a_crash_with_worker_lost(rig, tmp_path):
    vm = rig.create()
    rig.start_running(vm)  # and nobody lets the next daemon adopt it: the process is gone
    again = restart(rig, tmp_path)
    again.workers.restore()
    vm2 = again.workers.get(vm.id)
    assert vm2.state == S.CRASHED and vm2.last_failure["code"] == FailureCode.WORKER_LOST.value
    assert [(old, new) for _, old, new, _ in again.events] == [(S.RUNNING, S.CRASHED)]
    assert again.host.cleared == [vm.id], "what the lost worker left (its cgroups) is cleared"


def test_a_restart_clears_every_vms_leftovers_also_where_a_worker_is_taken_back(rig, tmp_path):
    running, stopped = rig.create("up"), rig.create("down")
    pid = rig.start_running(running)
    rig.host.adoptable[(pid, running.id)] = CREATE_TIME
    again = restart(rig, tmp_path)
    again.workers.restore()
    assert sorted(again.host.cleared) == sorted([running.id, stopped.id])  # a live worker's cgroup is not empty
    assert again.workers.get(running.id).pid == pid


def test_a_hello_from_a_worker_the_host_does_not_vouch_for_is_ignored(rig):
    vm = rig.create()
    rig.hello(vm, 999)
    assert vm.state == S.STOPPED and vm.session is None


def test_a_hello_from_an_unknown_worker_of_a_stopped_vm_adopts_it_through_starting(rig):
    vm = rig.create()
    rig.host.adoptable[(999, vm.id)] = CREATE_TIME
    rig.hello(vm, 999)
    assert vm.pid == 999 and vm.state == S.RUNNING
    assert transitions(rig, vm) == [(S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING)]


def test_a_hello_from_another_pid_than_the_vms_worker_is_ignored(rig):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.hello(vm, pid + 100)
    assert vm.pid == pid and vm.state == S.RUNNING
    rig.hello(vm, pid, create_time=CREATE_TIME + 5)  # same pid, another process
    assert vm.pid == pid and rig.host.killed == []


def hello_of(vm, pid):
    return Hello(vm_id=vm.id, pid=pid, create_time=CREATE_TIME, state=S.RUNNING, started_at=0.0, boots=1,
                 version="test")


def test_a_worker_speaks_for_its_own_vm_only(rig):
    """The worker of one VM (its command line forged to name another) cannot be taken for the other's."""
    mine, other = rig.create("mine"), rig.create("other")
    pid = rig.start_running(mine)
    rig.host.adoptable[(pid, other.id)] = CREATE_TIME
    assert rig.workers.on_link_message(other.id, hello_of(other, pid)) is False
    assert other.session is None and other.state == S.STOPPED
    assert rig.workers.on_link_message(mine.id, hello_of(mine, pid)) is True


def test_a_worker_of_another_link_version_is_killed_with_link_version(rig):
    vm = rig.create()
    rig.host.exit_on_kill = True
    rig.host.on_spawn = lambda proc: rig.hello(vm, proc.pid, link_version=LINK_VERSION + 1)
    with pytest.raises(OperationError):
        rig.run(rig.workers.start(vm))
    assert vm.state == S.CRASHED and vm.last_failure["code"] == FailureCode.LINK_VERSION.value
    assert "speaks worker-link version %d" % (LINK_VERSION + 1) in vm.last_failure["message"]


def test_messages_for_a_vm_not_in_the_store_are_left_alone(rig):
    rig.workers.on_link_message("ghost", Heartbeat(S.RUNNING))
    assert rig.sent == [] and rig.host.killed == []


# The VM set ------------------------------------------------------------------------------


def test_record_failure_is_shown_and_persisted(rig):
    vm = rig.create()
    rig.workers.record_failure(vm, FailureCode.FILE_MISSING, "kernel /boot/vmlinuz is missing or unreadable")
    saved = rig.store.load_runtime(vm.id)["last_failure"]
    assert saved == vm.last_failure and saved["code"] == "file_missing" and saved["time"] == rig.host.wall


def test_delete_removes_the_folder_and_ends_subscriptions(rig):
    vm = rig.create()
    with rig.workers.subscribe_logs(vm) as q:
        rig.workers.delete(vm)
        assert q.get_nowait() is None
    assert rig.workers.get(vm.id) is None and not os.path.exists(rig.store.vm_dir(vm.id))
    assert rig.store.load() == ({}, {})


# Names, the start gate, broken entries --------------------------------------------------


def test_a_name_is_claimed_once_and_ids_are_never_names(rig):
    web = rig.create("web")
    with rig.workers.claim_name("db"):
        with pytest.raises(OperationError) as e:
            with rig.workers.claim_name("db"):
                pass
        assert e.value.code is ErrorCode.VM_EXISTS
    with rig.workers.claim_name("db"):  # released when the first create ended
        pass
    for taken in ("web", web.id):
        with pytest.raises(OperationError):
            with rig.workers.claim_name(taken):
                pass
    other = rig.create("other")
    with pytest.raises(OperationError):
        with rig.workers.claim_name(web.id, renaming=other):
            pass
    with rig.workers.claim_name(web.id, renaming=web):  # its own id is no other VM's
        pass
    assert rig.workers.new_id() not in (web.id, "web", other.id)


def test_the_start_gate_is_asked_under_the_lock_right_before_the_spawn(rig):
    vm = rig.create()

    def refuse():
        raise OperationError(ErrorCode.UPDATE_IN_PROGRESS, "updating")

    with pytest.raises(OperationError) as e:
        rig.run(rig.workers.start(vm, refuse))
    assert e.value.code is ErrorCode.UPDATE_IN_PROGRESS and rig.host.spawned == [] and vm.state == S.STOPPED


def test_a_broken_entry_whose_worker_runs_is_not_deleted_unless_forced(rig, tmp_path):
    vm = rig.create()
    pid = rig.start_running(vm)
    rig.host.adoptable[(pid, vm.id)] = CREATE_TIME
    with open(os.path.join(rig.store.vm_dir(vm.id), "vm.json"), "w") as f:
        f.write("{not json")
    again = restart(rig, tmp_path)
    again.host.exit_on_kill = True
    again.workers.restore()
    assert vm.id in again.workers.broken()
    with pytest.raises(OperationError) as e:
        again.run(again.workers.delete_broken(vm.id, force=False))
    assert e.value.code is ErrorCode.VM_RUNNING and os.path.isdir(again.store.vm_dir(vm.id))
    again.run(again.workers.delete_broken(vm.id, force=True))
    assert again.host.killed == [(pid, signal.SIGTERM)] and not os.path.exists(again.store.vm_dir(vm.id))
    assert again.workers.broken() == {}


@pytest.mark.parametrize("value, expected", [(None, START_TIMEOUT_SEC), ("120", 120.0), ("0", START_TIMEOUT_SEC),
                                             ("-5", START_TIMEOUT_SEC), ("lots", START_TIMEOUT_SEC),
                                             ("99999", START_TIMEOUT_SEC)])
def test_the_start_deadline_test_hook_takes_only_a_sane_number_of_seconds(monkeypatch, value, expected):
    from tenbox_supervisor.worker_manager import START_TIMEOUT_ENV, start_timeout
    if value is None:
        monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(START_TIMEOUT_ENV, value)
    assert start_timeout() == expected


def test_the_liveness_test_hook_takes_only_a_sane_number_of_intervals(monkeypatch):
    from tenbox_supervisor.worker_manager import LIVENESS_ENV, heartbeat_liveness
    monkeypatch.setenv(LIVENESS_ENV, "30")
    assert heartbeat_liveness() == 30
    monkeypatch.setenv(LIVENESS_ENV, "nope")
    assert heartbeat_liveness() == HEARTBEAT_LIVENESS
    monkeypatch.delenv(LIVENESS_ENV)
    assert heartbeat_liveness() == HEARTBEAT_LIVENESS
