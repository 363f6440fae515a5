"""The runtime's console in standalone mode: the guest's COM1 on this process's stdio (worker).

Interactive mode puts the terminal in raw mode (restored on every way out)
and detaches on Ctrl-]; stdio mode passes bytes through pipes unchanged.
Guest output is written as it comes, one write per line or per 20 ms.
"""

from __future__ import annotations

import atexit
import os
import selectors
import threading
from typing import Callable, List, Optional

from tenbox_vmm import passed_files
from tenbox_vmm.logfiles import copy_file, write_all
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.sandbox import rotated_log_names

DETACH_BYTE = 0x1D  # Ctrl-]
FLUSH_SEC = 0.02
READ_CHUNK = 4096
OUTPUT_BUFFER_MAX = 1 << 16
LOG_MAX_BYTES = Limits.CONSOLE_LOG_MAX_BYTES  # console.log, then console.log.1 and .2
LOG_KEEP = Limits.CONSOLE_LOG_KEEP
LOG_MODE = 0o640  # what the guest wrote is not for every user of the host


class ConsoleOutput:
    """A sink for guest console bytes: line-buffered with a short timer, to one or more writers."""

    def __init__(self, writers: List[Callable[[bytes], None]]) -> None:
        self._writers = writers
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._flusher, name="console-flush", daemon=True)

    def start(self) -> None:
        """Start flushing partial lines after FLUSH_SEC; until then a partial line waits for its end.
        A worker calls it once its guest runs: the thread's start cost a restore 0.4-1 ms before it."""
        self._thread.start()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if b"\n" in data or len(self._buf) >= OUTPUT_BUFFER_MAX:
                self._flush_locked()
                return
        self._wake.set()

    def _flush_locked(self) -> None:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            for w in self._writers:
                w(data)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flusher(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                break
            threading.Event().wait(FLUSH_SEC)
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """Write everything to `fd`; a closed reader (EPIPE) stops the output, not the VM."""
    broken = []

    def write(data: bytes) -> None:
        if broken:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BlockingIOError:
            pass  # a full non-blocking pipe: drop rather than stall the guest
        except OSError:
            broken.append(True)

    return write


def log_files(path: str, keep: int = LOG_KEEP) -> List[str]:
    """A rotating log's files, newest first: path, path.1 .. path.KEEP."""
    return [path] + rotated_log_names(path, keep)


class RotatingLog:
    """Append bytes to `path`, keeping at most `keep` older copies of `max_bytes` each (path.1 newest).

    Rotation copies the files into each other through descriptors opened
    once, instead of renaming them: a sandboxed worker gets its log files
    as descriptors (passed_files) and may not change its logs folder, so a
    guest that escapes into its worker cannot plant a link there for the
    daemon to follow. At most (keep + 1) * max_bytes are copied per
    max_bytes of output.
    """

    def __init__(self, path: str, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        if not passed_files.passed(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fds: List[int] = []
        try:
            for name in log_files(path, keep):
                self._fds.append(passed_files.open_fd(name, os.O_RDWR | os.O_CREAT, LOG_MODE))
        except OSError:
            self.close()
            raise
        self._size = os.lseek(self._fds[0], 0, os.SEEK_END)

    def __call__(self, data: bytes) -> None:
        try:
            if self._size + len(data) > self.max_bytes and self._size:
                self._rotate()
            self._size += write_all(self._fds[0], data, self._size)
        except OSError:
            pass  # a full disk must not stop the guest; the console still streams

    def _rotate(self) -> None:
        for older, newer in zip(reversed(self._fds[1:]), reversed(self._fds[:-1])):
            copy_file(newer, older)
        os.ftruncate(self._fds[0], 0)
        self._size = 0

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


class TerminalMode:
    """Raw mode on a terminal, restored on exit even if the process is dying."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: Optional[list] = None

    def __enter__(self) -> "TerminalMode":
        import termios  # here: termios and tty cost a boot without a terminal 0.5 ms to import
        import tty

        self._saved = termios.tcgetattr(self.fd)
        atexit.register(self.restore)
        tty.setraw(self.fd)
        return self

    def restore(self) -> None:
        if self._saved is not None:
            import termios  # imported by __enter__ already

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass  # the terminal went away; nothing to restore
            self._saved = None

    def __exit__(self, *exc) -> None:
        self.restore()


def pump_input(
    input_fd: Optional[int],
    interactive: bool,
    deliver: Callable[[bytes], int],
    done_fd: int,
    on_detach: Callable[[], None],
    signal_fd: Optional[int] = None,
) -> None:
    """Feed the guest from `input_fd` until `done_fd` becomes readable.

    Input that the guest's receive queue cannot take yet waits here, and the
    terminal or pipe is not read meanwhile, so typing ahead is never lost.
    EOF on a pipe ends input but not the VM; Ctrl-] (interactive) detaches.
    `signal_fd` (signal.set_wakeup_fd's pipe) wakes this wait, so that Python
    runs the handlers of signals the kernel gave to another thread.
    """
    sel = selectors.PollSelector()  # poll, unlike epoll, accepts regular files and /dev/null
    sel.register(done_fd, selectors.EVENT_READ, "done")
    if signal_fd is not None:
        sel.register(signal_fd, selectors.EVENT_READ, "signal")
    open_input = input_fd is not None
    if open_input:
        sel.register(input_fd, selectors.EVENT_READ, "input")
    pending = b""
    try:
        while True:
            for key, _ in sel.select(0.02 if pending else None):
                if key.data == "done":
                    return
                if key.data == "signal":
                    _drain(signal_fd)  # the handlers run as this thread goes on
                    continue
                try:
                    chunk = os.read(input_fd, READ_CHUNK)
                except OSError:
                    chunk = b""
                if interactive and DETACH_BYTE in chunk:
                    pending += chunk[: chunk.index(DETACH_BYTE)]
                    deliver(pending)
                    on_detach()
                    sel.unregister(input_fd)
                    pending, open_input = b"", False
                    continue
                sel.unregister(input_fd)
                if not chunk:
                    open_input = False
                    continue
                pending += chunk  # read more only once this is delivered
            if pending:
                pending = pending[deliver(pending):]
            if not pending and open_input and input_fd not in sel.get_map():
                sel.register(input_fd, selectors.EVENT_READ, "input")
    finally:
        sel.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, READ_CHUNK):
            pass
    except BlockingIOError:
        pass
