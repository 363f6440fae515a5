"""Partition tables of untrusted disk images (tenbox_vmm.disk.partitions), judged by util-linux's sfdisk and fdisk.

Good tables are made by sfdisk (fdisk for 4096-byte sectors: this sfdisk has
no --sector-size) and read back by both; hostile ones are those images with
bytes patched from the UEFI and MBR layouts, CRCs recomputed where the test
aims at a later check. Without sfdisk/fdisk (Debian's package `fdisk`) the
tests fail, they do not skip.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tenbox_vmm.disk.partitions import (
    GPT_ENTRIES_MAX_BYTES,
    GPT_TYPE_BIOS_BOOT,
    GPT_TYPE_EFI_SYSTEM,
    GPT_TYPE_ROOT_X86_64,
    GPT_TYPE_XBOOTLDR,
    MBR_MAX_EBRS,
    MBR_TYPE_LINUX,
    Partition,
    PartitionError,
    Table,
    read_table,
)

MIB = 1 << 20
TOOL_TIMEOUT_SEC = 60.0

# The layouts, from the UEFI specification (5.3) and the MBR, written here independently of the module.
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_FIELDS = ("signature", "revision", "header_size", "header_crc", "reserved", "my_lba", "alternate_lba",
              "first_usable", "last_usable", "disk_guid", "entries_lba", "entry_count", "entry_size", "entries_crc")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_ENTRY_FIELDS = ("type", "uuid", "first", "last", "attrs", "name")
MBR_SLOT = struct.Struct("<B3sB3sII")
MBR_SLOT_FIELDS = ("boot", "chs", "type", "chs_end", "lba", "count")
# The most read_table may read: two GPT entry arrays and headers, or an MBR and a full chain of EBRs.
READ_BOUND_BYTES = 2 * GPT_ENTRIES_MAX_BYTES + (MBR_MAX_EBRS + 3) * 4096


@pytest.fixture(scope="module", autouse=True)
def util_linux_tools():
    """sfdisk and fdisk, the judges of partition tables: without them the tests fail, they do not skip."""
    missing = [t for t in ("sfdisk", "fdisk") if shutil.which(t) is None]
    if missing:
        pytest.fail("%s missing: install Debian's fdisk package (the partition-table oracle)" % ", ".join(missing))


def _run(argv: List[str], stdin: str = "") -> str:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SEC)
    assert r.returncode == 0, "%s exited %d:\n%s%s" % (" ".join(argv), r.returncode, r.stdout, r.stderr)
    return r.stdout


class Image:
    """A disk image made by sfdisk/fdisk, patched in memory, read as tenbox reads a virtual disk."""

    def __init__(self, path: Path, sector_size: int = 512) -> None:
        self.path = path
        self.ss = sector_size
        self.data = bytearray(path.read_bytes())
        self.bytes_read = 0

    @property
    def last_lba(self) -> int:
        return len(self.data) // self.ss - 1

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and length > 0 and offset + length <= len(self.data), (offset, length)
        self.bytes_read += length
        assert self.bytes_read <= READ_BOUND_BYTES, "read_table reads without end"
        return bytes(self.data[offset:offset + length])

    def table(self) -> Table:
        self.bytes_read = 0
        return read_table(self.read, len(self.data), self.ss)

    def refusal(self) -> str:
        """read_table's refusal: one line."""
        with pytest.raises(PartitionError) as e:
            self.table()
        message = str(e.value)
        assert "\n" not in message
        return message

    def save(self) -> Path:
        self.path.write_bytes(bytes(self.data))
        return self.path

    # -- GPT -----------------------------------------------------------------------------------------------------

    def gpt_header(self, lba: int) -> Dict:
        return dict(zip(GPT_FIELDS, GPT_HEADER.unpack_from(self.data, lba * self.ss)))

    def put_gpt_header(self, lba: int, h: Dict) -> None:
        """Write header `h` at `lba` with its CRC made right (over 92 bytes if its own size is absurd)."""
        at = lba * self.ss
        GPT_HEADER.pack_into(self.data, at, *[h[f] for f in GPT_FIELDS])
        size = h["header_size"] if 92 <= h["header_size"] <= self.ss else 92
        struct.pack_into("<I", self.data, at + 16, 0)
        struct.pack_into("<I", self.data, at + 16, zlib.crc32(self.data[at:at + size]))

    def patch_gpt(self, lba: int, **fields) -> None:
        """Set header fields of the GPT copy at `lba`, its header CRC recomputed."""
        h = self.gpt_header(lba)
        h.update(fields)
        self.put_gpt_header(lba, h)

    def patch_gpt_entry(self, lba: int, index: int, **fields) -> None:
        """Set fields of entry `index` of the GPT copy at `lba`, with both CRCs recomputed."""
        h = self.gpt_header(lba)
        array = h["entries_lba"] * self.ss
        at = array + index * h["entry_size"]
        e = dict(zip(GPT_ENTRY_FIELDS, GPT_ENTRY.unpack_from(self.data, at)))
        e.update(fields)
        GPT_ENTRY.pack_into(self.data, at, *[e[f] for f in GPT_ENTRY_FIELDS])
        h["entries_crc"] = zlib.crc32(self.data[array:array + h["entry_count"] * h["entry_size"]])
        self.put_gpt_header(lba, h)

    def gpt_entry(self, lba: int, index: int) -> Dict:
        h = self.gpt_header(lba)
        return dict(zip(GPT_ENTRY_FIELDS, GPT_ENTRY.unpack_from(
            self.data, h["entries_lba"] * self.ss + index * h["entry_size"])))

    def flip(self, offset: int) -> None:
        self.data[offset] ^= 0xFF

    # -- MBR -----------------------------------------------------------------------------------------------------

    def slot(self, sector: int, slot: int) -> Dict:
        """Slot 0-3 of the MBR or EBR in `sector`."""
        return dict(zip(MBR_SLOT_FIELDS, MBR_SLOT.unpack_from(self.data, sector * self.ss + 446 + 16 * slot)))

    def patch_slot(self, sector: int, slot: int, **fields) -> None:
        s = self.slot(sector, slot)
        s.update(fields)
        MBR_SLOT.pack_into(self.data, sector * self.ss + 446 + 16 * slot, *[s[f] for f in MBR_SLOT_FIELDS])

    def write_ebr(self, lba: int, data: Optional[tuple], link: Optional[tuple]) -> None:
        """An EBR at `lba`: a data entry (type, start from this EBR, count) and a link (start from the
        extended partition, count), each optional."""
        at = lba * self.ss
        self.data[at:at + 512] = bytes(512)
        if data is not None:
            MBR_SLOT.pack_into(self.data, at + 446, 0, bytes(3), data[0], bytes(3), data[1], data[2])
        if link is not None:
            MBR_SLOT.pack_into(self.data, at + 462, 0, bytes(3), 0x05, bytes(3), link[0], link[1])
        self.data[at + 510:at + 512] = b"\x55\xaa"

    def ebr_chain(self) -> List[int]:
        """The sectors of the EBRs of the extended partition in slot 3, following the links (test images only)."""
        ext = self.slot(0, 2)
        assert ext["type"] == 0x05
        chain = [ext["lba"]]
        while True:
            link = self.slot(chain[-1], 1)
            if link["type"] == 0:
                return chain
            chain.append(ext["lba"] + link["lba"])


