"""Child processes of tests and benchmarks: a console process with deadlines, a tool run to its end (tests and bench; any user).

`ConsoleProcess` is every VMM, daemon and back end a test or a benchmark
starts: the child runs in its own process group; threads collect its stdout
(the guest's serial console, carriage returns removed) and its stderr, and
note when each piece arrived, so that a benchmark can time a console line
to the read that brought it. A test waits for a regular expression on
either stream, with a deadline: the process's own (`deadline=` seconds
from its start) or the call's (`timeout=`), whichever comes first. A
pattern that ends in `$` matches only once its line has ended, so that a
number at the end of a line is never read half-way; one without matches as
soon as its text is there (a prompt has no line end).

Whatever goes wrong (a deadline passed, the output ended, the process would
not exit) kills the whole process group and raises `ProcessFailure`, whose
message ends with the tails of stderr and of the console: pytest shows it
as the test's failure, a benchmark as its error.
"""

from __future__ import annotations

import bisect
import codecs
import glob
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

from tests.framework.repo import REPO, repo_env

DEFAULT_WAIT_SEC = 30.0  # a wait without timeout= in a process without deadline=
KILL_WAIT_SEC = 10.0
JOIN_SEC = 5.0  # for the reader threads once the process is gone (a grandchild may hold the pipe)
# wait_exit polls: the boot benchmark times exits to the millisecond, and a
# blocking wait4 on a thread would race subprocess's own reaping.
EXIT_POLL_SEC = 0.001
READ_BYTES = 65536
CONSOLE_TAIL_CHARS = 12000
STDERR_TAIL_CHARS = 4000
STACKS_WAIT_SEC = 2.0  # a tenbox runtime failed alive: its threads' stacks (SIGUSR2) before it is killed
STACKS_MARK = "(most recent call first)"  # faulthandler's header, one per thread

Pattern = Union[str, "re.Pattern[str]"]


class ProcessFailure(AssertionError):
    """A child process did not do what its test or benchmark waited for (the message has its output's tails)."""


def tail(text: str, chars: int) -> str:
    if len(text) <= chars:
        return text
    return "[... %d characters ...]\n%s" % (len(text) - chars, text[-chars:])


def _compile(pattern: Pattern) -> "re.Pattern[str]":
    return re.compile(pattern, re.M) if isinstance(pattern, str) else pattern


def login_prompt(host: str) -> "re.Pattern[str]":
    """getty's "HOST login: " on a console, also when the kernel or cloud-init wrote up to three
    lines into it, seen in CI lanes: before the space ("tenbox[   63.89] SVM: ..." then " login: ")
    or after it ("beta [  131.38] cloud-init[330]: ..." then "login: ")."""
    return re.compile(r"\b%s(?=[ \[])(?: login:|[^\n]*\n(?:[^\n]*\n){0,2} ?login:)" % re.escape(host))


def _exit_code(status: int) -> int:
    """subprocess's convention: the exit status, or minus the signal that ended the process."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _Stream:
    """One pipe of the child, read on a thread: its text so far and when each read brought what."""

    def __init__(self, pipe: IO[bytes], cond: threading.Condition, name: str) -> None:
        self._pipe = pipe
        self._cond = cond
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pieces: List[str] = []
        self._length = 0
        self._ends: List[int] = []  # text length after each read
        self._times: List[float] = []  # time.monotonic() of each read
        self.eof = False
        self.thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        fd = self._pipe.fileno()
        while True:
            try:
                data = os.read(fd, READ_BYTES)
            except OSError:
                data = b""
            now = time.monotonic()
            text = self._decoder.decode(data, final=not data).replace("\r", "")
            with self._cond:
                if text:
                    self._pieces.append(text)
                    self._length += len(text)
                    self._ends.append(self._length)
                    self._times.append(now)
                if not data:
                    self.eof = True
                self._cond.notify_all()
            if not data:
                return

    def text(self) -> str:
        """Everything read so far (call with the condition held)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def arrival(self, end: int) -> float:
        """When the read that brought character end-1 returned (call with the condition held)."""
        return self._times[bisect.bisect_left(self._ends, max(end, 1))]


