"""What tenboxd and a standby worker agree on: READY, the orders, the replies, GO (worker and daemon; pure).

A standby's stdin is a SOCK_SEQPACKET socket; tenboxd holds the other end.
The standby writes READY once its imports are done, then reads orders, one
message each: JSON {"argv": [...], "files": [PATH, ...]}, with the runtime
log, the worker's end of a GO socket and then one descriptor per path as
SCM_RIGHTS. `argv` is the worker's command line without its program and
without --fd; each passed descriptor becomes `--fd N:PATH` (PassedFile).

For each order the standby forks the VM's worker and replies with its pid
(encode_forked): a worker already re-parented to tenboxd, which holds it
until tenboxd has put it where its limits apply and sent GO on the GO
socket. A GO socket that ends without GO ends the worker, having run
nothing. A GO may pass cgroup files (GO_MAX_FDS at most): the worker, still
one thread, joins each by writing "0" to it, and answers JOINED, or
JOIN_FAILED and why, and then ends having run nothing.
tenbox_vmm/standby.py serves orders, tenbox_supervisor/standby.py sends
them.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

READY = b"R"
GO = b"G"
JOINED = b"J"
JOIN_FAILED = b"F"  # then one line: why
GO_MAX_FDS = 8  # cgroup files: one per hierarchy the worker joins (v2: one; v1: memory and pids)
GO_REPLY_MAX_BYTES = 512
FORKED = b"P"  # then the worker's pid in decimal
SPARE = b"S"  # then a spare's pid in decimal: a worker sandboxed ahead of its order
FORKED_MAX_BYTES = 16  # FORKED's, SPARE's and READY
ORDER_MAX_BYTES = 1 << 20
# Descriptors in one order: the runtime log, the GO socket and the VM's files. Linux passes at
# most 253 (SCM_MAX_FD) in one message; tenboxd starts a VM with more files cold.
ORDER_MAX_FDS = 250
ORDER_FIXED_FDS = 2  # the runtime log and the GO socket, before the files


class OrderError(ValueError):
    """Not an order a standby runs; the message says why in one line."""


def encode_order(argv: Sequence[str], paths: Sequence[str]) -> bytes:
    """The order's payload; OrderError if it would be refused (too long, too many files)."""
    if len(paths) + ORDER_FIXED_FDS > ORDER_MAX_FDS:
        raise OrderError("%d files are more than one order passes" % len(paths))
    payload = json.dumps({"argv": list(argv), "files": list(paths)}).encode()
    if len(payload) > ORDER_MAX_BYTES:
        raise OrderError("the command line is longer than one order")
    return payload


def parse_order(data: bytes, fds: Sequence[int]) -> Tuple[int, int, List[str]]:
    """The runtime log's and the GO socket's descriptors and the worker's command line of an order;
    OrderError if it is not one."""
    try:
        order = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise OrderError("the order is not JSON") from None
    argv, paths = (order.get("argv"), order.get("files")) if isinstance(order, dict) else (None, None)
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)
            and isinstance(paths, list) and all(isinstance(p, str) and p.startswith("/") for p in paths)):
        raise OrderError("the order has no command line or file list")
    if "--standby" in argv or any(a == "--fd" or a.startswith("--fd=") for a in argv):
        raise OrderError("the order's command line has --standby or --fd")
    if len(fds) < ORDER_FIXED_FDS:
        raise OrderError("the order passes no runtime log and GO socket")
    if len(fds) != len(paths) + ORDER_FIXED_FDS:
        raise OrderError("the order names %d files and passes %d descriptors for them"
                         % (len(paths), len(fds) - ORDER_FIXED_FDS))
    files = fds[ORDER_FIXED_FDS:]
    return fds[0], fds[1], argv + ["--fd=%d:%s" % (fd, path) for fd, path in zip(files, paths)]


def encode_forked(pid: int) -> bytes:
    return FORKED + b"%d" % pid


def encode_spare(pid: int) -> bytes:
    return SPARE + b"%d" % pid


def parse_forked(data: bytes) -> int:
    """The worker's pid of a standby's reply; OrderError if the reply is not one."""
    return _parse_pid(FORKED, data, "reply is not a worker's pid")


def parse_spare(data: bytes) -> int:
    """The spare's pid of a standby's SPARE message; OrderError if it is not one."""
    return _parse_pid(SPARE, data, "message is not a spare's pid")


def _parse_pid(kind: bytes, data: bytes, what: str) -> int:
    digits = data[len(kind):]
    if not data.startswith(kind) or not digits.isdigit() or len(data) > FORKED_MAX_BYTES or int(digits) < 2:
        raise OrderError("the standby's %s: %r" % (what, data[:FORKED_MAX_BYTES]))
    return int(digits)


def order_link(argv: Sequence[str]) -> Tuple[Optional[str], bool]:
    """The worker link an order's command line names (None for none), and whether a spare sandboxed ahead
    for that link can run it: not with --snapshot-out (its renames need a filter of its own), nor with an
    option spelled otherwise than tenboxd spells them."""
    link, fits = None, True
    for i, arg in enumerate(argv):
        if arg == "--link" and i + 1 < len(argv):
            link = argv[i + 1]
        elif arg.startswith("--link="):
            link = arg[len("--link="):]
        elif arg.startswith("--snapshot-out") or (arg.startswith("--li") and arg != "--link"):
            fits = False
    return link, fits
