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
