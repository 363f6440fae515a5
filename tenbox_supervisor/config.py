"""tenboxd's settings from flags and environment (daemon, root under systemd)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from tenbox_supervisor.protocol import (
    CLIENT_IDLE_SEC,
    DEFAULT_SYSTEM_SOCKET,
    FALLBACK_SOCKET,
    SOCKET_GROUP_ENV,
    SYSTEM_RUN_DIR,
)

DEFAULT_DATA_DIR = "/var/lib/tenbox"
CLIENT_IDLE_ENV = "TENBOX_CLIENT_IDLE_SEC"
CLIENT_IDLE_RANGE_SEC = (1.0, 86400.0)
# The Prometheus endpoint (metrics.py), off by default: "unix:/run/tenbox/metrics.sock" or a
# loopback "127.0.0.1:9464" / "[::1]:9464" / "localhost:9464". Never another address: the
# figures name every VM, and the endpoint has no authentication of its own.
METRICS_LISTEN_ENV = "TENBOX_METRICS_LISTEN"
UNIX_PATH_MAX_BYTES = 107  # sun_path holds 108 bytes with the NUL
# Workers started ahead of need (standby.py): 0 turns them off.
STANDBY_ENV = "TENBOX_STANDBY_WORKERS"
STANDBY_DEFAULT = 1
STANDBY_RANGE = (0, 16)  # each one idles at about 20 MiB


class ConfigError(ValueError):
    """A setting from the environment makes no sense; the message names it."""


def under_systemd(env: dict) -> bool:
    """systemd sets INVOCATION_ID for every service it starts."""
    return bool(env.get("INVOCATION_ID"))


def _user_runtime_dir(env: dict, uid: int) -> str:
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "tenbox")
    return "/tmp/tenbox-%d" % uid


@dataclass(frozen=True)
class Config:
    data_dir: str
    socket_path: str
    run_dir: str
    socket_group: Optional[str]
    cloud_url: str
    client_idle_sec: float = CLIENT_IDLE_SEC
    metrics_listen: Optional[Tuple[str, ...]] = None  # ("unix", path) or ("tcp", host, port)
    standby_workers: int = STANDBY_DEFAULT

    @property
    def worker_endpoint(self) -> str:
        return "ipc://" + os.path.join(self.run_dir, "workers", "link.sock")

    @property
    def vms_dir(self) -> str:
        return os.path.join(self.data_dir, "vms")

    @property
    def images_dir(self) -> str:
        return os.path.join(self.data_dir, "images")


def resolve(
    data_dir: Optional[str] = None,
    socket_path: Optional[str] = None,
    run_dir: Optional[str] = None,
    cloud_url: Optional[str] = None,
    env: Optional[dict] = None,
    uid: Optional[int] = None,
) -> Config:
    """Flags win over environment, environment over defaults.

    Root under systemd uses the system paths (/var/lib/tenbox,
    /run/tenbox/tenbox.sock); anyone else gets a per-user daemon whose
    socket is where the CLI looks next ($XDG_RUNTIME_DIR/tenbox.sock or
    /tmp/tenbox-<uid>.sock).
    """
    env = dict(os.environ) if env is None else env
    uid = os.getuid() if uid is None else uid
    system = uid == 0 and under_systemd(env)
    if not data_dir:
        data_dir = env.get("TENBOX_DATA_DIR")
    if not data_dir:
        if uid == 0:
            data_dir = DEFAULT_DATA_DIR
        else:
            base = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME") or "/tmp", ".local", "share")
            data_dir = os.path.join(base, "tenbox")
    if not socket_path:
        socket_path = env.get("TENBOX_SOCK")
    if not socket_path:
        if system:
            socket_path = DEFAULT_SYSTEM_SOCKET
        elif env.get("XDG_RUNTIME_DIR"):
            socket_path = os.path.join(env["XDG_RUNTIME_DIR"], "tenbox.sock")
        else:
            socket_path = FALLBACK_SOCKET % uid
    if not run_dir:
        run_dir = SYSTEM_RUN_DIR if system else _user_runtime_dir(env, uid)
    if cloud_url is None:
        cloud_url = env.get("TENBOX_CLOUD_URL", "")
    return Config(
        data_dir=os.path.abspath(data_dir),
        socket_path=os.path.abspath(socket_path),
        run_dir=os.path.abspath(run_dir),
        socket_group=env.get(SOCKET_GROUP_ENV) or None,
        cloud_url=cloud_url,
        client_idle_sec=_seconds(env, CLIENT_IDLE_ENV, CLIENT_IDLE_SEC, CLIENT_IDLE_RANGE_SEC),
        metrics_listen=parse_metrics_listen(env.get(METRICS_LISTEN_ENV, "")),
        standby_workers=_count(env, STANDBY_ENV, STANDBY_DEFAULT, STANDBY_RANGE),
    )


def parse_metrics_listen(raw: str) -> Optional[Tuple[str, ...]]:
    """TENBOX_METRICS_LISTEN: None (off), ("unix", path) or ("tcp", loopback host, port); ConfigError otherwise."""
    raw = raw.strip()
    if raw in ("", "off", "no"):
        return None
    why = "give unix:/absolute/path or a loopback address and port (127.0.0.1:9464, [::1]:9464, localhost:9464)"
    if raw.startswith("unix:"):
        path = raw[len("unix:"):]
        if not path.startswith("/") or "\0" in path or len(path.encode()) > UNIX_PATH_MAX_BYTES:
            raise ConfigError("%s=%r: %s" % (METRICS_LISTEN_ENV, raw, why))
        return ("unix", os.path.normpath(path))
    host, sep, port = raw.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        loopback, number = False, 0
    if not sep or not loopback or not 1 <= number <= 65535:
        raise ConfigError("%s=%r: %s" % (METRICS_LISTEN_ENV, raw, why))
    return ("tcp", "127.0.0.1" if host == "localhost" else host, str(number))


def _count(env: dict, key: str, default: int, bounds) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not bounds[0] <= int(raw) <= bounds[1]:
        raise ConfigError("%s=%r: give a whole number in %d..%d" % (key, raw, bounds[0], bounds[1]))
    return int(raw)


def _seconds(env: dict, key: str, default: float, bounds) -> float:
    raw = env.get(key)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not bounds[0] <= value <= bounds[1]:
        raise ConfigError("%s=%r: give seconds in %g..%g" % (key, raw, bounds[0], bounds[1]))
    return value
