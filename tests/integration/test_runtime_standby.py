"""`tenbox-vm-runtime --standby` on its own: its orders over a real SOCK_SEQPACKET pair, good and bad.

A standby (tenbox_vmm/standby.py) says READY after its imports, then forks
a worker per order and replies with its pid. The worker runs nothing until
GO comes on its GO socket, then runs the VM its order names, with the
order's runtime log as stdout and stderr and the passed descriptors as its
--fd files; a GO socket that ends without GO ends it having run nothing. A
GO that passes cgroup files is answered once the worker has joined them
itself, or with why not (and it runs nothing). A
closed socket ends the standby with 0; a bad order ends it with one line
and exit 2, having run nothing.

With --link, the standby keeps a spare: a worker forked and sandboxed
before its order (the worker user, its own mount namespace, the seccomp
filter), named to tenboxd (SPARE) before READY. An order for that link
goes to the spare, which joins its cgroup as the worker user with the
files GO passes, takes its memory rlimit from the order and runs the VM;
the standby then names the next spare. An order for another link forks a
worker as before and leaves the spare waiting.
"""

import array
import json
import os
import resource
import socket
import signal
import subprocess
import time

import psutil
import pytest
import zmq

from tenbox_supervisor.cgroups import Cgroups, ResourceLimits, pid_paths
from tenbox_supervisor.standby import StandbyRefused, send_go
from tenbox_vmm.protocol import ExitCode
from tenbox_vmm.protocol.link import Hello, StateReport, WorkerExit, decode
from tenbox_vmm.protocol.sandbox import worker_data_max, worker_user
from tenbox_vmm.protocol.standby import GO, ORDER_MAX_BYTES, ORDER_MAX_FDS, READY, parse_forked, parse_spare
from tests.framework.guests import guest_path
from tests.framework.process import gone
from tests.framework.repo import repo_env
from tests.framework.runtime import runtime_argv

pytestmark = pytest.mark.usefixtures("kvm", "guests")

EXIT_SEC = 60.0


class Standby:
    def __init__(self, *extra: str) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(runtime_argv("--standby", *extra), stdin=theirs, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=repo_env())
        theirs.close()

    def ready(self) -> bytes:
        self.ours.settimeout(EXIT_SEC)
        return self.ours.recv(16)

    def order(self, payload: bytes, fds) -> None:
        self.ours.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])

    def fork(self, argv, log_path, files=None):
        """A worker forked for `argv` with the log and `files` ({path: fd}) passed: its pid and our GO end."""
        go, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        files = files or {}
        self.order(order_json(argv, list(files)), [log_fd, theirs.fileno()] + list(files.values()))
        os.close(log_fd)
        theirs.close()
        return parse_forked(self.ours.recv(64)), go

    def finish(self):
        self.ours.close()
        out, err = self.proc.communicate(timeout=EXIT_SEC)
        return self.proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def order_json(argv, files) -> bytes:
    return json.dumps({"argv": argv, "files": files}).encode()


def test_each_order_forks_a_worker_that_runs_its_vm_once_let_go_and_the_standby_serves_on(tmp_path):
    sb = Standby()
    assert sb.ready() == READY
    workers = []
    for n in range(2):
        log = tmp_path / ("runtime-%d.log" % n)
        kernel_fd = os.open(guest_path("poweroff"), os.O_RDONLY)
        # The path is one the worker could not open itself: only the passed descriptor makes it work.
        pid, go = sb.fork(["--kernel", "/nonexistent/poweroff.bzImage", "--memory", "32", "--console", "stdio"],
                          log, {"/nonexistent/poweroff.bzImage": kernel_fd})
        os.close(kernel_fd)
        worker = psutil.Process(pid)
        assert pid != sb.proc.pid and worker.ppid() != sb.proc.pid, "the middle process has ended"
        assert not gone(pid, 0.5) and log.read_text() == "", "it runs nothing before GO"
        assert os.getsid(pid) == pid, "a session of its own"
        go.sendall(GO)
        go.close()
        assert gone(pid, EXIT_SEC), log.read_text()
        text = log.read_text()
        assert "TENBOX-GUEST poweroff PASS" in text
        workers.append(pid)
    assert workers[0] != workers[1] and sb.proc.poll() is None, "one standby, a worker per order"
    rc, out, err = sb.finish()
    assert (rc, out, err) == (0, "", ""), "its own stdout and stderr saw nothing of the VMs"


