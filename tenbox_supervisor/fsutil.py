"""Crash-safe file writes (daemon, root): temp file, fsync, rename, fsync the folder."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, List, Pattern


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file, never a mix."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def entry_folders(parent: str, name_re: Pattern[str], log: logging.Logger) -> List[str]:
    """The names of `parent`'s sub-folders that match name_re, sorted (a store's entries).

    A parent that cannot be listed is logged and reads as empty: the caller
    reports no entries rather than failing its whole request.
    """
    try:
        names = sorted(os.listdir(parent))
    except OSError as e:
        log.error("cannot list %s: %s", parent, e.strerror)
        return []
    return [n for n in names if name_re.match(n) and os.path.isdir(os.path.join(parent, n))]


def atomic_write_json(path: str, value: Any, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode)


def log_files(vm_dir: str, source: str) -> list:
    """A VM log's files, oldest first: the two the worker rotated out, then the live one."""
    base = os.path.join(vm_dir, "logs", "%s.log" % source)
    return ["%s.2" % base, "%s.1" % base, base]


def tail_lines(paths, limit: int, chunk: int = 64 << 10) -> list:
    """The last `limit` lines across `paths` (oldest file first), reading from the end."""
    lines: list = []
    for path in reversed(list(paths)):
        if len(lines) >= limit:
            break
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                pos = f.tell()
                buf = b""
                while pos > 0 and buf.count(b"\n") <= limit - len(lines):
                    step = min(chunk, pos)
                    pos -= step
                    f.seek(pos)
                    buf = f.read(step) + buf
        except OSError:
            continue
        text = buf.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
        file_lines = text.split("\n")
        if file_lines and file_lines[-1] == "":
            file_lines.pop()
        if pos > 0 and file_lines:
            file_lines = file_lines[1:]  # the first line may be cut
        lines = file_lines + lines
    return lines[-limit:] if limit else []
