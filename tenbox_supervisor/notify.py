"""systemd notifications: READY, STATUS, WATCHDOG, STOPPING (daemon, under systemd).

A thin wrapper over `sdnotify` that does nothing outside systemd, reads
WATCHDOG_USEC itself, and removes NOTIFY_SOCKET so no child inherits it.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("tenboxd.notify")


class Notifier:
    def __init__(self, env: Optional[dict] = None) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._n = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_sec: Optional[float] = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_sec = int(usec) / 1e6
        if self.enabled:
            import sdnotify

            self._n = sdnotify.SystemdNotifier()
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(key, None)  # workers and apt must not inherit them

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str) -> None:
        self._send("READY=1\nSTATUS=%s" % status)

    def status(self, status: str) -> None:
        self._send("STATUS=%s" % status)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")
