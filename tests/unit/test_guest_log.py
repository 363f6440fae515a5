"""What a guest can make the worker write is bounded: rate-limited messages and a runtime.log rotated live (pure)."""

import logging
import os

import pytest

from tenbox_vmm.guest_log import Budget, GuestLog, flush_all
from tenbox_vmm.logfiles import RuntimeLogHandler, stderr_runtime_log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """schedule() for GuestLog that keeps the callbacks for the test to run."""

    def __init__(self) -> None:
        self.pending = []

    def __call__(self, delay, fn):
        self.pending.append((delay, fn))
        return object()

    def fire(self) -> None:
        pending, self.pending = self.pending, []
        for _, fn in pending:
            fn()


@pytest.fixture
def logger():
    lg = logging.getLogger("tenbox.test.guestlog")
    lg.setLevel(logging.DEBUG)
    return lg


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_budget_allows_a_burst_per_window_and_counts_the_rest():
    clock = Clock()
    b = Budget(burst=3, window_sec=10, clock=clock)
    assert [b.allow() for _ in range(5)] == [True, True, True, False, False]
    assert b.take_pending() == 2 and b.take_pending() == 0
    clock.now += 10
    assert b.allow() and b.suppressed_total == 2


def test_a_flood_logs_the_burst_then_one_line_with_the_count(logger, caplog):
    clock, timers = Clock(), Timers()
    g = GuestLog(logger, "blk vda: failed requests", burst=10, window_sec=60, clock=clock, schedule=timers)
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        for i in range(100000):
            g.warning("request %d failed", i)
        assert len(caplog.records) == 10 and g.suppressed_total == 99990
        assert len(timers.pending) == 1 and 59 < timers.pending[0][0] < 61  # one timer, at the window's end
        clock.now += 61
        timers.fire()  # the guest went quiet: the count is logged when the window ends
        assert _messages(caplog)[-1] == "blk vda: failed requests: 99990 more not logged (at most 10 per 60 s)"
        g.warning("request again")
        assert _messages(caplog)[-1] == "request again"
        for i in range(20):
            g.warning("more %d", i)
        clock.now += 61
        g.warning("later")  # the next line of the kind reports the count first
        assert _messages(caplog)[-2:] == ["blk vda: failed requests: 11 more not logged (at most 10 per 60 s)",
                                          "later"]


def test_levels_that_are_off_are_neither_logged_nor_counted(logger, caplog):
    g = GuestLog(logger, "guestfwd", burst=1, clock=Clock(), schedule=Timers())
    logger.setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(50):
            g.info("connection ended")
        assert caplog.records == [] and g.suppressed_total == 0


def test_flush_all_logs_what_was_left_out_at_exit(logger, caplog):
    g = GuestLog(logger, "guest resets", burst=1, clock=Clock(), schedule=Timers())
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        for _ in range(5):
            g.info("reset")
        flush_all()
        assert _messages(caplog) == ["reset", "guest resets: 4 more not logged (at most 1 per 60 s)"]


def test_runtime_log_is_rotated_live_and_keeps_two_old_files(tmp_path):
    """Past max_bytes the file moves to .1 (.1 to .2) and the fd writes into a new file of the same mode."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "runtime.log"
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.fchmod(fd, 0o640)
    stream = open(fd, "w", closefd=False)
    try:
        assert stderr_runtime_log(str(tmp_path), fd) == str(path)
        assert stderr_runtime_log(str(tmp_path), 0) is None  # stdin is not that file
        handler = RuntimeLogHandler(str(path), stream=stream, fds=(fd,), max_bytes=4096, keep=2)
        lg = logging.getLogger("tenbox.test.runtimelog")
        lg.propagate = False
        lg.addHandler(handler)
        try:
            for i in range(2000):
                lg.warning("line %05d %s", i, "x" * 60)
            os.write(fd, b"written past logging\n")
        finally:
            lg.removeHandler(handler)
        assert handler.rotations > 10
        names = sorted(p.name for p in logs.iterdir())
        assert names == ["runtime.log", "runtime.log.1", "runtime.log.2"]
        for p in logs.iterdir():
            assert p.stat().st_size <= 4096 + 100
            assert p.stat().st_mode & 0o777 == 0o640
        assert path.read_text().endswith("line 01999 " + "x" * 60 + "\nwritten past logging\n")
    finally:
        stream.close()
        os.close(fd)
