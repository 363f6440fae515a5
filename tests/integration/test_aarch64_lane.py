"""The arm64 lane (issue 17): an emulated arm64 KVM host, and tenbox's arm64 KVM layer and worker in it.

tests/framework/lane_arm64.py boots `qemu-system-aarch64 -M
virt,virtualization=on` (TCG: EL2 emulated) with Debian's generic arm64
kernel and a Debian 12 arm64 userland. Inside, tests/framework/arm64_probe.py
makes a VM with tenbox_vmm's KVM wrappers and tenbox_vmm/arch/aarch64/cpu.py:
vCPUs with PSCI 0.2, the vGIC placed where tenbox's device tree says, boot
registers as for a kernel; six guest instructions write a byte to the UART's
address and call PSCI SYSTEM_OFF. Under the lane's GICv3 and under its GICv2
(the Raspberry Pi 4's kind). Then `tenbox-vm-runtime` itself (machine.py with
arch/aarch64/board.py) runs Debian's arm64 kernels there: a disk, the NAT and
a reboot; the power button; the project's arm64 initramfs.

One lane per GIC version serves every test of this module (a lane's boot and
interpreter start cost about half a minute): the module fixture runs each
test's commands in its own section of that lane's one command, `== NAME`
... `== NAME rc=N`, and the tests read their section.
"""

import hashlib
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest

from tests.framework import lane, linux_guest

LANE_DEADLINE_SEC = 1500  # every section of one lane: about 4 min for GICv3's on the development machines
LANE_MEMORY_MB = 2048
PROBES = {"3": (2, 1), "2": (2,)}  # per lane GIC: the vCPU counts of the KVM-layer probes


VM_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/load-order); do insmod /modules/$m; done
echo "ARM64-VM: nproc=$(nproc)"
echo "ARM64-VM: gic=$(cat /proc/device-tree/intc@8000000/compatible)"
echo "ARM64-VM: console=$(cut -d' ' -f1 /proc/consoles)"
echo "ARM64-VM: rtc=$(cat /sys/class/rtc/rtc0/name) $(cat /sys/class/rtc/rtc0/since_epoch)"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || echo "ARM64-VM: no ext4 on /dev/vda"
boot=$(( $(cat /mnt/boots 2>/dev/null || echo 0) + 1 ))
echo $boot > /mnt/boots
echo "ARM64-VM: boot=$boot base=$(cat /mnt/base.txt)"
if [ $boot = 1 ]; then umount /mnt; reboot -f; fi
ip link set lo up; ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -s /dhcp.sh >/dev/null
echo "ARM64-VM: address=$(ip -4 -o addr show eth0 | awk '{print $4}')"
wget -q -O /mnt/fetched.txt http://10.0.2.100/token.txt
echo "ARM64-VM: fetched=$(cat /mnt/fetched.txt)"
umount /mnt
poweroff -f
"""
DHCP_SCRIPT = """#!/bin/busybox sh
[ "$1" = bound ] || exit 0
ip addr add $ip/${mask:-24} dev $interface
ip route add default via $router
"""
DOCTOR = ("python3 -c \"from tenbox_supervisor.doctor import run_checks; c = [c for c in run_checks()['checks'] "
          "if c['id'] == 'arm_vgic'][0]; print('DOCTOR:', c['ok'], c['message'])\"")
VM_RUNS = {"3": (1, 2), "2": (1, 2)}  # per lane GIC: the vCPU counts of its runs


def _ext4_disk(out, runs):
    """base.raw, ext4 with base.txt, and one qcow2 overlay on it per run (backing named relative: the lane
    sees the folder as /lane-out)."""
    tree = out / "tree"
    tree.mkdir()
    (tree / "base.txt").write_text("base layer\n")
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(out / "base.raw"), "32M"], check=True)
    for n in runs:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                        str(out / ("overlay-%d.qcow2" % n))], check=True, cwd=str(out))


def _read_ext4(image, name) -> str:
    """A file of an ext4 image (qcow2 or raw), read by the host's qemu-img and debugfs (the oracle)."""
    raw = image.with_suffix(".check.raw") if image.suffix == ".qcow2" else image
    if raw != image:
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    r = subprocess.run(["debugfs", "-R", "cat /%s" % name, str(raw)], capture_output=True, text=True, check=True)
    if raw != image:
        raw.unlink()
    return r.stdout


def _section(name: str, command: str) -> str:
    return "echo '== %s'; ( %s ); echo \"== %s rc=$?\"" % (name, command, name)


