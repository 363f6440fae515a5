"""A tenbox group member is not root: the files it names are opened with its own rights, on a real
tenboxd with a real group and user (docs/security.md, "Group members")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.framework.guests import guest_path
from tests.framework.images import fake_image
from tests.framework.users import own, system_group, system_user, unique_name

pytestmark = pytest.mark.usefixtures("kvm", "guests")


class Member:
    """A tenbox group member, a daemon that serves the group, and a folder of the member's own files."""

    def __init__(self, daemon, user, home: Path) -> None:
        self.d = daemon
        self.user = user
        self.home = home

    def ctl(self, *args: str):
        return self.d.ctl(*args, user=self.user.name)

    def call(self, type_: str, **payload) -> dict:
        """A request on the wire as the member: the CLI's own checks (click's) are not a defence."""
        return self.d.call_as(self.user.name, type_, **payload)

    def file(self, name: str, data: bytes = b"", mode: int = 0o600, source: str = "") -> str:
        path = self.home / name
        if source:
            shutil.copyfile(source, str(path))
        else:
            path.write_bytes(data)
        own([str(path)], self.user, mode)
        return str(path)


@pytest.fixture
def member(make_daemon):
    group = unique_name("tbxg")
    with system_group(group), system_user(unique_name("tbxu"), [group]) as user:
        home = Path(tempfile.mkdtemp(prefix="tbx-member-", dir="/tmp"))
        own([str(home)], user, 0o700)
        d = make_daemon("member", TENBOX_SOCKET_GROUP=group)
        d.start()
        try:
            yield Member(d, user, home)
        finally:
            shutil.rmtree(str(home), ignore_errors=True)


def refused(reply: dict, code: str = "permission_denied") -> str:
    """The message of a reply refused with `code`."""
    assert reply["ok"] is False and reply["error_code"] == code, reply
    return reply["error"]


def denied(r) -> str:
    """The stderr of a CLI run tenboxd refused with permission_denied (exit 4)."""
    err = r.stderr.decode()
    assert r.returncode == 4 and "(permission_denied)" in err, (r.returncode, err)
    return err


def test_a_member_cannot_name_files_it_could_not_open(member):
    """/etc/shadow as a kernel or a disk, a root-owned world-readable file as a writable disk, and
    a qcow2 of the member's whose backing file is /etc/shadow: permission_denied, and the answer
    says nothing about the file (no size, no format)."""
    kernel = member.file("vmlinuz", source=guest_path("idle"))
    err = refused(member.call("vm.create", name="k", kernel="/etc/shadow"))
    assert err == "kernel /etc/shadow: permission denied: uid %d may not read it (tenboxd opens the files you " \
                  "name with your own rights)" % member.user.uid
    err = refused(member.call("vm.create", name="d", kernel=kernel, disks=[{"path": "/etc/shadow", "read_only": True}]))
    assert err.startswith("disks[0] /etc/shadow: permission denied") and "raw" not in err
    err = refused(member.call("vm.create", name="w", kernel=kernel, disks=["/etc/passwd"]))
    assert "uid %d may not write it" % member.user.uid in err
    denied(member.ctl("vm", "create", "w", "--kernel", kernel, "--disk", "/etc/passwd"))  # the CLI: exit 4
    chained = member.file("chained.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", chained, "1M"],
                   check=True)
    own([chained], member.user, 0o600)
    err = denied(member.ctl("vm", "create", "c", "--kernel", kernel, "--disk", chained))
    assert "disks[0] backing[1] /etc/shadow: permission denied" in err, err
    assert member.d.call("vm.list")["payload"]["vms"] == []
    # Root names any file it likes, as before.
    assert member.d.ctl("vm", "create", "rootk", "--kernel", guest_path("idle"), "--disk", "/etc/passwd,ro").returncode == 0


