"""pytest plugin: tests marked `hwvirt` run in the nested lane on hosts without vmx/svm (tests; root).

A test that needs hardware virtualization (a stock Linux guest under
tenbox's own KVM worker) is marked `@pytest.mark.hwvirt`. Where the CPU has
vmx or svm, or inside the lane, the mark changes nothing. Elsewhere it is
never skipped: the first such test starts one lane (tests/framework/lane.py)
that runs every collected `hwvirt` test in an inner pytest, which writes
each report to the lane's writable share (lane_report.py); the outer pytest
then reports them as its own, test by test, with the inner failure text.

Before the lane boots, the build host prepares what the tests' fixtures
would otherwise build inside it (kernels, initramfs, image templates: the
lane sees the host's files read-only and has no network). A test names
them with `@pytest.mark.hwvirt(prepare=("linux", "template"))`; a
preparation that fails fails its tests with its one-line reason.

A test runs at most TEST_RUNS times, each time in a fresh lane: once more
if it failed, or if the lane's own kernel died while it ran. A test the
lane never reached has not run, and waits for the next lane, up to
LANE_MAX lanes in all, and no new lane starts once the lanes have taken
LANE_TOTAL_SEC, except one for at most RETRY_TESTS_MAX tests, until
LANE_HARD_SEC. The emulator fails on its own now and then, under QEMU's
own KVM guests as under tenbox's (docs/testing.md), so a test that passes
on a later run passes, and the terminal summary prints how each earlier
run of it ended.

Per-test time: `@pytest.mark.hwvirt(budget=SECONDS)` (default
BUDGET_SEC); the lane's deadline is the sum of its tests' budgets. A lane
whose inner pytest writes no report for longer than the running test's
budget (plus STALL_MARGIN_SEC, and LANE_START_SEC before the first) is
taken as hung and killed then, not at the deadline: the emulator wedges
now and then (docs/testing.md), and one wedge must not cost the sum of
every budget.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from tests.framework import lane, linux_guest
from tests.framework.images import build_cloud_image, build_template
from tests.framework.process import ProcessFailure

MARK = "hwvirt"
BUDGET_SEC = 240.0
LANE_START_SEC = 180.0  # boot, interpreter start and collection inside the lane
STALL_MARGIN_SEC = 60.0  # beyond a test's budget, with no report, before its lane is taken as hung
# Runs of a test that failed, or whose lane died under it, each in a fresh lane. Three since
# 2026-12-06, when CI16 lost its only failure this way: the operator test failed at its first run
# and its second run's lane died under it.
TEST_RUNS = 3
# Lanes in all: a lane that dies early leaves tests that never ran. CI15 lost three lanes in a row
# to the emulator (a wedge, a silent reset, then a triple fault in the third lane's last test).
LANE_MAX = 5
# No new lane starts once the lanes have taken this long: the rest of .ci/run must still fit in
# its 90 minutes (a lane of every x86 test takes 1350-1470 s since test_linux_cloud came; a lane of
# the ones that failed, less).
LANE_TOTAL_SEC = 2100.0
# Past LANE_TOTAL_SEC, a lane still starts for a few tests left to retry (a minute or two each), until
# LANE_HARD_SEC: CI20 ended with two quick tests failed once and no lane left to run them again.
RETRY_TESTS_MAX = 3
LANE_HARD_SEC = 2700.0
REPORTS = "reports.jsonl"
FIRST_FAILURE_LINES = 40  # of a first failure in the lane, printed in the summary
ENV_PASSED = ("TENBOX_TEST_", "PYTEST_ADDOPTS")


def _prepare_linux() -> None:
    linux_guest.build()


def _prepare_guests() -> None:
    import subprocess

    r = subprocess.run(["make", "-s", "-C", str(lane.REPO / "tests" / "guests")], capture_output=True, text=True)
    if r.returncode != 0:
        raise lane.LaneError("building the test guests failed: %s" % (r.stdout + r.stderr).strip()[-300:])


PREPARE: Dict[str, Callable[[], None]] = {
    "linux": _prepare_linux,
    "template": build_template,
    "guests": _prepare_guests,
    "e2e_image": lane.build_e2e_image,
    "cloud_image": build_cloud_image,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "%s(prepare=(), budget=%d): needs hardware virtualization; runs in the nested lane "
                   "on hosts without vmx/svm (tests/framework/lane_plugin.py)" % (MARK, BUDGET_SEC))
    if lane.needs_lane():
        config.pluginmanager.register(LaneRunner(config), "tenbox-lane-runner")


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}.get(n, "%dth" % n)


def _mark(item: pytest.Item):
    return item.get_closest_marker(MARK)


class LaneRunner:
    """Runs the session's hwvirt tests in one lane and replays their reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.items: List[pytest.Item] = []
        self.reports: Optional[Dict[str, List[dict]]] = None
        self.failure = ""  # why the last lane gave no report for a test it never reached
        self.no_report: Dict[str, str] = {}  # by test id: why its last lane gave no full report
        # By test id, each run that did not pass: (its lane, its reports, why its lane ended).
        self.bad_runs: Dict[str, List[Tuple[int, List[dict], str]]] = {}
        self.runs: Dict[str, int] = {}  # by test id, the runs it started
        self.lanes_left_out = ""  # why no further lane ran, when tests had runs left
        self.out_dir: Optional[Path] = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: List[pytest.Item]) -> None:
        self.items = [it for it in items if _mark(it) is not None]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem) -> Optional[bool]:
        if _mark(item) is None:
            return None
        if self.reports is None:
            self._run_lane()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for rep in self._reports_for(item):
            item.ihook.pytest_runtest_logreport(report=rep)
        self._teardown_until(item, nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _teardown_until(self, item: pytest.Item, nextitem) -> None:
        """What pytest's own teardown of `item` does for earlier items: their module and
        class fixtures that `nextitem` does not share end here, or pytest later finds
        them still set up ("previous item was not torn down properly")."""
        state = item.session._setupstate
        args = (nextitem,) if len(inspect.signature(state.teardown_exact).parameters) == 1 else (item, nextitem)
        try:
            state.teardown_exact(*args)  # pytest 7 takes nextitem, 6 (Debian 11) item and nextitem
        except Exception as e:  # a finalizer of an earlier item's fixture failed
            from _pytest.reports import TestReport

            item.ihook.pytest_runtest_logreport(report=TestReport(
                item.nodeid, item.location, {}, "failed", "teardown of earlier fixtures: %r" % e, "teardown", [], 0.0))

    def _reports_for(self, item: pytest.Item) -> list:
        hook = self.config.hook
        datas = self.reports.get(item.nodeid, []) if self.reports is not None else []
        # A copy each: pytest's deserializer rewrites the dict it is given (its longrepr).
        reports = [hook.pytest_report_from_serializable(config=self.config, data=copy.deepcopy(d)) for d in datas]
        whens = [r.when for r in reports]
        if "teardown" in whens or any(r.failed for r in reports):
            return reports
        why = self.no_report.get(item.nodeid) or self.failure or "the lane gave no report for this test"
        from _pytest.reports import TestReport

        return reports + [TestReport(item.nodeid, item.location, {}, "failed", why,
                                     "call" if "setup" in whens else "setup", [], 0.0)]

    def _prepare(self) -> None:
        wanted: List[str] = []
        for it in self.items:
            for name in _mark(it).kwargs.get("prepare", ()):
                if name not in PREPARE:
                    raise lane.LaneError("%s: unknown lane preparation %r" % (it.nodeid, name))
                if name not in wanted:
                    wanted.append(name)
        for name in wanted:
            try:
                PREPARE[name]()
            except (pytest.fail.Exception, ProcessFailure) as e:  # the preparers are the tests' own builders
                raise lane.LaneError("preparing %s for the lane: %s" % (name, str(e).splitlines()[0])) from None

    def _run_lane(self) -> None:
        """Lanes for the hwvirt tests, one after another, each for what is left to run: a test
        that failed or whose lane died under it (the lane's own kernel panics under the emulator
        now and then) runs once more, and a test a dead lane never reached waits for the next
        one. The emulated nested paging fails on its own now and then (docs/testing.md): a test
        that passes only on its second run passes, and the summary prints its first failure."""
        self.reports = {}
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        say = (lambda text: tr.write_line(text)) if tr else (lambda text: None)
        try:
            self._prepare()
        except lane.LaneError as e:
            self.failure = "nested lane: %s" % e
            return
        items = self.items
        lanes_started = time.monotonic()
        for attempt in range(1, LANE_MAX + 1):
            taken = time.monotonic() - lanes_started
            if attempt > 1 and taken > LANE_TOTAL_SEC and (len(items) > RETRY_TESTS_MAX or taken > LANE_HARD_SEC):
                self.lanes_left_out = "the lanes had taken %.0f s" % taken
                say("tenbox: no further lane: %s (LANE_TOTAL_SEC %.0f; for at most %d tests, LANE_HARD_SEC %.0f)"
                    % (self.lanes_left_out, LANE_TOTAL_SEC, RETRY_TESTS_MAX, LANE_HARD_SEC))
                return
            self.out_dir = Path(tempfile.mkdtemp(prefix="tenbox-lane-"))
            os.chmod(str(self.out_dir), 0o755)
            budget = LANE_START_SEC + sum(float(_mark(it).kwargs.get("budget", BUDGET_SEC)) for it in items)
            say("tenbox: %d test(s) need hardware virtualization: running them in the nested lane "
                "(deadline %.0f s, console: %s)" % (len(items), budget, self.out_dir / "console.log"))
            for it in items:  # a report of an earlier run is not this run's
                self.reports.pop(it.nodeid, None)
            try:
                script = self._write_script(items)
                res = lane.run("sh /lane-out/%s" % script.name, self.out_dir, budget,
                               console_log=self.out_dir / "console.log", watchdog=self._watchdog(items))
            except lane.LaneError as e:
                self.failure = "nested lane: %s" % e
                return
            self.reports.update(self._read_reports())
            if res.rc is None:
                ended = "nested lane %d: %s" % (attempt, res.reason)
            else:
                ended = "the inner pytest of lane %d exited %d without a report for this test" % (attempt, res.rc)
            self.failure = "%s\n--- the lane's console (tail) ---\n%s" % (ended, lane.tail(res.console))
            say("tenbox: nested lane done in %.0f s" % res.elapsed)
            again = []
            for it in items:
                nodeid = it.nodeid
                if not self._finished(nodeid):
                    self.no_report[nodeid] = self.failure
                if self._finished(nodeid) and not self._failed(nodeid):
                    continue
                if self._started(nodeid):
                    self.runs[nodeid] = self.runs.get(nodeid, 0) + 1
                    self.bad_runs.setdefault(nodeid, []).append(
                        (attempt, copy.deepcopy(self.reports[nodeid]), "" if self._finished(nodeid) else ended))
                if self.runs.get(nodeid, 0) < TEST_RUNS:
                    again.append(it)
            unfinished = [it for it in items if not self._finished(it.nodeid)]
            failed = [it for it in items if self._finished(it.nodeid) and self._failed(it.nodeid)]
            more = ": %d of them in one more lane" % len(again) if again and attempt < LANE_MAX else ""
            if unfinished:
                say("tenbox: the lane ended before %d test(s) finished (%s; console kept in %s)%s" % (
                    len(unfinished), res.reason if res.rc is None else "its pytest exited %d" % res.rc,
                    self.out_dir, more))
            if failed:
                say("tenbox: %d test(s) failed in the lane (console kept in %s)%s" % (
                    len(failed), self.out_dir, more))
            items = again
            if not items:
                return
        self.lanes_left_out = "all %d lanes had run" % LANE_MAX

    def _watchdog(self, items: List[pytest.Item]) -> Callable[[], Optional[str]]:
        """For lane.run: a reason once the inner pytest has written no report for longer than the running
        test's budget (plus STALL_MARGIN_SEC; plus LANE_START_SEC before its first report)."""
        path = self.out_dir / REPORTS
        last = {"size": 0, "at": time.monotonic()}

        def check() -> Optional[str]:
            size = path.stat().st_size if path.exists() else 0
            now = time.monotonic()
            if size != last["size"]:
                last["size"], last["at"] = size, now
                return None
            done = {nodeid for nodeid, datas in self._read_reports().items()
                    if any(d.get("when") == "teardown" for d in datas)}
            running = next((it for it in items if it.nodeid not in done), None)
            if running is None:
                return None  # every test reported: the lane is powering off
            allowed = float(_mark(running).kwargs.get("budget", BUDGET_SEC)) + STALL_MARGIN_SEC
            if size == 0:
                allowed += LANE_START_SEC
            if now - last["at"] <= allowed:
                return None
            return "no test report for %.0f s, in %s (its budget: %.0f s)" % (
                now - last["at"], running.nodeid, allowed - STALL_MARGIN_SEC)

        return check

    def _started(self, nodeid: str) -> bool:
        return bool((self.reports or {}).get(nodeid))

    def _finished(self, nodeid: str) -> bool:
        return any(d.get("when") == "teardown" for d in (self.reports or {}).get(nodeid, []))

    def _failed(self, nodeid: str) -> bool:
        return any(d.get("outcome") == "failed" for d in (self.reports or {}).get(nodeid, []))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        """Each test that had a run in the lane that did not pass, with how each such run ended,
        whatever its later runs gave: a test that only passes on a later run is news, not noise."""
        if not self.bad_runs:
            return
        tr = terminalreporter
        tr.section("tests that failed in the nested lane and ran again in a fresh one")
        for nodeid, bad in self.bad_runs.items():
            runs = self.runs.get(nodeid, 0)
            if self._finished(nodeid) and not self._failed(nodeid):
                verdict = "passed on its %s run" % _ordinal(runs + 1)
            elif runs >= TEST_RUNS:
                verdict = "did not pass in %d runs" % runs
            else:
                verdict = "had no further run (%s)" % (self.lanes_left_out or "no lane was left")
            tr.write_line("%s: %s; how its earlier runs ended:" % (nodeid, verdict))
            for number, (lane_no, datas, ended) in enumerate(bad, 1):
                if ended:
                    tr.write_line("  run %d (lane %d): its lane ended under it: %s" % (number, lane_no, ended))
                    continue
                tr.write_line("  run %d (lane %d) failed:" % (number, lane_no))
                for d in datas:
                    if d.get("outcome") != "failed":
                        continue
                    rep = self.config.hook.pytest_report_from_serializable(config=self.config, data=copy.deepcopy(d))
                    for line in rep.longreprtext.splitlines()[-FIRST_FAILURE_LINES:]:
                        tr.write_line("    " + line)

    def _write_script(self, items: List[pytest.Item]) -> Path:
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PASSED)}
        env["PYTHONPATH"] = str(lane.REPO)
        env["TENBOX_LANE_REPORTS"] = "/lane-out/%s" % REPORTS
        (self.out_dir / "nodeids.txt").write_text("".join(it.nodeid + "\n" for it in items))
        # One test id per line: no word splitting on spaces, no globbing of "[4]".
        lines = ["set -ef", "IFS='\n'"] + ["export %s=%s" % (k, shlex.quote(v)) for k, v in sorted(env.items())]
        lines.append("cd %s" % shlex.quote(str(lane.REPO)))
        lines.append("exec %s -m pytest -q -rA -p no:cacheprovider -p tests.framework.lane_report "
                     "$(cat /lane-out/nodeids.txt)" % shlex.quote(sys.executable))
        script = self.out_dir / "run.sh"
        script.write_text("\n".join(lines) + "\n")
        return script

    def _read_reports(self) -> Dict[str, List[dict]]:
        out: Dict[str, List[dict]] = {}
        path = self.out_dir / REPORTS
        if not path.exists():
            return out
        for line in path.read_text(errors="replace").splitlines():
            try:
                data = json.loads(line)
            except ValueError:
                continue  # a line cut short by the lane's end
            out.setdefault(data.get("nodeid", ""), []).append(data)
        return out
