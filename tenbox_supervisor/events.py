"""tenboxd's event log: what happened to VMs, images and updates, kept in memory and streamed (daemon, root).

After `docker events` and libvirt's event API: state changes (with the
failure of a crash), restarts, VMs created and deleted, images imported and
removed, self-updates. The log is a ring of EVENTS_MAX entries (the oldest
go first), each with a sequence number and a time, its text fields cut to
EVENT_TEXT_MAX characters: whatever guests and clients do, it holds at most
about EVENTS_MAX * (EVENT_TEXT_MAX * a few fields). The `events` method
replays the entries since a time and then follows; each follower has a
bounded queue (console_feed.Subscriber: SUBSCRIBER_QUEUE_MAX entries,
SUBSCRIBER_QUEUE_BYTES bytes, as a `vm logs -f` follower) and is cut off,
never waited for, when it falls behind.
"""

from __future__ import annotations

import collections
import contextlib
import json
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Protocol, Set

from tenbox_supervisor import params as P
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.console_feed import Subscriber, offer
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.protocol import ErrorCode, Event, EventKind, Method
from tenbox_vmm.protocol import VmState

EVENTS_MAX = 1000  # entries kept for replay
EVENT_TEXT_MAX = 1024  # characters of one text field (a failure message, a reason)
EVENT_DEPTH_MAX = 3  # nesting of an entry's fields; deeper values are dropped


class EventSink(Protocol):
    """Where the method groups report what they did (the EventLog)."""

    def emit(self, kind: EventKind, **fields: Any) -> Dict[str, Any]:
        ...


def _bounded(value: Any, depth: int = 0) -> Any:
    """The value with every string cut to EVENT_TEXT_MAX characters and nothing nested deeper than EVENT_DEPTH_MAX."""
    if isinstance(value, str):
        return value if len(value) <= EVENT_TEXT_MAX else value[:EVENT_TEXT_MAX] + "..."
    if depth >= EVENT_DEPTH_MAX and isinstance(value, (dict, list, tuple)):
        return None
    if isinstance(value, dict):
        return {str(k): _bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bounded(v, depth + 1) for v in value]
    return value


class EventLog:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ring: Deque[Dict[str, Any]] = collections.deque(maxlen=EVENTS_MAX)
        self._subs: Set[Subscriber] = set()
        self._seq = 0

    def emit(self, kind: EventKind, **fields: Any) -> Dict[str, Any]:
        """Record one event and hand it to every follower."""
        self._seq += 1
        entry = dict(_bounded(fields), seq=self._seq, time=self._clock(), kind=kind.value)
        self._ring.append(entry)
        cost = len(json.dumps(entry))
        for q in list(self._subs):
            offer(q, entry, cost)
        return entry

    def since(self, when: float) -> List[Dict[str, Any]]:
        """The kept entries at or after `when` (epoch seconds), oldest first."""
        return [e for e in self._ring if e["time"] >= when]

    def oldest(self) -> Optional[float]:
        return self._ring[0]["time"] if self._ring else None

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscriber]:
        """A queue of entries as they are emitted, until None (the follower fell too far behind)."""
        q = Subscriber()
        self._subs.add(q)
        try:
            yield q
        finally:
            self._subs.discard(q)

    # What the other parts tell -----------------------------------------------------------------

    def on_state_change(self, vm: ManagedVm, old: VmState, new: VmState, reason: str) -> None:
        """A WorkerManager state listener."""
        fields: Dict[str, Any] = {"vm_id": vm.id, "name": vm.spec.name, "old": old.value, "new": new.value,
                                  "reason": reason}
        if new == VmState.CRASHED and vm.last_failure:
            fields["failure"] = {k: vm.last_failure.get(k) for k in ("code", "message", "exit_code", "signal")}
        self.emit(EventKind.VM_STATE, **fields)

    def on_restart(self, vm: ManagedVm, action: str, details: Dict[str, Any]) -> None:
        """A Restarter listener."""
        self.emit(EventKind.VM_RESTART, vm_id=vm.id, name=vm.spec.name, action=action, **details)

    # The method ----------------------------------------------------------------------------------

    def method_specs(self) -> List[MethodSpec]:
        return [MethodSpec(Method.EVENTS, self.events, mutating=False, stream=True)]

    async def events(self, params: P.Params, caller: Caller, stream) -> Dict[str, Any]:
        """Replay the entries since `since` (none without it), then, with `follow` (the default), every new one."""
        since = P.get(params, "since", (int, float))
        follow = P.get(params, "follow", bool, default=True)
        if since is not None and since < 0:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "since must be a time in seconds since the epoch")
        with self.subscribe() as q:  # before the replay: nothing can fall between the two
            past = self.since(since) if since is not None else []
            if not await stream.reply({"oldest": self.oldest(), "replayed": len(past)}):
                return {}
            last = 0
            for entry in past:
                await stream.event({"type": Event.EVENT.value, "payload": entry})
                last = entry["seq"]
            if not follow:
                return {}

            async def send(entry: Dict[str, Any]) -> None:
                if entry["seq"] > last:  # not replayed already
                    await stream.event({"type": Event.EVENT.value, "payload": entry})

            if await stream.follow(q, send):
                await stream.event({"type": Event.EVENTS_CLOSED.value,
                                    "reason": "this client fell too far behind; connect again with since"})
            return {}
