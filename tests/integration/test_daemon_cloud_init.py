"""cloud-init provisioning through tenboxd: vm create/edit --ssh-key, --user, --hostname, --user-data,
--network-config make the VM's NoCloud seed (seed.iso, its last disk, read-only); the guest reads it;
clones get their own; bad input is one line and leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import subprocess
import zlib
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.framework.guests import guest_path, guest_results

pytestmark = pytest.mark.usefixtures("kvm", "guests")

SECTOR = 512
ISO_PVD_SECTOR = 64  # ISO 9660's primary volume descriptor: byte 32768
PVD_SECTORS = 4


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for kind in ("ed25519", "ecdsa"):
        path = folder / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "op@" + kind, "-f", str(path)], check=True)
        out[kind] = path
    return out


def spec_of(daemon, name):
    return json.loads((daemon.data_dir / "vms" / daemon.vm(name)["id"] / "vm.json").read_text())


def seed_contents(iso: Path, into: Path) -> dict:
    """The seed's files, read back by xorriso (a real ISO 9660 reader), and its volume id."""
    into.mkdir()
    subprocess.run(["xorriso", "-no_rc", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(into)],
                   check=True, capture_output=True)
    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", str(iso)], capture_output=True, text=True)
    files = {p.name: p.read_bytes() for p in into.iterdir()}
    return dict(files, label=label.stdout.strip())


def meta(files: dict) -> dict:
    return dict(line.split(": ", 1) for line in files["meta-data"].decode().splitlines())


def user_data_parts(files: dict) -> list:
    msg = message_from_bytes(files["user-data"])
    return [part.get_payload(decode=True).decode() for part in msg.walk() if not part.is_multipart()]


def vm_count(daemon) -> int:
    return len([p for p in (daemon.data_dir / "vms").iterdir() if not p.name.startswith(".")])


def test_create_makes_a_read_only_seed_the_guest_reads_with_serial_cidata(daemon, keys, tmp_path):
    user_data = tmp_path / "init.yaml"
    user_data.write_bytes(gzip.compress(b"#cloud-config\nruncmd:\n  - [touch, /root/first-boot]\n"))
    net = tmp_path / "net.yaml"
    net.write_text("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n")
    r = daemon.ctl("vm", "create", "box", "--kernel", guest_path("blk"), "--memory", "64",
                   "--cmdline", "console=ttyS0 blk.read=%d:%d" % (ISO_PVD_SECTOR, PVD_SECTORS),
                   "--ssh-key", str(keys["ed25519"]) + ".pub", "--ssh-key", str(keys["ecdsa"]) + ".pub",
                   "--user", "agent", "--user-data", str(user_data), "--network-config", str(net))
    assert r.returncode == 0, r.stderr
    spec = spec_of(daemon, "box")
    seed = spec["disks"][-1]
    assert seed["read_only"] and seed["format"] == "raw" and seed["serial"] == "cidata"
    assert seed["path"].endswith("/seed.iso") and Path(seed["path"]).stat().st_mode & 0o777 == 0o600
    files = seed_contents(Path(seed["path"]), tmp_path / "seed")
    assert files["label"] == "cidata"
    md = meta(files)
    assert md["instance-id"].strip('"').startswith("tenbox-") and md["local-hostname"].strip('"') == "box"
    parts = user_data_parts(files)
    ours, theirs = parts[0], parts[1]
    assert "agent" in ours and "op@ed25519" in ours and "op@ecdsa" in ours
    assert "/root/first-boot" in theirs  # the operator's, decompressed
    assert files["network-config"] == net.read_bytes()

    view = json.loads(daemon.ctl("vm", "show", "box", "--json").stdout)["cloud_init"]
    fingerprints = [subprocess.run(["ssh-keygen", "-lf", str(keys[k]) + ".pub"], capture_output=True, text=True,
                                   check=True).stdout.split()[1] for k in ("ed25519", "ecdsa")]
    assert view == {"instance_id": md["instance-id"].strip('"'), "user": "agent", "hostname": "box", "ssh_keys": 2,
                    "ssh_key_fingerprints": fingerprints,
                    "user_data_bytes": len(gzip.decompress(user_data.read_bytes())),
                    "network_config_bytes": len(net.read_bytes())}
    assert "runcmd" not in json.dumps(daemon.vm("box"))  # views never carry the user-data itself

    # The worker gets the seed as a read-only virtio-blk disk with serial cidata and its bytes.
    assert daemon.ctl("vm", "start", "box").returncode == 0
    daemon.wait_console("box", "TENBOX-GUEST blk ", 60)
    daemon.wait_state("box", "stopped", 30)
    res = guest_results("\n".join(daemon.console("box")), "blk")
    assert res["verdict"] == "PASS", res
    assert res["info"]["blk.serial"] == "cidata"
    assert " ro 1" in res["info"]["blk.config"]
    iso = Path(seed["path"]).read_bytes()
    pvd = iso[ISO_PVD_SECTOR * SECTOR:(ISO_PVD_SECTOR + PVD_SECTORS) * SECTOR]
    assert pvd[1:6] == b"CD001"
    assert int(res["info"]["blk.crc32.%d.%d" % (ISO_PVD_SECTOR, PVD_SECTORS)], 16) == zlib.crc32(pvd)


