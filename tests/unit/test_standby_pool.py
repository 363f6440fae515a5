"""StandbyPool and Standby.fork (tenbox_supervisor/standby.py) over real processes and socket pairs that speak a
standby's part.

The processes are small Python scripts, not tenbox workers: they say READY
when told to (or never), and exit when their socket ends, as a standby does.
A clock the test moves decides RETRY_SEC.
"""

import os
import socket
import subprocess
import sys

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
    assert pool.describe() == {"wanted": 2, "ready": 1, "pids": [sb.pid for sb in pool.started]}
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
