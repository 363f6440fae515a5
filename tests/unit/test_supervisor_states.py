"""The VM state machine: every edge the documentation draws is allowed, every other one refused, and nothing else sets a state."""

import asyncio
import itertools

import pytest

from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.spec import VmSpec
from tenbox_supervisor.states import ACTIVE_STATES, TRANSITIONS, InvalidTransition
from tenbox_vmm.protocol import VmState

S = VmState
# docs/daemon.md's diagram, written out again on purpose: the table in states.py must agree with it.
ALLOWED = {
    (S.STOPPED, S.STARTING), (S.CRASHED, S.STARTING),
    (S.STARTING, S.RUNNING), (S.STARTING, S.REBOOTING), (S.STARTING, S.STOPPING), (S.STARTING, S.STOPPED),
    (S.STARTING, S.CRASHED),
    (S.RUNNING, S.REBOOTING), (S.RUNNING, S.STOPPING), (S.RUNNING, S.STOPPED), (S.RUNNING, S.CRASHED),
    (S.REBOOTING, S.RUNNING), (S.REBOOTING, S.STOPPING), (S.REBOOTING, S.STOPPED), (S.REBOOTING, S.CRASHED),
    (S.STOPPING, S.STOPPED), (S.STOPPING, S.CRASHED),
}
EDGES = [(a, b) for a, b in itertools.product(S, S) if a != b]


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.run_until_complete(asyncio.sleep(0))  # the change notifications change_state scheduled
    loop.close()
    asyncio.set_event_loop(None)


class Recorder:
    def __init__(self):
        self.saved = []
        self.announced = []

    def vm(self, state):
        vm = ManagedVm(VmSpec(id="a1", name="a", kernel="/k"), lambda v: self.saved.append(v.state),
                       lambda v, old, new, why: self.announced.append((old, new)))
        vm.restore_state(state, "test")
        return vm


def test_the_table_is_the_documented_one():
    assert {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts} == ALLOWED
    assert ACTIVE_STATES == {S.STARTING, S.RUNNING, S.STOPPING, S.REBOOTING}


@pytest.mark.parametrize("old, new", sorted(ALLOWED), ids=lambda s: s.value)
def test_an_allowed_change_is_persisted_and_announced(loop, old, new):
    r = Recorder()
    vm = r.vm(old)
    vm.change_state(new, "test")
    assert vm.state == new and r.saved == [new] and r.announced == [(old, new)]


@pytest.mark.parametrize("old, new", sorted(set(EDGES) - ALLOWED), ids=lambda s: s.value)
def test_a_refused_change_leaves_everything_as_it_was(loop, old, new):
    r = Recorder()
    vm = r.vm(old)
    with pytest.raises(InvalidTransition, match="%s -> %s" % (old.value, new.value)):
        vm.change_state(new, "test")
    assert vm.state == old and r.saved == [] and r.announced == []


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.value)
def test_a_change_to_the_same_state_does_nothing(loop, state):
    r = Recorder()
    vm = r.vm(state)
    vm.change_state(state, "again")
    assert r.saved == [] and r.announced == []


def test_restoring_after_a_restart_is_not_a_transition(loop):
    """runtime.json said running: the record is set to it without the table, a write or an announcement."""
    r = Recorder()
    vm = r.vm(S.STOPPED)
    vm.restore_state(S.RUNNING, "runtime.json")  # stopped -> running is no edge of the table
    assert vm.state == S.RUNNING and r.saved == [] and r.announced == []
