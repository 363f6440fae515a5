"""tenboxd's protocols: control-socket methods, error and failure codes, the CLI's exit codes, cloud message types, socket lookup (daemon and CLI).

Newline-delimited JSON, one request per line: {"id", "type", ...} with the
method's parameters in "payload" (TenBox's top-level "vm_id", "lines" and
"data_hex" are accepted too). Replies: {"id", "ok": true, "payload": {...}}
or {"id", "ok": false, "error_code": "...", "error": "..."}. Streams
(vm.console.attach, vm.logs.follow) answer once, then send event lines.
The cloud link (docs/cloud.md) carries the same methods in JSON envelopes.
"""

from __future__ import annotations

import enum
import os
from typing import Dict, List, Optional

from tenbox_vmm.protocol import VERSION, Limits

REQUEST_MAX_BYTES = 1 << 20
CLIENT_IDLE_SEC = 300.0  # a connection that sends no request for this long is closed (blank lines are not requests)
# A client that takes no byte of its replies for this long is disconnected: its task and buffers
# go. A reply is at most a few MiB and a reader that keeps up takes 64 KiB in microseconds.
CLIENT_WRITE_STALL_SEC = 10.0
CLIENTS_MAX = 256  # connections of every non-root user together
CLIENTS_PER_UID_MAX = 32  # connections of one non-root user: one user cannot take all 256
# Root's connections (the CLI under sudo, the package's postinst) are counted apart and never
# against the limits above: no number of group members' clients can lock root out.
ROOT_CLIENTS_MAX = 64
STATS_VMS_MAX = 256  # VM names in one vm.stats request
NAME_RE = Limits.NAME_RE  # VM ids and names, image names: each becomes a folder

DEFAULT_SYSTEM_SOCKET = "/run/tenbox/tenbox.sock"
SYSTEM_RUN_DIR = "/run/tenbox"
SOCKET_GROUP_ENV = "TENBOX_SOCKET_GROUP"
SOCKET_ENV = "TENBOX_SOCK"
# The last place the CLI looks, and a per-user daemon's socket without $XDG_RUNTIME_DIR: in a
# folder anyone can write, so the CLI trusts what it finds there only if it is the user's or root's.
FALLBACK_SOCKET = "/tmp/tenbox-%d.sock"


class Method(str, enum.Enum):
    DOCTOR = "doctor"
    SYSTEM_INFO = "system.info"
    VM_LIST = "vm.list"
    VM_CREATE = "vm.create"
    VM_EDIT = "vm.edit"
    VM_START = "vm.start"
    VM_STOP = "vm.stop"
    VM_REBOOT = "vm.reboot"
    VM_SHUTDOWN = "vm.shutdown"
    VM_DELETE = "vm.delete"
    VM_LOGS = "vm.logs"
    VM_LOGS_FOLLOW = "vm.logs.follow"
    VM_CONSOLE_ATTACH = "vm.console.attach"
    IMAGE_LIST = "image.list"
    IMAGE_INSPECT = "image.inspect"
    IMAGE_IMPORT = "image.import"
    IMAGE_REMOVE = "image.remove"
    HOST_UPDATE = "host.update"
    HOST_UPDATE_NOTIFY = "host.update.notify"  # the package's postinst: "I am installing version V"
    HOST_UPDATE_LOG = "host.update.log"
    HOST_SHUTDOWN = "host.shutdown"  # the host is going down: every active VM powered off (tenbox-guests.service)
    VM_DISK_LIST = "vm.disk.list"
    VM_DISK_ADD = "vm.disk.add"  # a new qcow2 in the VM's folder (disk_api.py)
    VM_DISK_RESIZE = "vm.disk.resize"  # grow a disk; live through the worker when the VM runs
    VM_STATS = "vm.stats"  # CPU, memory, block and network counters of running VMs (stats.py)
    VM_SNAPSHOT = "vm.snapshot"  # machine state, RAM and a disk layer (snapshot_api.py)
    VM_SNAPSHOT_LIST = "vm.snapshot.list"
    VM_SNAPSHOT_REMOVE = "vm.snapshot.remove"
    VM_RESTORE = "vm.restore"  # the VM back to one of its snapshots
    VM_CLONE = "vm.clone"  # new VMs from a snapshot, started from its RAM
    EVENTS = "events"  # stream: the daemon's event log (events.py), replayed from `since`, then as it happens


