"""The worker link's messages as named tuples, and their msgpack frames (worker and daemon).

tenboxd binds a ZeroMQ ROUTER on an ipc:// endpoint in a 0700 run
directory; each worker connects a DEALER whose identity is its VM id.
Every frame is one msgpack map with a "t" (type) key; `encode` and
`decode` are the only ways in and out, so a field is named once, here. A
worker says HELLO on every (re)connect and whenever the supervisor asks who
it is, so a restarted supervisor re-adopts running workers; HELLO carries
LINK_VERSION and tenboxd refuses a worker that speaks another one.

The messages are typing.NamedTuple classes, not dataclasses: every worker
imports this module before its guest runs, and a frozen dataclass costs
about 0.5 ms of `exec` to make, a named tuple a fifth of that.
"""

from __future__ import annotations

import enum
from typing import Any, Dict, NamedTuple, Optional, Tuple, Type, Union

from tenbox_vmm.protocol import Limits, VmState

LINK_VERSION = 1
HEARTBEAT_INTERVAL_SEC = 1.0
HEARTBEAT_LIVENESS = 5  # silent intervals before the peer counts as gone (zguide: 3..5)


class Msg(str, enum.Enum):
    """Message types on the worker link (the "t" field)."""

    HELLO = "hello"  # worker -> supervisor
    STATE = "state"
    CONSOLE = "console"
    REPLY = "reply"
    EXIT = "exit"  # sent just before the worker exits
    NET = "net"  # after start and every network change
    COMMAND = "command"  # supervisor -> worker
    WHO = "who"  # "who are you?": answered with HELLO
    HEARTBEAT = "heartbeat"  # both ways


class CommandName(str, enum.Enum):
    """What the supervisor may ask a worker to do."""

    STOP = "stop"  # hard stop: halt the vCPUs, flush, exit STOPPED; args.reason
    REBOOT = "reboot"  # reset the guest
    SHUTDOWN = "shutdown"  # press the ACPI power button
    CONSOLE_INPUT = "console_input"  # args.data: bytes for the serial console
    NET_LINK = "net_link"  # args.up: bool
    NET_FORWARDS = "net_forwards"  # args.hostfwds, args.guestfwds: lists of specs; reply: failures
    STATS = "stats"  # reply: WorkerStats.to_wire() (the devices' counters, guest RAM touched)
    DISK_GROW = "disk_grow"  # args.index (the --disk order), args.size ("20G" or "+5G"); reply: size (bytes)
    # args.name (Limits.NAME_RE): the running machine saved to NAME.snap, made new in the worker's
    # --snapshot-dir (a staging folder: tenboxd moves the file into place); args.overlays: per disk
    # in --disk order, None or the name (Limits.NAME_RE) of a qcow2 overlay in that folder, backed
    # by the disk's image, which the disk continues on. The reply comes once the file is synced:
    # path, file_bytes, paused_ms. The guest runs on.
    SNAPSHOT = "snapshot"


class UnknownCommand(ValueError):
    """A COMMAND whose name this worker does not know (a newer tenboxd): answered, not dropped."""

    def __init__(self, req_id: int, name: object) -> None:
        super().__init__("unknown command %r" % (name,))
        self.req_id = req_id
        self.name = name


def _field(d: Dict[str, Any], key: str, types: Union[type, Tuple[type, ...]]) -> Any:
    value = d.get(key)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ValueError("%s message: %s is missing or has the wrong type" % (d.get("t"), key))
    return value


def _as_tuple(types: Union[type, Tuple[type, ...]]) -> Tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _state(d: Dict[str, Any]) -> VmState:
    try:
        return VmState(d.get("state"))
    except ValueError:
        raise ValueError("%s message: unknown state %r" % (d.get("t"), d.get("state"))) from None


class NetStatus(NamedTuple):
    """What a worker's network card is doing: link, MAC, the forwards in place and those that failed."""

    link_up: bool
    mac: str
    hostfwds: Tuple[str, ...] = ()
    guestfwds: Tuple[str, ...] = ()
    failures: Tuple[Tuple[str, str], ...] = ()  # (spec, reason)

    def to_wire(self) -> Dict[str, Any]:
        """Also the `net_status` of a VM in tenboxd's replies: the same keys in the same order."""
        return {
            "link_up": self.link_up,
            "mac": self.mac,
            "hostfwds": list(self.hostfwds),
            "guestfwds": list(self.guestfwds),
            "failures": [list(f) for f in self.failures],
        }

    @classmethod
    def from_wire(cls, d: Any) -> "NetStatus":
        if not isinstance(d, dict):
            raise ValueError("net status is not a map")
        lists = {}
        for key in ("hostfwds", "guestfwds", "failures"):
            value = d.get(key, [])
            if not isinstance(value, (list, tuple)):
                raise ValueError("net status: %s is not a list" % key)
            lists[key] = value
        failures = tuple((str(f[0]), str(f[1])) for f in lists["failures"] if isinstance(f, (list, tuple)) and len(f) == 2)
        return cls(link_up=bool(d.get("link_up")), mac=str(d.get("mac", "")),
                   hostfwds=tuple(str(s) for s in lists["hostfwds"]),
                   guestfwds=tuple(str(s) for s in lists["guestfwds"]), failures=failures)


