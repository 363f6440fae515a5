"""Disk image chores in a short-lived process: create, overlay, inspect, boot files (CLI or daemon, as a child).

tenboxd and the CLI run this module instead of importing the disk code:
parsing images operators hand over is untrusted input, and it stays out of
the long-lived root daemon. Output is one JSON object on stdout: the result,
or {"code", "message"} with exit status 2 (tenbox_vmm.protocol.imagetool);
the message is also one line on stderr, for people.

    python3 -m tenbox_vmm.imagetool create PATH --size 10G [--format qcow2|raw] [--backing FILE]
    python3 -m tenbox_vmm.imagetool overlay --backing TEMPLATE --out PATH
    python3 -m tenbox_vmm.imagetool info PATH
    python3 -m tenbox_vmm.imagetool resize PATH --size 20G|+5G [--format qcow2|raw]
    python3 -m tenbox_vmm.imagetool [--fd N:IMAGE] boot-files IMAGE --out DIR

boot-files (tenbox_vmm/bootfiles.py) answers {"kernel": "vmlinuz", "initrd":
"initrd.img" or null, "cmdline", "title", "table": "gpt"|"mbr"|"none",
"root_partition", "boot_partition", "fs_uuid", "config", "kernel_path",
"initrd_paths"} and leaves DIR/vmlinuz and DIR/initrd.img; on a refusal DIR
is left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import List, NoReturn, Optional

from tenbox_vmm.protocol.imagetool import (  # noqa: F401 - parse_size: the tool's grammar, imported from here too
    IMAGETOOL_FAILED_STATUS,
    ImageToolCode,
    error_answer,
    parse_new_size,
    parse_size,
)

PROG = "tenbox-image"


def _fail(code: ImageToolCode, message: str) -> int:
    sys.stdout.write(error_answer(code, message) + "\n")
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    return IMAGETOOL_FAILED_STATUS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SystemExit(_fail(ImageToolCode.USAGE, message))


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog=PROG, description="Create and inspect tenbox disk images.")
    p.add_argument("--fd", action="append", default=[], metavar="FD:PATH",
                   help="descriptor FD, inherited open, stands for file PATH (tenboxd passes an image so to a tool "
                   "run as a user who may not open it)")
    p.add_argument("--cwd-fd", type=int, metavar="FD", help="run in the folder open as descriptor FD (tenboxd gives "
                   "boot-files its output folder so, inside a data directory the tool's user cannot traverse)")
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("create", help="a new empty image")
    c.add_argument("path")
    c.add_argument("--size", required=True)
    c.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")
    c.add_argument("--backing", help="backing image (qcow2 only); the size defaults to its size")
    c.add_argument("--cluster-size", type=int, default=65536)
    o = sub.add_parser("overlay", help="a qcow2 overlay on a template, the template's size")
    o.add_argument("--backing", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--in-use", action="store_true",
                   help="the template is open in a running VM (locked): read its size and format from its header")
    i = sub.add_parser("info", help="format, size and backing chain as JSON")
    i.add_argument("path")
    r = sub.add_parser("resize", help="grow an image (never shrink): --size 20G or +5G")
    r.add_argument("path")
    r.add_argument("--size", required=True)
    r.add_argument("--format", choices=("qcow2", "raw"), help="the image's format (default: probed)")
    b = sub.add_parser("boot-files", help="extract a cloud image's default kernel and initrd into DIR",
                       description="Find the default boot entry (grub.cfg or BLS) of a distribution cloud image "
                       "(raw or qcow2, GPT, MBR or no table, ext2/3/4) and write its kernel and initrd into DIR "
                       "as vmlinuz and initrd.img; print the entry as JSON. Example: tenbox-image boot-files "
                       "debian-12-genericcloud-amd64.qcow2 --out /tmp/boot")
    b.add_argument("path")
    b.add_argument("--out", required=True, metavar="DIR", help="an existing folder without vmlinuz or initrd.img")
    args = p.parse_args(argv)
    if not args.cmd:
        p.error("a command is required: create, overlay, info, resize or boot-files")

    from tenbox_vmm import passed_files
    from tenbox_vmm.protocol.sandbox import PassedFile

    for text in args.fd:
        try:
            passed_files.add_arg(PassedFile.parse(text))
        except ValueError as e:
            p.error(str(e))
        except OSError as e:
            p.error("--fd %s: descriptor not open (%s)" % (text, e.strerror))

    if args.cwd_fd is not None:
        try:
            os.fchdir(args.cwd_fd)
            os.close(args.cwd_fd)
        except OSError as e:
            p.error("--cwd-fd %d: %s" % (args.cwd_fd, e.strerror))

    from tenbox_vmm.bootfiles import BootFilesError, extract_boot_files
    from tenbox_vmm.disk import DiskError, DiskPermissionError, create_qcow2, image_info

    try:
        if args.cmd == "boot-files":
            # SIGTERM unwinds like an error, so the work folder in DIR is removed (SIGKILL leaves it to the caller).
            signal.signal(signal.SIGTERM, _terminated)
            result = extract_boot_files(args.path, args.out)
        elif args.cmd == "info":
            result = image_info(args.path)
        elif args.cmd == "resize":
            result = _resize(args.path, args.size, args.format)
        elif args.cmd == "overlay":
            backing = os.path.abspath(args.backing)
            info = image_info(backing)
            _refuse_existing(args.out)
            create_qcow2(args.out, info["virtual_size"], backing=backing, backing_fmt=info["format"],
                         open_backing=not args.in_use)
            result = image_info(args.out)
        else:
            size = parse_size(args.size)
            _refuse_existing(args.path)
            if args.format == "raw":
                if args.backing:
                    raise DiskError("a raw image cannot have a backing file")
                with open(args.path, "xb") as f:
                    f.truncate(size)
            else:
                backing = os.path.abspath(args.backing) if args.backing else None
                fmt = image_info(backing)["format"] if backing else None
                create_qcow2(args.path, size, cluster_size=args.cluster_size, backing=backing, backing_fmt=fmt)
            result = image_info(args.path)
    except BootFilesError as e:
        return _fail(e.code, e.message)
    except DiskPermissionError as e:
        return _fail(ImageToolCode.DENIED, str(e))
    except (DiskError, ValueError) as e:
        return _fail(ImageToolCode.BAD_IMAGE, str(e))
    except OSError as e:
        return _fail(ImageToolCode.IO_ERROR, "%s%s" % (e.strerror or e, ": %s" % e.filename if e.filename else ""))
    json.dump(result, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def _resize(path: str, size_text: str, fmt: Optional[str]) -> dict:
    """Grow the image as the disk code opens it (its image lock taken: not while a VM or QEMU uses it)."""
    from tenbox_vmm.disk import image_info, open_disk

    with open_disk(path, read_only=False, fmt=fmt or image_info(path)["format"]) as disk:
        disk.grow(parse_new_size(size_text, disk.size))
    return image_info(path)


def _terminated(signum: int, frame: object) -> NoReturn:
    raise SystemExit(_fail(ImageToolCode.IO_ERROR, "terminated by signal %d" % signum))


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise ValueError("%s already exists; not overwriting it" % path)


if __name__ == "__main__":
    sys.exit(main())