# The reason a VM stopped because the host shut down (host.shutdown): its state_reason, and
# the reason of its state changes in the event log and the cloud's vm.state_changed.
HOST_SHUTDOWN_REASON = "host_shutdown"


class Event(str, enum.Enum):
    """Lines a stream sends after its first reply, and what a console client sends."""

    CONSOLE_DATA = "console.data"  # data_hex
    CONSOLE_INPUT = "console.input"  # data_hex (client -> daemon)
    CONSOLE_CLOSED = "console.closed"  # reason
    LOGS_APPEND = "vm.logs.append"  # payload.lines
    LOGS_CLOSED = "vm.logs.closed"
    EVENT = "event"  # payload: one entry of the event log
    EVENTS_CLOSED = "events.closed"  # reason: the follower fell too far behind


class EventKind(str, enum.Enum):
    """What an entry of tenboxd's event log is about (`tenbox events`; docs/daemon.md)."""

    VM_CREATED = "vm.created"  # vm_id, name
    VM_DELETED = "vm.deleted"  # vm_id, name
    VM_STATE = "vm.state"  # vm_id, name, old, new, reason; failure {code, message} when new is crashed
    VM_RESTART = "vm.restart"  # vm_id, name, action (scheduled, starting, gave_up) and its details
    VM_SNAPSHOT = "vm.snapshot"  # vm_id, name, snapshot, action (taken, restored, removed, cloned), details
    VM_DISK_ADDED = "vm.disk_added"  # vm_id, name, index, disk (file name), size_bytes
    VM_DISK_RESIZED = "vm.disk_resized"  # vm_id, name, index, disk (file name), size_bytes, live
    IMAGE_IMPORTED = "image.imported"  # image
    IMAGE_REMOVED = "image.removed"  # image
    HOST_UPDATE = "host.update"  # action (started, finished, failed), from, to, error


class ErrorCode(str, enum.Enum):
    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_REQUEST = "unknown_request"
    REQUEST_TOO_LARGE = "request_too_large"
    INVALID_ARGUMENT = "invalid_argument"
    PERMISSION_DENIED = "permission_denied"
    VM_NOT_FOUND = "vm_not_found"
    VM_EXISTS = "vm_exists"
    VM_BROKEN = "vm_broken"
    VM_RUNNING = "vm_running"
    VM_NOT_RUNNING = "vm_not_running"
    VM_BUSY = "vm_busy"
    VM_START_FAILED = "vm_start_failed"
    VM_STOP_FAILED = "vm_stop_failed"
    KVM_UNSUPPORTED = "kvm_unsupported"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    FILE_MISSING = "file_missing"
    DISK_NOT_FOUND = "disk_not_found"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_EXISTS = "image_exists"
    IMAGE_IN_USE = "image_in_use"
    IMAGE_CORRUPT = "image_corrupt"
    INSUFFICIENT_SPACE = "insufficient_space"
    STORE_FAILED = "store_failed"
    TOO_MANY_CLIENTS = "too_many_clients"
    VMS_RUNNING = "vms_running"
    UPDATE_DISABLED = "update_disabled"
    UPDATE_IN_PROGRESS = "update_in_progress"
    APT_FAILED = "apt_failed"
    VERSION_UNCHANGED = "version_unchanged"
    SNAPSHOT_NOT_FOUND = "snapshot_not_found"
    SNAPSHOT_EXISTS = "snapshot_exists"
    SNAPSHOT_UNSUPPORTED = "snapshot_unsupported"
    SNAPSHOT_FAILED = "snapshot_failed"
    SNAPSHOT_IN_USE = "snapshot_in_use"
    FORWARD_CONFLICT = "forward_conflict"
    INTERNAL_ERROR = "internal_error"

    @property
    def message(self) -> str:
        return ERROR_MESSAGES[self]


