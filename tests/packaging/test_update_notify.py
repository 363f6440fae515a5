"""The postinst's upgrade notice to a running tenboxd: one request, a bounded wait, never a failed upgrade (tests; no root).

debian/update-notify.py (installed as /usr/lib/tenbox/update-notify) against
fake daemons on a unix socket: one that acknowledges, one that does not know
the request (a tenboxd older than the handshake), one that never answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from tests.packaging.build import REPO

HELPER = REPO / "debian" / "update-notify.py"


class FakeDaemon:
    def __init__(self, path, reply):
        self.path = str(path)
        self.reply = reply  # dict, or None: read the request and say nothing
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            f = conn.makefile("rb")
            self.requests.append(json.loads(f.readline()))
            if self.reply is None:
                time.sleep(5)
                return
            conn.sendall((json.dumps(dict(self.reply, id=self.requests[0]["id"])) + "\n").encode())

    def close(self):
        self.sock.close()


def _notify(sock_path, timeout=5.0):
    started = time.monotonic()
    r = subprocess.run(["/usr/bin/python3", str(HELPER), "--socket", str(sock_path), "--version", "0.2.0",
                        "--from-version", "0.1.0", "--timeout", str(timeout)],
                       capture_output=True, text=True, timeout=60)
    return r, time.monotonic() - started


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "tenbox.sock"


def test_acknowledged_notice_sends_the_new_version(sock_path):
    d = FakeDaemon(sock_path, {"ok": True, "payload": {"acknowledged": True, "pending_reply": "sent"}})
    try:
        r, _ = _notify(sock_path)
    finally:
        d.close()
    assert r.returncode == 0, r.stderr
    assert "acknowledged the upgrade to 0.2.0" in r.stderr
    assert d.requests == [{"id": 1, "type": "host.update.notify",
                           "payload": {"version": "0.2.0", "from_version": "0.1.0"}}]


def test_a_daemon_without_the_handshake_is_reported_not_fatal(sock_path):
    d = FakeDaemon(sock_path, {"ok": False, "error_code": "unknown_request",
                               "error": "unknown request type 'host.update.notify'"})
    try:
        r, _ = _notify(sock_path)
    finally:
        d.close()
    assert r.returncode == 1
    assert "did not acknowledge" in r.stderr and "unknown_request" in r.stderr


def test_a_silent_daemon_costs_at_most_the_timeout(sock_path):
    d = FakeDaemon(sock_path, None)
    try:
        r, elapsed = _notify(sock_path, timeout=1.0)
    finally:
        d.close()
    assert r.returncode == 1 and "no answer within 1s" in r.stderr
    assert elapsed < 4.0


def test_no_daemon_is_reported_not_fatal(sock_path):
    r, _ = _notify(sock_path)
    assert r.returncode == 1 and "did not acknowledge" in r.stderr
