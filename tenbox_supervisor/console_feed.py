"""One VM's console as tenboxd keeps it: a bounded ring, and the queues of attached consoles and log followers (daemon, root).

A subscriber that stops reading is cut off (its queue ends with None), never
waited for: a slow client must not hold up the worker link.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator, List, Set

CONSOLE_RING_BYTES = 256 << 10
SUBSCRIBER_QUEUE_MAX = 1024
TAIL_SCAN_BYTES = 16384  # how far back console_tail looks for lines


class ConsoleFeed:
    def __init__(self) -> None:
        self._ring = bytearray()
        self._partial_line = b""
        self._console_subs: Set[asyncio.Queue] = set()
        self._log_subs: Set[asyncio.Queue] = set()

    def ring(self) -> bytes:
        """The recent console output, at most CONSOLE_RING_BYTES."""
        return bytes(self._ring)

    def reset(self, data: bytes = b"") -> None:
        self._ring = bytearray(data[-CONSOLE_RING_BYTES:])

    def tail(self, lines: int) -> List[str]:
        """The last non-empty lines of the ring."""
        text = bytes(self._ring[-TAIL_SCAN_BYTES:]).decode("utf-8", "replace").replace("\r", "")
        return [l for l in text.split("\n") if l.strip()][-lines:]

    def add(self, data: bytes) -> None:
        """Output from the worker: into the ring, to every console as bytes and every log follower as lines."""
        self._ring += data
        if len(self._ring) > CONSOLE_RING_BYTES:
            del self._ring[: len(self._ring) - CONSOLE_RING_BYTES]
        for q in list(self._console_subs):
            _offer(q, data)
        if self._log_subs:
            buf = self._partial_line + data
            *lines, self._partial_line = buf.split(b"\n")
            if lines:
                text = [l.decode("utf-8", "replace").rstrip("\r") for l in lines]
                for q in list(self._log_subs):
                    _offer(q, text)
        elif len(self._partial_line) > 0:
            self._partial_line = b""

    @contextlib.contextmanager
    def subscribe_console(self) -> Iterator[asyncio.Queue]:
        """A queue of console bytes until None (the VM stopped, or the reader was too slow)."""
        with self._subscribe(self._console_subs) as q:
            yield q

    @contextlib.contextmanager
    def subscribe_logs(self) -> Iterator[asyncio.Queue]:
        """A queue of lists of whole console lines until None."""
        with self._subscribe(self._log_subs) as q:
            yield q

    @contextlib.contextmanager
    def _subscribe(self, subs: Set[asyncio.Queue]) -> Iterator[asyncio.Queue]:
        q: asyncio.Queue = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE_MAX)
        subs.add(q)
        try:
            yield q
        finally:
            subs.discard(q)

    def close(self) -> None:
        """End every subscription (the VM stopped or was deleted)."""
        for q in list(self._console_subs) + list(self._log_subs):
            _offer(q, None, force=True)
        self._console_subs.clear()
        self._log_subs.clear()


def _offer(q: asyncio.Queue, item, force: bool = False) -> None:
    """Give a subscriber an item; a subscriber that stopped reading is cut off, not waited for."""
    try:
        q.put_nowait(item)
    except asyncio.QueueFull:
        if force:
            try:
                q.get_nowait()
                q.put_nowait(item)
            except (asyncio.QueueEmpty, asyncio.QueueFull):
                pass
        else:
            # Mark the subscriber as too slow: drain and leave only the end marker.
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)
