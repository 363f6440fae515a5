"""A real tenboxd on private paths, for tests and benchmarks (tests and bench; root for the socket group tests).

`DaemonProcess` runs the supervisor from the tree with its own data dir,
run dir and socket, talks to it over the control socket (`call`) and
through the CLI (`ctl`), and kills every worker it started at cleanup().
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import psutil

from tenbox_supervisor.cgroups import Cgroups
from tenbox_supervisor.oshost import CGROUP_PREFIX
from tests.framework.process import ConsoleProcess, Pattern
from tests.framework.repo import PYTHON, REPO, repo_env

START_SEC = 20.0
STOP_SEC = 30.0
CALL_SEC = 120.0
STATE_POLL_SEC = 0.1
CONSOLE_LINES = 10000  # tenboxd's LOG_LINES_MAX: all of a test guest's console
ENDED = ("stopped", "crashed")


def control_request(sock: Union[str, Path], type_: str, timeout: float = CALL_SEC, **payload) -> dict:
    """One request on a tenboxd control socket (JSON lines); the whole reply."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock))
    try:
        s.sendall((json.dumps({"id": 1, "type": type_, "payload": payload}) + "\n").encode())
        return json.loads(s.makefile("rb").readline())
    finally:
        s.close()


def ok(r: "subprocess.CompletedProcess[bytes]") -> str:
    """The stdout of a CLI run that must have succeeded (else its output in the failure)."""
    assert r.returncode == 0, "exit %d\n%s%s" % (r.returncode, r.stdout.decode(errors="replace"),
                                                 r.stderr.decode(errors="replace"))
    return r.stdout.decode()


