"""The lane plugin's replay inside a real pytest run (pytester); the lane itself is
left out: its run gives no reports, so each hwvirt test fails with the lane's reason."""

import json
import textwrap

import pytest

from tests.framework.lane_plugin import TEST_RUNS

pytest_plugins = ["pytester"]

CONFTEST = textwrap.dedent('''
    from tests.framework.lane_plugin import LaneRunner

    class NoLane(LaneRunner):
        def _run_lane(self):
            self.reports = {}
            self.failure = "no lane in this test"

    def pytest_configure(config):
        config.addinivalue_line("markers", "hwvirt: needs the lane")
        config.pluginmanager.register(NoLane(config), "no-lane")
''')


@pytest.fixture
def tester(request):
    """pytest's pytester, or testdir before pytest 6.2 (Debian 11)."""
    try:
        return request.getfixturevalue("pytester")
    except pytest.FixtureLookupError:
        return request.getfixturevalue("testdir")


def test_fixtures_of_earlier_items_end_at_a_replayed_item_and_the_next_module_runs(tester):
    """A module fixture used before a replayed test ends with it (the next test is in
    another module), instead of pytest erroring "previous item was not torn down"."""
    tester.makeconftest(CONFTEST)
    tester.makepyfile(test_a=textwrap.dedent('''
        import pytest

        @pytest.fixture(scope="module")
        def shared():
            yield 1
            print("shared fixture ended")

        def test_plain(shared):
            assert shared == 1

        @pytest.mark.hwvirt
        def test_in_lane():
            pass
    '''), test_b="def test_after():\n    pass\n")
    result = tester.runpytest("-s", "-p", "no:cacheprovider")
    # No report at all is an error at setup.
    result.stdout.fnmatch_lines(["*shared fixture ended*", "*no lane in this test*", "*2 passed, 1 error*"])
    result.stdout.no_fnmatch_line("*not torn down*")


# After a conftest's fake_run: lane.run replaced for the in-process pytest run, and put back.
FAKE_LANE_HOOKS = textwrap.dedent('''
    import tempfile

    REAL_RUN, REAL_TEMPDIR = lane.run, tempfile.tempdir
    lane.run = fake_run  # pytester runs in this process: put it back at the end

    def pytest_configure(config):
        tempfile.tempdir = str(config.rootdir)  # the lanes' results folders: in the test's own folder
        config.addinivalue_line("markers", "hwvirt: needs the lane")
        config.pluginmanager.register(lane_plugin.LaneRunner(config), "lane-for-test")

    def pytest_unconfigure(config):
        lane.run, tempfile.tempdir = REAL_RUN, REAL_TEMPDIR
        print("LANE CALLS %s" % json.dumps(CALLS))
''')


PLAN_CONFTEST = textwrap.dedent('''
    import json
    from tests.framework import lane, lane_plugin

    CALLS = []
    PLAN = @PLAN@  # per lane, what a test does: "fail", "die" (the lane's kernel dies in it), else it passes

    def report(nodeid, when, outcome="passed"):
        longrepr = "E   lane-%d failure of %s" % (len(CALLS), nodeid) if outcome == "failed" else None
        return {"$report_type": "TestReport", "nodeid": nodeid, "location": ["test_r.py", 0, nodeid],
                "keywords": {}, "outcome": outcome, "longrepr": longrepr, "when": when, "sections": [],
                "duration": 0.0, "user_properties": []}

    def fake_run(command, out_dir, deadline_sec, console_log=None, **kw):
        ids = (out_dir / "nodeids.txt").read_text().split()
        CALLS.append(ids)
        plan = PLAN[len(CALLS) - 1] if len(CALLS) <= len(PLAN) else {}
        with open(str(out_dir / lane_plugin.REPORTS), "w") as f:
            for nodeid in ids:
                what = plan.get(nodeid.split("::")[-1], "pass")
                if what == "die":
                    f.write(json.dumps(report(nodeid, "setup")) + "\\n")
                    return lane.LaneResult(None, "kernel panic in the lane", "", 1.0)
                for when in ("setup", "call", "teardown"):
                    bad = what == "fail" and when == "call"
                    f.write(json.dumps(report(nodeid, when, "failed" if bad else "passed")) + "\\n")
        return lane.LaneResult(0, "", "", 1.0)
''') + FAKE_LANE_HOOKS

THREE_TESTS = textwrap.dedent('''
    import pytest

    @pytest.mark.hwvirt
    def test_one():
        pass

    @pytest.mark.hwvirt
    def test_two():
        pass

    @pytest.mark.hwvirt
    def test_three():
        pass
''')


