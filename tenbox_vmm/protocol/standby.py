"""What tenboxd and a standby worker agree on: READY, and the order that gives it its VM (worker and daemon; pure).

A standby's stdin is a SOCK_SEQPACKET socket; tenboxd holds the other end.
The standby writes READY once its imports are done, then reads one
message, the order: JSON {"argv": [...], "files": [PATH, ...]}, with the
runtime log and then one descriptor per path as SCM_RIGHTS. `argv` is the
worker's command line without its program and without --fd; each passed
descriptor becomes `--fd N:PATH` (PassedFile). tenbox_vmm/standby.py runs
an order, tenbox_supervisor/standby.py sends one.
"""

from __future__ import annotations

import json
from typing import List, Sequence, Tuple

READY = b"R"
ORDER_MAX_BYTES = 1 << 20
# Descriptors in one order: the runtime log and the VM's files. Linux passes at most 253
# (SCM_MAX_FD) in one message; tenboxd starts a VM with more files cold.
ORDER_MAX_FDS = 250


class OrderError(ValueError):
    """Not an order a standby runs; the message says why in one line."""


def encode_order(argv: Sequence[str], paths: Sequence[str]) -> bytes:
    """The order's payload; OrderError if it would be refused (too long, too many files)."""
    if len(paths) + 1 > ORDER_MAX_FDS:
        raise OrderError("%d files are more than one order passes" % len(paths))
    payload = json.dumps({"argv": list(argv), "files": list(paths)}).encode()
    if len(payload) > ORDER_MAX_BYTES:
        raise OrderError("the command line is longer than one order")
    return payload


def parse_order(data: bytes, fds: Sequence[int]) -> Tuple[int, List[str]]:
    """The runtime log's descriptor and the worker's command line of an order; OrderError if it is not one."""
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
    if not fds:
        raise OrderError("the order passes no runtime log")
    if len(fds) != len(paths) + 1:
        raise OrderError("the order names %d files and passes %d descriptors for them" % (len(paths), len(fds) - 1))
    return fds[0], argv + ["--fd=%d:%s" % (fd, path) for fd, path in zip(fds[1:], paths)]