def _sfdisk_image(tmp_path: Path, script: str, size: int = 16 * MIB, name: str = "disk.img") -> Image:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    _run(["sfdisk", "-q", str(path)], script.replace("DISK", str(path)))
    return Image(path)


def _sfdisk_table(path: Path) -> Table:
    """What sfdisk --json reads from the image at `path`, as a Table (sectors become bytes)."""
    pt = json.loads(_run(["sfdisk", "--json", str(path)]))["partitiontable"]
    ss = pt["sectorsize"]
    parts = []
    for p in pt.get("partitions", []):
        number = int(re.search(r"(\d+)$", p["node"]).group(1))
        if pt["label"] == "gpt":
            parts.append(Partition(number, p["start"] * ss, p["size"] * ss, p["type"].lower(), p["uuid"].lower(),
                                   p.get("name", ""), "LegacyBIOSBootable" in p.get("attrs", "")))
        else:
            parts.append(Partition(number, p["start"] * ss, p["size"] * ss, "0x%02x" % int(p["type"], 16), None, "",
                                   bool(p.get("bootable", False))))
    kind = {"gpt": "gpt", "dos": "mbr"}[pt["label"]]
    return Table(kind, pt["id"].lower(), sorted(parts, key=lambda p: p.number))


DOS_SCRIPT = """label: dos
label-id: 0x1234abcd
DISK1 : start=2048, size=4096, type=83, bootable
DISK2 : size=2048, type=82
DISK3 : size=16384, type=5
DISK4 : size=4096, type=ef
DISK5 : size=2048, type=83
DISK6 : size=2048, type=c
DISK7 : size=4096, type=83
"""

