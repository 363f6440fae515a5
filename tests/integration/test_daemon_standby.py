"""Standby workers for real: a tenboxd keeps `tenbox-vm-runtime --standby` ready, and a start forks the VM's worker.

The standby is tenboxd's child; `vm.start` sends it its VM's order
(tenbox_vmm/standby.py) and it forks that VM's worker, which is tenboxd's
child too (re-parented: tenboxd is the subreaper) and shares the
standby's pages: the guest runs, the console and the exit status work as
for a cold worker, and the standby serves the next start. A standby that
died, a tenboxd that stops or is killed, and TENBOX_STANDBY_WORKERS=0 or a
bad value are covered too.
"""

import json
import os
import signal
import time

import psutil
import pytest

from tests.framework.daemon import DaemonProcess, ok
from tests.framework.guests import guest_path
from tests.framework.process import gone

pytestmark = pytest.mark.usefixtures("kvm", "guests")

READY_SEC = 60.0  # a standby's interpreter and imports: well under a second here, minutes in the lane


def create(d, name, guest="idle", memory=32):
    ok(d.ctl("vm", "create", name, "--kernel", guest_path(guest), "--memory", str(memory)))


def standby_info(d) -> dict:
    return json.loads(ok(d.ctl("system", "info", "--json")))["standby_workers"]


def wait_ready(d, n: int = 1, timeout: float = READY_SEC) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = standby_info(d)
        if info["ready"] >= n:
            return info
        assert time.monotonic() < deadline, "no %d standby worker(s) ready within %.0f s: %s" % (n, timeout, info)
        time.sleep(0.2)


def standby_children(d):
    return [p for p in psutil.Process(d.proc.proc.pid).children()
            if "--standby" in (p.cmdline() or [])]


def shared_kib(pid: int) -> int:
    """Resident KiB of `pid` that other processes map too (smaps_rollup: Shared_Clean + Shared_Dirty)."""
    fields = {}
    for line in open("/proc/%d/smaps_rollup" % pid):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Shared_Clean"] + fields["Shared_Dirty"]


def test_a_start_forks_its_worker_from_the_ready_standby_which_runs_the_vm_as_a_cold_worker_would(daemon):
    ready = wait_ready(daemon)
    assert ready["wanted"] == 1 and len(ready["pids"]) == 1 and len(ready["spares"]) == 1
    standby, spare = ready["pids"][0], ready["spares"][0]
    assert sorted(p.pid for p in standby_children(daemon)) == sorted([standby, spare]), "the spare: ours too"
    assert "1 of 1 workers ready to take a VM's start, 1 spare(s) sandboxed ahead" in ok(
        daemon.ctl("system", "info"))
    # The host's KSM, which would merge the pages workers copy from their standby, as the kernel says.
    assert json.loads(ok(daemon.ctl("system", "info", "--json")))["ksm"]["run"] == int(
        open("/sys/kernel/mm/ksm/run").read())

    create(daemon, "warm")
    ok(daemon.ctl("vm", "start", "warm"))
    worker = daemon.vm("warm")["pid"]
    assert worker == spare and "--standby" in psutil.Process(worker).cmdline(), "the standby's spare took it"
    assert spare not in wait_ready(daemon)["spares"], "tenboxd no longer counts it a spare"
    assert psutil.Process(worker).ppid() == daemon.proc.proc.pid, "re-parented to tenboxd, the subreaper"
    assert os.getsid(worker) == worker
    daemon.wait_console("warm", "idle: ready")
    r = daemon.ctl("vm", "console", "warm", input=b"from a standby\n", timeout=30)
    assert b"echo: from a standby" in r.stdout, r.stderr
    # Its stdout and stderr are the VM's runtime.log, as a cold worker's; its stdin is no socket.
    assert os.readlink("/proc/%d/fd/2" % worker).endswith("/logs/runtime.log")
    assert os.readlink("/proc/%d/fd/0" % worker) == "/dev/null"
    events = ok(daemon.ctl("events", "--since", "0", "--no-follow"))
    assert "worker pid %d, a standby" % worker in events
    # The interpreter and tenbox's modules are the standby's pages, mapped by both.
    assert shared_kib(worker) > 8 * 1024, shared_kib(worker)

    # The same standby serves the next start, with its next spare.
    again = wait_ready(daemon)
    assert again["pids"] == [standby] and len(again["spares"]) == 1

    # The exit status reaches tenboxd as a child's: a guest poweroff is a stop, not a crash...
    create(daemon, "off", guest="poweroff")
    ok(daemon.ctl("vm", "start", "off"))
    # The guest may power off before vm.info is read, so its worker's pid comes from the start's event.
    off_pid = again["spares"][0]
    assert "vm.start (worker pid %d, a standby)" % off_pid in ok(
        daemon.ctl("events", "--since", "0", "--no-follow"))
    off = daemon.wait_state("off", "stopped", 30)
    assert off.get("last_failure") is None, off
    assert gone(off_pid) and not psutil.pid_exists(off_pid), "reaped by tenboxd"
    # ...and a killed worker is reported with its signal.
    os.kill(worker, signal.SIGKILL)
    crashed = daemon.wait_state("warm", "crashed", 30)
    assert crashed["last_failure"]["signal"] == "SIGKILL", crashed
    assert psutil.Process(standby).is_running() and wait_ready(daemon)["pids"] == [standby]


