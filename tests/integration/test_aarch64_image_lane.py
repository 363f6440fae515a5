"""The arm64 template in the arm64 lane: imported by `tenbox image build debian --arch arm64` into an arm64 tenboxd, and booted by its worker to the login prompt (issue 17).

The template is built on this amd64 host through qemu-user
(tests/framework/images.py, cached; tests/integration/test_image_arm64.py
judges it); the lane has no network, so its folder is copied into the
lane's results share, where the lane's `image build` finds it up to date
and imports it (tests/framework/arm64_image.py). Then tenboxd's arm64
worker, on the emulated host's KVM (tests/framework/lane_arm64.py), boots
Debian's arm64 cloud kernel, the template's initramfs and systemd from a
qcow2 overlay of it, to `tenbox login:` on ttyS0 (tenbox's 16550 on MMIO).

make-rootfs-debian.sh runs in the lane (for its up-to-date check), so the
lane's userland must have bash and coreutils: a debootstrapped one does, one
unpacked from python3's dependencies alone does not.
"""

import re
import shutil

from tests.framework import lane
from tests.framework.images import ARM64_NAME, build_arm64_template

LANE_DEADLINE_SEC = 1800  # the lane's boot, an import of ~180 MB and systemd, everything emulated
LANE_MEMORY_MB = 3072  # the store and the VM's 512 MiB live in the lane's RAM (its /tmp)


def test_an_arm64_tenboxd_imports_the_arm64_template_boots_its_vm_to_login_and_shuts_it_down(tmp_path):
    """In the arm64 lane: `tenbox image build debian --arch arm64` finds the build up to date and
    imports it (exit 0); `image ls` and `image inspect` show it as aarch64 with the arm64 cloud kernel;
    a VM of it (1 vCPU, 512 MiB) started by tenboxd reaches systemd's `tenbox login:` on ttyS0 (41 to
    67 s with `quiet`; the whole lane about 3 min on the development machines); `vm shutdown` presses
    the power button, which Debian's cloud kernel (no gpio-keys) hears through tenbox's virtio-input
    key: systemd-logind powers the guest off by itself (graceful, no failure)."""
    template = build_arm64_template()
    out = tmp_path / "lane"
    out.mkdir()
    shutil.copytree(str(template), str(out / "img"))  # with .stamp: the lane's script finds it up to date
    command = "python3 -m tests.framework.arm64_image --out /lane-out/img --name %s" % ARM64_NAME
    res = lane.run(command, out, LANE_DEADLINE_SEC, console_log=out / "console.log", arch="aarch64", gic="3",
                   memory_mb=LANE_MEMORY_MB)
    assert res.rc is not None, "the arm64 lane failed: %s\n%s" % (res.reason, lane.tail(res.console))
    said = re.findall(r"^IMAGE: (\w+) ?(.*)$", res.console, re.M)
    steps = dict(said)
    assert steps.get("build", "").startswith("rc=0 up_to_date=True"), lane.tail(res.console, 80)
    assert re.match(r"%s arch=aarch64 release=\d+\.\d+\.\d+-\d+-cloud-arm64\Z" % ARM64_NAME, steps.get("ls", "")), \
        lane.tail(res.console, 80)
    assert ("inspect", "arch: aarch64") in said
    assert re.match(r"kernel: \S+/vmlinuz \(\S+-cloud-arm64\)\Z", [v for k, v in said if k == "inspect"][-1])
    assert steps["create"].startswith("rc=0") and steps["start"].startswith("rc=0"), lane.tail(res.console, 80)
    assert re.match(r"after \d+s\Z", steps.get("login", "")), lane.tail(res.console, 80)
    assert ("console", "Debian GNU/Linux 12 tenbox ttyS0") in said  # agetty's banner on tenbox's 16550
    assert re.match(r"rc=0 graceful=True \d+s\Z", steps.get("shutdown", "")), lane.tail(res.console, 80)
    assert steps["state"] == "stopped failure=null", lane.tail(res.console, 80)
    assert res.rc == 0, lane.tail(res.console, 80)
    print("arm64 lane: login prompt %s, shutdown %s (import: %s)" % (steps["login"], steps["shutdown"], steps["build"]))
