"""Host shutdown against a package upgrade's restart, on a real tenboxd with real workers.

How the daemon learns which one it is (docs/daemon.md, "Host shutdown"):
at a system shutdown systemd stops tenbox-guests.service, whose ExecStop
runs `tenboxctl host shutdown-vms` with /etc/default/tenbox's
TENBOX_SHUTDOWN_TIMEOUT in its environment, before tenboxd gets its SIGTERM;
an upgrade's postinst only restarts tenboxd.service, a plain SIGTERM. Both
are done here exactly so: the CLI command with that environment, then
SIGTERM; and SIGTERM alone.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.framework.daemon import ok
from tests.framework.guests import guest_path
from tests.framework.repo import PYTHON, REPO, repo_env

pytestmark = pytest.mark.usefixtures("kvm", "guests")


def create_and_start(daemon, name: str, guest: str, *options: str) -> int:
    ok(daemon.ctl("vm", "create", name, "--kernel", guest_path(guest), "--memory", "32", *options))
    ok(daemon.ctl("vm", "start", name))
    daemon.wait_console(name, "%s: ready" % guest)
    return daemon.vm(name)["pid"]


def shutdown_vms_as_the_unit_does(daemon, timeout_env: str) -> "subprocess.CompletedProcess[bytes]":
    """tenbox-guests.service's ExecStop: the CLI with the timeout from /etc/default/tenbox in its environment."""
    env = repo_env({"TENBOX_SOCK": str(daemon.socket), "TENBOX_SHUTDOWN_TIMEOUT": timeout_env})
    return subprocess.run([PYTHON, "-m", "tenbox_ctl", "host", "shutdown-vms", "--json"], capture_output=True,
                          timeout=120, env=env, cwd=str(REPO), stdin=subprocess.DEVNULL)


def test_a_host_shutdown_powers_every_vm_off_at_once_and_they_end_stopped_host_shutdown(daemon):
    create_and_start(daemon, "obeys", "idle", "--restart", "always")
    create_and_start(daemon, "deaf", "echo")
    ok(daemon.ctl("vm", "create", "idle-one", "--kernel", guest_path("idle"), "--memory", "32"))
    r = shutdown_vms_as_the_unit_does(daemon, "3")
    out = json.loads(ok(r))["vms"]
    assert [(v["name"], v["state"], v["graceful"]) for v in out] == [("deaf", "stopped", False), ("obeys", "stopped", True)]
    daemon.wait_console("obeys", "idle: power button")
    for name in ("obeys", "deaf"):
        v = daemon.vm(name)
        assert v["state"] == "stopped" and v["state_reason"] == "host_shutdown" and v["last_failure"] is None
    assert "state:        stopped (host_shutdown)" in ok(daemon.ctl("vm", "show", "deaf"))
    events = [json.loads(l) for l in ok(daemon.ctl("events", "--since", "0", "--no-follow", "--json")).splitlines()]
    ends = [(e["name"], e["new"]) for e in events if e["kind"] == "vm.state" and e["new"] in ("stopping", "stopped")]
    # Both got the power button before either ended: in parallel, not one after the other.
    assert sorted(ends[:2]) == [("deaf", "stopping"), ("obeys", "stopping")]
    assert sorted(ends[2:]) == [("deaf", "stopped"), ("obeys", "stopped")]
    assert all(e["reason"].startswith("host_shutdown") for e in events if e["kind"] == "vm.state"
               and e["new"] in ("stopping", "stopped"))
    assert not [e for e in events if e["kind"] == "vm.restart"]  # restart=always does not undo it
    assert daemon.stop() == 0
    # The next boot: /run is empty; the always VM starts again, the others stay stopped.
    (daemon.run_dir / "booted").unlink()
    daemon.start()
    assert daemon.wait_state("obeys", "running", 30)
    assert daemon.vm("deaf")["state"] == "stopped" and daemon.vm("idle-one")["state"] == "stopped"


def test_an_upgrade_restart_leaves_the_vms_running_and_taken_back(daemon):
    pids = {n: create_and_start(daemon, n, "idle") for n in ("a", "b")}
    assert daemon.stop() == 0  # the postinst's `restart tenboxd.service`: SIGTERM, then a new daemon
    daemon.start()
    for name, pid in pids.items():
        v = daemon.wait_state(name, "running", 15)
        assert v["pid"] == pid and v["state_reason"] != "host_shutdown"
        daemon.proc.wait_for_stderr("worker pid %d connected" % pid, 15)  # its HELLO: the link is back
    ok(daemon.ctl("vm", "console", "a", input=b"after the upgrade\n", timeout=30))
    daemon.wait_console("a", "echo: after the upgrade")


def test_a_bad_shutdown_timeout_changes_nothing(daemon):
    create_and_start(daemon, "web", "idle")
    r = shutdown_vms_as_the_unit_does(daemon, "0")
    assert r.returncode == 2 and b"timeout" in r.stderr.lower(), r.stderr
    r = json.loads(daemon.raw(b'{"id": 1, "type": "host.shutdown", "payload": {"timeout": -1}}\n'))
    assert r["error_code"] == "invalid_argument"
    assert daemon.vm("web")["state"] == "running"
