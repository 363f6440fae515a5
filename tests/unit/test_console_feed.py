"""tenboxd's console feed stays bounded and linear whatever the guest prints (pure; no daemon, no worker).

The guest decides what it prints: a line that never ends, a flood of empty
lines. A log follower must get every byte, in pieces of at most
LOG_LINE_MAX_BYTES, with work linear in the output; a follower that stops
reading is cut off once SUBSCRIBER_QUEUE_BYTES wait for it, counted with
what the lines cost in memory.
"""

import asyncio
import time

from tenbox_supervisor.console_feed import (
    CONSOLE_RING_BYTES,
    LOG_LINE_MAX_BYTES,
    SUBSCRIBER_QUEUE_BYTES,
    ConsoleFeed,
)

CHUNK = 64 << 10  # Limits.CONSOLE_CHUNK_MAX_BYTES: the largest console message from a worker


def _run(coro):
    return asyncio.run(coro)


def _drain(q) -> list:
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def test_a_line_without_newlines_reaches_followers_in_bounded_pieces_in_linear_time():
    """16 MiB without a newline: followers get all of it in pieces of LOG_LINE_MAX_BYTES; nothing held grows."""
    total = 16 << 20

    async def main():
        feed = ConsoleFeed()
        got = 0
        longest = 0
        held = 0
        with feed.subscribe_logs() as q:
            t0 = time.process_time()
            for _ in range(total // CHUNK):
                feed.add(b"x" * CHUNK)
                held = max(held, feed.partial_line_bytes)
                for lines in _drain(q):
                    got += sum(map(len, lines))
                    longest = max([longest] + [len(l) for l in lines])
            return got, longest, held, time.process_time() - t0, len(feed.ring())

    got, longest, held, cpu, ring = _run(main())
    assert got == total  # 16 MiB is a whole number of pieces
    assert longest == LOG_LINE_MAX_BYTES
    assert held < LOG_LINE_MAX_BYTES
    assert ring == CONSOLE_RING_BYTES
    # Linear: ~16 MiB of copies. Copying the held line again per chunk was ~2 GiB and seconds.
    assert cpu < 1.0, "%.2f s of CPU for 16 MiB of console output" % cpu


def test_lines_are_whole_across_chunks_and_long_ones_come_in_pieces_that_add_up():
    async def main():
        feed = ConsoleFeed()
        with feed.subscribe_logs() as q:
            feed.add(b"ab\r\ncd")
            feed.add(b"ef\n\n")
            long_line = bytes(range(97, 123)) * 2000  # 52000 bytes
            feed.add(b"head " + long_line[:100])
            feed.add(long_line[100:] + b"\ntail")
            feed.add(b"\n")
            return [l for lines in _drain(q) for l in lines], long_line

    lines, long_line = _run(main())
    assert lines[:3] == ["ab", "cdef", ""]
    pieces = lines[3:-1]
    assert all(len(p) <= LOG_LINE_MAX_BYTES for p in pieces) and len(pieces) == 4
    assert "".join(pieces) == "head " + long_line.decode()
    assert lines[-1] == "tail"


def test_a_follower_that_stops_reading_is_cut_off_by_bytes_even_for_empty_lines():
    """Empty lines cost memory too: a flood of them cuts a stalled follower off after SUBSCRIBER_QUEUE_BYTES."""

    async def main():
        feed = ConsoleFeed()
        with feed.subscribe_logs() as stalled, feed.subscribe_logs() as reader:
            delivered = 0
            for _ in range(64):
                feed.add(b"\n" * CHUNK)
                delivered += sum(len(lines) for lines in _drain(reader))
            return _drain(stalled), delivered

    stalled, delivered = _run(main())
    assert stalled == [None]  # cut off, and nothing else kept for it
    assert delivered == 64 * CHUNK  # a follower that reads gets every line
    assert SUBSCRIBER_QUEUE_BYTES < 64 * CHUNK * 64


def test_a_console_subscriber_that_stops_reading_is_cut_off_by_bytes():
    async def main():
        feed = ConsoleFeed()
        with feed.subscribe_console() as q:
            for _ in range(SUBSCRIBER_QUEUE_BYTES // CHUNK + 1):
                feed.add(b"y" * CHUNK)
            return _drain(q)

    assert _run(main()) == [None]
