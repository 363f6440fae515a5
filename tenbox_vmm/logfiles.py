"""The worker's log files, bounded by size, rotated by copying between descriptors (worker).

tenboxd starts a worker with stdout and stderr on `<vm dir>/logs/runtime.log`
and rotates that file only then. A worker that runs for months, with a
guest that makes it log, would grow it without end; so a worker whose
stderr is that very file (same device and inode) rotates it itself once it
passes Limits.RUNTIME_LOG_MAX_BYTES: runtime.log.1 is copied into .2,
runtime.log into .1, and runtime.log is emptied, through descriptors
opened before the sandbox (tenboxd passes them: the sandboxed worker sees
no VM folder and may not rename in it). Writes that bypass logging (a
traceback, a C library's warning) land in the same file and are bounded by
the next record's check.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, List, Optional, Sequence

from tenbox_vmm import passed_files
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.sandbox import RUNTIME_LOG, rotated_log_names

COPY_CHUNK = 1 << 20


def write_all(fd: int, data: bytes, offset: int) -> int:
    """All of `data` at `offset` of the file open on `fd`; its length."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    return len(data)


def copy_file(src: int, dst: int) -> None:
    """Make the file open on `dst` a copy of the one open on `src` (positioned I/O: offsets stay)."""
    os.ftruncate(dst, 0)
    offset = 0
    while True:
        chunk = os.pread(src, COPY_CHUNK, offset)
        if not chunk:
            return
        offset += write_all(dst, chunk, offset)


def stderr_runtime_log(vm_dir: Optional[str], fd: int = 2) -> Optional[str]:
    """The path of `<vm_dir>/logs/runtime.log` if `fd` is that file (a worker of tenboxd), else None."""
    if not vm_dir:
        return None
    path = os.path.join(vm_dir, "logs", RUNTIME_LOG)
    try:
        a, b = passed_files.stat(path), os.fstat(fd)
    except OSError:
        return None
    return path if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None


class RuntimeLogHandler(logging.StreamHandler):
    """Log records to `stream`, whose file `path` is open on `fds`; rotated live past `max_bytes`.

    The size is the file's own (fstat), so writes that bypass logging count
    too. Opens `path` to read and its `keep` older copies (passed by tenboxd,
    or by name) when made: OSError then.
    """

    def __init__(self, path: str, stream: Optional[IO[str]] = None, fds: Sequence[int] = (1, 2),
                 max_bytes: int = Limits.RUNTIME_LOG_MAX_BYTES, keep: int = Limits.RUNTIME_LOG_KEEP) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.path = path
        self.fds = tuple(fds)
        self.max_bytes = max_bytes
        self.rotations = 0
        mode = os.fstat(self.fds[-1]).st_mode & 0o7777
        self._chain: List[int] = []  # path (read), then path.1 .. path.<keep>
        try:
            self._chain.append(passed_files.open_fd(path, os.O_RDONLY))
            for name in rotated_log_names(path, keep):
                self._chain.append(passed_files.open_fd(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode))
        except OSError:
            self.close()
            raise

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)  # under the handler's lock, as is what follows
        try:
            if os.fstat(self.fds[-1]).st_size > self.max_bytes:
                self._rotate()
        except OSError:
            pass  # a full or vanished disk must not stop the guest; the log stays as it is

    def _rotate(self) -> None:
        self.flush()
        for newer, older in reversed(list(zip(self._chain, self._chain[1:]))):
            copy_file(newer, older)
        os.ftruncate(self.fds[-1], 0)  # stdout and stderr append: the next write starts the file again
        self.rotations += 1

    def close(self) -> None:
        for fd in self._chain:
            os.close(fd)
        self._chain = []
        super().close()
