"""`tenbox vm console`: a VM's serial console on this terminal (CLI).

Raw mode while attached, restored on every way out (detach, VM stop,
daemon gone, signal). Ctrl-] detaches and leaves the VM running.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import termios
import time
import tty
from typing import Optional

from tenbox_ctl.client import Client
from tenbox_supervisor.protocol import Event, ExitCode, Method

DETACH = b"\x1d"


class RawTerminal:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = None

    def __enter__(self):
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def restore(self) -> None:
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass
            self.saved = None

    def __exit__(self, *exc) -> None:
        self.restore()


EOF_LINGER_SEC = 1.0  # after piped input ends, how long to keep showing output


def attach(client: Client, vm: str, linger: float = EOF_LINGER_SEC) -> int:
    conn = client.stream(Method.VM_CONSOLE_ATTACH, {"vm_id": vm})
    vm_id = conn.first.get("vm_id", vm)
    interactive = os.isatty(0)
    if interactive:
        sys.stderr.write("Attached to %s. Press Ctrl-] to detach.\r\n" % vm_id)
    out = sys.stdout.buffer
    reason: Optional[str] = None
    with RawTerminal(0) as term:
        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[sig] = signal.signal(sig, _interrupt)
        sel = selectors.PollSelector()  # poll, unlike epoll, takes files and /dev/null as stdin
        sel.register(conn.sock, selectors.EVENT_READ, "sock")
        sel.register(0, selectors.EVENT_READ, "stdin")
        buf = b""
        deadline = None
        try:
            while True:
                timeout = None
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        reason = "Input ended; detached."
                        return 0
                for key, _ in sel.select(timeout):
                    if key.data == "stdin":
                        data = os.read(0, 4096)
                        if not data:
                            # Piped input is over: show what the guest answers for a moment, then detach.
                            sel.unregister(0)
                            deadline = time.monotonic() + linger
                            continue
                        if interactive and DETACH in data:
                            data = data[: data.index(DETACH)]
                            if data:
                                conn.send({"type": Event.CONSOLE_INPUT.value, "data_hex": data.hex()})
                            reason = "Detached."
                            return 0
                        conn.send({"type": Event.CONSOLE_INPUT.value, "data_hex": data.hex()})
                    else:
                        chunk = conn.sock.recv(65536)
                        if not chunk:
                            reason = "tenboxd closed the console."
                            return ExitCode.UNREACHABLE
                        buf += chunk
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            ev = _event(line)
                            if ev is None:
                                continue
                            if ev.get("type") == Event.CONSOLE_DATA.value:
                                try:
                                    out.write(bytes.fromhex(ev.get("data_hex", "")))
                                except ValueError:
                                    continue
                                out.flush()
                            elif ev.get("type") == Event.CONSOLE_CLOSED.value:
                                reason = "Console closed: %s." % ev.get("reason", "the VM stopped")
                                return 0
        except KeyboardInterrupt:
            reason = "Detached."
            return 0
        finally:
            sel.close()
            conn.close()
            term.restore()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if reason and interactive:
                sys.stderr.write("\r\n%s\r\n" % reason)
            elif reason:
                sys.stderr.write("%s\n" % reason)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _event(line: bytes):
    import json

    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
