"""Files opened for this worker before it gave up its rights, found by the path they stand for (worker).

tenboxd opens a VM's kernel, initrd, disks with their backing chains and
console logs, and passes the descriptors (`--fd N:PATH`); a standalone
tenbox-vm-runtime run as root opens the files its command line names
before it enters its sandbox (`open_named`). Inside the sandbox the worker
sees none of those paths and could not open them anyway: every open of a
VM file goes through `open_fd`, which hands out a passed descriptor and
falls back to opening the path only where nothing was passed.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tenbox_vmm.protocol.sandbox import PassedFile

_passed: Dict[str, List[int]] = {}  # path -> descriptors not handed out yet, in the order given
_failed: Dict[str, OSError] = {}  # path -> what opening it before the sandbox met (raised again on use)


def add(path: str, fd: int) -> None:
    _passed.setdefault(path, []).append(fd)


def add_arg(pf: PassedFile) -> None:
    """A --fd value; OSError(EBADF) if the descriptor is not open."""
    os.fstat(pf.fd)
    os.set_inheritable(pf.fd, False)
    add(pf.path, pf.fd)


def passed(path: str) -> bool:
    return bool(_passed.get(path))


def _peek(path: str) -> Optional[int]:
    fds = _passed.get(path)
    return fds[0] if fds else None


def open_fd(path: str, flags: int, mode: int = 0o600) -> int:
    """A descriptor of `path` for one use, opened with `flags` (O_CLOEXEC added) or passed.

    A passed descriptor whose access mode is narrower than `flags` asks for
    raises PermissionError, as opening the file would have.
    """
    fds = _passed.get(path)
    if fds:
        fd = fds[0]
        have = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        want = flags & os.O_ACCMODE
        if want != have and have != os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        fds.pop(0)
        return fd
    err = _failed.get(path)
    if err is not None:
        raise type(err)(err.errno, err.strerror, path)
    return os.open(path, flags | os.O_CLOEXEC, mode)


def stat(path: str) -> os.stat_result:
    fd = _peek(path)
    if fd is not None:
        return os.fstat(fd)
    err = _failed.get(path)
    if err is not None:
        raise type(err)(err.errno, err.strerror, path)
    return os.stat(path)


def exists(path: str) -> bool:
    try:
        stat(path)
    except OSError:
        return False
    return True


def read_head(path: str, n: int) -> bytes:
    """The first `n` bytes of `path` (fewer if it is shorter), without using up a passed descriptor."""
    fd = _peek(path)
    if fd is not None:
        return os.pread(fd, n, 0)
    with open(path, "rb") as f:
        return f.read(n)


def open_named(paths: Iterable[str], flags: int) -> None:
    """Open each path now (a standalone worker run as root, before its sandbox); an error is kept for its use."""
    for path in paths:
        try:
            add(path, os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY))
        except OSError as e:
            _failed.setdefault(path, e)


def received_fds(ancdata: Sequence[Tuple[int, int, bytes]]) -> List[int]:
    """The descriptors a message passed (SCM_RIGHTS), from recvmsg's ancillary data; the caller owns them."""
    import socket  # here: a boot never receives descriptors, and the module costs 1-2 ms to import

    fds: List[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(blob[:len(blob) - len(blob) % got.itemsize])
            fds.extend(got)
    return fds
