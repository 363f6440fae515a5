"""The arm64 lane (issue 17): an emulated arm64 KVM host, and tenbox's arm64 KVM layer running guest code in it.

tests/framework/lane_arm64.py boots `qemu-system-aarch64 -M
virt,virtualization=on` (TCG: EL2 emulated) with Debian's generic arm64
kernel and a Debian arm64 userland unpacked from its packages. Inside,
tests/framework/arm64_probe.py makes a VM with tenbox_vmm's KVM wrappers
and tenbox_vmm/arch/aarch64/cpu.py: vCPUs with PSCI 0.2, the vGIC placed
where tenbox's device tree says, boot registers as for a kernel; six guest
instructions write a byte to the UART's address and call PSCI SYSTEM_OFF.
Under the lane's GICv3 and under its GICv2 (the Raspberry Pi 4's kind).
"""

import re

import pytest

from tests.framework import lane

LANE_DEADLINE_SEC = 600  # a boot and the probe: about 25 s on the development machines
LANE_MEMORY_MB = 2048


def _probe(tmp_path, lane_gic: str, gic: str, cpus: int):
    out = tmp_path / "lane"
    out.mkdir()
    res = lane.run("python3 -m tests.framework.arm64_probe --gic %s --cpus %d" % (gic, cpus), out,
                   LANE_DEADLINE_SEC, console_log=out / "console.log", arch="aarch64", gic=lane_gic,
                   memory_mb=LANE_MEMORY_MB)
    assert res.rc is not None, "the arm64 lane failed: %s\n%s" % (res.reason, lane.tail(res.console))
    return res.rc, dict(re.findall(r"^PROBE: (\w+)[= ](.*)$", res.console, re.M)), res.console


@pytest.mark.parametrize("gic, cpus", [("3", 2), ("2", 2), ("3", 1)])
def test_tenboxs_arm64_kvm_layer_runs_guest_code_to_a_psci_power_off(tmp_path, gic, cpus):
    rc, said, console = _probe(tmp_path, gic, "v" + gic, cpus)
    assert "LANE: kvm ok" in console, lane.tail(console)
    assert rc == 0, lane.tail(console)
    assert said["target"].endswith("gics=v%s" % gic)  # what the emulated host's KVM offers
    assert said["pc"] == "0x40200000 pstate=0x3c5 x0=0x40000000"  # EL1h, DAIF masked, x0 the tree
    assert said["mmio"] == "addr=0x9000000 len=1 write=1 data=41"  # 'A' to the UART's address
    assert said["system_event"] == "type=1"  # KVM_SYSTEM_EVENT_SHUTDOWN: PSCI SYSTEM_OFF


def test_a_gic_the_host_lacks_is_refused_with_one_line_naming_what_it_has(tmp_path):
    rc, said, console = _probe(tmp_path, "2", "v3", 1)
    assert rc == 3, lane.tail(console)
    assert said["error"] == ("this host's KVM cannot make a GICv3 (KVM_CREATE_DEVICE: No such device); "
                             "it has: GICv2")


BOOT_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys
echo "ARM64-GUEST: up"
echo "ARM64-GUEST: nproc=$(nproc)"
echo "ARM64-GUEST: gic=$(cat /proc/device-tree/intc@8000000/compatible)"
echo "ARM64-GUEST: console=$(cat /proc/consoles | cut -d' ' -f1)"
poweroff -f
"""


@pytest.mark.parametrize("gic, cpus", [("3", 1), ("3", 2), ("2", 2)])
def test_debians_arm64_kernel_boots_on_tenboxs_board_and_powers_off(tmp_path, gic, cpus):
    """Debian's arm64 cloud kernel under tenbox's own KVM code (board.py): its console on tenbox's 16550
    over MMIO, every vCPU up through KVM's PSCI, the vGIC of the host's kind, a PSCI power-off."""
    from tests.framework import linux_guest

    out = tmp_path / "lane"
    out.mkdir()
    linux_guest.arm64_initramfs(out / "initrd.cpio", BOOT_INIT)
    kernel = linux_guest.foreign_kernel("arm64")
    command = ("python3 -m tests.framework.arm64_probe --boot --gic auto --cpus %d --kernel %s "
               "--initrd /lane-out/initrd.cpio --deadline 400" % (cpus, kernel))
    res = lane.run(command, out, LANE_DEADLINE_SEC, console_log=out / "console.log", arch="aarch64", gic=gic,
                   memory_mb=LANE_MEMORY_MB)
    assert res.rc is not None, "the arm64 lane failed: %s\n%s" % (res.reason, lane.tail(res.console))
    console = res.console
    said = dict(re.findall(r"^ARM64-GUEST: (\w+)=(.*)$", console, re.M))
    assert "PROBE: ended poweroff" in console and res.rc == 0, lane.tail(console, 120)
    assert "PROBE: gic v%s" % gic in console
    assert said["nproc"] == str(cpus)
    assert said["gic"].rstrip("\0") == ("arm,gic-v3" if gic == "3" else "arm,cortex-a15-gic")
    assert said["console"] == "ttyS0"
