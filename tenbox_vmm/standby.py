"""A zygote: interpreter up, modules imported, forking one VM's worker per order (worker side, root until then).

tenboxd keeps a few `tenbox-vm-runtime --standby` processes ready
(tenbox_supervisor/standby.py), so that a `vm.start`, a restore or a clone
does not pay for Python's start and tenbox's imports. A standby's stdin is
one end of a SOCK_SEQPACKET socket pair whose other end tenboxd holds.
The standby imports what a worker imports, freezes its objects out of the
garbage collector's reach (so that its children's collections do not
write to the pages they share with it), says READY and serves orders
(tenbox_vmm/protocol/standby.py): the command line a cold worker of that
VM would get, without --fd, and the VM's files as descriptors, after the
runtime log and the GO socket.

Each order forks twice: the middle process ends at once, so the worker is
re-parented to tenboxd (its child subreaper) and tenboxd reads its exit
status as a cold worker's. The standby replies with the worker's pid. The
worker starts a session of its own, waits for GO (tenboxd has put it in
its VM's cgroup or scope by then), and runs `main()` on the order's
command line, exactly as a worker started cold, sandbox and all. The
workers share the standby's pages until they write them.

With `--link ENDPOINT`, the standby keeps a spare: a worker forked ahead
of its order, which enters its sandbox at once (`sandbox.enter_ahead`: the
jail with that link's folder, the worker user, the seccomp filter) and
waits for an order on a socket pair of its own. An order for that link is
passed on to the spare, whose pid is the reply; its `main()` then only
lowers its memory rlimit to the machine's (`sandbox.narrow`), and the
sandbox and the fork leave a restore's path. The standby forks the next
spare once it has replied. Orders a spare cannot run (another link,
--snapshot-out) and orders that come before the spare is ready (within
SPARE_WAIT_SEC) fork a worker as above. A spare that cannot enter its
sandbox says why in one line and ends; the standby makes no other.

A standby whose socket ends (tenboxd stopped, or closed it) exits 0, and
its spare with it. A bad order ends it with one line and exit 2 (tenboxd
never sends one). Nothing of a VM stays in a standby after its fork.
"""

from __future__ import annotations

import array
import gc
import importlib
import os
import select
import socket
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from tenbox_vmm import passed_files
from tenbox_vmm.protocol import ExitCode
from tenbox_vmm.protocol.standby import (GO, GO_MAX_FDS, GO_REPLY_MAX_BYTES, JOIN_FAILED, JOINED, ORDER_MAX_BYTES,
                                         ORDER_MAX_FDS, READY, OrderError, encode_forked, encode_spare, order_link,
                                         parse_order)
from tenbox_vmm.sandbox import libc

GO_WAIT_SEC = 60.0  # a forked worker that tenboxd never lets go ends having run nothing
# How long an order waits for a spare still entering its sandbox (a few milliseconds of work) before
# the standby forks a worker for it instead.
SPARE_WAIT_SEC = 0.05

# What a worker imports between main() and its guest's first instruction (python3 -X importtime).
PRELOAD = (
    "zmq", "zmq.utils.monitor", "msgpack",
    "tenbox_vmm.machine", "tenbox_vmm.console", "tenbox_vmm.logfiles", "tenbox_vmm.passed_files",
    "tenbox_vmm.sandbox", "tenbox_vmm.supervisor_link", "tenbox_vmm.guest_log", "tenbox_vmm.usernet",
    "tenbox_vmm.disk", "tenbox_vmm.devices.virtio.blk", "tenbox_vmm.devices.virtio.net",
    "tenbox_vmm.net.libslirp", "tenbox_vmm.snapshot.fileformat", "tenbox_vmm.snapshot.machine_state",
)


def preload() -> None:
    """Import what a worker will need, load libslirp (a failure is kept and reported by the VM that needs it),
    and build and drop a VM and a network card once (machine.warm_up, usernet.warm_up)."""
    for name in PRELOAD:
        importlib.import_module(name)
    try:
        importlib.import_module("seccomp")  # the sandbox's; missing, the VM that needs it says so
    except ImportError:
        pass
    from tenbox_vmm.net.libslirp import SlirpUnavailable, open_library

    try:
        open_library()
    except SlirpUnavailable:
        pass
    from tenbox_vmm import usernet
    from tenbox_vmm.machine import warm_up

    warm_up()
    usernet.warm_up()