def test_a_worker_whose_go_socket_ends_without_go_runs_nothing(tmp_path):
    sb = Standby()
    assert sb.ready() == READY
    log = tmp_path / "runtime.log"
    pid, go = sb.fork(["--kernel", guest_path("poweroff"), "--memory", "32"], log)
    go.close()
    assert gone(pid, EXIT_SEC)
    assert log.read_text() == ""
    assert sb.finish() == (0, "", "")


def test_a_workers_copies_of_the_standbys_pages_are_offered_to_ksm_and_its_guest_ram_is_not(tmp_path):
    sb = Standby()
    assert sb.ready() == READY
    standby = vm_flags(sb.proc.pid)  # as it said READY: it waits for an order, allocating nothing
    log = tmp_path / "runtime.log"
    pid, go = sb.fork(["--kernel", guest_path("idle"), "--memory", "48", "--console", "stdio"], log)
    try:
        go.sendall(GO)
        go.close()
        until = time_limit()
        while "idle: ready" not in log.read_text():
            assert next(until), log.read_text()
        worker = vm_flags(pid)
        ram = [flags for perm, size, _, flags in worker if perm == "rw-p" and size >= 48 << 10]
        assert ram, "no mapping of the guest's 48 MiB: %s" % worker
        assert not any("mg" in flags for flags in ram), "the guest's RAM is never KSM's"
        heap = next(flags for _, _, name, flags in worker if name == "[heap]")
        if os.path.isdir("/sys/kernel/mm/ksm"):
            unmarked = [size for perm, size, _, flags in standby if perm == "rw-p" and "mg" not in flags]
            # At most one is not: the buffer its next order is read into, while it waits.
            assert len(unmarked) <= 1 and all(0 < size - (ORDER_MAX_BYTES >> 10) <= 8 for size in unmarked), standby
            assert "mg" in heap, "the heap it shares with the standby"
        else:  # the kernel refuses each madvise; the standby starts all the same
            assert not any("mg" in flags for _, _, _, flags in standby + worker)
    finally:
        os.kill(pid, signal.SIGKILL)
        assert gone(pid, EXIT_SEC)
    assert sb.finish() == (0, "", "")


