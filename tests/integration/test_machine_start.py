"""How a Machine starts and ends, as the worker's main() and its link rely on it (real KVM, test guests).

- `machine.warm_up()` (a standby's, before it forks workers) builds a VM and
  a vCPU, loads a saved state into it, and leaves no descriptor, mapping or
  thread behind; `usernet.warm_up()` builds and drops a network card (real
  libslirp) the same way.
- `wait_running` returns once the guest runs, or once the machine has ended;
  a done callback added after the end is called at once. The worker starts
  its link after the guest runs, and a guest that ended first must still be
  reported.
- The worker link speaks HELLO first, then the states and the exit, over a
  real ZeroMQ ROUTER socket as tenboxd's.
"""

import os
import threading

import pytest
import zmq

from tenbox_vmm import usernet
from tenbox_vmm.machine import Machine, MachineConfig, install_kick_handler, warm_up
from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.link import Hello, StateReport, WorkerExit, decode
from tenbox_vmm.supervisor_link import SupervisorLink
from tests.framework.guests import BOOT_SEC, guest_path

pytestmark = pytest.mark.usefixtures("kvm", "guests")


def fds():
    return sorted(os.readlink("/proc/self/fd/%s" % fd) for fd in os.listdir("/proc/self/fd")
                  if os.path.exists("/proc/self/fd/%s" % fd))


def test_warm_up_builds_a_vm_and_leaves_nothing_behind():
    before, threads = fds(), threading.active_count()
    assert warm_up() is True
    assert fds() == before
    assert threading.active_count() == threads
    assert "kvm-vcpu" not in open("/proc/self/maps").read()


def test_a_network_card_warm_up_builds_one_and_leaves_nothing_behind():
    before, threads = fds(), threading.active_count()
    assert usernet.warm_up() is True, "libslirp is a test dependency: the card must build"
    assert fds() == before
    assert threading.active_count() == threads


def machine(guest: str, states: list) -> Machine:
    install_kick_handler()
    config = MachineConfig(kernel=guest_path(guest), memory_mb=32, vm_id="t")
    return Machine(config, lambda data: None, on_state=lambda state, reason: states.append(state))


def test_wait_running_returns_once_the_guest_runs():
    states: list = []
    m = machine("idle", states)
    m.start()
    try:
        assert m.wait_running(BOOT_SEC)
        assert VmState.RUNNING in states and m.exit_code is None
    finally:
        m.stop()
        m.wait(BOOT_SEC)
        m.close()


def test_a_machine_that_ended_settles_wait_running_and_calls_a_late_done_callback_at_once():
    states: list = []
    m = machine("poweroff", states)
    m.start()
    assert m.wait(BOOT_SEC) is not None
    assert m.wait_running(0)
    called = []
    m.add_done_callback(lambda: called.append(threading.current_thread()))
    assert called == [threading.current_thread()]
    m.close()


def test_the_link_of_a_worker_whose_guest_ended_first_says_hello_then_its_state_and_exit(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, int(BOOT_SEC * 1000))
    endpoint = "ipc://%s" % (tmp_path / "link.sock")
    router.bind(endpoint)
    states: list = []
    m = machine("poweroff", states)
    link = SupervisorLink(endpoint, "t")
    m._on_state = lambda state, reason: (states.append(state), link.state_changed(state, reason))
    m.start()
    m.wait(BOOT_SEC)
    try:
        link.start(m)  # after the end, as a worker whose guest ended before its link started
        got = []
        while not got or not isinstance(got[-1], WorkerExit):
            _, frame = router.recv_multipart()
            got.append(decode(frame))
        link.join(BOOT_SEC)
    finally:
        router.close()
        ctx.term()
        m.close()
    assert isinstance(got[0], Hello) and got[0].vm_id == "t", got[0]
    reported = [msg.state for msg in got if isinstance(msg, StateReport)]
    assert VmState.RUNNING in reported and reported[-1] == VmState.STOPPED, reported
    assert got[-1].code == int(m.exit_code)