class DaemonProcess:
    """A real tenboxd on private paths: its own data dir, run dir and socket."""

    def __init__(self, root: Path, extra_env: Optional[Dict[str, str]] = None, preamble: Optional[str] = None) -> None:
        self.root = root
        # Python run in tenboxd's process before its main(): stubs for what a test cannot have for
        # real (a dpkg-managed installation, a slow apt), on an otherwise real daemon.
        self.preamble = preamble
        self.data_dir = root / "data"
        # ipc:// paths are limited to 107 bytes: keep the run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="tbx-run-"))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="tbx-sock-"))
        os.chmod(str(self.sock_dir), 0o755)
        self.socket = self.sock_dir / "tenbox.sock"
        self.extra_env = dict(extra_env or {})
        self.proc: Optional[ConsoleProcess] = None
        self.history: List[ConsoleProcess] = []

    def argv(self) -> List[str]:
        args = ["--data-dir", str(self.data_dir), "--socket", str(self.socket), "--run-dir", str(self.run_dir)]
        if self.preamble is None:
            return [PYTHON, "-m", "tenbox_supervisor"] + args
        runner = ("import sys; exec(sys.argv.pop(1)); from tenbox_supervisor.__main__ import main; "
                  "sys.exit(main(sys.argv[1:]))")
        return [PYTHON, "-c", runner, self.preamble] + args

    def env(self) -> Dict[str, str]:
        env = {"TENBOX_NO_SCOPES": "1"}
        if os.environ.get("TENBOX_LANE") == "inner":  # everything emulated: a worker's imports alone can take 30 s
            env["TENBOX_TEST_START_TIMEOUT_SEC"] = "120"
            env["TENBOX_TEST_HEARTBEAT_LIVENESS"] = "30"  # a guest reset there has kept a worker busy past 5 s
            # A standby's imports take tens of seconds there, on the cores the guest under test boots
            # on (CI5's tenboxd lane tests ran up to 2x slower with one); the standby path is tested
            # on this machine's KVM (test_daemon_standby.py). A test may still ask for one (extra_env).
            env["TENBOX_STANDBY_WORKERS"] = "0"
        return repo_env(dict(env, **self.extra_env))

    def start(self, wait: bool = True, timeout: float = START_SEC) -> ConsoleProcess:
        self.proc = ConsoleProcess(self.argv(), env=self.env(), stdin=subprocess.DEVNULL)
        self.history.append(self.proc)
        if wait:
            self.proc.wait_for_stderr("ready", timeout)
        return self.proc

    def ctl(self, *args: str, timeout: float = CALL_SEC, user: Optional[str] = None,
            input: Optional[bytes] = None) -> "subprocess.CompletedProcess[bytes]":
        """`tenbox ARGS...` against this daemon (as `user` with runuser)."""
        argv = [PYTHON, "-m", "tenbox_ctl", *args]
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        env = repo_env({"TENBOX_SOCK": str(self.socket)})
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd=str(REPO),
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def call(self, type_: str, timeout: float = CALL_SEC, **payload) -> dict:
        """One request on the control socket; the whole reply."""
        return control_request(self.socket, type_, timeout, **payload)

    def raw(self, line: bytes, timeout: float = CALL_SEC) -> bytes:
        """The daemon's reply to one request line exactly as sent (a method's own `timeout` included), as bytes."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(self.socket))
        try:
            s.sendall(line)
            return s.makefile("rb").readline()
        finally:
            s.close()

    def call_as(self, user: str, type_: str, timeout: float = CALL_SEC, **payload) -> dict:
        """One request on the control socket from another user's process (runuser); the whole reply."""
        code = ("import json, sys; from tests.framework.daemon import control_request; "
                "print(json.dumps(control_request(sys.argv[1], sys.argv[2], float(sys.argv[3]), **json.loads(sys.argv[4]))))")
        r = subprocess.run(["runuser", "-u", user, "--", PYTHON, "-c", code, str(self.socket), type_, str(timeout),
                            json.dumps(payload)], capture_output=True, timeout=timeout + 30, env=repo_env(),
                           cwd=str(REPO), stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return json.loads(r.stdout)

    def vm(self, name: str) -> dict:
        for v in self.call("vm.list")["payload"]["vms"]:
            if v.get("name") == name or v["id"] == name:
                return v
        raise KeyError(name)

    def wait_state(self, name: str, states: Union[str, Iterable[str]], timeout: float = 60.0) -> dict:
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            v = self.vm(name)
            if v["state"] in wanted:
                return v
            if time.monotonic() > deadline:
                raise AssertionError("VM %s is %s, not %s after %.0f s\n%s" % (
                    name, v["state"], wanted, timeout, self.proc.errors[-3000:] if self.proc else ""))
            time.sleep(STATE_POLL_SEC)

    def console(self, name: str) -> List[str]:
        """The VM's console log (vm.logs), up to CONSOLE_LINES lines."""
        return self.call("vm.logs", vm_id=name, lines=CONSOLE_LINES)["payload"]["lines"]

    def wait_console(self, name: str, text: Pattern, timeout: float = 30.0, count: int = 1,
                     poll: float = STATE_POLL_SEC) -> float:
        """Seconds until `text` is in `count` lines of the VM's console log (a pattern: `count` matches
        in the whole log); fails at once if the VM has ended."""
        def seen(lines: List[str]) -> int:
            if isinstance(text, str):
                return sum(text in ln for ln in lines)
            return len(text.findall("\n".join(lines)))

        started = time.monotonic()
        while True:
            lines = self.console(name)
            if seen(lines) >= count:
                return time.monotonic() - started
            state = self.vm(name)["state"]
            if state in ENDED:
                lines = self.console(name)  # the worker wrote its last lines before it ended
                if seen(lines) >= count:
                    return time.monotonic() - started
            if state in ENDED or time.monotonic() - started > timeout:
                # The reason comes again after the console: a summary that keeps only a failure's end
                # (the lane's, lane_plugin.FIRST_FAILURE_LINES) still says how the VM ended.
                why = "%r (%d time(s)) not on %s's console: the VM is %s after %.0f s" % (
                    getattr(text, "pattern", text), count, name, state, time.monotonic() - started)
                last = " (last failure: %s)" % json.dumps(self.vm(name).get("last_failure")) if state in ENDED else ""
                raise AssertionError("%s%s\n%s\n--- console ends; %s%s" % (
                    why, self._why_ended(name) if state in ENDED else "", "\n".join(lines[-60:]), why, last))
            time.sleep(poll)

    def _why_ended(self, name: str) -> str:
        """An ended VM's last failure and the end of its worker's runtime.log: how the worker ended."""
        v = self.vm(name)
        log = self.data_dir / "vms" / v["id"] / "logs" / "runtime.log"
        try:
            tail = log.read_text(errors="replace").splitlines()[-40:]
        except OSError as e:
            tail = ["(no runtime.log: %s)" % e.strerror]
        return "\nlast failure: %s\n--- its runtime.log (tail) ---\n%s\n--- its console (tail) ---" % (
            json.dumps(v.get("last_failure")), "\n".join(tail))

    def console_line(self, name: str, text: str) -> None:
        """Type one line into a VM's console (vm.console.attach, one console.input)."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(CALL_SEC)
        try:
            s.connect(str(self.socket))
            s.sendall((json.dumps({"id": 1, "type": "vm.console.attach", "payload": {"vm_id": name}}) + "\n").encode())
            f = s.makefile("rb")
            assert json.loads(f.readline())["ok"]
            s.sendall((json.dumps({"type": "console.input", "data_hex": (text + "\n").encode().hex()})
                       + "\n").encode())
            time.sleep(0.5)  # the daemon reads the input before it sees the connection close
        finally:
            s.close()

    def kill9(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.proc.pid, signal.SIGKILL)
            self.proc.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.signal(signal.SIGTERM)
        return self.proc.wait_exit(STOP_SEC)

    def cleanup(self) -> None:
        """Stop every worker this daemon's data dir knows about, then the daemon, and remove the workers'
        cgroups (a worker killed after its tenboxd leaves its cgroup for the next tenboxd of this data
        dir to sweep, and there is none)."""
        for p in self.history:
            p.close()
        killed = []
        for pidfile in self.data_dir.glob("vms/*/runtime.json"):
            try:
                pid = json.loads(pidfile.read_text()).get("pid")
                if pid:
                    killed.append(psutil.Process(pid))
                    killed[-1].kill()
            except (OSError, ValueError, psutil.Error):
                pass  # gone already, or a file cut short by a kill
        # Workers started by this daemon carry its data dir in their argv.
        for p in psutil.process_iter(["pid", "cmdline"]):
            if str(self.data_dir) in " ".join(p.info["cmdline"] or []):
                try:
                    p.kill()
                    killed.append(p)
                except psutil.NoSuchProcess:
                    pass
        _until_dead(killed, 10.0)
        cgroups = Cgroups()
        for vm_dir in self.data_dir.glob("vms/*"):
            cgroups.sweep("%s%s-" % (CGROUP_PREFIX, vm_dir.name))
        shutil.rmtree(str(self.run_dir), ignore_errors=True)
        shutil.rmtree(str(self.sock_dir), ignore_errors=True)


def _until_dead(procs: List[psutil.Process], timeout: float) -> None:
    """Wait until `procs` have ended (zombies count: their cgroups can go) without reaping any: one may be a
    test's own child, whose ConsoleProcess reaps it."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while time.monotonic() < deadline:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
