"""The operator's path with a stock Debian guest, end to end, on tenbox's own devices.

tenboxd runs; `tenbox image build debian` imports an image with an SSH key
(the build itself ran on the build host, whose cache the lane sees);
`tenbox vm create --image ... --hostfwd` and `vm start` boot Debian's
kernel and systemd to a login prompt under tenbox's KVM worker, with the
root file system on tenbox's virtio-blk and qcow2 code and the network on
its virtio-net and libslirp: no QEMU in the inner boot. Then: a command
over SSH through the forward, a file that survives a guest reboot,
`host.update` refused while the VM runs, `vm shutdown` through ACPI ending
`stopped`, and kill -9 of a worker ending `crashed` with the console tail.

These need hardware virtualization: they run directly on hosts with vmx/svm
and in the nested lane elsewhere (tests/framework/lane_plugin.py), where
the image build happened on the build host beforehand ("e2e_image").
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.framework import lane
from tests.framework.daemon import DaemonProcess, ok
from tests.framework.ports import free_port
from tests.framework.process import Pattern, login_prompt

pytestmark = [pytest.mark.usefixtures("kvm")]

IMAGE = "e2e"
LOGIN = login_prompt("tenbox")
# systemd to the login prompt in the lane takes ~60-120 s (docs/testing.md: timings there are a proxy).
BOOT_DEADLINE_SEC = float(os.environ.get("TENBOX_TEST_IMAGE_BOOT_DEADLINE", "420"))
SSH_DEADLINE_SEC = 180.0
CONSOLE_POLL_SEC = 1.0
EXT4_VALID_FS = 0x1  # s_state: unmounted cleanly
EXT4_INCOMPAT_RECOVER = 0x4  # the journal needs recovery: set while mounted read-write


def wait_console(daemon, name: str, text: Pattern, count: int = 1) -> float:
    """Seconds until `text` (a string or a pattern) appears `count` times in the VM's console log
    (polled every second: the lane is slow)."""
    return daemon.wait_console(name, text, timeout=BOOT_DEADLINE_SEC, count=count, poll=CONSOLE_POLL_SEC)


def ssh(port: int, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    key = lane.ssh_key()
    argv = ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
            "-o", "LogLevel=ERROR", "root@127.0.0.1", command]
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ssh_until_ok(port: int, command: str, deadline: float = SSH_DEADLINE_SEC) -> str:
    """Run command over SSH, retrying while sshd is not up yet."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < deadline:
        try:
            last = ssh(port, command)
        except subprocess.TimeoutExpired:
            continue
        if last.returncode == 0:
            return last.stdout.decode()
        time.sleep(2)
    pytest.fail("ssh -p %d %r did not succeed within %.0f s: %s" % (
        port, command, deadline, last.stderr.decode(errors="replace").strip() if last else "no answer"),
        pytrace=False)


@pytest.fixture(scope="module")
def image_daemon(tmp_path_factory):
    """One daemon for this module whose store has the e2e image, imported by `tenbox image build debian`
    (an import reads the whole image: about 50 s in the lane, so once)."""
    daemon = DaemonProcess(tmp_path_factory.mktemp("e2e"))
    daemon.start()
    try:
        _import_image(daemon)
        yield daemon
    finally:
        daemon.cleanup()


def _import_image(daemon) -> None:
    key = lane.ssh_key()
    r = daemon.ctl("image", "build", "debian", "--layout", "plain", "--name", IMAGE, "--ssh-key", str(key) + ".pub",
                   "--out", str(lane.E2E_IMAGE_DIR), timeout=600)
    out = ok(r)
    assert "up to date" in r.stderr.decode(), "the lane rebuilt the image instead of using the host's build:\n" \
        + r.stderr.decode()[-3000:]
    assert IMAGE in out