def test_a_member_uses_its_own_files_and_the_image_store(member):
    """The member's own kernel and writable disk work, and so do the image store's files, which
    the member could not open itself (the data directory is root's)."""
    kernel = member.file("vmlinuz", source=guest_path("idle"))
    disk = member.file("data.raw", b"\0" * (1 << 20))
    r = member.ctl("vm", "create", "mine", "--kernel", kernel, "--disk", disk, "--memory", "32")
    assert r.returncode == 0, r.stderr
    r = member.ctl("vm", "start", "mine")
    assert r.returncode == 0, r.stderr
    member.d.wait_console("mine", "idle: ready")
    assert member.ctl("vm", "stop", "mine").returncode == 0
    src = fake_image(member.home.parent / ("%s-img" % member.home.name), rootfs_size=1 << 20, fmt="raw",
                     kernel=guest_path("idle"))
    try:
        assert member.d.call("image.import", path=str(src), name="idle")["ok"]
    finally:
        shutil.rmtree(str(src))
    stored = member.d.data_dir / "images" / "idle"
    r = member.ctl("vm", "create", "fromimage", "--image", "idle", "--memory", "32", "--cmdline", "console=ttyS0")
    assert r.returncode == 0, r.stderr
    r = member.ctl("vm", "create", "bystore", "--kernel", str(stored / "vmlinuz"), "--template",
                   str(stored / "rootfs.img"), "--memory", "32")
    assert r.returncode == 0, r.stderr
    denied(member.ctl("vm", "create", "rw", "--kernel", kernel, "--disk", str(stored / "rootfs.img")))
    r = member.ctl("vm", "start", "fromimage")
    assert r.returncode == 0, r.stderr
    member.d.wait_console("fromimage", "idle: ready")


def test_a_file_swapped_after_create_is_refused_at_start(member):
    """The member names its own kernel, then puts a link to /etc/shadow in its place; or makes its
    qcow2 disk name /etc/shadow as backing file: vm.start (even by root) opens them again with
    the member's rights and refuses."""
    kernel = member.file("vmlinuz", source=guest_path("idle"))
    assert member.ctl("vm", "create", "swap", "--kernel", kernel, "--memory", "32").returncode == 0
    os.unlink(kernel)
    os.symlink("/etc/shadow", kernel)
    r = member.d.ctl("vm", "start", "swap")
    assert r.returncode == 4 and b"kernel %s: permission denied" % kernel.encode() in r.stderr, r.stderr
    v = member.d.vm("swap")
    assert v["state"] == "stopped" and v["last_failure"]["code"] == "file_missing"
    # Its own qcow2 disk, made to name /etc/shadow as its backing file after vm create.
    kernel = member.file("vmlinuz2", source=guest_path("idle"))
    disk = member.file("disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "1M"], check=True)
    own([disk], member.user, 0o600)
    assert member.ctl("vm", "create", "rebased", "--kernel", kernel, "--disk", disk, "--memory", "32").returncode == 0
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-b", "/etc/shadow", "-F", "raw", disk], check=True)
    r = member.d.ctl("vm", "start", "rebased")
    assert r.returncode == 4 and b"disks[0] backing[1] /etc/shadow: permission denied" in r.stderr, r.stderr


def test_a_member_imports_only_what_it_could_read(member):
    """image.import with a manifest naming /etc/shadow: permission_denied, with neither its size nor
    its sha256 in the answer; the store stays empty."""
    manifest = {"manifest_version": 1, "name": "steal", "kernel": "shadow", "rootfs": "shadow",
                "files": {"shadow": {"size": 1, "sha256": "0" * 64}}}
    path = member.file("manifest.json", json.dumps(manifest).encode(), 0o644)
    err = refused(member.call("image.import", files=[path, "/etc/shadow"]))
    assert "/etc/shadow" in err and "sha256" not in err and "bytes" not in err, err
    as_root = member.d.ctl("image", "import", path, "/etc/shadow")  # root may read it: the size comes back
    assert as_root.returncode == 1 and b"/etc/shadow has %d bytes" % os.stat("/etc/shadow").st_size in as_root.stderr
    assert json.loads(member.d.ctl("image", "ls", "--json").stdout) == []


def test_a_member_grows_only_disks_it_may_still_write(member):
    """vm.disk.add makes a disk in the VM's folder with tenboxd's rights; vm.disk.resize of a
    stopped VM's disk runs as the user who named it, so a file taken from the member since
    (root's now, read-only to others) is refused and keeps its size."""
    kernel = member.file("vmlinuz", source=guest_path("idle"))
    disk = member.file("data.raw", b"\0" * (1 << 20))
    r = member.ctl("vm", "create", "disky", "--kernel", kernel, "--disk", disk, "--memory", "32")
    assert r.returncode == 0, r.stderr
    added = member.call("vm.disk.add", vm_id="disky", size="2M")
    assert added["ok"], added
    assert member.call("vm.disk.resize", vm_id="disky", disk="data.raw", size="2M")["ok"]
    assert os.path.getsize(disk) == 2 << 20
    os.chown(disk, 0, 0)
    os.chmod(disk, 0o644)
    err = refused(member.call("vm.disk.resize", vm_id="disky", disk="data.raw", size="3M"))
    assert disk in err, err
    assert os.path.getsize(disk) == 2 << 20
    assert member.call("vm.disk.resize", vm_id="disky", disk=os.path.basename(added["payload"]["path"]),
                       size="+1M")["ok"]