def _run_plan(tester, plan: str):
    """THREE_TESTS through the plugin with lanes that do what `plan` says (PLAN_CONFTEST)."""
    tester.makeconftest(PLAN_CONFTEST.replace("@PLAN@", plan))
    tester.makepyfile(test_r=THREE_TESTS)
    return tester.runpytest("-s", "-p", "no:cacheprovider")


def _calls(*lanes):
    return "LANE CALLS %s" % json.dumps([["test_r.py::" + name for name in names] for names in lanes])


def test_a_test_the_lane_died_in_runs_once_more_and_a_test_it_never_reached_waits_for_the_next(tester):
    """The first lane finishes test_one and dies in test_two; the second runs test_two and
    test_three and dies in test_three; a third runs test_three, and all three pass."""
    result = _run_plan(tester, '[{"test_two": "die"}, {"test_three": "die"}]')
    result.stdout.fnmatch_lines([
        "*ended before 2 test(s) finished (kernel panic in the lane*2 of them in one more lane*",
        "*ended before 1 test(s) finished (kernel panic in the lane*1 of them in one more lane*",
        "*3 passed*",
        _calls(["test_one", "test_two", "test_three"], ["test_two", "test_three"], ["test_three"]),
    ])


def test_a_test_that_kills_its_lane_three_times_fails_with_the_lanes_reason_and_the_others_still_run(tester):
    result = _run_plan(tester, '[{"test_two": "die"}, {"test_two": "die"}, {"test_two": "die"}]')
    result.stdout.fnmatch_lines([
        "*nested lane 3: kernel panic in the lane*",
        "test_r.py::test_two: did not pass in 3 runs; how its earlier runs ended:",
        "  run 1 (lane 1): its lane ended under it: nested lane 1: kernel panic in the lane",
        "  run 2 (lane 2): its lane ended under it: nested lane 2: kernel panic in the lane",
        "  run 3 (lane 3): its lane ended under it: nested lane 3: kernel panic in the lane",
        "*1 failed, 2 passed*",
        _calls(["test_one", "test_two", "test_three"], ["test_two", "test_three"], ["test_two", "test_three"],
               ["test_three"]),
    ])


def test_a_test_whose_last_run_lost_its_lane_fails_with_that_lanes_reason_not_a_later_ones(tester):
    """CI16's case: test_one failed, then lost its lanes; test_two waited for a later lane, which
    ended well. test_one's failure names the lane that ended under it, not the later lane's exit."""
    result = _run_plan(tester, '[{"test_one": "fail", "test_two": "fail"}, {"test_one": "die"}, '
                               '{"test_one": "die"}]')
    result.stdout.fnmatch_lines([
        "*nested lane 3: kernel panic in the lane*",
        "test_r.py::test_one: did not pass in 3 runs; how its earlier runs ended:",
        "  run 1 (lane 1) failed:",
        "*lane-1 failure of test_r.py::test_one*",
        "  run 2 (lane 2): its lane ended under it: nested lane 2: kernel panic in the lane",
        "test_r.py::test_two: passed on its second run; how its earlier runs ended:",
        "*1 failed, 2 passed*",
        _calls(["test_one", "test_two", "test_three"], ["test_one", "test_two"], ["test_one", "test_two"],
               ["test_two"]),
    ])
    result.stdout.no_fnmatch_line("*lane 4 exited 0 without a report*")


def test_a_test_a_dead_lane_never_reached_keeps_all_its_runs(tester):
    """CI10's case: the first lane dies in test_one before test_three ran; test_three fails in
    the second lane on its first run, so a third lane runs it again, and it passes."""
    result = _run_plan(tester, '[{"test_one": "die"}, {"test_three": "fail"}]')
    result.stdout.fnmatch_lines([
        "*ended before 3 test(s) finished*3 of them in one more lane*",
        "*1 test(s) failed in the lane*1 of them in one more lane*",
        "test_r.py::test_one: passed on its second run; how its earlier runs ended:",
        "  run 1 (lane 1): its lane ended under it: nested lane 1: kernel panic in the lane",
        "test_r.py::test_three: passed on its second run; how its earlier runs ended:",
        "  run 1 (lane 2) failed:",
        "*lane-2 failure of test_r.py::test_three*",
        "*3 passed*",
        _calls(["test_one", "test_two", "test_three"], ["test_one", "test_two", "test_three"], ["test_three"]),
    ])


