"""Rate limits on what a guest can make the worker say again and again: log lines, reset reports (worker).

A guest decides how often its block requests fail, how many guest-forward
connections it opens, how often it breaks a virtqueue or resets itself.
Each kind of message gets a `GuestLog`: at most Limits.GUEST_LOG_BURST lines
per Limits.GUEST_LOG_WINDOW_SEC are logged, the others are counted, and the
count is logged once the window ends (at the next line of that kind, by a
timer if the guest went quiet, or at exit through flush_all()). `Budget`
is the counter alone, for reports that are not log lines (Machine's resets).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable, Optional

from tenbox_vmm.protocol import Limits

Clock = Callable[[], float]
# schedule(delay_sec, fn): run fn once after delay_sec (a daemon thread by default; tests replace it).
Schedule = Callable[[float, Callable[[], None]], Any]

_ALL: "weakref.WeakSet[GuestLog]" = weakref.WeakSet()


class Budget:
    """At most `burst` events per window of `window_sec`; the others are counted in `pending`."""

    def __init__(self, burst: int = Limits.GUEST_LOG_BURST, window_sec: float = Limits.GUEST_LOG_WINDOW_SEC,
                 clock: Clock = time.monotonic) -> None:
        self.burst = burst
        self.window_sec = window_sec
        self._clock = clock
        self._start = clock() - window_sec  # the first event opens a window
        self._used = 0
        self.pending = 0  # left out since the last take_pending()
        self.suppressed_total = 0

    def allow(self) -> bool:
        now = self._clock()
        if now - self._start >= self.window_sec:
            self._start, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return True
        self.pending += 1
        self.suppressed_total += 1
        return False

    def take_pending(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def window_left(self) -> float:
        return max(0.0, self._start + self.window_sec - self._clock())


def _daemon_timer(delay: float, fn: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


class GuestLog:
    """One kind of guest-triggered message on `logger`, rate-limited; `what` names the kind in the count's line."""

    def __init__(self, logger: logging.Logger, what: str, *, burst: int = Limits.GUEST_LOG_BURST,
                 window_sec: float = Limits.GUEST_LOG_WINDOW_SEC, clock: Clock = time.monotonic,
                 schedule: Schedule = _daemon_timer) -> None:
        self._logger = logger
        self.what = what
        self._budget = Budget(burst, window_sec, clock)
        self._schedule = schedule
        self._timer: Optional[Any] = None
        self._lock = threading.Lock()
        _ALL.add(self)

    @property
    def suppressed_total(self) -> int:
        return self._budget.suppressed_total

    def log(self, level: int, msg: str, *args: Any) -> None:
        """logger.log(level, msg, *args) if the budget allows; else counted. Nothing if the level is off."""
        if not self._logger.isEnabledFor(level):
            return
        with self._lock:
            if not self._budget.allow():
                if self._timer is None:
                    self._timer = self._schedule(self._budget.window_left() + 0.01, self._window_ended)
                return
            missed = self._budget.take_pending()
        if missed:
            self._report(missed)
        self._logger.log(level, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def _window_ended(self) -> None:
        with self._lock:
            self._timer = None
            missed = self._budget.take_pending()
        if missed:
            self._report(missed)

    def _report(self, missed: int) -> None:
        b = self._budget
        self._logger.warning("%s: %d more not logged (at most %d per %.0f s)", self.what, missed, b.burst,
                             b.window_sec)

    def flush(self) -> None:
        """Log the count of what was left out now (the worker is ending)."""
        with self._lock:
            timer, self._timer = self._timer, None
            missed = self._budget.take_pending()
        if timer is not None and hasattr(timer, "cancel"):
            timer.cancel()
        if missed:
            self._report(missed)


def flush_all() -> None:
    """Every GuestLog's count of what it left out, logged now (at the worker's exit)."""
    for g in list(_ALL):
        g.flush()
