"""virtio-blk over a tenbox disk backend (worker; requests run on the device's I/O thread and its runner's helpers).

Read, write, flush (durable: the backend fdatasyncs), get_id (the serial),
discard and write-zeroes, read-only disks. Data moves between the image and
guest memory through the chain's memoryviews, no copies in Python. A host
I/O error fails that one request with VIRTIO_BLK_S_IOERR; the worker, the
other requests and the image stay sound.

Sizes are counted before any copy: a read or write of more than
REQUEST_MAX_BYTES (seg_max x size_max, what the config promises) fails, and
discard and write-zeroes take exactly DISCARD_SEG_MAX segment, as the config
says; only then are the 16 segment bytes read.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import List, Optional

from tenbox_vmm.devices.virtio import ID_BLOCK
from tenbox_vmm.devices.virtio.blk_io import BlockBackend, InOrder, RequestRunner
from tenbox_vmm.devices.virtio.device import COMMON_FEATURES, VirtioDevice
from tenbox_vmm.devices.virtio.queue import Chain, Virtqueue
from tenbox_vmm.disk.iov import FlatViews
from tenbox_vmm.guest_log import GuestLog
from tenbox_vmm.protocol.link import BlockCounters

log = logging.getLogger("tenbox.virtio.blk")

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take a descriptor each
SIZE_MAX = 1 << 20
SERIAL_LEN = 20  # VIRTIO_BLK_ID_BYTES
DISCARD_SECTORS_MAX = (1 << 32) - 1
DISCARD_SEG_MAX = 1  # also max_write_zeroes_seg
# A request's data may name the same guest memory many times over (descriptors may
# overlap), so its size is checked before anything is done with it: no more than the
# config promises, seg_max segments of size_max bytes.
REQUEST_MAX_BYTES = SEG_MAX * SIZE_MAX

# Feature bits
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# Request types and status
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WZ_FLAG_UNMAP = 1

_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")


class BlkError(Exception):
    """The request is malformed or failed; its status says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class VirtioBlk(VirtioDevice):
    device_id = ID_BLOCK
    num_queues = 1
    queue_size = QUEUE_SIZE
    name = "blk"

    def __init__(self, disk: BlockBackend, serial: str = "", runner: Optional[RequestRunner] = None) -> None:
        """`runner` runs a batch's requests (blk_io.runner_for picks one for the disk); in order if None."""
        super().__init__()
        self.disk = disk
        self.runner: RequestRunner = runner if runner is not None else InOrder()
        self.serial = serial.encode("ascii", "replace")[:SERIAL_LEN]
        self.read_only = bool(disk.read_only)
        self.capacity = disk.size // SECTOR
        self.requests = 0
        self.errors = 0
        # Counted per completed request: a raw disk runs a batch's requests on helper threads.
        self._count_lock = threading.Lock()
        self._counts = {"read_bytes": 0, "read_ops": 0, "write_bytes": 0, "write_ops": 0, "flush_ops": 0}
        # Held by the I/O thread for a batch and by `grow`: the backend is used by one party at a time.
        self._disk_lock = threading.Lock()
        self._error_log = GuestLog(log, "blk %s: failed requests" % disk.path)  # the guest makes them fail
        self._config = self._build_config()

    def activate(self, features: int, queues: List[Virtqueue]) -> None:
        super().activate(features, queues)
        for q in queues:
            q.cache_tables = True  # requests from one buffer again and again (O_DIRECT, databases)

    def device_features(self) -> int:
        f = COMMON_FEATURES | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH
        if self.read_only:
            f |= F_RO
        else:
            f |= F_DISCARD | F_WRITE_ZEROES
        return f

    def _build_config(self) -> bytes:
        cfg = bytearray(60)
        struct.pack_into("<QII", cfg, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", cfg, 20, SECTOR)  # blk_size
        struct.pack_into("<H", cfg, 34, 1)  # num_queues
        struct.pack_into("<III", cfg, 36, DISCARD_SECTORS_MAX, DISCARD_SEG_MAX, 1)
        struct.pack_into("<IIB", cfg, 48, DISCARD_SECTORS_MAX, DISCARD_SEG_MAX, 1)
        return bytes(cfg)

    def config_bytes(self) -> bytes:
        return self._config

    def counters(self) -> BlockCounters:
        """Requests that succeeded since the device was made, and those that failed (IOERR)."""
        with self._count_lock:
            counts = dict(self._counts)
        return BlockCounters(errors=self.errors, capacity_bytes=self.capacity * SECTOR, **counts)

    def _count(self, kind: str, nbytes: int) -> None:
        with self._count_lock:
            self._counts[kind + "_ops"] += 1
            if nbytes:
                self._counts[kind + "_bytes"] += nbytes

    # Requests (I/O thread) ------------------------------------------------------------

    def grow(self, size: int) -> int:
        """Grow the disk to `size` bytes while the guest runs (any thread); the guest gets a config interrupt.

        Waits for the batch in progress; the new capacity is in the config
        (and the range checks) before the interrupt goes out. Returns the
        capacity in bytes. DiskError if the backend refuses.
        """
        with self._disk_lock:
            self.disk.grow(size)
            self.capacity = self.disk.size // SECTOR
            self._config = self._build_config()
        self.config_changed()
        return self.capacity * SECTOR

    def swap_backend(self, disk: BlockBackend) -> BlockBackend:
        """Serve the guest from `disk` from now on (a snapshot's new overlay, of the same size); the old backend.

        Called with the device paused (no batch in progress); the guest sees no change.
        """
        if disk.size != self.disk.size or bool(disk.read_only) != self.read_only:
            raise ValueError("%s: the new backend has another size or mode" % disk.path)
        with self._disk_lock:
            old, self.disk = self.disk, disk
        return old

    def process(self, queue: Virtqueue) -> None:
        with self._disk_lock:
            self._process(queue)

    def _process(self, queue: Virtqueue) -> None:
        batch: List[Chain] = []
        while True:
            chain = queue.pop()
            if chain is None:
                break
            batch.append(chain)
        if not batch:
            return
        self.requests += len(batch)
        if not self.runner.parallel or len(batch) == 1:
            # Each completion is announced before the next request runs (if the
            # driver wants an interrupt): a driver with two 1 MiB reads in
            # flight learns of the first ~150 us earlier and submits the next.
            last = batch[-1]
            for chain in batch:
                queue.push(chain.head, self._request(chain))
                if chain is not last:
                    self.notify(queue)
            return
        # Flushes are barriers: what comes before completes before they run.
        start = 0
        for i, chain in enumerate(batch + [None]):
            if chain is None or _is_flush(chain):
                for c, written in zip(batch[start:i], self.runner.run(self._request, batch[start:i])):
                    queue.push(c.head, written)
                if chain is not None:
                    queue.push(chain.head, self._request(chain))
                start = i + 1

    def _request(self, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain (data + status)."""
        writable = chain.writable
        if not writable or len(writable[-1]) < 1:
            # No status byte: nothing can be reported, the driver broke the protocol.
            from tenbox_vmm.devices.virtio.queue import VirtqueueError

            raise VirtqueueError("blk request %d has no status byte" % chain.head)
        status_buf = writable[-1]
        status_at = len(status_buf) - 1
        data_out = FlatViews(writable[:-1])  # guest memory views are flat bytes
        if status_at:
            data_out.append(status_buf[:status_at])
        written = 0
        try:
            rtype, _, sector = _HDR.unpack(chain.read(_HDR.size))
            written = self._execute(rtype, sector, chain, data_out)
            status = S_OK
        except BlkError as e:
            status = e.status
            if status == S_IOERR:
                self.errors += 1
                self._error_log.warning("blk %s: %s", self.disk.path, e)
        status_buf[status_at] = status
        return written + 1

    def _data_in(self, chain: Chain) -> List[memoryview]:
        """The readable data after the 16-byte header."""
        out: List[memoryview] = FlatViews()
        skip = _HDR.size
        for v in chain.readable:
            if skip >= len(v):
                skip -= len(v)
                continue
            out.append(v[skip:] if skip else v)
            skip = 0
        return out

    def _check_range(self, sector: int, nbytes: int) -> int:
        if nbytes > REQUEST_MAX_BYTES:
            raise BlkError(S_IOERR, "request of %d bytes: at most %d (seg_max x size_max)" % (nbytes, REQUEST_MAX_BYTES))
        if nbytes % SECTOR:
            raise BlkError(S_IOERR, "request of %d bytes is not whole sectors" % nbytes)
        if sector > self.capacity or sector + nbytes // SECTOR > self.capacity:
            raise BlkError(S_IOERR, "sectors %d+%d beyond the end (%d)" % (sector, nbytes // SECTOR, self.capacity))
        return sector * SECTOR

    @staticmethod
    def _one_segment(chain: Chain) -> bytes:
        """The discard/write-zeroes segment: its size counted first, then its 16 bytes copied."""
        n = chain.readable_len() - _HDR.size
        if n != _SEG.size * DISCARD_SEG_MAX:
            if n <= 0 or n % _SEG.size:
                raise BlkError(S_UNSUPP, "malformed discard/write-zeroes segments (%d bytes)" % n)
            raise BlkError(S_UNSUPP, "%d discard/write-zeroes segments: the device takes %d"
                           % (n // _SEG.size, DISCARD_SEG_MAX))
        return chain.read(_HDR.size + _SEG.size)[_HDR.size:]

    def _check_segment(self, sector: int, count: int) -> int:
        if sector > self.capacity or sector + count > self.capacity:
            raise BlkError(S_IOERR, "sectors %d+%d beyond the end (%d)" % (sector, count, self.capacity))
        return sector * SECTOR

    def _execute(self, rtype: int, sector: int, chain: Chain, data_out: List[memoryview]) -> int:
        disk = self.disk
        try:
            if rtype == T_IN:
                n = sum(map(len, data_out))
                disk.readv(self._check_range(sector, n), data_out)
                self._count("read", n)
                return n
            if rtype == T_OUT:
                if self.read_only:
                    raise BlkError(S_IOERR, "write to a read-only disk")
                bufs = self._data_in(chain)
                n = sum(map(len, bufs))
                disk.writev(self._check_range(sector, n), bufs)
                self._count("write", n)
                return 0
            if rtype == T_FLUSH:
                if not self.read_only:
                    disk.flush()
                self._count("flush", 0)
                return 0
            if rtype == T_GET_ID:
                ident = self.serial.ljust(SERIAL_LEN, b"\0")
                done = 0
                for v in data_out:
                    take = min(len(v), SERIAL_LEN - done)
                    v[:take] = ident[done : done + take]
                    done += take
                return done
            if rtype in (T_DISCARD, T_WRITE_ZEROES):
                if self.read_only:
                    raise BlkError(S_IOERR, "discard on a read-only disk")
                start, count, flags = _SEG.unpack(self._one_segment(chain))
                offset = self._check_segment(start, count)
                if rtype == T_DISCARD:
                    disk.discard(offset, count * SECTOR)
                else:
                    disk.write_zeroes(offset, count * SECTOR, bool(flags & WZ_FLAG_UNMAP))
                return 0
        except BlkError:
            raise
        except Exception as e:  # the backend's DiskError, or an OSError it let through
            raise BlkError(S_IOERR, "%s at sector %d: %s" % (_name(rtype), sector, e)) from None
        raise BlkError(S_UNSUPP, "request type %d" % rtype)

    def close(self) -> None:
        self.runner.close()
        self.disk.close()


def _is_flush(chain: Chain) -> bool:
    head = chain.readable[0] if chain.readable else b""
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == T_FLUSH


def _name(rtype: int) -> str:
    return {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_DISCARD: "discard",
            T_WRITE_ZEROES: "write-zeroes"}.get(rtype, "request %d" % rtype)