def offer_to_ksm(maps: str = "/proc/self/maps") -> int:
    """Mark this process's private writable mappings mergeable (madvise MADV_MERGEABLE); the KiB marked.

    A worker inherits the marks on the standby's mappings, not on its own later ones: the pages its
    interpreter copies from the standby's as it runs (reference counts, code objects' counters) are
    offered to KSM, its guest's RAM and buffers are not. Nothing happens unless the host runs KSM
    (/sys/kernel/mm/ksm/run, the operator's choice; docs/daemon.md). A kernel without KSM refuses each
    mapping, which is not an error.
    """
    with open(maps) as f:
        ranges = [[int(x, 16) for x in line.split(None, 1)[0].split("-")] for line in f if " rw-p " in line]
    marked = 0
    for lo, hi in ranges:
        try:
            libc.madvise(lo, hi - lo, libc.MADV_MERGEABLE)
        except OSError:
            continue
        marked += (hi - lo) // 1024
    return marked


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


class _Spare:
    """A worker forked ahead of its order (tenboxd's child), and the standby's end of its socket."""

    def __init__(self, pid: int, sock: socket.socket, link: Optional[str]) -> None:
        self.pid = pid
        self.sock = sock
        self.link = link
        self.ready = False

    def take(self, argv: Sequence[str], data: bytes, fds: Sequence[int]) -> Optional[bool]:
        """Pass the order (`argv` parsed from `data`) on if it fits this spare: True if passed, False if not
        (the spare stays for the next), None if the spare has ended (it said why)."""
        link, fits = order_link(argv)
        if not fits or link != self.link:
            return False
        if not self.ready:
            if not select.select([self.sock], [], [], SPARE_WAIT_SEC)[0]:
                return False  # still entering its sandbox: this order forks, the next finds it
            try:
                said = self.sock.recv(len(READY))
            except OSError:
                said = b""
            if said != READY:
                return None
            self.ready = True
        try:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError:
            return None
        return True


def serve(main: Callable[[Optional[List[str]]], int], sock_fd: int = 0, link: Optional[str] = None,
          enter_ahead: Optional[Callable[[Optional[str]], str]] = None) -> int:
    """Serve orders on `sock_fd` (stdin) until it ends: 0. In each forked worker, that VM's main()'s exit status.

    With `enter_ahead` (the worker's steps before and into its sandbox, for `link`), keep a spare.
    """
    sock = socket.socket(fileno=sock_fd)
    preload()
    gc.collect()
    gc.freeze()  # the workers' collections leave the shared objects' pages unwritten
    offer_to_ksm()
    spare: Optional[_Spare] = None
    said_ready = False
    while True:
        # The next spare, unless an order already waits (a burst of starts): that order is served
        # first, by a fork, rather than after the spare's fork.
        if enter_ahead is not None and spare is None and not (said_ready and _waiting(sock)):
            try:
                pid, theirs = _fork_spare()
            except OSError as e:
                sys.stderr.write("tenbox-vm-runtime: warning: standby: cannot fork a spare worker: %s\n"
                                 % (e.strerror or e))
                enter_ahead = None
            else:
                if pid == 0:  # this process is the spare now
                    sock.detach()  # fd 0, replaced by /dev/null
                    return _run_spare(main, enter_ahead, link, theirs)
                spare = _Spare(pid, theirs, link)
                sock.sendall(encode_spare(pid))
        if not said_ready:
            sock.sendall(READY)
            said_ready = True
        try:
            data, fds = receive(sock)
        except ConnectionResetError:
            return 0  # tenboxd let it go without reading its READY: the same as an end
        except (OSError, OrderError) as e:
            return _refuse(getattr(e, "strerror", None) or e)
        if not data:
            return 0  # tenboxd let this standby go
        try:
            log_fd, go_fd, argv = parse_order(data, fds)
        except OrderError as e:
            _close(fds)
            return _refuse(e)
        taken = spare.take(argv, data, fds) if spare is not None else False
        if taken is None:  # the spare ended, having said why: the next would fail the same way
            spare.sock.close()
            spare, enter_ahead = None, None
        elif taken:
            spare.sock.close()
            _close(fds)
            sock.sendall(encode_forked(spare.pid))
            spare = None
            continue
        try:
            worker = _fork()
        except OSError as e:
            _close(fds)
            return _refuse("cannot fork a worker: %s" % (e.strerror or e))
        if worker == 0:  # this process is the VM's worker now
            sock.detach()  # fd 0, replaced by /dev/null below
            if spare is not None:
                spare.sock.close()
            return _run(main, log_fd, go_fd, argv)
        _close(fds)
        sock.sendall(encode_forked(worker))


