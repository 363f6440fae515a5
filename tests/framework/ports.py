"""Free ports on the host's loopback for forwards and servers that tests and benchmarks set up (tests and bench; any user)."""

from __future__ import annotations

import socket


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (kind: SOCK_STREAM or SOCK_DGRAM); taken back at once, so racy by nature."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
