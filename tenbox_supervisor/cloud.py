"""The outbound cloud link: pairing, reconnects, telemetry, cloud requests (daemon, root).

One WebSocket over TLS to TENBOX_CLOUD_URL (system CA bundle, hostname
checked; TENBOX_CLOUD_CA_FILE adds a CA for private clouds and tests). JSON
envelopes `{id, type, host_id, vm_id?, payload}`; the cloud's requests go
through the same method table as the local socket and are answered with
`<type>.response` and `{ok, payload}` or `{ok: false, error_code, error}`.
Reconnects forever with jittered exponential backoff capped at 60 s, reset
after a session that stayed up; an empty URL disables all cloud traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import secrets
import socket
import ssl
import time
import uuid
from typing import Any, Dict, List, Optional, Protocol
from urllib.parse import urlsplit

import tenacity
import websockets

from tenbox_supervisor import doctor, telemetry
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.fsutil import atomic_write
from tenbox_supervisor.managed_vm import ManagedVm, StateListener
from tenbox_supervisor.protocol import (
    CLOUD_LOCAL_REQUESTS,
    CLOUD_METHODS,
    VERSION,
    CloudMsg,
    ErrorCode,
    cloud_response,
)
from tenbox_supervisor.restart_policy import backoff_sec
from tenbox_vmm.protocol import VmState

log = logging.getLogger("tenboxd.cloud")

TICK_INTERVAL_SEC = 30.0
BACKOFF_MAX_SEC = 60.0
SESSION_RESET_SEC = 30.0  # a session up this long resets the backoff
PING_INTERVAL_SEC = 20.0
PING_TIMEOUT_SEC = 20.0
CONNECT_TIMEOUT_SEC = 20.0
MESSAGE_MAX_BYTES = 16 << 20  # larger messages close the link with an error, never vanish silently
PAIR_CODE_DIGITS = 8
TOKEN_FILE = "device.token"
HOST_ID_FILE = "device.id"
TOKEN_MAX_BYTES = 4096


def reconnect_wait(retry_state: tenacity.RetryCallState) -> float:
    """The wait before reconnect attempt n+1: random in [b/2, b], b = 2**(n-1) s, b at most 60 s.

    "Equal jitter": hosts that lost the cloud together still spread out, and
    every wait is at least half its bound, so the waits grow for certain. Full
    jitter (random in [0, b]) can draw a near-zero wait at any attempt, which
    looks like a busy loop to the cloud and to an operator reading the log.
    """
    bound = backoff_sec(retry_state.attempt_number, BACKOFF_MAX_SEC)
    return secrets.SystemRandom().uniform(bound / 2, bound)


class Methods(Protocol):
    """The method table (api.Api), which cloud requests go through like local ones."""

    def lookup(self, type_: Any) -> MethodSpec:
        ...

    async def call(self, type_: Any, params: Dict[str, Any], caller: Caller, stream=None) -> Dict[str, Any]:
        ...


class CloudVms(Protocol):
    """What the telemetry and the state events read of the VMs."""

    def all(self) -> List[ManagedVm]:
        ...

    def broken(self) -> Dict[str, str]:
        ...

    def vm_dir(self, vm_id: str) -> str:
        ...

    def add_listener(self, listener: StateListener) -> None:
        ...


class PendingReports(Protocol):
    def pending_reports(self) -> List[Dict[str, Any]]:
        """Answers a previous tenboxd owed the cloud (the updater's), handed out once."""


class SessionEnded(Exception):
    """The connection ended; `up_for` says how long it had been up."""

    def __init__(self, up_for: float, reason: str) -> None:
        super().__init__(reason)
        self.up_for = up_for


def pair_url(cloud_url: str, code: str) -> str:
    base = os.environ.get("TENBOX_PAIR_URL_BASE")
    if base:
        return "%s?code=%s" % (base.rstrip("?"), code)
    parts = urlsplit(cloud_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return "%s://%s/pair?code=%s" % (scheme, parts.netloc, code)


# The kernel's machine names as Debian (and TenBox's cloud) name architectures.
DEBIAN_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "armv6l": "armhf", "i686": "i386"}


def debian_arch() -> str:
    machine = platform.machine()
    return DEBIAN_ARCHES.get(machine, machine)


def os_release() -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        with open("/etc/os-release") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key in ("ID", "VERSION_ID", "VERSION_CODENAME", "PRETTY_NAME"):
                    out[key.lower()] = value.strip('"')
    except OSError:
        pass
    return out


class CloudLink:
    def __init__(self, url: str, data_dir: str, socket_path: str, started_at: float, methods: Methods,
                 vms: CloudVms, reports: PendingReports) -> None:
        self.url = url
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.started_at = started_at
        self.methods = methods
        self.vms = vms
        self.reports = reports
        self.host_id = self._load_host_id()
        self.pair_code: Optional[str] = None
        self.connected = False
        self._ws = None
        self._send_lock = asyncio.Lock()
        self._task: Optional[asyncio.Task] = None
        self._handlers: set = set()
        self.sessions = 0

    # Identity and pairing state --------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def _load_host_id(self) -> str:
        try:
            with open(self._path(HOST_ID_FILE)) as f:
                value = f.read().strip()
            uuid.UUID(value)
            return value
        except (OSError, ValueError):
            value = str(uuid.uuid4())
            atomic_write(self._path(HOST_ID_FILE), (value + "\n").encode(), 0o644)
            return value

    def token(self) -> Optional[str]:
        try:
            with open(self._path(TOKEN_FILE), "rb") as f:
                value = f.read(TOKEN_MAX_BYTES).decode("utf-8", "replace").strip()
            return value or None
        except OSError:
            return None

    def _save_token(self, token: str) -> None:
        atomic_write(self._path(TOKEN_FILE), token.encode(), 0o600)

    def _forget_token(self) -> None:
        try:
            os.unlink(self._path(TOKEN_FILE))
        except FileNotFoundError:
            pass

    def _new_pair_code(self) -> str:
        return "%0*d" % (PAIR_CODE_DIGITS, secrets.randbelow(10 ** PAIR_CODE_DIGITS))

    # Telemetry -----------------------------------------------------------------------------

    def host_payload(self) -> Dict[str, Any]:
        vms = self.vms.all()
        rss = 0
        for vm in vms:
            if vm.pid is not None:
                res = telemetry.process_resources(vm.pid)
                rss += res["rss_bytes"] if res else 0
        return {
            "resources": telemetry.host_resources(self.data_dir),
            "doctor": doctor.run_checks(),
            "hostname": socket.gethostname(),
            "data_dir": self.data_dir,
            "socket_path": self.socket_path,
            "daemon_version": VERSION,
            "daemon_uptime_seconds": time.time() - self.started_at,
            "cloud_connected": self.connected,
            "tenbox_vm_memory_bytes": rss,
            "os_release": os_release(),
            "arch": debian_arch(),
            "vm_summary": telemetry.vm_summary(vms, len(self.vms.broken())),
        }

    def vm_payload(self) -> Dict[str, Any]:
        out = []
        now = time.time()
        for vm in self.vms.all():
            entry = {"vm_id": vm.id, "name": vm.spec.name, "state": vm.state.value,
                     "pid": vm.pid, "uptime_sec": vm.uptime(now),
                     "resources": {"disk_usage_bytes": telemetry.dir_usage(self.vms.vm_dir(vm.id))}}
            if vm.pid is not None:
                entry["resources"].update(telemetry.process_resources(vm.pid) or {})
            out.append(entry)
        return {"vms": out, "updated_at": time.time()}

    # Sending ----------------------------------------------------------------------------------

    async def send(self, type_: str, payload: Dict[str, Any], msg_id: Any = None, vm_id: Optional[str] = None) -> bool:
        ws = self._ws
        if ws is None:
            return False
        env: Dict[str, Any] = {"type": type_, "host_id": self.host_id, "payload": payload}
        if msg_id is not None:
            env["id"] = msg_id
        if vm_id is not None:
            env["vm_id"] = vm_id
        try:
            async with self._send_lock:
                await ws.send(json.dumps(env, default=str))
            return True
        except Exception as e:  # the connection is gone; the session loop reconnects
            log.debug("cloud send of %s failed: %s", type_, e)
            return False

    def on_state_change(self, vm: ManagedVm, old: VmState, new: VmState, reason: str) -> None:
        if self.connected:
            asyncio.ensure_future(self.send(CloudMsg.VM_STATE_CHANGED.value, {"vm_id": vm.id, "name": vm.spec.name,
                                                                 "state": new.value, "previous": old.value,
                                                                 "reason": reason,
                                                                 "last_failure": vm.last_failure}, vm_id=vm.id))

    # Session -------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.url:
            log.info("cloud link disabled (no TENBOX_CLOUD_URL)")
            return
        if urlsplit(self.url).scheme != "wss":
            log.error("cloud URL %s is not wss://; the cloud link stays off", self.url)
            return
        self.vms.add_listener(self.on_state_change)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for t in list(self._handlers):
            t.cancel()

    async def _run(self) -> None:
        @tenacity.retry(
            wait=reconnect_wait,
            stop=tenacity.stop_never,
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=lambda rs: log.info("cloud link down (%s); retrying", rs.outcome.exception()),
            reraise=True,
        )
        async def sessions_until_a_long_one() -> None:
            try:
                await self._session()
            except SessionEnded as e:
                if e.up_for < SESSION_RESET_SEC:
                    raise
                log.info("cloud link closed after %.0fs (%s); reconnecting", e.up_for, e)

        while True:
            await sessions_until_a_long_one()  # returns after a long session: the backoff starts over
            await asyncio.sleep(secrets.SystemRandom().uniform(0.5, 1.5))

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        extra = os.environ.get("TENBOX_CLOUD_CA_FILE")
        if extra:
            ctx.load_verify_locations(cafile=extra)
        return ctx

    async def _session(self) -> None:
        token = self.token()
        if token is None and self.pair_code is None:
            self.pair_code = self._new_pair_code()
        url = self.url + ("&" if "?" in self.url else "?") + "host_id=" + self.host_id
        ws = await asyncio.wait_for(
            websockets.connect(url, ssl=self._ssl_context(), max_size=MESSAGE_MAX_BYTES,
                               ping_interval=PING_INTERVAL_SEC, ping_timeout=PING_TIMEOUT_SEC),
            CONNECT_TIMEOUT_SEC)
        started = time.monotonic()
        self.sessions += 1
        self._ws = ws
        self.connected = True
        ticker = None
        reason = "closed"
        try:
            hello = self.host_payload()
            if token:
                hello["device_token"] = token
            else:
                hello["pair_code"] = self.pair_code
                log.info("Visit %s to bind this host", pair_url(self.url, self.pair_code))
                log.info("pairing code: %s-%s", self.pair_code[:4], self.pair_code[4:])
            await self.send(CloudMsg.DEVICE_HELLO.value, hello)
            log.info("cloud link up (%s, host %s)", urlsplit(self.url).netloc, self.host_id)
            for report in self.reports.pending_reports():
                await self.send(report["type"], report["payload"], msg_id=report.get("id"))
            ticker = asyncio.ensure_future(self._ticks())
            async for raw in ws:
                if not await self._on_message(raw):
                    reason = "the cloud asked us to reconnect"
                    break
        except Exception as e:
            reason = "%s: %s" % (type(e).__name__, e)
        finally:
            self.connected = False
            self._ws = None
            if ticker is not None:
                ticker.cancel()
            try:
                await ws.close()
            except Exception:
                pass
        raise SessionEnded(time.monotonic() - started, reason)

    async def _ticks(self) -> None:
        while True:
            await self.send(CloudMsg.HOST_RESOURCES_TICK.value, dict(self.host_payload(), updated_at=time.time()))
            if self.vms.all():
                await self.send(CloudMsg.VM_RESOURCES_TICK.value, self.vm_payload())
            await asyncio.sleep(TICK_INTERVAL_SEC)

    async def _on_message(self, raw) -> bool:
        """Handle one envelope; False when the session must end (pairing changes)."""
        try:
            env = json.loads(raw)
        except (ValueError, TypeError):
            log.warning("cloud sent something that is not JSON; ignored")
            return True
        if not isinstance(env, dict) or not isinstance(env.get("type"), str):
            log.warning("cloud sent an envelope without a type; ignored")
            return True
        type_ = env["type"]
        payload = env.get("payload") if isinstance(env.get("payload"), dict) else {}
        if type_ == CloudMsg.DEVICE_PAIRED.value:
            token = payload.get("device_token")
            if isinstance(token, str) and token and len(token) <= TOKEN_MAX_BYTES:
                self._save_token(token)
                self.pair_code = None
                log.info("cloud pairing complete for host %s", self.host_id)
            return True
        if type_ == CloudMsg.DEVICE_UNAUTHORIZED.value:
            log.warning("cloud rejected this host's token (%s); pairing again", payload.get("error", ""))
            self._forget_token()
            self.pair_code = None
            return False
        if type_ == CloudMsg.DEVICE_PAIR_INVALID.value:
            log.warning("cloud says the pairing code is invalid; a new one comes with the next connection")
            self.pair_code = None
            return False
        if "id" in env:
            task = asyncio.ensure_future(self._request(env, type_, payload))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        return True

    async def _request(self, env: Dict[str, Any], type_: str, payload: Dict[str, Any]) -> None:
        msg_id = env.get("id")
        vm_id = env.get("vm_id") if isinstance(env.get("vm_id"), str) else None
        params = dict(payload)
        if vm_id is not None:
            params.setdefault("vm_id", vm_id)
        if "lines" in env:
            params.setdefault("lines", env["lines"])
        stream = None
        try:
            if type_ in CLOUD_LOCAL_REQUESTS:
                result = self.host_payload()
            elif type_ in CLOUD_METHODS:
                method = CLOUD_METHODS[type_].value
                if self.methods.lookup(method).stream:
                    stream = CloudReply(self, type_, msg_id, vm_id)
                result = await self.methods.call(method, params, Caller(0, 0, 0, transport="cloud"), stream)
            else:
                raise ApiError(ErrorCode.UNKNOWN_REQUEST, "unknown request type %r" % type_)
            body: Dict[str, Any] = {"ok": True, "payload": result}
        except ApiError as e:
            body = {"ok": False, "error_code": e.code.value, "error": e.message}
            body.update(e.extra)
        except Exception as e:
            log.exception("cloud request %s failed", type_)
            body = {"ok": False, "error_code": ErrorCode.INTERNAL_ERROR.value, "error": "internal error: %s" % e}
        if stream is not None and stream.replied:
            return  # the method answered already (host.update: before the package restarts us)
        await self.send(cloud_response(type_), body, msg_id=msg_id, vm_id=vm_id)


class CloudReply:
    """A method's early answer to a cloud request (see Stream.reply for the local socket)."""

    def __init__(self, link: CloudLink, type_: str, msg_id: Any, vm_id: Optional[str]) -> None:
        self.link = link
        self.type = type_
        self.request_id = msg_id
        self.vm_id = vm_id
        self.replied = False

    async def reply(self, payload: Dict[str, Any]) -> bool:
        self.replied = True
        return await self.link.send(cloud_response(self.type), {"ok": True, "payload": payload},
                                    msg_id=self.request_id, vm_id=self.vm_id)