def _prepare_vm_runs(out: Path, gic: str) -> Tuple[List[str], Dict]:
    linux_guest.arm64_initramfs(out / "initrd.cpio", VM_INIT, {"dhcp.sh": DHCP_SCRIPT})
    kernel = linux_guest.foreign_kernel("arm64")
    runs = VM_RUNS[gic]
    _ext4_disk(out, runs)
    token = "token-%d" % time.time()
    (out / "www").mkdir()
    (out / "www" / "token.txt").write_text(token)
    vm = ("python3 -m tenbox_vmm --kernel %s --initrd /lane-out/initrd.cpio --memory 256 --console stdio --net "
          "--cmdline 'console=ttyS0 panic=1 quiet' "
          "--guestfwd guestfwd:10.0.2.100:80-127.0.0.1:8080" % kernel)
    sections = [_section("doctor", DOCTOR),
                "(python3 -m http.server --directory /lane-out/www --bind 127.0.0.1 8080 >/dev/null 2>&1 &); sleep 1"]
    sections += [_section("vm-%d" % n, "timeout 300 %s --cpus %d --disk /lane-out/overlay-%d.qcow2" % (vm, n, n))
                 for n in runs]
    facts = {"token": token, "base": hashlib.sha256((out / "base.raw").read_bytes()).hexdigest()}
    return sections, facts


def _prepare_buttons(out: Path) -> List[str]:
    kernels = {"generic": linux_guest.foreign_kernel("arm64", "generic", "gpio_keys evdev"),
               "cloud": linux_guest.foreign_kernel("arm64", "cloud", "virtio_mmio virtio_input evdev")}
    sections = []
    for flavour, kernel in kernels.items():
        linux_guest.arm64_initramfs(out / ("initrd-%s.cpio" % flavour), linux_guest.ARM64_BUTTON_INIT, kernel=kernel)
        sections.append(_section("button-" + flavour, (
            "python3 -m tenbox_vmm --kernel {k} --initrd /lane-out/initrd-{f}.cpio --memory 256 --console stdio "
            "--cmdline 'console=ttyS0 panic=1 quiet' > /tmp/vm-{f}.out 2>&1 & pid=$!; "
            "for i in $(seq 300); do grep -q 'ARM64-VM: ready' /tmp/vm-{f}.out && break; sleep 1; done; sleep 1; "
            "kill -PWR $pid; wait $pid; rc=$?; cat /tmp/vm-{f}.out; exit $rc").format(f=flavour, k=kernel)))
    sections.append(_section("nofdt", "python3 -m tests.framework.arm64_nofdt --kernel %s "
                                      "--initrd /lane-out/initrd-generic.cpio 2>&1" % kernels["generic"]))
    return sections


INITRAMFS_GUEST = ("mkfs.ext4 -q -L a64 /dev/vda && e2fsck -fn /dev/vda && mount /dev/vda /mnt && "
                   "echo {token} > /mnt/hello && umount /mnt && e2fsck -fn /dev/vda && uname -m")


def _prepare_initramfs(out: Path) -> Tuple[List[str], Dict]:
    kernel = linux_guest.foreign_kernel("arm64")
    r = subprocess.run([str(linux_guest.SCRIPTS / "make-initramfs.sh"), "--arch", "arm64", "--kernel-dir",
                        str(kernel.parent), "--out", str(out / "initramfs.cpio.gz")],
                       capture_output=True, text=True, timeout=600)
    with open(str(out / "disk.raw"), "wb") as f:
        f.truncate(64 << 20)
    token = "arm64-initramfs-%d" % time.time()
    guest = INITRAMFS_GUEST.format(token=token)
    command = ("timeout 300 python3 -m tenbox_vmm --kernel %s --initrd /lane-out/initramfs.cpio.gz --memory 256 "
               "--console stdio --disk /lane-out/disk.raw --cmdline 'console=ttyS0 panic=1 quiet tenbox.run=%s'"
               % (kernel, urllib.parse.quote(guest, safe="")))
    return [_section("initramfs", command)], {"initramfs_token": token, "make_initramfs": r}


class LaneRun(SimpleNamespace):
    def section(self, name: str) -> Tuple[int, str]:
        """(exit code, output) of one section; fails the test if the lane never finished it."""
        assert self.res.rc is not None, "the arm64 lane failed: %s\n%s" % (self.res.reason, lane.tail(self.res.console))
        m = re.search(r"^== %s\n(.*?)^== %s rc=(\d+)$" % (re.escape(name), re.escape(name)), self.res.console,
                      re.M | re.S)
        assert m, "no section %s in the lane's console:\n%s" % (name, lane.tail(self.res.console, 150))
        return int(m.group(2)), m.group(1)


