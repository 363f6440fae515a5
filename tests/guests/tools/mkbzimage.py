#!/usr/bin/env python3
"""Assemble a test guest's bzImage from its setup part and protected-mode image (build host).

    mkbzimage.py SETUP_BIN GUEST_ELF GUEST_BIN OUTPUT

The setup part (setup.S, linked at 0) carries the Linux setup header; this
fills in the fields that depend on the protected-mode image -- setup_sects,
syssize and init_size -- after checking the ELF says what the header
promises: one PT_LOAD at 1 MiB and the 64-bit entry at +0x200. The output
depends only on the inputs (no timestamps), so builds are reproducible.
"""

from __future__ import annotations

import struct
import sys
from typing import List, Tuple

IMAGE_BASE = 0x100000
ENTRY64 = IMAGE_BASE + 0x200
SECTOR = 512
PAGE = 4096
PT_LOAD = 1

HDR_SETUP_SECTS = 0x1F1
HDR_SYSSIZE = 0x1F4
HDR_BOOT_FLAG = 0x1FE
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_CODE32_START = 0x214
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260
SETUP_SECTS_MAX = 64  # 32 KiB: far more than the setup code needs


class BuildError(Exception):
    """The inputs do not make a bootable image; the message says why."""


def load_segments(elf: bytes) -> Tuple[int, List[Tuple[int, int, int, int]]]:
    """e_entry and the PT_LOAD program headers as (paddr, offset, filesz, memsz)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise BuildError("not a little-endian ELF64 file")
    e_entry, e_phoff = struct.unpack_from("<QQ", elf, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    loads = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", elf, e_phoff + i * e_phentsize
        )
        if p_type == PT_LOAD:
            loads.append((p_paddr, p_offset, p_filesz, p_memsz))
    return e_entry, loads


def build(setup: bytes, elf: bytes, payload: bytes) -> bytes:
    entry, loads = load_segments(elf)
    if entry != ENTRY64:
        raise BuildError("ELF entry is %#x, the header promises %#x" % (entry, ENTRY64))
    if len(loads) != 1 or loads[0][0] != IMAGE_BASE:
        raise BuildError("expected one PT_LOAD at %#x, got %r" % (IMAGE_BASE, loads))
    _paddr, _offset, filesz, memsz = loads[0]
    if len(payload) != filesz:
        raise BuildError("binary is %d bytes but the PT_LOAD has %d" % (len(payload), filesz))

    if len(setup) % SECTOR or len(setup) < 2 * SECTOR:
        raise BuildError("setup part is %d bytes, not whole sectors after the boot sector" % len(setup))
    hdr = bytearray(setup)
    if struct.unpack_from("<H", hdr, HDR_BOOT_FLAG)[0] != 0xAA55 or hdr[HDR_MAGIC : HDR_MAGIC + 4] != b"HdrS":
        raise BuildError("setup part has no setup header")
    if struct.unpack_from("<I", hdr, HDR_CODE32_START)[0] != IMAGE_BASE:
        raise BuildError("code32_start is not %#x" % IMAGE_BASE)
    if struct.unpack_from("<Q", hdr, HDR_PREF_ADDRESS)[0] != IMAGE_BASE:
        raise BuildError("pref_address is not %#x" % IMAGE_BASE)
    setup_sects = len(setup) // SECTOR - 1
    if setup_sects > SETUP_SECTS_MAX:
        raise BuildError("setup code is %d sectors" % setup_sects)

    hdr[HDR_SETUP_SECTS] = setup_sects
    struct.pack_into("<I", hdr, HDR_SYSSIZE, (len(payload) + 15) // 16)
    init_size = (memsz + PAGE - 1) & ~(PAGE - 1)
    struct.pack_into("<I", hdr, HDR_INIT_SIZE, init_size)
    # The protected-mode part is padded to 16 bytes, as syssize counts paragraphs.
    padding = b"\0" * (-len(payload) % 16)
    return bytes(hdr) + payload + padding


def main(argv: List[str]) -> int:
    if len(argv) != 5:
        print("usage: mkbzimage.py SETUP_BIN GUEST_ELF GUEST_BIN OUTPUT", file=sys.stderr)
        return 2
    setup_path, elf_path, bin_path, out_path = argv[1:]
    with open(setup_path, "rb") as f:
        setup = f.read()
    with open(elf_path, "rb") as f:
        elf = f.read()
    with open(bin_path, "rb") as f:
        payload = f.read()
    try:
        image = build(setup, elf, payload)
    except BuildError as e:
        print("mkbzimage: %s: %s" % (elf_path, e), file=sys.stderr)
        return 1
    with open(out_path, "wb") as f:
        f.write(image)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
