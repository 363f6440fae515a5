"""User-mode networking for virtio-net: libslirp through cffi (worker).

`SlirpNetwork` (slirp.py) is the backend a virtio-net device drives from its
I/O thread; `NetConfig` (config.py) its settings. The TenBox-compatible
hostfwd/guestfwd specs are part of the worker's protocol
(tenbox_vmm.protocol.forwards). libslirp itself is loaded only when a
SlirpNetwork is made (libslirp.py).
"""

from __future__ import annotations

from tenbox_vmm.net.config import NetConfig
from tenbox_vmm.net.libslirp import SlirpUnavailable
from tenbox_vmm.net.slirp import SlirpError, SlirpNetwork

__all__ = [
    "NetConfig",
    "SlirpError",
    "SlirpNetwork",
    "SlirpUnavailable",
]
