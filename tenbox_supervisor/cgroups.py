"""A cgroup of its own for each worker where systemd makes no scopes: MemoryMax and TasksMax by hand (daemon, root).

Under systemd a worker runs in a transient scope whose MemoryMax= and
TasksMax= systemd applies (oshost.py). Without systemd as PID 1 (a
container, a chroot, CI) tenboxd makes the cgroup itself, under its own:

  * cgroup v2: `<tenboxd's cgroup>/tenbox-vm-<id>-<time>` with memory.max
    and pids.max, where the memory and pids controllers can be enabled for
    tenboxd's cgroup (they cannot while other processes share it: the
    "no internal processes" rule);
  * cgroup v1 (and the hybrid layout): the same name under tenboxd's
    cgroup in the memory hierarchy (memory.limit_in_bytes) and in the pids
    hierarchy (pids.max), each where it is mounted and writable.

Where neither works, nothing is made and the worker's rlimits are the
only bound (tenbox_vmm/sandbox/resources.py); `describe()` says which case
holds, for the log. The worker is moved in right after it is started,
before its interpreter has loaded (it runs nothing of the guest yet).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("tenboxd.cgroups")

PROC_MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUP = "/proc/%s/cgroup"
CONTROLLERS = ("memory", "pids")
RMDIR_TRIES = 3


@dataclass(frozen=True)
class ResourceLimits:
    memory_max: int  # bytes
    tasks_max: int


@dataclass(frozen=True)
class WorkerCgroup:
    """The cgroup folders of one worker (one for v2, one per controller for v1)."""

    dirs: Tuple[str, ...]

    def add(self, pid: int) -> None:
        for d in self.dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write("%d\n" % pid)

    def join_files(self) -> List[str]:
        """Per folder, the file a process joins it by, writing "0" itself (tenbox_vmm/standby.py): cgroup
        v1's `tasks` (one thread, the writer: moved without the lock a move by pid takes), else
        `cgroup.procs`."""
        tasks = [os.path.join(d, "tasks") for d in self.dirs]
        return [t if os.path.exists(t) else os.path.join(d, "cgroup.procs") for t, d in zip(tasks, self.dirs)]

    def remove(self) -> None:
        """rmdir each folder once its processes are gone; OSError is logged, not raised."""
        for d in self.dirs:
            for attempt in range(RMDIR_TRIES):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or attempt == RMDIR_TRIES - 1:
                        log.warning("cannot remove cgroup %s: %s", d, e.strerror)
                        break


@dataclass(frozen=True)
class Layout:
    """Where this host mounts cgroups, and tenboxd's own cgroup in each: read once at start."""

    unified: Optional[Tuple[str, str]]  # (mount point, tenboxd's path) of cgroup v2
    v1: Dict[str, Tuple[str, str]]  # controller -> (mount point, tenboxd's path)


def read_layout(mountinfo: str = PROC_MOUNTINFO, own: str = PROC_CGROUP % "self") -> Layout:
    mounts_v2: List[str] = []
    mounts_v1: Dict[str, str] = {}
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if " - " not in line:
                continue
            post = line.split(" - ", 1)[1].split()
            fstype, options = post[0], post[2] if len(post) > 2 else ""
            if fstype == "cgroup2":
                mounts_v2.append(fields[4])
            elif fstype == "cgroup":
                for opt in options.split(",") + fields[5].split(","):
                    if opt in CONTROLLERS:
                        mounts_v1.setdefault(opt, fields[4])
    paths = _own_paths(own)
    unified = (mounts_v2[0], paths[""]) if mounts_v2 and "" in paths else None
    v1 = {c: (m, paths[c]) for c, m in mounts_v1.items() if c in paths}
    return Layout(unified, v1)


def _own_paths(path: str) -> Dict[str, str]:
    """controller -> path from /proc/PID/cgroup ("" is the unified hierarchy)."""
    out: Dict[str, str] = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) == 3:
                for c in parts[1].split(",") if parts[1] else [""]:
                    out[c] = parts[2]
    return out


def pid_paths(pid: int) -> Dict[str, str]:
    """controller -> the cgroup path of process `pid` ("" is the unified hierarchy); OSError if it is gone."""
    return _own_paths(PROC_CGROUP % pid)