GPT_SCRIPT = """label: gpt
label-id: 01234567-89AB-CDEF-0123-456789ABCDEF
DISK1 : size=1M, type=21686148-6449-6E6F-744E-656564454649, name="bios"
DISK2 : size=3M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI System", uuid=11111111-2222-3333-4444-555555555555
DISK3 : size=3M, type=BC13C2FF-59E6-4262-A352-B275FD6F7172, name="boot", attrs="LegacyBIOSBootable"
DISK5 : size=6M, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root ü €"
"""


@pytest.fixture
def dos(tmp_path) -> Image:
    """Three primaries (the first bootable), an extended partition with three logicals."""
    return _sfdisk_image(tmp_path, DOS_SCRIPT)


@pytest.fixture
def gpt(tmp_path) -> Image:
    """BIOS boot, EFI system, XBOOTLDR (legacy-BIOS-bootable), x86-64 root as partition 5 (entry 4 unused)."""
    return _sfdisk_image(tmp_path, GPT_SCRIPT)


# ---- good tables, read as sfdisk reads them -------------------------------------------------------------------

def test_dos_table_reads_as_sfdisk_reads_it(dos):
    """Primaries 1-4 with the bootable flag, the extended partition itself, logicals numbered from 5."""
    t = dos.table()
    assert t == _sfdisk_table(dos.path)
    assert t.kind == "mbr" and t.disk_id == "0x1234abcd"
    assert [p.number for p in t.partitions] == [1, 2, 3, 4, 5, 6, 7]
    assert [p.bootable for p in t.partitions] == [True] + [False] * 6
    assert [p.number for p in t.of_type(MBR_TYPE_LINUX)] == [1, 5, 7]
    assert t.partitions[0] == Partition(1, 2048 * 512, 4096 * 512, "0x83", None, "", True)


def test_gpt_table_reads_as_sfdisk_reads_it(gpt):
    """Types, partition GUIDs, UTF-16 names, the legacy BIOS bootable attribute, and Linux's numbering."""
    t = gpt.table()
    assert t == _sfdisk_table(gpt.path)
    assert t.kind == "gpt" and t.disk_id == "01234567-89ab-cdef-0123-456789abcdef" and t.primary_error is None
    assert [p.number for p in t.partitions] == [1, 2, 3, 5]
    assert [p.type for p in t.partitions] == [GPT_TYPE_BIOS_BOOT, GPT_TYPE_EFI_SYSTEM, GPT_TYPE_XBOOTLDR,
                                              GPT_TYPE_ROOT_X86_64]
    esp = t.of_type(GPT_TYPE_EFI_SYSTEM)[0]
    assert (esp.uuid, esp.name, esp.start, esp.size) == ("11111111-2222-3333-4444-555555555555", "EFI System",
                                                         2 * MIB, 3 * MIB)
    assert t.partitions[3].name == "root ü €"
    assert [p.bootable for p in t.partitions] == [False, False, True, False]


def test_empty_dos_label_has_no_partitions(tmp_path):
    img = _sfdisk_image(tmp_path, "label: dos\nlabel-id: 0xfeedf00d\n")
    assert img.table() == Table("mbr", "0xfeedf00d", []) == _sfdisk_table(img.path)


FDISK_COLUMNS = {"gpt": "Device,Start,End,Sectors,Type-UUID,UUID,Name,Attrs", "dos": "Device,Boot,Start,End,Sectors,Id"}


