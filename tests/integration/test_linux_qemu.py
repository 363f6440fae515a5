"""Debian's cloud kernel plus tenbox's busybox initramfs boot under QEMU TCG.

These tests check the Linux guest artifacts themselves (made by
scripts/x86_64/get-kernel.sh and scripts/x86_64/make-initramfs.sh) on a
reference VMM: QEMU's microvm with software emulation, which runs anywhere.
The same pair is what tenbox's own KVM worker boots (test_linux_tenbox.py).

The contract of the initramfs, as seen on the serial console:
  * `TENBOX-INITRAMFS: up <kernel release>` once userspace is up, after
    the virtio modules are loaded;
  * `tenbox.run=<cmd>` (%20 for spaces) runs <cmd>, prints its output and
    `TENBOX-INITRAMFS: rc=<exit code>`, then powers the VM off;
  * `tenbox.run=reboot` reboots, `tenbox.run=panic` panics the kernel;
  * `tenbox.shell=1` gives an interactive shell on the console.

Needs qemu-system-x86_64 and apt access to Debian's mirror (first run only;
the artifacts are cached under <repo>/.cache/).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import pytest

from tests.framework import qemu
from tests.framework.linux_guest import BASE_CMDLINE, BOOT_DEADLINE, MARKER, SCRIPTS, Artifacts, command_output
from tests.framework.process import ConsoleProcess, run_tool
from tests.framework.repo import PYTHON, REPO

VIRTIO_MODULES = ("virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "virtio_net")


@pytest.fixture(autouse=True, scope="module")
def _qemu_installed():
    """QEMU is a test dependency (make deps installs it): missing, the tests fail, they do not skip."""
    if shutil.which(qemu.QEMU) is None:
        pytest.fail("%s is not installed (make deps)" % qemu.QEMU)


# microvm has no i8042: with reboot=k the kernel's last resort is a jump
# into the firmware (qboot), which now and then hangs instead of resetting.
# The machine's own way out is the FADT reset register: reboot=a.
REBOOT_CMDLINE = "console=ttyS0 reboot=a panic=-1"


def boot(linux: Artifacts, tsc_khz: int, cmdline: str, run: str, disk: Optional[Path] = None) -> ConsoleProcess:
    """QEMU microvm, TCG, console on stdin/stdout, cmdline + tsc_early_khz + run (e.g. "tenbox.run=true"),
    optionally one virtio-blk device (modern virtio-mmio) backed by the raw file disk."""
    append = "%s tsc_early_khz=%d %s" % (cmdline, tsc_khz, run)
    devices = qemu.virtio_blk(disk, "raw") if disk is not None else []
    return ConsoleProcess(qemu.microvm(linux.vmlinuz, linux.initramfs, append, accel="tcg", devices=devices),
                          BOOT_DEADLINE)


# --- tests -----------------------------------------------------------------

def test_scripts_produce_kernel_modules_and_initramfs(linux: Artifacts) -> None:
    """get-kernel.sh leaves vmlinuz (a bzImage), the release and the virtio
    modules with a dependency-first load order; make-initramfs.sh leaves a
    gzip'ed newc cpio with /init, busybox, the device nodes and the modules."""
    with open(linux.vmlinuz, "rb") as f:
        head = f.read(0x210)
    assert head[0x202:0x206] == b"HdrS", "vmlinuz is not a bzImage"
    assert re.fullmatch(r"\d+\.\d+\S*-cloud-amd64", linux.release), linux.release
    names = [m[:-3] for m in linux.modules]
    for mod in VIRTIO_MODULES:
        assert mod in names, "%s.ko missing from load-order %s" % (mod, names)
    for mod in linux.modules:
        assert (linux.kdir / "modules" / mod).read_bytes()[:4] == b"\x7fELF", mod
    # dependencies first
    assert names.index("virtio_ring") < names.index("virtio_blk")
    assert names.index("virtio") < names.index("virtio_mmio")
    if "net_failover" in names:
        assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")

    data = gzip.decompress(linux.initramfs.read_bytes())
    entries = {}
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", "bad newc header at %d" % off
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            break
        entries[name] = (mode, rmaj, rmin)
    assert entries["init"][0] & 0o170111 == 0o100111
    assert entries["dev/console"] == (0o020600, 5, 1)
    assert entries["dev/null"] == (0o020666, 1, 3)
    assert entries["bin/busybox"][0] & 0o170000 == 0o100000
    assert entries["bin/sh"][0] & 0o170000 == 0o120000
    for mod in linux.modules + ["load-order"]:
        assert "lib/modules/%s/%s" % (linux.release, mod) in entries
    names_in_order = list(entries)
    assert names_in_order == sorted(names_in_order), "entries are not sorted"


