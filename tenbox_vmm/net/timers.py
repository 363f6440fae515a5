"""The timers libslirp asks for, kept in Python and run by the poll loop (I/O thread).

libslirp arms its timers with absolute expiry times in milliseconds of the
clock it reads through `clock_get_ns`; they are one-shot and re-armed by
the code they run. The owner asks `next_due_ms()` for its poll timeout and
calls `run_due()` after polling.
"""

from __future__ import annotations

from typing import Callable, Optional, Set


class SlirpTimer:
    """One libslirp timer: what to run when it expires, and when (None: disarmed)."""

    __slots__ = ("fire", "expire_ms", "handle", "__weakref__")

    def __init__(self, fire: Callable[[], None]) -> None:
        self.fire = fire
        self.expire_ms: Optional[int] = None
        self.handle = None  # the cffi handle libslirp holds for this timer


class TimerTable:
    def __init__(self) -> None:
        self._timers: Set[SlirpTimer] = set()

    def __len__(self) -> int:
        return len(self._timers)

    def new(self, fire: Callable[[], None]) -> SlirpTimer:
        t = SlirpTimer(fire)
        self._timers.add(t)
        return t

    def mod(self, timer: SlirpTimer, expire_ms: int) -> None:
        timer.expire_ms = expire_ms

    def free(self, timer: SlirpTimer) -> None:
        timer.expire_ms = None
        self._timers.discard(timer)

    def next_due_ms(self) -> Optional[int]:
        due = [t.expire_ms for t in self._timers if t.expire_ms is not None]
        return min(due) if due else None

    def run_due(self, now_ms: int) -> int:
        """Fire every timer due at `now_ms`, once; the number fired."""
        fired = 0
        for t in [t for t in self._timers if t.expire_ms is not None and t.expire_ms <= now_ms]:
            if t not in self._timers or t.expire_ms is None or t.expire_ms > now_ms:
                continue  # freed or re-armed by a timer that ran before it
            t.expire_ms = None
            fired += 1
            t.fire()
        return fired

    def clear(self) -> None:
        self._timers.clear()
