"""Debian chroots for the distribution matrix: cached bases, throwaway overlays, mounts that always come down (tests; root).

A base is `debootstrap --variant=minbase` of one suite from Debian's mirror,
kept under .cache/chroots/<suite>-<arch>/ and reused by later runs. Every
test run works in an overlay on top of it (the base is never written), with
/proc, /sys, /dev, /dev/pts and /dev/shm mounted and the downloaded .debs
kept in .cache/chroots/apt-<suite>-<arch>/ between runs. Closing a chroot
kills every process whose root is inside it, then unmounts in reverse order
(lazily if a mount is still busy) and deletes the overlay.

systemd is not PID 1 in a chroot; a recording stand-in for systemctl
(STANDIN below) goes first on PATH, and on the PATH apt gives dpkg: it logs every call and keeps the enabled
state as the same symlink `systemctl enable` makes, so deb-systemd-helper
sees what the installer did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "chroots"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_SEC = 1200
MOUNT_TIMEOUT_SEC = 30
DEFAULT_TIMEOUT_SEC = 600
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STANDIN_LOG = "/var/log/systemctl-standin.log"
# Bump when the base recipe changes: older cached bases are rebuilt.
BASE_RECIPE = "minbase-1"

STANDIN = r"""#!/bin/sh
# Recording stand-in for systemctl (tests/packaging): systemd is not PID 1 in
# this chroot. Logs every call; enable/disable/is-enabled act on the same
# symlink `systemctl enable` makes, so deb-systemd-helper agrees with it.
echo "$*" >> /var/log/systemctl-standin.log
echo "[systemctl stand-in] $*" >&2
verb=""; unit=""
for a in "$@"; do
    case $a in
        -*) ;;
        *) if [ -z "$verb" ]; then verb=$a; elif [ -z "$unit" ]; then unit=$a; fi ;;
    esac
done
case $unit in ""|*.*) ;; *) unit=$unit.service ;; esac
wants=/etc/systemd/system/multi-user.target.wants
case $verb in
    enable) mkdir -p "$wants"; ln -sf "/lib/systemd/system/$unit" "$wants/$unit" ;;
    disable) rm -f "$wants/$unit" ;;
    is-enabled) if [ -L "$wants/$unit" ]; then echo enabled; exit 0; fi; echo disabled; exit 1 ;;
    is-active) exit 3 ;;