def test_scripts_are_cached_and_do_nothing_when_inputs_are_unchanged(linux: Artifacts) -> None:
    """A second run of either script with unchanged inputs says so and leaves
    the files byte-for-byte alone."""
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (linux.vmlinuz, linux.initramfs)}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    for script in ("get-kernel.sh", "make-initramfs.sh"):
        r = run_tool([str(SCRIPTS / script)], 120, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert "nothing to do" in r.stderr, r.stderr
    for p, digest in before.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest
        assert p.stat().st_mtime_ns == mtimes[p], "%s was rewritten" % p


def test_mkcpio_is_deterministic_and_needs_no_root(tmp_path: Path) -> None:
    """mkcpio.py packs the same tree to the same bytes whatever the files'
    times, and adds device nodes from arguments (no mknod)."""
    outs = []
    for i in range(2):
        root = tmp_path / ("tree%d" % i)
        (root / "sbin").mkdir(parents=True)
        (root / "init").write_text("#!/bin/sh\n")
        (root / "init").chmod(0o700 if i else 0o755)
        (root / "sbin" / "sh").symlink_to("/bin/busybox")
        os.utime(root / "init", (1000 + i, 1000 + i))
        out = tmp_path / ("out%d.cpio.gz" % i)
        r = run_tool([PYTHON, str(SCRIPTS / "mkcpio.py"), "--root", str(root),
                      "--dev", "/dev/console:c:5:1", "--gzip", "-o", str(out)], 60)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    raw = gzip.decompress(outs[0])
    assert raw.startswith(b"070701") and b"dev/console\0" in raw and b"TRAILER!!!\0" in raw
    assert len(raw) % 512 == 0


def test_boot_prints_marker_runs_the_command_and_powers_off(linux: Artifacts, tsc_khz: int,
                                                          tmp_path: Path) -> None:
    """The guest prints the boot marker with the kernel release, runs
    tenbox.run (%20 decoded: `cat /proc/cmdline` shows the command line),
    prints rc=0, powers off, and QEMU exits 0 — all within the deadline."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    with boot(linux, tsc_khz, BASE_CMDLINE, "tenbox.run=cat%20/proc/cmdline", disk) as vm:
        vm.wait_for(r"^%s%s$" % (re.escape(MARKER), re.escape(linux.release)))
        vm.wait_for(r"^TENBOX-INITRAMFS: rc=0$")
        vm.wait_for(r"reboot: Power down")
        rc = vm.wait_exit()
        text = vm.output
        print("QEMU TCG: boot to poweroff in %.2f s" % vm.elapsed())
    assert rc == 0, text
    append = vm.argv[vm.argv.index("-append") + 1]
    assert command_output(text, "cat /proc/cmdline") == [append]
    assert "TENBOX-INITRAMFS: warning" not in text, "init reported a problem"


def test_virtio_modules_load_and_the_virtio_mmio_disk_is_found(linux: Artifacts, tsc_khz: int,
                                                              tmp_path: Path) -> None:
    """The initramfs loads the virtio modules (and their dependencies) and
    virtio_mmio finds QEMU's virtio-blk device: /sys/block/vda/size is the
    disk file's size in 512-byte sectors."""
    sectors = 12345
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(sectors * 512)
    cmd = "cat /proc/modules /sys/block/vda/size"
    with boot(linux, tsc_khz, BASE_CMDLINE, "tenbox.run=" + cmd.replace(" ", "%20"), disk) as vm:
        vm.wait_for(r"^TENBOX-INITRAMFS: rc=\d+$")
        rc = vm.wait_exit()
        text = vm.output
    assert rc == 0, text
    assert "TENBOX-INITRAMFS: rc=0" in text, text
    assert "TENBOX-INITRAMFS: warning" not in text, text
    lines = command_output(text, cmd)
    loaded = {ln.split()[0] for ln in lines if " Live " in ln}
    for ko in linux.modules:
        assert ko[:-3].replace("-", "_") in loaded, "%s not loaded: %s" % (ko, lines)
    assert lines[-1] == str(sectors), lines


def test_command_exit_code_is_reported(linux: Artifacts, tsc_khz: int) -> None:
    """`TENBOX-INITRAMFS: rc=` carries the command's exit status, and the VM
    still powers off cleanly."""
    with boot(linux, tsc_khz, BASE_CMDLINE, "tenbox.run=sh%20-c%20'echo%20hello;exit%207'") as vm:
        vm.wait_for(r"^TENBOX-INITRAMFS: rc=7$")
        vm.wait_for(r"reboot: Power down")
        rc = vm.wait_exit()
        text = vm.output
    assert rc == 0
    assert command_output(text, "sh -c 'echo hello;exit 7'") == ["hello"]


def test_reboot_command_restarts_the_machine(linux: Artifacts, tsc_khz: int) -> None:
    """tenbox.run=reboot makes the kernel restart the machine (QEMU, told
    -no-reboot, then exits 0 instead of booting again)."""
    with boot(linux, tsc_khz, REBOOT_CMDLINE, "tenbox.run=reboot") as vm:
        vm.wait_for(r"^TENBOX-INITRAMFS: reboot$")
        vm.wait_for(r"reboot: Restarting system")
        rc = vm.wait_exit()
        text = vm.output
    assert rc == 0, text
    assert "Power down" not in text


def test_panic_command_panics_the_kernel(linux: Artifacts, tsc_khz: int) -> None:
    """tenbox.run=panic panics the kernel; with panic=-1 it restarts at once
    (QEMU, told -no-reboot, then exits 0)."""
    with boot(linux, tsc_khz, REBOOT_CMDLINE, "tenbox.run=panic") as vm:
        vm.wait_for(r"^TENBOX-INITRAMFS: panic$")
        vm.wait_for(r"Kernel panic - not syncing: sysrq triggered crash")
        rc = vm.wait_exit()
        text = vm.output
    assert rc == 0, text
    assert "Power down" not in text


def test_shell_mode_gives_an_interactive_shell_on_the_console(linux: Artifacts, tsc_khz: int) -> None:
    """tenbox.shell=1 starts sh on the console: typed commands run, and
    leaving the shell powers the VM off."""
    with boot(linux, tsc_khz, BASE_CMDLINE, "tenbox.shell=1 tenbox.run=false") as vm:
        vm.wait_for(r"^TENBOX-INITRAMFS: shell")
        vm.wait_for(r"^/ # ")  # the prompt (busybox then asks for the cursor position)
        vm.send("echo SHELL-$((6*7)) $(tty)\n")
        vm.wait_for(r"^SHELL-42 /dev/ttyS0$")
        vm.send("exit\n")
        vm.wait_for(r"reboot: Power down")
        rc = vm.wait_exit()
        text = vm.output
    assert rc == 0, text
    assert "TENBOX-INITRAMFS: run:" not in text, "tenbox.run must not run in shell mode"