_COUNTER_MAX = (1 << 64) - 1  # msgpack's unsigned range: a counter outside it is a bad message


def _counters(d: Any, names: Tuple[str, ...], what: str) -> Dict[str, int]:
    if not isinstance(d, dict):
        raise ValueError("%s is not a map" % what)
    out = {}
    for name in names:
        value = d.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _COUNTER_MAX:
            raise ValueError("%s: %s is not a counter" % (what, name))
        out[name] = value
    return out


def _counters_to_wire(counters: Any) -> Dict[str, int]:
    return dict(zip(counters._fields, counters))


class BlockCounters(NamedTuple):
    """One virtio-blk device's requests since the worker started (guest resets do not clear them).

    On the wire a map of every field, each an unsigned 64-bit integer."""

    read_bytes: int = 0
    read_ops: int = 0
    write_bytes: int = 0
    write_ops: int = 0
    flush_ops: int = 0
    errors: int = 0
    capacity_bytes: int = 0

    def to_wire(self) -> Dict[str, int]:
        return _counters_to_wire(self)

    @classmethod
    def from_wire(cls, d: Any) -> "BlockCounters":
        return cls(**_counters(d, cls._fields, "block counters"))


class NetCounters(NamedTuple):
    """The virtio-net card's frames since the worker started (rx: to the guest, tx: from it).

    On the wire a map of every field, each an unsigned 64-bit integer."""

    rx_bytes: int = 0
    rx_packets: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0

    def to_wire(self) -> Dict[str, int]:
        return _counters_to_wire(self)

    @classmethod
    def from_wire(cls, d: Any) -> "NetCounters":
        return cls(**_counters(d, cls._fields, "net counters"))


class WorkerStats(NamedTuple):
    """The STATS command's reply: what only the worker can count."""

    guest_ram_bytes: int
    guest_ram_touched_bytes: int  # resident pages of the guest RAM mapping (what the guest has used)
    disks: Tuple[BlockCounters, ...] = ()  # in --disk order
    net: Optional[NetCounters] = None

    def to_wire(self) -> Dict[str, Any]:
        return {"guest_ram_bytes": self.guest_ram_bytes, "guest_ram_touched_bytes": self.guest_ram_touched_bytes,
                "disks": [d.to_wire() for d in self.disks],
                "net": self.net.to_wire() if self.net is not None else None}

    @classmethod
    def from_wire(cls, d: Any) -> "WorkerStats":
        top = _counters(d, ("guest_ram_bytes", "guest_ram_touched_bytes"), "stats")
        disks = d.get("disks") or []
        if not isinstance(disks, (list, tuple)) or len(disks) > Limits.VIRTIO_SLOTS:
            raise ValueError("stats: disks is not a list of at most %d" % Limits.VIRTIO_SLOTS)
        net = d.get("net")
        return cls(disks=tuple(BlockCounters.from_wire(x) for x in disks),
                   net=NetCounters.from_wire(net) if net is not None else None, **top)


# Worker -> supervisor -------------------------------------------------------------------


class Hello(NamedTuple):
    T = Msg.HELLO
    vm_id: str
    pid: int
    create_time: float  # the process start time as psutil computes it: with pid, the worker's identity
    state: VmState
    started_at: Optional[float]  # wall-clock time of the machine's start; 0.0 before it starts
    boots: int
    version: str  # the package version
    net: Optional[NetStatus] = None
    link_version: int = LINK_VERSION

    def to_wire(self) -> Dict[str, Any]:
        return {"t": self.T.value, "vm_id": self.vm_id, "pid": self.pid, "create_time": self.create_time,
                "state": self.state.value, "started_at": self.started_at, "boots": self.boots,
                "protocol": self.link_version, "version": self.version,
                "net": self.net.to_wire() if self.net is not None else None}

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "Hello":
        started = d.get("started_at")
        net = d.get("net")
        version = d.get("protocol")
        return cls(vm_id=str(d.get("vm_id", "")), pid=_field(d, "pid", int),
                   create_time=float(_field(d, "create_time", (int, float))), state=_state(d),
                   started_at=float(started) if isinstance(started, (int, float)) else None,
                   boots=d.get("boots") if isinstance(d.get("boots"), int) else 0,
                   version=str(d.get("version", "")),
                   net=NetStatus.from_wire(net) if isinstance(net, dict) else None,
                   link_version=version if isinstance(version, int) else 0)


