"""The VM state machine: which state may follow which (daemon, root; pure).

One table, after supervisord's process.py and cloud-hypervisor's
VmState::valid_transition. `ManagedVm.change_state` consults it for every
change; the only state set without it is the one read back from
runtime.json when tenboxd starts (`ManagedVm.restore_state`: nothing
happened to the VM, tenboxd was away).

    stopped|crashed --vm.start--> starting --the worker runs the guest--> running
    starting|running --guest reset / vm.reboot--> rebooting --> running
    starting|running|rebooting --vm.stop / vm.shutdown--> stopping --> stopped
    any active state --the guest powers off--> stopped
    any active state --the worker dies, is killed or goes silent--> crashed
"""

from __future__ import annotations

from typing import Dict, FrozenSet

from tenbox_vmm.protocol import VmState

S = VmState
TRANSITIONS: Dict[VmState, FrozenSet[VmState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.CRASHED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.REBOOTING, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.RUNNING: frozenset({S.REBOOTING, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.REBOOTING: frozenset({S.RUNNING, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.STOPPING: frozenset({S.STOPPED, S.CRASHED}),
}
# A worker exists (or is expected) in these; host.update refuses while any VM is in one.
ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.STOPPING, S.REBOOTING})


class InvalidTransition(Exception):
    pass


def check_transition(vm_id: str, old: VmState, new: VmState, reason: str) -> None:
    """InvalidTransition unless the table allows old -> new."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition("%s: %s -> %s (%s)" % (vm_id, old.value, new.value, reason))
