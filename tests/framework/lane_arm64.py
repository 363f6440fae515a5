"""The arm64 nested lane: an emulated arm64 KVM host (EL2 under QEMU TCG) with a Debian arm64 userland (tests; root).

Issue 17's test lane. Like the x86 lane (lane.py, whose run() boots this
one with arch="aarch64"), it is a QEMU TCG machine whose kernel has KVM,
running one command under scripts/x86_64/lane-init; unlike it, its root
file system cannot be the build host's, which is amd64. So:

- `qemu-system-aarch64 -M virt,virtualization=on -cpu max`, GICv3 or v2:
  Debian's generic arm64 kernel (KVM built in) from get-kernel.sh --arch
  arm64 --flavour generic, with the 9p, virtio-pci and overlay modules;
- its initramfs: Debian's arm64 busybox-static, those modules and lane-init
  (a busybox script: the same for both architectures);
- the share "host": Debian 12 arm64 as a host has it: debootstrap
  --variant=minbase, then apt installs python3, tenbox's dependencies and
  the tools the tests use (PACKAGES). The build host runs the arm64
  programs through qemu-user with binfmt_misc (binfmt.py): every
  maintainer script runs, dpkg's database is real, so tenbox's .deb can be
  installed in the lane (tests/packaging/test_arm64_install.py). A cold
  build takes about 5 minutes here;
- the share "repo": this checkout, mounted at its own path (lane.repo=).

All of it is cached in .cache/lane-arm64 and rebuilt when the package set
(as apt's arm64 lists in .cache/apt-arm64 resolve it) or the recipe changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.framework import arm64_prepare, binfmt, linux_guest
from tests.framework.repo import CACHE, REPO

QEMU_AARCH64 = "qemu-system-aarch64"
LANE_DIR = CACHE / "lane-arm64"
KERNEL_DIR = LANE_DIR / "kernel"
INITRAMFS = LANE_DIR / "initramfs.cpio.gz"
ROOT = LANE_DIR / "root"
MODULES = "virtio_pci 9p 9pnet_virtio overlay"
APT_TIMEOUT_SEC = 900
# What the userland holds: python3, tenbox's dependencies and the tools its tests use. The .deb's
# Depends are all here (the lane has no network: test_arm64_install installs it from a local repository).
PACKAGES = ("busybox-static python3 python3-cffi python3-zmq python3-msgpack python3-psutil python3-click "
            "python3-tenacity python3-sdnotify python3-websockets python3-zstandard python3-seccomp "
            "python3-pytest python3-libfdt libslirp0 qemu-utils e2fsprogs "
            "adduser ca-certificates python3-apt python3-cffi-backend "
            # The reference VMM of bench/linux_boot.py --arch aarch64 (QEMU virt with KVM).
            "qemu-system-arm").split()
GICS = ("3", "2")


class LaneArm64Error(Exception):
    """The arm64 lane could not be built; the message is one line for people."""


def _apt_opts() -> List[str]:
    aptdir = CACHE / "apt-arm64"
    return ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", "Dir::State::Lists=%s/lists" % aptdir, "-o", "Dir::State::status=%s/status" % aptdir,
            "-o", "Dir::Cache=%s/cache" % aptdir, "-o", "Debug::NoLocking=1"]


def _run(argv: Sequence[str], what: str, cwd: Path = REPO, timeout: float = APT_TIMEOUT_SEC,
         env: Optional[Dict[str, str]] = None) -> str:
    try:
        r = subprocess.run(list(argv), cwd=str(cwd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise LaneArm64Error("%s did not finish within %d s" % (what, timeout)) from None
    if r.returncode != 0:
        last = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()][-1:] or ["exit %d" % r.returncode]
        raise LaneArm64Error("%s failed: %s" % (what, last[0]))
    return r.stdout


# How _build_userland makes the root; a change here rebuilds the cached root.
ROOT_LAYOUT = "layout 3: debootstrap minbase + apt, sources emptied, the tenbox-vm user"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BUILD_TIMEOUT_SEC = 1800
# The chroot's steps, in a private mount namespace (its mounts go with it). $1 is the root.
APT_IN_ROOT = r"""
set -eu
root=$1; shift
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind "$DEBS" "$root/var/cache/apt/archives"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod 755 "$root/usr/sbin/policy-rc.d"
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
chroot "$root" apt-get update -q
chroot "$root" apt-get dist-upgrade -y -q
chroot "$root" apt-get install -y -q --no-install-recommends "$@"
# The worker's user, as install-deps.sh makes it on a development host (the package's postinst keeps it).
chroot "$root" useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tenbox-vm
# The lane has no network: apt there sees only what a test adds (install-linux.sh's repository).
echo "# the arm64 lane has no network; tests add their own sources" > "$root/etc/apt/sources.list"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"
"""


def build() -> None:
    """The lane's kernel, initramfs and userland (each cached)."""
    arm64_prepare.wait()
    if shutil.which(QEMU_AARCH64) is None:
        raise LaneArm64Error("%s not found: the arm64 lane needs Debian's qemu-system-arm (make deps)" % QEMU_AARCH64)
    get_kernel = str(linux_guest.SCRIPTS / "get-kernel.sh")
    _run([get_kernel, "--arch", "arm64", "--flavour", "generic", "--out", str(KERNEL_DIR), "--modules", MODULES],
         "get-kernel.sh --arch arm64")
    _build_userland()
    _build_initramfs()