ERROR_MESSAGES = {
    ErrorCode.BAD_JSON: "the request is not valid JSON",
    ErrorCode.BAD_REQUEST: "the request is malformed",
    ErrorCode.UNKNOWN_REQUEST: "unknown request type",
    ErrorCode.REQUEST_TOO_LARGE: "the request is larger than 1 MiB",
    ErrorCode.INVALID_ARGUMENT: "a parameter is missing or invalid",
    ErrorCode.PERMISSION_DENIED: "not allowed: a root-only request, or a file the caller may not open",
    ErrorCode.VM_NOT_FOUND: "no such VM",
    ErrorCode.VM_EXISTS: "a VM with that name exists",
    ErrorCode.VM_BROKEN: "the VM's stored spec is unreadable",
    ErrorCode.VM_RUNNING: "the VM is running",
    ErrorCode.VM_NOT_RUNNING: "the VM is not running",
    ErrorCode.VM_BUSY: "the VM is changing state",
    ErrorCode.VM_START_FAILED: "the VM could not be started",
    ErrorCode.VM_STOP_FAILED: "the VM could not be stopped",
    ErrorCode.KVM_UNSUPPORTED: "KVM is not usable on this host",
    ErrorCode.INSUFFICIENT_MEMORY: "the host does not have that much memory free",
    ErrorCode.FILE_MISSING: "a file the VM needs is missing or unreadable",
    ErrorCode.IMAGE_NOT_FOUND: "no such image",
    ErrorCode.IMAGE_EXISTS: "an image with that name exists",
    ErrorCode.DISK_NOT_FOUND: "the VM has no such disk (vm disk ls lists them)",
    ErrorCode.IMAGE_IN_USE: "VMs use the image; delete them first",
    ErrorCode.IMAGE_CORRUPT: "an image file or its manifest does not match (sha256, size or format)",
    ErrorCode.INSUFFICIENT_SPACE: "not enough free disk space",
    ErrorCode.STORE_FAILED: "the VM or image store could not be written",
    ErrorCode.TOO_MANY_CLIENTS: "too many clients are connected",
    ErrorCode.VMS_RUNNING: "one or more VMs are active; stop them before upgrading",
    ErrorCode.UPDATE_DISABLED: "this installation cannot update itself",
    ErrorCode.UPDATE_IN_PROGRESS: "an update is in progress",
    ErrorCode.APT_FAILED: "apt-get failed",
    ErrorCode.VERSION_UNCHANGED: "apt succeeded but the installed version did not change",
    ErrorCode.SNAPSHOT_NOT_FOUND: "no such snapshot (vm snapshot ls lists them)",
    ErrorCode.SNAPSHOT_EXISTS: "the VM has a snapshot of that name",
    ErrorCode.SNAPSHOT_UNSUPPORTED: "a writable disk of the VM is not its own qcow2 image: it cannot be layered",
    ErrorCode.SNAPSHOT_FAILED: "the snapshot could not be taken; the VM runs on unchanged",
    ErrorCode.SNAPSHOT_IN_USE: "other VMs' disks are built on this VM's snapshots; delete them first",
    ErrorCode.FORWARD_CONFLICT: "a host port forward is another VM's already",
    ErrorCode.INTERNAL_ERROR: "internal error in tenboxd",
}


class FailureCode(str, enum.Enum):
    """Why a VM last failed: `last_failure.code` in vm.list and in the cloud's vm.state_changed."""

    # The worker ended badly.
    KILLED = "killed"  # by a signal; `signal` names it
    HEARTBEAT_LOST = "heartbeat_lost"  # silent for HEARTBEAT_LIVENESS intervals: killed
    START_TIMEOUT = "start_timeout"  # no HELLO within START_TIMEOUT_SEC: killed
    LINK_VERSION = "link_version"  # it speaks another worker-link version: killed
    START_FAILED = "start_failed"  # the runtime refused the VM's configuration (exit 2)
    TRIPLE_FAULT = "triple_fault"
    KVM_ERROR = "kvm_error"
    GUEST_CRASH = "guest_crash"
    WORKER_ERROR = "worker_error"  # an internal error of the runtime, or an exit status it does not document
    WORKER_EXITED = "worker_exited"  # an adopted worker ended; its status is unknown
    WORKER_LOST = "worker_lost"  # it ended while no tenboxd was running
    SANDBOX_FAILED = "sandbox_failed"  # it could not enter its sandbox (exit 7): the guest never ran
    SANDBOX_VIOLATION = "sandbox_violation"  # killed by its seccomp filter (SIGSYS): a call outside it
    # vm.start refused before a worker ran: the same words as the request's ErrorCode.
    KVM_UNSUPPORTED = "kvm_unsupported"
    FILE_MISSING = "file_missing"
    INSUFFICIENT_MEMORY = "insufficient_memory"


