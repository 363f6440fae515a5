"""The libslirp handle: cffi ABI mode, version probing, poll bits (worker).

libslirp is dlopened on first use (`open_library`), so importing tenbox_vmm.net
costs nothing on a host without it. The `SlirpConfig` version we hand to
`slirp_new` is chosen from the *running* library's `slirp_version_string()`:
`slirp_new` refuses a version above the one it was built with, so the
header a distribution ships is irrelevant, only the .so counts.
"""

from __future__ import annotations

import re
import select
import threading
from typing import Any, Optional, Tuple

from tenbox_vmm.ffigen import load
from tenbox_vmm.net._slirp_cdef import CDEF

ffi = load("tenbox_vmm.net._slirp_ffi", CDEF)

LIBRARY_NAME = "libslirp.so.0"

# The highest SlirpConfig version _slirp_cdef declares.
CONFIG_VERSION_DECLARED = 5

# SLIRP_CONFIG_VERSION_MAX by release, read from each tag's src/libslirp.h:
# 4.1.0 → 1, 4.2.0 → 2, 4.3.0 … 4.6.1 → 3, 4.7.0 → 4, 4.8.0 → 5, 4.9.x → 6.
# 4.0 had no slirp_new at all.
_CONFIG_VERSION_BY_MINOR = {1: 1, 2: 2, 3: 3, 4: 3, 5: 3, 6: 3, 7: 4}
_CONFIG_VERSION_4_8_AND_LATER = 5  # our declared maximum; 4.9 would take 6

# Timers through `timer_new_opaque` + `slirp_handle_timer` need version 4.
CONFIG_VERSION_TIMER_OPAQUE = 4

UINT32_MAX = 0xFFFFFFFF

# SLIRP_POLL_* from libslirp.h: libslirp's own bits, not poll(2)'s.
SLIRP_POLL_IN = 1 << 0
SLIRP_POLL_OUT = 1 << 1
SLIRP_POLL_PRI = 1 << 2
SLIRP_POLL_ERR = 1 << 3
SLIRP_POLL_HUP = 1 << 4


class SlirpUnavailable(Exception):
    """libslirp cannot be used; the message says why and what to install."""


def parse_version(text: str) -> Optional[Tuple[int, int]]:
    """(major, minor) from a version string such as '4.7.0' or '4.8.0-rc1'."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))


def config_version_for(version_text: str) -> int:
    """The SlirpConfig version to use with the libslirp that reports `version_text`.

    The highest version that library accepts, capped at what we declare.
    Raises SlirpUnavailable for libraries older than 4.1 (no slirp_new).
    An unparseable string gets version 1, which every slirp_new accepts.
    """
    parsed = parse_version(version_text)
    if parsed is None:
        return 1
    major, minor = parsed
    if major < 4 or (major == 4 and minor < 1):
        raise SlirpUnavailable(
            "libslirp %s is too old: tenbox needs 4.1 or later (slirp_new)" % version_text.strip()
        )
    if major > 4 or minor >= 8:
        return _CONFIG_VERSION_4_8_AND_LATER
    return _CONFIG_VERSION_BY_MINOR[minor]


_lib: Any = None
_lib_error = ""
_lib_lock = threading.Lock()


def open_library() -> Any:
    """The dlopened libslirp (cached, and so is a failure); SlirpUnavailable if it is not installed.

    The worker calls this before its sandbox: a failed dlopen makes cffi
    search with ctypes.util.find_library, which runs a child process, and
    the sandbox's filter would kill the worker for that.
    """
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and not _lib_error:
            try:
                _lib = ffi.dlopen(LIBRARY_NAME)
            except OSError as e:
                _lib_error = "cannot load %s (%s): install the libslirp0 package" % (LIBRARY_NAME, e)
        if _lib is None:
            raise SlirpUnavailable(_lib_error)
        return _lib


def library_version(lib: Any) -> str:
    return ffi.string(lib.slirp_version_string()).decode("ascii", "replace")


# Translation tables for every combination of the five bits, built once:
# the I/O thread translates on every poll cycle.
_TO_POLL = [0] * 32
for _bits in range(32):
    _v = 0
    if _bits & SLIRP_POLL_IN:
        _v |= select.POLLIN
    if _bits & SLIRP_POLL_OUT:
        _v |= select.POLLOUT
    if _bits & SLIRP_POLL_PRI:
        _v |= select.POLLPRI
    # ERR and HUP are reported by poll(2) whether asked for or not; asking
    # is harmless on Linux, so pass them through for a faithful translation.
    if _bits & SLIRP_POLL_ERR:
        _v |= select.POLLERR
    if _bits & SLIRP_POLL_HUP:
        _v |= select.POLLHUP
    _TO_POLL[_bits] = _v

def slirp_to_poll(events: int) -> int:
    """SLIRP_POLL_* bits → poll(2) event bits."""
    return _TO_POLL[events & 31]


def poll_to_slirp(revents: int) -> int:
    """poll(2) revents → SLIRP_POLL_* bits. POLLNVAL counts as an error."""
    r = 0
    if revents & select.POLLIN:
        r |= SLIRP_POLL_IN
    if revents & select.POLLOUT:
        r |= SLIRP_POLL_OUT
    if revents & select.POLLPRI:
        r |= SLIRP_POLL_PRI
    if revents & (select.POLLERR | select.POLLNVAL):
        r |= SLIRP_POLL_ERR
    if revents & select.POLLHUP:
        r |= SLIRP_POLL_HUP
    return r