@pytest.mark.hwvirt(prepare=("e2e_image",), budget=1800)
def test_debian_image_boots_systemd_answers_ssh_keeps_files_across_reboot_and_shuts_down(image_daemon, tmp_path):
    """vm create --image --hostfwd, vm start: systemd reaches the login prompt; ssh through the
    forward runs a command; a file written in the guest survives a guest reboot; host.update is
    refused with vms_running; a live disk resize shows in the guest; vm shutdown powers the guest
    off through ACPI and the VM ends stopped with its ext4 clean; so does a host shutdown
    (tenboxctl host shutdown-vms), which ends it stopped with the reason host_shutdown."""
    d = image_daemon
    port = free_port()
    # One vCPU: with two, this Debian guest ended in a triple fault in the lane's kernel init
    # (about 11 s in, while the initramfs unpacks) in CI10, CI13 and both runs of CI14 on
    # 2026-12-06; QEMU's KVM boot of the same kernel and initrd in the lane did the same
    # (docs/testing.md): the emulated nested paging's fault, not tenbox's. SMP boots stay covered
    # by test_linux_tenbox.py (1, 2 and 4 vCPUs).
    ok(d.ctl("vm", "create", "web", "--image", IMAGE, "--memory", "512", "--cpus", "1",
             "--hostfwd", "tcp::%d-:22" % port))
    _start(d, "web")
    took = wait_console(d, "web", LOGIN)
    print("login prompt after %.0f s" % took)

    assert ssh_until_ok(port, "uname -r").strip().endswith("-cloud-amd64")
    out = ssh_until_ok(port, "cat /proc/cmdline; lsblk -no NAME,FSTYPE,MOUNTPOINT /dev/vda")
    assert "root=/dev/vda" in out and "ext4 /" in " ".join(out.split()), out
    ssh_until_ok(port, "echo kept-across-reboot > /root/e2e.txt && sync")

    r = d.call("host.update")
    assert r["error_code"] == "vms_running", r
    assert [v["name"] for v in r["running_vms"]] == ["web"]

    ssh(port, "systemctl reboot")  # the connection may drop before ssh reports anything
    wait_console(d, "web", LOGIN, count=2)
    assert ssh_until_ok(port, "cat /root/e2e.txt").strip() == "kept-across-reboot"
    assert d.vm("web")["state"] == "running"

    # A live resize of the root disk: the guest's kernel sees the new capacity at once.
    before = int(ssh_until_ok(port, "cat /sys/block/vda/size").strip()) * 512
    ok(d.ctl("vm", "disk", "resize", "web", "0", "--size", "+1G"))
    assert _guest_disk_bytes(port, before) == before + (1 << 30)

    ok(d.ctl("vm", "shutdown", "web", timeout=300))
    v = d.wait_state("web", "stopped", 240)
    assert v.get("last_failure") in (None, {}), v
    text = "\n".join(d.console("web"))
    assert "reboot: Power down" in text, text[-3000:]
    assert _root_fs_state(d, "web", tmp_path) == ("clean", False)

    # The host shuts down (what tenbox-guests.service's ExecStop runs): the guest gets the power
    # button, shuts systemd down, and its file system is left clean.
    _start(d, "web")
    ssh_until_ok(port, "echo written-before-host-shutdown >> /root/e2e.txt", deadline=BOOT_DEADLINE_SEC)
    r = d.ctl("host", "shutdown-vms", "--timeout", "240", timeout=300)
    ok(r)
    v = d.wait_state("web", "stopped", 60)
    assert v["state_reason"] == "host_shutdown" and v.get("last_failure") in (None, {}), v
    assert "reboot: Power down" in "\n".join(d.console("web")[-200:])
    assert _root_fs_state(d, "web", tmp_path) == ("clean", False)


def _guest_disk_bytes(port: int, old: int, deadline: float = 60.0) -> int:
    """/dev/vda's size as the guest's kernel has it, once it differs from `old`."""
    started = time.monotonic()
    while True:
        size = int(ssh_until_ok(port, "cat /sys/block/vda/size").strip()) * 512
        if size != old or time.monotonic() - started > deadline:
            return size
        time.sleep(2)


def _start(d, name: str) -> None:
    """vm start; a refusal with the end of the VM's runtime.log (a worker that hung: its stacks)."""
    r = d.ctl("vm", "start", name)
    if r.returncode != 0:
        log = d.data_dir / "vms" / d.vm(name)["id"] / "logs" / "runtime.log"
        tail = log.read_text(errors="replace").splitlines()[-80:] if log.exists() else ["(no runtime.log)"]
        raise AssertionError("vm start %s: exit %d: %s\nruntime.log:\n%s"
                             % (name, r.returncode, r.stderr.decode(errors="replace").strip(), "\n".join(tail)))


