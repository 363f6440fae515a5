"""User-mode networking for virtio-net: libslirp through cffi (worker).

`SlirpNetwork` (slirp.py) is the backend a virtio-net device drives from its
I/O thread; `NetConfig` (config.py) its settings; forwards.py parses the
TenBox-compatible hostfwd/guestfwd specs. libslirp itself is loaded only
when a SlirpNetwork is made (libslirp.py).
"""

from __future__ import annotations

from tenbox_vmm.net.config import NetConfig
from tenbox_vmm.net.forwards import (
    ForwardSpecError,
    GuestForward,
    HostForward,
    parse_guestfwd,
    parse_hostfwd,
)
from tenbox_vmm.net.libslirp import SlirpUnavailable
from tenbox_vmm.net.slirp import SlirpError, SlirpNetwork

__all__ = [
    "ForwardSpecError",
    "GuestForward",
    "HostForward",
    "NetConfig",
    "SlirpError",
    "SlirpNetwork",
    "SlirpUnavailable",
    "parse_guestfwd",
    "parse_hostfwd",
]
