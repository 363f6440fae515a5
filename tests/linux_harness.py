"""The Linux guest under test: Debian's cloud kernel and tenbox's busybox initramfs.

Shared by the tests that boot it (under QEMU TCG in test_linux_qemu.py and
the vhost-user tests, under tenbox's KVM worker in test_linux_tenbox.py,
the image template in test_images.py) and by nothing at run time:
building the artifacts with the project's scripts (cached under
<repo>/.cache/linux), and a serial console to wait on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "x86_64"
KERNEL_DIR = REPO / ".cache" / "linux"

MARKER = "TENBOX-INITRAMFS: up "
# Generous: a TCG boot to poweroff takes ~2.5 s on the development machines.
BOOT_DEADLINE = float(os.environ.get("TENBOX_TEST_BOOT_DEADLINE", "60"))
SCRIPT_TIMEOUT = 900  # the first get-kernel.sh run downloads ~27 MB
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"


def run_tool(argv: Sequence[str], timeout: float, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run argv to completion; past the timeout kill its whole process group and fail."""
    proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc)
        out, err = proc.communicate()
        pytest.fail("%s did not finish within %.0f s\nstdout:\n%s\nstderr:\n%s"
                    % (" ".join(argv), timeout, out.decode(errors="replace"), err.decode(errors="replace")))
    finally:
        if proc.poll() is None:  # interrupted: leave nothing behind
            _killpg(proc)
            proc.wait()
    return subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Console:
    """A VM process whose serial console is its stdin/stdout.

    A thread collects stdout (stderr goes to a file). wait_for() waits for a
    pattern until the run's deadline; any failure kills the process (its
    whole process group) and reports the console output and stderr.
    """

    def __init__(self, argv: Sequence[str], deadline: float, cwd: Optional[Path] = None) -> None:
        self.argv = list(argv)
        self.started = time.monotonic()
        self.deadline = self.started + deadline
        self._buf = bytearray()
        self._eof = False
        self._cond = threading.Condition()
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, start_new_session=True)
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """The console output so far, CR removed."""
        with self._cond:
            return self._buf.decode(errors="replace").replace("\r", "")

    @property
    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> None:
        if self.proc.poll() is None:
            _killpg(self.proc)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._thread.join(timeout=5)

    def fail(self, why: str) -> None:
        self.kill()
        out = self.text
        if len(out) > 12000:
            out = "[... %d characters ...]\n%s" % (len(out) - 12000, out[-12000:])
        pytest.fail("%s (after %.1f s)\ncommand: %s\nexit code: %s\n--- stderr ---\n%s\n--- console ---\n%s"
                    % (why, self.elapsed(), " ".join(self.argv), self.proc.returncode, self.stderr[-4000:], out),
                    pytrace=False)

    def wait_for(self, pattern: str, count: int = 1) -> "re.Match[str]":
        """Wait until regex pattern (multi-line mode) has matched count times; returns that match."""
        rx = re.compile(pattern, re.M)
        while True:
            with self._cond:
                text = self._buf.decode(errors="replace").replace("\r", "")
                matches = list(rx.finditer(text))
                if len(matches) >= count:
                    return matches[count - 1]
                eof = self._eof
                left = self.deadline - time.monotonic()
                if not eof and left > 0:
                    self._cond.wait(min(left, 0.5))
                    continue
            if eof:
                self.fail("the VM closed its console before printing %r (%d time(s))" % (pattern, count))
            self.fail("deadline of %.0f s passed waiting for %r (%d time(s))"
                      % (self.deadline - self.started, pattern, count))

    def send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except OSError as e:
            self.fail("cannot write to the console: %s" % e)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is not None:
            self.fail("the VM exited before it could be sent signal %d" % signum)
        self.proc.send_signal(signum)

    def wait_exit(self) -> int:
        """The exit code, once the process ends (within the deadline)."""
        left = self.deadline - time.monotonic()
        try:
            rc = self.proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            self.fail("the VM did not exit within the deadline")
        self._thread.join(timeout=5)
        return rc

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def command_output(text: str, command: str) -> List[str]:
    """The console lines between `run: <command>` and `rc=`, kernel messages left out."""
    m = re.search(r"^TENBOX-INITRAMFS: run: %s\n(.*?)^TENBOX-INITRAMFS: rc=" % re.escape(command),
                  text, re.S | re.M)
    assert m, "no output block for %r in:\n%s" % (command, text)
    return [ln for ln in m.group(1).splitlines() if not re.match(r"\[\s*\d+\.\d+\]", ln)]


class Artifacts:
    def __init__(self, kdir: Path) -> None:
        self.kdir = kdir
        self.vmlinuz = kdir / "vmlinuz"
        self.initramfs = kdir / "initramfs.cpio.gz"
        self.release = (kdir / "version").read_text().strip()
        self.modules = [ln.strip() for ln in (kdir / "modules" / "load-order").read_text().splitlines()
                        if ln.strip()]


def build_linux() -> Artifacts:
    """Run get-kernel.sh and make-initramfs.sh (both cached: a no-op when nothing changed)."""
    for script in ("get-kernel.sh", "make-initramfs.sh"):
        r = run_tool([str(SCRIPTS / script)], SCRIPT_TIMEOUT, cwd=REPO)
        if r.returncode != 0:
            pytest.fail("%s failed (exit %d):\n%s%s" % (script, r.returncode, r.stdout, r.stderr))
    return Artifacts(KERNEL_DIR)
