"""The worker's console output (tenbox_vmm/console.py ConsoleOutput): lines go out at once, a partial line
after FLUSH_SEC once the flusher runs; the flusher starts after the guest does (pure; threads only)."""

import threading
import time

from tenbox_vmm.console import FLUSH_SEC, ConsoleOutput


def test_lines_go_out_at_once_and_a_partial_line_waits_for_the_flusher_which_starts_on_request():
    got = []
    out = ConsoleOutput([got.append])
    before = threading.active_count()
    out(b"one line\n")
    assert got == [b"one line\n"], "a whole line needs no thread"
    out(b"a prompt: ")
    time.sleep(FLUSH_SEC * 5)
    assert got == [b"one line\n"] and threading.active_count() == before, "no flusher before start()"
    out.start()
    deadline = time.monotonic() + 5.0
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(FLUSH_SEC)
    assert got == [b"one line\n", b"a prompt: "]
    out(b"end")
    out.close()
    assert got[-1] == b"end", "close() flushes what is left"


def test_close_without_start_flushes_and_leaves_no_thread():
    got = []
    before = threading.active_count()
    out = ConsoleOutput([got.append])
    out(b"partial")
    out.close()
    assert got == [b"partial"] and threading.active_count() == before
