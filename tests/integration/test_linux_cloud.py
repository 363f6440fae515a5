"""A cloud image through the operator's path, in the nested lane: `image import FILE`, cloud-init per VM,
`vm ssh` (tests; root; hardware virtualization).

The build host makes the cloud-layout disk (make-rootfs-debian.sh --layout
cloud: GPT, grub.cfg, cloud-init with NoCloud) beforehand ("cloud_image");
in the lane tenboxd imports it as a distribution's image, finding its kernel
through grub.cfg, and makes two VMs of it with `--ssh-key --user
--user-data`. Each boots Debian's kernel and systemd under tenbox's KVM
worker, and the image's cloud-init applies the seed tenboxd made: the user
with the key, the host name, the user-data's once-per-instance command.
`tenbox vm ssh NAME -- CMD` adds the SSH forward itself and logs in with
the key that matches. The same disk under QEMU TCG with a NoCloud seed is
test_cloud_layout.py's reference boot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.framework import lane
from tests.framework.daemon import DaemonProcess, ok
from tests.framework.images import CLOUD_DIR
from tests.framework.process import login_prompt

pytestmark = [pytest.mark.usefixtures("kvm")]

LOGIN_DEADLINE_SEC = float(os.environ.get("TENBOX_TEST_IMAGE_BOOT_DEADLINE", "420"))
SSH_WAIT_SEC = "300"  # vm ssh --timeout: sshd after cloud-init, emulated
USER_DATA = b"""#cloud-config
runcmd:
  - [sh, -c, 'echo "ran $(cat /proc/sys/kernel/random/boot_id)" >> /var/lib/tenbox-first-boot.log']
"""


def vm_ssh(d, name: str, key: Path, *command: str, timeout: float = 600) -> str:
    r = d.ctl("vm", "ssh", name, "-i", str(key), "--timeout", SSH_WAIT_SEC, "--", *command, timeout=timeout)
    assert r.returncode == 0, "vm ssh %s -- %s: exit %d: %s" % (name, " ".join(command), r.returncode,
                                                              r.stderr.decode(errors="replace")[-2000:])
    return r.stdout.decode()


@pytest.mark.hwvirt(prepare=("cloud_image",), budget=1200)  # ~570 s in the lane on 2026-12-06
def test_a_cloud_image_imported_gives_each_vm_its_own_user_host_and_identity_and_vm_ssh_reaches_it(tmp_path):
    """image import of the cloud-layout disk; two VMs with --ssh-key --user --user-data: each answers
    `vm ssh -- hostname` with its own name as the provisioned user (with sudo), with its own machine-id
    and SSH host key; the user-data's runcmd ran once, and not again after a reboot."""
    key = lane.ssh_key()
    own_key = tmp_path / "id_ed25519"
    shutil.copy(str(key), str(own_key))
    os.chmod(str(own_key), 0o600)
    user_data = tmp_path / "user-data.yaml"
    user_data.write_bytes(USER_DATA)
    d = DaemonProcess(tmp_path / "d")
    d.start()
    try:
        out = ok(d.ctl("image", "import", str(CLOUD_DIR / "disk.qcow2"), "--name", "cloud", timeout=1200))
        assert "cloud: imported" in out
        for name in ("alpha", "beta"):
            ok(d.ctl("vm", "create", name, "--image", "cloud", "--memory", "512", "--ssh-key", str(key) + ".pub",
                     "--user", "agent", "--user-data", str(user_data)))
        seen = {}
        for name in ("alpha", "beta"):
            ok(d.ctl("vm", "start", name))
            d.wait_console(name, login_prompt(name), timeout=LOGIN_DEADLINE_SEC, poll=1.0)
            # cloud-init's last stage (runcmd) may still run when sshd answers: wait for it first.
            answer = vm_ssh(d, name, own_key, "sudo -n cloud-init status --wait >/dev/null; "
                            "hostname; id -un; sudo -n true && echo sudo-ok; "
                            "cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub; "
                            "cat /var/lib/tenbox-first-boot.log").split("\n")
            assert answer[0] == name and answer[1] == "agent" and answer[2] == "sudo-ok", answer
            seen[name] = (answer[3], answer[4])
            assert len([ln for ln in answer[5:] if ln.startswith("ran ")]) == 1, answer
        assert seen["alpha"][0] != seen["beta"][0], "the two VMs share a machine-id"
        assert seen["alpha"][1] != seen["beta"][1], "the two VMs share an SSH host key"
        assert any(f.startswith("tcp:127.0.0.1:") and f.endswith("-:22") for f in d.vm("alpha")["net"]["hostfwds"])

        # Once per instance: after a reboot the runcmd has not run again. (The guest reboots itself: a
        # reset could lose its last writes; the connection may drop before ssh reports anything.)
        d.ctl("vm", "ssh", "alpha", "-i", str(own_key), "--timeout", "0", "--", "sudo systemctl reboot", timeout=120)
        d.wait_console("alpha", login_prompt("alpha"), timeout=LOGIN_DEADLINE_SEC, poll=1.0, count=2)
        log = vm_ssh(d, "alpha", own_key, "cat /var/lib/tenbox-first-boot.log").split("\n")
        assert len([ln for ln in log if ln.startswith("ran ")]) == 1, log
    finally:
        d.cleanup()
