"""Throw-away system users and groups, for tests of who may do what (tests; root).

Names carry the test process's pid: worktrees share one machine, and two
test runs must never delete each other's users.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import subprocess
from dataclasses import dataclass
from typing import Iterator, List, Sequence


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int
    groups: Sequence[str]


def unique_name(prefix: str) -> str:
    """`prefix` plus this process's pid: at most 32 characters, as useradd wants."""
    return ("%s%d" % (prefix, os.getpid()))[:32]


def _exists(lookup, name: str) -> bool:
    try:
        lookup(name)
        return True
    except KeyError:
        return False


@contextlib.contextmanager
def system_group(name: str) -> Iterator[int]:
    """A system group for the test; removed afterwards if this created it. Yields its gid."""
    made = not _exists(grp.getgrnam, name)
    if made:
        subprocess.run(["groupadd", "--system", name], check=True)
    try:
        yield grp.getgrnam(name).gr_gid
    finally:
        if made:
            subprocess.run(["groupdel", name], capture_output=True)


@contextlib.contextmanager
def system_user(name: str, groups: Sequence[str] = ()) -> Iterator[SystemUser]:
    """A login-less system user whose supplementary groups are exactly `groups` (which must exist).

    Its primary group is its own (useradd's user group): membership in a
    tenbox group comes only from `groups`. Removed afterwards.
    """
    if _exists(pwd.getpwnam, name):
        subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)
    try:
        set_groups(name, groups)
        pw = pwd.getpwnam(name)
        yield SystemUser(name, pw.pw_uid, pw.pw_gid, tuple(groups))
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        if _exists(grp.getgrnam, name):
            subprocess.run(["groupdel", name], capture_output=True)


def set_groups(name: str, groups: Sequence[str]) -> None:
    """Make `groups` the user's supplementary groups, no more, no less."""
    subprocess.run(["usermod", "-G", ",".join(groups), name], check=True)


def own(paths: List[str], user: SystemUser, mode: int) -> None:
    """chown each path to the user and chmod it."""
    for p in paths:
        os.chown(p, user.uid, user.gid)
        os.chmod(p, mode)
