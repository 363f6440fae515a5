"""A test cloud: a real WebSocket server over TLS on 127.0.0.1 speaking tenbox's cloud protocol (tests only).

It runs its own event loop on a thread, records every envelope and every
connection attempt, and lets a test send envelopes, drop the connection or
refuse connections for a while.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import ssl
import threading
import time
from typing import Any, Dict, List, Optional

import trustme
import websockets


class LoopbackCloud:
    def __init__(self, tmp_path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = tmp_path / "cloud-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ssl)
        self.received: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.log: List[Dict[str, Any]] = []
        self.attempts: List[float] = []
        self.connections = 0
        self.refuse = False
        self._ws = None
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test cloud did not start")

    @property
    def url(self) -> str:
        return "wss://localhost:%d/api/device-tunnel" % self.port

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start():
            self._server = await websockets.serve(self._handler, "127.0.0.1", 0, ssl=self.ssl,
                                                  process_request=self._process_request, max_size=None)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _process_request(self, path, headers=None):
        self.attempts.append(time.monotonic())
        if self.refuse:
            return (503, [], b"down for a test\n")
        return None

    async def _handler(self, ws, path=None):
        self.connections += 1
        self._ws = ws
        try:
            async for raw in ws:
                env = json.loads(raw)
                env["_received_at"] = time.monotonic()
                self.log.append(env)
                self.received.put(env)
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None

    def _call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, env: Dict[str, Any]) -> None:
        async def go():
            await self._ws.send(json.dumps(env))
        self._call(go())

    def request(self, type_: str, payload: Optional[dict] = None, timeout: float = 60, **top) -> Dict[str, Any]:
        """Send a request envelope and wait for its response."""
        msg_id = "req-%d" % next(self._ids)
        env = {"id": msg_id, "type": type_, "payload": payload or {}}
        env.update(top)
        self.send(env)
        return self.wait(lambda e: e.get("id") == msg_id and e["type"] == type_ + ".response", timeout)

    def drop(self) -> None:
        async def go():
            if self._ws is not None:
                await self._ws.close()
        self._call(go())

    def wait(self, predicate, timeout: float = 30) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        for env in list(self.log):
            if predicate(env) and not env.get("_seen"):
                env["_seen"] = True
                return env
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the cloud did not receive the expected message; got %s"
                                     % [e["type"] for e in self.log[-20:]])
            try:
                env = self.received.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(env) and not env.get("_seen"):
                env["_seen"] = True
                return env

    def wait_type(self, type_: str, timeout: float = 30) -> Dict[str, Any]:
        return self.wait(lambda e: e["type"] == type_, timeout)

    def connected(self) -> bool:
        return self._ws is not None

    def close(self) -> None:
        async def go():
            self._server.close()
            await self._server.wait_closed()
        try:
            self._call(go())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
