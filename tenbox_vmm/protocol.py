"""What tenbox-vm-runtime tells the world: exit codes and VM states (worker; imported by the daemon).

The worker link's messages join this module with the supervisor issue; the
exit codes are the runtime's contract with anyone who starts it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit status of tenbox-vm-runtime. Documented in docs/runtime.md."""

    POWEROFF = 0  # the guest powered itself off
    ERROR = 1  # an unexpected error inside tenbox-vm-runtime (a bug: see the log)
    USAGE = 2  # bad command line or input: kernel, initrd, memory, cpus, /dev/kvm
    STOPPED = 3  # stopped by the host: SIGTERM/SIGINT/SIGHUP, Ctrl-], or a stop command
    TRIPLE_FAULT = 4  # the guest triple-faulted (KVM_EXIT_SHUTDOWN); vCPU state in the log
    KVM_ERROR = 5  # KVM internal error, failed entry or unhandled exit; vCPU state in the log
    GUEST_CRASH = 6  # the guest reported a crash (KVM system event "crash")

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    ExitCode.POWEROFF: "guest powered off",
    ExitCode.ERROR: "internal error in tenbox-vm-runtime",
    ExitCode.USAGE: "bad command line or input",
    ExitCode.STOPPED: "stopped by the host",
    ExitCode.TRIPLE_FAULT: "guest triple fault",
    ExitCode.KVM_ERROR: "KVM error",
    ExitCode.GUEST_CRASH: "guest crashed",
}


class VmState(str, enum.Enum):
    """Lifecycle states of a VM, shared by worker and daemon."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    CRASHED = "crashed"


# --- Worker link -------------------------------------------------------------
#
# The supervisor binds a ZeroMQ ROUTER on an ipc:// endpoint in a 0700 run
# directory; each worker connects a DEALER whose identity is its VM id.
# Every frame is one msgpack map with a "t" (type) key. A worker says HELLO
# on every (re)connect and whenever the supervisor asks who it is, so a
# restarted supervisor re-adopts running workers instead of losing them.

LINK_PROTOCOL = 1
LINK_MAX_MESSAGE_BYTES = 1 << 20  # libzmq drops a peer that sends more
LINK_QUEUE_MAX = 1000  # messages queued per direction before sends are dropped
HEARTBEAT_INTERVAL_SEC = 1.0
HEARTBEAT_LIVENESS = 5  # silent intervals before the peer counts as gone (zguide: 3..5)
CONSOLE_CHUNK_MAX = 64 << 10  # console bytes per message


class Msg(str, enum.Enum):
    """Message types on the worker link ("t" field)."""

    # worker -> supervisor
    HELLO = "hello"  # vm_id, pid, create_time, state, started_at, boots, protocol, version
    STATE = "state"  # state, reason
    CONSOLE = "console"  # data (bytes)
    REPLY = "reply"  # id, ok, error?
    EXIT = "exit"  # code, reason: sent just before the worker exits
    NET = "net"  # link_up, mac, hostfwds, guestfwds, failures: after start and every change
    # supervisor -> worker
    COMMAND = "command"  # id, name (Command), args
    WHO = "who"  # "who are you?": answered with HELLO
    # both ways
    HEARTBEAT = "heartbeat"


class Command(str, enum.Enum):
    """What the supervisor may ask a worker to do."""

    STOP = "stop"  # hard stop: halt the vCPUs, flush, exit STOPPED
    REBOOT = "reboot"  # reset the guest
    SHUTDOWN = "shutdown"  # press the ACPI power button
    CONSOLE_INPUT = "console_input"  # args.data: bytes for the serial console
    NET_LINK = "net_link"  # args.up: bool
    NET_FORWARDS = "net_forwards"  # args.hostfwds, args.guestfwds: lists of specs; reply: failures


def pack(msg: dict) -> bytes:
    import msgpack

    return msgpack.packb(msg, use_bin_type=True)


def unpack(frame: bytes) -> dict:
    """Decode one frame; ValueError for anything that is not a map with a known type."""
    import msgpack

    if len(frame) > LINK_MAX_MESSAGE_BYTES:
        raise ValueError("frame too large")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=LINK_MAX_MESSAGE_BYTES,
                              max_str_len=LINK_MAX_MESSAGE_BYTES, max_array_len=4096, max_map_len=256)
    except Exception as e:  # msgpack raises a family of exceptions for garbage
        raise ValueError("undecodable frame: %s" % e) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ValueError("frame is not a message")
    try:
        Msg(msg["t"])
    except ValueError:
        raise ValueError("unknown message type %r" % msg["t"]) from None
    return msg
