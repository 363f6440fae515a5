"""The Linux-driver variants of the benchmarks: Debian's kernel under QEMU TCG, tenbox over vhost-user (bench/).

Stock Linux does not boot under this host's /dev/kvm (docs: KVM-HERE), so
`bench/blk.py --linux` and `bench/net.py --linux` run the Debian cloud
kernel and the project's busybox initramfs (scripts/x86_64) under QEMU with
TCG, and compare, for the same guest workload, tenbox's device served by
`tenbox-vhost-user-*` with QEMU's own device. The guest gets its workload as
a shell script (and tools) in a cpio archive appended to the initramfs.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from common import PYTHON, QEMU, REPO, env

SCRIPTS = REPO / "scripts" / "x86_64"
KERNEL_DIR = REPO / ".cache" / "linux"
TSC_CACHE = REPO / ".cache" / "tsc-khz"  # shared with tests/vhost_user_harness.py: "<host boot id> <kHz>"
MEMORY_MB = 512
CPU = "qemu64,+rdrand"  # RDRAND: no multi-second wait for the guest's entropy pool
GUEST_SCRIPT = "/t.sh"
BACKEND_READY_SEC = 30.0


def artifacts() -> Dict[str, Path]:
    """The kernel and initramfs (built by the project's scripts on first use, cached)."""
    for script in ("get-kernel.sh", "make-initramfs.sh"):
        r = subprocess.run([str(SCRIPTS / script)], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode != 0:
            raise RuntimeError("%s failed:\n%s" % (script, r.stderr))
    return {"vmlinuz": KERNEL_DIR / "vmlinuz", "initramfs": KERNEL_DIR / "initramfs.cpio.gz"}


def tsc_khz(linux: Dict[str, Path]) -> int:
    """The guest's TSC frequency under TCG (the host's), measured once per host boot on QEMU's pc machine.

    microvm offers only the PIT to calibrate against, which fails on a busy
    host; the pc machine's HPET lets the kernel refine it. The figure goes
    to the kernel command line as tsc_early_khz.
    """
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        cached_boot, khz = TSC_CACHE.read_text().split()
        if cached_boot == boot_id:
            return int(khz)
    except (OSError, ValueError):
        pass
    argv = [QEMU, "-M", "pc", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-kernel", str(linux["vmlinuz"]),
            "-initrd", str(linux["initramfs"]), "-append", "console=ttyS0 panic=-1 tenbox.run=sleep%205"]
    for _ in range(3):
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=120).stdout.decode()
        m = re.search(r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz", out)
        if m is None and "could not calculate TSC khz" not in out:
            # No refinement when TCG makes the HPET reads too slow: the boot's PIT calibration.
            m = re.search(r"tsc: Detected (\d+)\.(\d{3}) MHz processor", out)
        if m:
            khz = int(m.group(1)) * 1000 + int(m.group(2))
            TSC_CACHE.parent.mkdir(parents=True, exist_ok=True)
            TSC_CACHE.write_text("%s %d\n" % (boot_id, khz))
            return khz
    raise RuntimeError("could not measure the guest's TSC frequency under QEMU TCG")


def initrd_with(workdir: Path, linux: Dict[str, Path], script: str,
                files: Optional[Dict[str, Union[bytes, Path]]] = None) -> Path:
    """The initramfs plus GUEST_SCRIPT and `files` (guest path -> bytes or a host file) as a second archive."""
    root = Path(tempfile.mkdtemp(prefix="initrd-extra.", dir=str(workdir)))
    extra = workdir / "initrd-extra.cpio"
    try:
        entries: Dict[str, Union[bytes, Path]] = dict(files or {})
        entries[GUEST_SCRIPT] = script.encode()
        for name, data in entries.items():
            path = root / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.read_bytes() if isinstance(data, Path) else data)
            path.chmod(0o755)
        subprocess.run([PYTHON, str(SCRIPTS / "mkcpio.py"), "--root", str(root), "-o", str(extra)], check=True)
        base = linux["initramfs"].read_bytes()
        out = workdir / "initrd-extra.initrd"
        out.write_bytes(base + b"\0" * (-len(base) % 512) + extra.read_bytes())  # archives start 4-byte aligned
    finally:
        shutil.rmtree(str(root), ignore_errors=True)
        if extra.exists():
            extra.unlink()
    return out


def build_static(name: str, workdir: str) -> Path:
    """bench/NAME.c as a static binary for the guest (the host's gcc and libc6-dev), rebuilt when the source changes."""
    src = REPO / "bench" / (name + ".c")
    out = Path(workdir) / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-pthread", "-o", str(out) + ".tmp", str(src)], check=True)
        os.replace(str(out) + ".tmp", str(out))
    return out


def qemu_argv(linux: Dict[str, Path], tsc: int, initrd: Path, devices: Sequence[str]) -> List[str]:
    """microvm under TCG with shared memfd RAM (vhost-user needs it; the reference gets the same)."""
    append = "console=ttyS0 reboot=k panic=-1 tsc_early_khz=%d tenbox.run=sh%%20%s" % (tsc, GUEST_SCRIPT)
    return [QEMU, "-M", "microvm,acpi=on,memory-backend=mem", "-accel", "tcg", "-cpu", CPU, "-m", str(MEMORY_MB),
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % MEMORY_MB,
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(linux["vmlinuz"]), "-initrd", str(initrd), "-append", append] + list(devices)


class Backend:
    """tenbox-vhost-user-KIND listening on `sock` (python3 -m tenbox_vmm.vhost_user)."""

    def __init__(self, kind: str, sock: Path, args: Sequence[str], log: Path) -> None:
        self.sock = sock
        self.log = log
        argv = [PYTHON, "-m", "tenbox_vmm.vhost_user", kind, "--socket", str(sock), "-v"] + list(args)
        with open(str(log), "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env(), cwd=str(REPO))
        deadline = time.monotonic() + BACKEND_READY_SEC
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the back end exited: %s" % log.read_text())
            try:
                if stat.S_ISSOCK(os.stat(str(sock)).st_mode) and b"waiting" in log.read_bytes():
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the back end did not listen: %s" % log.read_text())
            time.sleep(0.02)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError("the back end did not exit after the guest: %s" % self.log.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class Guest:
    """A QEMU process whose serial console (stdout) we read line by line."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env())
        self.buf = b""
        self.lines: List[str] = []

    def wait_line(self, pattern: str, timeout: float = 300.0) -> "re.Match":
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        seen = 0
        while True:
            for line in self.lines[seen:]:
                m = rx.search(line)
                if m:
                    return m
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise RuntimeError("no %r from the guest; last lines: %s" % (pattern, self.lines[-10:]))
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.kill()
                    raise RuntimeError("QEMU exited before %r: %s\nlast lines: %s"
                                       % (pattern, self.proc.stderr.read().decode(errors="replace"), self.lines[-10:]))
                self.buf += chunk.replace(b"\r", b"")
                *done, self.buf = self.buf.split(b"\n")
                self.lines += [ln.decode(errors="replace") for ln in done]

    def finish(self) -> None:
        """Wait for the script's end and QEMU's exit."""
        m = self.wait_line(r"^TENBOX-INITRAMFS: rc=(\d+)$")
        if m.group(1) != "0":
            self.kill()
            raise RuntimeError("the guest's workload failed: %s" % self.lines[-15:])
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
