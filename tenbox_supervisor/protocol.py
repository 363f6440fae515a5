"""The control socket's protocol: request types, error codes, limits, socket lookup (daemon and CLI).

Newline-delimited JSON, one request per line: {"id", "type", ...} with the
method's parameters in "payload" (TenBox's top-level "vm_id", "lines" and
"data_hex" are accepted too). Replies: {"id", "ok": true, "payload": {...}}
or {"id", "ok": false, "error_code": "...", "error": "..."}. Streams
(vm.console.attach, vm.logs.follow) answer once, then send event lines.
"""

from __future__ import annotations

import enum
import os
import re
from typing import List, Optional

REQUEST_MAX_BYTES = 1 << 20
CLIENT_IDLE_SEC = 300.0  # a connection that says nothing for this long is closed
CLIENTS_MAX = 256
NAME_RE = re.compile(r"[A-Za-z0-9-]{1,64}\Z")

DEFAULT_SYSTEM_SOCKET = "/run/tenbox/tenbox.sock"
SYSTEM_RUN_DIR = "/run/tenbox"
SOCKET_GROUP_ENV = "TENBOX_SOCKET_GROUP"
SOCKET_ENV = "TENBOX_SOCK"


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


class Event(str, enum.Enum):
    """Lines a stream sends after its first reply, and what a console client sends."""

    CONSOLE_DATA = "console.data"  # data_hex
    CONSOLE_INPUT = "console.input"  # data_hex (client -> daemon)
    CONSOLE_CLOSED = "console.closed"  # reason
    LOGS_APPEND = "vm.logs.append"  # payload.lines
    LOGS_CLOSED = "vm.logs.closed"


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
    ErrorCode.PERMISSION_DENIED: "only root may do this",
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
    ErrorCode.INTERNAL_ERROR: "internal error in tenboxd",
}


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
    out.append("/tmp/tenbox-%d.sock" % uid)
    return out


def default_socket_path(env: Optional[dict] = None, uid: Optional[int] = None) -> str:
    return default_socket_candidates(env, uid)[0]
