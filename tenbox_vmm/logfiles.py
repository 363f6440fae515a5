"""The worker's log files, bounded by size: numbered rotation, and runtime.log rotated live (worker).

tenboxd starts a worker with stdout and stderr on `<vm dir>/logs/runtime.log`
and rotates that file only then. A worker that runs for months, with a
guest that makes it log, would grow it without end; so a worker whose
stderr is that very file (same device and inode) rotates it itself once it
passes Limits.RUNTIME_LOG_MAX_BYTES: the file is renamed to runtime.log.1
(and .1 to .2), a new runtime.log with the same mode takes its place, and
is put on file descriptors 1 and 2, so every later write lands there,
including those that bypass logging (a traceback, a C library's warning).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Optional, Sequence

from tenbox_vmm.protocol import Limits

RUNTIME_LOG = "runtime.log"


def rotate_files(path: str, keep: int) -> None:
    """path -> path.1 -> ... -> path.<keep>; the oldest is overwritten."""
    for i in range(keep, 0, -1):
        src = path if i == 1 else "%s.%d" % (path, i - 1)
        if os.path.exists(src):
            os.replace(src, "%s.%d" % (path, i))


def stderr_runtime_log(vm_dir: Optional[str], fd: int = 2) -> Optional[str]:
    """The path of `<vm_dir>/logs/runtime.log` if `fd` is that file (a worker of tenboxd), else None."""
    if not vm_dir:
        return None
    path = os.path.join(vm_dir, "logs", RUNTIME_LOG)
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return None
    return path if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None


class RuntimeLogHandler(logging.StreamHandler):
    """Log records to `stream`, whose file `path` is open on `fds`; rotated live past `max_bytes`.

    The size is the file's own (fstat), so writes that bypass logging count
    too; they are bounded by the next record's check.
    """

    def __init__(self, path: str, stream: Optional[IO[str]] = None, fds: Sequence[int] = (1, 2),
                 max_bytes: int = Limits.RUNTIME_LOG_MAX_BYTES, keep: int = Limits.RUNTIME_LOG_KEEP) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.path = path
        self.fds = tuple(fds)
        self.max_bytes = max_bytes
        self.keep = keep
        self.rotations = 0

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)  # under the handler's lock, as is what follows
        try:
            if os.fstat(self.fds[-1]).st_size > self.max_bytes:
                self._rotate()
        except OSError:
            pass  # a full or vanished disk must not stop the guest; the log stays as it is

    def _rotate(self) -> None:
        self.flush()
        mode = os.fstat(self.fds[-1]).st_mode & 0o7777
        rotate_files(self.path, self.keep)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # as tenboxd made it, whatever the umask
            for target in self.fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)
        self.rotations += 1
