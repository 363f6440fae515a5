"""Races and traps in tenboxd, each on a real daemon: starts and creates during host.update, an apt
that outlives its timeout, one name created twice at once, ids reused as names, a broken vm.json
with a live worker, and /tmp paths another user made first (docs/security.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.framework.guests import guest_path
from tests.framework.repo import PYTHON, REPO, repo_env
from tests.framework.users import system_user, unique_name

pytestmark = pytest.mark.usefixtures("kvm", "guests")

# Stubs for what a test host is not: a dpkg-managed installation whose apt takes its time. The
# daemon is otherwise real. A vm.edit naming a disk in a folder called "slow" holds the VM's lock
# SLOW seconds (in its disk probe), so that a vm.start can queue behind it.
UPDATER_STUBS = r"""
import asyncio, inspect
import tenbox_supervisor.updater as U
import tenbox_supervisor.vm_api as V

def _answer(real, value):  # the stub has the real function's kind: a coroutine function or not
    async def answer_async(*args, **kw):
        return value
    return answer_async if inspect.iscoroutinefunction(real) else (lambda *args, **kw: value)

U.unmanaged_reason, U.dpkg_version = _answer(U.unmanaged_reason, None), _answer(U.dpkg_version, "1.0")
U.APT_TIMEOUT_SEC, U.APT_STOP_TIMEOUT_SEC, U.APT_SCRIPT = %(timeout)r, %(stop)r, %(script)r
_probe = V.run_imagetool

async def _slow_probe(*args, **kw):
    if any("/slow/" in a for a in args):
        await asyncio.sleep(%(slow)r)
    return await _probe(*args, **kw)

V.run_imagetool = _slow_probe
"""


def stubbed(make_daemon, script: str, timeout: float = 600.0, stop: float = 5.0, slow: float = 4.0):
    d = make_daemon("stubbed", preamble=UPDATER_STUBS % {"timeout": timeout, "stop": stop, "script": script,
                                                         "slow": slow})
    d.start()
    return d


class Call(threading.Thread):
    """A request on its own connection, answered in the background; .reply and .at (seconds after start)."""

    def __init__(self, d, type_: str, **payload) -> None:
        super().__init__(daemon=True)
        self.d, self.type, self.payload = d, type_, payload
        self.reply = None
        self.at = None
        self.t0 = time.monotonic()
        self.start()

    def run(self) -> None:
        self.reply = self.d.call(self.type, **self.payload)
        self.at = time.monotonic() - self.t0

    def result(self, timeout: float = 60) -> dict:
        self.join(timeout)
        assert self.reply is not None, "%s did not answer within %.0f s" % (self.type, timeout)
        return self.reply


def test_a_start_queued_behind_the_vm_lock_does_not_run_during_host_update(make_daemon, tmp_path):
    """vm.start passes the update check, waits for the VM's lock (a vm.edit holds it), and host.update
    begins meanwhile: once it has the lock the start is refused with update_in_progress, and no
    worker runs. vm.create is refused during the update too; both work again after it."""
    d = stubbed(make_daemon, 'sleep 6; echo 0 > "$2"')
    assert d.call("vm.create", name="q", kernel=guest_path("idle"), memory_mb=32)["ok"]
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "d.raw").write_bytes(b"\0" * 4096)
    edit = Call(d, "vm.edit", vm_id="q", disks=[str(slow / "d.raw")])
    time.sleep(0.5)
    start = Call(d, "vm.start", vm_id="q")
    time.sleep(0.5)
    update = Call(d, "host.update")
    time.sleep(0.5)
    created = d.call("vm.create", name="during", kernel=guest_path("idle"), memory_mb=32)
    assert created["error_code"] == "update_in_progress", created
    assert edit.result()["ok"]
    refused = start.result()
    assert refused["error_code"] == "update_in_progress", refused
    assert d.vm("q")["state"] == "stopped" and d.vm("q")["pid"] is None
    assert update.result()["error_code"] == "version_unchanged"  # the stub's dpkg says 1.0 before and after
    assert d.call("vm.create", name="after", kernel=guest_path("idle"), memory_mb=32)["ok"]
    assert d.call("vm.start", vm_id="q")["ok"]


def test_an_apt_that_outlives_its_timeout_is_stopped_and_starts_wait_until_it_has_ended(make_daemon, tmp_path):
    """apt (a stub) runs past APT_TIMEOUT_SEC and takes 3 s to end after SIGTERM: tenboxd stops its
    process group, answers apt_failed only once nothing of it runs, and refuses vm.start until then."""
    pidfile = tmp_path / "apt.pids"
    script = 'trap "sleep 3; exit 1" TERM; echo $$ >> %s; sleep 60 & echo $! >> %s; wait' % (pidfile, pidfile)
    d = stubbed(make_daemon, script, timeout=2.0)
    assert d.call("vm.create", name="v", kernel=guest_path("idle"), memory_mb=32)["ok"]
    update = Call(d, "host.update")
    d.proc.wait_for_stderr("apt did not finish within 2 s; stopping it", 15)
    time.sleep(1)
    assert d.call("vm.start", vm_id="v")["error_code"] == "update_in_progress"
    reply = update.result()
    assert reply["error_code"] == "apt_failed" and "it was stopped" in reply["error"], reply
    assert update.at >= 2 + 3 - 0.5, "answered before apt had ended (%.1f s)" % update.at
    pids = [int(p) for p in pidfile.read_text().split()]
    assert pids and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                            for p in pids), pids
    assert d.call("vm.start", vm_id="v")["ok"]


def test_one_name_created_twice_at_once_is_created_once(daemon, tmp_path):
    """Six concurrent vm.create with one name (each making an overlay, so each awaits a child
    process): one VM, five vm_exists."""
    template = tmp_path / "t.raw"
    template.write_bytes(b"\0" * (1 << 20))
    barrier = threading.Barrier(6)
    replies = []

    def create():
        barrier.wait()
        replies.append(daemon.call("vm.create", name="same", kernel=guest_path("idle"), template=str(template)))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.get("error_code", "ok") for r in replies) == ["ok"] + ["vm_exists"] * 5, replies
    assert [v["name"] for v in daemon.call("vm.list")["payload"]["vms"]] == ["same"]


def test_an_id_is_never_a_name(daemon):
    """A VM may not be created, or renamed, with another VM's id as its name."""
    a = daemon.call("vm.create", name="a", kernel=guest_path("idle"))["payload"]["id"]
    assert daemon.call("vm.create", name=a, kernel=guest_path("idle"))["error_code"] == "vm_exists"
    assert daemon.call("vm.create", name="b", kernel=guest_path("idle"))["ok"]
    r = daemon.call("vm.edit", vm_id="b", name=a)
    assert r["error_code"] == "vm_exists", r
    assert daemon.call("vm.edit", vm_id="b", name="c")["ok"]
    assert daemon.vm(a)["name"] == "a"


