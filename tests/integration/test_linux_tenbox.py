"""Debian's cloud kernel boots under tenbox's own KVM worker.

The runtime (`python3 -m tenbox_vmm --kernel ... --initrd ... --cmdline ...
--memory MB --cpus N --console stdio`) boots the kernel and busybox
initramfs from scripts/x86_64/get-kernel.sh and make-initramfs.sh with the
guest's serial console on its stdin/stdout, and exits 0 when the guest
powers off, 3 when stopped by SIGTERM.

A stock kernel runs natively only with hardware virtualization: these tests
run directly where /proc/cpuinfo shows vmx or svm, and in the nested lane
(tests/framework/lane.py: QEMU TCG with emulated AMD-V) elsewhere; without
vmx/svm a /dev/kvm such as kvm_pvm emulates kernel code instruction by
instruction and a stock kernel does not boot in useful time. The same
artifacts are checked under QEMU TCG by test_linux_qemu.py.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.framework.linux_guest import BASE_CMDLINE, BOOT_DEADLINE, MARKER, Artifacts, command_output
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv

EXIT_POWEROFF = 0
EXIT_STOPPED = 3

pytestmark = pytest.mark.hwvirt(prepare=("linux",), budget=180)


def start_tenbox(linux: Artifacts, cmdline: str, cpus: int = 1, memory_mb: int = 256,
                 deadline: float = BOOT_DEADLINE) -> ConsoleProcess:
    """tenbox's worker with the guest's console on its stdin/stdout."""
    return ConsoleProcess(boot_argv(linux.vmlinuz, linux.initramfs, cmdline, memory_mb=memory_mb, cpus=cpus),
                          deadline)


def marker_rx(linux: Artifacts) -> str:
    return r"^%s%s$" % (re.escape(MARKER), re.escape(linux.release))


# --- tests -----------------------------------------------------------------

# Up to 4: the lane's outer guest has 2 emulated CPUs. 8 vCPUs (4 per emulated CPU) hung about
# once in 12 to 30 boots for tenbox and for QEMU alike (docs/testing.md, "What the lane's
# failures were"): that is the lane, not a finding, so 8 runs in the soak (tests/framework/soak.py)
# where a hang is compared with QEMU's, not in every test run.
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_boots_to_the_marker_sees_all_vcpus_and_powers_off_with_exit_0(linux: Artifacts, cpus: int) -> None:
    """With --cpus N the guest boots to the marker, `nproc` prints N, and the
    guest's poweroff ends the worker with exit code 0, within the deadline."""
    cmdline = BASE_CMDLINE + " tenbox.run=nproc"
    with start_tenbox(linux, cmdline, cpus=cpus) as vm:
        vm.wait_for(marker_rx(linux))
        vm.wait_for(r"^TENBOX-INITRAMFS: rc=0$")
        rc = vm.wait_exit()
        text = vm.output
        stderr = vm.errors
    assert rc == EXIT_POWEROFF, "exit %d\nstderr:\n%s\nconsole:\n%s" % (rc, stderr, text)
    assert command_output(text, "nproc") == [str(cpus)], text
    assert "TENBOX-INITRAMFS: warning" not in text, text


def test_the_guest_is_offered_no_vmx_or_svm(linux: Artifacts) -> None:
    """The host's CPU has SVM or VMX, and KVM would pass it on (nested virtualization); tenbox hides
    both, so a guest reaches none of KVM's nested code. The flags line shows the rest as offered."""
    host_flags = _flags(open("/proc/cpuinfo").read().splitlines())
    assert host_flags & {"svm", "vmx"}, "this test needs a host with SVM or VMX: %s" % sorted(host_flags)
    command = "grep -m1 flags /proc/cpuinfo"
    with start_tenbox(linux, BASE_CMDLINE + " tenbox.run=" + command.replace(" ", "%20")) as vm:
        vm.wait_for(r"^TENBOX-INITRAMFS: rc=0$")
        rc = vm.wait_exit()
        text = vm.output
    assert rc == EXIT_POWEROFF, "exit %d\nconsole:\n%s" % (rc, text)
    flags = _flags(command_output(text, command))
    assert {"hypervisor", "lm", "sse2"} <= flags, text  # the guest's own flags line, read whole
    assert not flags & {"svm", "vmx"}, sorted(flags)


