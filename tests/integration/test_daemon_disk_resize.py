"""`tenbox vm disk add/resize/ls` on a real tenboxd: new qcow2 disks, growth of stopped and running VMs' disks, refusals."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from tenbox_vmm.disk import open_disk
from tests.framework.daemon import ok
from tests.framework.disk_tools import qemu_img, qemu_img_create, qemu_io
from tests.framework.guests import guest_path
from tests.framework.repo import PYTHON, repo_env

pytestmark = pytest.mark.usefixtures("kvm", "guests")

MIB = 1 << 20
STAY = "console=ttyS0 blk.read=0:8 blk.stay=1"


def virtual_size(path: str) -> int:
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)["virtual-size"]


def disks(daemon, name: str) -> list:
    return json.loads(ok(daemon.ctl("vm", "disk", "ls", name, "--json")))


def one_line_error(r, code: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "(%s)" % code in err, (r.returncode, err)
    return err


def test_a_new_disk_is_a_qcow2_in_the_vm_folder_and_grows_while_stopped(daemon, tmp_path):
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"\0" * (2 * MIB))
    ok(daemon.ctl("vm", "create", "d1", "--kernel", guest_path("blk"), "--memory", "64", "--cmdline", STAY,
                  "--disk", str(raw) + ",format=raw"))
    added = json.loads(ok(daemon.ctl("vm", "disk", "add", "d1", "--size", "10M", "--json")))
    path = added["path"]
    folder = daemon.data_dir / "vms" / daemon.vm("d1")["id"]
    assert path == str(folder / "disk-1.qcow2") and added["index"] == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    qemu_img("check", path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 10 * MIB
    listed = disks(daemon, "d1")
    assert [(d["name"], d["format"], d["size_bytes"], d["owned"]) for d in listed] == [
        ("data.raw", "raw", 2 * MIB, False), ("disk-1.qcow2", "qcow2", 10 * MIB, True)]
    assert "disk-1.qcow2" in ok(daemon.ctl("vm", "disk", "ls", "d1"))

    # Grow both while stopped: the qcow2 by its file name and relative size, the raw by index to a size.
    r = json.loads(ok(daemon.ctl("vm", "disk", "resize", "d1", "disk-1.qcow2", "--size", "+5M", "--json")))
    assert r["size_bytes"] == 15 * MIB and r["live"] is False
    assert virtual_size(path) == 15 * MIB
    qemu_img("check", path)
    ok(daemon.ctl("vm", "disk", "resize", "d1", "0", "--size", "3M"))
    assert os.path.getsize(raw) == 3 * MIB

    # Refusals: one line each, nothing changed.
    one_line_error(daemon.ctl("vm", "disk", "resize", "d1", "disk-1.qcow2", "--size", "1M"), "invalid_argument")
    one_line_error(daemon.ctl("vm", "disk", "resize", "d1", "0", "--size", "2M"), "invalid_argument")
    one_line_error(daemon.ctl("vm", "disk", "resize", "d1", "nosuch.qcow2", "--size", "+1M"), "disk_not_found")
    one_line_error(daemon.ctl("vm", "disk", "resize", "d1", "7", "--size", "+1M"), "disk_not_found")
    one_line_error(daemon.ctl("vm", "disk", "resize", "d1", "0", "--size", "-1M"), "invalid_argument")
    one_line_error(daemon.ctl("vm", "disk", "add", "d1", "--size", "lots"), "invalid_argument")
    one_line_error(daemon.ctl("vm", "disk", "add", "d1", "--size", "1000T"), "invalid_argument")
    one_line_error(daemon.ctl("vm", "disk", "add", "nosuch", "--size", "1M"), "vm_not_found")
    assert virtual_size(path) == 15 * MIB and os.path.getsize(raw) == 3 * MIB
    assert len(disks(daemon, "d1")) == 2 and [n for n in os.listdir(folder) if n.endswith(".qcow2")] == ["disk-1.qcow2"]

    # The event log has the one add and the two grows, not the refusals.
    out = ok(daemon.ctl("events", "--since", "1h", "--no-follow", "--json"))
    seen = [json.loads(line) for line in out.splitlines()]
    assert [(e["kind"], e["name"], e["index"], e["disk"], e["size_bytes"], e.get("live")) for e in seen
            if e["kind"].startswith("vm.disk_")] == [
        ("vm.disk_added", "d1", 1, "disk-1.qcow2", 10 * MIB, None),
        ("vm.disk_resized", "d1", 1, "disk-1.qcow2", 15 * MIB, False),
        ("vm.disk_resized", "d1", 0, "data.raw", 3 * MIB, False)]

    # Added disks go with the VM.
    ok(daemon.ctl("vm", "rm", "d1"))
    assert not os.path.exists(path) and raw.exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_running_vms_disk_grows_live_and_the_guest_sees_the_new_capacity(daemon, tmp_path, fmt):
    if fmt == "raw":
        disk = tmp_path / "live.raw"
        disk.write_bytes(b"\0" * (4 * MIB))
        ok(daemon.ctl("vm", "create", "g1", "--kernel", guest_path("blk"), "--memory", "64", "--cmdline", STAY,
                      "--disk", str(disk) + ",format=raw"))
        path = str(disk)
    else:
        ok(daemon.ctl("vm", "create", "g1", "--kernel", guest_path("blk"), "--memory", "64", "--cmdline", STAY))
        path = json.loads(ok(daemon.ctl("vm", "disk", "add", "g1", "--size", "4M", "--json")))["path"]
    ok(daemon.ctl("vm", "start", "g1"))
    daemon.wait_console("g1", "blk: ready capacity=8192", 60)
    one_line_error(daemon.ctl("vm", "disk", "add", "g1", "--size", "1M"), "vm_running")
    one_line_error(daemon.ctl("vm", "disk", "resize", "g1", "0", "--size", "1M"), "invalid_argument")

    r = json.loads(ok(daemon.ctl("vm", "disk", "resize", "g1", "0", "--size", "+4M", "--json")))
    assert r["live"] is True and r["size_bytes"] == 8 * MIB
    daemon.wait_console("g1", "blk: capacity=16384", 30)  # the configuration interrupt reached the guest
    stats = json.loads(ok(daemon.ctl("vm", "stats", "g1", "--json", "--no-stream")))[0]
    assert stats["disks"][0]["capacity_bytes"] == 8 * MIB
    assert disks(daemon, "g1")[0]["size_bytes"] == 8 * MIB
    ok(daemon.ctl("vm", "stop", "g1"))
    daemon.wait_state("g1", "stopped")
    assert virtual_size(path) == 8 * MIB
    if fmt == "qcow2":
        qemu_img("check", path)


@pytest.mark.parametrize("opts", [("cluster_size=512",), ("cluster_size=512", "lazy_refcounts=on"),
                                  ("cluster_size=512", "compat=0.10")])
def test_growing_a_qcow2_past_its_l1_table_moves_the_table_and_qemu_finds_it_clean(tmp_path, opts):
    """512-byte clusters: one L1 entry maps 32 KiB, so 1 MiB -> 64 MiB needs a new, larger L1 table elsewhere."""
    path = tmp_path / "small.qcow2"
    qemu_img_create(path, MIB, *opts)
    qemu_io(path, "write -P 0x5a 0 64k", "write -P 0x6b 960k 64k", fmt="qcow2")
    before = json.loads(qemu_img("info", "--output=json", path).stdout)
    r = subprocess.run([PYTHON, "-m", "tenbox_vmm.imagetool", "resize", str(path), "--size", "+63M"],
                       capture_output=True, text=True, env=repo_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["virtual_size"] == 64 * MIB
    qemu_img("check", path)
    assert virtual_size(str(path)) == 64 * MIB
    qemu_io(path, "read -P 0x5a 0 64k", "read -P 0x6b 960k 64k", "read -P 0 1M 63M", fmt="qcow2", read_only=True)
    qemu_io(path, "write -P 0x7c 63M 1M", fmt="qcow2")  # QEMU writes past the old end through the new table
    with open_disk(str(path), fmt="qcow2") as disk:  # and so does tenbox
        disk.writev(62 * MIB, [memoryview(b"\x3d" * 65536)])
        disk.flush()
    qemu_img("check", path)
    qemu_io(path, "read -P 0x7c 63M 1M", "read -P 0x5a 0 64k", "read -P 0x3d 62M 64k", fmt="qcow2", read_only=True)
    assert before["virtual-size"] == MIB


def test_a_vm_with_two_disks_of_its_own_starts_again_and_again_without_tenboxd_keeping_a_descriptor(daemon):
    """Two added disks (the VM's own, like a template's overlay or a cloud-init seed): each start
    opens both with tenboxd's rights to check them, and closes both. Once they shared one key, so the
    first stayed open in tenboxd at every start (and a read-only second one refused the start)."""
    ok(daemon.ctl("vm", "create", "two", "--kernel", guest_path("blk"), "--memory", "64", "--cmdline", STAY))
    for _ in range(2):
        ok(daemon.ctl("vm", "disk", "add", "two", "--size", "4M"))
    fd_dir = "/proc/%d/fd" % daemon.proc.proc.pid
    counts = []
    for _ in range(3):
        ok(daemon.ctl("vm", "start", "two"))
        daemon.wait_console("two", "blk: ready capacity=8192", 60)
        ok(daemon.ctl("vm", "stop", "two"))
        daemon.wait_state("two", "stopped")
        counts.append(len(files_open(fd_dir)))
    assert counts[2] == counts[1], "tenboxd's descriptors of files after each start and stop: %s" % counts


def files_open(fd_dir: str):
    """The descriptors of files (not sockets, pipes or pidfds: a standby worker's socket comes and goes)."""
    names = []
    for fd in os.listdir(fd_dir):
        try:
            names.append(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            pass  # closed meanwhile
    return [n for n in names if n.startswith("/")]