def test_a_standby_that_died_is_replaced_and_the_start_meanwhile_runs_cold(daemon):
    first = wait_ready(daemon)["pids"][0]
    os.kill(first, signal.SIGKILL)
    assert gone(first)
    create(daemon, "cold")
    ok(daemon.ctl("vm", "start", "cold"))
    v = daemon.vm("cold")
    assert v["state"] == "running" and v["pid"] != first
    assert "--vm-id" in psutil.Process(v["pid"]).cmdline(), "started cold, with its command line"
    daemon.wait_console("cold", "idle: ready")
    assert "standby worker pid %d ended on its own" % first in daemon.proc.errors
    ok(daemon.ctl("vm", "stop", "cold"))


def test_standbys_end_with_tenboxd_stopped_or_killed_and_vms_run_on(tmp_path):
    d = DaemonProcess(tmp_path / "d")
    try:
        d.start()
        standby = wait_ready(d)["pids"][0]
        create(d, "keep")
        ok(d.ctl("vm", "start", "keep"))
        worker = d.vm("keep")["pid"]
        assert worker != standby and "--standby" in psutil.Process(worker).cmdline()
        spares = wait_ready(d)["spares"]
        assert len(spares) == 1
        assert d.stop() == 0
        assert gone(standby), "a stopped tenboxd's standby does not stay"
        assert gone(spares[0]), "nor its spare"
        assert psutil.pid_exists(worker) and not gone(worker, 0.5), "the VM it took runs on"

        d.start()
        assert d.wait_state("keep", "running", 15)["pid"] == worker, "adopted by the next tenboxd"
        ready = wait_ready(d)
        d.kill9()
        assert gone(ready["pids"][0]), "a killed tenboxd's standby sees its socket end and exits"
        assert gone(ready["spares"][0]), "and its spare with it"
        assert psutil.pid_exists(worker) and not gone(worker, 0.5)
    finally:
        d.cleanup()


def test_no_standby_with_zero_and_a_bad_count_is_refused_in_one_line(tmp_path):
    d = DaemonProcess(tmp_path / "off", extra_env={"TENBOX_STANDBY_WORKERS": "0"})
    try:
        d.start()
        assert standby_info(d) == {"wanted": 0, "ready": 0, "pids": [], "spares": []}
        assert "off (TENBOX_STANDBY_WORKERS=0)" in ok(d.ctl("system", "info"))
        create(d, "plain")
        ok(d.ctl("vm", "start", "plain"))
        assert d.vm("plain")["state"] == "running" and standby_children(d) == []
        ok(d.ctl("vm", "stop", "plain"))
    finally:
        d.cleanup()
    bad = DaemonProcess(tmp_path / "bad", extra_env={"TENBOX_STANDBY_WORKERS": "lots"})
    try:
        bad.start(wait=False)
        rc = bad.proc.wait_exit(30)
        assert rc != 0
        lines = [l for l in bad.proc.errors.splitlines() if l.strip()]
        assert any("TENBOX_STANDBY_WORKERS='lots': give a whole number in 0..16" in l for l in lines), lines
        assert "Traceback" not in bad.proc.errors
    finally:
        bad.cleanup()


def test_a_ready_standby_has_built_and_dropped_a_vm_and_holds_nothing_of_it(daemon):
    """machine.warm_up ran before READY (the restore's first-use costs, paid once) and closed all it opened."""
    pid = wait_ready(daemon)["pids"][0]
    held = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]
    assert not [h for h in held if h == "/dev/kvm" or "kvm" in h], held
    maps = open("/proc/%d/maps" % pid).read()
    assert "kvm-vcpu" not in maps, "the warm-up's vCPU mapping is still there"
    assert len(psutil.Process(pid).threads()) == 1, "a standby forks: it must stay single-threaded"
