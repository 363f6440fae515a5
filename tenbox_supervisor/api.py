"""One table of control methods, shared by the local socket and the cloud link (daemon, root).

Each method is registered once, by the group that handles it (vm_api,
image_api, system_api, updater), with whether it changes anything (mutating
calls are logged with the caller's credentials), needs root, or streams.
Nothing is ever dispatched by name lookup on an object: unknown types are
refused before any handler runs. A WorkerManager's OperationError becomes
the reply with its code and message here, once for every handler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, Iterable, Tuple

from tenbox_supervisor.errors import ApiError, OperationError
from tenbox_supervisor.protocol import NAME_RE, ErrorCode, Method

log = logging.getLogger("tenboxd.api")


@dataclass(frozen=True)
class Caller:
    """Who is asking: peer credentials on the local socket, or the cloud.

    `groups` are the peer's supplementary groups when it connected
    (SO_PEERGROUPS); files it names are opened with uid, gid and these
    (caller_files.py).
    """

    uid: int
    gid: int
    pid: int
    transport: str = "local"
    groups: Tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.transport != "local":
            return self.transport
        return "uid=%d gid=%d pid=%d" % (self.uid, self.gid, self.pid)


Handler = Callable[..., Awaitable[Dict[str, Any]]]


@dataclass(frozen=True)
class MethodSpec:
    name: Method
    handler: Handler
    mutating: bool
    root_only: bool = False
    stream: bool = False


def loggable_key(params: Dict[str, Any]) -> str:
    """The request's vm_id or name for the log, before the handler has checked it.

    Only a value that is a valid id or name is written as it is: anything
    else (newlines, escape sequences) could forge log lines.
    """
    key = params.get("vm_id") or params.get("name") or ""
    if not key:
        return ""
    return key if isinstance(key, str) and NAME_RE.match(key) else "(invalid id or name)"


class Api:
    """The method table."""

    def __init__(self) -> None:
        self.methods: Dict[str, MethodSpec] = {}

    def register(self, specs: Iterable[MethodSpec]) -> None:
        for spec in specs:
            if spec.name.value in self.methods:
                raise ValueError("method %s registered twice" % spec.name.value)
            self.methods[spec.name.value] = spec

    def lookup(self, type_: Any) -> MethodSpec:
        if not isinstance(type_, str) or type_ not in self.methods:
            raise ApiError(ErrorCode.UNKNOWN_REQUEST, "unknown request type %r" % (type_,) if isinstance(type_, str)
                           else "the request has no type")
        return self.methods[type_]

    async def call(self, type_: Any, params: Dict[str, Any], caller: Caller, stream=None) -> Dict[str, Any]:
        """Validate and run one method; ApiError for anything the caller did wrong."""
        spec = self.lookup(type_)
        if spec.root_only and caller.transport == "local" and caller.uid != 0:
            raise ApiError(ErrorCode.PERMISSION_DENIED, "%s is for root only" % spec.name.value)
        if spec.mutating:
            log.info("request %s %s from %s", spec.name.value, loggable_key(params), caller)
        try:
            if spec.stream:
                return await spec.handler(params, caller, stream)
            return await spec.handler(params, caller)
        except OperationError as e:
            raise ApiError(e.code, e.message) from None
