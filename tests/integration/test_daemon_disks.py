"""Disks through tenboxd: template overlays, recorded formats, image locks between VMs, bad disks."""

import json
import os
import random
import subprocess
import zlib

import pytest

from tests.framework.disk_tools import qemu_img, sha256_file
from tests.framework.guests import guest_path, guest_results

pytestmark = pytest.mark.usefixtures("kvm", "guests")

SECTOR = 512
READ = "console=ttyS0 blk.read=0:16 blk.write=100:8:a5"


@pytest.fixture
def template(tmp_path):
    raw = tmp_path / "template.raw"
    raw.write_bytes(random.Random(5).getrandbits(8 * (4 << 20)).to_bytes(4 << 20, "little"))
    path = tmp_path / "template.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    return str(path), raw.read_bytes()


def spec_of(daemon, name):
    vm_id = daemon.vm(name)["id"]
    return json.loads((daemon.data_dir / "vms" / vm_id / "vm.json").read_text())


def run_to_stop(daemon, name):
    r = daemon.ctl("vm", "start", name)
    assert r.returncode == 0, r.stderr
    daemon.wait_console(name, "TENBOX-GUEST blk ", 60)
    daemon.wait_state(name, "stopped", 30)
    lines = daemon.call("vm.logs", vm_id=name, lines=500)["payload"]["lines"]
    res = guest_results("\n".join(lines), "blk")
    assert res["verdict"] == "PASS" and not res["not_ok"], lines[-20:]
    return res


def test_template_overlay_is_private_and_removed_with_the_vm(daemon, template):
    path, data = template
    digest = sha256_file(path)
    for name in ("t1", "t2"):
        r = daemon.ctl("vm", "create", name, "--kernel", guest_path("blk"), "--memory", "64",
                       "--cmdline", READ, "--template", path)
        assert r.returncode == 0, r.stderr
    overlays = []
    for name in ("t1", "t2"):
        disk = spec_of(daemon, name)["disks"][0]
        assert disk["owned"] and disk["format"] == "qcow2" and disk["path"].endswith("/disk.qcow2")
        chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", "-U", disk["path"]).stdout)
        assert [c["filename"] for c in chain] == [disk["path"], path]
        overlays.append(disk["path"])
        res = run_to_stop(daemon, name)
        assert int(res["info"]["blk.crc32.0.16"], 16) == zlib.crc32(data[:16 * SECTOR])
    assert "disk.qcow2 (qcow2)" in daemon.ctl("vm", "show", "t1").stdout.decode()
    assert sha256_file(path) == digest  # the guests' writes went to their overlays
    for overlay in overlays:
        qemu_img("check", overlay)
        r = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xa5 %d %d" % (100 * SECTOR, 8 * SECTOR),
                            overlay], capture_output=True, text=True)
        assert r.returncode == 0 and "read 4096/4096 bytes" in r.stdout and "fail" not in r.stdout, r.stdout
    assert daemon.ctl("vm", "rm", "t1").returncode == 0

    assert not os.path.exists(overlays[0]) and os.path.exists(overlays[1]) and os.path.exists(path)
    assert sha256_file(path) == digest


def test_formats_are_recorded_and_a_wrong_declaration_is_refused(daemon, template, tmp_path):
    path, data = template
    raw = str(tmp_path / "data.raw")
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
    r = daemon.call("vm.create", name="f1", kernel=guest_path("blk"), memory_mb=64, cmdline=READ,
                    disks=[{"path": raw}, {"path": path, "read_only": True}])
    assert "error_code" not in r, r
    assert [d["format"] for d in spec_of(daemon, "f1")["disks"]] == ["raw", "qcow2"]
    r = daemon.call("vm.create", name="f2", kernel=guest_path("blk"), disks=[{"path": raw, "format": "qcow2"}])
    assert r["error_code"] == "invalid_argument" and "is raw, not qcow2" in r["error"], r
    r = daemon.ctl("vm", "create", "f3", "--kernel", guest_path("blk"), "--disk", raw + ",format=vmdk")
    assert r.returncode in (1, 2) and b"format" in r.stderr and b"Traceback" not in r.stderr
    notimage = tmp_path / "broken.qcow2"
    notimage.write_bytes(b"QFI\xfb" + bytes(60))
    r = daemon.call("vm.create", name="f4", kernel=guest_path("blk"), disks=[str(notimage)])
    assert r["error_code"] == "invalid_argument" and r["error"].startswith("disks[0]: "), r
    assert [v["name"] for v in daemon.call("vm.list")["payload"]["vms"]] == ["f1"]


def test_a_disk_in_use_by_a_running_vm_fails_the_second_start(daemon, tmp_path):
    raw = str(tmp_path / "shared.raw")
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
    for name in ("l1", "l2"):  # the idle guest never stops; the disk is opened (and locked) at start
        r = daemon.ctl("vm", "create", name, "--kernel", guest_path("idle"), "--memory", "32", "--disk", raw)
        assert r.returncode == 0, r.stderr
    assert daemon.ctl("vm", "start", "l1").returncode == 0
    daemon.wait_state("l1", "running")
    r = daemon.ctl("vm", "start", "l2")
    assert r.returncode == 1 and b"in use by another process" in r.stderr, r.stderr
    assert daemon.vm("l2")["last_failure"]["code"] == "start_failed"
    assert daemon.ctl("vm", "stop", "l1").returncode == 0
    daemon.wait_state("l1", "stopped")
    assert daemon.ctl("vm", "start", "l2").returncode == 0
