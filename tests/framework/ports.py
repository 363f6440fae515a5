"""Free ports on the host's loopback for forwards and servers that tests and benchmarks set up (tests and bench; any user)."""

from __future__ import annotations

import socket
from typing import Optional


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (kind: SOCK_STREAM or SOCK_DGRAM); taken back at once, so racy by nature."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def udp_echo(port: int, text: bytes = b"ping", tries: int = 6, wait: float = 1.0) -> Optional[bytes]:
    """Send `text` to 127.0.0.1:port until an answer comes (a guest's UDP echo behind a forward); None if none does."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(wait)
    try:
        for _ in range(tries):
            s.sendto(text, ("127.0.0.1", port))
            try:
                return s.recvfrom(65536)[0]
            except socket.timeout:
                continue
        return None
    finally:
        s.close()
