"""Linux boot protocol: kernel validation, initrd placement, command line, boot_params, e820."""

import struct

import pytest

from tenbox_vmm.arch.x86_64 import boot
from tenbox_vmm.arch.x86_64 import layout as L

MIB = 1 << 20


def make_bzimage(version=0x020F, loadflags=1, xloadflags=1, setup_sects=1, relocatable=0,
                 pref=0x100000, init_size=0x4000, payload=b"\x90" * 0x400, magic=b"HdrS", boot_flag=0xAA55):
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = b"\xeb\x66"
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def make_elf(entry=0x100200, paddr=0x100000, vaddr=None, memsz=0x3000, data=b"\xcc" * 0x1000, machine=62):
    vaddr = paddr if vaddr is None else vaddr
    eh = bytearray(64)
    eh[:4] = b"\x7fELF"
    eh[4], eh[5], eh[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", eh, 16, 2, machine, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, vaddr, paddr, len(data), memsz, 0x1000)
    return bytes(eh) + ph + bytes(0x1000 - 64 - 56) + data


def write(tmp_path, data, name="k"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_bzimage_is_entered_at_load_plus_0x200(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage()), 256 * MIB)
    assert img.kind == "bzImage"
    assert img.start == 0x100000 and img.entry == 0x100200
    (gpa, data), = img.segments
    assert gpa == 0x100000 and bytes(data) == b"\x90" * 0x400
    assert img.end == 0x100000 + 0x4000
    assert img.cmdline_size == 2047


def test_non_relocatable_kernel_loads_at_its_pref_address(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage(pref=0x400000)), 256 * MIB)
    assert img.start == 0x400000 and img.entry == 0x400200


def test_relocatable_kernel_reserves_room_to_decompress_at_pref_address(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage(relocatable=1, pref=0x1000000, init_size=0x2000000)), 256 * MIB)
    assert img.start == 0x100000
    assert img.end == 0x1000000 + 0x2000000


@pytest.mark.parametrize("kwargs, message", [
    (dict(boot_flag=0x1234), "bad boot_flag"),
    (dict(version=0x0205), "boot protocol 2.05"),
    (dict(loadflags=0), "zImage"),
    (dict(xloadflags=0), r"a 32-bit x86 \(i386\) bzImage; this host.s worker boots x86-64 \(amd64\) kernels"),
])
def test_bad_setup_headers_are_refused(tmp_path, kwargs, message):
    with pytest.raises(boot.KernelError, match=message):
        boot.load_kernel(write(tmp_path, make_bzimage(**kwargs)), 256 * MIB)


def test_truncated_bzimage_is_refused(tmp_path):
    data = make_bzimage(setup_sects=30)[: 20 * 512]
    data = data[:0x1F1] + bytes([30]) + data[0x1F2:]
    with pytest.raises(boot.KernelError, match="truncated"):
        boot.load_kernel(write(tmp_path, data), 256 * MIB)


def test_not_a_kernel(tmp_path):
    with pytest.raises(boot.KernelError, match="not a Linux kernel"):
        boot.load_kernel(write(tmp_path, b"#!/bin/sh\necho hi\n" * 100), 256 * MIB)


def test_missing_and_unreadable_kernels(tmp_path):
    with pytest.raises(boot.KernelError, match="does not exist"):
        boot.load_kernel(str(tmp_path / "nope"), 256 * MIB)
    with pytest.raises(boot.KernelError, match="not a regular file"):
        boot.load_kernel(str(tmp_path), 256 * MIB)


def test_kernel_larger_than_ram_is_refused(tmp_path):
    with pytest.raises(boot.KernelError, match="needs RAM up to"):
        boot.load_kernel(write(tmp_path, make_bzimage(init_size=64 * MIB)), 16 * MIB)


def test_elf_vmlinux_loads_by_program_headers(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_elf()), 256 * MIB)
    assert img.kind == "ELF" and img.entry == 0x100200
    (gpa, data), = img.segments
    assert gpa == 0x100000 and len(data) == 0x1000 and img.end == 0x103000