def _run_lane(out: Path, gic: str) -> LaneRun:
    facts: Dict = {"started": time.time()}
    sections = [_section("probe-%d" % n, "python3 -m tests.framework.arm64_probe --gic v%s --cpus %d" % (gic, n))
                for n in PROBES[gic]]
    if gic == "2":  # a GICv3 asked of a host that has only a GICv2
        sections.append(_section("refuse", "python3 -m tests.framework.arm64_probe --gic v3 --cpus 1"))
    vm_sections, more = _prepare_vm_runs(out, gic)
    sections += vm_sections
    facts.update(more)
    if gic == "3":
        sections += _prepare_buttons(out)
        initramfs_sections, more = _prepare_initramfs(out)
        sections += initramfs_sections
        facts.update(more)
    # A script in the results share: the sections together are longer than a kernel command line may be.
    (out / "sections.sh").write_text("\n".join(sections) + "\n")
    res = lane.run("sh /lane-out/sections.sh", out, LANE_DEADLINE_SEC, console_log=out / "console.log",
                   arch="aarch64", gic=gic, memory_mb=LANE_MEMORY_MB)
    return LaneRun(out=out, res=res, **facts)


@pytest.fixture(scope="module")
def arm64_lane(tmp_path_factory):
    """arm64_lane(gic): the module's lane under that GIC version, run once, when a test first asks."""
    runs: Dict[str, LaneRun] = {}

    def get(gic: str) -> LaneRun:
        if gic not in runs:
            runs[gic] = _run_lane(tmp_path_factory.mktemp("arm64-gic%s-" % gic), gic)
        return runs[gic]

    return get


@pytest.mark.parametrize("gic, cpus", [("3", 2), ("2", 2), ("3", 1)])
def test_tenboxs_arm64_kvm_layer_runs_guest_code_to_a_psci_power_off(arm64_lane, gic, cpus):
    run = arm64_lane(gic)
    rc, out = run.section("probe-%d" % cpus)
    said = dict(re.findall(r"^PROBE: (\w+)[= ](.*)$", out, re.M))
    assert "LANE: kvm ok" in run.res.console, lane.tail(run.res.console)
    assert rc == 0, out
    assert said["target"].endswith("gics=v%s" % gic)  # what the emulated host's KVM offers
    assert said["pc"] == "0x40200000 pstate=0x3c5 x0=0x40000000"  # EL1h, DAIF masked, x0 the tree
    assert said["mmio"] == "addr=0x9000000 len=1 write=1 data=41"  # 'A' to the UART's address
    assert said["system_event"] == "type=1"  # KVM_SYSTEM_EVENT_SHUTDOWN: PSCI SYSTEM_OFF


def test_a_gic_the_host_lacks_is_refused_with_one_line_naming_what_it_has(arm64_lane):
    rc, out = arm64_lane("2").section("refuse")
    said = dict(re.findall(r"^PROBE: (\w+)[= ](.*)$", out, re.M))
    assert rc == 3, out
    assert said["error"] == ("this host's KVM cannot make a GICv3 (KVM_CREATE_DEVICE: No such device); "
                             "it has: GICv2")


