"""A VM's snapshots on disk: their records, the worker's staging folder, moving files into place (daemon, root).

Layout in a VM's folder (docs/daemon.md, Snapshots):

    snapshots/NAME.json   the record (SnapshotRecord), written last and atomically:
                          a snapshot exists exactly when its record does
    snapshots/NAME.snap   the machine state and RAM (tenbox_vmm/snapshot/fileformat.py),
                          absent for a snapshot of a stopped VM
    snapshots/NAME.diskI.qcow2  an empty overlay on disk I's layer, a copy of the VM's own new
                          overlay before anything wrote it: a restore or a clone copies it
                          rather than running the image tool (absent: the image tool makes one)
    snapshot-staging/     the worker's --snapshot-dir, owned by the worker user: where it
                          writes NAME.snap and opens its disks' new overlays. Nothing in it
                          is ever read as a snapshot; tenboxd moves files out of it
    disk*.qcow2           the disks; a snapshot's layers are the images its disks had,
                          made read-only, and the VM goes on with new overlays on them

A snapshot killed half-way leaves files in the staging folder or
unreferenced overlays, never a record: `list_records` shows only complete
snapshots, and the staging folder is emptied before each use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set

from tenbox_supervisor.fsutil import atomic_write_json, fsync_dir
from tenbox_supervisor.modes import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE
from tenbox_supervisor.protocol import NAME_RE
from tenbox_vmm.protocol.sandbox import worker_user

log = logging.getLogger("tenboxd.snapshots")

SNAPSHOTS_DIR = "snapshots"
STAGING_DIR = "snapshot-staging"
RECORD_SUFFIX = ".json"
MEMORY_SUFFIX = ".snap"
RECORD_MAX_BYTES = 1 << 20
LAYER_MODE = 0o400  # a snapshot's layer: read by the overlays on it, never written again
SNAPSHOTS_PER_VM_MAX = 64  # records listed per VM; a bound on the folder scans below


class RecordError(ValueError):
    """A snapshot record is unreadable or does not validate."""


@dataclass(frozen=True)
class SnapshotRecord:
    """What tenboxd keeps of one snapshot: enough to restore it into its VM or clone it into new ones.

    `machine` is the VM's hardware at the snapshot (memory_mb, cpus, kernel, initrd, cmdline,
    net, disks): the worker restoring `memory_file` must be given the same. In `machine.disks`,
    an entry with "layer": true is a snapshot layer: the path of the image the disk had,
    read-only since; a restore or a clone puts a new qcow2 overlay on it.
    """

    name: str
    vm_id: str
    created_at: float
    running: bool  # taken from a running VM: memory_file holds its state and RAM
    memory_file: Optional[str]  # NAME.snap in snapshots/, or None
    file_bytes: int
    paused_ms: float
    machine: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "SnapshotRecord":
        if not isinstance(d, dict):
            raise RecordError("not a JSON object")
        try:
            rec = cls(name=d["name"], vm_id=d["vm_id"], created_at=d["created_at"], running=d["running"],
                      memory_file=d["memory_file"], file_bytes=d["file_bytes"], paused_ms=d["paused_ms"],
                      machine=d["machine"])
        except KeyError as e:
            raise RecordError("field %s is missing" % e) from None
        rec.validate()
        return rec

    def validate(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise RecordError("bad name")
        if not isinstance(self.vm_id, str) or not NAME_RE.match(self.vm_id):
            raise RecordError("bad vm_id")
        if not isinstance(self.running, bool) or not isinstance(self.machine, dict):
            raise RecordError("bad running or machine")
        if self.memory_file not in (None, self.name + MEMORY_SUFFIX):
            raise RecordError("bad memory_file")
        disks = self.machine.get("disks")
        if not isinstance(disks, list) or not all(isinstance(d, dict) and isinstance(d.get("path"), str)
                                                  and os.path.isabs(d["path"]) for d in disks):
            raise RecordError("bad machine.disks")

    def layers(self) -> List[str]:
        return [d["path"] for d in self.machine["disks"] if d.get("layer")]


def snapshots_dir(vm_dir: str) -> str:
    return os.path.join(vm_dir, SNAPSHOTS_DIR)


def staging_dir(vm_dir: str) -> str:
    return os.path.join(vm_dir, STAGING_DIR)


def record_path(vm_dir: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError("bad snapshot name")
    return os.path.join(snapshots_dir(vm_dir), name + RECORD_SUFFIX)


def memory_path(vm_dir: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError("bad snapshot name")
    return os.path.join(snapshots_dir(vm_dir), name + MEMORY_SUFFIX)


def read_record(vm_dir: str, name: str) -> SnapshotRecord:
    """The record of snapshot `name`; FileNotFoundError if there is none, RecordError if it is broken."""
    with open(record_path(vm_dir, name), "rb") as f:
        raw = f.read(RECORD_MAX_BYTES + 1)
    if len(raw) > RECORD_MAX_BYTES:
        raise RecordError("record is over 1 MiB")
    try:
        rec = SnapshotRecord.from_json(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("not valid JSON: %s" % e) from None
    if rec.name != name:
        raise RecordError("record says name %r" % rec.name)
    return rec


def list_records(vm_dir: str) -> List[SnapshotRecord]:
    """The VM's complete snapshots, oldest first; a broken record is logged and left out."""
    try:
        names = sorted(os.listdir(snapshots_dir(vm_dir)))
    except FileNotFoundError:
        return []
    out = []
    for entry in names:
        name = entry[: -len(RECORD_SUFFIX)]
        if not entry.endswith(RECORD_SUFFIX) or not NAME_RE.match(name):
            continue
        try:
            out.append(read_record(vm_dir, name))
        except (OSError, RecordError) as e:
            log.error("%s: snapshot record %s is unreadable: %s", vm_dir, entry, getattr(e, "strerror", None) or e)
    out.sort(key=lambda r: (r.created_at, r.name))
    return out


