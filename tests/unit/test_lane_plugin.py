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