esac
exit 0
"""


class ChrootError(Exception):
    pass


def _run_host(argv: Sequence[str], timeout: float = MOUNT_TIMEOUT_SEC, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


def _unmount_and_remove(path: Path) -> None:
    """Unmount whatever is mounted under `path` (deepest first), then remove it, never crossing into a mount."""
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f if line.split()[1].startswith(str(path) + "/")]
    for t in sorted(targets, key=len, reverse=True):
        _run_host(["umount", "-l", t], check=False)
    _run_host(["rm", "-rf", "--one-file-system", str(path)], timeout=300, check=False)


def base_dir(suite: str, arch: str = "amd64") -> Path:
    return CACHE / ("%s-%s" % (suite, arch))


def ensure_base(suite: str, arch: str = "amd64") -> Path:
    """The cached minbase of `suite`, made with debootstrap if missing (a few minutes)."""
    base = base_dir(suite, arch)
    stamp = base / ".packaging-test-base"
    if stamp.exists() and stamp.read_text().strip() == BASE_RECIPE and not os.environ.get("TENBOX_REFRESH_CHROOTS"):
        return base
    partial = base.with_name(base.name + ".partial")
    for d in (partial, base):
        if d.exists():
            # A debootstrap killed in its second stage leaves its /proc mounted there.
            _unmount_and_remove(d)
            if d.exists():
                raise ChrootError("cannot remove %s (something is still mounted in it?)" % d)
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["debootstrap", "--variant=minbase", "--arch=" + arch, suite, str(partial), MIRROR],
                       capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_SEC)
    if r.returncode != 0:
        raise ChrootError("debootstrap %s failed:\n%s" % (suite, (r.stdout + r.stderr)[-4000:]))
    (partial / ".packaging-test-base").write_text(BASE_RECIPE + "\n")
    partial.rename(base)
    return base


class Chroot:
    """An overlay on a cached base with the usual mounts; use as a context manager."""

    def __init__(self, suite: str, arch: str = "amd64") -> None:
        self.suite = suite
        self.arch = arch
        self.base = ensure_base(suite, arch)
        self.work = CACHE / "runs" / ("%s-%s-%d" % (suite, arch, os.getpid()))
        self.root = self.work / "root"
        self.apt_cache = CACHE / ("apt-%s-%s" % (suite, arch))
        self._mounts: List[Path] = []
        self.timings: Dict[str, float] = {}

    # Setup and teardown -------------------------------------------------------

    def _mount(self, target: Path, argv: Sequence[str]) -> None:
        target.mkdir(parents=True, exist_ok=True)
        _run_host(list(argv) + [str(target)])
        self._mounts.append(target)
        # Under systemd / is shared: without this, a bind of /dev would be a
        # peer of the host's /dev and the tmpfs mounted on its shm would
        # appear on the host's /dev/shm too.
        _run_host(["mount", "--make-private", str(target)])

    def __enter__(self) -> "Chroot":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.work.exists():
            self._cleanup_stale(self.work)
        for d in ("upper", "work", "root"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        self._mount(self.root, ["mount", "-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s,workdir=%s"
                                % (self.base, self.work / "upper", self.work / "work")])
        self._mount(self.root / "proc", ["mount", "-t", "proc", "proc"])
        self._mount(self.root / "sys", ["mount", "-t", "sysfs", "sysfs"])
        # systemd-analyze (247) wants to know its cgroup, even offline.
        self._mount(self.root / "sys" / "fs" / "cgroup", ["mount", "-t", "cgroup2", "cgroup2"])
        self._mount(self.root / "dev", ["mount", "--bind", "/dev"])
        self._mount(self.root / "dev" / "pts", ["mount", "--bind", "/dev/pts"])
        self._mount(self.root / "dev" / "shm", ["mount", "-t", "tmpfs", "-o", "mode=1777,size=256m", "tmpfs"])
        (self.apt_cache / "partial").mkdir(parents=True, exist_ok=True)
        self._mount(self.root / "var" / "cache" / "apt" / "archives", ["mount", "--bind", str(self.apt_cache)])
        shutil.copyfile("/etc/resolv.conf", self.root / "etc" / "resolv.conf")
        standin = self.root / "usr" / "local" / "sbin" / "systemctl"
        standin.parent.mkdir(parents=True, exist_ok=True)
        standin.write_text(STANDIN)
        standin.chmod(0o755)
        # apt runs dpkg (and so the maintainer scripts) with DPkg::Path,
        # /usr/sbin:/usr/bin:/sbin:/bin by default: put the stand-in first there too.
        conf = self.root / "etc" / "apt" / "apt.conf.d" / "99packaging-test-path"
        conf.write_text('DPkg::Path "%s";\n' % PATH)

    def kill_processes(self) -> None:
        """SIGKILL every process whose root directory is inside this chroot."""
        root = str(self.root)
        for _ in range(3):
            found = False
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    link = os.readlink("/proc/%s/root" % pid)
                except OSError:
                    continue
                if link == root or link.startswith(root + "/"):
                    found = True
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if not found:
                return
            time.sleep(0.5)

    def close(self) -> None:
        self.kill_processes()
        errors = []
        for target in reversed(self._mounts):
            r = _run_host(["umount", str(target)], check=False)
            if r.returncode != 0:
                r = _run_host(["umount", "-l", str(target)], check=False)
                if r.returncode != 0:
                    errors.append("%s: %s" % (target, r.stderr.strip()))
        self._mounts = []
        if not errors:
            _run_host(["rm", "-rf", "--one-file-system", str(self.work)], timeout=300, check=False)
        if errors:
            raise ChrootError("could not unmount: " + "; ".join(errors))

    @staticmethod
    def _cleanup_stale(work: Path) -> None:
        """Unmount what a killed earlier run with the same pid left behind."""
        _unmount_and_remove(work)

    # Running things inside ----------------------------------------------------

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {"PATH": PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/root", "TERM": "dumb",
               "DEBIAN_FRONTEND": "noninteractive"}
        env.update(extra or {})
        return env

    def run(self, cmd: Union[str, Sequence[str]], timeout: float = DEFAULT_TIMEOUT_SEC, check: bool = True,
            env: Optional[Dict[str, str]] = None, step: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a shell command (str) or argv inside the chroot; output captured, always bounded."""
        argv = ["chroot", str(self.root)] + (["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd))
        started = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(env),
                               errors="replace")
        finally:
            if step:
                self.timings[step] = self.timings.get(step, 0.0) + time.monotonic() - started
        if check and r.returncode != 0:
            raise ChrootError("[%s] %s: exit %d\n--- stdout\n%s\n--- stderr\n%s" % (
                self.suite, cmd if isinstance(cmd, str) else " ".join(cmd), r.returncode, r.stdout[-6000:],
                r.stderr[-6000:]))
        return r

    def popen(self, cmd: str, log: Path, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start a long-running shell command inside the chroot (killed by close() at the latest)."""
        with open(log, "ab") as f:
            return subprocess.Popen(["chroot", str(self.root), "/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=subprocess.STDOUT, env=self.env(env), start_new_session=True)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def standin_calls(self) -> List[str]:
        p = self.path(STANDIN_LOG)
        return p.read_text().splitlines() if p.exists() else []

    def clear_standin_log(self) -> None:
        p = self.path(STANDIN_LOG)
        if p.exists():
            p.unlink()

    def simulate_systemd(self, on: bool) -> None:
        """Make maintainer scripts believe systemd is PID 1 ([ -d /run/systemd/system ])."""
        d = self.path("/run/systemd/system")
        if on:
            d.mkdir(parents=True, exist_ok=True)
        elif d.exists():
            d.rmdir()
