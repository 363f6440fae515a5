"""Open the files a request names, hand back the descriptors (tenboxd's child running as the caller, or its thread).

    python3 -m tenbox_supervisor.file_opener FD '[["PATH", WRITE], ...]'

tenboxd runs this under setpriv with the uid, gid and supplementary groups
of the user who asked (caller_files.py): whatever it manages to open, that
user could have opened. It opens each path (read only, or read-write when
WRITE), checks that it is a regular file, and sends one message on the unix
socket FD: a JSON list with, per path, null or the reason it failed, and
the descriptors of the files it opened, in order, as SCM_RIGHTS. The daemon
trusts the descriptors (the kernel checked them against this process's
credentials), never the paths. Standard library only: it starts in ~60 ms.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import stat
import sys
from typing import List, Optional, Sequence, Tuple

# Why a path could not be used, as the daemon turns it into an error.
MISSING = "missing"  # ENOENT, ENOTDIR: there is no such file (for this user)
DENIED = "denied"  # EACCES, EPERM: this user may not open it
NOT_REGULAR = "not_regular"  # a folder, a device, a FIFO, a socket
READ_ONLY_FS = "read_only_fs"  # EROFS: a writable disk on a read-only file system
OTHER = "other"  # anything else: "other: <strerror>"

# O_NONBLOCK: opening a FIFO or a tty must not wait; a regular file ignores the flag.
OPEN_FLAGS = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
REPLY_MAX_BYTES = 1 << 16


def open_one(path: str, write: bool) -> Tuple[Optional[int], Optional[str]]:
    """(descriptor, None) for a regular file opened with this process's rights, or (None, reason)."""
    try:
        fd = os.open(path, OPEN_FLAGS | (os.O_RDWR if write else os.O_RDONLY))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return None, MISSING
        if e.errno in (errno.EACCES, errno.EPERM):
            return None, DENIED
        if e.errno == errno.EROFS:
            return None, READ_ONLY_FS
        if e.errno == errno.EISDIR:
            return None, NOT_REGULAR
        return None, "%s: %s" % (OTHER, e.strerror)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as e:
        os.close(fd)
        return None, "%s: %s" % (OTHER, e.strerror)
    if not regular:
        os.close(fd)
        return None, NOT_REGULAR
    return fd, None


def open_all(uses: Sequence[Tuple[str, bool]]) -> Tuple[List[Optional[str]], List[int]]:
    """(per path: None or why it failed, the descriptors of the opened ones in order)."""
    reasons: List[Optional[str]] = []
    fds: List[int] = []
    for path, write in uses:
        fd, why = open_one(path, write)
        reasons.append(why)
        if fd is not None:
            fds.append(fd)
    return reasons, fds


def main(argv: Sequence[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    uses = [(str(p), bool(w)) for p, w in json.loads(argv[1])]
    reasons, fds = open_all(uses)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([json.dumps(reasons).encode()], ancillary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
