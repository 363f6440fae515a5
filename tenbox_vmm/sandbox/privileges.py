"""Giving up root: the worker user, no capabilities, no new privileges, not dumpable (worker, root until it drops).

The order matters and follows Firecracker's jailer: the capability
bounding set is emptied while we still hold CAP_SETPCAP, then the
supplementary groups, the gid and the uid are changed (which empties the
permitted and effective sets), then the inheritable and ambient sets are
cleared. NoNewPrivileges keeps a setuid binary or file capability from
giving anything back; a non-dumpable process has its /proc entries owned by
root and cannot be ptraced by processes of the same user (another worker).
"""

from __future__ import annotations

import os
from typing import Dict

from tenbox_vmm.protocol.sandbox import WorkerUser
from tenbox_vmm.sandbox import libc

CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"
CAP_LAST_CAP_DEFAULT = 40  # CAP_CHECKPOINT_RESTORE, Linux 5.9


class PrivilegeError(Exception):
    """A step of giving up privileges failed; the message names it."""


def drop_to(who: WorkerUser) -> None:
    """Become `who` with no capabilities in any set (root only)."""
    try:
        for cap in range(_cap_last_cap() + 1):
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
        os.setgroups([])
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as e:
        raise PrivilegeError("cannot become %s (uid %d): %s" % (who.name, who.uid, e.strerror or e)) from None
    clear_capabilities()


def clear_capabilities() -> None:
    """Empty the effective, permitted, inheritable and ambient sets (any user)."""
    try:
        libc.clear_capabilities()
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as e:
        raise PrivilegeError("cannot clear capabilities: %s" % (e.strerror or e)) from None


def no_new_privileges() -> None:
    try:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
    except OSError as e:
        raise PrivilegeError("cannot set no_new_privs: %s" % (e.strerror or e)) from None


def status() -> Dict[str, str]:
    """This process's /proc/self/status fields."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def check_dropped(who: WorkerUser, root_dropped: bool) -> None:
    """What /proc says matches what was asked; PrivilegeError naming the first field that does not."""
    st = status()
    want = {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0, "NoNewPrivs": 1}
    if root_dropped:
        want["CapBnd"] = 0
    for key, value in want.items():
        if key in st and int(st[key], 16 if key.startswith("Cap") else 10) != value:
            raise PrivilegeError("%s is %s after dropping privileges" % (key, st[key]))
    if root_dropped and {int(x) for x in st["Uid"].split()} != {who.uid}:
        raise PrivilegeError("uids are %s after dropping privileges" % st["Uid"])


def _cap_last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAP_LAST_CAP_DEFAULT