class ExitCode(enum.IntEnum):
    """Exit status of tenbox / tenboxctl (see `tenbox --help` and the manual page)."""

    OK = 0
    FAILED = 1  # tenboxd refused or the request failed; its error code is printed in parentheses
    USAGE = 2  # bad command line
    UNREACHABLE = 3  # tenboxd is not running or the connection broke; the socket path is named
    PERMISSION = 4  # permission denied: the socket (the tenbox group), a root-only method, a file not the caller's to open

    @property
    def meaning(self) -> str:
        return _EXIT_MEANINGS[self]


_EXIT_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "tenboxd refused the request or it failed (the error code is printed)",
    ExitCode.USAGE: "bad command line",
    ExitCode.UNREACHABLE: "tenboxd is not running or cannot be reached",
    ExitCode.PERMISSION: "permission denied: the socket (join the tenbox group), a root-only request, or a file you "
                         "may not open",
}

# The CLI's exit status for each error code tenboxd can answer with. Every code is listed,
# so a new one needs a decision here (tests/unit/test_cli_exit_codes.py checks it).
EXIT_CODES: Dict[ErrorCode, ExitCode] = {code: ExitCode.FAILED for code in ErrorCode}
EXIT_CODES[ErrorCode.PERMISSION_DENIED] = ExitCode.PERMISSION


def exit_code_for(code: Optional[ErrorCode]) -> ExitCode:
    """The exit status for an error reply; FAILED for a code this CLI does not know (a newer tenboxd)."""
    return EXIT_CODES.get(code, ExitCode.FAILED) if code is not None else ExitCode.FAILED


class CloudMsg(str, enum.Enum):
    """Envelope types on the cloud link besides the methods (docs/cloud.md)."""

    DEVICE_HELLO = "device.hello"  # ->: host payload, device_token or pair_code
    DEVICE_PAIRED = "device.paired"  # <-: device_token
    DEVICE_UNAUTHORIZED = "device.unauthorized"  # <-: forget the token, pair again
    DEVICE_PAIR_INVALID = "device.pair_invalid"  # <-: a new code with the next connection
    HOST_RESOURCES_TICK = "host.resources_tick"  # ->: every TICK_INTERVAL_SEC
    VM_RESOURCES_TICK = "vm.resources_tick"  # ->
    VM_STATE_CHANGED = "vm.state_changed"  # ->: every state change
    HOST_RESOURCES = "host.resources"  # <- request, answered by the link itself
    DEVICE_CAPABILITIES = "device.capabilities"  # <- request, answered by the link itself


# Cloud request types and the method each runs; anything else is unknown_request.
CLOUD_METHODS: Dict[str, Method] = {
    "vm.list": Method.VM_LIST,
    "vm.create": Method.VM_CREATE,
    "vm.edit": Method.VM_EDIT,
    "vm.start": Method.VM_START,
    "vm.stop": Method.VM_STOP,
    "vm.shutdown": Method.VM_SHUTDOWN,
    "vm.reboot": Method.VM_REBOOT,
    "vm.delete": Method.VM_DELETE,
    "vm.logs.tail": Method.VM_LOGS,
    "host.update": Method.HOST_UPDATE,
}
CLOUD_LOCAL_REQUESTS = (CloudMsg.HOST_RESOURCES.value, CloudMsg.DEVICE_CAPABILITIES.value)


def cloud_response(request_type: str) -> str:
    """The envelope type that answers a cloud request."""
    return request_type + ".response"


def default_socket_candidates(env: Optional[dict] = None, uid: Optional[int] = None) -> List[str]:
    """Where the CLI looks for tenboxd, in order (the seed's lookup).

    $TENBOX_SOCK, then /run/tenbox/tenbox.sock if /run/tenbox exists (even
    when it cannot be read: a permission error is more honest than "no such
    file"), then $XDG_RUNTIME_DIR/tenbox.sock, then /tmp/tenbox-<uid>.sock.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if env.get(SOCKET_ENV):
        return [env[SOCKET_ENV]]
    out = []
    if os.path.isdir(SYSTEM_RUN_DIR):
        out.append(DEFAULT_SYSTEM_SOCKET)
    if env.get("XDG_RUNTIME_DIR"):
        out.append(os.path.join(env["XDG_RUNTIME_DIR"], "tenbox.sock"))
    out.append(FALLBACK_SOCKET % uid)
    return out


def default_socket_path(env: Optional[dict] = None, uid: Optional[int] = None) -> str:
    return default_socket_candidates(env, uid)[0]
