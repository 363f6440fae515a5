#!/usr/bin/python3
"""Pack a directory tree into a newc ("070701") cpio archive, without root.

    mkcpio.py --root DIR [--dev PATH:TYPE:MAJOR:MINOR[:MODE]]... [--gzip] -o OUT

The archive is what the Linux kernel unpacks as an initramfs. Everything a
normal user cannot create on disk is described on the command line instead:
device nodes come from --dev (e.g. --dev /dev/console:c:5:1), and every
entry is owned by root (uid 0, gid 0), so no mknod and no root are needed.

The output is deterministic: entries are sorted by path, every mtime is
--mtime (default 0), inode numbers are assigned in order, modes are
normalised (0755 for directories and executables, 0644 for other files,
0777 for symlinks), and the gzip header carries no name and no time. The
same tree and arguments always give the same bytes.

Regular files, directories and symlinks are packed; hard links are stored
as independent copies; other file types (sockets, fifos, device files on
disk) are refused. Parent directories of --dev nodes are added when the
tree does not have them.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import stat
import sys
from typing import BinaryIO, Dict, List, Optional, Tuple

MAGIC = b"070701"
TRAILER = "TRAILER!!!"

# (mode, data, rdevmajor, rdevminor) per archive path (no leading "/").
Entry = Tuple[int, bytes, int, int]


class CpioError(Exception):
    pass


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _norm_path(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise CpioError("bad archive path %r" % path)
    return "/".join(parts)


def _file_mode(st_mode: int) -> int:
    if stat.S_ISDIR(st_mode):
        return stat.S_IFDIR | 0o755
    if stat.S_ISLNK(st_mode):
        return stat.S_IFLNK | 0o777
    if stat.S_ISREG(st_mode):
        return stat.S_IFREG | (0o755 if st_mode & 0o111 else 0o644)
    raise CpioError("unsupported file type (mode %o)" % st_mode)


def scan_tree(root: str) -> Dict[str, Entry]:
    """Every file, directory and symlink under root, keyed by archive path."""
    if not os.path.isdir(root):
        raise CpioError("not a directory: %s" % root)
    entries: Dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = _norm_path(os.path.relpath(full, root).replace(os.sep, "/"))
            st = os.lstat(full)
            try:
                mode = _file_mode(st.st_mode)
            except CpioError as e:
                raise CpioError("%s: %s" % (full, e)) from None
            if stat.S_ISLNK(mode):
                data = os.fsencode(os.readlink(full))
            elif stat.S_ISREG(mode):
                with open(full, "rb") as f:
                    data = f.read()
            else:
                data = b""
            entries[rel] = (mode, data, 0, 0)
    return entries


def parse_dev(spec: str) -> Tuple[str, Entry]:
    """PATH:TYPE:MAJOR:MINOR[:MODE], TYPE c or b, MODE octal (default 600)."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or parts[1] not in ("c", "b"):
        raise CpioError("bad --dev %r (want PATH:c|b:MAJOR:MINOR[:MODE])" % spec)
    try:
        major, minor = int(parts[2]), int(parts[3])
        perm = int(parts[4], 8) if len(parts) == 5 else 0o600
    except ValueError:
        raise CpioError("bad --dev %r (numbers expected)" % spec) from None
    if not (0 <= major < 4096 and 0 <= minor < 1 << 20 and 0 <= perm <= 0o7777):
        raise CpioError("bad --dev %r (out of range)" % spec)
    kind = stat.S_IFCHR if parts[1] == "c" else stat.S_IFBLK
    return _norm_path(parts[0]), (kind | perm, b"", major, minor)


def add_parents(entries: Dict[str, Entry]) -> None:
    for path in list(entries):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            cur = entries.get(parent)
            if cur is None:
                entries[parent] = (stat.S_IFDIR | 0o755, b"", 0, 0)
            elif not stat.S_ISDIR(cur[0]):
                raise CpioError("%s is needed as a directory but is not one" % parent)


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int,
            rmajor: int, rminor: int, namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rmajor, rminor, namesize, 0)
    return MAGIC + b"".join(b"%08X" % v for v in fields)


def write_cpio(out: BinaryIO, entries: Dict[str, Entry], mtime: int = 0) -> int:
    """Write entries (sorted) plus the trailer; returns the bytes written."""
    written = 0

    def emit(ino: int, name: str, mode: int, data: bytes, rmajor: int, rminor: int) -> None:
        nonlocal written
        bname = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        head = _header(ino, mode, nlink, mtime, len(data), rmajor, rminor, len(bname)) + bname
        chunk = head + _pad4(len(head)) + data + _pad4(len(data))
        out.write(chunk)
        written += len(chunk)

    for ino, path in enumerate(sorted(entries), start=1):
        mode, data, rmajor, rminor = entries[path]
        emit(ino, path, mode, data, rmajor, rminor)
    emit(0, TRAILER, 0, b"", 0, 0)
    tail = (512 - written % 512) % 512  # conventional block padding
    out.write(b"\0" * tail)
    return written + tail


def build(root: Optional[str], devs: List[str], mtime: int = 0) -> bytes:
    entries: Dict[str, Entry] = scan_tree(root) if root else {}
    for spec in devs:
        path, entry = parse_dev(spec)
        if path in entries:
            raise CpioError("--dev %s: the tree already has that path" % path)
        entries[path] = entry
    add_parents(entries)
    buf = io.BytesIO()
    write_cpio(buf, entries, mtime)
    return buf.getvalue()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="mkcpio.py",
        description="Pack a directory tree into a deterministic newc cpio (an initramfs), no root needed.")
    p.add_argument("--root", metavar="DIR", help="directory whose contents become the archive's /")
    p.add_argument("--dev", action="append", default=[], metavar="PATH:TYPE:MAJOR:MINOR[:MODE]",
                   help="add a device node, TYPE c or b, MODE octal (default 600); repeatable, "
                        "e.g. --dev /dev/console:c:5:1 --dev /dev/null:c:1:3:666")
    p.add_argument("--mtime", type=int, default=0, help="mtime of every entry (default 0)")
    p.add_argument("--gzip", action="store_true", help="gzip the archive (no name, no time in the header)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output file ('-' for stdout)")
    args = p.parse_args(argv)
    if not args.root and not args.dev:
        p.error("nothing to pack: give --root and/or --dev")
    try:
        data = build(args.root, args.dev, args.mtime)
    except (CpioError, OSError) as e:
        sys.stderr.write("mkcpio.py: error: %s\n" % e)
        return 1
    if args.gzip:
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    if args.output == "-":
        sys.stdout.buffer.write(data)
        return 0
    tmp = args.output + ".tmp.%d" % os.getpid()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.output)
    except OSError as e:
        sys.stderr.write("mkcpio.py: error: %s\n" % e)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
