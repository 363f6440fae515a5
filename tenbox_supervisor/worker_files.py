"""A worker's files, opened by tenboxd and passed as descriptors: kernel, initrd, disks and their backing chains, console logs (daemon, root).

A sandboxed worker runs as the worker user in a mount namespace without
the data dir, so it opens none of its VM's files itself (docs/security-
sandbox.md): `wanted()` says which files a VM's worker needs, `open_all()`
opens them (SystemHost.spawn, just before the worker starts), and each
becomes a `--fd N:PATH` argument. A disk's backing chain comes from the
spec where tenboxd recorded it (the overlay it made of a template) or from
the image tool at each start (a disk the caller brought: its chain may
change between starts); a backing file named by an image but not passed
is not there for the worker, which then refuses the disk.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from tenbox_supervisor.spec import VmSpec
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.sandbox import CONSOLE_LOG, RUNTIME_LOG, PassedFile, rotated_log_names

LOG_MODE = 0o640


class WorkerFileError(Exception):
    """A file of the VM cannot be opened for its worker; the message names it and why."""


@dataclass(frozen=True)
class WorkerFile:
    path: str
    what: str  # "kernel", "disk", "backing file of DISK", "console log": for messages
    writable: bool = False
    create: bool = False  # made if missing (the console logs)
    directory: bool = False  # a folder, opened read-only (the snapshot staging folder)


def console_logs(vm_dir: str) -> List[str]:
    base = os.path.join(vm_dir, "logs", CONSOLE_LOG)
    return [base] + rotated_log_names(base, Limits.CONSOLE_LOG_KEEP)


def runtime_logs(vm_dir: str) -> List[WorkerFile]:
    """runtime.log (the worker's stderr) to read, and its copies to rotate it into (tenbox_vmm/logfiles.py)."""
    base = os.path.join(vm_dir, "logs", RUNTIME_LOG)
    return [WorkerFile(base, "runtime log", create=True)] + [
        WorkerFile(p, "runtime log", writable=True, create=True) for p in rotated_log_names(base, Limits.RUNTIME_LOG_KEEP)]


def needs_chain(disk: Dict) -> bool:
    """Whether the disk's backing chain must be read (by the image tool) before its worker starts."""
    return disk.get("format") != "raw" and not isinstance(disk.get("backing"), list)


def wanted(spec: VmSpec, vm_dir: str, chains: Dict[str, List[str]], restore: Optional[str] = None,
           staging: Optional[str] = None) -> List[WorkerFile]:
    """The files the worker of `spec` needs; `chains` gives each disk's backing files where the spec does not.

    `restore`: the snapshot file it starts from; `staging`: its --snapshot-dir (snapshots.py).
    """
    files = [WorkerFile(spec.kernel, "kernel")]
    if spec.initrd:
        files.append(WorkerFile(spec.initrd, "initrd"))
    for d in spec.disks:
        files.append(WorkerFile(d["path"], "disk", writable=not d.get("read_only")))
        chain = d.get("backing") if isinstance(d.get("backing"), list) else chains.get(d["path"], [])
        files += [WorkerFile(p, "backing file of %s" % d["path"]) for p in chain]
    files += [WorkerFile(p, "console log", writable=True, create=True) for p in console_logs(vm_dir)]
    if restore:
        files.append(WorkerFile(restore, "snapshot"))
    if staging:
        files.append(WorkerFile(staging, "snapshot staging folder", directory=True))
    return files + runtime_logs(vm_dir)


def open_all(files: Sequence[WorkerFile]) -> List[PassedFile]:
    """Open every file; WorkerFileError (nothing left open) if one cannot be. The caller closes them."""
    opened: List[PassedFile] = []
    try:
        for f in files:
            opened.append(PassedFile(_open(f), f.path))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(opened: Sequence[PassedFile]) -> None:
    for pf in opened:
        os.close(pf.fd)


def _open(f: WorkerFile) -> int:
    if f.directory:
        try:
            return os.open(f.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise WorkerFileError("cannot open %s %s: %s" % (f.what, f.path, e.strerror)) from None
    flags = (os.O_RDWR if f.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if f.create:
        flags |= os.O_CREAT | os.O_NOFOLLOW  # in the VM's own folder: never through a link
    try:
        fd = os.open(f.path, flags, LOG_MODE)
    except OSError as e:
        raise WorkerFileError("cannot open %s %s: %s" % (f.what, f.path, e.strerror)) from None
    try:
        mode = os.fstat(fd).st_mode
        # A fifo or a device other than a disk would block or misbehave in the worker.
        if not (stat.S_ISREG(mode) or (stat.S_ISBLK(mode) and f.what != "kernel" and f.what != "initrd"
                                       and not f.create)):
            raise WorkerFileError("%s %s is not a regular file" % (f.what, f.path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