def test_no_more_than_five_lanes_run_even_when_each_dies_at_once(tester):
    """test_one kills three lanes (its three runs), test_two the fourth and fifth: test_two has a run
    left and test_three has not run, but there is no sixth lane."""
    result = _run_plan(tester, '[{"test_one": "die"}, {"test_one": "die"}, {"test_one": "die"}, '
                               '{"test_two": "die"}, {"test_two": "die"}, {}]')
    result.stdout.fnmatch_lines([
        "test_r.py::test_two: had no further run (all 5 lanes had run); how its earlier runs ended:",
        "*2 failed, 1 error*",  # test_three never started: an error at its setup
        _calls(*[["test_one", "test_two", "test_three"]] * 3 + [["test_two", "test_three"]] * 2),
    ])


def test_no_new_lane_starts_once_the_lanes_have_taken_their_total_time(tester, monkeypatch):
    """LANE_TOTAL_SEC keeps .ci/run within its time: past it, a failed test keeps its failure."""
    from tests.framework import lane_plugin

    monkeypatch.setattr(lane_plugin, "LANE_TOTAL_SEC", -1.0)  # pytester runs in this process
    monkeypatch.setattr(lane_plugin, "LANE_HARD_SEC", -1.0)
    result = _run_plan(tester, '[{"test_two": "fail"}]')
    result.stdout.fnmatch_lines([
        "tenbox: no further lane: the lanes had taken 0 s (LANE_TOTAL_SEC -1; for at most 3 tests, LANE_HARD_SEC -1)",
        "test_r.py::test_two: had no further run (the lanes had taken 0 s); how its earlier runs ended:",
        "*1 failed, 2 passed*",
        _calls(["test_one", "test_two", "test_three"]),
    ])


def test_past_the_total_time_a_lane_still_runs_a_few_tests_again_until_the_hard_limit(tester, monkeypatch):
    """Past LANE_TOTAL_SEC, a lane of at most RETRY_TESTS_MAX tests still starts (before LANE_HARD_SEC):
    a quick test that failed once runs again; a lane of more tests does not start."""
    from tests.framework import lane_plugin

    monkeypatch.setattr(lane_plugin, "LANE_TOTAL_SEC", -1.0)
    monkeypatch.setattr(lane_plugin, "RETRY_TESTS_MAX", 1)
    result = _run_plan(tester, '[{"test_two": "fail"}, {}]')
    result.stdout.fnmatch_lines(["*3 passed*", _calls(["test_one", "test_two", "test_three"], ["test_two"])])
    result = _run_plan(tester, '[{"test_one": "fail", "test_two": "fail"}, {}]')
    result.stdout.fnmatch_lines([
        "tenbox: no further lane: the lanes had taken 0 s (LANE_TOTAL_SEC -1; for at most 1 tests, LANE_HARD_SEC 2700)",
        "*2 failed, 1 passed*",
    ])


RERUN_CONFTEST = textwrap.dedent('''
    import json
    from tests.framework import lane, lane_plugin

    CALLS = []

    def report(nodeid, when, outcome="passed"):
        longrepr = "E   first-lane failure of %s" % nodeid if outcome == "failed" else None
        return {"$report_type": "TestReport", "nodeid": nodeid, "location": ["test_f.py", 0, nodeid],
                "keywords": {}, "outcome": outcome, "longrepr": longrepr, "when": when, "sections": [],
                "duration": 0.0, "user_properties": []}

    def fake_run(command, out_dir, deadline_sec, console_log=None, **kw):
        ids = (out_dir / "nodeids.txt").read_text().split()
        CALLS.append(ids)
        with open(str(out_dir / lane_plugin.REPORTS), "w") as f:
            for nodeid in ids:
                # test_flaky fails in the first lane only; test_broken fails in every lane
                bad = nodeid.endswith("broken") or (nodeid.endswith("flaky") and len(CALLS) == 1)
                for when in ("setup", "call", "teardown"):
                    f.write(json.dumps(report(nodeid, when, "failed" if bad and when == "call" else "passed"))
                            + "\\n")
        return lane.LaneResult(0, "", "", 1.0)
''') + FAKE_LANE_HOOKS


