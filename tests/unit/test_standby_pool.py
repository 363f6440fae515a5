"""StandbyPool and Standby.fork (tenbox_supervisor/standby.py) over real processes and socket pairs that speak a
standby's part.

The processes are small Python scripts, not tenbox workers: they say READY
when told to (or never), and exit when their socket ends, as a standby does.
A clock the test moves decides RETRY_SEC. Spares a standby names (SPARE) are
`sleep` processes: the test's children, as a real spare is tenboxd's.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tenbox_supervisor.standby import RETRY_SEC, Standby, StandbyPool, StandbyRefused

# Says READY once it reads "go" on its socket, then waits for its socket to end.
SCRIPT = """
import socket
s = socket.socket(fileno=0)
try:
    if s.recv(16) == b"go":
        s.send(b"R")
        s.recv(16)
except ConnectionResetError:  # closed with READY unread: a standby takes it as the end
    pass
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def pool():
    started = []
    clock = Clock()

    def start():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=theirs)
        theirs.close()
        sb = Standby(popen=p, sock=ours)
        started.append(sb)
        return sb

    p = StandbyPool(2, start, clock)
    p.started, p.clock = started, clock
    yield p
    p.close()
    for sb in started:
        if sb.popen.poll() is None:
            sb.popen.kill()
            sb.popen.wait()


def ready(sb):
    sb.sock.send(b"go")
    sb.sock.settimeout(30)
    data = sb.sock.recv(1, socket.MSG_PEEK)  # READY has arrived; is_ready() reads it
    sb.sock.settimeout(None)
    sb.sock.setblocking(True)
    return data


def test_take_gives_only_a_ready_standby_which_stays_the_pools_and_ready_ones_take_turns(pool):
    pool.fill()
    assert len(pool.started) == 2 and pool.describe()["ready"] == 0
    assert pool.take() is None, "none has said READY: the start goes cold"
    assert ready(pool.started[1]) == b"R"
    assert pool.take() is pool.started[1] and pool.take() is pool.started[1]
    assert pool.describe() == {"wanted": 2, "ready": 1, "pids": [sb.pid for sb in pool.started], "spares": []}
    assert ready(pool.started[0]) == b"R"
    assert {pool.take().pid for _ in range(2)} == {sb.pid for sb in pool.started}
    assert len(pool.started) == 2, "a standby serves many starts: none is started for a take"


def test_a_dropped_standby_is_ended_and_replaced_only_after_the_retry_time(pool):
    pool.fill()
    bad = pool.started[0]
    pool.drop(bad, "it did not answer")
    assert bad.popen.poll() is not None and bad.pid not in pool.describe()["pids"]
    assert len(pool.started) == 2, "no new standby before RETRY_SEC"
    pool.clock.now += RETRY_SEC
    pool.fill()
    assert len(pool.started) == 3 and len(pool.describe()["pids"]) == 2


def test_a_standby_that_ended_is_dropped_and_replaced_only_after_the_retry_time(pool):
    pool.fill()
    dead = pool.started[0]
    dead.popen.kill()
    dead.popen.wait()
    assert dead.pid not in pool.describe()["pids"]
    pool.fill()
    assert len(pool.started) == 2, "no new standby before RETRY_SEC"
    pool.clock.now += RETRY_SEC
    pool.fill()
    assert len(pool.started) == 3 and len(pool.describe()["pids"]) == 2


def test_close_lets_every_standby_go(pool):
    pool.fill()
    assert ready(pool.started[0]) == b"R"
    pool.close()
    for sb in pool.started:
        assert sb.popen.wait(5) == 0, "a standby exits 0 when its socket ends"
    pool.fill()
    assert len(pool.started) == 2, "a closed pool starts nothing"


# Reads one order, answers it with argv[1] (or closes without an answer when it is "-"), then waits for its end.
ANSWER = """
import socket, sys
s = socket.socket(fileno=0)
s.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 256))
if sys.argv[1] != "-":
    s.send(sys.argv[1].encode())
    s.recv(16)
"""


@pytest.mark.parametrize("answer,why", [
    ("P%d" % os.getpid(), "its worker pid %d is not tenboxd's child" % os.getpid()),  # ours, not our child
    ("Pnope", "the standby's reply is not a worker's pid"),
    ("-", "it closed its socket"),
])
def test_a_fork_answer_that_is_no_child_of_ours_is_refused_and_its_go_socket_closed(answer, why, tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen([sys.executable, "-c", ANSWER, answer], stdin=theirs)
    theirs.close()
    sb = Standby(popen=p, sock=ours, ready=True)
    log = open(str(tmp_path / "runtime.log"), "ab")
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(StandbyRefused, match=why):
            sb.fork(b"{}", [], log.fileno())
        assert len(os.listdir("/proc/self/fd")) == before, "no descriptor of the attempt stays open"
    finally:
        log.close()
        sb.dismiss()


# Sends each of argv[1:] as a message (SPARE, READY, ...), then waits for its socket to end.
SAYS = """
import socket, sys
s = socket.socket(fileno=0)
for m in sys.argv[1:]:
    s.send(m.encode())
s.recv(16)
"""


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def saying(*messages: str, spares=()) -> Standby:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen([sys.executable, "-c", SAYS] + list(messages), stdin=theirs)
    theirs.close()
    return Standby(popen=p, sock=ours, spares=set(spares))


def until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within %.0f s" % timeout
        time.sleep(0.01)


def test_the_spares_a_standby_names_are_reaped_once_ended_and_killed_when_it_is_let_go():
    ended, kept = sleeper(), sleeper()
    sb = saying("S%d" % ended.pid, "S%d" % kept.pid, "R")
    try:
        until(sb.is_ready)
        assert sb.spares == {ended.pid, kept.pid}
        os.kill(ended.pid, signal.SIGTERM)
        until(lambda: sb.is_ready() and sb.spares == {kept.pid})
        assert not psutil.pid_exists(ended.pid), "reaped: no zombie stays"
        sb.dismiss()
        assert sb.spares == set() and not psutil.pid_exists(kept.pid), "a let-go standby's spare is ended and reaped"
    finally:
        for p in (ended, kept):
            if psutil.pid_exists(p.pid):
                p.kill()
                p.wait()


def test_a_fork_reply_may_come_after_a_spare_is_named_and_a_spare_that_took_the_order_is_a_worker_then(tmp_path):
    took, new = sleeper(), sleeper()
    sb = saying("S%d" % new.pid, "P%d" % took.pid, spares=[took.pid])
    sb.ready = True
    log = open(str(tmp_path / "runtime.log"), "ab")
    try:
        worker, go = sb.fork(b"{}", [], log.fileno())
        go.close()
        assert worker.pid == took.pid and sb.spares == {new.pid}
        sb.dismiss()
        assert psutil.pid_exists(took.pid) and not psutil.pid_exists(new.pid), "the worker runs on; the spare ended"
    finally:
        log.close()
        for p in (took, new):
            if psutil.pid_exists(p.pid):
                p.kill()
                p.wait()


def test_a_spare_named_that_is_not_a_child_of_ours_is_never_killed():
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    grandchild = int(parent.stdout.readline())  # a process of ours, but not our child
    other = sleeper()
    sb = saying("S%d" % grandchild, "S%d" % other.pid, "R")
    try:
        until(sb.is_ready)
        sb.dismiss()
        assert psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE, "not killed"
        assert sb.spares == set() and not psutil.pid_exists(other.pid)
    finally:
        for p in (parent, other):
            if p.poll() is None:
                p.kill()
                p.wait()
        if psutil.pid_exists(grandchild):
            os.kill(grandchild, signal.SIGKILL)
