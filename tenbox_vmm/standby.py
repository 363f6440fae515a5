"""A worker started ahead of need: interpreter up, modules imported, waiting for its VM (worker, root until then).

tenboxd keeps a few `tenbox-vm-runtime --standby` processes ready
(tenbox_supervisor/standby.py), so that a `vm.start` does not pay for
Python's start and tenbox's imports. A standby's stdin is one end of a
SOCK_SEQPACKET socket pair whose other end tenboxd holds. The standby
imports what a worker imports, says READY, and waits for one message: the
order (tenbox_vmm/protocol/standby.py): the command line a cold worker
of that VM would get, without --fd, and the VM's files as descriptors,
after the runtime log that becomes its stdout and stderr. The standby then
runs `main()` on that command line, exactly as a worker started cold,
sandbox and all.

A standby whose socket ends (tenboxd stopped, or closed it) exits 0
without having done anything. Nothing of a VM reaches a standby before its
order, and a standby serves one VM only.
"""

from __future__ import annotations

import array
import importlib
import os
import socket
import sys
from typing import Callable, List, Optional, Tuple

from tenbox_vmm import passed_files
from tenbox_vmm.protocol import ExitCode
from tenbox_vmm.protocol.standby import ORDER_MAX_BYTES, ORDER_MAX_FDS, READY, OrderError, parse_order

# What a worker imports between main() and its guest's first instruction (python3 -X importtime).
PRELOAD = (
    "zmq", "zmq.utils.monitor", "msgpack",
    "tenbox_vmm.machine", "tenbox_vmm.console", "tenbox_vmm.logfiles", "tenbox_vmm.passed_files",
    "tenbox_vmm.sandbox", "tenbox_vmm.supervisor_link", "tenbox_vmm.guest_log", "tenbox_vmm.usernet",
    "tenbox_vmm.disk", "tenbox_vmm.devices.virtio.blk", "tenbox_vmm.devices.virtio.net",
    "tenbox_vmm.net.libslirp", "tenbox_vmm.snapshot.fileformat", "tenbox_vmm.snapshot.machine_state",
)


def preload() -> None:
    """Import what a worker will need, and load libslirp (a failure is kept and reported by the VM that needs it)."""
    for name in PRELOAD:
        importlib.import_module(name)
    from tenbox_vmm.net.libslirp import SlirpUnavailable, open_library

    try:
        open_library()
    except SlirpUnavailable:
        pass


def receive(sock: socket.socket) -> Tuple[bytes, List[int]]:
    """One message and its descriptors (close-on-exec); b"" when tenboxd's end is closed."""
    space = socket.CMSG_SPACE(ORDER_MAX_FDS * array.array("i").itemsize)
    data, ancdata, flags, _ = sock.recvmsg(ORDER_MAX_BYTES, space, socket.MSG_CMSG_CLOEXEC)
    fds = passed_files.received_fds(ancdata)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OrderError("the order is larger than %d bytes or %d descriptors" % (ORDER_MAX_BYTES, ORDER_MAX_FDS))
    return data, fds


def serve(main: Callable[[Optional[List[str]]], int], sock_fd: int = 0) -> int:
    """Wait for the order on `sock_fd` (stdin), then become that VM's worker: main()'s exit status."""
    sock = socket.socket(fileno=sock_fd)
    preload()
    sock.sendall(READY)
    try:
        data, fds = receive(sock)
    except ConnectionResetError:
        return 0  # tenboxd let it go without reading its READY: the same as an end
    except (OSError, OrderError) as e:
        sys.stderr.write("tenbox-vm-runtime: error: standby: %s\n" % (getattr(e, "strerror", None) or e))
        return ExitCode.USAGE
    if not data:
        return 0  # tenboxd let this standby go
    try:
        log_fd, argv = parse_order(data, fds)
    except OrderError as e:
        sys.stderr.write("tenbox-vm-runtime: error: standby: %s\n" % e)
        return ExitCode.USAGE
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the socket goes: the worker's stdin is empty, as a cold worker's
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sock.detach()  # fd 0 is /dev/null now
    return main(argv)
