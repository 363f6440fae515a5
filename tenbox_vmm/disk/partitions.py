"""MBR and GPT partition tables of an untrusted disk image (imagetool: a child of tenboxd or the CLI; reads only).

``read_table(read, disk_size)`` reads the table through ``read(offset,
length)`` (the qcow2 or raw reader of the virtual disk) and returns its
partitions in bytes, numbered as Linux numbers them. A disk image is the
operator's input, hostile until checked: every table that is damaged, or
points outside the disk or at itself, is refused with one PartitionError
line naming the cause. Reads are bounded (at most two GPT entry arrays of
GPT_ENTRIES_MAX_BYTES, or MBR_MAX_EBRS sectors of EBR chain) and never go
past ``disk_size``; every loop is bounded by a count.

What is a table follows the guest's Linux (block/partitions/msdos.c, efi.c),
so what tenbox finds is what the VM will see:

- no 0x55AA signature in sector 0: no table (kind "none", a whole-disk file
  system), even when a GPT header follows: Linux wants the protective MBR;
- a boot indicator other than 0x00/0x80: no table either (a FAT boot sector);
- a 0xEE entry: GPT (protective or hybrid MBR); else MBR.

Where it differs from Linux:

- a damaged primary GPT (header or entries array) falls back to the backup
  GPT in the disk's last sector, as sgdisk and sfdisk do; Linux does so only
  with ``gpt`` on its command line. ``Table.primary_error`` says why.
- overlapping partitions, and partitions outside the disk or their extended
  partition, are refused rather than used or truncated;
- GPT entries of 128 * 2**n bytes up to 4096 are read, as UEFI allows;
  Linux and libblkid read 128-byte entries only.

Exceptions raised by ``read`` itself (an I/O error of the image) pass through.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from typing import Callable, List, NamedTuple, Optional, Sequence, Set, Tuple

ReadFn = Callable[[int, int], bytes]

SECTOR_SIZES = (512, 1024, 2048, 4096)

# MBR (and EBR) sector layout: the tables live in its first 512 bytes whatever the sector size.
MBR_DISK_ID_OFFSET = 440
MBR_ENTRIES_OFFSET = 446
MBR_SIGNATURE_OFFSET = 510
MBR_SIGNATURE = b"\x55\xaa"
# boot indicator, CHS of the first sector, type, CHS of the last sector, first LBA, sectors
MBR_ENTRY = struct.Struct("<B3sB3sII")
MBR_BOOTABLE = 0x80
MBR_TYPE_PROTECTIVE = 0xEE
MBR_EXTENDED_TYPES = frozenset((0x05, 0x0F, 0x85))
MBR_FIRST_LOGICAL = 5
# EBRs read in one extended partition's chain. Linux numbers at most 256 partitions per disk,
# fdisk/sfdisk show 60; a real image has a handful.
MBR_MAX_EBRS = 128

GPT_PRIMARY_LBA = 1
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION_MAJOR = 1  # UEFI 2.x writes 0x00010000 (1.0)
# signature, revision, header size, header CRC32, reserved, MyLBA, AlternateLBA, FirstUsableLBA,
# LastUsableLBA, disk GUID, PartitionEntryLBA, NumberOfPartitionEntries, SizeOfPartitionEntry,
# PartitionEntryArrayCRC32
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_HEADER_CRC_OFFSET = 16
GPT_HEADER_MIN_BYTES = GPT_HEADER.size  # 92
# type GUID, partition GUID, StartingLBA, EndingLBA (inclusive), attributes, name (UTF-16LE)
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_ENTRY_MIN_BYTES = GPT_ENTRY.size  # 128; UEFI allows 128 * 2**n
GPT_ENTRY_MAX_BYTES = 4096
# Every partitioning tool writes 128 entries; 1024 leaves room and bounds the loop.
GPT_MAX_ENTRIES = 1024
GPT_ENTRIES_MAX_BYTES = 1 << 20  # one entries array read into memory, at most
GPT_ATTR_LEGACY_BIOS_BOOTABLE = 1 << 2
_GUID_ZERO = bytes(16)

# Well-known partition types, as Partition.type spells them.
GPT_TYPE_LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
GPT_TYPE_EFI_SYSTEM = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_TYPE_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
GPT_TYPE_XBOOTLDR = "bc13c2ff-59e6-4262-a352-b275fd6f7172"  # Linux extended boot (/boot), systemd's DPS
GPT_TYPE_ROOT_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
MBR_TYPE_LINUX = "0x83"
MBR_TYPE_EFI_SYSTEM = "0xef"
MBR_TYPE_XBOOTLDR = "0xea"


class PartitionError(Exception):
    """The partition table was refused; the message is one line naming the cause."""


class Partition(NamedTuple):
    """One partition; start and size in bytes."""

    number: int  # Linux's: GPT entry index + 1; MBR primaries 1-4, logicals from 5
    start: int
    size: int
    type: str  # GPT type GUID, lowercase; MBR type byte as "0x83"
    uuid: Optional[str]  # GPT partition GUID, lowercase; None for MBR
    name: str  # GPT name; "" for MBR
    bootable: bool  # MBR active flag; GPT legacy BIOS bootable attribute

    @property
    def end(self) -> int:
        """The first byte after the partition."""
        return self.start + self.size


class Table(NamedTuple):
    """A disk's partition table: kind "gpt", "mbr", or "none" (no table: a whole-disk file system)."""

    kind: str
    disk_id: str  # GPT disk GUID (lowercase), MBR disk signature as "0x1234abcd"; "" for "none"
    partitions: List[Partition]  # by number; an MBR extended partition is listed too, as fdisk does
    primary_error: Optional[str] = None  # GPT read from its backup: why the primary was refused

    def of_type(self, *types: str) -> List[Partition]:
        """The partitions of any of these types (the constants above)."""
        return [p for p in self.partitions if p.type in types]


