"""tenboxd's event log: bounded in entries and text, followers cut off (never waited for) when they fall behind."""

import asyncio

import pytest

from tenbox_supervisor.console_feed import SUBSCRIBER_QUEUE_BYTES, SUBSCRIBER_QUEUE_MAX
from tenbox_supervisor.events import EVENT_TEXT_MAX, EVENTS_MAX, EventLog
from tenbox_supervisor.protocol import EventKind, FailureCode
from tenbox_vmm.protocol import VmState

S = VmState


def test_the_log_keeps_the_last_entries_in_order_with_their_time():
    clock = [100.0]
    log = EventLog(lambda: clock[0])
    for i in range(EVENTS_MAX + 5):
        clock[0] += 1
        log.emit(EventKind.IMAGE_IMPORTED, image="img%d" % i)
    kept = log.since(0)
    assert len(kept) == EVENTS_MAX and kept[0]["seq"] == 6 and kept[-1]["seq"] == EVENTS_MAX + 5
    assert [e["seq"] for e in log.since(kept[-3]["time"])] == [EVENTS_MAX + 3, EVENTS_MAX + 4, EVENTS_MAX + 5]
    assert log.oldest() == kept[0]["time"] and kept[0]["kind"] == "image.imported"


def test_text_fields_are_cut_and_deep_values_dropped():
    log = EventLog(lambda: 1.0)
    e = log.emit(EventKind.HOST_UPDATE, error="x" * (EVENT_TEXT_MAX * 10), deep={"a": {"b": {"c": 1}}},
                 lines=["y" * (EVENT_TEXT_MAX * 2)])
    assert len(e["error"]) == EVENT_TEXT_MAX + 3 and len(e["lines"][0]) == EVENT_TEXT_MAX + 3
    assert e["deep"] == {"a": {"b": None}}


def test_a_follower_gets_every_new_entry_and_one_that_stops_reading_is_cut_off():
    """A stalled follower holds at most SUBSCRIBER_QUEUE_MAX entries of at most a few KiB each, then is cut off."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # Python 3.9's queues bind to the current loop when made
    try:
        log = EventLog(lambda: 1.0)
        with log.subscribe() as reader, log.subscribe() as stalled:
            first = log.emit(EventKind.VM_CREATED, vm_id="a", name="a")
            assert loop.run_until_complete(reader.get()) == first
            big = "z" * (EVENT_TEXT_MAX - 10)
            sent = 0
            while not stalled.cut_off:
                log.emit(EventKind.HOST_UPDATE, error=big)
                sent += 1
                assert sent <= SUBSCRIBER_QUEUE_MAX and stalled.waiting_bytes <= SUBSCRIBER_QUEUE_BYTES
                while not reader.empty():
                    reader.get_nowait()
            assert stalled.get_nowait() is None and stalled.empty()
            log.emit(EventKind.VM_DELETED, vm_id="a", name="a")
            assert stalled.empty() and reader.get_nowait()["kind"] == "vm.deleted"
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_state_changes_and_restarts_become_events_with_the_crash_failure(rig):
    log = EventLog(rig.host.time)
    rig.workers.add_listener(log.on_state_change)
    rig.with_restarter().add_listener(log.on_restart)
    vm = rig.create(restart="on-failure:1")
    rig.host.on_spawn = lambda proc: rig.hello(vm, proc.pid)
    rig.run(rig.workers.start(vm))
    rig.host.exit(vm.pid, -9)
    rig.settle()
    got = [(e["kind"], e.get("old"), e.get("new"), e.get("action")) for e in log.since(0)]
    assert got == [("vm.state", "stopped", "starting", None), ("vm.state", "starting", "running", None),
                   ("vm.state", "running", "crashed", None), ("vm.restart", None, None, "scheduled")]
    crashed, scheduled = log.since(0)[2:]
    assert crashed["failure"]["code"] == FailureCode.KILLED.value and crashed["failure"]["signal"] == "SIGKILL"
    assert "console" not in crashed["failure"] and crashed["name"] == "web" and crashed["vm_id"] == vm.id
    assert (scheduled["attempt"], scheduled["backoff_sec"]) == (1, 1.0)
