"""Scatter-gather lists of memoryviews: slicing, zero-filling, shared zero buffers (worker).

Requests arrive as lists of memoryviews into guest RAM. Backends cut them
at cluster boundaries into sub-lists of views (slices of views are views:
no data is copied) and hand those to preadv/pwritev.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Sequence, Union

ZERO_CHUNK_BYTES = 256 << 10  # one shared read-only buffer of zeros, repeated in iovecs

try:
    IOV_MAX = int(os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError, AttributeError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

_ZEROS = bytes(ZERO_CHUNK_BYTES)
_ZERO_VIEW = memoryview(_ZEROS)

Buffer = Union[memoryview, bytes, bytearray]


class FlatViews(list):
    """A list known to hold only flat unsigned-byte memoryviews: `as_views` passes it through.

    virtio-blk's chains are cut from guest memory as such views, and every
    backend hands such lists on (to a backing file, to preadv): checking
    and re-listing ~95 views per 1 MiB request at each layer cost more than
    the rest of a raw read's Python work.
    """

    __slots__ = ()


def as_views(bufs: Iterable[Buffer]) -> List[memoryview]:
    """Flat unsigned-byte views of `bufs`, empty ones dropped (no copies); a FlatViews as it is."""
    if type(bufs) is FlatViews:
        return bufs
    out: List[memoryview] = FlatViews()
    for b in bufs:
        mv = b if isinstance(b, memoryview) else memoryview(b)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if len(mv):
            out.append(mv)
    return out


def total(views: Sequence[memoryview]) -> int:
    return sum(map(len, views))


def zero_views(n: int) -> List[memoryview]:
    """Read-only views over a shared zero buffer, `n` bytes in all."""
    out: List[memoryview] = []
    while n > 0:
        k = min(n, ZERO_CHUNK_BYTES)
        out.append(_ZERO_VIEW[:k])
        n -= k
    return out


def zero_fill(views: Iterable[memoryview]) -> None:
    """Overwrite every view with zeros."""
    for v in views:
        pos, n = 0, len(v)
        while pos < n:
            k = min(n - pos, ZERO_CHUNK_BYTES)
            v[pos:pos + k] = _ZERO_VIEW[:k]
            pos += k


def advance(views: List[memoryview], n: int) -> List[memoryview]:
    """`views` without its first `n` bytes."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


def copy_into(views: Iterable[memoryview], data: Union[bytes, bytearray, memoryview]) -> None:
    """Copy `data` (exactly as long as the views) into `views` (temporary data only)."""
    src = memoryview(data)
    pos = 0
    for v in views:
        v[:] = src[pos:pos + len(v)]
        pos += len(v)


class Cursor:
    """Hands out consecutive byte ranges of a flat view list (as_views) as FlatViews."""

    __slots__ = ("_views", "_i", "_off", "_total")

    def __init__(self, views: List[memoryview], nbytes: int = -1) -> None:
        """`nbytes`, if known, is total(views): taking all of it at once is then free."""
        self._views = views
        self._i = 0
        self._off = 0
        self._total = nbytes

    def take(self, n: int) -> List[memoryview]:
        if n == self._total and self._i == 0 and self._off == 0:
            self._i = len(self._views)  # the whole list in one extent (the usual sequential request)
            return self._views
        out: List[memoryview] = FlatViews()
        views = self._views
        while n > 0:
            v = views[self._i]
            avail = len(v) - self._off
            if n >= avail:
                out.append(v[self._off:] if self._off else v)
                n -= avail
                self._i += 1
                self._off = 0
            else:
                out.append(v[self._off:self._off + n])
                self._off += n
                n = 0
        return out
