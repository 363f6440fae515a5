"""Request parameters, checked: every method's input goes through here before a handler acts on it (daemon, root).

After Firecracker's vmm_config: each function takes the request's params,
returns a typed value or None when the parameter is absent, and raises
ApiError(invalid_argument) with one line naming the parameter. Nothing
here touches the file system: the files a request names are opened by
caller_files.py, with the caller's rights and off the event loop. Limits come from the worker's protocol (Limits) and the VM spec
checks (spec.py), so a value accepted here is one the runtime accepts.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from tenbox_supervisor import cloudinit
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import NAME_RE, ErrorCode
from tenbox_supervisor.restart_policy import RestartPolicy
from tenbox_supervisor.spec import SpecError, check_disk
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.forwards import ForwardSpecError, parse_guestfwd, parse_hostfwd

Params = Dict[str, Any]

CMDLINE_MAX = 4096
PATH_MAX = 4096
TIMEOUT_MAX_SEC = 3600
LOG_LINES_DEFAULT = 200
LOG_LINES_MAX = 10000
LOG_SOURCES = ("console", "runtime")
VERSION_RE = re.compile(r"(?:\d+:)?\d[A-Za-z0-9.+~]*(?:-[A-Za-z0-9.+~]+)?\Z")  # a Debian version
VERSION_MAX = 64
NET_WORDS = {"on": True, "true": True, "up": True, "off": False, "false": False, "down": False}


def _invalid(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_ARGUMENT, message)


def get(params: Params, key: str, types, required: bool = False, default: Any = None) -> Any:
    """params[key] if it has one of `types` (a bool is not an int); `default` when absent or null."""
    if key not in params or params[key] is None:
        if required:
            raise _invalid("%s is required" % key)
        return default
    value = params[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _invalid("%s has the wrong type" % key)
    if not isinstance(value, types):
        raise _invalid("%s has the wrong type" % key)
    return value


def name(params: Params, key: str, required: bool = False) -> Optional[str]:
    """An id or name: [A-Za-z0-9-]{1,64}."""
    value = get(params, key, str, required)
    if value is not None and not NAME_RE.match(value):
        raise _invalid("%s must match [A-Za-z0-9-]{1,64}" % key)
    return value


def integer(params: Params, key: str, lo: int, hi: int, default: Optional[int] = None,
            required: bool = False) -> Optional[int]:
    value = get(params, key, int, required, default)
    if value is not None and not lo <= value <= hi:
        raise _invalid("%s must be in %d..%d" % (key, lo, hi))
    return value


def memory_mb(params: Params, host_mb: int, default: Optional[int] = None) -> Optional[int]:
    return integer(params, "memory_mb", Limits.MEMORY_MIN_MB, host_mb, default=default)


def cpus(params: Params, default: Optional[int] = None) -> Optional[int]:
    return integer(params, "cpus", Limits.CPUS_MIN, Limits.CPUS_MAX, default=default)


def timeout(params: Params, default_sec: float) -> int:
    return integer(params, "timeout", 1, TIMEOUT_MAX_SEC, default=int(default_sec))


def file_path(params: Params, key: str, required: bool = False) -> Optional[str]:
    """An absolute path, normalised. Nothing is opened here: caller_files.py does, with the caller's rights."""
    path = get(params, key, str, required)
    if path is None:
        return None
    if not path or len(path) > PATH_MAX or "\0" in path:
        raise _invalid("%s is not a usable path" % key)
    if not os.path.isabs(path):
        raise _invalid("%s must be an absolute path" % key)
    return os.path.normpath(path)


SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")


def sha256(params: Params, key: str) -> Optional[str]:
    """A sha256 digest: 64 hex digits, returned in lowercase."""
    value = get(params, key, str)
    if value is not None and not SHA256_RE.match(value.lower()):
        raise _invalid("%s must be 64 hexadecimal digits" % key)
    return value.lower() if value is not None else None


def image_sources(params: Params, most: int) -> Tuple[List[str], bool]:
    """image.import's sources, normalised: ([path], True) for `path` (a folder), (files, False) for `files` (a manifest and its files)."""
    path = get(params, "path", str)
    files = get(params, "files", list)
    if (path is None) == (files is None):
        raise _invalid("give path (a folder) or files (a manifest and its files)")
    paths = [path] if path is not None else files
    if not paths or len(paths) > most:
        raise _invalid("files must list 2 to %d paths" % most)
    out: List[str] = []
    for p in paths:
        if not isinstance(p, str) or not p or len(p) > PATH_MAX or "\0" in p or not os.path.isabs(p):
            raise _invalid("%r is not an absolute path" % (p,))
        out.append(os.path.normpath(p))
    return out, path is not None