def test_a_test_that_failed_in_the_lane_runs_again_in_a_fresh_one_and_the_summary_says_so(tester):
    """test_flaky fails in the first lane and passes in the second: it passes, and the summary
    prints its first failure; test_broken fails in all three of its lanes and fails; test_fine runs once."""
    tester.makeconftest(RERUN_CONFTEST)
    tester.makepyfile(test_f=textwrap.dedent('''
        import pytest

        @pytest.mark.hwvirt
        def test_fine():
            pass

        @pytest.mark.hwvirt
        def test_flaky():
            pass

        @pytest.mark.hwvirt
        def test_broken():
            pass
    '''))
    result = tester.runpytest("-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([
        "*2 test(s) failed in the lane*2 of them in one more lane*",
        "*tests that failed in the nested lane and ran again in a fresh one*",
        "test_f.py::test_flaky: passed on its second run; how its earlier runs ended:",
        "  run 1 (lane 1) failed:",
        "*first-lane failure of test_f.py::test_flaky*",
        "test_f.py::test_broken: did not pass in 3 runs; how its earlier runs ended:",
        "  run 1 (lane 1) failed:",
        "*first-lane failure of test_f.py::test_broken*",
        "  run 3 (lane 3) failed:",
        "*1 failed, 2 passed*",
        'LANE CALLS [["test_f.py::test_fine", "test_f.py::test_flaky", "test_f.py::test_broken"], '
        '["test_f.py::test_flaky", "test_f.py::test_broken"], ["test_f.py::test_broken"]]',
    ])


def test_a_checkout_under_a_folder_the_lane_mounts_afresh_is_refused_with_one_line(tmp_path):
    """/tmp is a new tmpfs inside the lane: a checkout there would fail there with a shell's
    "can't cd"; the build host says why before booting anything."""
    from tests.framework import lane

    with pytest.raises(lane.LaneError, match=r"^the checkout is under /tmp, which the lane mounts afresh"):
        lane.run("true", tmp_path, 10, cwd=lane.Path("/tmp/some-checkout"))


def _lane_console(*middle):  # the line as the console has it, after SeaBIOS's screen escapes
    return ["Booting from ROM..\x1bc\x1b[?7l\x1b[2JLANE: up 4.2 s, kernel 6.1.0-57-amd64, 2 cpus\n"] + list(middle) + ["[ 73.7] trace line\n"] * 5000


def _verdict(lines, qemu_rc=0):
    from tests.framework import lane

    seen = {"up": False, "oops": ""}
    for line in lines:
        lane._note(seen, line)
    tail = "".join(lines[-50:])  # what the lane keeps of a long console: its end
    return lane._result(tail, seen, False, qemu_rc, 100.0, lane.Path("/lane-out"), 1.0)


def test_a_lane_whose_kernel_panics_after_a_long_oops_says_so_with_the_oops_first_line():
    """The kept console is only its tail, which a long oops fills: the reason comes from the whole
    console, not "the lane's kernel did not come up"."""
    res = _verdict(_lane_console("[ 73.6] BUG: TASK stack guard page was hit at 00000000fd27291b\n",
                                 "[ 73.6] Kernel panic - not syncing: Fatal exception in interrupt\n"))
    assert res.rc is None
    assert res.reason == ("the lane's own kernel died running the command: BUG: TASK stack guard page was hit "
                          "at 00000000fd27291b (QEMU exit 0)")


def test_a_lane_that_never_came_up_and_one_that_gave_its_exit_code():
    assert _verdict(["SeaBIOS\n", "Booting from ROM..\n"], qemu_rc=1).reason == (
        "the lane's kernel did not come up (QEMU exit 1)")
    done = _verdict(["LANE: up 4.2 s\n", "LANE: rc=3\n"])
    assert (done.rc, done.reason) == (3, "")


STALL_CONFTEST = textwrap.dedent('''
    import json
    from tests.framework import lane, lane_plugin

    CALLS = []
    NOW = [1000.0]

    class FakeTime:
        @staticmethod
        def monotonic():
            return NOW[0]

    REAL_TIME, lane_plugin.time = lane_plugin.time, FakeTime

    def setup_report(nodeid):
        return {"$report_type": "TestReport", "nodeid": nodeid, "location": ["test_s.py", 0, nodeid],
                "keywords": {}, "outcome": "passed", "longrepr": None, "when": "setup", "sections": [],
                "duration": 0.0, "user_properties": []}

    def fake_run(command, out_dir, deadline_sec, console_log=None, watchdog=None, **kw):
        ids = (out_dir / "nodeids.txt").read_text().split()
        CALLS.append(ids)
        seen = []
        NOW[0] += 100 + 180 + 60 - 1  # before any report: the lane's start, the budget and the margin
        seen.append(watchdog())
        with open(str(out_dir / lane_plugin.REPORTS), "w") as f:
            f.write(json.dumps(setup_report(ids[0])) + "\\n")
        seen.append(watchdog())  # a new report: progress
        NOW[0] += 100 + 60
        seen.append(watchdog())  # within the budget and the margin
        NOW[0] += 1
        seen.append(watchdog())
        print("WATCHDOG %s" % json.dumps(seen))
        return lane.LaneResult(None, "the lane stalled: %s" % seen[-1], "", 1.0)
''') + FAKE_LANE_HOOKS.replace("lane.run, tempfile.tempdir = REAL_RUN, REAL_TEMPDIR",
                                 "lane.run, tempfile.tempdir, lane_plugin.time = REAL_RUN, REAL_TEMPDIR, REAL_TIME")


