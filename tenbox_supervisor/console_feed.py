"""One VM's console as tenboxd keeps it: a bounded ring, and the queues of attached consoles and log followers (daemon, root).

A subscriber that stops reading is cut off (its queue ends with None), never
waited for: a slow client must not hold up the worker link.

The guest decides what it prints, so every buffer here is bounded by bytes,
whatever the guest does: the ring, the line a log follower is waiting to
see end (a guest that never prints a newline gets its output to followers
in pieces of LOG_LINE_MAX_BYTES, as journald cuts at its LineMax), and what
each subscriber has queued (SUBSCRIBER_QUEUE_BYTES, lines counted with what
they cost in memory, so a flood of empty lines is bounded too). The work
per chunk is linear in the chunk: nothing already buffered is copied again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator, List, Set

CONSOLE_RING_BYTES = 256 << 10
SUBSCRIBER_QUEUE_MAX = 1024  # items waiting for one subscriber
SUBSCRIBER_QUEUE_BYTES = 4 << 20  # bytes waiting for one subscriber before it is cut off as too slow
LOG_LINE_MAX_BYTES = 16 << 10  # a longer line reaches log followers in pieces this long
LINE_COST_BYTES = 64  # memory of one queued line beyond its text (str header, list slot)
TAIL_SCAN_BYTES = 16384  # how far back console_tail looks for lines


class Subscriber(asyncio.Queue):
    """A subscriber's queue that also counts the bytes waiting in it; items go in as (cost, item) through offer().

    Also the event log's followers' queue (events.py): one bound rule for every stream tenboxd feeds.
    """

    def __init__(self) -> None:
        super().__init__(maxsize=SUBSCRIBER_QUEUE_MAX)
        self.waiting_bytes = 0
        self.cut_off = False

    # asyncio.Queue's own hooks (the ones PriorityQueue and LifoQueue override).
    def _put(self, item) -> None:
        self.waiting_bytes += item[0]
        super()._put(item)

    def _get(self):
        cost, value = super()._get()
        self.waiting_bytes -= cost
        return value


def _cost(lines: List[str]) -> int:
    return sum(map(len, lines)) + LINE_COST_BYTES * len(lines)


class ConsoleFeed:
    def __init__(self) -> None:
        self._ring = bytearray()
        self._partial_line = bytearray()  # the end of the output after its last newline, for log followers
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
            offer(q, data, len(data))
        if self._log_subs:
            lines = self._complete_lines(data)
            if lines:
                text = [l.decode("utf-8", "replace").rstrip("\r") for l in lines]
                cost = _cost(text)
                for q in list(self._log_subs):
                    offer(q, text, cost)
        elif self._partial_line:
            self._partial_line = bytearray()

    @property
    def partial_line_bytes(self) -> int:
        """Bytes of an unfinished line held for log followers (at most LOG_LINE_MAX_BYTES - 1)."""
        return len(self._partial_line)

    def _complete_lines(self, data: bytes) -> List[bytes]:
        """The lines `data` completes, the held partial line first; pieces of LOG_LINE_MAX_BYTES of longer ones."""
        partial = self._partial_line
        end = data.rfind(b"\n")
        if end < 0:
            partial += data
            lines: List[bytes] = []
        else:
            head = bytes(partial) + data[:end] if partial else data[:end]
            lines = head.split(b"\n")
            partial.clear()
            partial += memoryview(data)[end + 1:]
            if len(head) > LOG_LINE_MAX_BYTES and max(map(len, lines)) > LOG_LINE_MAX_BYTES:
                lines = [piece for line in lines for piece in _pieces(line)]
        if len(partial) >= LOG_LINE_MAX_BYTES:
            whole = len(partial) - len(partial) % LOG_LINE_MAX_BYTES
            lines += _pieces(bytes(partial[:whole]))
            del partial[:whole]
        return lines

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
        q = Subscriber()
        subs.add(q)
        try:
            yield q
        finally:
            subs.discard(q)

    def close(self) -> None:
        """End every subscription (the VM stopped or was deleted)."""
        for q in list(self._console_subs) + list(self._log_subs):
            offer(q, None, 0, force=True)
        self._console_subs.clear()
        self._log_subs.clear()


def _pieces(line: bytes) -> List[bytes]:
    return [line[i : i + LOG_LINE_MAX_BYTES] for i in range(0, max(len(line), 1), LOG_LINE_MAX_BYTES)]


def offer(q: Subscriber, item, cost: int, force: bool = False) -> None:
    """Give a subscriber an item; a subscriber that stopped reading is cut off, not waited for."""
    if q.cut_off:
        return
    if not force and q.waiting_bytes and q.waiting_bytes + cost > SUBSCRIBER_QUEUE_BYTES:
        _cut_off(q)
        return
    try:
        q.put_nowait((cost, item))
    except asyncio.QueueFull:
        if force:
            try:
                q.get_nowait()
                q.put_nowait((cost, item))
            except (asyncio.QueueEmpty, asyncio.QueueFull):
                pass
        else:
            _cut_off(q)


def _cut_off(q: Subscriber) -> None:
    """Mark the subscriber as too slow: drain and leave only the end marker."""
    while not q.empty():
        q.get_nowait()
    q.put_nowait((0, None))
    q.cut_off = True
