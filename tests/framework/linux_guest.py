"""The stock Linux guest: Debian's cloud kernel and tenbox's busybox initramfs (tests and bench; any user).

Built by the project's scripts (scripts/x86_64/get-kernel.sh and
make-initramfs.sh, cached under .cache/linux) and booted by the Linux tests
(under QEMU TCG, under tenbox's KVM worker, in the nested lane) and by the
Linux-driver benchmarks. Here: the build, the initramfs's console contract
(MARKER, `tenbox.run=`, `TENBOX-INITRAMFS: rc=N`), a guest script appended
to the initramfs, and the guest's TSC frequency under TCG.

A guest script runs as `tenbox.run=sh /t.sh` from a second cpio archive
appended to the initramfs (the kernel unpacks concatenated archives); the
initramfs prints `TENBOX-INITRAMFS: rc=N` after it and powers off.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from tests.framework import qemu
from tests.framework.process import ConsoleProcess, ProcessFailure, run_tool
from tests.framework.repo import CACHE, PYTHON, REPO

SCRIPTS = REPO / "scripts" / "x86_64"
KERNEL_DIR = CACHE / "linux"
SCRIPT_TIMEOUT_SEC = 900  # the first get-kernel.sh run downloads ~27 MB
MKCPIO_TIMEOUT_SEC = 60

MARKER = "TENBOX-INITRAMFS: up "
RC_LINE = r"^TENBOX-INITRAMFS: rc=(\d+)$"
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"
# Generous: a TCG boot to poweroff takes ~2.5 s on the development machines.
BOOT_DEADLINE = float(os.environ.get("TENBOX_TEST_BOOT_DEADLINE", "60"))
GUEST_SCRIPT = "/t.sh"
RUN_SCRIPT = "tenbox.run=sh%20" + GUEST_SCRIPT
SCRIPT_MEMORY_MB = 256
# Under TCG a guest without RDRAND waits seconds for its entropy pool
# (mkfs.ext4's UUIDs block in getrandom); QEMU emulates RDRAND.
TCG_CPU = "qemu64,+rdrand"


class Artifacts:
    """What the scripts left in one folder: the kernel, the initramfs, the release and the modules' load order."""

    def __init__(self, kdir: Path) -> None:
        self.kdir = kdir
        self.vmlinuz = kdir / "vmlinuz"
        self.initramfs = kdir / "initramfs.cpio.gz"
        self.release = (kdir / "version").read_text().strip()
        self.modules = [ln.strip() for ln in (kdir / "modules" / "load-order").read_text().splitlines()
                        if ln.strip()]


_cache: Dict[str, object] = {}


def build() -> Artifacts:
    """Run get-kernel.sh and make-initramfs.sh once per process (both cached: a no-op when nothing changed).

    Inside the nested lane the build host has prepared them (lane_plugin's "linux"): the lane has
    no network and sees the host's apt state read-only, mid-change if the host runs apt meanwhile,
    so nothing is resolved again there; what the host left is used as it is.
    """
    from tests.framework import lane

    if "linux" not in _cache and lane.in_lane():
        try:
            _cache["linux"] = Artifacts(KERNEL_DIR)
        except OSError as e:
            raise ProcessFailure("the build host prepared no kernel for the lane in %s: %s" % (KERNEL_DIR, e)) from None
    if "linux" not in _cache:
        for script in ("get-kernel.sh", "make-initramfs.sh"):
            r = run_tool([SCRIPTS / script], SCRIPT_TIMEOUT_SEC, cwd=REPO)
            if r.returncode != 0:
                raise ProcessFailure("%s failed (exit %d):\n%s%s" % (script, r.returncode, r.stdout, r.stderr))
        _cache["linux"] = Artifacts(KERNEL_DIR)
    return _cache["linux"]  # type: ignore[return-value]