def test_a_lane_with_no_report_for_longer_than_the_running_tests_budget_is_taken_as_hung(tester):
    """The watchdog lane.run asks: nothing until the running test's budget and the margin have passed
    with no new report (the lane's start counted before the first); then the reason, and the test
    runs again in a fresh lane."""
    tester.makeconftest(STALL_CONFTEST)
    tester.makepyfile(test_s=textwrap.dedent('''
        import pytest

        @pytest.mark.hwvirt(budget=100)
        def test_wedges():
            pass
    '''))
    result = tester.runpytest("-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([
        'WATCHDOG [null, null, null, "no test report for 161 s, in test_s.py::test_wedges (its budget: 100 s)"]',
        "*the lane stalled: no test report for 161 s*",
        "*1 failed*",
    ])
    assert result.stdout.str().count("WATCHDOG") == TEST_RUNS  # a fresh lane for each run of the test it stalled in


REGISTERS = ("CPU#0\nRAX=0 RBX=0\nRIP=ffffffff9b85a170 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=%s\n"
             "CPU#1\nRIP=ffffffff9b8592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=%s\n")
LAPIC = "Timer\t DCR=0x3 (divide by 16) initial_count = 6578 current_count = 0\nISR\t (none)\nIRR\t %s \n\nAPR 0x00"


def test_a_lane_vcpu_holding_the_same_pending_interrupt_for_a_minute_is_a_wedge(monkeypatch, tmp_path):
    """`info lapic` of each lane vCPU, every few seconds: an interrupt taken between two looks is
    nothing; the same vector pending on vCPU 1 for WEDGE_SEC is the reason to end the lane."""
    from tests.framework import lane

    irr = {0: ["(none)", "236", "(none)", "(none)", "(none)"], 1: ["(none)", "236", "236", "236", "236"]}
    looks = {0: 0, 1: 0}

    def monitor(out_dir, command, timeout=10.0):
        if command == "info registers -a":
            return REGISTERS % ("1", "1")  # both halted: no RIP to watch
        cpu = int(command.split()[-1])
        answer = LAPIC % irr[cpu][looks[cpu]]
        looks[cpu] += 1
        return answer

    monkeypatch.setattr(lane, "monitor_command", monitor)
    stuck = lane._WedgeCheck(tmp_path, 2)
    step = lane.WEDGE_SEC / 2
    assert [stuck.check(1000.0 + i * step) for i in range(3)] == ["", "", ""]  # 236 seen at +30 s
    assert stuck.check(1000.0 + 3 * step) == (
        "its vCPU 1 has held interrupt vector(s) 236 pending for 60 s (the emulator wedged)")
    assert lane.pending_interrupts(LAPIC % "(none)") == ""


def test_a_lane_vcpu_running_at_one_rip_for_a_minute_is_a_wedge_and_a_halted_one_is_not(monkeypatch, tmp_path):
    """CI13's second lane: vCPU 0 ran at one RIP with interrupts off, nothing pending, vCPU 1 idle."""
    from tests.framework import lane

    monkeypatch.setattr(lane, "monitor_command", lambda out_dir, command, timeout=10.0: (
        REGISTERS % ("0", "1") if command == "info registers -a" else LAPIC % "(none)"))
    stuck = lane._WedgeCheck(tmp_path, 2)
    assert lane.running_rips(REGISTERS % ("0", "1")) == ["ffffffff9b85a170", ""]
    assert [stuck.check(1000.0 + i * 30) for i in range(2)] == ["", ""]
    assert stuck.check(1060.0) == (
        "its vCPU 0 has run at RIP ffffffff9b85a170 for 60 s without halting (the emulator wedged)")


def test_a_test_failing_first_in_the_last_lane_is_reported_without_a_second_run(tester):
    """CI15's case: test_three first runs, and fails, in the last lane. Its report is replayed and
    then printed as its first failure (pytest rewrites a report dict it reads: the plugin reads
    copies), and the summary says it had no further run."""
    result = _run_plan(tester, '[{"test_one": "die"}, {"test_one": "die"}, {"test_one": "die"}, '
                               '{"test_two": "die"}, {"test_three": "fail"}]')
    result.stdout.fnmatch_lines([
        "test_r.py::test_three: had no further run (all 5 lanes had run); how its earlier runs ended:",
        "  run 1 (lane 5) failed:",
        "*lane-5 failure of test_r.py::test_three*",
        "*2 failed, 1 passed*",
    ])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