def vm_flags(pid: int) -> list:
    """(permissions, size in KiB, name, VmFlags) of each mapping in /proc/PID/smaps, in address order."""
    out = []
    for line in open("/proc/%d/smaps" % pid):
        fields = line.split()
        if not fields[0].endswith(":"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapping = [fields[1], (hi - lo) >> 10, fields[5] if len(fields) > 5 else ""]
        elif fields[0] == "VmFlags:":
            out.append(tuple(mapping + [fields[1:]]))
    return out


def test_a_go_with_cgroup_files_is_answered_once_the_worker_is_in_its_cgroups(tmp_path):
    cgroup = Cgroups().create("tenbox-test-join-%d" % os.getpid(), ResourceLimits(256 << 20, 64))
    assert cgroup is not None, "this host gives root no cgroup to make (cgroups.py)"
    sb = Standby()
    assert sb.ready() == READY
    log = tmp_path / "runtime.log"
    try:
        pid, go = sb.fork(["--kernel", guest_path("poweroff"), "--memory", "32", "--console", "stdio"], log)
        with go:
            before = set(pid_paths(pid).values())
            send_go(go, cgroup.join_files())
            joined = pid_paths(pid)
        for d in cgroup.dirs:
            assert any(d.endswith(path) for path in joined.values()), (d, joined)
        assert not any(d.endswith(path) for d in cgroup.dirs for path in before)
        assert gone(pid, EXIT_SEC)
        assert "TENBOX-GUEST poweroff PASS" in log.read_text()
    finally:
        cgroup.remove()
    assert sb.finish() == (0, "", "")


def test_a_worker_that_cannot_join_its_cgroup_says_why_and_runs_nothing(tmp_path):
    sb = Standby()
    assert sb.ready() == READY
    log = tmp_path / "runtime.log"
    pid, go = sb.fork(["--kernel", guest_path("poweroff"), "--memory", "32"], log)
    with go, pytest.raises(StandbyRefused, match="cannot join its cgroup: No space left on device"):
        send_go(go, ["/dev/full"])  # every write fails (ENOSPC)
    assert gone(pid, EXIT_SEC)
    assert log.read_text() == ""
    assert sb.finish() == (0, "", "")


@pytest.mark.parametrize("read_ready", [True, False])
def test_a_closed_socket_ends_a_standby_with_nothing_done(read_ready):
    sb = Standby()
    if read_ready:
        assert sb.ready() == READY
    else:  # closed with READY unread: the standby's read sees a reset, not an end
        assert sb.ours.recv(1, socket.MSG_PEEK) == READY
    assert sb.finish() == (0, "", "")


@pytest.mark.parametrize("payload,nfds,why", [
    (b"not json", 2, "the order is not JSON"),
    (json.dumps(["--kernel", "/k"]).encode(), 2, "the order has no command line or file list"),
    (order_json(["--kernel", "/k"], ["relative/path"]), 3, "the order has no command line or file list"),
    (order_json(["--kernel", "/k", "--fd", "3:/k"], []), 2, "the order's command line has --standby or --fd"),
    (order_json(["--standby"], []), 2, "the order's command line has --standby or --fd"),
    (order_json(["--kernel", "/k"], ["/k"]), 2, "the order names 1 files and passes 0 descriptors for them"),
    (order_json(["--kernel", "/k"], []), 3, "the order names 0 files and passes 1 descriptors for them"),
    (order_json(["--kernel", "/k"], []), 1, "the order passes no runtime log and GO socket"),
    (order_json(["--kernel", "/k"], []), 0, "the order passes no runtime log and GO socket"),
])
def test_a_bad_order_is_refused_in_one_line_and_runs_nothing(payload, nfds, why):
    sb = Standby()
    assert sb.ready() == READY
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    sb.order(payload, fds)
    for fd in fds:
        os.close(fd)
    rc, out, err = sb.finish()
    assert (rc, out) == (2, "")
    assert err == "tenbox-vm-runtime: error: standby: %s\n" % why


def test_an_order_with_more_descriptors_than_a_standby_takes_is_refused():
    sb = Standby()
    assert sb.ready() == READY
    fd = os.open(os.devnull, os.O_RDONLY)
    sb.order(order_json(["--kernel", "/k"], ["/k"] * ORDER_MAX_FDS), [fd] * (ORDER_MAX_FDS + 1))  # Linux passes 253
    os.close(fd)
    rc, out, err = sb.finish()
    assert (rc, out) == (2, "")
    assert err == "tenbox-vm-runtime: error: standby: the order is larger than %d bytes or %d descriptors\n" % (
        ORDER_MAX_BYTES, ORDER_MAX_FDS)


def test_standby_takes_no_other_option_than_link():
    r = subprocess.run(runtime_argv("--standby", "--link", "ipc:///l", "--kernel", "/k"), capture_output=True,
                       env=repo_env(), stdin=subprocess.DEVNULL, timeout=EXIT_SEC)
    assert r.returncode == 2
    assert r.stderr.decode() == ("tenbox-vm-runtime: error: --standby takes no other option than --link; "
                                 "its order brings them\n")


class Router:
    """tenboxd's end of the worker link: a ZeroMQ ROUTER the worker user may connect to."""

    def __init__(self, folder) -> None:
        folder.mkdir()
        self.endpoint = "ipc://%s/link.sock" % folder
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(EXIT_SEC * 1000))
        self.sock.bind(self.endpoint)
        os.chmod(str(folder / "link.sock"), 0o666)

    def until_exit(self) -> list:
        got = []
        while not got or not isinstance(got[-1], WorkerExit):
            got.append(decode(self.sock.recv_multipart()[1]))
        return got

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def proc_status(pid: int) -> dict:
    return dict(line.rstrip("\n").split(":\t", 1) for line in open("/proc/%d/status" % pid) if ":\t" in line)


def data_limit(pid: int) -> int:
    """The hard RLIMIT_DATA of `pid` (/proc: prlimit on a worker is refused), RLIM_INFINITY for none."""
    for line in open("/proc/%d/limits" % pid):
        if line.startswith("Max data size"):
            hard = line.split()[4]
            return resource.RLIM_INFINITY if hard == "unlimited" else int(hard)
    raise AssertionError("no data size in /proc/%d/limits" % pid)