class ConsoleProcess:
    """A child process whose stdout is a console to wait on; see the module's docstring.

    `deadline`: seconds from the start that every wait is bounded by (None:
    each wait's own timeout, DEFAULT_WAIT_SEC when it gives none).
    `merge_stderr`: stderr goes into the console's pipe, so the two keep the
    order the child wrote them in; `errors` and `wait_for_stderr` then read
    that one stream.
    """

    def __init__(self, argv: Sequence[Union[str, Path]], deadline: Optional[float] = None,
                 env: Optional[Dict[str, str]] = None, cwd: Union[str, Path] = REPO,
                 stdin: Union[int, IO, None] = subprocess.PIPE, merge_stderr: bool = False) -> None:
        self.argv = [str(a) for a in argv]
        self.started = time.monotonic()
        self.deadline = None if deadline is None else self.started + deadline
        self.ended: Optional[float] = None  # when wait_exit saw the exit
        self.rusage = None  # the child's resource.struct_rusage, from wait_exit
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                                     env=repo_env() if env is None else env, cwd=str(cwd), start_new_session=True)
        self._out = _Stream(self.proc.stdout, self._cond, "console")
        # merge_stderr: one pipe, so what the child wrote to either comes in the order it wrote it.
        self._err = self._out if merge_stderr else _Stream(self.proc.stderr, self._cond, "stderr")

    # --- what it printed ---------------------------------------------------------------

    @property
    def output(self) -> str:
        """The console (stdout) so far, carriage returns removed."""
        with self._cond:
            return self._out.text()

    @property
    def errors(self) -> str:
        """stderr so far."""
        with self._cond:
            return self._err.text()

    def lines(self) -> List[str]:
        return self.output.split("\n")

    def elapsed(self) -> float:
        """Seconds from the start to the exit (to now while it runs)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    # --- waiting -----------------------------------------------------------------------

    def _until(self, timeout: Optional[float]) -> float:
        ends = [time.monotonic() + timeout] if timeout is not None else []
        if self.deadline is not None:
            ends.append(self.deadline)
        return min(ends) if ends else time.monotonic() + DEFAULT_WAIT_SEC

    def _search(self, stream: _Stream, rx: "re.Pattern[str]", until: float, count: int,
                start: int) -> "Tuple[Optional[re.Match[str]], str]":
        """(the count-th match, "") once there is one, else (None, why not) when the stream ends or `until` passes."""
        line_end = rx.pattern.endswith("$")
        with self._cond:
            while True:
                text = stream.text()
                found = list(itertools.islice(rx.finditer(text, start), count))
                # `$` is the end of a line: a line still arriving has not ended ("rc=1" of "rc=12").
                if len(found) == count and not (line_end and found[-1].end() == len(text) and not stream.eof):
                    return found[-1], ""
                if stream.eof:
                    return None, "ended"
                left = until - time.monotonic()
                if left <= 0:
                    return None, "timed out"
                self._cond.wait(min(left, 0.5))

    def _wait(self, stream: _Stream, where: str, pattern: Pattern, timeout: Optional[float], count: int,
              start: int) -> "re.Match[str]":
        __tracebackhide__ = True  # pytest: the failure shows at the test's line
        rx = _compile(pattern)
        m, why = self._search(stream, rx, self._until(timeout), count, start)
        if m is not None:
            return m
        if why == "ended":
            self.fail("its %s ended before %r (%d time(s))" % (where, rx.pattern, count))
        self.fail("no %r (%d time(s)) on its %s in time" % (rx.pattern, count, where))

    def wait_for(self, pattern: Pattern, timeout: Optional[float] = None, count: int = 1,
                 start: int = 0) -> "re.Match[str]":
        """The count-th match of pattern (a regular expression, multi-line mode) in the console from `start`."""
        __tracebackhide__ = True
        return self._wait(self._out, "console", pattern, timeout, count, start)

    def wait_for_stderr(self, pattern: Pattern, timeout: Optional[float] = None) -> "re.Match[str]":
        """The first match of pattern (a regular expression, multi-line mode) on stderr."""
        __tracebackhide__ = True
        return self._wait(self._err, "stderr", pattern, timeout, 1, 0)

    def poll_for(self, pattern: Pattern, timeout: float = 0.0) -> "Optional[re.Match[str]]":
        """The first match of pattern in the console if it comes within timeout, else None; never fails."""
        return self._search(self._out, _compile(pattern), time.monotonic() + timeout, 1, 0)[0]

    def seconds_to(self, pattern: Pattern, timeout: Optional[float] = None) -> float:
        """Seconds from the start to the console read that completed pattern's first match."""
        __tracebackhide__ = True
        m = self.wait_for(pattern, timeout)
        with self._cond:
            return self._out.arrival(m.end()) - self.started

    def seconds_to_stderr(self, pattern: Pattern, timeout: Optional[float] = None) -> float:
        """Seconds from the start to the stderr read that completed pattern's first match."""
        __tracebackhide__ = True
        m = self.wait_for_stderr(pattern, timeout)
        with self._cond:
            return self._err.arrival(m.end()) - self.started

    def _reap(self, until: float) -> bool:
        """Wait (polling) until the process exits or `until` passes; True once it has exited."""
        while self.proc.returncode is None:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.ended = time.monotonic()
                self.rusage = rusage
                self.proc.returncode = _exit_code(status)
                break
            if time.monotonic() >= until:
                return False
            time.sleep(EXIT_POLL_SEC)
        if self.ended is None:  # reaped through self.proc by its caller
            self.ended = time.monotonic()
        return True

    def _join(self) -> None:
        until = time.monotonic() + JOIN_SEC
        for stream in (self._out, self._err):
            stream.thread.join(max(0.0, until - time.monotonic()))

    def wait_exit(self, timeout: Optional[float] = None) -> int:
        """The exit code (minus the signal that ended it) once the process ends, its output read."""
        __tracebackhide__ = True
        if not self._reap(self._until(timeout)):
            self.fail("it did not exit in time")
        self._join()
        return self.proc.returncode

    def kernel_stacks(self) -> str:
        """Where each of its threads waits in the kernel (/proc/PID/task/*/stack, root only): for a process that
        will not exit, to tell a hang in tenbox from one in the host's kernel."""
        out = []
        for task in sorted(glob.glob("/proc/%d/task/*" % self.proc.pid)):
            try:
                with open(task + "/comm") as f:
                    name = f.read().strip()
                with open(task + "/stack") as f:
                    frames = [line.split("] ", 1)[-1].split("+")[0] for line in f.read().splitlines()]
            except OSError as e:
                frames = ["(%s)" % e.strerror]
            out.append("%s %s: %s" % (os.path.basename(task), name, " < ".join(frames[:6])))
        return "\n".join(out)

    # --- acting on it ------------------------------------------------------------------

    def send(self, data: Union[str, bytes]) -> None:
        """Type data on the console (stdin)."""
        __tracebackhide__ = True
        try:
            self.proc.stdin.write(data.encode() if isinstance(data, str) else data)
            self.proc.stdin.flush()
        except OSError as e:
            self.fail("cannot write to its console: %s" % e)

    def signal(self, signum: int) -> None:
        """Send signum to the process (not its group); nothing if it has exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float) -> int:
        """SIGTERM; past the timeout SIGKILL to the whole group. The exit code."""
        self.signal(signal.SIGTERM)
        if not self._reap(time.monotonic() + timeout):
            self.kill()
        self._join()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the whole process group; wait for the process and its output."""
        if self.proc.returncode is None:
            _killpg(self.proc.pid)
            self._reap(time.monotonic() + KILL_WAIT_SEC)
        self._join()

    def fail(self, why: str) -> "NoReturn":
        """Kill the process group and raise ProcessFailure: why, the command, the exit code, the output's tails.

        A tenbox runtime that still runs is asked for its threads' stacks first (SIGUSR2, on its stderr):
        a hung guest shows its vCPU threads in KVM_RUN, a hung worker shows where.
        """
        __tracebackhide__ = True
        self._ask_stacks()
        self.kill()
        raise ProcessFailure("%s (after %.1f s)\ncommand: %s\nexit code: %s\n--- stderr ---\n%s\n--- console ---\n%s"
                             % (why, self.elapsed(), " ".join(self.argv), self.proc.returncode,
                                tail(self.errors, STDERR_TAIL_CHARS), tail(self.output, CONSOLE_TAIL_CHARS)))

    def _ask_stacks(self) -> None:
        if self.proc.poll() is not None or "tenbox_vmm" not in self.argv:
            return
        with self._cond:
            before = self._err.text().count(STACKS_MARK)
        try:
            os.kill(self.proc.pid, signal.SIGUSR2)
        except OSError:
            return
        until = time.monotonic() + STACKS_WAIT_SEC
        with self._cond:
            while self._err.text().count(STACKS_MARK) == before and not self._err.eof:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, 0.1))
            self._cond.wait(0.2)  # the other threads' stacks follow the first

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self) -> "ConsoleProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_tool(argv: Sequence[Union[str, Path]], timeout: float, cwd: Optional[Union[str, Path]] = None,
             env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
    """Run argv to its end (stdin empty, output as text); past the timeout kill its process group and fail."""
    __tracebackhide__ = True
    args = [str(a) for a in argv]
    proc = subprocess.Popen(args, cwd=None if cwd is None else str(cwd), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        out, err = proc.communicate()
        raise ProcessFailure("%s did not finish within %.0f s\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), timeout, out.decode(errors="replace"),
                                err.decode(errors="replace"))) from None
    finally:
        if proc.poll() is None:  # interrupted: leave nothing behind
            _killpg(proc.pid)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process `pid` ends (or is a zombie) within `timeout` seconds; any process, not only a child."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
