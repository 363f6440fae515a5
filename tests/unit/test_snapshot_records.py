"""tenboxd's snapshot files (tenbox_supervisor/snapshots.py): records, the staging folder, what is still needed."""

import json
import os

import pytest

from tenbox_supervisor import snapshots
from tenbox_supervisor.snapshots import RecordError, SnapshotRecord


def record(name="s1", **kw):
    machine = {"memory_mb": 64, "cpus": 1, "disks": [{"path": "/v/a/disk.qcow2", "layer": True,
                                                      "backing": ["/i/root.qcow2"]},
                                                     {"path": "/d/ro.raw", "read_only": True}]}
    fields = dict(name=name, vm_id="a", created_at=1.0, running=True, memory_file=name + ".snap", file_bytes=10,
                  paused_ms=2.0, machine=machine)
    fields.update(kw)
    return SnapshotRecord(**fields)


def test_a_record_reads_back_as_written_and_only_complete_records_are_snapshots(tmp_path):
    snapshots.write_record(str(tmp_path), record())
    assert snapshots.read_record(str(tmp_path), "s1") == record()
    assert record().layers() == ["/v/a/disk.qcow2"]
    folder = tmp_path / "snapshots"
    (folder / "s2.snap").write_bytes(b"half a snapshot")  # killed before its record was written
    (folder / ".s3.json.tmp").write_text("{")  # the record's own temporary file
    (folder / "bad.json").write_text("{\"name\": \"bad\"}")  # broken: left out, logged
    assert [r.name for r in snapshots.list_records(str(tmp_path))] == ["s1"]


@pytest.mark.parametrize("change", [
    {"memory_file": "../other.snap"}, {"name": "a/b"}, {"running": "yes"},
    {"machine": {"disks": [{"path": "relative.qcow2"}]}}, {"machine": {}},
])
def test_a_record_that_does_not_validate_is_refused(tmp_path, change):
    with pytest.raises(RecordError):
        SnapshotRecord.from_json(dict(record().to_json(), **change))


def test_a_record_under_another_name_is_refused(tmp_path):
    snapshots.write_record(str(tmp_path), record())
    os.rename(snapshots.record_path(str(tmp_path), "s1"), snapshots.record_path(str(tmp_path), "s9"))
    with pytest.raises(RecordError):
        snapshots.read_record(str(tmp_path), "s9")


def test_removing_a_record_removes_its_memory_file_and_nothing_else(tmp_path):
    snapshots.write_record(str(tmp_path), record())
    (tmp_path / "snapshots" / "s1.snap").write_bytes(b"x")
    (tmp_path / "snapshots" / "s2.snap").write_bytes(b"x")
    snapshots.remove_record(str(tmp_path), "s1")
    assert sorted(os.listdir(tmp_path / "snapshots")) == ["s2.snap"]


def test_the_staging_folder_is_emptied_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    staging = snapshots.prepare_staging(str(vm_dir))
    os.symlink(str(outside), os.path.join(staging, "link"))
    os.mkdir(os.path.join(staging, "sub"))
    with open(os.path.join(staging, "sub", "f"), "w") as f:
        f.write("x")
    with open(os.path.join(staging, "old.snap"), "w") as f:
        f.write("x")
    assert snapshots.prepare_staging(str(vm_dir)) == staging
    assert os.listdir(staging) == [] and (outside / "keep").read_text() == "mine"
    assert os.stat(staging).st_mode & 0o777 == 0o700


def test_a_staged_file_is_taken_only_if_it_is_a_plain_file_with_one_link(tmp_path):
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    staging = snapshots.prepare_staging(str(vm_dir))
    target = tmp_path / "secret"
    target.write_text("not the worker's")
    os.symlink(str(target), os.path.join(staging, "link"))
    with open(os.path.join(staging, "twice"), "w") as f:
        f.write("x")
    os.link(os.path.join(staging, "twice"), str(tmp_path / "second-name"))
    for name in ("link", "twice"):
        with pytest.raises((OSError, ValueError)):
            snapshots.take_from_staging(str(vm_dir), name, str(vm_dir / "taken"))
    assert not (vm_dir / "taken").exists() and target.read_text() == "not the worker's"
    with open(os.path.join(staging, "made"), "w") as f:
        f.write("overlay")
    held = snapshots.hand_to_worker(os.path.join(staging, "made"))
    try:
        os.unlink(os.path.join(staging, "made"))  # a worker puts a file of its own under the name
        with open(os.path.join(staging, "made"), "w") as f:
            f.write("forged")
        with pytest.raises(ValueError):
            snapshots.take_from_staging(str(vm_dir), "made", str(vm_dir / "taken"), held)
    finally:
        os.close(held)
    with open(os.path.join(staging, "good"), "w") as f:
        f.write("12345")
    os.chmod(os.path.join(staging, "good"), 0o644)
    assert snapshots.take_from_staging(str(vm_dir), "good", str(vm_dir / "taken")) == 5
    assert os.stat(vm_dir / "taken").st_mode & 0o777 == 0o600 and not os.path.exists(os.path.join(staging, "good"))


class Spec:
    def __init__(self, disks):
        self.disks = disks


def test_only_files_no_vm_and_no_snapshot_needs_are_removed(tmp_path):
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    snapshots.write_record(str(vm_dir), record())
    files = [tmp_path / n for n in ("in-chain", "active", "unused")]
    for f in files:
        f.write_text("x")
    used = snapshots.referenced_paths([Spec([{"path": str(files[1]), "backing": [str(files[0])]}])], [str(vm_dir)])
    assert "/v/a/disk.qcow2" in used and "/i/root.qcow2" in used  # the record's layer and its chain
    assert snapshots.remove_unreferenced([str(f) for f in files], used) == [str(files[2])]
    assert files[0].exists() and files[1].exists() and not files[2].exists()
    assert json.loads((vm_dir / "snapshots" / "s1.json").read_text())["name"] == "s1"
