"""vm.snapshot against a fake worker (tenbox_supervisor/snapshot_api.py): what tenboxd keeps when the worker
answers, refuses, or says nothing."""

import os

import pytest

from tenbox_supervisor import snapshot_api, snapshots
from tenbox_supervisor.api import Caller
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import ErrorCode
from tenbox_supervisor.snapshot_api import SnapshotMethods
from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.link import Command, CommandName, Reply

CALLER = Caller(uid=0, gid=0, pid=1)


class Vms:
    """What SnapshotMethods asks of the vm.* methods, for one VM."""

    def __init__(self, vm):
        self.vm = vm

    def find(self, params):
        return self.vm

    async def start_vm(self, vm, restore=None):
        raise AssertionError("not started in these tests")

    def view(self, vm):
        return {"id": vm.id}


class Gate:
    def check_start_allowed(self):
        pass


def worker_answers(rig, vm, answer):
    """Route the link: `answer(command)` -> a Reply or None (silence) for a snapshot; a stop ends the worker."""
    def send(vm_id, msg):
        rig.sent.append((vm_id, msg))
        if isinstance(msg, Command) and msg.name is CommandName.SNAPSHOT:
            reply = answer(msg)
            if reply is not None:
                rig.loop.call_soon(rig.workers.on_link_message, vm_id, reply)
        elif isinstance(msg, Command) and msg.name is CommandName.STOP:
            rig.loop.call_soon(rig.host.exit, vm.pid, 3)
        return True
    rig.workers.send = send


@pytest.fixture
def running(rig):
    vm = rig.create()
    rig.start_running(vm)
    assert vm.state is VmState.RUNNING
    return vm


def methods(rig, vm):
    return SnapshotMethods(rig.workers, Vms(vm), rig.store, Gate())


def test_a_snapshot_the_worker_wrote_is_moved_into_place_and_recorded(rig, running):
    vm_dir = rig.store.vm_dir(running.id)

    def write(cmd):
        with open(os.path.join(snapshots.staging_dir(vm_dir), cmd.args["name"] + ".snap"), "wb") as f:
            f.write(b"state and RAM")
        return Reply(cmd.id, True, result={"paused_ms": 12.5, "file_bytes": 13})

    worker_answers(rig, running, write)
    out = rig.run(methods(rig, running).vm_snapshot({"vm_id": "web", "name": "s1"}, CALLER))
    assert out["running"] and out["file_bytes"] == 13 and out["paused_ms"] == 12.5
    rec = snapshots.read_record(vm_dir, "s1")
    assert rec.memory_file == "s1.snap" and rec.machine["memory_mb"] == 64
    assert os.stat(snapshots.memory_path(vm_dir, "s1")).st_mode & 0o777 == 0o600
    assert os.listdir(snapshots.staging_dir(vm_dir)) == []


def test_a_snapshot_the_worker_refuses_leaves_no_record_and_the_vm_running(rig, running):
    vm_dir = rig.store.vm_dir(running.id)
    worker_answers(rig, running, lambda cmd: Reply(cmd.id, False, error="snapshot not taken: no space left"))
    with pytest.raises(ApiError) as e:
        rig.run(methods(rig, running).vm_snapshot({"vm_id": "web", "name": "s1"}, CALLER))
    assert e.value.code is ErrorCode.SNAPSHOT_FAILED and "no space left" in e.value.message
    assert snapshots.list_records(vm_dir) == [] and running.state is VmState.RUNNING


def test_a_worker_that_never_answers_is_stopped_and_the_vm_keeps_its_disks(rig, running, monkeypatch):
    """It may have moved its disks onto overlays tenboxd is about to forget: it is stopped, vm.json unchanged."""
    monkeypatch.setattr(snapshot_api, "SNAPSHOT_TIMEOUT_BASE_SEC", 0.2)
    monkeypatch.setattr(snapshot_api, "SNAPSHOT_WRITE_MIB_PER_SEC", 1 << 30)
    spec_before = running.spec.to_json()
    worker_answers(rig, running, lambda cmd: None)
    with pytest.raises(ApiError) as e:
        rig.run(methods(rig, running).vm_snapshot({"vm_id": "web", "name": "s1"}, CALLER))
    assert e.value.code is ErrorCode.SNAPSHOT_FAILED and "was stopped" in e.value.message
    assert running.state is VmState.STOPPED and running.spec.to_json() == spec_before
    assert snapshots.list_records(rig.store.vm_dir(running.id)) == []


def test_a_file_the_worker_did_not_write_fails_the_snapshot_and_stops_the_vm(rig, running):
    worker_answers(rig, running, lambda cmd: Reply(cmd.id, True, result={"paused_ms": 1.0}))
    with pytest.raises(ApiError) as e:
        rig.run(methods(rig, running).vm_snapshot({"vm_id": "web", "name": "s1"}, CALLER))
    assert e.value.code is ErrorCode.SNAPSHOT_FAILED and "cannot move the snapshot" in e.value.message
    assert running.state is VmState.STOPPED


def test_a_worker_that_dies_during_the_snapshot_fails_it_at_once_with_no_record(rig, running):
    """Not after the snapshot's minutes-long timeout: as soon as the worker is gone."""
    def die(cmd):
        rig.loop.call_soon(rig.host.exit, running.pid, -9)
        return None

    worker_answers(rig, running, die)
    with pytest.raises(ApiError) as e:
        rig.run(methods(rig, running).vm_snapshot({"vm_id": "web", "name": "s1"}, CALLER), timeout=5)
    assert e.value.code is ErrorCode.SNAPSHOT_FAILED and "ended before it answered" in e.value.message
    assert snapshots.list_records(rig.store.vm_dir(running.id)) == [] and running.state is VmState.CRASHED