def _build_userland() -> None:
    """ROOT: Debian bookworm arm64 as debootstrap and apt make it, with PACKAGES; rebuilt when they change.

    The build host runs the arm64 programs (debootstrap's second stage, the
    packages' maintainer scripts) through qemu-user (tests/framework/binfmt.py):
    a dpkg-managed root, so the lane can install tenbox's .deb as a host would.
    """
    debs_dir = LANE_DIR / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(str(debs_dir), 0o755)
    (debs_dir / "partial").mkdir(exist_ok=True)
    # The package set, resolved against an empty status with apt's arm64 lists: it changes when Debian's does.
    plan = _run(["apt-get"] + _apt_opts() + ["install", "-s", "-q", "--no-install-recommends"] + PACKAGES,
                "apt-get install -s (arm64)")
    wanted = sorted(line.split()[1] + "=" + line.split()[2].strip("(") for line in plan.splitlines()
                    if line.startswith("Inst "))
    stamp = hashlib.sha256("\n".join([ROOT_LAYOUT, APT_IN_ROOT] + wanted).encode()).hexdigest()
    if (ROOT / ".stamp").exists() and (ROOT / ".stamp").read_text() == stamp:
        return
    try:
        binfmt.ensure("arm64")
    except binfmt.BinfmtError as e:
        raise LaneArm64Error(str(e)) from None
    for stale in LANE_DIR.glob("root.*"):
        shutil.rmtree(str(stale), ignore_errors=True)
    new = Path(tempfile.mkdtemp(prefix="root.", dir=str(LANE_DIR)))
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--cache-dir=%s" % debs_dir, SUITE, str(new), MIRROR],
         "debootstrap --arch=arm64 %s" % SUITE, timeout=BUILD_TIMEOUT_SEC)
    env = dict(os.environ, DEBS=str(debs_dir), MIRROR=MIRROR, SECURITY_MIRROR=SECURITY_MIRROR, SUITE=SUITE)
    _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", APT_IN_ROOT, "apt-in-root", str(new)]
         + PACKAGES, "apt-get install in the arm64 root", timeout=BUILD_TIMEOUT_SEC, env=env)
    os.chmod(str(new), 0o755)
    (new / ".stamp").write_text(stamp)
    if ROOT.exists():
        old = LANE_DIR / "root.old"
        shutil.rmtree(str(old), ignore_errors=True)
        os.rename(str(ROOT), str(old))
        shutil.rmtree(str(old), ignore_errors=True)
    os.rename(str(new), str(ROOT))


def _build_initramfs() -> None:
    """INITRAMFS: arm64 busybox, the kernel's modules under /lib/modules/<release>, lane-init as /init."""
    release = (KERNEL_DIR / "version").read_text().strip()
    busybox = linux_guest.foreign_busybox("arm64")
    lane_init = linux_guest.SCRIPTS / "lane-init"
    inputs = hashlib.sha256()
    for path in [busybox, lane_init, KERNEL_DIR / "version"] + sorted((KERNEL_DIR / "modules").iterdir()):
        inputs.update(path.name.encode() + b"\0" + path.read_bytes())
    stamp = Path(str(INITRAMFS) + ".inputs")
    if INITRAMFS.exists() and stamp.exists() and stamp.read_text() == inputs.hexdigest():
        return
    with tempfile.TemporaryDirectory(prefix="initramfs.", dir=str(LANE_DIR)) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "lib/modules/" + release):
            (root / d).mkdir(parents=True)
        shutil.copy(str(busybox), str(root / "bin" / "busybox"))
        os.symlink("busybox", str(root / "bin" / "sh"))  # lane-init links the other applets
        shutil.copy(str(lane_init), str(root / "init"))
        os.chmod(str(root / "init"), 0o755)
        for ko in (KERNEL_DIR / "modules").iterdir():
            shutil.copy(str(ko), str(root / "lib" / "modules" / release / ko.name))
        out = Path(tmp) / "initramfs.cpio.gz"
        _run(["/usr/bin/python3", str(linux_guest.SCRIPTS / "mkcpio.py"), "--root", str(root), "--gzip",
              "--dev", "/dev/console:c:5:1", "--dev", "/dev/null:c:1:3", "-o", str(out)], "mkcpio.py")
        os.replace(str(out), str(INITRAMFS))
    stamp.write_text(inputs.hexdigest())


def qemu_argv(append: str, out_dir: Path, cpus: int, memory_mb: int, gic: str = "3") -> List[str]:
    """QEMU's command line for an arm64 lane with kernel command line `append` (lane.run= and the rest)."""
    if gic not in GICS:
        raise LaneArm64Error("the arm64 lane's GIC is version 3 or 2, not %r" % gic)
    shares = []
    for tag, path, ro in (("host", ROOT, True), ("repo", REPO, True), ("out", out_dir, False)):
        shares += ["-virtfs", "local,path=%s,mount_tag=%s,security_model=passthrough%s"
                   % (path, tag, ",readonly=on,multidevs=remap" if ro else "")]
    return [QEMU_AARCH64, "-M", "virt,virtualization=on,gic-version=%s" % gic, "-accel", "tcg", "-cpu", "max",
            "-smp", str(cpus), "-m", str(memory_mb), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(KERNEL_DIR / "vmlinuz"), "-initrd", str(INITRAMFS),
            "-append", "console=ttyAMA0 " + append] + shares