def foreign_kernel(arch: str = "arm64", flavour: str = "cloud", modules: str = "") -> Path:
    """Debian's cloud kernel for another architecture than the host's (get-kernel.sh --arch, cached
    in .cache/linux-ARCH): what an operator might hand the worker by mistake. `flavour` "generic":
    Debian's generic kernel with `modules` (and their dependencies), in .cache/linux-ARCH-generic;
    "cloud" with `modules`: the cloud kernel with those instead of the virtio set, in a folder of its own."""
    if flavour == "cloud" and not modules:
        key = "linux-" + arch
    elif flavour == "generic":
        key = "linux-%s-generic" % arch
    else:  # the cloud kernel with other modules than the default set: a folder of its own
        key = "linux-%s-%s-%s" % (arch, flavour, "-".join(modules.split()))
    if key not in _cache:
        argv = [SCRIPTS / "get-kernel.sh", "--arch", arch]
        if key != "linux-" + arch:
            argv += ["--flavour", flavour, "--out", CACHE / key, "--modules", modules]
        r = run_tool(argv, SCRIPT_TIMEOUT_SEC, cwd=REPO)
        if r.returncode != 0:
            raise ProcessFailure("get-kernel.sh --arch %s failed (exit %d):\n%s%s"
                                 % (arch, r.returncode, r.stdout, r.stderr))
        _cache[key] = CACHE / key / "vmlinuz"
    return _cache[key]  # type: ignore[return-value]


def foreign_busybox(arch: str = "arm64") -> Path:
    """Debian's busybox-static for `arch` (its /bin/busybox), from the package lists get-kernel.sh --arch
    keeps in .cache/apt-ARCH, cached in .cache/linux-ARCH/busybox."""
    foreign_kernel(arch)  # the package lists
    out = CACHE / ("linux-" + arch) / "busybox"
    if out.exists():
        return out
    aptdir = CACHE / ("apt-" + arch)
    opts = ["-o", "APT::Architecture=" + arch, "-o", "APT::Architectures=" + arch,
            "-o", "Dir::State::Lists=%s/lists" % aptdir, "-o", "Dir::State::status=%s/status" % aptdir,
            "-o", "Dir::Cache=%s/cache" % aptdir, "-o", "Debug::NoLocking=1"]
    with tempfile.TemporaryDirectory(prefix="tenbox-busybox-") as tmp:
        os.chmod(tmp, 0o755)  # apt-get download as root hands the transfer to the _apt user
        r = run_tool(["apt-get"] + opts + ["download", "-q", "busybox-static"], SCRIPT_TIMEOUT_SEC, cwd=tmp)
        debs = sorted(Path(tmp).glob("busybox-static_*.deb"))
        if r.returncode != 0 or not debs:
            raise ProcessFailure("apt-get download busybox-static (%s) failed:\n%s%s" % (arch, r.stdout, r.stderr))
        r = run_tool(["dpkg-deb", "-x", str(debs[0]), tmp + "/root"], SCRIPT_TIMEOUT_SEC)
        if r.returncode != 0:
            raise ProcessFailure("dpkg-deb -x %s failed:\n%s" % (debs[0].name, r.stderr))
        shutil.copy(tmp + "/root/bin/busybox", str(out) + ".new")
        os.replace(str(out) + ".new", str(out))
    return out


# An arm64 guest's init that waits for the power key (Debian's generic kernel with gpio_keys and evdev
# loaded: the PL061's gpio-keys; its cloud kernel with virtio_input and evdev: tenbox's virtio-input
# key): prints its input device's name, `ARM64-VM: ready`, then the first event's type, code and
# value, and powers off.
ARM64_BUTTON_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/load-order); do insmod /modules/$m; done
input=""
for i in /sys/class/input/input*; do
    case "$(cat $i/name)" in gpio-keys|"tenbox power button") input=$i ;; esac