def disks(params: Params) -> Optional[List[Dict[str, Any]]]:
    """`disks`: [{"path", "read_only", "serial", "format"} or "path"]; TenBox's single `disk` path is accepted too."""
    raw = params.get("disks")
    if raw is None and params.get("disk") is not None:
        raw = [params["disk"]]
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > Limits.DISKS_MAX:
        raise _invalid("disks must be a list of at most %d disks" % Limits.DISKS_MAX)
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise _invalid("disks[%d] must be a path or an object" % i)
        entry = {
            "path": file_path({"path": item.get("path")}, "path", required=True),
            "read_only": get(item, "read_only", bool, default=False),
            "serial": get(item, "serial", str, default=""),
            "owned": False,
        }
        fmt = get(item, "format", str)
        if fmt is not None:
            entry["format"] = fmt
        try:
            check_disk(entry)
        except SpecError as e:
            raise _invalid("disks[%d]: %s" % (i, e))
        out.append(entry)
    return out


def forwards(params: Params, key: str) -> Optional[List[str]]:
    """`hostfwds` or `guestfwds`: a list of specs (or one), each checked with the worker's own grammar."""
    raw = params.get(key)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or len(raw) > Limits.FORWARDS_MAX or not all(isinstance(s, str) for s in raw):
        raise _invalid("%s must be a list of at most %d specs" % (key, Limits.FORWARDS_MAX))
    parse = parse_hostfwd if key == "hostfwds" else parse_guestfwd
    for spec in raw:
        try:
            parse(spec)
        except ForwardSpecError as e:
            raise _invalid(str(e))
    return list(raw)


def net_flag(params: Params) -> Optional[bool]:
    """`net`: true/false, or "on"/"off" (TenBox's CLI); also TenBox's `net_enabled`/`nat_enabled`."""
    for key in ("net", "net_enabled", "nat_enabled"):
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in NET_WORDS:
            return NET_WORDS[value.lower()]
        raise _invalid("%s must be on or off" % key)
    return None


def restart_policy(params: Params) -> Optional[str]:
    """`restart`: no, on-failure, on-failure:N (N >= 1) or always; returned in its normal spelling."""
    value = params.get("restart")
    if value is None:
        return None
    try:
        return str(RestartPolicy.parse(value))
    except ValueError as e:
        raise _invalid(str(e))


def cmdline(params: Params) -> Optional[str]:
    value = get(params, "cmdline", str)
    if value is not None and (len(value) > CMDLINE_MAX or any(ord(ch) < 32 or ord(ch) > 126 for ch in value)):
        raise _invalid("cmdline must be printable ASCII, at most %d bytes" % CMDLINE_MAX)
    return value


def log_source(params: Params) -> str:
    source = get(params, "source", str, default="console")
    if source not in LOG_SOURCES:
        raise _invalid("source must be console or runtime")
    return source


def debian_version(params: Params, required: bool = False) -> Optional[str]:
    version = get(params, "version", str, required)
    if version is not None and (len(version) > VERSION_MAX or not VERSION_RE.match(version)):
        raise _invalid("%r is not a Debian version" % version)
    return version


CLOUD_INIT_KEYS = ("user", "hostname", "ssh_keys", "user_data_b64", "network_config")
_B64_MAX = (cloudinit.USER_DATA_MAX + 2) // 3 * 4 + 4


def cloud_init(params: Params) -> Optional[Dict[str, Optional[str]]]:
    """The `cloud_init` object of vm.create and vm.edit, checked by cloudinit.py; None when absent.

    {"user", "hostname", "ssh_keys" (public key lines), "user_data_b64" (the
    operator's user-data, base64: it may be gzip'd), "network_config"}, each
    optional; a key given as null is removed at vm.edit. User-data comes
    back decompressed and checked, base64 again, as the spec keeps it.
    """
    value = get(params, "cloud_init", dict)
    if value is None:
        return None
    unknown = sorted(set(value) - set(CLOUD_INIT_KEYS))
    if unknown:
        raise _invalid("cloud_init has no key %r (it has %s)" % (unknown[0][:64], ", ".join(CLOUD_INIT_KEYS)))
    out: Dict[str, Optional[str]] = {}
    for key in CLOUD_INIT_KEYS:
        if key not in value:
            continue
        item = value[key]
        if item is None:
            out[key] = None
            continue
        if not isinstance(item, str):
            raise _invalid("cloud_init.%s must be a string" % key)
        try:
            out[key] = _cloud_init_item(key, item)
        except cloudinit.ProvisionError as e:
            raise _invalid(str(e))
    return out


def _cloud_init_item(key: str, item: str) -> str:
    if key == "user":
        return cloudinit.check_user(item)
    if key == "hostname":
        return cloudinit.check_hostname(item)
    if key == "ssh_keys":
        return "\n".join(cloudinit.check_ssh_keys(item))
    if key == "network_config":
        return cloudinit.check_network_config(item.encode("utf-8", "surrogateescape")).decode()
    if len(item) > _B64_MAX:
        raise cloudinit.ProvisionError("user-data is larger than %d KiB" % (cloudinit.USER_DATA_MAX >> 10))
    try:
        raw = base64.b64decode(item.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise cloudinit.ProvisionError("cloud_init.user_data_b64 is not base64") from None
    return base64.b64encode(cloudinit.check_user_data(raw)).decode()
