"""Owners and modes of the data directory on a real tenboxd: nothing a guest wrote is readable by
other users (docs/security.md, tenbox_supervisor/modes.py)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.framework.guests import guest_path
from tests.framework.repo import PYTHON, repo_env
from tests.framework.users import system_group, unique_name

pytestmark = pytest.mark.usefixtures("kvm", "guests")


def mode_of(path: Path):
    st = os.lstat(str(path))
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.fixture
def group():
    name = unique_name("tbxg")
    with system_group(name) as gid:
        yield name, gid


def test_modes_after_create_and_start(make_daemon, group, tmp_path):
    """The data directory root:tenbox 0750, VM folders 0700, the VM's spec and overlay 0600,
    its logs 0640 root:tenbox in a setgid 2750 folder, written by the worker too."""
    name, gid = group
    d = make_daemon("modes", TENBOX_SOCKET_GROUP=name)
    d.start()
    template = tmp_path / "template.raw"
    template.write_bytes(b"\0" * (1 << 20))
    r = d.ctl("vm", "create", "m", "--kernel", guest_path("idle"), "--template", str(template), "--memory", "32")
    assert r.returncode == 0, r.stderr
    vm_dir = d.data_dir / "vms" / r.stdout.decode().strip()
    assert mode_of(d.data_dir) == (0o750, 0, gid)
    assert mode_of(d.data_dir / "vms") == (0o700, 0, 0)
    assert mode_of(vm_dir) == (0o700, 0, 0)
    assert mode_of(vm_dir / "vm.json") == (0o600, 0, 0)
    assert mode_of(vm_dir / "disk.qcow2")[0] == 0o600
    assert mode_of(vm_dir / "logs") == (0o2750, 0, gid)
    assert d.ctl("vm", "start", "m").returncode == 0
    d.wait_console("m", "idle: ready")
    for log in ("console.log", "runtime.log"):
        assert mode_of(vm_dir / "logs" / log) == (0o640, 0, gid), log
    assert mode_of(vm_dir / "runtime.json") == (0o600, 0, 0)
    assert d.ctl("vm", "stop", "m").returncode == 0


def test_what_older_versions_left_is_fixed_at_start_and_links_are_not_followed(make_daemon, group, tmp_path):
    """A data directory as older tenboxd versions left it (0755 folders, 0644 disk and console):
    the next start sets the modes, and a link where a log should be is left alone, its target
    untouched; `tenboxd --fix-permissions` does the same for the package's postinst."""
    name, gid = group
    d = make_daemon("old", TENBOX_SOCKET_GROUP=name)
    vm_dir = d.data_dir / "vms" / "0123456789ab"
    (vm_dir / "logs").mkdir(parents=True)
    for folder in (d.data_dir, d.data_dir / "vms", vm_dir, vm_dir / "logs"):
        os.chmod(str(folder), 0o755)
    (vm_dir / "vm.json").write_text('{"id": "0123456789ab", "name": "old", "kernel": "%s"}' % guest_path("idle"))
    (vm_dir / "disk.qcow2").write_bytes(b"guest data")
    (vm_dir / "logs" / "console.log").write_text("login: root\n")
    (vm_dir / "logs" / "console.log.1").write_text("older\n")
    target = tmp_path / "elsewhere"
    target.write_text("not tenbox's")
    os.chmod(str(target), 0o604)
    os.symlink(str(target), str(vm_dir / "logs" / "runtime.log"))
    for f in ("vm.json", "disk.qcow2", "logs/console.log", "logs/console.log.1"):
        os.chmod(str(vm_dir / f), 0o644)
    d.start()
    assert mode_of(d.data_dir) == (0o750, 0, gid)
    assert mode_of(vm_dir) == (0o700, 0, 0)
    assert mode_of(vm_dir / "disk.qcow2")[0] == mode_of(vm_dir / "vm.json")[0] == 0o600
    assert mode_of(vm_dir / "logs") == (0o2750, 0, gid)
    assert mode_of(vm_dir / "logs" / "console.log") == mode_of(vm_dir / "logs" / "console.log.1") == (0o640, 0, gid)
    assert mode_of(target) == (0o604, 0, 0) and os.path.islink(str(vm_dir / "logs" / "runtime.log"))
    d.stop()
    os.chmod(str(vm_dir / "disk.qcow2"), 0o666)
    r = subprocess.run([PYTHON, "-m", "tenbox_supervisor", "--fix-permissions", "--data-dir", str(d.data_dir)],
                       env=repo_env({"TENBOX_SOCKET_GROUP": name}), capture_output=True, timeout=60)
    assert r.returncode == 0 and b"set the owner or mode of 1 paths" in r.stderr, r.stderr
    assert mode_of(vm_dir / "disk.qcow2")[0] == 0o600