def write_record(vm_dir: str, rec: SnapshotRecord) -> None:
    """Store the record atomically: the snapshot exists from here on."""
    rec.validate()
    os.makedirs(snapshots_dir(vm_dir), mode=PRIVATE_DIR_MODE, exist_ok=True)
    atomic_write_json(record_path(vm_dir, rec.name), rec.to_json(), PRIVATE_FILE_MODE)


def remove_record(vm_dir: str, name: str) -> None:
    """The record first (the snapshot is gone from then on), then its memory file and fresh overlays."""
    os.unlink(record_path(vm_dir, name))
    fsync_dir(snapshots_dir(vm_dir))
    try:
        os.unlink(memory_path(vm_dir, name))
    except FileNotFoundError:
        pass
    fresh = re.compile(r"%s\.disk\d+\.qcow2\Z" % re.escape(name))
    for entry in os.listdir(snapshots_dir(vm_dir)):
        if fresh.match(entry):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(snapshots_dir(vm_dir), entry))


def fresh_overlay_path(vm_dir: str, name: str, index: int) -> str:
    """snapshots/NAME.diskI.qcow2: the snapshot's empty overlay on disk I's layer (see the layout above)."""
    if not NAME_RE.match(name):
        raise ValueError("bad snapshot name")
    return os.path.join(snapshots_dir(vm_dir), "%s.disk%d.qcow2" % (name, index))


def new_overlay_name(index: int) -> str:
    """A fresh file name for disk `index`'s next overlay (NAME_RE, so the worker link accepts it)."""
    return "disk%d-%s" % (index, secrets.token_hex(4))


# The staging folder ---------------------------------------------------------------------------


def worker_owner() -> tuple:
    """(uid, gid) the worker writes as: the worker user when tenboxd is root, else tenboxd's own."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    who = worker_user()
    return who.uid, who.gid


def prepare_staging(vm_dir: str) -> str:
    """The VM's staging folder, made if missing, emptied, owned by the worker user (0700); its path.

    Made and checked without following links: a worker that escaped its guest may have
    left anything in it.
    """
    path = staging_dir(vm_dir)
    uid, gid = worker_owner()
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        os.mkdir(path, PRIVATE_DIR_MODE)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for entry in os.listdir(dfd):
            _remove_entry(dfd, entry)
        if os.geteuid() == 0:
            os.fchown(dfd, uid, gid)
        os.fchmod(dfd, PRIVATE_DIR_MODE)
    finally:
        os.close(dfd)
    return path


def _remove_entry(dfd: int, entry: str) -> None:
    st = os.lstat(entry, dir_fd=dfd)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            for inner in os.listdir(sub):
                _remove_entry(sub, inner)
        finally:
            os.close(sub)
        os.rmdir(entry, dir_fd=dfd)
    else:
        os.unlink(entry, dir_fd=dfd)


def hand_to_worker(path: str) -> int:
    """A file tenboxd made in the staging folder, given to the worker user to open (0600).

    Returns a descriptor of it for the caller to hold (and close) until take_from_staging:
    held open, the file's inode cannot be freed and reused by another file under the name.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        uid, gid = worker_owner()
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_from_staging(vm_dir: str, name: str, dest: str, made_fd: Optional[int] = None) -> int:
    """Move staging/NAME to `dest` (same file system), as root's 0600 file; its size.

    The file must be a regular file with one link, not a link, and with `made_fd` (from
    hand_to_worker) the very file tenboxd made (a worker may have put another under the
    name): ValueError otherwise.
    """
    dfd = os.open(staging_dir(vm_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise ValueError("%s in the staging folder is not a plain file" % name)
            made = os.fstat(made_fd) if made_fd is not None else st
            if (st.st_dev, st.st_ino) != (made.st_dev, made.st_ino):
                raise ValueError("%s in the staging folder is not the file tenboxd made" % name)
            if os.geteuid() == 0:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, PRIVATE_FILE_MODE)
            size = st.st_size
        finally:
            os.close(fd)
        os.rename(name, dest, src_dir_fd=dfd)
    finally:
        os.close(dfd)
    fsync_dir(os.path.dirname(dest))
    return size


# Which files are still needed ------------------------------------------------------------------


def referenced_paths(specs: Iterable[Any], vm_dirs: Iterable[str]) -> Set[str]:
    """Every image some VM's disks or some snapshot still need: disks, their backing chains, layers."""
    used: Set[str] = set()
    for spec in specs:
        for d in spec.disks:
            used.add(d["path"])
            used.update(d.get("backing") or [])
    for vm_dir in vm_dirs:
        for rec in list_records(vm_dir):
            for d in rec.machine["disks"]:
                used.add(d["path"])
                used.update(d.get("backing") or [])
    return used


def remove_unreferenced(candidates: Iterable[str], used: Set[str]) -> List[str]:
    """Delete the candidate files (a VM's own images) nobody needs any more; the ones deleted."""
    gone = []
    for path in candidates:
        if path in used:
            continue
        try:
            os.unlink(path)
            gone.append(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s, which no VM or snapshot uses: %s", path, e.strerror)
    return gone