def _fdisk_4k_table(path: Path, label: str) -> Table:
    """`fdisk -b 4096 -l` of the image (sfdisk --json cannot be told the sector size), as a Table."""
    out = _run(["fdisk", "-b", "4096", "-l", "-o", FDISK_COLUMNS[label], str(path)])
    assert re.search(r"^Disklabel type: (\S+)$", out, re.M).group(1) == label
    disk_id = re.search(r"^Disk identifier: (\S+)$", out, re.M).group(1).lower()
    parts = []
    for line in out.splitlines():
        if not line.startswith(str(path)):
            continue
        words = line.split()
        number = int(words.pop(0)[len(str(path)):])
        if label == "gpt":  # every partition is named, so only Attrs may be empty
            start, _end, sectors, ptype, puuid, name, *attrs = words
            parts.append(Partition(number, int(start) * 4096, int(sectors) * 4096, ptype.lower(), puuid.lower(),
                                   name, attrs == ["LegacyBIOSBootable"]))
        else:
            boot = words[0] == "*"
            start, _end, sectors, pid = words[1:] if boot else words
            parts.append(Partition(number, int(start) * 4096, int(sectors) * 4096, "0x%02x" % int(pid, 16), None,
                                   "", boot))
    return Table({"gpt": "gpt", "dos": "mbr"}[label], disk_id, parts)


# fdisk's dialogue: gpt with an ESP, a BIOS boot partition (legacy BIOS bootable) and a Linux one, all named;
# dos with a bootable primary, an extended partition and two logicals.
FDISK_4K = {
    "gpt": ("g\n"
            "n\n1\n\n+2M\nt\nC12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
            "n\n2\n\n+1M\nt\n2\n21686148-6449-6E6F-744E-656564454649\n"
            "n\n3\n\n\n"
            "x\nn\n1\nESP\nn\n2\nbios\nn\n3\nroot\nA\n2\nr\nw\n"),
    "dos": "o\nn\np\n1\n\n+2M\na\nn\ne\n2\n\n\nn\nl\n\n+2M\nn\nl\n\n+4M\nw\n",
}


@pytest.mark.parametrize("label", sorted(FDISK_4K))
def test_4096_byte_sectors_read_as_fdisk_reads_them(tmp_path, label):
    """LBAs count 4096-byte sectors; the same image read with 512-byte sectors is not the same table."""
    path = tmp_path / "disk4k.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    _run(["fdisk", "-b", "4096", str(path)], FDISK_4K[label])
    img = Image(path, 4096)
    expected = _fdisk_4k_table(path, label)
    assert len(expected.partitions) >= 3
    assert img.table() == expected
    if label == "gpt":
        assert "no 'EFI PART' signature" in Image(path, 512).refusal()
    else:
        assert Image(path, 512).table().partitions[0].start == 256 * 512


def test_zero_size_mbr_slots_are_unused_as_linux_sees_them(dos):
    """A slot with no sectors is not a partition (Linux skips it; sfdisk lists it with size 0); the others keep
    their numbers. A slot of type 0 with sectors is one, for Linux and sfdisk alike."""
    dos.patch_slot(0, 1, count=0)
    dos.patch_slot(0, 3, type=0)
    t = dos.table()
    assert [p.number for p in t.partitions] == [1, 3, 4, 5, 6, 7] and t.partitions[2].type == "0x00"
    sfdisk = _sfdisk_table(dos.save())
    assert t.partitions == [p for p in sfdisk.partitions if p.size]


def _whole_disk_ext4(img: Image) -> None:
    _run(["mkfs.ext4", "-q", "-F", str(img.path)])
    img.data = bytearray(img.path.read_bytes())


@pytest.mark.parametrize("case", ["zeros", "ext4", "gpt-without-0x55aa", "fat-boot-indicator"])
def test_disk_without_a_table_is_kind_none(tmp_path, case):
    """No 0x55AA (a GPT without its protective MBR too, as Linux), or a boot indicator that is not 0/0x80."""
    img = _sfdisk_image(tmp_path, GPT_SCRIPT if case != "fat-boot-indicator" else DOS_SCRIPT)
    if case == "zeros":
        img.data = bytearray(len(img.data))
    elif case == "ext4":
        if shutil.which("mkfs.ext4") is None:
            pytest.fail("mkfs.ext4 missing: install e2fsprogs")
        _whole_disk_ext4(img)
    elif case == "gpt-without-0x55aa":
        img.data[510:512] = b"\0\0"
    else:
        img.patch_slot(0, 2, boot=0x29)
    assert img.table() == Table("none", "", [])


def test_tiny_disks_are_read_within_their_size(tmp_path):
    """A disk smaller than a sector has no table; a protective MBR on a one-sector disk is refused."""
    assert read_table(lambda o, n: bytes(n), 100) == Table("none", "", [])
    img = _sfdisk_image(tmp_path, GPT_SCRIPT)
    img.data = img.data[:512]
    assert "past the end of the disk" in img.refusal()