def _flags(lines) -> set:
    found = [ln.split(":", 1)[1].split() for ln in lines if re.match(r"flags\s*:", ln)]
    assert found, lines
    return set(found[0])


def test_reboot_boots_the_guest_again_in_the_same_process(linux: Artifacts) -> None:
    """tenbox.run=reboot: the guest restarts inside the same worker (the
    marker appears a second time); SIGTERM then stops it with exit code 3."""
    with start_tenbox(linux, BASE_CMDLINE + " tenbox.run=reboot") as vm:
        vm.wait_for(marker_rx(linux))
        vm.wait_for(r"reboot: Restarting system")
        vm.wait_for(marker_rx(linux), count=2)
        vm.signal(signal.SIGTERM)
        rc = vm.wait_exit()
        text = vm.output
        stderr = vm.errors
    assert rc == EXIT_STOPPED, "exit %d\nstderr:\n%s\nconsole:\n%s" % (rc, stderr, text)


def test_kernel_panic_with_panic_1_reboots_the_guest(linux: Artifacts) -> None:
    """tenbox.run=panic with panic=1: the kernel panics, reboots after a
    second, and boots to the marker again in the same worker; SIGTERM then
    stops it with exit code 3."""
    cmdline = "console=ttyS0 reboot=k panic=1 tenbox.run=panic"
    with start_tenbox(linux, cmdline) as vm:
        vm.wait_for(marker_rx(linux))
        vm.wait_for(r"Kernel panic - not syncing")
        vm.wait_for(marker_rx(linux), count=2)
        vm.signal(signal.SIGTERM)
        rc = vm.wait_exit()
        text = vm.output
        stderr = vm.errors
    assert rc == EXIT_STOPPED, "exit %d\nstderr:\n%s\nconsole:\n%s" % (rc, stderr, text)


# --- faults: every way a stock guest can go wrong ends in a documented exit --------------------

EXIT_TRIPLE_FAULT = 4
STOP_WITHIN_SEC = 10.0
FLOOD_LINES = 2000
FLOOD_SEC = 60.0  # beyond the boot's deadline, for the flood


def test_a_triple_faulting_kernel_ends_the_worker_with_exit_4(linux: Artifacts) -> None:
    """reboot=t makes Linux reboot by a triple fault (an empty IDT, then an exception): tenbox
    ends with exit code 4 and logs the fault, it does not hang or spin."""
    with start_tenbox(linux, "console=ttyS0 reboot=t panic=-1 tenbox.run=reboot") as vm:
        vm.wait_for(marker_rx(linux))
        rc = vm.wait_exit()
        stderr = vm.errors
    assert rc == EXIT_TRIPLE_FAULT, "exit %d\nstderr:\n%s" % (rc, stderr)
    assert "triple fault" in stderr, stderr


def test_a_kernel_hanging_in_early_boot_stays_stoppable(linux: Artifacts) -> None:
    """No initramfs and a root device that never appears: the kernel waits forever in early
    boot. SIGTERM still stops the worker with exit code 3, promptly."""
    argv = boot_argv(linux.vmlinuz, None, "console=ttyS0 panic=-1 root=/dev/vdz rootwait")
    with ConsoleProcess(argv, BOOT_DEADLINE) as vm:
        vm.wait_for(r"Waiting for root device /dev/vdz")
        vm.signal(signal.SIGTERM)
        rc = vm.wait_exit(STOP_WITHIN_SEC)
    assert rc == EXIT_STOPPED


def test_a_guest_flooding_its_console_stays_stoppable(linux: Artifacts) -> None:
    """`yes` on the console, forever: the worker keeps up, and SIGTERM stops it with exit code 3
    within seconds."""
    # Every byte is an exit of the emulated AMD-V: with the lane's run on one CPU, the boot and 2000
    # lines took 46-54 s here and 60-67 s in two CI runs (26-43 s before the pinning).
    with start_tenbox(linux, BASE_CMDLINE + " tenbox.run=yes%20tenbox-console-flood", cpus=2,
                      deadline=BOOT_DEADLINE + FLOOD_SEC) as vm:
        vm.wait_for(r"^tenbox-console-flood$", count=FLOOD_LINES)
        vm.signal(signal.SIGTERM)
        rc = vm.wait_exit(STOP_WITHIN_SEC)
    assert rc == EXIT_STOPPED