done
echo "ARM64-VM: keys=$(cat $input/name)"
event=$(ls $input | grep ^event)
echo "ARM64-VM: ready"
echo "ARM64-VM: event=$(dd if=/dev/input/$event bs=24 count=1 2>/dev/null | od -An -tx1 -j16 -N6 | tr -d ' ')"
poweroff -f
"""


def arm64_initramfs(out: Path, init: str, files: Optional[Dict[str, str]] = None,
                    kernel: Optional[Path] = None) -> Path:
    """An arm64 initramfs at `out`: Debian's arm64 busybox, `init` (a busybox sh script) as /init,
    `kernel`'s modules (default: the arm64 cloud kernel's virtio modules) in /modules (their load
    order in /modules/load-order), and `files` (path in the guest → text; executable)."""
    kernel = kernel or foreign_kernel("arm64")
    with tempfile.TemporaryDirectory(prefix="tenbox-arm64-initramfs-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(str(foreign_busybox("arm64")), str(root / "bin" / "busybox"))
        for name, text in {"init": init, **(files or {})}.items():
            path = root / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            os.chmod(str(path), 0o755)
        for ko in (kernel.parent / "modules").iterdir():
            shutil.copy(str(ko), str(root / "modules" / ko.name))
        r = run_tool(["/usr/bin/python3", SCRIPTS / "mkcpio.py", "--root", root, "--dev", "/dev/console:c:5:1",
                      "-o", out], SCRIPT_TIMEOUT_SEC)
        if r.returncode != 0:
            raise ProcessFailure("mkcpio.py failed:\n%s" % r.stderr)
    return out


# --- what the guest prints ------------------------------------------------------------------

def command_output(text: str, command: str) -> List[str]:
    """The console lines between `run: <command>` and `rc=`, kernel messages left out."""
    m = re.search(r"^TENBOX-INITRAMFS: run: %s\n(.*?)^TENBOX-INITRAMFS: rc=" % re.escape(command),
                  text, re.S | re.M)
    assert m, "no output block for %r in:\n%s" % (command, text)
    return [ln for ln in m.group(1).splitlines() if not re.match(r"\[\s*\d+\.\d+\]", ln)]


def marks(text: str, tag: str) -> List[str]:
    """The values of a guest script's `TAG: value` lines, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^%s: ?(.*)$" % re.escape(tag), text, re.M)]


# --- a guest script -------------------------------------------------------------------------

def initrd_with(workdir: Path, linux: Artifacts, script: str,
                files: Optional[Dict[str, Union[str, bytes, Path]]] = None) -> Path:
    """linux's initramfs with GUEST_SCRIPT and `files` appended as a second cpio archive; a new file in workdir.

    files: guest path -> text, bytes, or a host file (copied, executable).
    """
    root = Path(tempfile.mkdtemp(prefix="initrd-extra.", dir=str(workdir)))
    extra = root.with_suffix(".cpio")
    out = root.with_suffix(".initrd")
    entries: Dict[str, Union[str, bytes, Path]] = dict(files or {})
    entries[GUEST_SCRIPT] = script
    try:
        for name, data in entries.items():
            path = root / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Path):
                path.write_bytes(data.read_bytes())
            else:
                path.write_bytes(data.encode() if isinstance(data, str) else data)
            path.chmod(0o755 if name == GUEST_SCRIPT or isinstance(data, Path) else 0o644)
        r = run_tool([PYTHON, SCRIPTS / "mkcpio.py", "--root", root, "-o", extra], MKCPIO_TIMEOUT_SEC)
        if r.returncode != 0:
            raise ProcessFailure("mkcpio.py failed: %s" % r.stderr)
        base = linux.initramfs.read_bytes()
        # Each archive must start 4-byte aligned in the initrd: pad the first one.
        out.write_bytes(base + b"\0" * (-len(base) % 512) + extra.read_bytes())
    finally:
        shutil.rmtree(str(root), ignore_errors=True)
        if extra.exists():
            extra.unlink()
    return out


def boot_script(linux: Artifacts, tsc: int, initrd: Path, devices: Sequence[str] = (),
                memory_mb: int = SCRIPT_MEMORY_MB, deadline: Optional[float] = BOOT_DEADLINE) -> ConsoleProcess:
    """QEMU microvm under TCG running initrd's GUEST_SCRIPT; its RAM is shared for vhost-user back ends."""
    append = "%s tsc_early_khz=%d %s" % (BASE_CMDLINE, tsc, RUN_SCRIPT)
    return ConsoleProcess(qemu.microvm(linux.vmlinuz, initrd, append, accel="tcg", cpu=TCG_CPU,
                                       memory_mb=memory_mb, shared_memory=True, devices=devices), deadline)


