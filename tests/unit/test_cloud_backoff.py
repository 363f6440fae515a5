"""The cloud link's reconnect waits: random, but each within [bound/2, bound]."""

import types

from tenbox_supervisor.cloud import BACKOFF_MAX_SEC, reconnect_wait


def waits(attempt, draws=200):
    state = types.SimpleNamespace(attempt_number=attempt)
    return [reconnect_wait(state) for _ in range(draws)]


def test_each_wait_is_between_half_its_bound_and_its_bound():
    for attempt, bound in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0)):
        got = waits(attempt)
        assert min(got) >= bound / 2 and max(got) <= bound, (attempt, min(got), max(got))
        assert len(set(got)) > 1  # jittered, so that hosts that lost the cloud together spread out


def test_the_waits_grow_for_certain_until_the_cap():
    lows = [min(waits(n)) for n in range(1, 9)]
    highs = [max(waits(n)) for n in range(1, 9)]
    for n in range(len(lows) - 1):
        assert lows[n + 1] > lows[n] or lows[n + 1] >= BACKOFF_MAX_SEC / 2, lows
    assert highs[0] <= 1.0 and lows[2] >= 2.0  # the third wait alone is longer than the first two could be


def test_the_bound_stops_at_sixty_seconds_however_many_attempts():
    for attempt in (7, 8, 40, 10_000):
        got = waits(attempt, draws=50)
        assert BACKOFF_MAX_SEC / 2 <= min(got) and max(got) <= BACKOFF_MAX_SEC, attempt
