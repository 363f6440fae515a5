"""The test guests build reproducibly into bzImages and ELFs that say what the boot protocol needs.

These read the built files only (tests/guests/README.md describes the guests);
booting them is the integration tests' job.
"""

import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

GUESTS_DIR = Path(__file__).resolve().parents[1] / "guests"
GUESTS = ["boot", "acpi", "smp", "poweroff", "reset", "echo", "idle", "pio", "blk", "net", "count"]
IMAGE_BASE = 0x100000
ENTRY64 = IMAGE_BASE + 0x200


def _load_mkbzimage():
    spec = importlib.util.spec_from_file_location("mkbzimage", GUESTS_DIR / "tools" / "mkbzimage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mkbzimage = _load_mkbzimage()


def _build(out: Path) -> None:
    missing = [t for t in ("make", "gcc", "ld", "objcopy") if shutil.which(t) is None]
    if missing:
        pytest.fail("no %s to build the test guests with (make deps)" % ", ".join(missing))
    r = subprocess.run(["make", "-s", "-C", str(GUESTS_DIR), "OUT=%s" % out], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("guests")
    _build(out)
    return out


def u8(b, off):
    return b[off]


def u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


@pytest.mark.parametrize("name", GUESTS)
def test_bzimage_setup_header_promises_a_64bit_kernel_at_1mib(built, name):
    """Header fields a loader reads: magic, protocol 2.15, sizes, 64-bit entry, load address, limits."""
    img = (built / ("%s.bzImage" % name)).read_bytes()
    assert u16(img, 0x1FE) == 0xAA55
    assert img[0x202:0x206] == b"HdrS"
    assert u16(img, 0x206) == 0x020F
    setup_sects = u8(img, 0x1F1)
    assert setup_sects >= 1
    payload = len(img) - (setup_sects + 1) * 512
    assert payload > 0 and payload % 16 == 0
    assert u32(img, 0x1F4) == payload // 16  # syssize
    assert u8(img, 0x211) & 0x01  # LOADED_HIGH
    assert u32(img, 0x214) == IMAGE_BASE  # code32_start
    assert u32(img, 0x22C) == 0x7FFFFFFF  # initrd_addr_max
    assert u32(img, 0x230) == 0x200000  # kernel_alignment
    assert u8(img, 0x234) == 0  # not relocatable
    assert u16(img, 0x236) & 0x01  # XLF_KERNEL_64
    assert u32(img, 0x238) == 2047  # cmdline_size
    assert u64(img, 0x258) == IMAGE_BASE  # pref_address
    init_size = u32(img, 0x260)
    assert init_size % 4096 == 0 and init_size >= payload
    # The 2-byte jump at 0x200 lands past the end of the 2.15 header (0x26C).
    assert img[0x200] == 0xEB and 0x202 + img[0x201] >= 0x26C


@pytest.mark.parametrize("name", GUESTS)
def test_elf_enters_at_the_64bit_entry_and_matches_the_bzimage(built, name):
    """out/<guest>.elf: one PT_LOAD at 1 MiB, e_entry 0x100200, the same bytes as the bzImage's payload."""
    elf = (built / ("%s.elf" % name)).read_bytes()
    img = (built / ("%s.bzImage" % name)).read_bytes()
    entry, loads = mkbzimage.load_segments(elf)
    assert entry == ENTRY64
    assert len(loads) == 1
    paddr, offset, filesz, memsz = loads[0]
    assert paddr == IMAGE_BASE
    payload = img[(img[0x1F1] + 1) * 512 :]
    assert payload[:filesz] == elf[offset : offset + filesz]
    assert u32(img, 0x260) >= memsz  # init_size covers .bss and the stacks


def test_guest_build_is_reproducible(built, tmp_path):
    """A second build from the same sources gives byte-identical images."""
    _build(tmp_path)
    for name in GUESTS:
        for kind in ("bzImage", "elf"):
            f = "%s.%s" % (name, kind)
            assert (tmp_path / f).read_bytes() == (built / f).read_bytes(), f


def _elf(entry, paddr, filesz=0x100, memsz=0x200):
    """A minimal ELF64 header and one PT_LOAD program header."""
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QQ", ehdr, 24, entry, 64)
    struct.pack_into("<HH", ehdr, 54, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, paddr, paddr, filesz, memsz, 0x1000)
    return bytes(ehdr) + phdr


def _setup():
    s = bytearray(1024)
    struct.pack_into("<H", s, 0x1FE, 0xAA55)
    s[0x202:0x206] = b"HdrS"
    struct.pack_into("<I", s, 0x214, IMAGE_BASE)
    struct.pack_into("<Q", s, 0x258, IMAGE_BASE)
    return bytes(s)


def test_mkbzimage_fills_in_sizes_from_the_elf():
    image = mkbzimage.build(_setup(), _elf(ENTRY64, IMAGE_BASE, 0x100, 0x1234), b"\x90" * 0x100)
    assert image[0x1F1] == 1
    assert u32(image, 0x1F4) == 0x10
    assert u32(image, 0x260) == 0x2000
    assert image[1024:] == b"\x90" * 0x100


@pytest.mark.parametrize(
    "elf, why",
    [
        (_elf(IMAGE_BASE, IMAGE_BASE), "entry"),
        (_elf(ENTRY64, 0x200000), "PT_LOAD"),
    ],
)
def test_mkbzimage_refuses_an_elf_that_breaks_the_header_promises(elf, why):
    with pytest.raises(mkbzimage.BuildError, match=why):
        mkbzimage.build(_setup(), elf, b"\x90" * 0x100)