class Cgroups:
    """Makes and finds workers' cgroups on this host's layout."""

    def __init__(self, layout: Optional[Layout] = None) -> None:
        try:
            self.layout = layout if layout is not None else read_layout()
        except OSError as e:
            log.warning("cannot read the cgroup layout: %s; workers get rlimits only", e.strerror)
            self.layout = Layout(None, {})

    def _v2_base(self) -> Optional[str]:
        if self.layout.unified is None:
            return None
        mount, path = self.layout.unified
        base = os.path.join(mount, path.lstrip("/"))
        try:
            with open(os.path.join(base, "cgroup.controllers")) as f:
                available = f.read().split()
            if not all(c in available for c in CONTROLLERS):
                return None
            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                enabled = f.read().split()
            missing = [c for c in CONTROLLERS if c not in enabled]
            if missing:
                with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join("+" + c for c in missing))
        except OSError:
            return None  # no such controllers here, or tenboxd's cgroup has other processes in it
        return base

    def create(self, name: str, limits: ResourceLimits) -> Optional[WorkerCgroup]:
        """A new cgroup `name` with `limits`; None where this host gives none (see the module's docstring)."""
        base = self._v2_base()
        if base is not None:
            d = os.path.join(base, name)
            try:
                os.mkdir(d, 0o755)
                _write(d, "memory.max", limits.memory_max)
                _write(d, "pids.max", limits.tasks_max)
                return WorkerCgroup((d,))
            except OSError as e:
                log.warning("cannot make cgroup %s: %s", d, e.strerror)
                WorkerCgroup((d,)).remove()
        made: List[str] = []
        for controller, knob, value in (("memory", "memory.limit_in_bytes", limits.memory_max),
                                        ("pids", "pids.max", limits.tasks_max)):
            if controller not in self.layout.v1:
                continue
            mount, path = self.layout.v1[controller]
            d = os.path.join(mount, path.lstrip("/"), name)
            try:
                os.mkdir(d, 0o755)
                made.append(d)
                _write(d, knob, value)
            except OSError as e:
                log.warning("cannot make cgroup %s: %s", d, e.strerror)
        return WorkerCgroup(tuple(made)) if made else None

    def of_pid(self, pid: int, prefix: str) -> Optional[WorkerCgroup]:
        """The cgroup folders named `prefix`... that process `pid` is in (a worker taken back after a restart)."""
        try:
            paths = pid_paths(pid)
        except OSError:
            return None
        dirs = []
        if self.layout.unified is not None and os.path.basename(paths.get("", "")).startswith(prefix):
            dirs.append(os.path.join(self.layout.unified[0], paths[""].lstrip("/")))
        for controller, (mount, _) in sorted(self.layout.v1.items()):
            p = paths.get(controller, "")
            if os.path.basename(p).startswith(prefix):
                dirs.append(os.path.join(mount, p.lstrip("/")))
        return WorkerCgroup(tuple(dirs)) if dirs else None

    def sweep(self, prefix: str) -> int:
        """Remove the cgroups named `prefix`... under tenboxd's own that no process is in (left by workers that
        ended while no tenboxd ran); one with a process in it stays (rmdir refuses). How many went."""
        bases = [os.path.join(mount, path.lstrip("/")) for mount, path in
                 ([self.layout.unified] if self.layout.unified else []) + sorted(self.layout.v1.values())]
        removed = 0
        for base in bases:
            try:
                names = [n for n in os.listdir(base) if n.startswith(prefix)]
            except OSError:
                continue
            for name in names:
                try:
                    os.rmdir(os.path.join(base, name))
                    removed += 1
                except OSError:
                    pass  # EBUSY: a worker runs in it (one taken back), or another tenboxd's just made
        return removed

    def describe(self) -> str:
        if self._v2_base() is not None:
            return "cgroup v2 under %s" % self._v2_base()
        if self.layout.v1:
            return "cgroup v1 (%s)" % ", ".join(sorted(self.layout.v1))
        return "no cgroup this process may manage: workers get rlimits only"


def _write(folder: str, knob: str, value: int) -> None:
    with open(os.path.join(folder, knob), "w") as f:
        f.write("%d\n" % value)
