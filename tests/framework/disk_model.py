"""What a disk must read back: the in-memory model the disk tests compare tenbox's backends with (tests; any user).

The unit tests drive a backend and the model with the same random
operations; the integration tests (qemu-img as the judge, kills during
writes) replay their requests on it.
"""

from __future__ import annotations

import random
from typing import List, Optional


class Model:
    """What a disk must read back: the semantics the backends document."""

    def __init__(self, size: int, cluster_size: int = 0, version: int = 3, backing: Optional[bytes] = None,
                 fmt: str = "qcow2") -> None:
        self.size = size
        self.cs = cluster_size
        self.version = version
        self.fmt = fmt
        self.backing = None if backing is None else bytes(backing[:size]).ljust(size, b"\0")
        self.data = bytearray(self.backing if self.backing is not None else bytes(size))

    def write(self, off: int, data: bytes) -> None:
        self.data[off:off + len(data)] = data

    def write_zeroes(self, off: int, n: int) -> None:
        self.data[off:off + n] = bytes(n)

    def discarded_ranges(self, off: int, n: int) -> List[range]:
        if self.fmt == "raw":
            return [range(off, off + n)]
        cs = self.cs
        first = -(-off // cs)
        last = -(-self.size // cs) if off + n == self.size else (off + n) // cs
        return [range(c * cs, min(self.size, c * cs + cs)) for c in range(first, last)]

    def discard(self, off: int, n: int) -> None:
        for r in self.discarded_ranges(off, n):
            if self.fmt == "qcow2" and self.version == 2 and self.backing is not None:
                self.data[r.start:r.stop] = self.backing[r.start:r.stop]
            else:
                self.data[r.start:r.stop] = bytes(len(r))


def split_bufs(data: bytes, rnd: random.Random) -> List[memoryview]:
    """`data` as 1..4 writable views of random lengths (guest requests are scatter-gather)."""
    bufs, pos = [], 0
    while pos < len(data):
        k = rnd.randrange(1, len(data) - pos + 1) if rnd.random() < 0.5 else len(data) - pos
        bufs.append(memoryview(bytearray(data[pos:pos + k])))
        pos += k
    return bufs


def read_all(disk) -> bytes:
    """The whole of an open disk backend, in one request."""
    out = bytearray(disk.size)
    disk.readv(0, [memoryview(out)])
    return bytes(out)


def first_difference_outside(got: bytes, want: bytes, mask: bytes) -> Optional[int]:
    """The first offset where got and want differ and mask is 0 (mask bytes are 0x00 or 0xff); None if none.

    Big-int arithmetic, not a byte loop: the disks are megabytes.
    """
    diff = (int.from_bytes(got, "big") ^ int.from_bytes(want, "big")) & ~int.from_bytes(mask, "big")
    if not diff:
        return None
    return len(got) - 1 - (diff.bit_length() - 1) // 8
