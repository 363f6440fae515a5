"""The files a request names, opened with the rights of whoever named them (daemon, root).

tenboxd runs as root; the users it serves are not root. A path in a
request is never opened with the daemon's rights on behalf of a user who
could not open it, and nothing about a file such a user could not read (its
size, its hash, its format) comes back in an answer. The rules, per use of
a path (docs/security.md):

- root on the local socket, and the daemon's own uid (a per-user daemon):
  opened with the daemon's rights;
- the image store: open to every caller, the cloud included, for reading
  only (a template, kernel or initrd of an imported image; a store file as
  a writable disk is refused to all but root);
- the VM's own files (its overlay, which the daemon made): the daemon's;
- any other path named by a group member: opened by a child process
  (file_opener.py) that runs with the member's uid, gid and supplementary
  groups (setpriv, no capabilities, no_new_privs) and hands the descriptors
  back over SCM_RIGHTS. The daemon reads through those descriptors only,
  so swapping the path afterwards changes nothing;
- anything else named by the cloud: refused (`permission_denied`).

The opening runs off the event loop (a thread, or the child) with a
deadline: a path on a dead NFS or FUSE mount fails its request, it never
stalls the daemon. Which uid named which path is recorded in the VM's spec
(`named_by`), and vm.start checks those paths again with that user's
rights before every start.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

from tenbox_supervisor import file_opener
from tenbox_supervisor.api import Caller
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import ErrorCode

log = logging.getLogger("tenboxd.files")
T = TypeVar("T")

OPEN_TIMEOUT_SEC = 30.0  # a mount that does not answer within this fails the request
OPENER_MODULE = "tenbox_supervisor.file_opener"
SETPRIV = "setpriv"  # util-linux, Essential in every distribution of the seed
# A hung open (dead NFS server) holds its thread until the kernel gives up: a few of
# them must not take the threads image imports copy on (the loop's default executor).
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tenbox-open")


@dataclass(frozen=True)
class Use:
    """One path a request names: what the request calls it (for messages), and whether the VM writes it."""

    key: str
    path: str
    write: bool = False


@dataclass(frozen=True)
class Credentials:
    """A user's rights: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: Tuple[int, ...]

    @classmethod
    def of_caller(cls, caller: Caller) -> "Credentials":
        return cls(caller.uid, caller.gid, tuple(caller.groups) or (caller.gid,))

    @classmethod
    def of_uid(cls, uid: int) -> "Credentials":
        """The user's rights as the user database has them now; KeyError if there is no such user."""
        pw = pwd.getpwuid(uid)
        return cls(uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    def setpriv_argv(self) -> List[str]:
        """A command prefix that runs the rest with these rights only (no capabilities, no way back)."""
        groups = ["--groups=" + ",".join(str(g) for g in self.groups)] if self.groups else ["--clear-groups"]
        return [SETPRIV, "--reuid=%d" % self.uid, "--regid=%d" % self.gid] + groups + [
            "--inh-caps=-all", "--no-new-privs", "--"]


# None: the daemon's own rights.
Rights = Optional[Credentials]


def _refusal(use: Use, reason: str, rights: Rights) -> ApiError:
    what = "%s %s" % (use.key, use.path)
    if reason == file_opener.MISSING:
        return ApiError(ErrorCode.FILE_MISSING, "%s does not exist" % what)
    if reason == file_opener.NOT_REGULAR:
        return ApiError(ErrorCode.FILE_MISSING, "%s is not a regular file" % what)
    if reason == file_opener.READ_ONLY_FS:
        return ApiError(ErrorCode.INVALID_ARGUMENT, "%s is on a read-only file system; give it read-only" % what)
    if reason == file_opener.DENIED:
        if rights is None:
            return ApiError(ErrorCode.FILE_MISSING, "%s is not %s" % (what, "writable" if use.write else "readable"))
        return ApiError(ErrorCode.PERMISSION_DENIED, "%s: permission denied: uid %d may not %s it (tenboxd opens "
                        "the files you name with your own rights)" % (what, rights.uid,
                                                                      "write" if use.write else "read"))
    return ApiError(ErrorCode.FILE_MISSING, "%s: %s" % (what, reason.split(": ", 1)[-1]))


class Opened:
    """Descriptors of a request's files by key, closed when the block that opened them ends."""

    def __init__(self, fds: Dict[str, int]) -> None:
        self.fds = fds

    def fd(self, key: str) -> int:
        return self.fds[key]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):  # one that fails leaks none of the others
            os.close(fd)