def test_elf_virtual_entry_is_translated_to_physical(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_elf(entry=0xFFFFFFFF81000200, vaddr=0xFFFFFFFF81000000)), 256 * MIB)
    assert img.entry == 0x100200


@pytest.mark.parametrize("machine, what", [
    (183, r"an arm64 \(aarch64\) ELF vmlinux"),
    (243, r"a RISC-V \(riscv64\) ELF vmlinux"),
    (8, "an ELF vmlinux for an architecture tenbox does not know"),  # MIPS
])
def test_elf_for_another_machine_is_refused_naming_both_architectures(tmp_path, machine, what):
    with pytest.raises(boot.KernelError, match=r"^kernel \S+ is %s; this host's worker boots x86-64 \(amd64\) "
                                               r"kernels$" % what):
        boot.load_kernel(write(tmp_path, make_elf(machine=machine)), 256 * MIB)


def test_elf_entry_outside_segments_is_refused(tmp_path):
    with pytest.raises(boot.KernelError, match="outside every loaded segment"):
        boot.load_kernel(write(tmp_path, make_elf(entry=0x900000)), 256 * MIB)


def test_initrd_goes_as_high_as_allowed_and_page_aligned(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage()), 256 * MIB)
    addr = boot.place_initrd(img, 5000, 256 * MIB)
    assert addr % 0x1000 == 0 and addr + 5000 <= 256 * MIB and addr > 255 * MIB


def test_initrd_respects_initrd_addr_max(tmp_path):
    data = bytearray(make_bzimage())
    struct.pack_into("<I", data, 0x22C, 64 * MIB - 1)
    img = boot.load_kernel(write(tmp_path, bytes(data)), 256 * MIB)
    addr = boot.place_initrd(img, 1 * MIB, 256 * MIB)
    assert addr + MIB <= 64 * MIB


def test_initrd_that_does_not_fit_is_refused(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage()), 16 * MIB)
    with pytest.raises(boot.KernelError, match="does not fit"):
        boot.place_initrd(img, 16 * MIB, 16 * MIB)


def test_command_line_limits(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage()), 256 * MIB)
    assert boot.check_cmdline(img, "console=ttyS0") == b"console=ttyS0\0"
    with pytest.raises(boot.KernelError, match="at most 2047"):
        boot.check_cmdline(img, "x" * 2048)
    with pytest.raises(boot.KernelError, match="ASCII"):
        boot.check_cmdline(img, "caf\u00e9")


def test_boot_params_carry_header_cmdline_initrd_e820_and_rsdp(tmp_path):
    img = boot.load_kernel(write(tmp_path, make_bzimage()), 256 * MIB)
    e820 = boot.e820_map([(0, 256 * MIB)])
    bp = boot.build_boot_params(img, L.CMDLINE_ADDR, (0xF000000, 1234), e820, 0xE0000)
    assert len(bp) == 4096
    assert bp[0x202:0x206] == b"HdrS"
    assert bp[0x210] == 0xFF and bp[0x211] & 1
    assert struct.unpack_from("<I", bp, 0x228)[0] == L.CMDLINE_ADDR
    assert struct.unpack_from("<II", bp, 0x218) == (0xF000000, 1234)
    assert struct.unpack_from("<Q", bp, 0x70)[0] == 0xE0000
    assert bp[0x1E8] == len(e820)
    entries = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(bp[0x1E8])]
    assert entries == e820


def test_e820_has_the_hole_and_high_ram():
    gib = 1 << 30
    e820 = boot.e820_map([(0, 3 * gib), (4 * gib, gib)])
    ram = [(a, s) for a, s, t in e820 if t == L.E820_RAM]
    assert ram[0] == (0, L.EBDA_ADDR)
    assert ram[1] == (L.HIMEM_START, 3 * gib - L.HIMEM_START)
    assert ram[2] == (4 * gib, gib)
    starts = [a for a, _, _ in e820]
    assert starts == sorted(starts)
    for (a, s, _), (b, _, _) in zip(e820, e820[1:]):
        assert a + s <= b
