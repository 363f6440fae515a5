"""Linux x86 boot protocol: kernel images, initrd placement, boot_params (worker).

tenbox boots Linux at its 64-bit entry, as Firecracker and Cloud Hypervisor
do: no firmware and no real-mode setup code run. A bzImage's protected-mode
part is placed in RAM and entered at its start + 0x200 in long mode; an ELF
vmlinux is loaded by its program headers and entered at e_entry. Either way
the kernel gets a boot_params page built here (Documentation/arch/x86/boot.rst).
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple

from tenbox_vmm import kernel_kind
from tenbox_vmm.kernel_kind import KernelError, read_file  # noqa: F401 (the machine's names for them)
from tenbox_vmm.arch.x86_64 import layout as L

PAGE = 0x1000
MIN_PROTOCOL = 0x0206

# boot_params offsets
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_HDR = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128

# setup header offsets (file and boot_params alike)
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260
HDR_VID_MODE = 0x1FA

LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
TYPE_OF_LOADER_UNDEFINED = 0xFF
VID_MODE_NORMAL = 0xFFFF
DEFAULT_CMDLINE_SIZE = 2048
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # protocol < 2.03 value; newer headers say more

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
PT_LOAD = 1


class KernelImage(NamedTuple):
    """A validated kernel, ready to be copied into guest RAM."""

    path: str
    kind: str  # "bzImage" or "ELF"
    segments: Tuple[Tuple[int, memoryview], ...]  # (guest address, bytes)
    entry: int  # guest-physical 64-bit entry point
    start: int  # lowest guest address the kernel occupies
    end: int  # first byte past what the kernel may use while booting
    setup_header: bytes  # copied into boot_params at 0x1F1
    protocol: int
    cmdline_size: int
    initrd_addr_max: int


def _u8(b: bytes, off: int) -> int:
    return b[off]


def _u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def _u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def load_kernel(path: str, ram_end_below_4g: int) -> KernelImage:
    """Parse and validate a bzImage or ELF vmlinux for a guest with the given low RAM."""
    data = read_file(path, "kernel")
    kind = kernel_kind.identify(data[:kernel_kind.PEEK_BYTES])
    if kind.format and kind.arch != "x86_64":
        raise KernelError("kernel %s is %s; this host's worker boots %s kernels"
                          % (path, kind.describe(), kernel_kind.ARCH_NAMES["x86_64"]))
    if len(data) >= HDR_MAGIC + 4 and data[HDR_MAGIC : HDR_MAGIC + 4] == b"HdrS":
        image = _parse_bzimage(path, data)
    elif data[:4] == ELF_MAGIC:
        image = _parse_elf(path, data)
    else:
        raise KernelError("kernel %s is not a Linux kernel: no bzImage header and not an ELF file" % path)
    if image.end > ram_end_below_4g:
        raise KernelError(
            "kernel %s needs RAM up to %d MiB while booting; the guest has %d MiB below 4 GiB"
            % (path, (image.end + (1 << 20) - 1) >> 20, ram_end_below_4g >> 20)
        )
    return image


def _parse_bzimage(path: str, data: bytes) -> KernelImage:
    if _u16(data, HDR_BOOT_FLAG) != 0xAA55:
        raise KernelError("kernel %s: bad boot_flag in the setup header" % path)
    version = _u16(data, HDR_VERSION)
    if version < MIN_PROTOCOL:
        raise KernelError(
            "kernel %s speaks boot protocol %d.%02d; tenbox needs 2.06 or newer"
            % (path, version >> 8, version & 0xFF)
        )
    loadflags = _u8(data, HDR_LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise KernelError("kernel %s is a zImage (not loaded high); use a bzImage" % path)
    if version >= 0x020C and not _u16(data, HDR_XLOADFLAGS) & XLF_KERNEL_64:
        raise KernelError("kernel %s has no 64-bit entry point (a 32-bit kernel?)" % path)
    setup_sects = _u8(data, HDR_SETUP_SECTS) or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise KernelError("kernel %s is truncated: %d setup sectors but %d bytes" % (path, setup_sects, len(data)))
    payload = memoryview(data)[setup_size:]

    relocatable = version >= 0x0205 and _u8(data, HDR_RELOCATABLE) != 0
    pref = _u64(data, HDR_PREF_ADDRESS) if version >= 0x020A else L.HIMEM_START
    if relocatable:
        # startup_64 realigns itself to kernel_alignment (and at least
        # LOAD_PHYSICAL_ADDR) before decompressing, so 1 MiB is always fine.
        load = L.HIMEM_START
    else:
        load = pref
        if load < L.HIMEM_START:
            raise KernelError("kernel %s wants to load at %#x, below 1 MiB" % (path, load))
    init_size = _u32(data, HDR_INIT_SIZE) if version >= 0x020A else 0
    if relocatable:
        # Room to decompress at the aligned address startup_64 will choose.
        align = max(_u32(data, HDR_KERNEL_ALIGNMENT), PAGE)
        end = max(pref, _align_up(load, align)) + max(init_size, len(payload))
    else:
        end = load + max(init_size, len(payload))

    jump_end = HDR_JUMP + 2 + _u8(data, HDR_JUMP + 1)  # the header ends where the jump lands
    header = bytearray(data[BP_HDR : min(jump_end, 0x290)])
    cmdline_size = _u32(data, HDR_CMDLINE_SIZE) if version >= 0x0206 else 255
    initrd_addr_max = _u32(data, HDR_INITRD_ADDR_MAX) if version >= 0x0203 else DEFAULT_INITRD_ADDR_MAX
    return KernelImage(
        path=path,
        kind="bzImage",
        segments=((load, payload),),
        entry=load + 0x200,
        start=load,
        end=end,
        setup_header=bytes(header),
        protocol=version,
        cmdline_size=cmdline_size,
        initrd_addr_max=initrd_addr_max,
    )


def _parse_elf(path: str, data: bytes) -> KernelImage:
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise KernelError("kernel %s is an ELF file but not a little-endian 64-bit one" % path)
    (e_machine,) = struct.unpack_from("<H", data, 18)
    if e_machine != EM_X86_64:
        raise KernelError("kernel %s is an ELF file for machine %d, not x86-64" % (path, e_machine))
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phnum == 0 or e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
        raise KernelError("kernel %s: ELF program headers are missing or truncated" % path)
    view = memoryview(data)
    segments: List[Tuple[int, memoryview]] = []
    start, end = None, 0
    entry = None
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise KernelError("kernel %s: ELF segment %d lies outside the file" % (path, i))
        if p_paddr < L.HIMEM_START:
            raise KernelError("kernel %s: ELF segment %d loads at %#x, below 1 MiB" % (path, i, p_paddr))
        segments.append((p_paddr, view[p_offset : p_offset + p_filesz]))
        start = p_paddr if start is None else min(start, p_paddr)
        end = max(end, p_paddr + p_memsz)
        if p_paddr <= e_entry < p_paddr + p_memsz:
            entry = e_entry
        elif p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry = e_entry - p_vaddr + p_paddr
    if not segments:
        raise KernelError("kernel %s: ELF file has nothing to load" % path)
    if entry is None:
        raise KernelError("kernel %s: ELF entry point %#x is outside every loaded segment" % (path, e_entry))
    header = bytearray(0x290 - BP_HDR)
    struct.pack_into("<H", header, HDR_BOOT_FLAG - BP_HDR, 0xAA55)
    header[HDR_MAGIC - BP_HDR : HDR_MAGIC - BP_HDR + 4] = b"HdrS"
    struct.pack_into("<H", header, HDR_VERSION - BP_HDR, 0x020F)
    struct.pack_into("<I", header, HDR_KERNEL_ALIGNMENT - BP_HDR, 0x1000000)
    struct.pack_into("<I", header, HDR_INITRD_ADDR_MAX - BP_HDR, 0x7FFFFFFF)
    struct.pack_into("<I", header, HDR_CMDLINE_SIZE - BP_HDR, DEFAULT_CMDLINE_SIZE - 1)
    return KernelImage(
        path=path,
        kind="ELF",
        segments=tuple(segments),
        entry=entry,
        start=start,
        end=end,
        setup_header=bytes(header),
        protocol=0x020F,
        cmdline_size=DEFAULT_CMDLINE_SIZE - 1,
        initrd_addr_max=0x7FFFFFFF,
    )


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def check_cmdline(image: KernelImage, cmdline: str) -> bytes:
    """The command line as the kernel will read it, or a KernelError if it cannot fit."""
    try:
        raw = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise KernelError("the kernel command line must be ASCII") from None
    if b"\0" in raw:
        raise KernelError("the kernel command line contains a NUL byte")
    limit = min(image.cmdline_size, L.CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise KernelError("the kernel command line is %d bytes; this kernel takes at most %d" % (len(raw), limit))
    return raw + b"\0"


def place_initrd(image: KernelImage, size: int, ram_end_below_4g: int) -> int:
    """The highest page-aligned address for an initrd of `size` bytes."""
    top = min(ram_end_below_4g, image.initrd_addr_max + 1)
    addr = (top - size) & ~(PAGE - 1)
    if size == 0 or addr < image.end:
        raise KernelError(
            "initrd of %d MiB does not fit between the kernel (ends at %d MiB) and %d MiB; give the VM more memory"
            % ((size + (1 << 20) - 1) >> 20, image.end >> 20, top >> 20)
        )
    return addr


def e820_map(ram_regions: Sequence[Tuple[int, int]]) -> List[Tuple[int, int, int]]:
    """The e820 table for RAM given as (guest address, size) regions."""
    low_size = ram_regions[0][1]
    table = [
        (0, L.EBDA_ADDR, L.E820_RAM),
        (L.EBDA_ADDR, L.BIOS_AREA - L.EBDA_ADDR, L.E820_RESERVED),
        (L.ACPI_ADDR, L.ACPI_END - L.ACPI_ADDR, L.E820_RESERVED),
        (L.HIMEM_START, low_size - L.HIMEM_START, L.E820_RAM),
    ]
    for gpa, size in ram_regions[1:]:
        table.append((gpa, size, L.E820_RAM))
    return table


def build_boot_params(
    image: KernelImage,
    cmdline_addr: int,
    initrd: Optional[Tuple[int, int]],
    e820: Sequence[Tuple[int, int, int]],
    rsdp_addr: int,
) -> bytes:
    """The 4 KiB boot_params page the kernel finds through RSI."""
    bp = bytearray(PAGE)
    bp[BP_HDR : BP_HDR + len(image.setup_header)] = image.setup_header
    bp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] |= LOADED_HIGH
    struct.pack_into("<H", bp, HDR_VID_MODE, VID_MODE_NORMAL)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd:
        addr, size = initrd
        struct.pack_into("<II", bp, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError("too many e820 entries")
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, addr, size, kind)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp_addr)
    return bytes(bp)