def _open_as(uses: Sequence[Use], rights: Credentials, timeout: float) -> Tuple[List[Optional[str]], List[int]]:
    """file_opener in a child with `rights`: (reasons, descriptors), as file_opener.open_all. Runs on a thread."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = rights.setpriv_argv() + [sys.executable, "-s", "-m", OPENER_MODULE, str(theirs.fileno()),
                                        json.dumps([[u.path, u.write] for u in uses])]
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    finally:
        theirs.close()
    fds: List[int] = []
    try:
        ours.settimeout(timeout)
        try:
            data, ancdata, flags, _ = ours.recvmsg(file_opener.REPLY_MAX_BYTES, socket.CMSG_SPACE(4 * len(uses)))
        except socket.timeout:
            raise ApiError(ErrorCode.FILE_MISSING, "%s: no answer from the file system within %.0f s"
                           % (", ".join(u.path for u in uses), timeout)) from None
        for level, type_, payload in ancdata:
            if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        try:
            reasons = json.loads(data.decode())
            well_formed = (not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) and isinstance(reasons, list)
                           and len(reasons) == len(uses) and all(r is None or isinstance(r, str) for r in reasons)
                           and len(fds) == sum(r is None for r in reasons))
        except (UnicodeDecodeError, ValueError):
            well_formed = False
        if not well_formed:
            raise ApiError(ErrorCode.INTERNAL_ERROR, "the file opener gave no usable answer (status %s)" % proc.poll())
        result = (reasons, fds)
        fds = []
        return result
    finally:
        _close_all(fds)
        ours.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # stuck in a dead mount; reaped by subprocess when it ever ends


def _check_descriptor(fd: int, use: Use) -> bool:
    """The descriptor is a regular file open for what the use needs (the child is the caller's, not ours)."""
    st = os.fstat(fd)
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    return stat.S_ISREG(st.st_mode) and (mode == os.O_RDWR if use.write else mode in (os.O_RDONLY, os.O_RDWR))


def open_uses(plan: Sequence[Tuple[Use, Rights]], timeout: float = OPEN_TIMEOUT_SEC) -> Dict[str, int]:
    """Open every use with its rights (blocking: a thread runs it); ApiError for the first that fails, none left open."""
    keys = [use.key for use, _ in plan]
    if len(set(keys)) != len(keys):  # descriptors are kept by key: a second use of one would leak the first
        raise ValueError("uses with the same key: %s" % sorted(k for k in set(keys) if keys.count(k) > 1))
    opened: Dict[str, int] = {}
    try:
        by_rights: Dict[Rights, List[Use]] = {}
        for use, rights in plan:
            by_rights.setdefault(rights, []).append(use)
        for rights, uses in by_rights.items():
            if rights is None:
                reasons, fds = file_opener.open_all([(u.path, u.write) for u in uses])
            else:
                reasons, fds = _open_as(uses, rights, timeout)
            fd_iter = iter(fds)
            for use, reason in zip(uses, reasons):
                if reason is None:
                    opened[use.key] = next(fd_iter)
            failed = [(u, r) for u, r in zip(uses, reasons) if r is not None]
            if failed:
                _close_all(fd_iter)
                raise _refusal(failed[0][0], failed[0][1], rights)
            for use in uses:
                if not _check_descriptor(opened[use.key], use):
                    raise _refusal(use, file_opener.NOT_REGULAR, rights)
        result, opened = opened, {}
        return result
    finally:
        _close_all(opened.values())


def owning(fds: Sequence[int], fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a thread that owns `fds` (duplicates made by its caller) and closes them when it ends.

    The request that started it may close its own descriptors, or be
    cancelled, at any time: a thread still reading never reads a reused
    descriptor number.
    """
    try:
        return fn(*args)
    finally:
        _close_all(fds)


class CallerFiles:
    """Who may name which files: the rules of this module's docstring, for one data directory."""

    def __init__(self, images_dir: str) -> None:
        self.images_dir = os.path.normpath(images_dir)

    def in_store(self, path: str) -> bool:
        return os.path.normpath(path).startswith(self.images_dir + os.sep)

    @staticmethod
    def caller_rights(caller: Caller) -> Rights:
        """None when the caller has the daemon's rights (root, or the uid a per-user daemon runs as)."""
        if caller.transport == "local" and caller.uid in (0, os.geteuid()):
            return None
        return Credentials.of_caller(caller)

    def rights_for(self, caller: Caller, use: Use, own: Sequence[str] = ()) -> Rights:
        """The rights `use` is opened with for `caller`; ApiError(permission_denied) if it may not name it at all."""
        rights = self.caller_rights(caller)
        if rights is None or use.path in own:
            return None
        if self.in_store(use.path):
            if use.write:
                raise ApiError(ErrorCode.PERMISSION_DENIED, "%s %s is a file of the image store, which VMs only read; "
                               "give it read-only, or use it as a template" % (use.key, use.path))
            return None
        if caller.transport != "local":
            raise ApiError(ErrorCode.PERMISSION_DENIED, "%s %s: the cloud may name files of the image store (%s) only"
                           % (use.key, use.path, self.images_dir))
        return rights

    def plan(self, caller: Caller, uses: Sequence[Use], own: Sequence[str] = ()) -> List[Tuple[Use, Rights]]:
        return [(use, self.rights_for(caller, use, own)) for use in uses]

    async def open_planned(self, plan: Sequence[Tuple[Use, Rights]]) -> Opened:
        """Descriptors for every planned use; ApiError for the first that cannot be opened."""
        if not plan:
            return Opened({})
        fut = asyncio.get_event_loop().run_in_executor(_POOL, open_uses, plan)
        try:
            return Opened(await asyncio.wait_for(asyncio.shield(fut), OPEN_TIMEOUT_SEC + 5))
        except asyncio.TimeoutError:
            # The thread is stuck in the kernel; whatever it opens later is closed, not leaked.
            fut.add_done_callback(lambda f: f.exception() is None and _close_all(f.result().values()))
            raise ApiError(ErrorCode.FILE_MISSING, "%s: no answer from the file system within %.0f s"
                           % (", ".join(u.path for u, _ in plan), OPEN_TIMEOUT_SEC)) from None

    async def open(self, caller: Caller, uses: Sequence[Use], own: Sequence[str] = ()) -> Opened:
        return await self.open_planned(self.plan(caller, uses, own))
