"""Kernel files: what one is and for which architecture, from its first bytes, and reading one (worker, image tool).

A worker boots kernels of its own host's architecture only. An operator who
gives the x86-64 worker an arm64 `Image` (or the reverse, on an arm64 host)
gets one line naming both architectures, instead of "not a Linux kernel"
or a guest that never prints. The formats, and where each says what it is:

- an x86 bzImage: "HdrS" at 0x202 (Documentation/arch/x86/boot.rst);
  bit 1 of xloadflags (protocol 2.12+) says it has a 64-bit entry;
- an arm64 or RISC-V `Image`: a magic at offset 56
  (Documentation/arch/arm64/booting.rst, riscv/boot-image-header.rst);
- an ELF vmlinux: its class and e_machine;
- a gzip'd kernel (Debian's arm64 vmlinuz): the first bytes of what it
  holds, inflated to at most PEEK_BYTES;
- an EFI zboot kernel (arm64 and RISC-V since Linux 6.1): "zimg" at 4,
  and the PE header's machine field.
"""

from __future__ import annotations

import os
import stat as stat_mod
import struct
import zlib
from typing import NamedTuple

from tenbox_vmm import passed_files

HOST_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# What an operator calls each: Debian's name first, the kernel's (uname -m) second.
ARCH_NAMES = {"x86_64": "x86-64 (amd64)", "aarch64": "arm64 (aarch64)", "riscv64": "RISC-V (riscv64)",
              "i386": "32-bit x86 (i386)", "arm": "32-bit ARM (armhf)"}

KERNEL_FILE_MAX = 512 << 20  # no Linux kernel image comes close
PEEK_BYTES = 4096  # read (and, for a gzip'd kernel, inflated) to tell what a file is

BZIMAGE_MAGIC_OFFSET = 0x202
BZIMAGE_MAGIC = b"HdrS"
BZIMAGE_VERSION_OFFSET = 0x206
BZIMAGE_XLOADFLAGS_OFFSET = 0x236
XLF_KERNEL_64 = 1 << 0
IMAGE_MAGIC_OFFSET = 56
ARM64_MAGIC = b"ARM\x64"
RISCV_MAGIC = b"RSC\x05"
ELF_MAGIC = b"\x7fELF"
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 243: "riscv64", 3: "i386", 40: "arm"}
GZIP_MAGIC = b"\x1f\x8b"
PE_OFFSET_AT = 0x3C
PE_MACHINES = {0x8664: "x86_64", 0xAA64: "aarch64", 0x5064: "riscv64", 0x14C: "i386", 0x1C2: "arm"}
ZBOOT_MAGIC_OFFSET = 4
ZBOOT_MAGIC = b"zimg"
GZIPPED = ", gzip'd"


class KernelError(Exception):
    """The kernel or initrd cannot be booted; the message says why."""


class KernelKind(NamedTuple):
    arch: str  # a key of ARCH_NAMES, or "" when the file does not say
    format: str  # "bzImage", "Image", "ELF vmlinux", "EFI zboot kernel" (+ GZIPPED), or "" for none known

    def describe(self) -> str:
        """For a message: "an arm64 (aarch64) Image, gzip'd"."""
        if not self.format:
            return "not a kernel format tenbox knows"
        fmt, gzipped = self.format, self.format.endswith(GZIPPED)
        if gzipped:
            fmt = fmt[:-len(GZIPPED)]
        if self.arch not in ARCH_NAMES:
            return "a%s %s for an architecture tenbox does not know%s" % (
                "n" if fmt[0] in "AEIOU" else "", fmt, GZIPPED if gzipped else "")
        words = "%s %s" % (ARCH_NAMES[self.arch], fmt)
        article = "an" if words[0] in "aeiou" or words.startswith("x86") else "a"
        return "%s %s%s" % (article, words, GZIPPED if gzipped else "")


