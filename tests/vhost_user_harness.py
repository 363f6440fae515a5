"""Helpers for the vhost-user tests: tenbox back ends driven by QEMU TCG and the Debian kernel (tests only).

QEMU is the vhost-user front end: microvm with software emulation (TCG),
guest RAM in a shared memfd so that the back end can map it, the Debian
cloud kernel and the project's busybox initramfs (scripts/x86_64). The guest
gets its test as a shell script in a small cpio archive appended to that
initramfs (the kernel unpacks concatenated archives), and runs it with
`tenbox.run=sh /t.sh`; the initramfs prints `TENBOX-INITRAMFS: rc=N` and
powers off.

The console and script helpers are those of tests/integration/test_linux_qemu.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import pytest

from tests.harness import REPO, repo_env
from tests.integration import test_linux_qemu as lq

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
QEMU = lq.QEMU
MEMORY_MB = 256
BACKEND_READY_SEC = 20.0  # python start-up, imports, opening the image
BACKEND_EXIT_SEC = 10.0
# Under TCG a guest without RDRAND waits seconds for its entropy pool
# (mkfs.ext4's UUIDs block in getrandom); QEMU emulates RDRAND.
CPU = "qemu64,+rdrand"
GUEST_SCRIPT = "/t.sh"
RUN_SCRIPT = "tenbox.run=sh%20" + GUEST_SCRIPT

_cache: Dict[str, object] = {}


# --- guest artifacts ------------------------------------------------------------------------

def artifacts() -> lq.Artifacts:
    """Debian's kernel and the busybox initramfs, built (or found cached) once per test process."""
    if "linux" not in _cache:
        for script in ("get-kernel.sh", "make-initramfs.sh"):
            r = lq.run_tool([str(lq.SCRIPTS / script)], lq.SCRIPT_TIMEOUT, cwd=REPO)
            if r.returncode != 0:
                pytest.fail("%s failed (exit %d):\n%s%s" % (script, r.returncode, r.stdout, r.stderr))
        _cache["linux"] = lq.Artifacts(lq.KERNEL_DIR)
    return _cache["linux"]  # type: ignore[return-value]


TSC_CACHE = REPO / ".cache" / "tsc-khz"
CALIBRATION_ATTEMPTS = 3
TSC_REFINED = r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz"
TSC_DETECTED = r"tsc: Detected (\d+)\.(\d{3}) MHz processor"
TSC_FAILED = "could not calculate TSC khz"


def tsc_khz_from_console(text: str) -> int:
    """The kernel's TSC frequency from a boot log: refined against the HPET if it did (a second
    into the boot; skipped when TCG makes the HPET reads too slow), else the PIT calibration;
    0 if calibration failed."""
    m = re.search(TSC_REFINED, text)
    if m is None and TSC_FAILED not in text:
        m = re.search(TSC_DETECTED, text)
    return int(m.group(1)) * 1000 + int(m.group(2)) if m else 0


def tsc_khz(linux: lq.Artifacts) -> int:
    """The guest's TSC frequency under TCG, for tsc_early_khz= (see test_linux_qemu.py).

    microvm has only the PIT to measure the TSC against, and on a loaded
    host that fails boot after boot. QEMU's `pc` machine has an HPET, which
    the kernel uses to refine its TSC frequency a second or two into the
    boot: one such boot measures it (when TCG makes the HPET reads too slow
    for the refinement, the same boot's PIT figure). Under TCG the guest's TSC is the host's,
    which stays the same until the host reboots, so the figure is kept in
    .cache/tsc-khz with the host's boot id.
    """
    if "tsc" in _cache:
        return _cache["tsc"]  # type: ignore[return-value]
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        cached_boot, khz_text = TSC_CACHE.read_text().split()
        if cached_boot == boot_id and int(khz_text) > 0:
            _cache["tsc"] = int(khz_text)
            return int(khz_text)
    except (OSError, ValueError):
        pass
    argv = [QEMU, "-M", "pc", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-kernel", str(linux.vmlinuz),
            "-initrd", str(linux.initramfs), "-append", lq.BASE_CMDLINE + " tenbox.run=sleep%205"]
    khz = 0
    for attempt in range(1, CALIBRATION_ATTEMPTS + 1):
        with lq.Console(argv, lq.BOOT_DEADLINE) as vm:
            vm.wait_for(r"^TENBOX-INITRAMFS: rc=")
            khz = tsc_khz_from_console(vm.text)
        if khz:
            break
        print("QEMU TCG (pc): the guest's TSC calibration failed (attempt %d)" % attempt)
    else:
        pytest.fail("the guest's TSC calibration failed in %d QEMU TCG boots of the pc machine" % CALIBRATION_ATTEMPTS)
    _cache["tsc"] = khz
    TSC_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = TSC_CACHE.with_suffix(".tmp%d" % os.getpid())
    tmp.write_text("%s %d\n" % (boot_id, khz))
    os.replace(str(tmp), str(TSC_CACHE))
    return khz


