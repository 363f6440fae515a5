"""`tenbox events` for real: a follower on a real tenboxd sees state changes, a crash, its restart and images, in order."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Dict, List

import pytest

from tests.framework.daemon import ok
from tests.framework.guests import guest_path
from tests.framework.images import fake_image

pytestmark = pytest.mark.usefixtures("kvm", "guests")

FOLLOW_SEC = 90.0


class Follower:
    """A raw `events` stream on the control socket, as a script would hold it."""

    def __init__(self, daemon, **payload) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(FOLLOW_SEC)
        self.sock.connect(str(daemon.socket))
        self.sock.sendall((json.dumps({"id": 1, "type": "events", "payload": payload}) + "\n").encode())
        self.file = self.sock.makefile("rb")
        self.first = json.loads(self.file.readline())

    def until(self, done) -> List[Dict]:
        """Entries until done(entry) holds for one (included)."""
        got = []
        while True:
            line = self.file.readline()
            assert line, "the stream ended after %s" % got
            msg = json.loads(line)
            assert msg["type"] == "event", msg
            got.append(msg["payload"])
            if done(msg["payload"]):
                return got

    def close(self) -> None:
        self.sock.close()


def summary(entries: List[Dict]) -> List[tuple]:
    return [(e["kind"], e.get("old"), e.get("new"), e.get("action")) for e in entries]


def test_a_follower_sees_a_vms_life_its_crash_and_restart_in_order(daemon, tmp_path):
    follower = Follower(daemon)
    try:
        assert follower.first["ok"] and follower.first["payload"]["replayed"] == 0
        vm_id = ok(daemon.ctl("vm", "create", "web", "--kernel", guest_path("idle"), "--memory", "32",
                              "--restart", "on-failure:1")).strip()
        ok(daemon.ctl("vm", "start", "web"))
        daemon.wait_console("web", "idle: ready")
        os.kill(daemon.vm("web")["pid"], signal.SIGKILL)
        got = follower.until(lambda e: e.get("new") == "running" and e.get("old") == "starting" and e["seq"] > 4)
        ok(daemon.ctl("vm", "stop", "web"))
        ok(daemon.ctl("vm", "rm", "web"))
        ok(daemon.ctl("image", "import", str(fake_image(tmp_path / "img")), "--name", "tiny"))
        ok(daemon.ctl("image", "rm", "tiny"))
        got += follower.until(lambda e: e["kind"] == "image.removed")
    finally:
        follower.close()
    assert summary(got) == [
        ("vm.created", None, None, None),
        ("vm.state", "stopped", "starting", None), ("vm.state", "starting", "running", None),
        ("vm.state", "running", "crashed", None),
        ("vm.restart", None, None, "scheduled"), ("vm.restart", None, None, "starting"),
        ("vm.state", "crashed", "starting", None), ("vm.state", "starting", "running", None),
        ("vm.state", "running", "stopping", None), ("vm.state", "stopping", "stopped", None),
        ("vm.deleted", None, None, None),
        ("image.imported", None, None, None), ("image.removed", None, None, None),
    ]
    assert [e["seq"] for e in got] == list(range(got[0]["seq"], got[0]["seq"] + len(got)))
    assert all(a["time"] <= b["time"] for a, b in zip(got, got[1:]))
    crashed, scheduled = got[3], got[4]
    assert crashed["vm_id"] == vm_id and crashed["name"] == "web"
    assert crashed["failure"]["code"] == "killed" and crashed["failure"]["signal"] == "SIGKILL"
    assert (scheduled["attempt"], scheduled["backoff_sec"]) == (1, 1.0)
    assert round(scheduled["next_retry_at"] - crashed["time"], 1) == 1.0
    assert got[5]["time"] >= scheduled["next_retry_at"]  # the restart waited for its time
    assert got[-2]["image"] == "tiny" and "vm.stop by" in got[8]["reason"]

    # The same entries replayed, for scripts and for people; --since in the future replays nothing.
    replay = ok(daemon.ctl("events", "--since", "0", "--no-follow", "--json")).splitlines()
    assert [json.loads(line) for line in replay] == got
    people = ok(daemon.ctl("events", "--since", "1h", "--no-follow")).splitlines()
    assert len(people) == len(got) and "vm.state web: running -> crashed (killed: " in people[3]
    assert "vm.restart web: restart 1 in 1.0s" in people[4]
    assert ok(daemon.ctl("events", "--since", str(time.time() + 3600), "--no-follow")) == ""


def test_bad_since_is_a_usage_error_and_a_negative_one_invalid_argument(daemon):
    r = daemon.ctl("events", "--since", "yesterday", "--no-follow")
    assert r.returncode == 2 and b"duration ago" in r.stderr
    r = daemon.call("events", since=-5, follow=False)
    assert r["ok"] is False and r["error_code"] == "invalid_argument"
