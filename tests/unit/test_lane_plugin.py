"""The lane plugin's replay inside a real pytest run (pytester); the lane itself is
left out: its run gives no reports, so each hwvirt test fails with the lane's reason."""

import textwrap

import pytest

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
    REAL_RUN = lane.run
    lane.run = fake_run  # pytester runs in this process: put it back at the end

    def pytest_configure(config):
        config.addinivalue_line("markers", "hwvirt: needs the lane")
        config.pluginmanager.register(lane_plugin.LaneRunner(config), "lane-for-test")

    def pytest_unconfigure(config):
        lane.run = REAL_RUN
        print("LANE CALLS %s" % json.dumps(CALLS))
''')


RETRY_CONFTEST = textwrap.dedent('''
    import json
    from tests.framework import lane, lane_plugin

    CALLS = []

    def report(nodeid, when):
        return {"$report_type": "TestReport", "nodeid": nodeid, "location": ["test_r.py", 0, nodeid],
                "keywords": {}, "outcome": "passed", "longrepr": None, "when": when, "sections": [],
                "duration": 0.0, "user_properties": []}

    def fake_run(command, out_dir, deadline_sec, console_log=None, **kw):
        ids = (out_dir / "nodeids.txt").read_text().split()
        CALLS.append(ids)
        done = ids[:1]  # this lane finishes its first test, then "panics"
        with open(str(out_dir / lane_plugin.REPORTS), "w") as f:
            for nodeid in done:
                for when in ("setup", "call", "teardown"):
                    f.write(json.dumps(report(nodeid, when)) + "\\n")
            if len(ids) > 1:
                f.write(json.dumps(report(ids[1], "setup")) + "\\n")  # the test the lane died in
        return lane.LaneResult(None, "kernel panic in the lane", "", 1.0)
''') + FAKE_LANE_HOOKS


def test_a_lane_that_dies_gets_one_successor_for_the_tests_it_did_not_finish(tester):
    """The first lane finishes one test and dies in the second: a second lane runs the second and
    third only; it dies too after one, so the third is reported failed with the lane's reason."""
    tester.makeconftest(RETRY_CONFTEST)
    tester.makepyfile(test_r=textwrap.dedent('''
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
    '''))
    result = tester.runpytest("-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([
        "*ended before 2 test(s) finished (kernel panic in the lane*one more lane for them*",
        "*ended before 1 test(s) finished*",
        "*kernel panic in the lane*",
        "*1 failed, 2 passed*",
        'LANE CALLS [["test_r.py::test_one", "test_r.py::test_two", "test_r.py::test_three"], '
        '["test_r.py::test_two", "test_r.py::test_three"]]',
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


def test_a_test_that_failed_in_the_lane_runs_once_more_in_a_fresh_one_and_the_summary_says_so(tester):
    """test_flaky fails in the first lane and passes in the second: it passes, and the summary
    prints its first failure; test_broken fails in both and fails; test_fine runs once."""
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
        "*2 test(s) failed in the lane*one more lane for them*",
        "*tests that failed in the nested lane and ran again in a fresh one*",
        "test_f.py::test_flaky: passed on its second run; its first failure:",
        "*first-lane failure of test_f.py::test_flaky*",
        "test_f.py::test_broken: failed again on its second run; its first failure:",
        "*first-lane failure of test_f.py::test_broken*",
        "*1 failed, 2 passed*",
        'LANE CALLS [["test_f.py::test_fine", "test_f.py::test_flaky", "test_f.py::test_broken"], '
        '["test_f.py::test_flaky", "test_f.py::test_broken"]]',
    ])


def test_a_checkout_under_a_folder_the_lane_mounts_afresh_is_refused_with_one_line(tmp_path):
    """/tmp is a new tmpfs inside the lane: a checkout there would fail there with a shell's
    "can't cd"; the build host says why before booting anything."""
    from tests.framework import lane

    with pytest.raises(lane.LaneError, match=r"^the checkout is under /tmp, which the lane mounts afresh"):
        lane.run("true", tmp_path, 10, cwd=lane.Path("/tmp/some-checkout"))