# ---- GPT: damaged copies ---------------------------------------------------------------------------------------

def test_gpt_with_a_bad_primary_header_crc_is_read_from_its_backup_as_sfdisk_does(gpt):
    good = gpt.table()
    gpt.flip(512 + 60)  # a byte of the disk GUID: the header CRC no longer matches
    t = gpt.table()
    assert t.primary_error.startswith("primary GPT header (sector 1): header CRC32 mismatch")
    assert t.partitions == good.partitions and t.disk_id == good.disk_id
    assert t._replace(primary_error=None) == _sfdisk_table(gpt.save())


def test_gpt_with_a_bad_primary_entries_crc_is_read_from_its_backup_as_sfdisk_does(gpt):
    good = gpt.table()
    gpt.flip(2 * 512 + 56)  # the first letter of entry 1's name
    t = gpt.table()
    assert "primary GPT header (sector 1): entries array CRC32 mismatch" in t.primary_error
    assert t.partitions == good.partitions
    assert t._replace(primary_error=None) == _sfdisk_table(gpt.save())


@pytest.mark.parametrize("damage,cause", [
    ("header", "primary GPT header (sector 1): header CRC32 mismatch"),
    ("entries", "primary GPT header (sector 1): entries array CRC32 mismatch"),
])
def test_gpt_with_both_copies_damaged_is_refused_naming_the_primary_cause(gpt, damage, cause):
    backup = gpt.gpt_header(gpt.last_lba)
    if damage == "header":
        gpt.flip(512 + 60)
        gpt.flip(gpt.last_lba * 512 + 60)
    else:
        gpt.flip(2 * 512 + 56)
        gpt.flip(backup["entries_lba"] * 512 + 56)
    message = gpt.refusal()
    assert message.startswith(cause)
    assert "backup GPT header (sector %d)" % gpt.last_lba in message


def test_gpt_primary_refused_for_a_huge_entry_count_is_read_from_its_backup(gpt):
    """An absurd primary that passes its CRC is still a damaged primary: the backup is used, nothing big is read."""
    gpt.patch_gpt(1, entry_count=0xFFFFFFFF)
    t = gpt.table()
    assert "entry count 4294967295 outside 1..1024" in t.primary_error
    assert t.partitions == _sfdisk_table(gpt.save()).partitions
    assert gpt.bytes_read <= 3 * 512 + 2 * 128 * 128


