"""The package on an arm64 host: install-linux.sh installs tenbox's .deb in an emulated arm64 Debian 12, whose tenboxd then runs an arm64 VM (tests; root; the arm64 lane).

The lane (tests/framework/lane_arm64.py) is an emulated arm64 KVM host
whose root is Debian 12 as debootstrap and apt make it, dpkg's database
included. Inside it, tests/framework/arm64_daemon.py runs the seed's install
path against a signed local repository holding this tree's .deb, with the
installer's real KVM check, then starts the installed tenboxd as its unit
would and has the operator create, start and shut down a 2-vCPU arm64 VM
through the group socket. It prints one `DAEMON:` line per step; this test
checks them.
"""

from __future__ import annotations

import re
import shutil

from tests.framework import lane, linux_guest
from tests.packaging.aptrepo import AptRepository

LANE_DEADLINE_SEC = 1500  # the install's byte-compiling and two Python start-ups under TCG: ~6 min here
LANE_MEMORY_MB = 2048


def test_install_linux_sh_installs_tenbox_on_arm64_and_its_tenboxd_runs_an_arm64_vm(debs, tmp_path):
    """On the emulated arm64 host: install-linux.sh installs the `all` package with its Depends
    satisfied by arm64 Debian, passes its /dev/kvm check, adds the operator to the tenbox group,
    enables and restarts the unit; dpkg's audit is clean; the installed tenboxd makes its socket
    root:tenbox 0660 in a 0755 folder; the operator's `vm create`/`start` runs a 2-vCPU arm64 VM,
    `vm shutdown` presses its power button (graceful, no failure); tenboxd stops cleanly."""
    out = tmp_path / "lane"
    out.mkdir()
    repo = AptRepository(out / "aptrepo" / "repo")
    try:
        repo.make_key()
        repo.publish([debs.old])
    finally:
        repo.close()
    shutil.copy2(str(debs.source / "scripts" / "install-linux.sh"), str(out / "install-linux.sh"))
    kernel = linux_guest.foreign_kernel("arm64", "generic", "gpio_keys evdev")
    linux_guest.arm64_initramfs(out / "initrd.cpio", linux_guest.ARM64_BUTTON_INIT, kernel=kernel)
    command = ("python3 -m tests.framework.arm64_daemon --repo /lane-out/aptrepo/repo "
               "--keyring /lane-out/aptrepo/%s --installer /lane-out/install-linux.sh --kernel %s "
               "--initrd /lane-out/initrd.cpio" % (repo.keyring.name, kernel))
    res = lane.run(command, out, LANE_DEADLINE_SEC, console_log=out / "console.log", arch="aarch64", gic="3",
                   memory_mb=LANE_MEMORY_MB)
    assert res.rc is not None, "the arm64 lane failed: %s\n%s" % (res.reason, lane.tail(res.console))
    said = dict(re.findall(r"^DAEMON: (\w+) ?(.*)$", res.console, re.M))
    tail = lane.tail(res.console, 80) + "\n" + lane.tail((out / "tenboxd.log").read_text()
                                                         if (out / "tenboxd.log").exists() else "", 40)
    assert said.get("install", "").startswith("rc=0"), tail
    assert said["dpkg"] == "install ok installed %s all on arm64" % debs.v1, tail
    assert said["audit"] == "[]", tail
    assert "tenbox" in said["groups"].split(), tail
    assert said["worker_user"] == "/usr/sbin/nologin", tail
    assert said["systemctl"] == '["enable tenboxd", "restart tenboxd"]', tail
    socket = re.fullmatch(r"socket=660:0:(\d+) dir=755 tenbox_gid=(\d+) version=tenboxd (\S+)", said["daemon"])
    assert socket and socket.group(1) == socket.group(2) and socket.group(3) == debs.v1, tail
    assert said["create"].startswith("rc=0") and said["start"].startswith("rc=0"), tail
    assert "ready" in said, tail
    assert said["shutdown"] == "rc=0 graceful=True", tail
    assert said["state"] == "stopped failure=null", tail
    console = re.findall(r"^DAEMON: console (.*)$", res.console, re.M)
    assert "ARM64-VM: keys=gpio-keys" in console and "ARM64-VM: event=010074000100" in console, tail
    assert said["stopped"] == "rc=0", tail
    assert res.rc == 0, tail