def test_a_broken_vm_json_with_a_live_worker_is_not_deleted_under_it(daemon):
    """tenboxd restarts while a VM runs and finds its vm.json unreadable: vm.delete refuses the
    entry while its worker runs, and with force stops the worker first."""
    vm_id = daemon.call("vm.create", name="b", kernel=guest_path("idle"), memory_mb=32)["payload"]["id"]
    assert daemon.call("vm.start", vm_id="b")["ok"]
    pid = daemon.vm("b")["pid"]
    assert daemon.stop() == 0
    (daemon.data_dir / "vms" / vm_id / "vm.json").write_text("{not json")
    daemon.start()
    assert daemon.vm(vm_id)["state"] == "broken"
    daemon.proc.wait_for_stderr("vm.json is unreadable but its worker pid %d still runs" % pid, 5)
    r = daemon.call("vm.delete", vm_id=vm_id)
    assert r["error_code"] == "vm_running" and "pid %d" % pid in r["error"], r
    assert psutil.pid_exists(pid) and (daemon.data_dir / "vms" / vm_id).is_dir()
    assert daemon.call("vm.delete", vm_id=vm_id, force=True)["ok"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (daemon.data_dir / "vms" / vm_id).exists()


# Run as the other user: listen on a unix socket at argv[1] until stdin closes.
LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
print("listening", flush=True)
sys.stdin.read()
"""


def test_tmp_fallbacks_made_by_another_user_are_refused(tmp_path):
    """Another user made /tmp/tenbox-<uid>.sock and /tmp/tenbox-<uid> first: the CLI refuses that
    socket (exit 3, naming its owner) and a per-user tenboxd refuses that run directory."""
    with system_user(unique_name("tbxa")) as mallory, system_user(unique_name("tbxb")) as bob:
        sock, run_dir = "/tmp/tenbox-%d.sock" % bob.uid, "/tmp/tenbox-%d" % bob.uid
        data = Path(tempfile.mkdtemp(prefix="tbx-bob-"))
        os.chown(str(data), bob.uid, bob.gid)
        listener = subprocess.Popen(["runuser", "-u", mallory.name, "--", PYTHON, "-c", LISTENER, sock],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        try:
            assert listener.stdout.readline() == b"listening\n"
            env = {k: v for k, v in repo_env().items() if k not in ("TENBOX_SOCK", "XDG_RUNTIME_DIR")}
            cli = subprocess.run(["runuser", "-u", bob.name, "--", PYTHON, "-m", "tenbox_ctl", "vm", "ls"],
                                 env=dict(env, TENBOX_SOCK=sock), capture_output=True, timeout=60, cwd=str(REPO))
            assert cli.returncode == 3, cli.stderr
            assert ("refusing %s: it belongs to uid %d" % (sock, mallory.uid)).encode() in cli.stderr
            subprocess.run(["runuser", "-u", mallory.name, "--", "mkdir", "-m", "0777", run_dir], check=True)
            daemon = subprocess.run(["runuser", "-u", bob.name, "--", PYTHON, "-m", "tenbox_supervisor", "--data-dir",
                                     str(data / "d"), "--socket", str(data / "s.sock")], env=env,
                                    capture_output=True, timeout=60, cwd=str(REPO))
            assert daemon.returncode == 1, daemon.stderr
            assert ("refusing the run directory %s: it belongs to uid %d" % (run_dir, mallory.uid)).encode() \
                in daemon.stderr, daemon.stderr
        finally:
            listener.stdin.close()
            listener.wait(10)
            for path in (sock, run_dir):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.lexists(path):
                    os.unlink(path)
            shutil.rmtree(str(data), ignore_errors=True)
