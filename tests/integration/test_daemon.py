"""tenboxd and tenboxctl for real: a daemon on private paths, real workers on /dev/kvm, test guests as VMs."""

import json
import os
import signal
import socket
import time

import psutil
import pytest

from tests.framework.guests import guest_path
from tests.framework.users import set_groups, system_group, system_user, unique_name

pytestmark = pytest.mark.usefixtures("kvm", "guests")


def create(d, name, guest="idle", memory=32, cpus=1, cmdline=None):
    args = ["vm", "create", name, "--kernel", guest_path(guest), "--memory", str(memory), "--cpus", str(cpus)]
    if cmdline is not None:
        args += ["--cmdline", cmdline]
    r = d.ctl(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def start(d, name):
    r = d.ctl("vm", "start", name)
    assert r.returncode == 0, r.stderr
    return d.vm(name)


def test_round_trip_create_start_ls_console_logs_stop_rm(daemon):
    vm_id = create(daemon, "web")
    assert len(vm_id) == 12
    assert start(daemon, "web")["state"] == "running"
    daemon.wait_console("web", "idle: ready")
    ls = daemon.ctl("vm", "ls").stdout.decode()
    header, row = ls.splitlines()[0], [l for l in ls.splitlines() if "web" in l][0]
    assert header.split() == ["ID", "NAME", "STATE", "CPUS", "MEMORY", "UPTIME", "AUTOSTART", "RESTART", "LAST",
                              "FAILURE"]
    assert row.split()[:4] == [vm_id, "web", "running", "1"]
    listed = json.loads(daemon.ctl("vm", "ls", "--json").stdout)
    assert listed[0]["id"] == vm_id and listed[0]["pid"] > 0
    # The console: input reaches the guest, its answer comes back; stdin EOF ends the session, the VM runs on.
    r = daemon.ctl("vm", "console", "web", input=b"hello console\n", timeout=30)
    assert r.returncode == 0, r.stderr
    assert b"idle: ready" in r.stdout  # the console's recent past is replayed on attach
    assert b"echo: hello console" in r.stdout
    logs = daemon.ctl("vm", "logs", "web", "--lines", "50").stdout.decode()
    assert "idle: ready" in logs
    daemon.wait_console("web", "echo: hello console")
    assert daemon.ctl("vm", "stop", "web").returncode == 0
    assert daemon.vm("web")["state"] == "stopped"
    assert daemon.ctl("vm", "rm", "web").returncode == 0
    assert json.loads(daemon.ctl("vm", "ls", "--json").stdout) == []
    assert not (daemon.data_dir / "vms" / vm_id).exists()


def test_guest_poweroff_is_seen_as_stopped(daemon):
    create(daemon, "p", guest="poweroff")
    daemon.ctl("vm", "start", "p")
    v = daemon.wait_state("p", "stopped")
    assert v["last_failure"] is None


def test_guest_reboot_goes_through_rebooting_to_running(daemon):
    create(daemon, "r", guest="reset", cmdline="console=ttyS0 reset=kbd")
    daemon.ctl("vm", "start", "r")
    daemon.wait_state("r", "stopped")
    log = daemon.proc.errors
    assert "running -> rebooting" in log and "rebooting -> running" in log
    daemon.wait_console("r", "reset: boot 2")


def test_vm_reboot_command_resets_the_guest(daemon):
    create(daemon, "rb")
    start(daemon, "rb")
    daemon.wait_console("rb", "idle: ready")
    assert daemon.ctl("vm", "reboot", "rb").returncode == 0
    deadline = time.monotonic() + 30
    while daemon.call("vm.logs", vm_id="rb", lines=100)["payload"]["lines"].count("idle: ready") < 2:
        assert time.monotonic() < deadline, "the guest did not boot again"
        time.sleep(0.1)
    assert daemon.vm("rb")["state"] == "running"


def test_shutdown_presses_the_power_button(daemon):
    create(daemon, "s")
    start(daemon, "s")
    daemon.wait_console("s", "idle: ready")
    r = daemon.ctl("vm", "shutdown", "s", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["graceful"] is True
    daemon.wait_console("s", "idle: power button")
    assert daemon.vm("s")["state"] == "stopped"


def test_shutdown_escalates_to_a_hard_stop_when_the_guest_ignores_it(daemon):
    create(daemon, "deaf", guest="echo")
    start(daemon, "deaf")
    daemon.wait_console("deaf", "echo: ready")
    t0 = time.monotonic()
    r = daemon.ctl("vm", "shutdown", "deaf", "--timeout", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["graceful"] is False
    assert time.monotonic() - t0 < 20
    assert daemon.vm("deaf")["state"] == "stopped"


def test_kill_9_one_worker_of_three_crashes_only_that_vm(daemon):
    for n in ("a", "b", "c"):
        create(daemon, n)
        start(daemon, n)
    for n in ("a", "b", "c"):
        daemon.wait_console(n, "idle: ready")
    os.kill(daemon.vm("b")["pid"], signal.SIGKILL)
    v = daemon.wait_state("b", "crashed", 15)
    assert v["last_failure"]["code"] == "killed" and v["last_failure"]["signal"] == "SIGKILL"
    assert "idle: ready" in v["last_failure"]["console"]
    for n in ("a", "c"):
        assert daemon.vm(n)["state"] == "running"
        daemon.ctl("vm", "console", n, input=b"still %s\n" % n.encode(), timeout=30)
        daemon.wait_console(n, "echo: still %s" % n)
    assert "LAST FAILURE" in daemon.ctl("vm", "ls").stdout.decode()
    assert "killed" in [l for l in daemon.ctl("vm", "ls").stdout.decode().splitlines() if " b " in l][0]


def test_kill_9_tenboxd_keeps_vms_and_a_new_daemon_adopts_them(daemon):
    for n in ("x", "y"):
        create(daemon, n)
        start(daemon, n)
        daemon.wait_console(n, "idle: ready")
    pids = {n: daemon.vm(n)["pid"] for n in ("x", "y")}
    daemon.kill9()
    time.sleep(1)
    for pid in pids.values():
        assert psutil.pid_exists(pid)
    assert daemon.socket.exists()  # stale socket left behind
    daemon.start()
    for n in ("x", "y"):
        v = daemon.wait_state(n, "running", 15)
        assert v["pid"] == pids[n]
    deadline = time.monotonic() + 15
    while "re-adopted" not in daemon.proc.errors and "connected" not in daemon.proc.errors:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The console waits for x's worker to reconnect if it has not yet: typed input is not lost.
    daemon.ctl("vm", "console", "x", input=b"after restart\n", timeout=30)
    daemon.wait_console("x", "echo: after restart")
    for n in ("x", "y"):
        assert daemon.ctl("vm", "stop", n).returncode == 0
        assert daemon.vm(n)["state"] == "stopped"
        assert not psutil.pid_exists(pids[n]) or psutil.Process(pids[n]).status() == psutil.STATUS_ZOMBIE


def test_worker_that_died_while_no_daemon_ran_is_recorded_as_crashed(daemon):
    create(daemon, "gone")
    start(daemon, "gone")
    pid = daemon.vm("gone")["pid"]
    daemon.kill9()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    daemon.start()
    v = daemon.vm("gone")
    assert v["state"] == "crashed"
    assert v["last_failure"]["code"] == "worker_lost"


def test_a_stalled_worker_is_declared_lost(daemon):
    create(daemon, "frozen")
    create(daemon, "fine")
    start(daemon, "frozen")
    start(daemon, "fine")
    pid = daemon.vm("frozen")["pid"]
    os.kill(pid, signal.SIGSTOP)
    v = daemon.wait_state("frozen", "crashed", 20)
    assert v["last_failure"]["code"] == "heartbeat_lost"
    assert daemon.vm("fine")["state"] == "running"


def test_a_second_daemon_on_the_same_socket_or_data_dir_refuses(daemon, make_daemon):
    other = make_daemon("other")
    other.socket = daemon.socket
    p = other.start(wait=False)
    assert p.wait_exit(20) == 1
    assert "another tenboxd" in p.errors and str(daemon.socket) in p.errors
    same_data = make_daemon("same")
    same_data.data_dir = daemon.data_dir
    p = same_data.start(wait=False)
    assert p.wait_exit(20) == 1
    assert "another tenboxd" in p.errors and "data directory" in p.errors
    assert daemon.call("vm.list")["ok"]


def test_corrupt_vm_json_is_listed_as_broken(daemon):
    vm_id = create(daemon, "ok1")
    bad = daemon.data_dir / "vms" / "badvm1"
    bad.mkdir()
    (bad / "vm.json").write_text("{not json")
    empty = daemon.data_dir / "vms" / "emptyvm"
    empty.mkdir()
    (empty / "vm.json").write_text("")
    daemon.stop()
    daemon.start()
    vms = {v["id"]: v for v in daemon.call("vm.list")["payload"]["vms"]}
    assert vms[vm_id]["state"] == "stopped"
    assert vms["badvm1"]["state"] == "broken" and "not valid JSON" in vms["badvm1"]["error"]
    assert vms["emptyvm"]["state"] == "broken"
    assert "broken" in daemon.ctl("vm", "ls").stdout.decode()
    assert daemon.ctl("vm", "rm", "badvm1").returncode == 0
    assert "badvm1" not in {v["id"] for v in daemon.call("vm.list")["payload"]["vms"]}


def test_vm_create_validates_its_input(daemon, tmp_path):
    create(daemon, "dup")
    cases = [
        (["vm", "create", "dup", "--kernel", guest_path("idle")], "vm_exists"),
        (["vm", "create", "bad_name!", "--kernel", guest_path("idle")], "invalid_argument"),
        (["vm", "create", "nokernel", "--kernel", str(tmp_path / "missing")], "file_missing"),
        (["vm", "create", "dirkernel", "--kernel", str(tmp_path)], "Error"),
        (["vm", "create", "huge", "--kernel", guest_path("idle"), "--memory", str(1 << 30)], "invalid_argument"),
    ]
    for args, fragment in cases:
        r = daemon.ctl(*args)
        assert r.returncode in (1, 2), (args, r.returncode)
        assert fragment in r.stderr.decode(), (args, r.stderr)
        assert b"Traceback" not in r.stderr
    r = daemon.call("vm.create", name="x", kernel=guest_path("idle"), cpus=65)
    assert r["error_code"] == "invalid_argument"
    r = daemon.call("vm.create", name="x", kernel="relative/path")
    assert r["error_code"] == "invalid_argument"


def test_start_failure_is_reported_with_the_runtime_reason(daemon, tmp_path):
    notkernel = tmp_path / "notes.txt"
    notkernel.write_text("hello\n" * 100)
    create(daemon, "bad")
    daemon.call("vm.edit", vm_id="bad", kernel=str(notkernel))
    r = daemon.ctl("vm", "start", "bad")
    assert r.returncode == 1
    assert "not a Linux kernel" in r.stderr.decode()
    v = daemon.vm("bad")
    assert v["state"] == "crashed" and v["last_failure"]["code"] == "start_failed"


def test_edit_needs_a_stopped_vm_for_hardware_changes(daemon):
    create(daemon, "ed")
    start(daemon, "ed")
    r = daemon.ctl("vm", "edit", "ed", "--memory", "64")
    assert r.returncode == 1 and b"vm_running" in r.stderr
    assert daemon.ctl("vm", "edit", "ed", "--name", "renamed").returncode == 0
    daemon.ctl("vm", "stop", "renamed")
    assert daemon.ctl("vm", "edit", "renamed", "--memory", "64", "--cpus", "2").returncode == 0
    v = daemon.vm("renamed")
    assert (v["memory_mb"], v["cpus"]) == (64, 2)
    spec = json.loads((daemon.data_dir / "vms" / v["id"] / "vm.json").read_text())
    assert (spec["name"], spec["memory_mb"]) == ("renamed", 64)


def test_rm_refuses_a_running_vm_unless_forced(daemon):
    create(daemon, "busy")
    start(daemon, "busy")
    r = daemon.ctl("vm", "rm", "busy")
    assert r.returncode == 1 and b"stop it first" in r.stderr
    assert daemon.ctl("vm", "rm", "busy", "--force").returncode == 0


def test_mutating_requests_log_the_peer_credentials(daemon):
    create(daemon, "cred")
    daemon.proc.wait_for_stderr("request vm.create cred from uid=0 gid=0 pid=", 10)


def test_silent_and_half_finished_clients_do_not_block_others(daemon):
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(daemon.socket))
    half = socket.socket(socket.AF_UNIX)
    half.connect(str(daemon.socket))
    half.sendall(b'{"id": 1, "type": "vm.li')
    t0 = time.monotonic()
    assert daemon.call("vm.list")["ok"]
    assert time.monotonic() - t0 < 2
    half.close()
    assert daemon.call("system.info")["ok"]
    silent.close()


def test_a_request_over_1_mib_is_refused(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(b'{"type": "vm.list", "pad": "' + b"x" * (1 << 20) + b'"}\n')
    reply = json.loads(s.makefile("rb").readline())
    assert reply["error_code"] == "request_too_large"
    s.close()
    assert daemon.call("vm.list")["ok"]


@pytest.mark.parametrize("line, code", [
    (b"not json\n", "bad_json"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"type": "vm.nope"}\n', "unknown_request"),
    (b'{"id": 5}\n', "unknown_request"),
    (b'{"type": "vm.start"}\n', "invalid_argument"),
    (b'{"type": "vm.start", "vm_id": "../../etc"}\n', "invalid_argument"),
    (b'{"type": "vm.start", "vm_id": "nosuchvm"}\n', "vm_not_found"),
    (b'{"type": "vm.create", "payload": {"name": "n", "kernel": 5}}\n', "invalid_argument"),
    (b'{"type": "vm.logs", "vm_id": "x", "lines": "many"}\n', "invalid_argument"),
    (b'{"type": "vm.create", "payload": []}\n', "bad_request"),
])
def test_bad_requests_get_error_replies(daemon, line, code):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(line)
    reply = json.loads(s.makefile("rb").readline())
    s.close()
    assert reply["ok"] is False and reply["error_code"] == code, reply


def test_fuzzed_requests_never_take_the_daemon_down(daemon):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=12,
    )
    types = st.sampled_from(["vm.list", "vm.create", "vm.start", "vm.stop", "vm.edit", "vm.delete", "vm.logs",
                             "vm.reboot", "doctor", "bogus", ""]) | st.text(max_size=12)
    requests = st.fixed_dictionaries({"type": types}, optional={"id": json_values, "payload": json_values,
                                                                "vm_id": json_values, "lines": json_values})
    raw = st.binary(max_size=200).filter(lambda b: b"\n" not in b and b.strip())  # a blank line is no request

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(requests.map(lambda r: json.dumps(r).encode()), raw))
    def poke(line):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(str(daemon.socket))
        try:
            s.sendall(line + b"\n")
            reply = s.makefile("rb").readline()
            if reply:
                obj = json.loads(reply)
                assert "ok" in obj
        finally:
            s.close()

    poke()
    assert daemon.call("vm.list")["ok"]
    assert daemon.proc.proc.poll() is None


def test_systemd_notify_ready_status_watchdog_stopping(make_daemon, tmp_path):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="tbx-n-"), "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(20)
    d = make_daemon("n", NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    d.start(wait=False)
    messages = []
    while not any("READY=1" in m for m in messages):
        messages.append(listener.recv(4096).decode())
    assert d.socket.exists()  # READY only once the socket listens
    assert any("STATUS=0 of 0 VMs running" in m for m in messages)
    create(d, "n1")
    start(d, "n1")
    worker = d.vm("n1")["pid"]
    env = open("/proc/%d/environ" % worker, "rb").read().split(b"\0")
    assert not any(e.startswith(b"NOTIFY_SOCKET=") for e in env)
    seen = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {"WATCHDOG=1", "STATUS=1 of 1 VMs running"} <= seen:
        for part in listener.recv(4096).decode().split("\n"):
            seen.add(part)
    assert "WATCHDOG=1" in seen and "STATUS=1 of 1 VMs running" in seen
    d.stop()
    rest = []
    try:
        while True:
            rest.append(listener.recv(4096).decode())
    except socket.timeout:
        pass
    assert any("STOPPING=1" in m for m in rest)
    listener.close()


def test_socket_permissions_with_a_real_group_and_user(make_daemon):
    import grp

    group = unique_name("tbxg")
    with system_group(group), system_user(unique_name("tbxu")) as user:
        d = make_daemon("perm", TENBOX_SOCKET_GROUP=group)
        d.start()
        st = os.stat(d.socket)
        assert st.st_mode & 0o777 == 0o660
        assert st.st_gid == grp.getgrnam(group).gr_gid
        assert os.stat(d.sock_dir).st_mode & 0o777 == 0o755
        r = d.ctl("vm", "ls", user=user.name)
        assert r.returncode == 4, r.stderr
        msg = r.stderr.decode()
        assert "permission denied on %s" % d.socket in msg and "tenbox group" in msg and "newgrp tenbox" in msg
        set_groups(user.name, [group])
        r = d.ctl("vm", "ls", user=user.name)
        assert r.returncode == 0, r.stderr
        assert b"ID" in r.stdout
        r = d.ctl("host", "update", user=user.name)  # group members manage VMs; only root updates the host
        assert r.returncode == 4 and b"root only" in r.stderr, r.stderr


def test_cli_says_when_the_daemon_is_not_running(daemon):
    daemon.stop()
    r = daemon.ctl("vm", "ls")
    assert r.returncode == 3
    assert b"tenboxd is not running" in r.stderr and str(daemon.socket).encode() in r.stderr


def test_stop_escalates_to_sigkill_when_the_worker_does_not_answer(daemon):
    create(daemon, "stuck")
    start(daemon, "stuck")
    pid = daemon.vm("stuck")["pid"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    r = daemon.ctl("vm", "stop", "stuck", "--timeout", "2")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    assert daemon.vm("stuck")["state"] == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    daemon.proc.wait_for_stderr("did not stop within 2s; killing it", 10)


def test_host_update_refuses_while_vms_run_and_on_an_unmanaged_install(daemon):
    create(daemon, "upd")
    start(daemon, "upd")
    r = daemon.call("host.update")
    assert r["error_code"] == "vms_running"
    assert r["running_vms"] == [{"vm_id": daemon.vm("upd")["id"], "name": "upd", "state": "running"}]
    cli = daemon.ctl("host", "update")
    assert cli.returncode == 1 and b"still running: upd" in cli.stderr
    daemon.ctl("vm", "stop", "upd")
    r = daemon.call("host.update")
    assert r["error_code"] == "update_disabled"