class StateReport(NamedTuple):
    T = Msg.STATE
    state: VmState
    reason: str = ""

    def to_wire(self) -> Dict[str, Any]:
        return {"t": self.T.value, "state": self.state.value, "reason": self.reason}

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "StateReport":
        return cls(state=_state(d), reason=str(d.get("reason") or ""))


class ConsoleData(NamedTuple):
    T = Msg.CONSOLE
    data: bytes

    def to_wire(self) -> Dict[str, Any]:
        return {"t": self.T.value, "data": self.data}

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "ConsoleData":
        return cls(data=_field(d, "data", bytes))


class Reply(NamedTuple):
    T = Msg.REPLY
    id: Any  # the command's id, as it came
    ok: bool
    error: Optional[str] = None
    result: Optional[Dict[str, Any]] = None

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"t": self.T.value, "id": self.id, "ok": self.ok}
        if self.error:
            out["error"] = self.error
        if self.result is not None:
            out["result"] = self.result
        return out

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "Reply":
        result = d.get("result")
        error = d.get("error")
        return cls(id=d.get("id"), ok=bool(d.get("ok")), error=str(error) if error else None,
                   result=result if isinstance(result, dict) else None)


class WorkerExit(NamedTuple):
    T = Msg.EXIT
    code: int  # the ExitCode the worker is about to exit with
    reason: str = ""

    def to_wire(self) -> Dict[str, Any]:
        return {"t": self.T.value, "code": self.code, "reason": self.reason}

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "WorkerExit":
        return cls(code=_field(d, "code", int), reason=str(d.get("reason") or ""))


class NetReport(NamedTuple):
    T = Msg.NET
    status: NetStatus

    def to_wire(self) -> Dict[str, Any]:
        return dict({"t": self.T.value}, **self.status.to_wire())

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "NetReport":
        return cls(status=NetStatus.from_wire(d))


# Both ways ------------------------------------------------------------------------------


class Heartbeat(NamedTuple):
    T = Msg.HEARTBEAT
    state: Optional[VmState] = None  # a worker's says its machine's state; the supervisor's says nothing

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"t": self.T.value}
        if self.state is not None:
            out["state"] = self.state.value
        return out

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "Heartbeat":
        return cls(state=_state(d) if "state" in d else None)


# Supervisor -> worker -------------------------------------------------------------------


class Command(NamedTuple):
    T = Msg.COMMAND
    id: int  # 0: no reply awaited
    name: CommandName
    args: Optional[Dict[str, Any]] = None

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"t": self.T.value, "id": self.id, "name": self.name.value}
        if self.args is not None:
            out["args"] = self.args
        return out

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "Command":
        req_id = d.get("id")
        try:
            name = CommandName(d.get("name"))
        except ValueError:
            raise UnknownCommand(req_id, d.get("name")) from None
        args = d.get("args")
        return cls(id=req_id, name=name, args=args if isinstance(args, dict) else {})


class Who(NamedTuple):
    T = Msg.WHO

    def to_wire(self) -> Dict[str, Any]:
        return {"t": self.T.value}

    @classmethod
    def from_wire(cls, d: Dict[str, Any]) -> "Who":
        return cls()


Message = Union[Hello, StateReport, ConsoleData, Reply, WorkerExit, NetReport, Heartbeat, Command, Who]
_BY_TYPE: Dict[Msg, Type[Any]] = {c.T: c for c in (Hello, StateReport, ConsoleData, Reply, WorkerExit, NetReport,
                                                    Heartbeat, Command, Who)}


def encode(msg: Message) -> bytes:
    import msgpack

    return msgpack.packb(msg.to_wire(), use_bin_type=True)


def decode(frame: bytes) -> Message:
    """One frame as its message; ValueError for anything that is not a well-formed known message."""
    import msgpack

    if len(frame) > Limits.LINK_MESSAGE_MAX_BYTES:
        raise ValueError("frame too large")
    try:
        d = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=Limits.LINK_MESSAGE_MAX_BYTES,
                            max_str_len=Limits.LINK_MESSAGE_MAX_BYTES, max_array_len=4096, max_map_len=256)
    except Exception as e:  # msgpack raises a family of exceptions for garbage
        raise ValueError("undecodable frame: %s" % e) from None
    if not isinstance(d, dict) or not isinstance(d.get("t"), str):
        raise ValueError("frame is not a message")
    try:
        cls = _BY_TYPE[Msg(d["t"])]
    except ValueError:
        raise ValueError("unknown message type %r" % d["t"]) from None
    return cls.from_wire(d)
