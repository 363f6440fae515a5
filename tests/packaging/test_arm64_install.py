"""The package on an arm64 host: install-linux.sh installs tenbox's .deb in an emulated arm64 Debian 12, whose tenboxd then runs an arm64 VM (tests; root; the arm64 lane).

The lane (tests/framework/lane_arm64.py) is an emulated arm64 KVM host
whose root is Debian 12 as debootstrap and apt make it, dpkg's database
included. Inside it, tests/framework/arm64_daemon.py runs the seed's install
path against a signed local repository holding this tree's .deb, with the
installer's real KVM check, then starts the installed tenboxd as its unit
would and has the operator create, start and shut down a 2-vCPU arm64 VM
through the group socket; then root's `tenbox image build debian --arch
arm64` imports the arm64 Debian template the build host made, and a VM of
it boots to the login prompt and shuts down gracefully. It prints one
`DAEMON:` line per step; this test checks them.
"""

from __future__ import annotations

import re
import shutil

from tests.framework import lane, linux_guest
from tests.framework.images import ARM64_NAME, build_arm64_template
from tests.packaging.aptrepo import AptRepository

LANE_DEADLINE_SEC = 2400  # the install, two VMs, an import and Debian's boot, all emulated: ~8 min here
LANE_MEMORY_MB = 3072  # the image store and the Debian VM's 512 MiB live in the lane's RAM (its /tmp)


def test_install_linux_sh_installs_tenbox_on_arm64_and_its_tenboxd_runs_arm64_vms(debs, tmp_path):
    """On the emulated arm64 host: install-linux.sh installs the `all` package with its Depends
    satisfied by arm64 Debian, passes its /dev/kvm check, adds the operator to the tenbox group,
    enables and restarts the unit; dpkg's audit is clean; the installed tenboxd makes its socket
    root:tenbox 0660 in a 0755 folder; the operator's `vm create`/`start` runs a 2-vCPU arm64 VM,
    `vm shutdown` presses its power button (graceful, no failure). `tenbox image build debian --arch arm64`
    finds the template up to date and imports it (aarch64, the arm64 cloud kernel, in `image ls` and
    `inspect`); a VM of it boots systemd to `tenbox login:` on ttyS0, and `vm shutdown` ends it
    gracefully: Debian's cloud kernel has no gpio-keys, it hears tenbox's virtio-input key and
    systemd-logind powers off. tenboxd stops cleanly."""
    template = build_arm64_template()
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
    shutil.copytree(str(template), str(out / "img"))  # with .stamp: the lane's script finds it up to date
    command = ("python3 -m tests.framework.arm64_daemon --repo /lane-out/aptrepo/repo "
               "--keyring /lane-out/aptrepo/%s --installer /lane-out/install-linux.sh --kernel %s "
               "--initrd /lane-out/initrd.cpio --image-dir /lane-out/img --image-name %s"
               % (repo.keyring.name, kernel, ARM64_NAME))
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
    # The arm64 Debian template through the installed tenboxd.
    lines = re.findall(r"^DAEMON: (\w+) ?(.*)$", res.console, re.M)
    assert said["image_build"].startswith("rc=0 up_to_date=True"), tail
    assert re.match(r"%s arch=aarch64 release=\d+\.\d+\.\d+-\d+-cloud-arm64\Z" % ARM64_NAME, said["image_ls"]), tail
    assert ("image_inspect", "arch: aarch64") in lines, tail
    assert re.match(r"kernel: \S+/vmlinuz \(\S+-cloud-arm64\)\Z", [v for k, v in lines if k == "image_inspect"][-1])
    assert said["image_create"].startswith("rc=0") and said["image_start"].startswith("rc=0"), tail
    assert re.match(r"after \d+s\Z", said.get("image_login", "")), tail
    assert ("image_console", "Debian GNU/Linux 12 tenbox ttyS0") in lines, tail  # agetty's banner on the 16550
    assert re.match(r"rc=0 graceful=True \d+s\Z", said["image_shutdown"]), tail
    assert said["image_state"] == "stopped failure=null", tail
    assert said["stopped"] == "rc=0", tail
    print("arm64 lane: the Debian VM's login prompt %s, its shutdown %s" % (said["image_login"], said["image_shutdown"]))
    assert res.rc == 0, tail