def _root_fs_state(d, name: str, tmp_path: Path):
    """The ext4 root's superblock on the VM's overlay (its first 4 KiB read through qemu-img):
    ("clean", False) after a clean unmount; a crash leaves the journal to recover (the
    RECOVER incompat flag, set while mounted) or the file system not clean."""
    disk = [x for x in d.call("vm.disk.list", vm_id=name)["payload"]["disks"] if x["index"] == 0][0]
    head = tmp_path / ("%s-head.raw" % name)
    subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=4096", "count=1",
                    "if=%s" % disk["path"], "of=%s" % head], check=True, timeout=120, capture_output=True)
    sb = head.read_bytes()[1024:2048]
    head.unlink()
    magic, state = struct.unpack_from("<HH", sb, 0x38)
    incompat, = struct.unpack_from("<I", sb, 0x60)
    assert magic == 0xEF53, "no ext4 superblock at the start of %s" % disk["path"]
    return ("clean" if state & EXT4_VALID_FS else "not clean"), bool(incompat & EXT4_INCOMPAT_RECOVER)


@pytest.mark.hwvirt(prepare=("e2e_image",), budget=600)
def test_kill_9_of_a_debian_vms_worker_leaves_it_crashed_with_the_console_tail(image_daemon):
    """kill -9 of the worker while Debian boots: the VM ends crashed, last_failure says killed by
    SIGKILL and carries the last lines of the console log."""
    d = image_daemon
    ok(d.ctl("vm", "create", "victim", "--image", IMAGE, "--memory", "512"))
    ok(d.ctl("vm", "start", "victim"))
    wait_console(d, "victim", "Linux version")
    pid = d.vm("victim")["pid"]
    os.kill(pid, signal.SIGKILL)
    v = d.wait_state("victim", "crashed", 60)
    failure = v["last_failure"]
    assert failure["code"] == "killed" and failure["signal"] == "SIGKILL", failure
    tail = failure["console"]
    log = d.console("victim")
    assert tail and any("Command line:" in ln or "Linux version" in ln for ln in log), failure
    assert log[-len(tail):] == tail, "the failure's console tail is not the end of the console log"
    shown = ok(d.ctl("vm", "show", "victim"))
    assert "killed" in shown, shown


@pytest.mark.hwvirt(prepare=("e2e_image",), budget=900)
def test_a_debian_vm_snapshotted_after_login_restores_and_its_clones_answer_ssh_as_their_own_hosts(image_daemon):
    """A Debian VM answering SSH is snapshotted; after vm restore, a file on its disk and one in its RAM
    (/dev/shm: a boot would lose it) changed after the snapshot are back as they were. Two clones of the snapshot (vm clone --no-hostfwds,
    then vm edit --hostfwd each its own port) answer SSH as copies of the source, each is given its own
    host name by the documented post-clone step (docs/daemon.md, "Snapshots"), and answers with it; the
    source runs on untouched."""
    d = image_daemon
    port = free_port()
    ok(d.ctl("vm", "create", "src", "--image", IMAGE, "--memory", "512", "--cpus", "1",
             "--hostfwd", "tcp::%d-:22" % port))
    _start(d, "src")
    wait_console(d, "src", LOGIN)
    marks = "cat /root/snap.txt /dev/shm/snap.txt"
    source_host = ssh_until_ok(port, "echo on-disk > /root/snap.txt && echo in-ram > /dev/shm/snap.txt && sync"
                                     " && hostname").strip()
    ok(d.ctl("vm", "snapshot", "src", "--name", "login", timeout=300))
    ssh_until_ok(port, "echo after > /root/snap.txt && echo after > /dev/shm/snap.txt && sync")
    assert ssh_until_ok(port, marks).split() == ["after", "after"]

    ok(d.ctl("vm", "restore", "src", "login", timeout=300))
    assert d.wait_state("src", "running", 120)["state"] == "running"
    assert ssh_until_ok(port, marks).split() == ["on-disk", "in-ram"], "the snapshot's disk and RAM, no boot"

    ok(d.ctl("vm", "clone", "src/login", "--name", "cl", "--count", "2", "--no-hostfwds", timeout=600))
    ports = {}
    for name in ("cl-1", "cl-2"):
        ports[name] = free_port()
        ok(d.ctl("vm", "edit", name, "--hostfwd", "tcp::%d-:22" % ports[name]))
    for name, p in ports.items():
        assert ssh_until_ok(p, marks + "; hostname").split() == ["on-disk", "in-ram", source_host]
        # The post-clone step: each clone its own name (and whatever else docs/daemon.md lists).
        ssh_until_ok(p, "hostnamectl set-hostname %s" % name)
    names = {name: ssh_until_ok(p, "hostname").strip() for name, p in ports.items()}
    assert names == {"cl-1": "cl-1", "cl-2": "cl-2"}
    assert ssh_until_ok(port, "hostname").strip() == source_host
    for name in ("cl-1", "cl-2", "src"):
        ok(d.ctl("vm", "stop", name, timeout=120))