def test_with_link_a_spare_sandboxed_ahead_takes_the_order_joins_its_cgroup_and_runs_the_vm(tmp_path):
    router = Router(tmp_path / "link")
    cgroup = Cgroups().create("tenbox-test-spare-%d" % os.getpid(), ResourceLimits(256 << 20, 64))
    assert cgroup is not None, "this host gives root no cgroup to make (cgroups.py)"
    sb = Standby("--link", router.endpoint)
    new_spare = None
    try:
        spare = parse_spare(sb.ready())
        assert sb.ready() == READY, "the spare is named before READY"
        assert gone(spare, 0.5) is False and os.getsid(spare) == spare
        until = time_limit()
        while proc_status(spare)["Seccomp"] != "2":  # it enters its sandbox on its own, after its fork
            assert next(until), "the spare did not enter its sandbox"
        status = proc_status(spare)
        assert int(status["Uid"].split()[1]) == worker_user().uid and status["NoNewPrivs"] == "1"
        assert os.readlink("/proc/%d/ns/mnt" % spare) != os.readlink("/proc/self/ns/mnt")
        assert "/dev/kvm" in [os.readlink("/proc/%d/fd/%s" % (spare, fd)) for fd in os.listdir("/proc/%d/fd" % spare)]
        assert data_limit(spare) == resource.RLIM_INFINITY, "its memory limit waits for the order"

        log = tmp_path / "runtime.log"
        kernel_fd = os.open(guest_path("idle"), os.O_RDONLY)
        pid, go = sb.fork(["--kernel", "/nonexistent/idle.bzImage", "--memory", "48", "--link", router.endpoint,
                           "--vm-id", "spare"], log, {"/nonexistent/idle.bzImage": kernel_fd})
        os.close(kernel_fd)
        assert pid == spare, "the order went to the spare"
        new_spare = parse_spare(sb.ready())
        assert new_spare not in (spare, sb.proc.pid), "the standby names the next spare"
        with go:
            send_go(go, cgroup.join_files())  # joined as the worker user, by the files root opened
        joined = pid_paths(pid)
        for d in cgroup.dirs:
            assert any(d.endswith(path) for path in joined.values()), (d, joined)
        first = decode(router.sock.recv_multipart()[1])
        assert isinstance(first, Hello) and first.vm_id == "spare", first
        while True:
            msg = decode(router.sock.recv_multipart()[1])
            if isinstance(msg, StateReport) and msg.state.value == "running":
                break
        assert data_limit(pid) == worker_data_max(48, 1), "narrowed to the order's machine"
        assert os.readlink("/proc/%d/fd/2" % pid) == str(log) and os.readlink("/proc/%d/fd/0" % pid) == "/dev/null"
        os.kill(pid, signal.SIGTERM)
        got = router.until_exit()
        assert got[-1].code == ExitCode.STOPPED, (got[-1], log.read_text())
        assert gone(pid, EXIT_SEC)
        assert "Traceback" not in log.read_text() and "error" not in log.read_text(), log.read_text()
    finally:
        rc, out, err = sb.finish()
        router.close()
        if not gone(spare, 0.5):  # a failed assertion left it running
            os.kill(spare, signal.SIGKILL)
            gone(spare, EXIT_SEC)
        cgroup.remove()
    assert (rc, out, err) == (0, "", "")
    assert new_spare is not None and gone(new_spare, EXIT_SEC), "a spare ends with its standby"


def test_an_order_for_another_link_forks_a_worker_and_the_spare_waits_for_the_next(tmp_path):
    router = Router(tmp_path / "link")
    sb = Standby("--link", router.endpoint)
    try:
        spare = parse_spare(sb.ready())
        assert sb.ready() == READY
        log = tmp_path / "runtime.log"
        pid, go = sb.fork(["--kernel", guest_path("poweroff"), "--memory", "32", "--console", "stdio"], log)
        assert pid != spare
        go.sendall(GO)
        go.close()
        assert gone(pid, EXIT_SEC)
        assert "TENBOX-GUEST poweroff PASS" in log.read_text()
        assert not gone(spare, 0.2), "the spare waits on"
        sb.ours.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sb.ours.recv(16)  # no new spare named: the one there is stays
    finally:
        rc, out, err = sb.finish()
        router.close()
    assert (rc, out, err) == (0, "", "")
    assert gone(spare, EXIT_SEC)


def time_limit(sec: float = EXIT_SEC):
    deadline = time.monotonic() + sec
    while True:
        time.sleep(0.01)
        yield time.monotonic() < deadline