@pytest.mark.parametrize("gic", ["3", "2"])
def test_tenbox_vm_runtime_runs_debians_arm64_kernel_with_disk_net_and_reboot(arm64_lane, gic):
    """`tenbox-vm-runtime` on the emulated arm64 host, Debian's arm64 cloud kernel and a busybox init:
    every vCPU up under the host's vGIC, its console on tenbox's 16550 over MMIO, the PL031's time;
    the init counts its boots on an ext4 qcow2 overlay and reboots once (the worker boots it again in
    the same process), then takes a DHCP lease from the NAT, fetches a file from a server in the
    outer machine (through a --guestfwd: the NAT keeps the host's loopback from guests) onto the disk,
    and powers off: exit 0. The host reads the overlay afterwards."""
    run = arm64_lane(gic)
    _, doctor = run.section("doctor")
    assert "DOCTOR: True virtual GIC: %s (VMs use GICv%s)" % ("GICv3" if gic == "3" else "GICv2", gic) in doctor
    for n in VM_RUNS[gic]:
        rc, out = run.section("vm-%d" % n)
        said = {k: re.sub(r"\[\s*\d+\.\d+\].*", "", v)  # a kernel message can end the line
                for k, v in re.findall(r"^ARM64-VM: (\w+)=(.*)$", out, re.M)}
        assert rc == 0, lane.tail(out, 150)  # the worker's exit: the guest powered off
        assert said["nproc"] == str(n)
        assert said["gic"].rstrip("\0") == ("arm,gic-v3" if gic == "3" else "arm,cortex-a15-gic")
        assert said["console"] == "ttyS0"
        rtc = said["rtc"].split()  # the driver and device, then the clock's seconds since 1970
        rtc_name, rtc_seconds = rtc[0], rtc[-1]
        assert rtc_name == "rtc-pl031" and abs(int(rtc_seconds) - run.started) < 900
        assert re.findall(r"^ARM64-VM: boot=(\d+) base=(.*)$", out, re.M) == [("1", "base layer"), ("2", "base layer")]
        assert said["address"] == "10.0.2.15/24" and said["fetched"] == run.token
        overlay = run.out / ("overlay-%d.qcow2" % n)
        assert _read_ext4(overlay, "boots").strip() == "2" and _read_ext4(overlay, "fetched.txt") == run.token
    assert hashlib.sha256((run.out / "base.raw").read_bytes()).hexdigest() == run.base  # the base took no write


def test_the_power_button_reaches_debians_generic_and_cloud_arm64_kernels(arm64_lane):
    """The host's power button (SIGPWR here; `vm shutdown` through tenboxd calls the same) on the arm64 board,
    one press on the key the guest's kernel runs: Debian's generic arm64 kernel binds gpio-keys to tenbox's
    PL061 from the device tree; its cloud kernel has no gpio-keys but virtio_input, which binds tenbox's
    virtio-input power key. Each delivers KEY_POWER (type 1, code 116, pressed) first on that input
    device, the init then powers off: exit 0. Without python3-libfdt (a Recommends: Debian 11 has none),
    doctor and the worker say so in one line."""
    run = arm64_lane("3")
    for flavour, keys in (("generic", "gpio-keys"), ("cloud", "tenbox power button")):
        rc, out = run.section("button-" + flavour)
        said = dict(re.findall(r"^ARM64-VM: (\w+)=(.*)$", out, re.M))
        assert said.get("keys") == keys, lane.tail(out, 80)
        assert said["event"] == "0100" "7400" "0100", lane.tail(out, 80)  # EV_KEY, KEY_POWER, 1 (pressed)
        assert rc == 0, lane.tail(out, 80)
    rc, out = run.section("nofdt")
    assert ("NOFDT: doctor False python3-libfdt is missing: arm64 VMs cannot start (apt install python3-libfdt; "
            "on Debian 11, pip install pylibfdt)") in out, lane.tail(out, 80)
    assert ("tenbox-vm-runtime: error: an arm64 VM's device tree is written with dtc's libfdt, which this host "
            "lacks: install python3-libfdt (on Debian 11: pip install pylibfdt)") in out
    assert "NOFDT: exit 2" in out  # ExitCode.USAGE


def test_make_initramfs_arm64_boots_under_tenbox_and_its_arm64_e2fsprogs_make_ext4(arm64_lane):
    """scripts/x86_64/make-initramfs.sh --arch arm64 (on this amd64 host: Debian's arm64 busybox,
    e2fsprogs and their libraries, found by readelf) boots Debian's arm64 cloud kernel under
    tenbox-vm-runtime in the lane; its init runs tenbox.run=: the image's own mkfs.ext4 and e2fsck
    make and check an ext4 on a raw virtio disk, a file is written through the kernel's ext4; the
    host's e2fsck and debugfs read it back afterwards."""
    run = arm64_lane("3")
    made = run.make_initramfs
    assert made.returncode == 0, made.stderr
    assert "e2fsprogs: 10 files (mke2fs e2fsck and their libraries, arm64)" in made.stderr
    rc, out = run.section("initramfs")
    assert "TENBOX-INITRAMFS: up 6." in out and "TENBOX-INITRAMFS: rc=0" in out, lane.tail(out, 80)
    assert re.search(r"^aarch64\s*$", out, re.M), lane.tail(out, 80)
    assert rc == 0, lane.tail(out, 80)
    disk = run.out / "disk.raw"
    assert subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0
    assert _read_ext4(disk, "hello").strip() == run.initramfs_token
    label = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True).stdout
    assert re.search(r"^Filesystem volume name:\s+a64$", label, re.M)


# tenboxd on arm64, installed from the .deb: tests/packaging/test_arm64_install.py.