def test_edit_keeps_the_instance_id_unless_reprovision_and_a_vm_without_a_seed_gets_one(daemon, keys, tmp_path):
    assert daemon.ctl("vm", "create", "e1", "--kernel", guest_path("idle"), "--memory", "32",
                      "--hostname", "first").returncode == 0
    seed_path = Path(spec_of(daemon, "e1")["disks"][-1]["path"])
    before = meta(seed_contents(seed_path, tmp_path / "a"))
    r = daemon.ctl("vm", "edit", "e1", "--hostname", "second", "--ssh-key", str(keys["ed25519"]) + ".pub")
    assert r.returncode == 0, r.stderr
    after = meta(seed_contents(seed_path, tmp_path / "b"))
    assert after["instance-id"] == before["instance-id"] and after["local-hostname"].strip('"') == "second"
    assert len(spec_of(daemon, "e1")["disks"]) == 1  # rebuilt in place, not added again
    assert daemon.ctl("vm", "edit", "e1", "--reprovision").returncode == 0
    again = meta(seed_contents(seed_path, tmp_path / "c"))
    assert again["instance-id"] != before["instance-id"] and again["local-hostname"].strip('"') == "second"

    # A VM made without cloud-init gets a seed, last, when given one while stopped.
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(1 << 20))
    assert daemon.ctl("vm", "create", "e2", "--kernel", guest_path("idle"), "--memory", "32",
                      "--disk", str(raw)).returncode == 0
    assert spec_of(daemon, "e2")["cloud_init"] == {}
    assert daemon.ctl("vm", "edit", "e2", "--user", "ops").returncode == 0
    disks = spec_of(daemon, "e2")["disks"]
    assert [d["path"] for d in disks][0] == str(raw) and disks[-1]["path"].endswith("/seed.iso")
    # Replacing the disks keeps the seed, last.
    assert daemon.ctl("vm", "edit", "e2", "--disk", str(raw) + ",ro").returncode == 0
    disks = spec_of(daemon, "e2")["disks"]
    assert len(disks) == 2 and disks[0]["read_only"] and disks[-1].get("cloud_init_seed")


def test_a_running_vm_without_a_seed_cannot_get_one(daemon):
    assert daemon.ctl("vm", "create", "r1", "--kernel", guest_path("idle"), "--memory", "32").returncode == 0
    assert daemon.ctl("vm", "start", "r1").returncode == 0
    r = daemon.ctl("vm", "edit", "r1", "--hostname", "late")
    assert r.returncode == 1 and "vm_running" in r.stderr.decode() and "new disk" in r.stderr.decode()
    assert spec_of(daemon, "r1")["cloud_init"] == {}