class _Disk:
    """The virtual disk, read by whole sectors within its size."""

    def __init__(self, read: ReadFn, disk_size: int, sector_size: int) -> None:
        self._read = read
        self.sector_size = sector_size
        self.sectors = disk_size // sector_size
        self.last_lba = self.sectors - 1

    def read(self, lba: int, nbytes: int) -> bytes:
        count = -(-nbytes // self.sector_size)
        if lba < 0 or lba + count > self.sectors:
            raise PartitionError("read of sectors %d..%d past the end of the disk (%d sectors)"
                                 % (lba, lba + count - 1, self.sectors))
        data = self._read(lba * self.sector_size, nbytes)
        if len(data) != nbytes:
            raise PartitionError("short read at sector %d: %d of %d bytes (image shorter than its size?)"
                                 % (lba, len(data), nbytes))
        return bytes(data)


def read_table(read: ReadFn, disk_size: int, sector_size: int = 512) -> Table:
    """The partition table of a disk of `disk_size` bytes read through `read(offset, length)`.

    Raises PartitionError for a table that is damaged or points outside the
    disk; a disk without a table is Table("none", "", []).
    """
    if sector_size not in SECTOR_SIZES:
        raise ValueError("sector size %r is not one of %s" % (sector_size, SECTOR_SIZES))
    if disk_size < 0:
        raise ValueError("negative disk size %d" % disk_size)
    disk = _Disk(read, disk_size, sector_size)
    if disk.sectors < 1:
        return Table("none", "", [])
    sector0 = disk.read(0, sector_size)
    if sector0[MBR_SIGNATURE_OFFSET:MBR_SIGNATURE_OFFSET + 2] != MBR_SIGNATURE:
        return Table("none", "", [])
    entries = _mbr_entries(sector0)
    # Linux: with 0x55AA but a boot indicator other than 0x00/0x80 this is a FAT boot sector, not a table.
    if any(e.boot not in (0, MBR_BOOTABLE) for e in entries):
        return Table("none", "", [])
    if any(e.type == MBR_TYPE_PROTECTIVE for e in entries):
        return _read_gpt(disk)
    return _read_mbr(disk, sector0, entries)


# ---- MBR -------------------------------------------------------------------------------------------------------

class _MbrEntry(NamedTuple):
    boot: int
    type: int
    lba: int  # relative: to the disk (MBR), to its EBR (logical data), to the extended partition (EBR link)
    sectors: int

    @property
    def used(self) -> bool:
        # Linux skips a slot with no sectors, whatever its type; fdisk lists one of type 0 with sectors too.
        return self.sectors != 0


def _mbr_entries(sector: bytes) -> List[_MbrEntry]:
    out = []
    for slot in range(4):
        boot, _chs, ptype, _chs_end, lba, count = MBR_ENTRY.unpack_from(sector, MBR_ENTRIES_OFFSET + 16 * slot)
        out.append(_MbrEntry(boot, ptype, lba, count))
    return out


def _mbr_partition(disk: _Disk, number: int, entry: _MbrEntry, lba: int) -> Partition:
    ss = disk.sector_size
    return Partition(number, lba * ss, entry.sectors * ss, "0x%02x" % entry.type, None, "",
                     entry.boot == MBR_BOOTABLE)


def _sectors(disk: _Disk, p: Partition) -> str:
    return "sectors %d..%d" % (p.start // disk.sector_size, p.end // disk.sector_size - 1)


def _refuse_overlaps(disk: _Disk, parts: Sequence[Partition], what: str) -> None:
    """Refuse if any two of `parts` overlap (sorted by start, an overlap shows between neighbours)."""
    ordered = sorted(parts, key=lambda p: (p.start, p.number))
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise PartitionError("%s partitions %d (%s) and %d (%s) overlap"
                                 % (what, a.number, _sectors(disk, a), b.number, _sectors(disk, b)))


def _read_mbr(disk: _Disk, sector0: bytes, entries: List[_MbrEntry]) -> Table:
    (disk_id,) = struct.unpack_from("<I", sector0, MBR_DISK_ID_OFFSET)
    primaries = []
    extended = []
    for number, e in enumerate(entries, 1):
        if not e.used:
            continue
        p = _mbr_partition(disk, number, e, e.lba)
        if e.lba + e.sectors > disk.sectors:
            raise PartitionError("MBR partition %d (%s) ends past the end of the disk (%d sectors)"
                                 % (number, _sectors(disk, p), disk.sectors))
        primaries.append(p)
        if e.type in MBR_EXTENDED_TYPES:
            extended.append(p)
    _refuse_overlaps(disk, primaries, "MBR")
    if len(extended) > 1:
        raise PartitionError("MBR has more than one extended partition (%s)"
                             % ", ".join(str(p.number) for p in extended))
    logicals = _read_logicals(disk, extended[0]) if extended else []
    _refuse_overlaps(disk, logicals, "MBR")
    return Table("mbr", "0x%08x" % disk_id, primaries + logicals)


def _read_logicals(disk: _Disk, ext: Partition) -> List[Partition]:
    """The logical partitions of the chain of EBRs that starts at the extended partition's first sector."""
    ss = disk.sector_size
    first, end = ext.start // ss, ext.end // ss
    out = []  # type: List[Partition]
    seen = set()  # type: Set[int]
    ebr = first
    while True:
        if ebr in seen:
            raise PartitionError("loop in the EBR chain of extended partition %d: the EBR at sector %d is "
                                 "reached twice" % (ext.number, ebr))
        if len(seen) == MBR_MAX_EBRS:
            raise PartitionError("extended partition %d has more than %d EBRs in its chain"
                                 % (ext.number, MBR_MAX_EBRS))
        seen.add(ebr)
        sector = disk.read(ebr, ss)
        if sector[MBR_SIGNATURE_OFFSET:MBR_SIGNATURE_OFFSET + 2] != MBR_SIGNATURE:
            break  # the chain ends here, for Linux too (an empty extended partition has no EBR)
        entries = _mbr_entries(sector)
        # As fdisk reads an EBR: the first data entry and the first link, in any of the four slots.
        data = next((e for e in entries if e.used and e.type not in MBR_EXTENDED_TYPES), None)
        link = next((e for e in entries if e.used and e.type in MBR_EXTENDED_TYPES), None)
        if data is not None:
            p = _mbr_partition(disk, MBR_FIRST_LOGICAL + len(out), data, ebr + data.lba)
            if p.start < ext.start or p.end > ext.end:
                raise PartitionError("logical partition %d (%s) lies outside its extended partition %d (%s)"
                                     % (p.number, _sectors(disk, p), ext.number, _sectors(disk, ext)))
            out.append(p)
        if link is None:
            return out
        following = first + link.lba
        if following >= end:
            raise PartitionError("the EBR at sector %d links to sector %d, outside its extended partition %d (%s)"
                                 % (ebr, following, ext.number, _sectors(disk, ext)))
        ebr = following
    return out


# ---- GPT -------------------------------------------------------------------------------------------------------

class _GptHeader(NamedTuple):
    lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entry_count: int
    entry_size: int


def _read_gpt(disk: _Disk) -> Table:
    primary_error = None  # type: Optional[str]
    try:
        header, entries = _read_gpt_copy(disk, GPT_PRIMARY_LBA, "primary")
    except PartitionError as e:
        primary_error = str(e)
        # The primary's AlternateLBA cannot be trusted once it is refused: the backup is where sgdisk and
        # sfdisk look for it then, in the last sector.
        if disk.last_lba <= GPT_PRIMARY_LBA:
            raise
        try:
            header, entries = _read_gpt_copy(disk, disk.last_lba, "backup")
        except PartitionError as b:
            raise PartitionError("%s; and %s" % (primary_error, b)) from None
    parts = _gpt_partitions(disk, header, entries)
    return Table("gpt", str(uuid.UUID(bytes_le=header.disk_guid)), parts, primary_error)


def _read_gpt_copy(disk: _Disk, lba: int, which: str) -> Tuple[_GptHeader, bytes]:
    """The header at `lba` and its entries array, both checked; PartitionError says what is wrong."""
    if lba > disk.last_lba:
        raise PartitionError("%s GPT header at sector %d is past the end of the disk (%d sectors)"
                             % (which, lba, disk.sectors))
    raw = disk.read(lba, disk.sector_size)
    (signature, revision, header_size, header_crc, _reserved, my_lba, alternate_lba, first_usable,
     last_usable, disk_guid, entries_lba, entry_count, entry_size, entries_crc) = GPT_HEADER.unpack_from(raw)
    what = "%s GPT header (sector %d)" % (which, lba)
    if signature != GPT_SIGNATURE:
        raise PartitionError("%s: no 'EFI PART' signature" % what)
    if revision >> 16 != GPT_REVISION_MAJOR:
        raise PartitionError("%s: unsupported revision 0x%08x" % (what, revision))
    if not GPT_HEADER_MIN_BYTES <= header_size <= disk.sector_size:
        raise PartitionError("%s: header size %d outside %d..%d"
                             % (what, header_size, GPT_HEADER_MIN_BYTES, disk.sector_size))
    zeroed = raw[:GPT_HEADER_CRC_OFFSET] + bytes(4) + raw[GPT_HEADER_CRC_OFFSET + 4:header_size]
    crc = zlib.crc32(zeroed) & 0xFFFFFFFF
    if crc != header_crc:
        raise PartitionError("%s: header CRC32 mismatch (stored 0x%08x, computed 0x%08x)" % (what, header_crc, crc))
    if my_lba != lba:
        raise PartitionError("%s: MyLBA is %d, not %d" % (what, my_lba, lba))
    if alternate_lba > disk.last_lba or alternate_lba == lba:
        raise PartitionError("%s: AlternateLBA %d is not another sector of the disk (last sector %d; "
                             "truncated image?)" % (what, alternate_lba, disk.last_lba))
    if last_usable > disk.last_lba:
        raise PartitionError("%s: LastUsableLBA %d is past the disk's last sector %d (truncated image?)"
                             % (what, last_usable, disk.last_lba))
    if first_usable > last_usable:
        raise PartitionError("%s: FirstUsableLBA %d is after LastUsableLBA %d" % (what, first_usable, last_usable))
    if first_usable <= lba <= last_usable:
        raise PartitionError("%s: the header lies in the usable sectors %d..%d" % (what, first_usable, last_usable))
    if not (GPT_ENTRY_MIN_BYTES <= entry_size <= GPT_ENTRY_MAX_BYTES and entry_size & (entry_size - 1) == 0):
        raise PartitionError("%s: entry size %d is not 128 times a power of 2 up to %d bytes"
                             % (what, entry_size, GPT_ENTRY_MAX_BYTES))
    if not 1 <= entry_count <= GPT_MAX_ENTRIES:
        raise PartitionError("%s: entry count %d outside 1..%d" % (what, entry_count, GPT_MAX_ENTRIES))
    array_bytes = entry_count * entry_size
    if array_bytes > GPT_ENTRIES_MAX_BYTES:
        raise PartitionError("%s: entries array of %d bytes is over the limit of %d"
                             % (what, array_bytes, GPT_ENTRIES_MAX_BYTES))
    array_last = entries_lba + -(-array_bytes // disk.sector_size) - 1
    array = "entries array (sectors %d..%d)" % (entries_lba, array_last)
    if entries_lba < 1 or array_last > disk.last_lba:
        raise PartitionError("%s: %s is outside the disk (last sector %d)" % (what, array, disk.last_lba))
    if entries_lba <= lba <= array_last:
        raise PartitionError("%s: %s covers the header" % (what, array))
    if entries_lba <= last_usable and first_usable <= array_last:
        raise PartitionError("%s: %s overlaps the usable sectors %d..%d" % (what, array, first_usable, last_usable))
    entries = disk.read(entries_lba, array_bytes)
    crc = zlib.crc32(entries) & 0xFFFFFFFF
    if crc != entries_crc:
        raise PartitionError("%s: entries array CRC32 mismatch (stored 0x%08x, computed 0x%08x)"
                             % (what, entries_crc, crc))
    return _GptHeader(lba, first_usable, last_usable, disk_guid, entry_count, entry_size), entries


def _gpt_partitions(disk: _Disk, h: _GptHeader, entries: bytes) -> List[Partition]:
    ss = disk.sector_size
    parts = []
    for index in range(h.entry_count):
        type_guid, part_guid, first, last, attributes, name = GPT_ENTRY.unpack_from(entries, index * h.entry_size)
        if type_guid == _GUID_ZERO:
            continue  # an unused entry
        number = index + 1
        where = "GPT partition %d (sectors %d..%d)" % (number, first, last)
        if last < first:
            raise PartitionError("%s ends before it starts" % where)
        if last > disk.last_lba:
            raise PartitionError("%s ends past the end of the disk (last sector %d)" % (where, disk.last_lba))
        if first < h.first_usable or last > h.last_usable:
            raise PartitionError("%s lies outside the usable sectors %d..%d" % (where, h.first_usable, h.last_usable))
        parts.append(Partition(number, first * ss, (last - first + 1) * ss, str(uuid.UUID(bytes_le=type_guid)),
                               str(uuid.UUID(bytes_le=part_guid)), _gpt_name(name),
                               bool(attributes & GPT_ATTR_LEGACY_BIOS_BOOTABLE)))
    _refuse_overlaps(disk, parts, "GPT")
    return parts


def _gpt_name(raw: bytes) -> str:
    """The entry's name: UTF-16LE up to its first NUL; a broken surrogate becomes U+FFFD."""
    name = raw.decode("utf-16-le", "replace")
    end = name.find("\x00")
    return name if end < 0 else name[:end]