def initrd_with_script(workdir: Path, linux: lq.Artifacts, script: str,
                       files: Optional[Dict[str, Union[str, bytes]]] = None) -> Path:
    """The project's initramfs with GUEST_SCRIPT (and `files`) appended as a second cpio archive."""
    root = Path(tempfile.mkdtemp(prefix="initrd-extra.", dir=str(workdir)))
    entries = dict(files or {})
    entries[GUEST_SCRIPT] = script
    for name, data in entries.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(0o755 if name == GUEST_SCRIPT else 0o644)
    extra = root.with_suffix(".cpio")
    r = lq.run_tool([PYTHON, str(lq.SCRIPTS / "mkcpio.py"), "--root", str(root), "-o", str(extra)], 60)
    if r.returncode != 0:
        pytest.fail("mkcpio.py failed: %s" % r.stderr)
    base = linux.initramfs.read_bytes()
    out = root.with_suffix(".initrd")
    # Each archive must start 4-byte aligned in the initrd: pad the first one.
    out.write_bytes(base + b"\0" * (-len(base) % 512) + extra.read_bytes())
    return out


# --- the back end ---------------------------------------------------------------------------

class Backend:
    """A tenbox vhost-user back end process (`python3 -m tenbox_vmm.vhost_user KIND ...`).

    `wrap` is put in front of the command (e.g. unshare); it must exec the
    back end so that the pid is the back end's. stderr goes to a file.
    """

    def __init__(self, workdir: Path, kind: str, sock: Path, args: Sequence[str],
                 wrap: Sequence[str] = (), wait: bool = True) -> None:
        self.sock = sock
        self.argv = list(wrap) + [PYTHON, "-m", "tenbox_vmm.vhost_user", kind, "--socket", str(sock), "-v"] + list(args)
        fd, name = tempfile.mkstemp(prefix="backend-%s." % kind, suffix=".log", dir=str(workdir))
        os.close(fd)
        self.log_path = Path(name)
        with open(name, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, env=repo_env(), cwd=str(REPO), start_new_session=True)
        if wait:
            self.wait_listening()

    @property
    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> None:
        deadline = time.monotonic() + BACKEND_READY_SEC
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail("the back end exited (%d) before listening on %s:\n%s"
                            % (self.proc.returncode, self.sock, self.stderr))
            try:
                if stat.S_ISSOCK(os.stat(str(self.sock)).st_mode) and "waiting for a front end" in self.stderr:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        self.kill()
        pytest.fail("the back end did not listen on %s within %.0f s:\n%s" % (self.sock, BACKEND_READY_SEC, self.stderr))

    def wait_exit(self, timeout: float = BACKEND_EXIT_SEC) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the back end did not exit within %.0f s:\n%s" % (timeout, self.stderr))
        return -1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- QEMU -----------------------------------------------------------------------------------

def qemu_argv(linux: lq.Artifacts, initrd: Path, append: str, devices: Sequence[str]) -> List[str]:
    """QEMU microvm, TCG, shared memfd RAM, console on stdio, -no-reboot; `devices` are extra arguments."""
    return [QEMU, "-M", "microvm,acpi=on,memory-backend=mem", "-accel", "tcg", "-cpu", CPU, "-m", str(MEMORY_MB),
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % MEMORY_MB,
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(linux.vmlinuz), "-initrd", str(initrd), "-append", append] + list(devices)


def blk_device(sock: Path, index: int = 0, reconnect: bool = False) -> List[str]:
    chardev = "socket,id=vub%d,path=%s" % (index, sock) + (",reconnect=1" if reconnect else "")
    return ["-chardev", chardev, "-device", "vhost-user-blk,chardev=vub%d,num-queues=1" % index]


def net_device(sock: Path, mac: str = "52:54:00:12:34:56") -> List[str]:
    return ["-chardev", "socket,id=vun0,path=%s" % sock, "-netdev", "vhost-user,id=n0,chardev=vun0",
            "-device", "virtio-net-device,netdev=n0,mac=%s" % mac]


def boot(linux: lq.Artifacts, tsc: int, initrd: Path, devices: Sequence[str],
         deadline: float = lq.BOOT_DEADLINE) -> lq.Console:
    append = "%s tsc_early_khz=%d %s" % (lq.BASE_CMDLINE, tsc, RUN_SCRIPT)
    return lq.Console(qemu_argv(linux, initrd, append, devices), deadline)


def run_guest(linux: lq.Artifacts, tsc: int, initrd: Path, devices: Sequence[str],
              deadline: float = lq.BOOT_DEADLINE) -> str:
    """Boot, wait for the script's rc=0 and QEMU's clean exit; the console text."""
    with boot(linux, tsc, initrd, devices, deadline) as vm:
        m = vm.wait_for(r"^TENBOX-INITRAMFS: rc=(\d+)$")
        if m.group(1) != "0":
            vm.fail("the guest script failed (rc=%s)" % m.group(1))
        rc = vm.wait_exit()
        text = vm.text
        if rc != 0:
            vm.fail("QEMU exited %d" % rc)
        print("QEMU TCG guest: %.2f s" % vm.elapsed())
    return text


def marks(text: str, tag: str) -> List[str]:
    """The values of the guest's `TAG: value` lines, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^%s: ?(.*)$" % re.escape(tag), text, re.M)]


def one_line_error(stderr: str) -> str:
    """The back end's only stderr line, which must name the problem (no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, "expected one line of error, got:\n" + stderr
    assert "Traceback" not in stderr
    return lines[0]


def free_tcp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sha256_file(path: Union[str, Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qemu_img(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return lq.run_tool(["qemu-img"] + list(args), timeout)


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    r = lq.run_tool(argv + [str(image)], 120)
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
