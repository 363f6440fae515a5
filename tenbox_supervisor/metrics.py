"""The Prometheus endpoint: vm.stats as text exposition format 0.0.4 over HTTP, on a unix socket or loopback port (daemon, root).

Off unless TENBOX_METRICS_LISTEN names where to listen (config.py;
/etc/default/tenbox). Every VM appears with `tenbox_vm_running`; the
counters of a running VM's worker and its CPU time come from the same
collector as vm.stats. The server answers `GET /metrics` and nothing else,
one request per connection, within the bounds below.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Tuple

log = logging.getLogger("tenboxd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_HEAD_MAX_BYTES = 8192  # request line and headers: a scraper sends a few hundred
REQUEST_HEAD_TIMEOUT_SEC = 5.0  # to send them; then the connection is closed
RESPONSE_WRITE_TIMEOUT_SEC = 10.0  # to take the response
CONNECTIONS_MAX = 8  # at once; more are answered 503 and closed (Prometheus scrapes one at a time)

Collect = Callable[[], Awaitable[List[Dict[str, Any]]]]

# (metric, type, help, where in a vm.stats entry)
_VM_METRICS: Tuple[Tuple[str, str, str, Tuple[str, ...]], ...] = (
    ("tenbox_vm_cpu_seconds_total", "counter", "CPU time of the VM's worker process (user and system)",
     ("cpu_seconds",)),
    ("tenbox_vm_uptime_seconds", "gauge", "Seconds since the VM's machine started", ("uptime_sec",)),
    ("tenbox_vm_memory_rss_bytes", "gauge", "Resident memory of the VM's worker, guest RAM included",
     ("memory", "rss_bytes")),
    ("tenbox_vm_memory_rss_outside_guest_bytes", "gauge", "Resident memory of the VM's worker outside guest RAM",
     ("memory", "rss_outside_guest_bytes")),
    ("tenbox_vm_guest_ram_bytes", "gauge", "The VM's guest RAM size", ("memory", "guest_ram_bytes")),
    ("tenbox_vm_guest_ram_touched_bytes", "gauge", "Guest RAM with host pages behind it",
     ("memory", "guest_ram_touched_bytes")),
)
_DISK_METRICS = (
    ("tenbox_vm_disk_read_bytes_total", "counter", "Bytes the guest read from the disk", "read_bytes"),
    ("tenbox_vm_disk_reads_total", "counter", "Read requests completed", "read_ops"),
    ("tenbox_vm_disk_written_bytes_total", "counter", "Bytes the guest wrote to the disk", "write_bytes"),
    ("tenbox_vm_disk_writes_total", "counter", "Write requests completed", "write_ops"),
    ("tenbox_vm_disk_flushes_total", "counter", "Flush requests completed", "flush_ops"),
    ("tenbox_vm_disk_errors_total", "counter", "Requests that failed with an I/O error", "errors"),
    ("tenbox_vm_disk_capacity_bytes", "gauge", "The disk's size as the guest sees it", "capacity_bytes"),
)
_NET_METRICS = (
    ("tenbox_vm_net_receive_bytes_total", "counter", "Frame bytes delivered to the guest", "rx_bytes"),
    ("tenbox_vm_net_receive_packets_total", "counter", "Frames delivered to the guest", "rx_packets"),
    ("tenbox_vm_net_receive_dropped_total", "counter", "Frames for the guest that were dropped", "rx_dropped"),
    ("tenbox_vm_net_transmit_bytes_total", "counter", "Frame bytes the guest sent", "tx_bytes"),
    ("tenbox_vm_net_transmit_packets_total", "counter", "Frames the guest sent", "tx_packets"),
    ("tenbox_vm_net_transmit_dropped_total", "counter", "Frames from the guest that were dropped", "tx_dropped"),
)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[Tuple[str, Any]]) -> str:
    return "{" + ",".join('%s="%s"' % (k, _label(v)) for k, v in pairs) + "}"


def _number(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return repr(float(value)) if isinstance(value, float) else str(value)


def _dig(entry: Dict[str, Any], path: Tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def render(entries: List[Dict[str, Any]]) -> str:
    """vm.stats entries (of every VM) as Prometheus text; a value that is null is left out."""
    out: List[str] = []

    def family(name: str, kind: str, help_: str, samples: List[Tuple[str, Optional[str]]]) -> None:
        out.append("# HELP %s %s" % (name, help_))
        out.append("# TYPE %s %s" % (name, kind))
        out.extend("%s%s %s" % (name, labels, value) for labels, value in samples if value is not None)

    vm_labels = [(e, [("vm_id", e["id"]), ("name", e["name"])]) for e in entries]
    family("tenbox_vm_running", "gauge", "1 if the VM's worker runs a guest (starting, running, rebooting, stopping)",
           [(_labels(lab), "1" if e.get("pid") is not None else "0") for e, lab in vm_labels])
    for name, kind, help_, path in _VM_METRICS:
        family(name, kind, help_, [(_labels(lab), _number(_dig(e, path))) for e, lab in vm_labels])
    for name, kind, help_, key in _DISK_METRICS:
        family(name, kind, help_, [(_labels(lab + [("disk", d.get("index")), ("path", d.get("path"))]),
                                    _number(d.get(key)))
                                   for e, lab in vm_labels for d in (e.get("disks") or []) if e.get("pid") is not None])
    for name, kind, help_, key in _NET_METRICS:
        family(name, kind, help_, [(_labels(lab), _number((e.get("net") or {}).get(key))) for e, lab in vm_labels])
    return "\n".join(out) + "\n"


class MetricsServer:
    """HTTP/1.0-style: one GET /metrics per connection, answered and closed."""

    def __init__(self, listen: Tuple[str, ...], collect: Collect, socket_gid: Optional[int] = None) -> None:
        """`listen`: ("unix", path) or ("tcp", host, port) from config.parse_metrics_listen."""
        self.listen = listen
        self.collect = collect
        self.socket_gid = socket_gid
        self._server: Optional[asyncio.AbstractServer] = None
        self._active = 0

    async def start(self) -> None:
        if self.listen[0] == "unix":
            path = self.listen[1]
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # left by a tenboxd that died; the data directory lock says we are the only one
            except FileNotFoundError:
                pass  # anything else in the way (a file, a link) fails the bind below: never removed
            self._server = await asyncio.start_unix_server(self._serve, path, limit=REQUEST_HEAD_MAX_BYTES)
            if self.socket_gid is not None:
                os.chown(path, -1, self.socket_gid)
                os.chmod(path, 0o660)
            else:
                os.chmod(path, 0o600)
            log.info("metrics on unix:%s", path)
        else:
            self._server = await asyncio.start_server(self._serve, self.listen[1], int(self.listen[2]),
                                                      limit=REQUEST_HEAD_MAX_BYTES)
            log.info("metrics on %s:%s", self.listen[1], self.listen[2])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            if self.listen[0] == "unix":
                try:
                    os.unlink(self.listen[1])
                except OSError:
                    pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            if self._active > CONNECTIONS_MAX:
                await self._reply(writer, 503, "too many connections\n")
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_HEAD_TIMEOUT_SEC)
            except asyncio.LimitOverrunError:
                await self._reply(writer, 431, "request head over %d bytes\n" % REQUEST_HEAD_MAX_BYTES)
                return
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            if len(head) > REQUEST_HEAD_MAX_BYTES:
                await self._reply(writer, 431, "request head over %d bytes\n" % REQUEST_HEAD_MAX_BYTES)
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                await self._reply(writer, 400, "bad request line\n")
            elif parts[0] != b"GET":
                await self._reply(writer, 405, "only GET\n")
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                await self._reply(writer, 404, "only /metrics\n")
            else:
                await self._reply(writer, 200, render(await self.collect()), CONTENT_TYPE)
        except Exception:  # a scrape must never take the daemon down; the next one tries again
            log.exception("metrics request failed")
        finally:
            self._active -= 1
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: str,
                     content_type: str = "text/plain; charset=utf-8") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
        data = body.encode()
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (status, reason.encode(), content_type.encode(), len(data)) + data)
        try:
            await asyncio.wait_for(writer.drain(), RESPONSE_WRITE_TIMEOUT_SEC)
        except (asyncio.TimeoutError, ConnectionError):
            pass