def test_truncated_gpt_image_is_refused(gpt):
    """The disk is smaller than the GPT claims: the primary points past its end and the backup is gone."""
    gpt.data = gpt.data[:len(gpt.data) // 2]
    message = gpt.refusal()
    assert message.startswith("primary GPT header (sector 1): AlternateLBA %d" % (2 * (gpt.last_lba + 1) - 1))
    assert "truncated image?" in message
    assert "backup GPT header (sector %d): no 'EFI PART' signature" % gpt.last_lba in message


# The primary's fields one at a time (the backup wiped, so the refusal is the primary's): value, the cause named.
ABSURD_HEADERS = [
    ({"signature": b"EFI PARX"}, "no 'EFI PART' signature"),
    ({"revision": 0x00020000}, "unsupported revision 0x00020000"),
    ({"header_size": 91}, "header size 91 outside 92..512"),
    ({"header_size": 0xFFFFFFFF}, "header size 4294967295 outside 92..512"),
    ({"my_lba": 2}, "MyLBA is 2"),
    ({"alternate_lba": 2 ** 64 - 1}, "AlternateLBA 18446744073709551615 is not another sector of the disk"),
    ({"alternate_lba": 1}, "AlternateLBA 1 is not another sector"),
    ({"last_usable": 2 ** 64 - 1}, "LastUsableLBA 18446744073709551615 is past the disk's last sector"),
    ({"first_usable": 32767}, "FirstUsableLBA 32767 is after LastUsableLBA 32734"),
    ({"first_usable": 1}, "the header lies in the usable sectors 1.."),
    ({"entry_size": 0}, "entry size 0 is not 128 times a power of 2"),
    ({"entry_size": 136}, "entry size 136 is not 128 times a power of 2"),
    ({"entry_size": 8192}, "entry size 8192 is not 128 times a power of 2 up to 4096 bytes"),
    ({"entry_size": 0x80000000}, "entry size 2147483648"),
    ({"entry_count": 0}, "entry count 0 outside 1..1024"),
    ({"entry_count": 1025}, "entry count 1025 outside 1..1024"),
    ({"entry_count": 1024, "entry_size": 4096}, "entries array of 4194304 bytes is over the limit of 1048576"),
    ({"entries_lba": 2 ** 64 - 1}, "is outside the disk"),
    ({"entries_lba": 0}, "entries array (sectors 0..31) is outside the disk"),
    ({"entries_lba": 1}, "entries array (sectors 1..32) covers the header"),
    ({"entries_lba": 2048}, "entries array (sectors 2048..2079) overlaps the usable sectors 2048.."),
    ({"entries_crc": 0x12345678}, "entries array CRC32 mismatch (stored 0x12345678"),
]


@pytest.mark.parametrize("fields,cause", ABSURD_HEADERS, ids=[c for _f, c in ABSURD_HEADERS])
def test_absurd_gpt_header_is_refused_naming_the_field(gpt, fields, cause):
    gpt.data[gpt.last_lba * 512:] = bytes(512)
    gpt.patch_gpt(1, **fields)
    message = gpt.refusal()
    assert message.startswith("primary GPT header (sector 1): ")
    assert cause in message
    assert gpt.bytes_read <= 3 * 512 + 32 * 512  # the MBR, both headers, the entries array at most


def test_absurd_backup_header_is_refused_too(gpt):
    """The backup is checked as strictly as the primary: MyLBA, entry count."""
    gpt.flip(512 + 60)
    gpt.patch_gpt(gpt.last_lba, entry_count=100000)
    message = gpt.refusal()
    assert "backup GPT header (sector %d): entry count 100000 outside 1..1024" % gpt.last_lba in message


# ---- GPT: hostile entries (in a sound primary, so that copy is the one used) -----------------------------------

def _entry_lbas(gpt: Image, index: int):
    e = gpt.gpt_entry(1, index)
    return e["first"], e["last"]


def test_overlapping_gpt_entries_are_refused(gpt):
    first, last = _entry_lbas(gpt, 1)
    gpt.patch_gpt_entry(1, 2, first=last)  # partition 3 starts on partition 2's last sector
    assert gpt.refusal().startswith("GPT partitions 2 (sectors %d..%d) and 3 (sectors %d.." % (first, last, last))


def test_gpt_entry_inside_another_is_refused(gpt):
    first, last = _entry_lbas(gpt, 4)
    gpt.patch_gpt_entry(1, 10, type=bytes(range(16)), first=first + 8, last=first + 9)
    message = gpt.refusal()
    assert "GPT partitions 5" in message and "and 11 (sectors %d..%d) overlap" % (first + 8, first + 9) in message


@pytest.mark.parametrize("where,cause", [
    ("past-disk", "ends past the end of the disk"),
    ("past-usable", "lies outside the usable sectors"),
    ("before-usable", "lies outside the usable sectors"),
    ("reversed", "ends before it starts"),
    ("huge", "ends past the end of the disk"),
])
def test_gpt_entry_outside_the_disk_or_usable_area_is_refused(gpt, where, cause):
    h = gpt.gpt_header(1)
    first, last = _entry_lbas(gpt, 4)
    bounds = {
        "past-disk": (first, gpt.last_lba + 10),
        "past-usable": (first, h["last_usable"] + 1),
        "before-usable": (h["first_usable"] - 1, h["first_usable"]),
        "reversed": (last, first),
        "huge": (2 ** 63, 2 ** 64 - 1),
    }[where]
    gpt.patch_gpt_entry(1, 4, first=bounds[0], last=bounds[1])
    message = gpt.refusal()
    assert message.startswith("GPT partition 5 (sectors %d..%d) " % bounds)
    assert cause in message


# ---- MBR: hostile tables ---------------------------------------------------------------------------------------

def test_mbr_partition_past_the_end_of_the_disk_is_refused(dos):
    dos.patch_slot(0, 3, count=0xFFFFFFFF)
    assert dos.refusal().startswith("MBR partition 4 (sectors ")
    assert "ends past the end of the disk (32768 sectors)" in dos.refusal()


def test_overlapping_mbr_primaries_are_refused(dos):
    p1 = dos.slot(0, 0)
    dos.patch_slot(0, 1, lba=p1["lba"] + p1["count"] - 1)
    assert "MBR partitions 1 (sectors 2048..6143) and 2 (sectors 6143.." in dos.refusal()


def test_two_extended_partitions_are_refused(dos):
    dos.patch_slot(0, 3, type=0x0F)
    assert dos.refusal() == "MBR has more than one extended partition (3, 4)"


@pytest.mark.parametrize("to", ["itself", "back"])
def test_mbr_extended_partition_loop_is_refused(dos, to):
    """An EBR linking to itself, or the last EBR back to the second: refused, not followed forever."""
    chain = dos.ebr_chain()
    ext = chain[0]
    assert len(chain) == 3
    if to == "itself":
        dos.patch_slot(ext, 1, type=0x05, lba=0, count=10)
        looped = ext
    else:
        dos.patch_slot(chain[2], 1, type=0x05, lba=chain[1] - ext, count=10)
        looped = chain[1]
    assert dos.refusal() == ("loop in the EBR chain of extended partition 3: the EBR at sector %d is reached twice"
                             % looped)


def _chain_of_ebrs(tmp_path, count: int) -> Image:
    """An sfdisk-made extended partition over the disk holding a hand-made chain of `count` EBRs, each with a
    one-sector logical partition after it."""
    img = _sfdisk_image(tmp_path, "label: dos\nDISK1 : start=2048, type=5\n")
    ext = img.slot(0, 0)["lba"]
    for k in range(count):
        img.write_ebr(ext + 2 * k, (0x83, 1, 1), (2 * (k + 1), 2) if k + 1 < count else None)
    return img


def test_ebr_chain_up_to_the_bound_is_read(tmp_path):
    img = _chain_of_ebrs(tmp_path, MBR_MAX_EBRS)
    t = img.table()
    logicals = t.partitions[1:]
    assert [p.number for p in logicals] == list(range(5, 5 + MBR_MAX_EBRS))
    assert [p.start // 512 for p in logicals] == [2048 + 2 * k + 1 for k in range(MBR_MAX_EBRS)]
    # sfdisk shows 60 partitions at most: judge the chain's making on a shorter one
    short = _chain_of_ebrs(tmp_path, 40)
    assert short.table() == _sfdisk_table(short.save())


def test_ebr_chain_longer_than_the_bound_is_refused(tmp_path):
    img = _chain_of_ebrs(tmp_path, MBR_MAX_EBRS + 1)
    assert img.refusal() == "extended partition 1 has more than %d EBRs in its chain" % MBR_MAX_EBRS
    assert img.bytes_read == (1 + MBR_MAX_EBRS) * 512


@pytest.mark.parametrize("what", ["data-past-end", "data-before-start", "link-past-end"])
def test_logical_partition_outside_its_extended_partition_is_refused(dos, what):
    chain = dos.ebr_chain()
    ext = dos.slot(0, 2)
    ext_sectors = "sectors %d..%d" % (ext["lba"], ext["lba"] + ext["count"] - 1)
    if what == "data-past-end":
        dos.patch_slot(chain[1], 0, count=ext["count"])
        cause = "logical partition 6 (sectors %d..%d) lies outside its extended partition 3 (%s)" % (
            chain[1] + 2048, chain[1] + 2047 + ext["count"], ext_sectors)
    elif what == "data-before-start":
        # An EBR's data entry is relative to the EBR: 2**32-1 wraps nowhere, it lands far past the disk.
        dos.patch_slot(chain[0], 0, lba=0xFFFFFFFF)
        cause = "logical partition 5 (sectors %d.." % (chain[0] + 0xFFFFFFFF)
    else:
        dos.patch_slot(chain[1], 1, lba=ext["count"])
        cause = "the EBR at sector %d links to sector %d, outside its extended partition 3 (%s)" % (
            chain[1], ext["lba"] + ext["count"], ext_sectors)
    assert dos.refusal().startswith(cause)


def test_overlapping_logical_partitions_are_refused(dos):
    chain = dos.ebr_chain()
    dos.patch_slot(chain[0], 0, count=chain[1] - chain[0] + 2048 + 1)
    assert dos.refusal().startswith("MBR partitions 5 (sectors ")
    assert "and 6 (sectors " in dos.refusal()


# ---- anything at all --------------------------------------------------------------------------------------------

EDGE_VALUES = (0, 1, 2, 33, 34, 2047, 2048, 32767, 32768, 0xFFFFFFFF, 2 ** 63, 2 ** 64 - 1)


def _mutate_gpt(img: Image, rng: random.Random) -> None:
    lba = rng.choice((1, img.last_lba))
    kind = rng.random()
    if kind < 0.4:
        field = rng.choice(("revision", "header_size", "my_lba", "alternate_lba", "first_usable", "last_usable",
                            "entries_lba", "entry_count", "entry_size"))
        value = rng.choice(EDGE_VALUES + (img.last_lba, img.last_lba - 1, 128, 256, 4096, 1024))
        if field in ("revision", "header_size", "entry_count", "entry_size"):
            value &= 0xFFFFFFFF
        img.patch_gpt(lba, **{field: value})
    elif kind < 0.8:
        field = rng.choice(("first", "last", "type"))
        value = rng.choice(EDGE_VALUES + (img.last_lba, img.last_lba - 33, 2048 + rng.randrange(30000)))
        index = rng.randrange(8)
        h = img.gpt_header(lba)
        if h["entry_size"] >= 128 and (h["entries_lba"] * 512 + (index + 1) * h["entry_size"]) <= len(img.data):
            img.patch_gpt_entry(lba, index, **{field: bytes(16) if field == "type" else value})
    else:
        img.data[rng.randrange(34 * 512)] = rng.randrange(256)


def _mutate_dos(img: Image, rng: random.Random, chain: List[int]) -> None:
    lba = rng.choice([0] + chain)
    field = rng.choice(("boot", "type", "lba", "count"))
    value = {"boot": rng.choice((0, 0x80, 1)), "type": rng.choice((0, 0x05, 0x0F, 0x85, 0x83, 0xEE))}.get(
        field, rng.choice(EDGE_VALUES + (chain[-1], chain[-1] - chain[0], 16384)) & 0xFFFFFFFF)
    img.patch_slot(lba, rng.randrange(4), **{field: value})


def _no_overlaps(parts: List[Partition]) -> bool:
    ordered = sorted(parts, key=lambda p: p.start)
    return all(a.end <= b.start for a, b in zip(ordered, ordered[1:]))


def _assert_sound(t: Table, size: int) -> None:
    """What a Table promises: partitions inside the disk, distinct numbers, no overlaps; for MBR, logicals inside
    the one extended partition and no protective (0xEE) primary."""
    numbers = [p.number for p in t.partitions]
    assert len(set(numbers)) == len(numbers)
    for p in t.partitions:
        assert p.size > 0 and 0 <= p.start and p.end <= size and p.start % 512 == 0 and p.size % 512 == 0
    if t.kind == "gpt":
        assert _no_overlaps(t.partitions)
        return
    primaries = [p for p in t.partitions if p.number < 5]
    logicals = [p for p in t.partitions if p.number >= 5]
    assert _no_overlaps(primaries) and _no_overlaps(logicals)
    assert all(p.type != "0xee" for p in primaries)
    extended = [p for p in primaries if p.type in ("0x05", "0x0f", "0x85")]
    assert len(extended) == 1 if logicals else len(extended) <= 1
    assert all(extended[0].start <= p.start and p.end <= extended[0].end for p in logicals)


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_any_mutation_of_a_table_gives_a_sound_table_or_one_refusal(tmp_path, label):
    """Seeded mutations (header fields with CRCs made right, entries, raw bytes): read_table returns a sound
    table or refuses in one line; never another exception, a read outside the disk or an unbounded read."""
    base = _sfdisk_image(tmp_path, GPT_SCRIPT if label == "gpt" else DOS_SCRIPT)
    chain = base.ebr_chain() if label == "dos" else []
    pristine = bytes(base.data)
    rng = random.Random(18)
    outcomes = {"table": 0, "refused": 0}
    for _ in range(400):
        base.data[:] = pristine
        for _m in range(rng.randint(1, 4)):
            if label == "gpt":
                _mutate_gpt(base, rng)
            else:
                _mutate_dos(base, rng, chain)
        try:
            t = base.table()
        except PartitionError as e:
            assert "\n" not in str(e) and str(e)
            outcomes["refused"] += 1
        else:
            _assert_sound(t, len(base.data))
            outcomes["table"] += 1
    assert outcomes["table"] > 20 and outcomes["refused"] > 20, outcomes
