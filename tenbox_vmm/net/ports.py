"""Can this process bind a host port, and why not (worker; reads /proc).

Linux lets a process bind ports below net.ipv4.ip_unprivileged_port_start
(1024 by default) only with CAP_NET_BIND_SERVICE. Checking before libslirp
tries gives the user the reason and the fix instead of a bare EACCES.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

CAP_NET_BIND_SERVICE = 10  # <linux/capability.h>
UNPRIVILEGED_PORT_START_DEFAULT = 1024
PROC_UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
PROC_SELF_STATUS = "/proc/self/status"


def unprivileged_port_start(path: str = PROC_UNPRIVILEGED_PORT_START) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return UNPRIVILEGED_PORT_START_DEFAULT


def has_net_bind_service(path: str = PROC_SELF_STATUS) -> bool:
    """Whether CAP_NET_BIND_SERVICE is in this process's effective set."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def privileged_port_error(port: int, start: Optional[int] = None, capable: Optional[bool] = None) -> Optional[str]:
    """None if `port` may be bound, else one line saying why not and what to do."""
    start = unprivileged_port_start() if start is None else start
    if port >= start:
        return None
    capable = has_net_bind_service() if capable is None else capable
    if capable:
        return None
    return ("host port %d is privileged (below %d) and this process lacks CAP_NET_BIND_SERVICE: "
            "use a port of %d or above" % (port, start, start))


def bind_error(err: int, what: str) -> str:
    """One line for a failed bind() of the listening socket `what` (e.g. 'tcp 127.0.0.1:2222')."""
    if err == errno.EADDRINUSE:
        return "%s is already in use" % what
    if err == errno.EACCES:
        return "permission denied binding %s (ports below 1024 need CAP_NET_BIND_SERVICE)" % what
    if err == errno.EADDRNOTAVAIL:
        return "cannot bind %s: the address is not one of this host's" % what
    if err == errno.EAFNOSUPPORT:
        return "cannot bind %s: this host has no IPv6" % what
    if err:
        return "cannot bind %s: %s" % (what, os.strerror(err))
    return "cannot bind %s" % what
