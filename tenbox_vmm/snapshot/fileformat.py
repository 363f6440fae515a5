"""Snapshot files: written crash-safe, read with every field distrusted (worker).

Layout (little-endian):

    0   8   magic b"TNBXSNAP"
    8   4   format version (FORMAT_VERSION)
    12  4   header length H (at most HEADER_MAX_BYTES)
    16  4   CRC-32 of the header
    20  H   header: JSON, names tenbox's version, the CPU model and features the state
            depends on (cpu_model.describe), guest RAM size, vCPUs, and where the rest is
    ..      machine state: one msgpack map (records.check_state), CRC-32 in the header
    ..      guest RAM at a page-aligned offset, to the end of the file: mapped MAP_PRIVATE
            on restore, so pages are read only when the guest touches them

RAM is written first (a live save writes it while the guest runs, then the
pages it wrote meanwhile: SnapshotWriter), the header and the state last.
A file is written under a temporary name in the destination's folder,
synced and then renamed, and the folder synced: a snapshot killed half-way
leaves a temporary file, never a file under the name asked for. The reader
still trusts nothing: a short file, a header or state whose CRC does not
match, another format version, another CPU, another RAM size or a record out
of range is refused with one line (SnapshotError) before anything is loaded.
RAM pages that are all zeros are not written: the file is sparse there.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
import zlib
from typing import Any, Dict, Optional, Tuple

import msgpack

from tenbox_vmm import __version__
from tenbox_vmm.kvm.ffi import ffi
from tenbox_vmm.snapshot import cpu_model, records
from tenbox_vmm.snapshot.errors import SnapshotError

MAGIC = b"TNBXSNAP"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header CRC-32
HEADER_MAX_BYTES = 64 << 10
STATE_MAX_BYTES = 16 << 20  # 64 vCPUs of ~8 KiB each and the devices fit many times over
PAGE = mmap.PAGESIZE
RAM_CHUNK = 1 << 20  # RAM is written in chunks this size; an all-zero chunk is left a hole
_ZERO_CHUNK = bytes(RAM_CHUNK)

# The KVM structs of the state, kept whole: record name -> C type.
VCPU_STRUCTS = {
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "xsave": "struct kvm_xsave",
    "xcrs": "struct kvm_xcrs",
    "lapic": "struct kvm_lapic_state",
    "events": "struct kvm_vcpu_events",
    "debugregs": "struct kvm_debugregs",
}
VM_STRUCTS = {
    "pic_master": "struct kvm_irqchip",
    "pic_slave": "struct kvm_irqchip",
    "ioapic": "struct kvm_irqchip",
    "pit": "struct kvm_pit_state2",
    "clock": "struct kvm_clock_data",
}
VCPU_SIZES = {name: ffi.sizeof(ctype) for name, ctype in VCPU_STRUCTS.items()}
VM_SIZES = {name: ffi.sizeof(ctype) for name, ctype in VM_STRUCTS.items()}

_HEADER_FIELDS = {
    "tenbox_version": str, "created": (int, float), "cpu": dict, "memory_bytes": int, "cpus": int,
    "state_offset": int, "state_bytes": int, "state_crc32": int, "ram_offset": int, "ram_bytes": int,
}


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def write_snapshot(path: str, cpu: Dict[str, Any], cpus: int, state: Dict[str, Any], ram,
                   dir_fd: Optional[int] = None, publish: bool = True) -> int:
    """Write a snapshot of `state` (records.check_state's shape) and `ram` (a buffer) to `path`; its size.

    Crash-safe: see the module's docstring. An existing file at `path` is replaced only by a
    complete one. With `dir_fd` (a folder opened before the worker's sandbox, which hides
    the path), `path` is looked up there and only its last component is used.
    With `publish` False (a worker under tenboxd, whose seccomp filter has no rename), `path`
    is made new (O_EXCL) and written in place, synced, and left for tenboxd to move into
    place: the folder it is written in is a staging folder no reader takes a snapshot from.
    """
    state_bytes = pack_state(state)
    ram = memoryview(ram).cast("B")
    room = _state_offset(cpu, cpus, len(ram), state_bytes) + len(state_bytes)
    out = SnapshotWriter(path, len(ram), _align(room), dir_fd, publish)
    try:
        out.write_ram(ram)
        return out.finish(cpu, cpus, state_bytes)
    except BaseException:
        out.abort()
        raise


def live_ram_offset(cpus: int) -> int:
    """Where a snapshot written before its machine state is known puts RAM: room for the header and
    any state of `cpus` vCPUs (~10 KiB each, the devices a few KiB), with margin."""
    return _align(PREFIX.size + HEADER_MAX_BYTES + (256 << 10) + cpus * (64 << 10))


class SnapshotWriter:
    """A snapshot file being written: RAM first (a live save writes it while the guest runs, then
    again the pages it wrote since), the header and the machine state last (`finish`).

    The file is made under a temporary name (or, with `publish` False, new in a staging folder),
    and only `finish` gives it its name: see write_snapshot. `abort` removes it.
    """

    def __init__(self, path: str, ram_bytes: int, ram_offset: int, dir_fd: Optional[int] = None,
                 publish: bool = True) -> None:
        self.path = path
        self.ram_bytes = ram_bytes
        self.ram_offset = ram_offset
        self.publish = publish
        self.folder = os.path.dirname(os.path.abspath(path))
        self.name = os.path.basename(path)
        self.tmp = ".%s.tmp-%d" % (self.name, os.getpid()) if publish else self.name
        self._own_dfd = dir_fd is None
        if dir_fd is None:
            try:
                dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise SnapshotError("cannot write a snapshot in %s: %s" % (self.folder, e.strerror)) from None
        self.dfd = dir_fd
        self._named = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if publish else os.O_EXCL | os.O_NOFOLLOW)
        try:
            self.fd = os.open(self.tmp, flags, 0o600, dir_fd=self.dfd)
        except OSError as e:
            self._close_dfd()
            raise SnapshotError("cannot write a snapshot in %s: %s" % (self.folder, e.strerror)) from None

    def write_ram(self, ram: memoryview, start: int = 0, end: Optional[int] = None, holes: bool = True,
                  data: Optional[bytes] = None) -> None:
        """Write ram[start:end] at its place in the file. With `holes`, chunks of zeros are left
        unwritten (the file reads zeros there): only for a first pass over the file's RAM.

        `data` (with `holes`, from `start` 0): a byte per RAM_CHUNK of RAM, 0 for a chunk known to
        read as zeros (GuestMemory.data_chunks), which is then not even read.
        """
        end = len(ram) if end is None else end
        if data is not None:
            assert holes and start == 0 and len(data) * RAM_CHUNK >= end
        try:
            for at in range(start, end, RAM_CHUNK):
                if data is not None and not data[at // RAM_CHUNK]:
                    continue
                # A copy, then bytes' memcmp: comparing the memoryview itself goes byte by byte
                # in Python's unpacking (0.9 s against 13 ms for 256 MiB, measured).
                chunk = bytes(ram[at : min(at + RAM_CHUNK, end)])
                if not holes or chunk != _ZERO_CHUNK[: len(chunk)]:
                    _pwrite_all(self.fd, memoryview(chunk), self.ram_offset + at)
        except OSError as e:
            raise SnapshotError("cannot write snapshot %s: %s" % (self.path, e.strerror)) from None

    def sync(self) -> None:
        """fdatasync what was written so far (finish syncs again, whatever came after)."""
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise SnapshotError("cannot write snapshot %s: %s" % (self.path, e.strerror)) from None

    def finish(self, cpu: Dict[str, Any], cpus: int, state_bytes: bytes) -> int:
        """Write the header and the state, sync, and give the file its name; its size."""
        state_offset = _state_offset(cpu, cpus, self.ram_bytes, state_bytes)
        if state_offset + len(state_bytes) > self.ram_offset:
            raise SnapshotError("machine state of %d bytes does not fit the %d reserved before RAM"
                                % (len(state_bytes), self.ram_offset - state_offset))
        header = _header(cpu, cpus, self.ram_bytes, state_offset, state_bytes, self.ram_offset)
        if PREFIX.size + len(header) > state_offset:
            raise SnapshotError("snapshot header does not fit")  # cannot happen: 64 bytes of slack
        prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header))
        try:
            os.pwrite(self.fd, (prefix + header).ljust(state_offset, b" ") + state_bytes, 0)
            os.ftruncate(self.fd, self.ram_offset + self.ram_bytes)  # the holes at the end count too
            os.fdatasync(self.fd)  # data and the size it needs to be read back
            os.close(self.fd)
            self.fd = -1
            if self.publish:
                os.rename(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            self._named = True
        except OSError as e:
            raise SnapshotError("cannot write snapshot %s: %s" % (self.path, e.strerror)) from None
        try:
            os.fdatasync(self.dfd)  # the rename is durable once the folder is synced
        except OSError:
            pass  # some file systems cannot sync a folder; the file itself is synced
        self._close_dfd()
        return self.ram_offset + self.ram_bytes

    def abort(self) -> None:
        """Close and remove the unfinished file (after finish: nothing)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._named and self.dfd >= 0:
            _unlink_quietly(self.tmp, self.dfd)
        self._close_dfd()

    def _close_dfd(self) -> None:
        if self._own_dfd and self.dfd >= 0:
            os.close(self.dfd)
        self.dfd = -1


def pack_state(state: Dict[str, Any]) -> bytes:
    """The machine state as the file holds it; SnapshotError if it is over STATE_MAX_BYTES."""
    state_bytes = msgpack.packb(state, use_bin_type=True)
    if len(state_bytes) > STATE_MAX_BYTES:
        raise SnapshotError("machine state of %d bytes is over %d" % (len(state_bytes), STATE_MAX_BYTES))
    return state_bytes


def _state_offset(cpu: Dict[str, Any], cpus: int, ram_bytes: int, state: bytes) -> int:
    """Where the state goes: after the prefix and the header, with room for the offsets' digits to grow."""
    return PREFIX.size + len(_header(cpu, cpus, ram_bytes, 0, state, 0)) + 64


def _header(cpu: Dict[str, Any], cpus: int, ram_bytes: int, state_offset: int, state: bytes,
            ram_offset: int) -> bytes:
    return json.dumps({
        "format": "tenbox snapshot",
        "tenbox_version": __version__,
        "created": round(time.time(), 3),
        "cpu": cpu,
        "memory_bytes": ram_bytes,
        "cpus": cpus,
        "state_offset": state_offset,
        "state_bytes": len(state),
        "state_crc32": zlib.crc32(state),
        "ram_offset": ram_offset,
        "ram_bytes": ram_bytes,
    }, sort_keys=True).encode()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _unlink_quietly(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def peek_size(head: bytes) -> Optional[tuple]:
    """(RAM bytes, vCPUs) as the first bytes of a file claim them, unchecked, or None.

    For sizing the worker's limits before its sandbox; read_snapshot checks everything later.
    """
    if len(head) < PREFIX.size or head[: len(MAGIC)] != MAGIC:
        return None
    _, _, header_len, _ = PREFIX.unpack_from(head)
    try:
        header = json.loads(head[PREFIX.size : PREFIX.size + header_len].decode())
        return int(header["memory_bytes"]), int(header["cpus"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


class Snapshot:
    """A snapshot file that passed every check: its header, its machine state, and its RAM to map."""

    def __init__(self, path: str, fd: int, header: Dict[str, Any], state: Dict[str, Any]) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.state = state

    @property
    def memory_bytes(self) -> int:
        return int(self.header["memory_bytes"])

    @property
    def cpus(self) -> int:
        return int(self.header["cpus"])

    def map_ram(self) -> mmap.mmap:
        """Guest RAM, mapped MAP_PRIVATE from the file: shared with the page cache until the guest writes."""
        return mmap.mmap(self.fd, self.memory_bytes, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=int(self.header["ram_offset"]))

    def ram_file(self) -> Tuple[int, int]:
        """(a new descriptor of the file, where RAM starts in it), for GuestMemory's `backing`."""
        return os.dup(self.fd), int(self.header["ram_offset"])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_snapshot(path: str, host_cpu: Dict[str, Any], memory_bytes: Optional[int] = None,
                  cpus: Optional[int] = None, fd: Optional[int] = None) -> Snapshot:
    """Open and check the snapshot at `path` (or the open `fd` standing for it); SnapshotError says why not.

    host_cpu: cpu_model.describe() of this host; memory_bytes / cpus: what the
    machine to restore into must have, if the caller already knows.
    """
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotError("%s: cannot open the snapshot: %s" % (path, e.strerror)) from None
    try:
        header, state = _read_checked(path, fd, host_cpu, memory_bytes, cpus)
    except BaseException:
        os.close(fd)
        raise
    return Snapshot(path, fd, header, state)


def _read_checked(path: str, fd: int, host_cpu: Dict[str, Any], memory_bytes: Optional[int],
                  cpus: Optional[int]):
    def refuse(why: str) -> SnapshotError:
        return SnapshotError("%s: %s" % (path, why))

    size = os.fstat(fd).st_size
    prefix = os.pread(fd, PREFIX.size, 0)
    if len(prefix) < len(MAGIC) or prefix[: len(MAGIC)] != MAGIC:
        raise refuse("not a tenbox snapshot (no TNBXSNAP magic)")
    if len(prefix) < PREFIX.size:
        raise refuse("truncated: %d bytes, not even a header" % size)
    _, version, header_len, header_crc = PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise refuse("snapshot format version %d, this tenbox (%s) reads version %d"
                     % (version, __version__, FORMAT_VERSION))
    if header_len > HEADER_MAX_BYTES:
        raise refuse("header of %d bytes is over %d" % (header_len, HEADER_MAX_BYTES))
    raw = os.pread(fd, header_len, PREFIX.size)
    if len(raw) < header_len:
        raise refuse("truncated: %d bytes, the header alone needs %d" % (size, PREFIX.size + header_len))
    if zlib.crc32(raw) != header_crc:
        raise refuse("the header's checksum does not match: the file is damaged")
    try:
        header = json.loads(raw.decode())
    except ValueError:
        raise refuse("the header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse("the header is not a JSON object")
    for name, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(name), kind) or isinstance(header.get(name), bool):
            raise refuse("the header's %s is missing or of the wrong type" % name)
    ram_offset, ram_bytes = header["ram_offset"], header["ram_bytes"]
    state_offset, state_len = header["state_offset"], header["state_bytes"]
    if ram_offset % PAGE or ram_bytes <= 0 or ram_bytes % PAGE or ram_bytes != header["memory_bytes"]:
        raise refuse("the header's RAM section (%d bytes at %d) does not match its memory size %d"
                     % (ram_bytes, ram_offset, header["memory_bytes"]))
    if not (PREFIX.size + header_len <= state_offset and 0 <= state_len <= STATE_MAX_BYTES
            and state_offset + state_len <= ram_offset):
        raise refuse("the header's sections overlap or are out of order")
    if size != ram_offset + ram_bytes:
        what = "truncated" if size < ram_offset + ram_bytes else "too long"
        raise refuse("%s: %d bytes, the header says %d" % (what, size, ram_offset + ram_bytes))
    why = cpu_model.refusal(header["cpu"], host_cpu)
    if why:
        raise refuse(why)
    if memory_bytes is not None and memory_bytes != ram_bytes:
        raise refuse("memory size mismatch: the snapshot has %d MiB of RAM, the VM %d MiB"
                     % (ram_bytes >> 20, memory_bytes >> 20))
    if not 1 <= header["cpus"] <= 64 or (cpus is not None and cpus != header["cpus"]):
        raise refuse("the snapshot has %d vCPUs, the VM %s" % (header["cpus"], cpus))
    data = os.pread(fd, state_len, state_offset)
    if len(data) != state_len or zlib.crc32(data) != header["state_crc32"]:
        raise refuse("the machine state's checksum does not match: the file is damaged")
    try:
        state = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=STATE_MAX_BYTES)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise refuse("the machine state does not decode: %s" % e) from None
    try:
        records.check_state(state, header["cpus"], VCPU_SIZES, VM_SIZES)
    except SnapshotError as e:
        raise refuse(str(e)) from None
    return header, state
