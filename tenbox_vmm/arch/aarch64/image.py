"""The arm64 `Image` boot protocol: the kernel's header, and where kernel, initrd and device tree go (worker).

Documentation/arch/arm64/booting.rst. The Image's 64-byte header says how
far from a 2 MiB-aligned base it must be loaded (text_offset), how much
memory it uses from there, bss included (image_size), and in `flags` its
endianness, page size and whether the base may be anywhere in RAM. The
boot CPU enters the Image's first byte with the MMU off, x0 holding the
device tree's address (8-byte aligned, at most 2 MiB) and x1..x3 zero.

Debian ships arm64 kernels as a plain Image; a gzip'd one (what some
distributions call vmlinuz) is inflated here, to at most IMAGE_MAX_BYTES.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from tenbox_vmm import kernel_kind
from tenbox_vmm.arch.aarch64 import layout as L
from tenbox_vmm.kernel_kind import KernelError

HEADER_BYTES = 64
FLAG_BIG_ENDIAN = 1 << 0
FLAG_PAGE_SIZE_SHIFT = 1
FLAG_PAGE_SIZE_MASK = 0x3
FLAG_PHYS_ANYWHERE = 1 << 3
PAGE_SIZES = {0: 0, 1: 4096, 2: 16384, 3: 65536}  # 0: the kernel does not say
IMAGE_MAX_BYTES = 256 << 20  # a gzip'd kernel inflates to at most this much


class ArmImage(NamedTuple):
    """A validated arm64 kernel, ready to be copied to guest RAM at `load`."""

    path: str
    data: bytes  # the Image (inflated if the file was gzip'd)
    text_offset: int
    image_size: int  # bytes from `load` the kernel may use, bss included
    page_size: int  # 0 if the header does not say
    load: int  # guest-physical address of the Image's first byte: the entry point


class BootPlan(NamedTuple):
    """Where each part goes in guest RAM."""

    kernel: int
    kernel_end: int
    fdt: int
    initrd: int  # 0 without an initrd
    initrd_end: int


def parse_image(path: str, data: bytes) -> ArmImage:
    """Validate an arm64 kernel file's contents (gzip'd or not) and place it at L.KERNEL_BASE."""
    kind = kernel_kind.identify(data[:kernel_kind.PEEK_BYTES])
    if kind.arch != "aarch64" or kind.format not in ("Image", "Image" + kernel_kind.GZIPPED):
        what = kind.describe() if kind.format else "not a Linux kernel"
        raise KernelError("kernel %s is %s; this host's worker boots %s kernels (an Image, plain or gzip'd)"
                          % (path, what, kernel_kind.ARCH_NAMES["aarch64"]))
    if kind.format.endswith(kernel_kind.GZIPPED):
        data = _gunzip(path, data)
    if len(data) < HEADER_BYTES:
        raise KernelError("kernel %s is truncated: %d bytes, less than the Image header" % (path, len(data)))
    text_offset, image_size, flags = struct.unpack_from("<QQQ", data, 8)
    if image_size == 0:
        raise KernelError("kernel %s has an image_size of 0: a kernel older than Linux 3.17, which tenbox "
                          "does not boot" % path)
    if flags & FLAG_BIG_ENDIAN:
        raise KernelError("kernel %s is a big-endian arm64 kernel; tenbox boots little-endian ones" % path)
    if image_size < len(data):
        raise KernelError("kernel %s says it needs %d bytes but its file has %d" % (path, image_size, len(data)))
    if text_offset % L.INITRD_ALIGN or text_offset >= L.KERNEL_ALIGN:
        raise KernelError("kernel %s has a text_offset of %#x: not a page multiple below 2 MiB" % (path, text_offset))
    page_size = PAGE_SIZES[(flags >> FLAG_PAGE_SIZE_SHIFT) & FLAG_PAGE_SIZE_MASK]
    return ArmImage(path, data, text_offset, image_size, page_size, L.KERNEL_BASE + text_offset)


def plan(image: ArmImage, ram_bytes: int, initrd_bytes: int = 0) -> BootPlan:
    """The device tree at the start of RAM, the kernel at the next 2 MiB boundary, the initrd after the
    kernel's image_size; a KernelError if RAM is too small for them."""
    kernel_end = image.load + image.image_size
    initrd = _align_up(kernel_end, L.INITRD_ALIGN) if initrd_bytes else 0
    end = initrd + initrd_bytes if initrd_bytes else kernel_end
    ram_end = L.RAM_START + ram_bytes
    if end > ram_end:
        raise KernelError("kernel %s%s needs %d MiB of RAM; the guest has %d MiB" % (
            image.path, " and its initrd" if initrd_bytes else "",
            (end - L.RAM_START + L.MIB - 1) // L.MIB, ram_bytes // L.MIB))
    return BootPlan(image.load, kernel_end, L.FDT_ADDR, initrd, end if initrd_bytes else 0)


def _gunzip(path: str, data: bytes) -> bytes:
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = z.decompress(data, IMAGE_MAX_BYTES + 1)
    except zlib.error as e:
        raise KernelError("kernel %s: its gzip data is damaged (%s)" % (path, e)) from None
    if len(out) > IMAGE_MAX_BYTES:
        raise KernelError("kernel %s inflates to more than %d MiB" % (path, IMAGE_MAX_BYTES >> 20))
    if not z.eof:
        raise KernelError("kernel %s: its gzip data ends early" % path)
    return out


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)