def host_arch(machine: str) -> str:
    """tenbox's name for the architecture of `os.uname().machine` (or a Debian arch); "" if it has none."""
    return HOST_ARCHES.get(machine, "")


def identify(head: bytes) -> KernelKind:
    """What the first bytes of a file (PEEK_BYTES of them, or all a shorter file has) say it is."""
    if head[BZIMAGE_MAGIC_OFFSET:BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC:
        return KernelKind(_bzimage_arch(head), "bzImage")
    magic = head[IMAGE_MAGIC_OFFSET:IMAGE_MAGIC_OFFSET + 4]
    if magic == ARM64_MAGIC:
        return KernelKind("aarch64", "Image")
    if magic == RISCV_MAGIC:
        return KernelKind("riscv64", "Image")
    if head[:4] == ELF_MAGIC:
        return KernelKind(_elf_arch(head), "ELF vmlinux")
    if head[:2] == GZIP_MAGIC:
        inner = identify(_inflate_head(head))
        return KernelKind(inner.arch, inner.format + GZIPPED) if inner.format else KernelKind("", "")
    if head[:2] == b"MZ" and head[ZBOOT_MAGIC_OFFSET:ZBOOT_MAGIC_OFFSET + 4] == ZBOOT_MAGIC:
        return KernelKind(_pe_arch(head), "EFI zboot kernel")
    return KernelKind("", "")


def identify_file(path: str) -> KernelKind:
    with open(path, "rb") as f:
        return identify(f.read(PEEK_BYTES))


def _bzimage_arch(head: bytes) -> str:
    """x86_64 for a bzImage with a 64-bit entry; i386 for one that says it has none (protocol 2.12+)."""
    if len(head) < BZIMAGE_XLOADFLAGS_OFFSET + 2:
        return "x86_64"
    (version,) = struct.unpack_from("<H", head, BZIMAGE_VERSION_OFFSET)
    (xloadflags,) = struct.unpack_from("<H", head, BZIMAGE_XLOADFLAGS_OFFSET)
    return "i386" if version >= 0x020C and not xloadflags & XLF_KERNEL_64 else "x86_64"


def _elf_arch(head: bytes) -> str:
    if len(head) < 20 or head[5] != 1:  # EI_DATA: little-endian, as every architecture here is
        return ""
    (machine,) = struct.unpack_from("<H", head, 18)
    return ELF_MACHINES.get(machine, "")


def _pe_arch(head: bytes) -> str:
    if len(head) < PE_OFFSET_AT + 4:
        return ""
    (pe,) = struct.unpack_from("<I", head, PE_OFFSET_AT)
    if pe + 6 > len(head) or head[pe:pe + 4] != b"PE\0\0":
        return ""
    (machine,) = struct.unpack_from("<H", head, pe + 4)
    return PE_MACHINES.get(machine, "")


def _inflate_head(data: bytes) -> bytes:
    """Up to PEEK_BYTES of what a gzip stream starts with; what it cannot inflate, empty."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, PEEK_BYTES)
    except zlib.error:
        return b""


def read_file(path: str, what: str, limit: int = KERNEL_FILE_MAX) -> bytes:
    """The whole file, or a KernelError naming the problem and the path."""
    try:
        st = passed_files.stat(path)  # a sandboxed worker's kernel and initrd are passed to it
    except FileNotFoundError:
        raise KernelError("%s %s does not exist" % (what, path)) from None
    except OSError as e:
        raise KernelError("cannot read %s %s: %s" % (what, path, e.strerror)) from None
    if not stat_mod.S_ISREG(st.st_mode):
        raise KernelError("%s %s is not a regular file" % (what, path))
    if st.st_size > limit:
        raise KernelError("%s %s is too large (%d MiB)" % (what, path, st.st_size >> 20))
    try:
        with os.fdopen(passed_files.open_fd(path, os.O_RDONLY), "rb") as f:
            return f.read()
    except OSError as e:
        raise KernelError("cannot read %s %s: %s" % (what, path, e.strerror)) from None