def _waiting(sock: socket.socket) -> bool:
    """Whether the socket has something to read now (an order, or its end)."""
    return bool(select.select([sock], [], [], 0)[0])


def _fork_spare() -> Tuple[int, socket.socket]:
    """Fork a spare (as _fork): its pid and the standby's end of its socket in the standby, 0 and the
    spare's end in the spare; OSError if it could not be forked."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = _fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        ours.close()
        return 0, theirs
    theirs.close()
    return pid, ours


def _run_spare(main: Callable[[Optional[List[str]]], int], enter_ahead: Callable[[Optional[str]], str],
               link: Optional[str], sock: socket.socket) -> int:
    """The spare: its own session, its sandbox entered, then its order awaited and run as a forked worker's.
    An end of the standby's socket before the order ends it having run nothing."""
    os.setsid()
    _empty_stdin()  # before its sandbox: /dev/null is opened by path
    from tenbox_vmm.sandbox import SandboxError

    try:
        enter_ahead(link)
    except SandboxError as e:
        sys.stderr.write("tenbox-vm-runtime: error: standby: a spare worker cannot enter its sandbox: %s\n" % e)
        return ExitCode.SANDBOX
    try:
        sock.sendall(READY)
        data, fds = receive(sock)
        if not data:
            return 0  # its standby ended
        log_fd, go_fd, argv = parse_order(data, fds)
    except (OSError, OrderError):
        return 0  # the standby checked the order: only an ended standby gets here
    finally:
        sock.close()
    return _run(main, log_fd, go_fd, argv, spare=True)


def _fork() -> int:
    """The worker's pid in the standby, 0 in the worker; OSError if it could not be forked.

    The middle process forks the worker and ends at once, so the worker is
    re-parented to tenboxd (PR_SET_CHILD_SUBREAPER) before its pid is sent.
    """
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle process never returns to the standby's loop
        try:
            os.close(r)
            worker = os.fork()
        except BaseException:
            os._exit(1)
        if worker == 0:
            os.close(w)
            return 0
        try:
            os.write(w, b"%d" % worker)
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 32)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    if not got.isdigit():
        raise OSError(0, "the middle process could not fork")
    return int(got)


def _run(main: Callable[[Optional[List[str]]], int], log_fd: int, go_fd: int, argv: List[str],
         spare: bool = False) -> int:
    """The forked worker: its own session, GO awaited, the log as stdout and stderr, then main().
    A spare has its session and its stdin already, and is in its sandbox."""
    if not spare:
        os.setsid()
    go = socket.socket(fileno=go_fd)
    go.settimeout(GO_WAIT_SEC)
    try:
        let_go = _await_go(go)
    finally:
        go.close()
    if not let_go:
        os.close(log_fd)
        return 0  # tenboxd could not place it: it runs nothing
    if not spare:
        _empty_stdin()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return main(argv)  # the standby's objects stay frozen: a collection here never writes their pages


def _empty_stdin() -> None:
    """The worker's stdin is empty, as a cold worker's (/dev/null)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _await_go(go: socket.socket) -> bool:
    """Whether tenboxd lets this worker go. A GO that passes cgroup files is answered once the worker
    has joined them itself (False if it could not: it runs nothing).

    The worker is one thread here, so each write of "0" moves the whole process: by cgroup v1's
    `tasks` the kernel then skips the lock a move of a process by its pid takes (an RCU grace
    period, 5-25 ms per move on the development host; tenboxd's own write paid it).
    """
    space = socket.CMSG_SPACE(GO_MAX_FDS * array.array("i").itemsize)
    try:
        data, ancdata, flags, _ = go.recvmsg(len(GO), space, socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return False
    fds = passed_files.received_fds(ancdata)
    if data != GO or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close(fds)
        return False
    if not fds:
        return True
    why = None
    for fd in fds:
        if why is None:
            try:
                os.write(fd, b"0")
            except OSError as e:
                why = "cannot join its cgroup: %s" % (e.strerror or e)
        os.close(fd)
    try:
        go.sendall(JOINED if why is None else (JOIN_FAILED + why.encode())[:GO_REPLY_MAX_BYTES])
    except OSError:
        return False
    return why is None


def _refuse(why: object) -> int:
    sys.stderr.write("tenbox-vm-runtime: error: standby: %s\n" % why)
    return ExitCode.USAGE


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