def finish_script(vm: ConsoleProcess) -> str:
    """Wait for the script's rc=0 and QEMU's exit 0 (else fail); the console."""
    __tracebackhide__ = True
    m = vm.wait_for(RC_LINE)
    if m.group(1) != "0":
        vm.fail("the guest script failed (rc=%s)" % m.group(1))
    rc = vm.wait_exit()
    if rc != 0:
        vm.fail("QEMU exited %d" % rc)
    return vm.output


def run_script(linux: Artifacts, tsc: int, initrd: Path, devices: Sequence[str] = (),
               deadline: float = BOOT_DEADLINE) -> str:
    """boot_script() to finish_script(); the console."""
    with boot_script(linux, tsc, initrd, devices, deadline=deadline) as vm:
        text = finish_script(vm)
        print("QEMU TCG guest: %.2f s" % vm.elapsed())
    return text


# --- the TSC under TCG ----------------------------------------------------------------------

TSC_CACHE = CACHE / "tsc-khz"  # "<host boot id> <kHz>\n"
TSC_ATTEMPTS = 3
_TSC_REFINED = r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz"
_TSC_DETECTED = r"tsc: Detected (\d+)\.(\d{3}) MHz processor"
_TSC_FAILED = "could not calculate TSC khz"


def tsc_khz_from_console(text: str) -> int:
    """The kernel's TSC frequency from a boot log: refined against the HPET if it did (a second
    into the boot; skipped when TCG makes the HPET reads too slow), else the PIT calibration;
    0 if calibration failed."""
    m = re.search(_TSC_REFINED, text)
    if m is None and _TSC_FAILED not in text:
        m = re.search(_TSC_DETECTED, text)
    return int(m.group(1)) * 1000 + int(m.group(2)) if m else 0


def _host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _cached_tsc_khz(boot_id: str) -> int:
    try:
        cached_boot, khz = TSC_CACHE.read_text().split()
        return int(khz) if cached_boot == boot_id and int(khz) > 0 else 0
    except (OSError, ValueError):
        return 0


def tsc_khz(linux: Artifacts) -> int:
    """The guest's TSC frequency under TCG, for the kernel's tsc_early_khz=.

    Under TCG the guest's TSC is the host's while the PIT follows host time,
    so the kernel's PIT-based TSC calibration fails now and then (one boot in
    five to ten on the development machines, more under load), and without a
    TSC the kernel hangs on microvm, which has no HPET and no PM timer. That
    is emulator timing, not the guest. So the guest boots with the frequency
    on its command line (tsc_early_khz= skips the calibration), measured as
    the kernel measures it on QEMU's pc machine, whose HPET lets the kernel
    refine it a second or two into the boot (when TCG makes the HPET reads
    too slow for that, the same boot's PIT figure; a failed boot is tried
    again, TSC_ATTEMPTS times). The host's TSC stays the same until the
    host reboots, so the figure is kept in TSC_CACHE with the host's boot id.
    """
    if "tsc" in _cache:
        return _cache["tsc"]  # type: ignore[return-value]
    boot_id = _host_boot_id()
    khz = _cached_tsc_khz(boot_id)
    if not khz:
        argv = qemu.pc(linux.vmlinuz, linux.initramfs, BASE_CMDLINE + " tenbox.run=sleep%205")
        for attempt in range(1, TSC_ATTEMPTS + 1):
            with ConsoleProcess(argv, BOOT_DEADLINE) as vm:
                vm.wait_for(RC_LINE)
                khz = tsc_khz_from_console(vm.output)
            if khz:
                break
            print("QEMU TCG (pc): the guest's TSC calibration failed (attempt %d)" % attempt)
        else:
            raise ProcessFailure("the guest's TSC calibration failed in %d QEMU TCG boots of the pc machine"
                                 % TSC_ATTEMPTS)
        TSC_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = TSC_CACHE.with_suffix(".tmp%d" % os.getpid())
        tmp.write_text("%s %d\n" % (boot_id, khz))
        os.replace(str(tmp), str(TSC_CACHE))
    _cache["tsc"] = khz
    return khz
