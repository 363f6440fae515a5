"""Owners and modes of the data directory, one table applied at start and on upgrade (daemon, or postinst; root).

Nothing a guest wrote is readable by other users (docs/security.md):

| path | mode | owner |
| --- | --- | --- |
| the data directory | 0750 with a socket group, else 0700 | root:tenbox |
| vms/ and each VM folder | 0700 | root |
| a VM's vm.json, runtime.json, its own disk (disk.qcow2) and cloud-init seed (seed.iso) | 0600 | root |
| logs/ folders (the VM's and the daemon's update log) | 2750: new files get the group | root:tenbox |
| log files (console, runtime, update, and their rotations) | 0640 | root:tenbox |
| images/ and each image folder | 0755; files 0444 (images.py) | root |

tenboxd's umask is 027, so what it and its workers create is never
world-readable to begin with; the setgid log folders give new log files the
group. `secure_data_dir` walks the layout with descriptors opened relative to
their folder and O_NOFOLLOW: a link placed anywhere in it is left alone
(and logged), never followed to change another file's mode.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import stat
from typing import Optional

log = logging.getLogger("tenboxd.modes")

DAEMON_UMASK = 0o027
DATA_DIR_MODE = 0o750  # with a socket group: members may reach the image store
PRIVATE_DIR_MODE = 0o700  # the data directory without a group, vms/, each VM folder
LOG_DIR_MODE = 0o2750
LOG_FILE_MODE = 0o640
PRIVATE_FILE_MODE = 0o600  # vm.json, runtime.json, a VM's own disk
IMAGES_DIR_MODE = 0o755  # reached only through the data directory (its group)

SPEC_FILES = ("vm.json", "runtime.json")
# spec.OVERLAY_NAME, and the disks vm.disk.add makes (disk_api.ADDED_DISK, up to Limits.DISKS_MAX)
OWN_DISKS = ("disk.qcow2",) + tuple("disk-%d.qcow2" % n for n in range(1, 8))
SEED_FILES = ("seed.iso",)  # cloudinit.SEED_ISO: the operator's user-data may hold secrets
LOG_SUFFIXES = ("", ".1", ".2")  # the live file and its rotations (oshost.LOG_KEEP)
VM_LOGS = ("console.log", "runtime.log")
DAEMON_LOGS = ("update.log",)


def group_id(name: Optional[str]) -> Optional[int]:
    """The gid of the socket group, None when there is none (or it does not exist)."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class Owner:
    """Who owns what: the daemon's uid, and the group logs and the data directory go to."""

    def __init__(self, gid: Optional[int]) -> None:
        self.uid = os.geteuid()
        self.group = gid
        self.own_gid = os.getegid()  # private folders and files: the daemon's own group
        self.gid = gid if gid is not None else self.own_gid  # logs and the data directory
        self.changed = 0  # paths whose owner or mode was set

    @property
    def data_dir_mode(self) -> int:
        return DATA_DIR_MODE if self.group is not None else PRIVATE_DIR_MODE


def _open(dir_fd: Optional[int], name: str, directory: bool) -> Optional[int]:
    """name in dir_fd, not followed if it is a link; None (logged) when it is missing or not what it should be."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if directory:
        flags |= os.O_DIRECTORY
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            log.warning("left %s alone: it is a link or not a %s", name, "folder" if directory else "file")
            return None
        raise


def _apply(fd: int, name: str, mode: int, uid: int, gid: int) -> bool:
    """Set the owner and mode of the file open as fd; True if anything changed."""
    st = os.fstat(fd)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        log.warning("left %s alone: not a regular file", name)
        return False
    changed = False
    try:
        if (st.st_uid, st.st_gid) != (uid, gid) and os.geteuid() == 0:
            os.fchown(fd, uid, gid)
            changed = True
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:  # chown clears the setgid bit
            os.fchmod(fd, mode)
            changed = True
    except PermissionError as e:  # another owner's file (a per-user daemon), a root-squashing NFS server
        log.warning("cannot set the owner or mode of %s: %s", name, e.strerror)
    return changed


def _secure(dir_fd: Optional[int], name: str, mode: int, owner: Owner, gid: Optional[int] = None,
            directory: bool = False) -> Optional[int]:
    """Set name's owner (the daemon; group `gid`, else the owner's) and mode; a folder's descriptor, else None."""
    fd = _open(dir_fd, name, directory)
    if fd is None:
        return None
    try:
        owner.changed += _apply(fd, name, mode, owner.uid, owner.gid if gid is None else gid)
    except BaseException:
        os.close(fd)
        raise
    if directory:
        return fd
    os.close(fd)
    return None


def _secure_logs(parent_fd: int, names, owner: Owner) -> None:
    logs = _secure(parent_fd, "logs", LOG_DIR_MODE, owner, directory=True)
    if logs is None:
        return
    try:
        for base in names:
            for suffix in LOG_SUFFIXES:
                _secure(logs, base + suffix, LOG_FILE_MODE, owner)
    finally:
        os.close(logs)


def make_log_dir(path: str, gid: Optional[int]) -> None:
    """A logs/ folder (made if missing): 2750, the group's, so that every log file made in it is the group's too."""
    os.makedirs(path, mode=PRIVATE_DIR_MODE, exist_ok=True)
    fd = _secure(None, path, LOG_DIR_MODE, Owner(gid), directory=True)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "vanished while it was made", path)
    os.close(fd)


def secure_vm_folder(vms_fd: int, vm_id: str, owner: Owner) -> None:
    """One VM folder: 0700, its spec files and own disk 0600, its logs 0640 in a setgid 2750 folder."""
    fd = _secure(vms_fd, vm_id, PRIVATE_DIR_MODE, owner, owner.own_gid, directory=True)
    if fd is None:
        return
    try:
        for name in SPEC_FILES + OWN_DISKS + SEED_FILES:
            _secure(fd, name, PRIVATE_FILE_MODE, owner, owner.own_gid)
        _secure_logs(fd, VM_LOGS, owner)
    finally:
        os.close(fd)


def secure_data_dir(data_dir: str, gid: Optional[int]) -> Optional[int]:
    """The table above on the whole layout: how many paths changed; None without a data directory."""
    owner = Owner(gid)
    top = _open(None, data_dir, directory=True)
    if top is None:
        return None
    try:
        owner.changed += _apply(top, data_dir, owner.data_dir_mode, owner.uid, owner.gid)
        vms = _secure(top, "vms", PRIVATE_DIR_MODE, owner, owner.own_gid, directory=True)
        if vms is not None:
            try:
                for entry in os.listdir(vms):
                    if not entry.startswith("."):
                        secure_vm_folder(vms, entry, owner)
            finally:
                os.close(vms)
        images = _secure(top, "images", IMAGES_DIR_MODE, owner, owner.own_gid, directory=True)
        if images is not None:
            os.close(images)
        _secure_logs(top, DAEMON_LOGS, owner)
    finally:
        os.close(top)
    if owner.changed:
        log.info("set the owner or mode of %d paths in %s", owner.changed, data_dir)
    return owner.changed
