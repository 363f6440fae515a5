"""libslirp timers fire once when due, in order of need, and can be re-armed or freed from a timer."""

from tenbox_vmm.net.timers import TimerTable


def test_timer_fires_once_at_its_expiry_and_not_before():
    fired = []
    t = TimerTable()
    timer = t.new(lambda: fired.append(1))
    assert t.next_due_ms() is None
    t.mod(timer, 100)
    assert t.next_due_ms() == 100
    assert t.run_due(99) == 0 and not fired
    assert t.run_due(100) == 1 and fired == [1]
    assert t.run_due(1000) == 0 and t.next_due_ms() is None


def test_a_timer_can_rearm_itself_and_free_another():
    t = TimerTable()
    log = []
    a = t.new(lambda: (log.append("a"), t.mod(a, 500), t.free(b)))
    b = t.new(lambda: log.append("b"))
    t.mod(a, 10)
    t.mod(b, 10)
    t.run_due(10)
    assert log in (["a"], ["b", "a"])
    assert t.next_due_ms() == 500 and len(t) == 1


def test_freed_timer_never_fires():
    t = TimerTable()
    fired = []
    timer = t.new(lambda: fired.append(1))
    t.mod(timer, 5)
    t.free(timer)
    assert t.run_due(10) == 0 and not fired
