"""Bounds on control-socket clients, on a real tenboxd: clients that stop reading, clients that
send only blank lines, and one user holding every connection it may (docs/security.md)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

from tests.framework.daemon import control_request
from tests.framework.repo import PYTHON, REPO, repo_env
from tests.framework.users import system_group, system_user, unique_name
from tenbox_supervisor.protocol import CLIENT_WRITE_STALL_SEC, CLIENTS_PER_UID_MAX

IDLE_SEC = 2.0  # TENBOX_CLIENT_IDLE_SEC for these daemons (300 s by default)

# Run as another user: open N connections, check each is served, report, hold them until stdin closes.
HOLDER = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
held, replies = [], []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(b'{"id": 1, "type": "vm.list"}\n')
    except BrokenPipeError:
        pass  # refused at once: the refusal is waiting to be read
    replies.append(json.loads(s.makefile("rb").readline()))
    held.append(s)
print(json.dumps(replies[-1]), flush=True)
sys.stdin.read()
"""


def read_until_closed(s: socket.socket, timeout: float) -> bytes:
    """Everything the daemon sends until it closes the connection; AssertionError if it does not within timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = s.recv(1 << 16)
        except socket.timeout:
            raise AssertionError("the connection is still open after %.0f s (%d bytes read)" % (timeout, len(data)))
        except ConnectionResetError:  # closed with requests of ours unread: AF_UNIX says so
            return data
        if not chunk:
            return data
        data += chunk


def test_a_client_that_stops_reading_is_disconnected(daemon):
    """A client sends requests and never reads the answers: once its replies have filled the socket
    and tenboxd's buffer and it takes nothing more for CLIENT_WRITE_STALL_SEC, tenboxd drops it,
    and other clients are served meanwhile."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.settimeout(2)
    request = b'{"id": 1, "type": "system.info"}\n' * 100
    sent = 0
    try:
        while sent < 64 << 20:  # until tenboxd stops reading: it waits to hand over replies
            s.sendall(request)
            sent += len(request)
    except socket.timeout:
        pass
    assert sent < 64 << 20, "tenboxd kept reading requests of a client that takes no replies"
    t0 = time.monotonic()
    assert control_request(daemon.socket, "vm.list", timeout=5)["ok"]  # the others are served meanwhile
    daemon.proc.wait_for_stderr("took nothing of its replies for %.0fs; disconnected" % CLIENT_WRITE_STALL_SEC,
                                CLIENT_WRITE_STALL_SEC + 10)
    assert time.monotonic() - t0 < CLIENT_WRITE_STALL_SEC + 10
    read_until_closed(s, 30)  # the replies already in the socket, then the end
    s.close()


def test_blank_lines_do_not_keep_a_connection_open(make_daemon):
    """The idle timer counts from the last request: a client sending only blank lines is closed
    after the idle time, one sending requests as often is not."""
    d = make_daemon("idle", TENBOX_CLIENT_IDLE_SEC=str(IDLE_SEC))
    d.start()
    blank, busy = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    blank.connect(str(d.socket))
    busy.connect(str(d.socket))
    busy_replies = busy.makefile("rb")
    t0 = time.monotonic()
    closed_at = None
    while time.monotonic() - t0 < 3 * IDLE_SEC:
        if closed_at is None:
            try:
                blank.sendall(b"\n")
            except OSError:
                closed_at = time.monotonic() - t0
        busy.sendall(b'{"id": 1, "type": "vm.list"}\n')
        assert json.loads(busy_replies.readline())["ok"]
        time.sleep(IDLE_SEC / 8)
    if closed_at is None:
        assert read_until_closed(blank, 1) == b""
        closed_at = 3 * IDLE_SEC
    assert IDLE_SEC - 0.5 < closed_at <= 3 * IDLE_SEC, closed_at
    d.proc.wait_for_stderr("sent no request for %.0fs; disconnected" % IDLE_SEC, 5)
    busy.sendall(b'{"id": 2, "type": "vm.list"}\n')
    assert json.loads(busy_replies.readline())["ok"], "a client that sends requests stays connected"
    blank.close()
    busy.close()


RELEASE_WITHIN_SEC = 5.0


def test_one_user_cannot_hold_every_connection_and_root_always_gets_in(make_daemon):
    """A group member holds CLIENTS_PER_UID_MAX connections; its next one is refused with
    too_many_clients, while root's CLI and the package's postinst notification still get in."""
    group = unique_name("tbxg")
    with system_group(group), system_user(unique_name("tbxu"), [group]) as user:
        d = make_daemon("cap", TENBOX_SOCKET_GROUP=group)
        d.start()
        holder = subprocess.Popen(["runuser", "-u", user.name, "--", PYTHON, "-c", HOLDER, str(d.socket),
                                   str(CLIENTS_PER_UID_MAX)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=repo_env(), cwd="/")
        try:
            last = json.loads(holder.stdout.readline() or b"null")
            assert last is not None and last["ok"], holder.stderr.read() if last is None else last
            one_more = subprocess.run(["runuser", "-u", user.name, "--", PYTHON, "-c", HOLDER, str(d.socket), "1"],
                                      input=b"", capture_output=True, env=repo_env(), cwd="/", timeout=30)
            refused = json.loads(one_more.stdout)
            assert refused["error_code"] == "too_many_clients" and "uid %d" % user.uid in refused["error"], refused
            assert control_request(d.socket, "vm.list", timeout=5)["ok"]
            assert d.ctl("vm", "ls").returncode == 0
            notify = subprocess.run([PYTHON, str(REPO / "debian" / "update-notify.py"), "--socket", str(d.socket),
                                     "--version", "9.9.9", "--timeout", "10"], capture_output=True, timeout=30)
            assert notify.returncode == 0 and b"acknowledged" in notify.stderr, notify.stderr
        finally:
            holder.stdin.close()
            holder.wait(10)
        # Their connections gone, the user is served again: once tenboxd has read each one's end,
        # which its event loop does in its own time (a connection made meanwhile may be refused).
        deadline = time.monotonic() + RELEASE_WITHIN_SEC
        while True:
            again = subprocess.run(["runuser", "-u", user.name, "--", PYTHON, "-c", HOLDER, str(d.socket), "1"],
                                   input=b"", capture_output=True, env=repo_env(), cwd="/", timeout=30)
            if json.loads(again.stdout)["ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert json.loads(again.stdout)["ok"], again.stdout


def test_a_forged_vm_id_cannot_forge_log_lines(daemon):
    """The mutating-request log line is written before the handler checks vm_id: an id with a
    newline must not start a line of its own in tenboxd's log."""
    forged = "x\ntenboxd.api: request vm.delete web from uid=0 gid=0 pid=1"
    r = daemon.call("vm.stop", vm_id=forged)
    assert r["error_code"] == "invalid_argument"
    assert control_request(daemon.socket, "vm.list")["ok"]
    daemon.proc.wait_for_stderr(re.escape("request vm.stop (invalid id or name) from uid="), 5)
    assert "\ntenboxd.api: request vm.delete web" not in daemon.proc.errors
