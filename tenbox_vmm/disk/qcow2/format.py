"""qcow2 on-disk constants (worker, daemon/CLI): field offsets, flag bits, limits.

Source: QEMU docs/interop/qcow2.txt. All numbers in the file are big-endian.
"""

from __future__ import annotations

MAGIC = b"QFI\xfb"

V2_HEADER_BYTES = 72
V3_HEADER_MIN_BYTES = 104
V3_HEADER_BYTES = 112  # with compression_type and its padding, as QEMU >= 5.1 writes

# Header field offsets we update in place
OFF_SIZE = 24  # size (u64): the virtual size, written last when a disk grows
OFF_L1_TABLE = 36  # l1_size (u32) + l1_table_offset (u64): one 12-byte write
OFF_REFCOUNT_TABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32): one 12-byte write
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88

MIN_CLUSTER_BITS = 9  # 512 B
MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's implementation limit
MAX_REFCOUNT_ORDER = 6  # 64-bit refcounts
V2_REFCOUNT_ORDER = 4
BACKING_NAME_MAX = 1023
L1_MAX_BYTES = 32 << 20  # QEMU's limit on the L1 table
REFTABLE_MAX_BYTES = 8 << 20  # QEMU's limit on the refcount table
SECTOR = 512

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1/L2 entries
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9..55
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # v3: reads as zeros
L1_RESERVED_MASK = 0x7F000000000001FF

# Feature name table as QEMU writes it: (type, bit, name); type 0 incompat, 1 compat, 2 autoclear.
FEATURE_TABLE = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
