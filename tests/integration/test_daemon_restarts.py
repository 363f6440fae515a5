"""Restart policies and autostart for real: a tenboxd on private paths, real workers booting the test guests.

Backoff is checked through the times tenboxd records (a failure's time and
the restart it schedules), never by sleeping; a host boot is simulated as
systemd's tmpfs makes it: the daemon and its workers die and the run
directory is emptied before the next tenboxd starts on the same data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Dict, List, Tuple

import psutil
import pytest

from tenbox_supervisor.cgroups import Cgroups
from tenbox_supervisor.oshost import CGROUP_PREFIX
from tests.framework.daemon import STATE_POLL_SEC, ok
from tests.framework.guests import guest_path

pytestmark = pytest.mark.usefixtures("kvm", "guests")


def create(daemon, name: str, *options: str, kernel: str = "", guest: str = "idle") -> str:
    return ok(daemon.ctl("vm", "create", name, "--kernel", kernel or guest_path(guest), "--memory", "32",
                         *options)).strip()


def restarts_until(daemon, name: str, done, timeout: float = 90.0) -> List[Tuple[float, Dict]]:
    """Every (failure time, restart status) the VM shows while its policy acts, until done(vm) holds."""
    seen: List[Tuple[float, Dict]] = []
    deadline = time.monotonic() + timeout
    while True:
        vm = daemon.vm(name)
        status, failure = vm.get("restart_status"), vm.get("last_failure")
        if status and failure and (failure["time"], status) not in seen:
            seen.append((failure["time"], status))
        if done(vm):
            return seen
        assert time.monotonic() < deadline, "VM %s: %s\n%s" % (name, vm, daemon.proc.errors[-3000:])
        time.sleep(STATE_POLL_SEC)


def simulate_host_boot(daemon, pids: List[int]) -> None:
    """The host goes down under tenboxd and its workers; /run is empty when it comes back."""
    daemon.kill9()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=10)
    for entry in os.listdir(str(daemon.run_dir)):
        path = os.path.join(str(daemon.run_dir), entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def test_a_crash_loop_backs_off_1_then_2_seconds_and_ends_crashed_after_n(daemon):
    """The fault guest makes its worker fail at every boot: with on-failure:2 tenboxd restarts it twice,
    1 s and then 2 s after each failure (the recorded times), and then leaves it crashed, saying why."""
    create(daemon, "loop", "--restart", "on-failure:2", guest="fault")
    daemon.ctl("vm", "start", "loop")  # running for a moment, or already crashed: either way, it fails
    seen = restarts_until(daemon, "loop", lambda vm: (vm.get("restart_status") or {}).get("gave_up"))
    waits = [(t, s) for t, s in seen if s.get("next_retry_at")]
    assert [round(s["next_retry_at"] - t, 1) for t, s in waits] == [1.0, 2.0]  # scheduled as the failure is judged
    assert [(s["attempts"], s["max_retries"], s["backoff_sec"]) for _, s in waits] == [(0, 2, 1.0), (1, 2, 2.0)]
    failures = sorted({t for t, _ in seen})
    assert len(failures) == 3  # the start and the two restarts failed
    for (_, s), next_failure in zip(waits, failures[1:]):
        assert next_failure >= s["next_retry_at"]  # no restart came before its time
    vm = daemon.vm("loop")
    assert vm["state"] == "crashed" and vm["pid"] is None and vm["last_failure"]["code"] == "kvm_error"
    assert vm["restart_status"]["gave_up"] == "on-failure:2: gave up after 2 restarts"
    row = [l for l in ok(daemon.ctl("vm", "ls")).splitlines() if " loop " in l][0]
    assert "on-failure:2, gave up after 2" in row and "kvm_error" in row
    assert "restart:      on-failure:2, gave up after 2" in ok(daemon.ctl("vm", "show", "loop"))


def test_always_restarts_a_killed_worker_and_vm_stop_is_obeyed(daemon):
    create(daemon, "svc", "--restart", "always")
    ok(daemon.ctl("vm", "start", "svc"))
    daemon.wait_console("svc", "idle: ready")
    first = daemon.vm("svc")["pid"]
    os.kill(first, signal.SIGKILL)
    seen = restarts_until(daemon, "svc", lambda vm: vm["state"] == "running" and vm["pid"] not in (None, first))
    assert seen and round(seen[0][1]["next_retry_at"] - seen[0][0], 1) == 1.0 and seen[0][1]["attempts"] == 0
    vm = daemon.vm("svc")
    assert vm["restart_status"]["attempts"] == 1 and vm["last_failure"] is None  # a clean start clears it
    daemon.wait_console("svc", "idle: ready", count=2)
    ok(daemon.ctl("vm", "stop", "svc"))
    assert daemon.vm("svc")["state"] == "stopped"
    r = daemon.ctl("vm", "ls", "--json")
    assert '"state": "stopped"' in r.stdout.decode() and daemon.vm("svc")["restart_status"] is None


def test_a_policy_on_a_vm_whose_kernel_vanished_ends_crashed_with_file_missing(daemon, tmp_path):
    kernel = tmp_path / "vmlinuz"
    shutil.copy(guest_path("idle"), str(kernel))
    create(daemon, "lost", "--restart", "always", kernel=str(kernel))
    ok(daemon.ctl("vm", "start", "lost"))
    pid = daemon.vm("lost")["pid"]
    kernel.unlink()
    os.kill(pid, signal.SIGKILL)
    restarts_until(daemon, "lost", lambda vm: (vm.get("restart_status") or {}).get("gave_up"))
    vm = daemon.vm("lost")
    assert vm["state"] == "crashed" and vm["pid"] is None
    assert vm["last_failure"]["code"] == "file_missing" and str(kernel) in vm["last_failure"]["message"]
    assert vm["restart_status"]["attempts"] == 1 and vm["restart_status"]["next_retry_at"] is None
    assert "(file_missing)" in vm["restart_status"]["gave_up"]
    events = [json.loads(l) for l in ok(daemon.ctl("events", "--since", "0", "--no-follow", "--json")).splitlines()]
    starts = [e for e in events if e["kind"] == "vm.state" and e["new"] == "starting"]
    assert len(starts) == 1  # the first start; the restart was refused before any worker ran
    assert [e["action"] for e in events if e["kind"] == "vm.restart"] == ["scheduled", "starting", "gave_up"]


def test_a_host_boot_starts_autostart_and_always_vms_a_tenboxd_restart_adopts(daemon):
    create(daemon, "auto", "--autostart")
    create(daemon, "always", "--restart", "always")
    create(daemon, "plain")
    for name in ("always", "plain"):
        ok(daemon.ctl("vm", "start", name))
    pids = [daemon.vm(n)["pid"] for n in ("always", "plain")]
    left = Cgroups().of_pid(pids[1], CGROUP_PREFIX)
    assert left is not None, "the worker runs in a cgroup tenboxd made (no systemd here)"
    simulate_host_boot(daemon, pids)
    assert all(os.path.isdir(d) for d in left.dirs), "a worker killed while no tenboxd ran leaves its cgroups"
    daemon.start()
    for name in ("auto", "always"):
        daemon.wait_state(name, "running", 30)
        daemon.wait_console(name, "idle: ready")
    plain = daemon.vm("plain")
    assert plain["state"] == "crashed" and plain["last_failure"]["code"] == "worker_lost"
    assert not any(os.path.exists(d) for d in left.dirs), "the next tenboxd removed them: %s" % (left.dirs,)
    assert daemon.vm("always")["restart_status"] is None  # a boot start, not a restart
    # A tenboxd restart in the same boot: the workers are taken back, nothing else starts.
    ok(daemon.ctl("vm", "stop", "auto"))
    running = daemon.vm("always")["pid"]
    daemon.kill9()
    daemon.start()
    assert daemon.wait_state("always", "running", 15)["pid"] == running
    assert Cgroups().of_pid(running, CGROUP_PREFIX) is not None, "a worker taken back keeps its cgroups"
    assert daemon.vm("auto")["state"] == "stopped" and daemon.vm("plain")["state"] == "crashed"


def test_bad_policies_are_one_line_invalid_argument_and_change_nothing(daemon):
    create(daemon, "web", "--restart", "on-failure:3")
    for args in (["vm", "create", "x", "--kernel", guest_path("idle"), "--restart", "sometimes"],
                 ["vm", "edit", "web", "--restart", "on-failure:0"],
                 ["vm", "edit", "web", "--restart", "on-failure:-2", "--memory", "64"]):
        r = daemon.ctl(*args)
        lines = r.stderr.decode().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].endswith("(invalid_argument)"), r.stderr
        assert lines[0].startswith("tenbox: restart must be") or "retry count" in lines[0]
    vms = {v["name"]: v for v in daemon.call("vm.list")["payload"]["vms"]}
    assert list(vms) == ["web"] and vms["web"]["restart"] == "on-failure:3" and vms["web"]["memory_mb"] == 32
    edited = ok(daemon.ctl("vm", "edit", "web", "--restart", "always", "--autostart", "--json"))
    assert '"restart": "always"' in edited and '"autostart": true' in edited
