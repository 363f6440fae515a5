"""A Linux guest restored from a snapshot learns it is a new VM generation and reseeds its RNG (nested lane).

tenbox's DSDT has a VM generation ID device (VGEN, _HID VMGENCTR) and an
ACPI Generic Event Device (GED0, ACPI0013) whose edge notifies it; every
restore writes a new ID and raises that edge (tenbox_vmm/machine.py,
_new_generation). Linux's vmgenid driver then reads the new ID and
reseeds the kernel's RNG, saying "crng reseeded due to virtual machine
fork" (drivers/virt/vmgenid.c, drivers/char/random.c).

Debian's cloud kernel, which the other Linux tests boot, is built without
CONFIG_VMGENID; its generic kernel has it (built in, as GED): this test
boots the generic kernel the lane itself runs on (tests/framework/lane.py,
KERNEL_DIR) with the test initramfs, whose modules are the cloud kernel's
and are not needed here. It needs hardware virtualization: directly on
hosts with vmx/svm, in the nested lane elsewhere.
"""

from __future__ import annotations

import signal

import pytest

from tests.framework import lane
from tests.framework.linux_guest import BASE_CMDLINE, BOOT_DEADLINE, RC_LINE, RUN_SCRIPT, Artifacts, initrd_with, marks
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv, runtime_argv

pytestmark = pytest.mark.hwvirt(prepare=("linux",), budget=300)

SNAPSHOT_SIGNAL = signal.SIGRTMIN + 1
FORK_LINE = "crng reseeded due to virtual machine fork"
WAIT_FORK_SEC = 120

# Waits for the kernel's line (the restored copy of this loop finds it), at most WAIT_FORK_SEC.
SCRIPT = """
ls /sys/bus/acpi/drivers/vmgenid/ | sed 's/^/VMGENID: /'
echo "READY: waiting"
i=0
while ! dmesg | grep -q "%(line)s"; do
    i=$((i + 1))
    if [ $i -gt %(wait)d ]; then echo "FORKED: no"; exit 1; fi
    sleep 1
done
echo "FORKED: yes"
""" % {"line": FORK_LINE, "wait": WAIT_FORK_SEC}


def test_a_restored_linux_is_told_its_new_generation_and_reseeds_its_rng(linux: Artifacts, tmp_path, snap_dir):
    kernel = lane.KERNEL_DIR / "vmlinuz"
    initrd = initrd_with(tmp_path, linux, SCRIPT)
    cmdline = BASE_CMDLINE + " " + RUN_SCRIPT
    snap = snap_dir / "linux.snap"
    with ConsoleProcess(boot_argv(kernel, initrd, cmdline, memory_mb=256) + ["--snapshot-out", str(snap)],
                        BOOT_DEADLINE * 3) as vm:
        vm.wait_for(r"^READY: waiting$")
        assert "VMGENCTR:00" in marks(vm.output, "VMGENID"), "Linux's vmgenid driver took VGEN:\n" + vm.output
        vm.signal(SNAPSHOT_SIGNAL)
        vm.wait_for_stderr(r"snapshot \S+ written", BOOT_DEADLINE)
        assert vm.stop(30) == 3
        assert FORK_LINE not in vm.output
    with ConsoleProcess(runtime_argv("--restore", str(snap), "--kernel", str(kernel), "--initrd", str(initrd),
                                     "--console", "stdio"), WAIT_FORK_SEC + BOOT_DEADLINE) as restored:
        restored.wait_for(r"^FORKED: (yes|no)$")
        m = restored.wait_for(RC_LINE)
        rc = restored.wait_exit()
        text = restored.output
    assert marks(text, "FORKED") == ["yes"], "the restored guest never reseeded:\n" + text
    assert (m.group(1), rc) == ("0", 0), text
