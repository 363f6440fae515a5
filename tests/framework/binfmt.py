"""Running another architecture's programs on the build host: qemu-user through binfmt_misc (tests; root).

debootstrap and chroot of an arm64 Debian on an amd64 host (the arm64 lane's
userland, `tenbox image build debian --arch arm64`) need the kernel to hand
arm64 ELF files to qemu-user. Debian's qemu-user-static ships the
registration lines in /usr/lib/binfmt.d, which systemd-binfmt loads at boot;
where systemd is not PID 1 (containers, CI) nothing loads them, so ensure()
does: it mounts binfmt_misc if needed and registers the line as shipped (its
F flag opens the interpreter now, so it works inside any chroot). The
registration is the host kernel's, global, and stays until reboot.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")
CONF_DIR = Path("/usr/lib/binfmt.d")
# Debian's architecture names and qemu's.
QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64"}
MOUNT_TIMEOUT_SEC = 30


class BinfmtError(Exception):
    """Foreign binaries cannot run here; the message is one line for people."""


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def ensure(arch: str) -> None:
    """Make `arch` (Debian's name) programs runnable here, or raise BinfmtError saying what is missing."""
    if arch == host_arch():
        return
    name = "qemu-" + QEMU_NAMES[arch]
    conf = CONF_DIR / (name + ".conf")
    if not conf.exists():
        raise BinfmtError("running %s programs here needs qemu-user-static (%s is missing): make deps" % (arch, conf))
    if not (BINFMT / "register").exists():
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                           text=True, timeout=MOUNT_TIMEOUT_SEC)
        if r.returncode != 0:
            raise BinfmtError("cannot mount binfmt_misc at %s: %s" % (BINFMT, r.stderr.strip() or r.returncode))
    entry = BINFMT / name
    if not entry.exists():
        line = conf.read_text().strip()
        try:
            fd = os.open(str(BINFMT / "register"), os.O_WRONLY)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise BinfmtError("cannot register %s with binfmt_misc: %s" % (name, e.strerror)) from None
    state = entry.read_text()
    if not state.startswith("enabled"):
        raise BinfmtError("binfmt_misc has %s registered but disabled (%s)" % (name, entry))
    flags = [ln.split(":", 1)[1].strip() for ln in state.splitlines() if ln.startswith("flags:")]
    if not flags or "F" not in flags[0]:
        raise BinfmtError("binfmt_misc's %s lacks the F flag, so it cannot run inside a chroot: "
                          "re-register it from %s" % (name, conf))
