"""Helpers for tests that run real tenbox processes (tests only).

`ConsoleProcess` runs a command, collects its output on a thread, and lets
a test wait for a line with a deadline; every process is killed at the end
of the test that started it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
GUEST_DIR = REPO / "tests" / "guests" / "out"


def runtime_argv(*args: str) -> List[str]:
    return [PYTHON, "-m", "tenbox_vmm", *args]


def guest_path(name: str, kind: str = "bzImage") -> str:
    return str(GUEST_DIR / ("%s.%s" % (name, kind)))


def repo_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NOTIFY_SOCKET", None)
    if extra:
        env.update(extra)
    return env


class ConsoleProcess:
    """A child process whose stdout we read line by line, with deadlines."""

    def __init__(self, argv: Sequence[str], env: Optional[dict] = None, stdin=subprocess.PIPE, **kw) -> None:
        self.argv = list(argv)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or repo_env(),
            cwd=str(REPO),
            start_new_session=True,
            **kw,
        )
        self._out = bytearray()
        self._err = bytearray()
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._reader, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._reader, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _reader(self, stream, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            with self._cond:
                buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode("utf-8", "replace")

    @property
    def errors(self) -> str:
        with self._cond:
            return self._err.decode("utf-8", "replace")

    def lines(self) -> List[str]:
        return self.output.replace("\r\n", "\n").split("\n")

    def wait_for(self, pattern: Union[str, "re.Pattern"], timeout: float = 30.0, start: int = 0) -> "re.Match":
        """Wait until stdout (from character `start`) matches `pattern`."""
        rx = re.compile(re.escape(pattern) if isinstance(pattern, str) else pattern.pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._out.decode("utf-8", "replace"), start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(
            "no %r within %.0fs (exit %s)\n--- stdout ---\n%s\n--- stderr ---\n%s"
            % (rx.pattern, timeout, self.proc.poll(), self.output[-4000:], self.errors[-4000:])
        )

    def wait_for_stderr(self, pattern: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while pattern not in self._err.decode("utf-8", "replace"):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError("no %r on stderr within %.0fs (exit %s)\n%s"
                                         % (pattern, timeout, self.proc.poll(), self.errors[-4000:]))
                self._cond.wait(min(left, 0.1))

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                "%s still running after %.0fs\n--- stdout ---\n%s\n--- stderr ---\n%s"
                % (self.argv[:4], timeout, self.output[-4000:], self.errors[-4000:])
            ) from None
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def guest_results(output: str, name: str) -> dict:
    """Parse a test guest's result protocol: {'ok': [...], 'not_ok': [...], 'info': {...}, 'verdict': ...}."""
    res = {"ok": [], "not_ok": [], "info": {}, "info_list": [], "verdict": None}
    for raw in output.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if line.startswith("ok - "):
            res["ok"].append(line[5:])
        elif line.startswith("not ok - "):
            res["not_ok"].append(line[9:])
        elif line.startswith("info - "):
            key, _, value = line[7:].partition("=")
            res["info"][key] = value
            res["info_list"].append((key, value))
        elif line.startswith("TENBOX-GUEST %s " % name):
            word = line.split()[2]
            if word in ("PASS", "FAIL"):
                res["verdict"] = word
    return res


class DaemonProcess:
    """A real tenboxd on private paths: its own data dir, run dir and socket."""

    def __init__(self, root: Path, extra_env: Optional[dict] = None) -> None:
        import tempfile

        self.root = root
        self.data_dir = root / "data"
        # ipc:// paths are limited to 107 bytes: keep the run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="tbx-run-"))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="tbx-sock-"))
        os.chmod(self.sock_dir, 0o755)
        self.socket = self.sock_dir / "tenbox.sock"
        self.extra_env = dict(extra_env or {})
        self.proc: Optional[ConsoleProcess] = None
        self.history: List[ConsoleProcess] = []

    def argv(self) -> List[str]:
        return [PYTHON, "-m", "tenbox_supervisor", "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                "--run-dir", str(self.run_dir)]

    def env(self) -> dict:
        return repo_env(dict({"TENBOX_NO_SCOPES": "1"}, **self.extra_env))

    def start(self, wait: bool = True, timeout: float = 20.0) -> ConsoleProcess:
        self.proc = ConsoleProcess(self.argv(), env=self.env(), stdin=subprocess.DEVNULL)
        self.history.append(self.proc)
        if wait:
            self.proc.wait_for_stderr("ready", timeout)
        return self.proc

    def ctl(self, *args: str, timeout: float = 120.0, user: Optional[str] = None, input: Optional[bytes] = None):
        argv = [PYTHON, "-m", "tenbox_ctl", *args]
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        env = repo_env({"TENBOX_SOCK": str(self.socket)})
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd=str(REPO),
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def call(self, type_: str, timeout: float = 120.0, **payload) -> dict:
        import json
        import socket as _socket

        s = _socket.socket(_socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(self.socket))
        try:
            s.sendall((json.dumps({"id": 1, "type": type_, "payload": payload}) + "\n").encode())
            return json.loads(s.makefile("rb").readline())
        finally:
            s.close()

    def vm(self, name: str) -> dict:
        for v in self.call("vm.list")["payload"]["vms"]:
            if v.get("name") == name or v["id"] == name:
                return v
        raise KeyError(name)

    def wait_state(self, name: str, states, timeout: float = 60.0) -> dict:
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            v = self.vm(name)
            if v["state"] in states:
                return v
            if time.monotonic() > deadline:
                raise AssertionError("VM %s is %s, not %s after %.0fs\n%s" % (name, v["state"], states, timeout,
                                                                           self.proc.errors[-3000:] if self.proc else ""))
            time.sleep(0.1)

    def kill9(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.proc.pid, signal.SIGKILL)
            self.proc.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.signal(signal.SIGTERM)
        return self.proc.wait(30)

    def cleanup(self) -> None:
        """Stop every worker this daemon's data dir knows about, then the daemon."""
        for p in self.history:
            p.close()
        import shutil

        for pidfile in self.data_dir.glob("vms/*/runtime.json"):
            try:
                import json

                pid = json.loads(pidfile.read_text()).get("pid")
                if pid:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        # Workers started by this daemon carry its data dir in their argv.
        try:
            import psutil

            for p in psutil.process_iter(["pid", "cmdline"]):
                if str(self.data_dir) in " ".join(p.info["cmdline"] or []):
                    p.kill()
        except Exception:
            pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def run_c_program(workdir: Path, lines: Sequence[str]) -> str:
    """Compile `lines` (one C file) with the host's gcc in workdir, run it, return its stdout."""
    src = Path(workdir) / "abi.c"
    src.write_text("\n".join(lines) + "\n")
    exe = Path(workdir) / "abi"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def load_pre_parsed(module: str, cdef: str, workdir: Path, as_name: str):
    """What `make ffi` emits for `module`, written into workdir and imported as `as_name`."""
    import importlib.util

    from tenbox_vmm import ffigen

    path = Path(workdir) / (module.rsplit(".", 1)[-1] + ".py")
    ffigen.emit(module, cdef, str(path))
    spec = importlib.util.spec_from_file_location(as_name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