def test_clones_get_their_own_seed_instance_id_and_host_name(daemon, keys, tmp_path):
    assert daemon.ctl("vm", "create", "src", "--kernel", guest_path("idle"), "--memory", "32",
                      "--ssh-key", str(keys["ed25519"]) + ".pub").returncode == 0
    assert daemon.ctl("vm", "snapshot", "src", "--name", "s").returncode == 0
    r = daemon.ctl("vm", "clone", "src/s", "--name", "cl", "--count", "2")
    assert r.returncode == 0, r.stderr
    seen = set()
    for name in ("src", "cl-1", "cl-2"):
        spec = spec_of(daemon, name)
        seed = spec["disks"][-1]
        assert seed.get("cloud_init_seed") and Path(seed["path"]).parent.name == spec["id"]
        md = meta(seed_contents(Path(seed["path"]), tmp_path / name))
        assert md["local-hostname"].strip('"') == name
        assert "op@ed25519" in user_data_parts(seed_contents(Path(seed["path"]), tmp_path / (name + "u")))[0]
        seen.add(md["instance-id"])
    assert len(seen) == 3


@pytest.mark.parametrize("args, message", [
    (["--ssh-key", "/nonexistent/key.pub"], "cannot read SSH key file /nonexistent/key.pub"),
    (["--ssh-key", "PRIVATE"], "private key"),
    (["--hostname", "-bad-"], "hostname"),
    (["--user", "root"], "root"),
    (["--user-data", "BIG"], "user-data"),
    (["--user-data", "INCLUDE"], "#include"),
    (["--network-config", "NOTYAML"], "network-config"),
])
def test_bad_provisioning_input_is_one_line_and_leaves_nothing(daemon, keys, tmp_path, args, message):
    files = {"PRIVATE": str(keys["ed25519"]), "BIG": tmp_path / "big", "INCLUDE": tmp_path / "inc",
             "NOTYAML": tmp_path / "net"}
    files["BIG"].write_bytes(b"#cloud-config\n" + b"# pad\n" * 60000)
    files["INCLUDE"].write_bytes(b"#include\nhttp://example.invalid/x\n")
    files["NOTYAML"].write_bytes(b"just words\n")
    args = [str(files.get(a, a)) for a in args]
    before = vm_count(daemon)
    r = daemon.ctl("vm", "create", "bad", "--kernel", guest_path("idle"), "--memory", "32", *args)
    err = r.stderr.decode()
    assert r.returncode in (1, 2) and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert vm_count(daemon) == before
    assert daemon.call("vm.list")["payload"]["vms"] == [] or "bad" not in json.dumps(daemon.call("vm.list"))


def test_vm_ssh_adds_a_forward_waits_for_sshd_and_says_why_it_gave_up(daemon, keys):
    """The idle guest runs no sshd: vm ssh adds a loopback forward to guest port 22, waits, and gives up
    with one line; a stopped VM is refused at once."""
    assert daemon.ctl("vm", "create", "s1", "--kernel", guest_path("idle"), "--memory", "32").returncode == 0
    r = daemon.ctl("vm", "ssh", "s1", "--timeout", "1", "--", "true")
    assert r.returncode == 1 and "s1 is stopped; start it first" in r.stderr.decode()
    assert daemon.ctl("vm", "start", "s1").returncode == 0
    r = daemon.ctl("vm", "ssh", "s1", "--timeout", "3", "--", "hostname", timeout=120)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr.decode(), err
    assert err[0].startswith("tenbox: added the forward tcp:127.0.0.1:") and err[0].endswith("-:22 to VM s1")
    assert len(err) == 2 and "sshd on VM s1 did not answer on 127.0.0.1:" in err[1] and "within 3 s" in err[1], err
    fwds = daemon.vm("s1")["net"]["hostfwds"]
    assert len(fwds) == 1 and fwds[0].endswith("-:22")
    # A second run uses the forward that is there.
    r = daemon.ctl("vm", "ssh", "s1", "--timeout", "1", "--", "true", timeout=120)
    assert "added the forward" not in r.stderr.decode() and daemon.vm("s1")["net"]["hostfwds"] == fwds
