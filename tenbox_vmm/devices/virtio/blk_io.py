"""virtio-blk's I/O engine and the block backend it drives: requests in order on the I/O thread, or on helper threads (worker).

The device model (blk.py) decides what may run together (a flush is a
barrier); a runner decides where it runs. Whoever builds the device picks
the runner from the backend's declared capability (`concurrent_io`) and the
host's cores, so the model starts no threads of its own.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Protocol, Sequence, TypeVar

IO_HELPERS_MAX = 4  # threads per disk, the I/O thread included

T = TypeVar("T")


class BlockBackend(Protocol):
    """What virtio-blk asks of a disk (tenbox_vmm.disk.Disk implements it); used by one thread at a time
    unless `concurrent_io` says its reads and writes may run on several at once (flushes still come alone)."""

    path: str
    size: int  # virtual bytes
    read_only: bool
    concurrent_io: bool

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        ...

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        ...

    def flush(self) -> None:
        ...

    def discard(self, offset: int, length: int) -> None:
        ...

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        ...

    def close(self) -> None:
        ...


class RequestRunner(Protocol):
    parallel: bool  # False: the model announces each completion before the next request runs

    def run(self, fn: Callable[[T], int], items: List[T]) -> List[int]:
        """fn over items, results in order."""

    def close(self) -> None:
        ...


class InOrder:
    """Every request on the calling (I/O) thread, one after the other."""

    parallel = False

    def run(self, fn: Callable[[T], int], items: List[T]) -> List[int]:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


class HelperPool:
    """The calling thread and `helpers` more share a batch, round robin.

    preadv/pwritev release the GIL, so a page-cache copy on one core overlaps
    the next request's; that pays only with cores to spare beyond the vCPUs
    and the I/O thread (on a 2-core host one helper cost 10-30 %,
    docs/performance.md).
    """

    parallel = True

    def __init__(self, helpers: int) -> None:
        self.helpers = helpers
        self._pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="virtio-blk-io")

    def run(self, fn: Callable[[T], int], items: List[T]) -> List[int]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        ways = self.helpers + 1
        futures = [self._pool.submit(_run_list, fn, items[k::ways]) for k in range(1, ways)]
        results = [0] * len(items)
        results[0::ways] = _run_list(fn, items[0::ways])
        for k, f in enumerate(futures, start=1):
            results[k::ways] = f.result()
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _run_list(fn: Callable[[T], int], items: List[T]) -> List[int]:
    return [fn(item) for item in items]


def default_io_helpers() -> int:
    """Helper threads per disk: none unless the host has cores beyond a vCPU and the I/O thread."""
    return max(0, min(IO_HELPERS_MAX - 1, (os.cpu_count() or 1) - 2))


def runner_for(disk: BlockBackend, helpers: Optional[int] = None) -> RequestRunner:
    """Helper threads for a backend whose requests are independent syscalls (raw), when cores allow."""
    helpers = default_io_helpers() if helpers is None else helpers
    if disk.concurrent_io and helpers > 0:
        return HelperPool(helpers)
    return InOrder()
