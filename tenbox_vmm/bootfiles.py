"""A cloud image's default kernel and initrd, read without mounting (imagetool child at image import; caller's rights).

    answer = extract_boot_files(IMAGE, OUT_DIR)   # OUT_DIR/vmlinuz, OUT_DIR/initrd.img and the JSON answer

The image (raw or qcow2, no backing file) is opened read-only with tenbox's
disk code and its partition table read by disk/partitions.py. The Linux
partitions are tried in order, XBOOTLDR (/boot) first, then Linux file
system and x86-64 root partitions (MBR: 0xea, then 0x83); a disk without a
table is one file system. EFI system partitions are never read: their
grub.cfg is a stub that `configfile`s the real one on /boot. Each
partition's file system is told by its superblock magic. ext2/3/4 is read
by e2fsprogs' `debugfs` (a reader fuzzed upstream and shipped everywhere; no
mount, no loop device, no root needed); xfs and btrfs by grub-common's
`grub-fstest`, GRUB's own drivers (GrubReader: the volume is exported to a
private folder in GRUB_SCRATCH_DIR first, since grub-fstest opens its image
by its canonical path). Anything else (LVM, LUKS) is refused by name.

The image is read through one descriptor: the one tenboxd passed
(`--fd N:IMAGE`, tenbox_vmm.passed_files: the tool runs as a user who may
not open the store's file), else the file opened here. How debugfs is fed:

- raw image: the image itself at the partition's byte offset,
  `/dev/fd/N?offset=BYTES` (an ext2fs io option since e2fsprogs 1.42, 2011),
  N being that descriptor: debugfs reads the file that was checked, and a
  path with '?' in it does no harm. A hostile superblock can make it read
  past the partition, into the rest of the same image: nothing else;
- qcow2, or a raw image this user cannot open again as /dev/fd/N (tenboxd's
  case): the partition is first exported by tenbox's own reader into a
  sparse raw file (only nonzero 1 MiB chunks are written) in a private work
  folder inside OUT_DIR; partitions over EXPORT_MAX_BYTES are refused.

The boot configuration is looked for in GRUB_CONFIGS, then BLS_DIRS (and
grub.cfg that runs `blscfg` means the BLS entries next to it); bootcfg
finds the default entry. The kernel and initrds are read from the file
system the entry's `search --fs-uuid` names (else the config's), symlinks
followed SYMLINK_MAX_DEPTH levels. The kernel must be an x86 bzImage.

Every run of debugfs has a deadline, a clean environment (LC_ALL=C, no
shell) and a cap on what it prints and writes (RLIMIT_FSIZE). Every file is
read only after `stat` said its size is within its limit. Everything is
written into a work folder inside OUT_DIR and moved into place at the end;
on any refusal OUT_DIR is left as it was. A refusal is a BootFilesError
carrying an ImageToolCode and one line naming the cause.
"""

from __future__ import annotations

import ctypes
import os
import posixpath
import re
import resource
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from tenbox_vmm import kernel_kind, passed_files
from tenbox_vmm.bootcfg import BootConfigError, BootEntry, default_bls_entry, default_grub_entry
from tenbox_vmm.disk import Disk
from tenbox_vmm.disk.partitions import (
    GPT_TYPE_LINUX_FS,
    GPT_TYPE_ROOT_X86_64,
    GPT_TYPE_XBOOTLDR,
    MBR_TYPE_LINUX,
    MBR_TYPE_XBOOTLDR,
    PartitionError,
    Table,
    read_table,
)
from tenbox_vmm.disk.qcow2.image import Qcow2Disk
from tenbox_vmm.disk.raw import QCOW2_MAGIC, RawDisk
from tenbox_vmm.protocol.imagetool import ImageToolCode

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"

KERNEL_MAX_BYTES = 256 << 20  # Debian's cloud kernel is 8 MiB, a generic distribution kernel 12-15 MiB
INITRD_MAX_BYTES = 2 << 30  # all initrds together; Fedora's generic initramfs is 40-80 MiB
CONFIG_MAX_BYTES = 1 << 20  # grub.cfg: bootcfg.MAX_CONFIG_CHARS; real ones are 5-50 KiB
GRUBENV_MAX_BYTES = 64 << 10  # grub-editenv writes exactly 1024 bytes
BLS_ENTRY_MAX_BYTES = 64 << 10  # one /loader/entries/*.conf; real ones are ~300 bytes
BLS_MAX_FILES = 64  # entry files read; a host keeps a few kernels, Fedora keeps 3
EXPORT_MAX_BYTES = 1 << 40  # a qcow2 partition exported for debugfs; cloud images' roots are 2-10 GiB
EXPORT_CHUNK_BYTES = 1 << 20  # read, tested for zeros and written at once: the export's sparseness grain
# One partition's export. Measured on the development machines: a 2 GiB Debian cloud disk (compressed qcow2,
# 196 MiB) whole in 2 s; a 64 GiB partition, nearly all unallocated, in 5 s. tenboxd gives the tool 600 s.
EXPORT_TIMEOUT_SEC = 300.0
DEBUGFS_TIMEOUT_SEC = 60.0  # one stat/ls/cat: a few ms on a real image
DUMP_TIMEOUT_SEC = 300.0  # one kernel or initrd dump: 2 GiB at disk speed, with room
DEBUGFS_OUTPUT_MAX_BYTES = 4 << 20  # what one stat or ls may print (a 1000-entry directory is ~60 KiB)
DEBUGFS_ERRORS_MAX_BYTES = 64 << 10  # stderr kept from one run
SYMLINK_MAX_DEPTH = 8  # as ext2fs's namei (EXT2FS_MAX_NESTED_LINKS) and GRUB
PATH_MAX_CHARS = 1024
LINK_MAX_BYTES = 4096  # PATH_MAX: a slow symlink's target
MESSAGE_DETAIL_CHARS = 200

# Where grub-mkconfig (Debian, Ubuntu: grub; Fedora, SUSE: grub2) writes the config: on the root file
# system under /boot, or at the top of a separate /boot.
GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub2/grub.cfg")
BLS_DIRS = ("/boot/loader/entries", "/loader/entries")

GPT_BOOT_TYPES = (GPT_TYPE_XBOOTLDR,)
GPT_ROOT_TYPES = (GPT_TYPE_LINUX_FS, GPT_TYPE_ROOT_X86_64)
MBR_BOOT_TYPES = (MBR_TYPE_XBOOTLDR,)
MBR_ROOT_TYPES = (MBR_TYPE_LINUX,)

DEBUGFS_SEARCH_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"  # debugfs is in sbin, often not on a user's PATH
DEBUGFS_ENV = {"LC_ALL": "C", "PATH": DEBUGFS_SEARCH_PATH}  # no PAGER, no E2FSPROGS_* settings

# Superblock magics (offsets from the start of the file system), as libblkid identifies them.
EXT_SUPER = 1024
EXT_MAGIC_OFFSET = EXT_SUPER + 56
EXT_MAGIC = 0xEF53
EXT_UUID_OFFSET = EXT_SUPER + 104
EXT_LABEL_OFFSET = EXT_SUPER + 120
EXT_COMPAT_OFFSET = EXT_SUPER + 92  # s_feature_compat, s_feature_incompat, s_feature_ro_compat
EXT3_HAS_JOURNAL = 0x4
EXT4_INCOMPAT = 0x40 | 0x80 | 0x200 | 0x400 | 0x8000  # extents, 64bit, flex_bg, ea_inode, inline_data
XFS_MAGIC = b"XFSB"
XFS_UUID_OFFSET = 32
XFS_LABEL_OFFSET = 108
BTRFS_SUPER = 65536
BTRFS_MAGIC_OFFSET = BTRFS_SUPER + 64
BTRFS_MAGIC = b"_BHRfS_M"
BTRFS_LABEL_OFFSET = BTRFS_SUPER + 0x12B
PROBE_HEAD_BYTES = 4096  # covers the ext, xfs, vfat, LUKS and swap signatures
EXT_FS = ("ext2", "ext3", "ext4")  # read by e2fsprogs' debugfs
GRUB_FS = ("xfs", "btrfs")  # read by GRUB's own drivers (grub-fstest): the code that boots these images
READABLE_FS = EXT_FS + GRUB_FS
GRUB_FSTEST = "grub-fstest"
GRUB_SCRATCH_DIR = "/var/tmp"  # where GRUB's volumes are exported (a private folder, removed at the end)
# grub-fstest tells a file's size only by reading it: each file is copied out once, at most this long.
GRUB_FILE_MAX_BYTES = 2 << 30

INITRD_ALIGN = 4  # GRUB pads each initrd to 4 bytes; Linux wants a plain cpio archive to start aligned

PR_SET_PDEATHSIG = 1

_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+~@%:,=/-]*\Z")  # no blank, quote, '<' or '#': debugfs's own syntax
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+~@%:,=-]{1,255}\Z")
_GRUB_DEVICE = re.compile(r"\(([^()]*)\)")
_GRUB_PARTITION = re.compile(r"[hc]d\d+,(?:gpt|msdos)?(\d+)\Z")
_BLSCFG = re.compile(r"^[ \t]*blscfg\b", re.M)
_GRUBENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_STAT_HEAD = re.compile(r"^Inode: (\d+)\s+Type: (\S+)", re.M)
_STAT_SIZE = re.compile(r"^User:.*\bSize: (\d+)\s*$", re.M)
_FAST_LINK = re.compile(r'^Fast link dest: "(.*)"\s*$', re.M)
_LS_LINE = re.compile(r"/(\d+)/(\d+)/\d+/\d+/([^/\n]*)/(\d*)/\Z")
_NOT_FOUND = ("File not found by ext2_lookup", "Ext2 inode is not a directory")
_ROOT_DEV = re.compile(r"/dev/(?:[shv]d[a-z]|xvd[a-z]|nvme\d+n\d+p|mmcblk\d+p)(\d+)\Z")


class BootFilesError(Exception):
    """A refusal: `code` for the wire, `message` one line naming the cause."""

    def __init__(self, code: ImageToolCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _no_kernel(message: str) -> BootFilesError:
    return BootFilesError(ImageToolCode.NO_KERNEL, message)


def _bad_image(message: str) -> BootFilesError:
    return BootFilesError(ImageToolCode.BAD_IMAGE, message)


class Volume(NamedTuple):
    """A file system candidate: a partition, or the whole disk (number None)."""

    number: Optional[int]
    start: int
    size: int
    part_uuid: Optional[str]  # GPT partition GUID; MBR: "SSSSSSSS-NN", as blkid's PARTUUID
    fs: Optional[str]  # "ext4", "xfs", "btrfs", ...; None: no signature known
    fs_uuid: Optional[str]
    label: str

    @property
    def where(self) -> str:
        return "the whole disk" if self.number is None else "partition %d" % self.number

    @property
    def readable(self) -> bool:
        return self.fs in READABLE_FS


# ---- finding the file systems ------------------------------------------------------------------------------------

def disk_reader(disk: Disk) -> Callable[[int, int], bytes]:
    """read(offset, length) over the virtual disk, for read_table and the probes."""
    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        disk.readv(offset, [memoryview(buf)])
        return bytes(buf)
    return read


def probe_fs(read: Callable[[int, int], bytes], start: int, size: int) -> Tuple[Optional[str], Optional[str], str]:
    """(file system, UUID, label) of the file system at [start, start + size), by its superblock magic."""
    head = read(start, min(PROBE_HEAD_BYTES, size)) if size > 0 else b""
    if len(head) >= EXT_LABEL_OFFSET + 16 and struct.unpack_from("<H", head, EXT_MAGIC_OFFSET)[0] == EXT_MAGIC:
        _compat, incompat = struct.unpack_from("<II", head, EXT_COMPAT_OFFSET)
        fs = "ext4" if incompat & EXT4_INCOMPAT else "ext3" if _compat & EXT3_HAS_JOURNAL else "ext2"
        return (fs, str(uuid.UUID(bytes=head[EXT_UUID_OFFSET:EXT_UUID_OFFSET + 16])),
                _label(head[EXT_LABEL_OFFSET:EXT_LABEL_OFFSET + 16]))
    if head[:4] == XFS_MAGIC and len(head) >= XFS_LABEL_OFFSET + 12:
        return ("xfs", str(uuid.UUID(bytes=head[XFS_UUID_OFFSET:XFS_UUID_OFFSET + 16])),
                _label(head[XFS_LABEL_OFFSET:XFS_LABEL_OFFSET + 12]))
    if size >= BTRFS_LABEL_OFFSET + 256:
        sb = read(start + BTRFS_SUPER, 0x12B + 256)
        if sb[64:72] == BTRFS_MAGIC:
            return "btrfs", str(uuid.UUID(bytes=sb[32:48])), _label(sb[0x12B:])
    if head[:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS", None, ""
    if len(head) >= 1024 and head[512:520] == b"LABELONE":
        return "LVM2_member", None, ""
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and (head[0x36:0x39] == b"FAT" or head[0x52:0x57] == b"FAT32"):
        return "vfat", None, ""
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap", None, ""
    return None, None, ""


def _label(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def candidate_volumes(table: Table, disk_size: int, read: Callable[[int, int], bytes]) -> List[Volume]:
    """The Linux file systems to look in, in order: /boot (XBOOTLDR) partitions first, then the others."""
    if table.kind == "none":
        parts = [(None, 0, disk_size, None)]  # type: List[Tuple[Optional[int], int, int, Optional[str]]]
    else:
        boot, root = (GPT_BOOT_TYPES, GPT_ROOT_TYPES) if table.kind == "gpt" else (MBR_BOOT_TYPES, MBR_ROOT_TYPES)
        chosen = table.of_type(*boot) + table.of_type(*root)
        parts = [(p.number, p.start, p.size, p.uuid if table.kind == "gpt" else
                  "%s-%02x" % (table.disk_id[2:], p.number)) for p in chosen]
    out = []
    for number, start, size, part_uuid in parts:
        fs, fs_uuid, label = probe_fs(read, start, size)
        out.append(Volume(number, start, size, part_uuid, fs, fs_uuid, label))
    return out


# ---- debugfs -----------------------------------------------------------------------------------------------------

class _Stat(NamedTuple):
    type: str  # debugfs's word: regular, directory, symlink, ...
    size: int
    link: Optional[str]  # a fast symlink's target (in the inode)


def find_debugfs() -> str:
    tool = shutil.which("debugfs", path=DEBUGFS_SEARCH_PATH)
    if tool is None:
        raise BootFilesError(ImageToolCode.TOOL_MISSING,
                             "debugfs not found: install e2fsprogs (it reads the image's ext4 file systems)")
    return tool


def _child_setup(fsize: Optional[int]) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it

    def setup() -> None:
        # debugfs dies with this tool (tenboxd kills the tool, not its children, at its deadline).
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if fsize is not None:  # a dump writes no more than the file's size, whatever the image says
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return setup


def _run_reader(argv: List[str], what: str, where: str, cwd: str, pass_fds: Tuple[int, ...], timeout: float,
                out_cap: int, fsize: Optional[int], too_big: str) -> Tuple[bytes, str, int]:
    """stdout (at most out_cap bytes), stderr and exit status of a file system reader's run (debugfs,
    grub-fstest): a clean environment, a deadline, RLIMIT_FSIZE `fsize` (`too_big` says what SIGXFSZ means)."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=DEBUGFS_ENV, pass_fds=pass_fds, preexec_fn=_child_setup(fsize))
    except OSError as e:
        raise BootFilesError(ImageToolCode.TOOL_MISSING, "cannot run %s: %s" % (argv[0], e.strerror)) from None
    try:
        out, err = _communicate(proc, time.monotonic() + timeout, out_cap)
    except subprocess.TimeoutExpired:
        raise _bad_image("%s: %s took more than %.0f s" % (where, what, timeout)) from None
    except _TooMuchOutput:
        raise _bad_image("%s: %s printed more than %d bytes" % (where, what, out_cap)) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode < 0:
        raise _bad_image("%s: %s was killed by signal %d%s" % (
            where, what, -proc.returncode, " (%s)" % too_big if -proc.returncode == signal.SIGXFSZ else ""))
    return out, err.decode("utf-8", "replace"), proc.returncode


class ExtReader:
    """One ext2/3/4 file system of the image, read by debugfs runs (each opens it read-only, bitmaps unread)."""

    def __init__(self, tool: str, device: str, cwd: str, pass_fds: Tuple[int, ...], where: str) -> None:
        self.tool = tool
        self.device = device  # "/dev/fd/N?offset=BYTES" or an exported file's name in cwd
        self.cwd = cwd
        self.pass_fds = pass_fds
        self.where = where  # "partition 1 (ext4)", for messages

    def run(self, request: str, timeout: float = DEBUGFS_TIMEOUT_SEC, out_cap: int = DEBUGFS_OUTPUT_MAX_BYTES,
            fsize: Optional[int] = None) -> Tuple[bytes, str]:
        """stdout (at most out_cap bytes) and stderr of `debugfs -c -R REQUEST DEVICE`."""
        # -c: catastrophic mode, read-only, without reading the bitmaps (nothing here needs them).
        out, err, _ = _run_reader([self.tool, "-c", "-R", request, self.device], "debugfs " + request.split()[0],
                                  self.where, self.cwd, self.pass_fds, timeout, out_cap, fsize,
                                  "it wrote past the file's size")
        return out, err

    def _error(self, err: str, what: str) -> BootFilesError:
        return _bad_image("%s: debugfs cannot read %s: %s" % (self.where, what, _debugfs_error(err)))

    def check_open(self) -> None:
        """Refuse a file system debugfs cannot open (damaged superblock, features it does not know)."""
        out, err = self.run("stat /")
        m = _STAT_HEAD.search(out.decode("utf-8", "replace"))
        if not m or m.group(2) != "directory":
            raise _bad_image("%s: debugfs cannot open the file system: %s" % (self.where, _debugfs_error(err)))

    def stat(self, path: str) -> Optional[_Stat]:
        """The inode at `path` (intermediate symlinks followed by ext2fs, not the last one); None if absent."""
        _check_path(path)
        out, err = self.run("stat " + path)
        text = out.decode("utf-8", "replace")
        head = _STAT_HEAD.search(text)
        if head is None:
            if any(s in err for s in _NOT_FOUND):
                return None
            raise self._error(err, path)
        size = _STAT_SIZE.search(text)
        link = _FAST_LINK.search(text)
        return _Stat(head.group(2), int(size.group(1)) if size else 0, link.group(1) if link else None)

    def read(self, path: str, size: int) -> bytes:
        """The `size` bytes of the file at `path`, which stat found to be that long."""
        out, err = self.run("cat " + path, out_cap=size)
        if len(out) != size:
            raise self._error(err, "%s (%d of %d bytes)" % (path, len(out), size))
        return out

    def listdir(self, path: str) -> Optional[List[Tuple[str, str, int]]]:
        """(name, type "regular"/"symlink"/"other", size) of each entry of the folder; None if there is none."""
        st = self.stat(path)
        if st is None or st.type != "directory":
            return None
        out, err = self.run("ls -p " + path)
        entries = []
        for line in out.decode("utf-8", "replace").splitlines():
            m = _LS_LINE.match(line)
            if not m or m.group(3) in (".", ".."):
                continue
            mode = int(m.group(2), 8) & 0o170000
            kind = "regular" if mode == 0o100000 else "symlink" if mode == 0o120000 else "other"
            entries.append((m.group(3), kind, int(m.group(4) or 0)))
        return entries

    def dump(self, path: str, out_name: str, size: int, timeout: float = DUMP_TIMEOUT_SEC) -> None:
        """Copy the file at `path` (of `size` bytes, as stat said) to cwd/out_name, checked for its size."""
        _check_name(out_name)
        # Without -p: the image's owner and mode (Ubuntu's kernels are 0600 root) are not the store's business.
        _, err = self.run("dump %s %s" % (path, out_name), timeout=timeout, out_cap=DEBUGFS_OUTPUT_MAX_BYTES,
                          fsize=size + 1)
        try:
            got = os.stat(os.path.join(self.cwd, out_name)).st_size
        except FileNotFoundError:
            raise self._error(err, path) from None
        if got != size:
            raise self._error(err, "%s (%d of %d bytes)" % (path, got, size))


def find_grub_fstest() -> str:
    tool = shutil.which(GRUB_FSTEST, path=DEBUGFS_SEARCH_PATH)
    if tool is None:
        raise BootFilesError(ImageToolCode.TOOL_MISSING, "grub-fstest not found: install grub-common (it reads the "
                             "image's xfs and btrfs file systems)")
    return tool


class GrubReader:
    """One xfs or btrfs file system of the image (exported to a file), read by grub-fstest runs.

    GRUB's drivers are the ones that boot such an image, and they follow
    symlinks themselves (GRUB's limit: 8 levels), so no symlink is ever
    seen here. grub-fstest has no stat: a file's size is known by copying it
    out (`cp`, at most GRUB_FILE_MAX_BYTES through RLIMIT_FSIZE), once; its
    copy then serves `read` and `dump`.
    """

    def __init__(self, tool: str, device: str, cwd: str, where: str) -> None:
        self.tool = tool
        self.device = device  # the exported volume's file name in cwd
        self.cwd = cwd
        self.where = where
        self.copies = {}  # type: Dict[str, Tuple[str, int]]

    def run(self, args: List[str], timeout: float = DEBUGFS_TIMEOUT_SEC, fsize: Optional[int] = None,
            out_cap: int = DEBUGFS_OUTPUT_MAX_BYTES) -> Tuple[bytes, str, int]:
        """stdout, stderr and exit status of `grub-fstest DEVICE ARGS`."""
        return _run_reader([self.tool, self.device] + args, "grub-fstest " + args[0], self.where, self.cwd, (),
                           timeout, out_cap, fsize, "a file over %d MiB" % (GRUB_FILE_MAX_BYTES >> 20))

    def _error(self, err: str, what: str) -> BootFilesError:
        last = (err.strip().splitlines() or ["no message"])[-1]
        return _bad_image("%s: GRUB cannot read %s: %s" % (self.where, what, last.replace("grub-fstest: ", "")))

    def check_open(self) -> None:
        _, err, rc = self.run(["ls", "(loop0)/"])
        if rc != 0:
            raise _bad_image("%s: GRUB cannot open the file system: %s"
                             % (self.where, (err.strip().splitlines() or ["?"])[-1]))

    def stat(self, path: str) -> Optional[_Stat]:
        """A regular file (its copy made), a directory, or None if there is nothing at `path`."""
        _check_path(path)
        if path in self.copies:
            return _Stat("regular", self.copies[path][1], None)
        name = "grub-copy-%d" % len(self.copies)
        copy = os.path.join(self.cwd, name)
        _, err, rc = self.run(["cp", "(loop0)" + path, name], timeout=DUMP_TIMEOUT_SEC, fsize=GRUB_FILE_MAX_BYTES + 1)
        if rc != 0:
            if os.path.lexists(copy):
                os.unlink(copy)
            if "not found" in err:
                return None
            if "not a regular file" in err:
                return _Stat("directory", 0, None)
            raise self._error(err, path)
        size = os.stat(copy).st_size
        self.copies[path] = (name, size)
        return _Stat("regular", size, None)

    def read(self, path: str, size: int) -> bytes:
        name, got = self.copies[path]
        with open(os.path.join(self.cwd, name), "rb") as f:
            data = f.read(size + 1)
        if len(data) != size:
            raise self._error("", "%s (%d of %d bytes)" % (path, len(data), size))
        return data

    def listdir(self, path: str) -> Optional[List[Tuple[str, str, int]]]:
        st = self.stat(path)
        if st is None or st.type != "directory":
            return None
        out, err, rc = self.run(["ls", "(loop0)" + path])
        if rc != 0:
            raise self._error(err, path)
        return [(n[:-1], "other", 0) if n.endswith("/") else (n, "regular", 0)
                for n in out.decode("utf-8", "replace").split()]

    def dump(self, path: str, out_name: str, size: int, timeout: float = DUMP_TIMEOUT_SEC) -> None:
        _check_name(out_name)
        name, got = self.copies[path]
        if got != size:
            raise self._error("", "%s (%d of %d bytes)" % (path, got, size))
        os.replace(os.path.join(self.cwd, name), os.path.join(self.cwd, out_name))
        self.copies[path] = (out_name, got)


Reader = Union[ExtReader, GrubReader]  # stat, read, listdir, dump


class _TooMuchOutput(Exception):
    pass


def _communicate(proc: "subprocess.Popen[bytes]", deadline: float, out_cap: int) -> Tuple[bytes, bytes]:
    """Both pipes read to their end, stdout bounded by out_cap (else _TooMuchOutput), by the deadline."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    caps = {out_fd: out_cap, err_fd: DEBUGFS_ERRORS_MAX_BYTES}
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            for key, _ in sel.select(left):
                fd = key.fd
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(fd)
                    continue
                if fd == out_fd and len(bufs[fd]) + len(chunk) > out_cap:
                    raise _TooMuchOutput()
                if len(bufs[fd]) < caps[fd]:  # stderr past its cap is read and dropped
                    bufs[fd] += chunk
    proc.wait(max(0.0, deadline - time.monotonic()))
    return bytes(bufs[out_fd]), bytes(bufs[err_fd])


def _debugfs_error(err: str) -> str:
    """debugfs's complaint in one line: its first line after the banner, without the device's name."""
    for line in err.splitlines():
        line = line.strip()
        if not line or line.startswith("debugfs 1.") or line.startswith("catastrophic mode"):
            continue
        line = re.sub(r" while trying to open \S+", "", line)
        line = re.sub(r"^debugfs: ", "", line)
        return line[:MESSAGE_DETAIL_CHARS]
    return "no reason given"


def _check_path(path: str) -> None:
    """A path for a debugfs request: absolute, short, of characters its request syntax does not interpret."""
    if len(path) > PATH_MAX_CHARS or not _SAFE_PATH.match(path):
        raise _no_kernel("path %r in the image: only absolute paths of letters, digits and ._+~@%%:,=/- "
                         "up to %d characters are read" % (path[:MESSAGE_DETAIL_CHARS], PATH_MAX_CHARS))


def _check_name(name: str) -> None:
    if not _SAFE_NAME.match(name):
        raise ValueError("bad output name %r" % name)


# ---- the boot entry ----------------------------------------------------------------------------------------------

class Found(NamedTuple):
    """The default entry and where it was found."""

    entry: BootEntry
    volume: Volume  # the file system the config is on
    config: str  # the grub.cfg read, or "DIR/*.conf" for BLS entries
    bls_dir: Optional[str]  # BLS: the entries' folder


def resolve(fs: Reader, path: str, what: str) -> Tuple[str, Optional[_Stat]]:
    """(path with symlinks followed, its stat or None if absent); loops and deep chains refused."""
    seen = []  # type: List[str]
    for _ in range(SYMLINK_MAX_DEPTH + 1):
        st = fs.stat(path)
        if st is None or st.type != "symlink":
            return path, st
        target = st.link
        if target is None:  # a slow symlink: its target is its data
            if not 0 < st.size <= LINK_MAX_BYTES:
                raise _bad_image("%s: symlink %s is %d bytes long" % (fs.where, path, st.size))
            target = fs.read(path, st.size).decode("utf-8", "replace")
        seen.append(path)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if path.startswith("//"):
            path = path[1:]
        if path in seen:
            raise _no_kernel("%s %s: symlink loop on %s (%s)" % (what, seen[0], fs.where, " -> ".join(seen + [path])))
    raise _no_kernel("%s %s: more than %d levels of symlinks on %s" % (what, seen[0], SYMLINK_MAX_DEPTH, fs.where))


def _read_text(fs: Reader, path: str, limit: int, what: str) -> Optional[str]:
    """The file at `path` as text (symlinks followed), None if there is none; refused over `limit` bytes."""
    real, st = resolve(fs, path, what)
    if st is None:
        return None
    if st.type != "regular":
        raise _no_kernel("%s %s on %s is a %s, not a file" % (what, path, fs.where, st.type))
    if st.size > limit:
        raise _no_kernel("%s %s on %s is %d bytes, over the limit of %d" % (what, path, fs.where, st.size, limit))
    return fs.read(real, st.size).decode("utf-8", "replace")


def parse_grubenv(text: str) -> Dict[str, str]:
    """grub-editenv's file: NAME=VALUE lines (backslash escapes), '#' padding."""
    env = {}
    for line in text.split("\n"):
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and _GRUBENV_NAME.match(name):
            env[name] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
    return env


def _bls_entry(fs: Reader, folder: str, default: Optional[str], variables: Dict[str, str]) -> Optional[BootEntry]:
    """The default of the BLS entries in `folder`; None if it holds no *.conf file."""
    listing = fs.listdir(folder)
    names = sorted(n for n, kind, _ in listing or [] if n.lower().endswith(".conf") and kind != "other")
    if not names:
        return None
    if len(names) > BLS_MAX_FILES:
        raise _no_kernel("%s on %s has %d entries, over the limit of %d"
                         % (folder, fs.where, len(names), BLS_MAX_FILES))
    files = {}
    for name in names:
        if not _SAFE_NAME.match(name):
            continue  # a name debugfs would read as syntax: not one kernel-install writes
        text = _read_text(fs, folder + "/" + name, BLS_ENTRY_MAX_BYTES, "BLS entry")
        if text is not None:
            files[name] = text
    return default_bls_entry(files, default=default, variables=variables)


def find_entry(volumes: List[Volume], reader: Callable[[Volume], Reader]) -> Found:
    """The first default boot entry found on the readable volumes, in order; refusals say what was seen."""
    errors = []  # type: List[str]
    for vol in volumes:
        if not vol.readable:
            continue
        fs = reader(vol)
        for cfg in GRUB_CONFIGS:
            text = _read_text(fs, cfg, CONFIG_MAX_BYTES, "grub.cfg")
            if text is None:
                continue
            env_text = _read_text(fs, posixpath.join(posixpath.dirname(cfg), "grubenv"), GRUBENV_MAX_BYTES, "grubenv")
            grubenv = parse_grubenv(env_text) if env_text is not None else None
            try:
                return Found(default_grub_entry(text, grubenv), vol, cfg, None)
            except BootConfigError as e:
                if not _BLSCFG.search(text):
                    errors.append("%s on %s: %s" % (cfg, vol.where, e))
                    continue
            # Fedora's grub.cfg: the menu is the BLS entries of the same file system (blscfg), the default
            # grubenv's saved_entry, $kernelopts and the like grubenv's variables.
            folder = BLS_DIRS[0] if cfg.startswith("/boot/") else BLS_DIRS[1]
            try:
                entry = _bls_entry(fs, folder, (grubenv or {}).get("saved_entry"), grubenv or {})
            except BootConfigError as e:
                errors.append("%s on %s: %s" % (folder, vol.where, e))
                continue
            if entry is not None:
                return Found(entry, vol, folder + "/*.conf", folder)
            errors.append("%s on %s runs blscfg but %s has no entries" % (cfg, vol.where, folder))
        for folder in BLS_DIRS:
            try:
                entry = _bls_entry(fs, folder, None, {})
            except BootConfigError as e:
                errors.append("%s on %s: %s" % (folder, vol.where, e))
                continue
            if entry is not None:
                return Found(entry, vol, folder + "/*.conf", folder)
    unreadable = [v for v in volumes if v.fs is not None and not v.readable]
    if errors:
        raise _no_kernel("no bootable default entry: %s" % errors[0])
    if unreadable:
        v = unreadable[0]
        readable = [r.where for r in volumes if r.readable]
        raise BootFilesError(ImageToolCode.UNSUPPORTED,
                             "unsupported file system %s on %s: tenbox reads ext2/3/4, xfs and btrfs%s"
                             % (v.fs, v.where, " (%s: no boot configuration)" % ", ".join(readable)
                                if readable else ""))
    raise _no_kernel("no boot configuration found: none of %s, %s%s"
                     % (", ".join(GRUB_CONFIGS), ", ".join(d + "/*.conf" for d in BLS_DIRS), _looked_in(volumes)))


def _looked_in(volumes: List[Volume]) -> str:
    if not volumes:
        return " (no Linux partition)"
    seen = ["%s: %s" % (v.where, v.fs or "no file system known") for v in volumes]
    return " (%s)" % "; ".join(seen)


# ---- where the files are -----------------------------------------------------------------------------------------

def _split_device(path: str) -> Tuple[Optional[int], str]:
    """GRUB's "(hd0,gpt2)/vmlinuz" -> (2, "/vmlinuz"); "($root)/x" or "()/x" -> (None, "/x")."""
    m = _GRUB_DEVICE.match(path)
    if not m:
        return None, path
    part = _GRUB_PARTITION.match(m.group(1))
    return (int(part.group(1)) if part else None), path[m.end():]


def kernel_volume(found: Found, volumes: List[Volume], path: str) -> Volume:
    """The file system a kernel or initrd path of the entry is read from."""
    number, _ = _split_device(path)
    chosen = None  # type: Optional[Volume]
    if number is not None:
        chosen = next((v for v in volumes if v.number == number), None)
    elif found.entry.root_uuid:
        want = found.entry.root_uuid.lower()
        chosen = next((v for v in volumes if v.fs_uuid == want), None)
    if chosen is None:
        return found.volume  # GRUB's root stays the config's file system when the search finds nothing
    if not chosen.readable:
        raise BootFilesError(ImageToolCode.UNSUPPORTED, "unsupported file system %s on %s (the kernel's): "
                             "tenbox reads ext2/3/4, xfs and btrfs" % (chosen.fs, chosen.where))
    return chosen


def locate(found: Found, volumes: List[Volume], reader: Callable[[Volume], Reader], path: str,
           what: str) -> Tuple[Volume, str, int]:
    """(volume, path, size) of a regular file the entry names; absent ones refused naming the path."""
    vol = kernel_volume(found, volumes, path)
    fs = reader(vol)
    _, plain = _split_device(path)
    if not plain.startswith("/"):
        plain = "/" + plain  # BLS paths are relative to the entries' file system
    tries = [plain]
    if found.bls_dir == BLS_DIRS[0] and not plain.startswith("/boot/"):
        # BLS entries under /boot on the root file system may name their files from /boot's top, as on a
        # separate /boot.
        tries.append("/boot" + plain)
    for p in tries:
        real, st = resolve(fs, posixpath.normpath(p), what)
        if st is None:
            continue
        if st.type != "regular":
            raise _no_kernel("%s %s on %s is a %s, not a file" % (what, p, fs.where, st.type))
        return vol, real, st.size
    raise _no_kernel("%s %s not found on %s (named by %s, entry %r)"
                     % (what, plain, fs.where, found.config, found.entry.title[:MESSAGE_DETAIL_CHARS]))


def root_volume(cmdline: str, table: Table, volumes: List[Volume]) -> Optional[Volume]:
    """The partition the command line's root= names (UUID=, PARTUUID=, LABEL=, /dev/...), if it is one of these."""
    root = None
    for word in cmdline.split():
        if word.startswith("root="):
            root = word[len("root="):].strip('"')  # the kernel takes the last one
    if not root or table.kind == "none":
        return None
    for prefix, field in (("UUID=", "fs_uuid"), ("/dev/disk/by-uuid/", "fs_uuid"), ("PARTUUID=", "part_uuid"),
                          ("/dev/disk/by-partuuid/", "part_uuid"), ("LABEL=", "label"),
                          ("/dev/disk/by-label/", "label")):
        if root.startswith(prefix):
            value = root[len(prefix):]
            if field != "label":
                value = value.lower()
            return next((v for v in volumes if getattr(v, field) == value), None)
    m = _ROOT_DEV.match(root)
    if m:
        return next((v for v in volumes if v.number == int(m.group(1))), None)
    return None


# ---- extraction --------------------------------------------------------------------------------------------------

def check_bzimage(path: str, name: str) -> None:
    """Refuse a kernel that is not an x86-64 bzImage, naming what it is (kernel_kind)."""
    kind = kernel_kind.identify_file(path)
    if kind == kernel_kind.KernelKind("x86_64", "bzImage"):
        return
    what = kind.describe() if kind.format else "no 'HdrS' at 0x202"
    raise BootFilesError(ImageToolCode.UNSUPPORTED, "not an x86 bzImage: %s (%s)" % (name, what))


def export_volume(disk: Disk, vol: Volume, path: str) -> None:
    """Copy the volume's bytes into a new sparse file: only nonzero chunks are written."""
    if vol.size > EXPORT_MAX_BYTES:
        raise _bad_image("%s is %d GiB: over the limit of %d GiB for a qcow2 image's partition (convert the image "
                         "to raw: qemu-img convert -O raw)" % (vol.where, vol.size >> 30, EXPORT_MAX_BYTES >> 30))
    deadline = time.monotonic() + EXPORT_TIMEOUT_SEC
    zero = bytes(EXPORT_CHUNK_BYTES)
    buf = bytearray(EXPORT_CHUNK_BYTES)
    view = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, vol.size)
        done = 0
        while done < vol.size:
            if time.monotonic() > deadline:
                raise _bad_image("%s: reading it took more than %.0f s" % (vol.where, EXPORT_TIMEOUT_SEC))
            n = min(EXPORT_CHUNK_BYTES, vol.size - done)
            disk.readv(vol.start + done, [view[:n]])
            if (buf if n == EXPORT_CHUNK_BYTES else bytes(view[:n])) != zero[:n]:
                written = 0
                while written < n:
                    written += os.pwrite(fd, view[written:n], done + written)
            done += n
    finally:
        os.close(fd)


class _Session:
    """One image's volumes, each with its debugfs reader made on first use (a qcow2 volume exported then)."""

    def __init__(self, disk: Disk, image_fd: Optional[int], work: str, tool: str) -> None:
        self.disk = disk
        self.image_fd = image_fd  # raw images: debugfs reads the image at the partition's offset
        self.work = work
        self.tool = tool
        self.readers = {}  # type: Dict[Optional[int], Reader]
        self.scratch = None  # type: Optional[str]

    def close(self) -> None:
        if self.scratch is not None:
            _remove_tree(self.scratch)

    def reader(self, vol: Volume) -> Reader:
        fs = self.readers.get(vol.number)
        if fs is None:
            where = "%s (%s)" % (vol.where, vol.fs)
            if vol.fs in GRUB_FS:
                # grub-fstest opens its image by its canonical path: the work folder inside tenboxd's
                # store is not the worker user's to traverse, so GRUB's volumes go to a folder of its own.
                if self.scratch is None:
                    self.scratch = tempfile.mkdtemp(prefix="tenbox-boot-files-", dir=GRUB_SCRATCH_DIR)
                name = os.path.join(self.scratch, "volume-%s.raw" % ("disk" if vol.number is None else vol.number))
                export_volume(self.disk, vol, name)
                fs = GrubReader(find_grub_fstest(), name, self.work, where)
            elif self.image_fd is not None:
                fs = ExtReader(self.tool, "/dev/fd/%d?offset=%d" % (self.image_fd, vol.start), self.work,
                               (self.image_fd,), where)
            else:
                name = "volume-%s.raw" % ("disk" if vol.number is None else vol.number)
                export_volume(self.disk, vol, os.path.join(self.work, name))
                fs = ExtReader(self.tool, name, self.work, (), where)
            fs.check_open()
            self.readers[vol.number] = fs
        return fs


def _extract(disk: Disk, image_fd: Optional[int], work: str, tool: str) -> Dict[str, Any]:
    read = disk_reader(disk)
    try:
        table = read_table(read, disk.size)
    except PartitionError as e:
        raise _bad_image("partition table refused: %s" % e) from None
    volumes = candidate_volumes(table, disk.size, read)
    session = _Session(disk, image_fd, work, tool)
    try:
        return _extract_with(session, table, volumes)
    finally:
        session.close()


def _extract_with(session: "_Session", table: Table, volumes: List[Volume]) -> Dict[str, Any]:
    work = session.work
    found = find_entry(volumes, session.reader)
    entry = found.entry

    kvol, kpath, ksize = locate(found, volumes, session.reader, entry.kernel, "kernel")
    if ksize > KERNEL_MAX_BYTES:
        raise _bad_image("kernel %s is %d bytes, over the limit of %d" % (kpath, ksize, KERNEL_MAX_BYTES))
    if ksize == 0:
        raise _no_kernel("kernel %s on %s is empty" % (kpath, kvol.where))
    session.reader(kvol).dump(kpath, KERNEL_NAME, ksize)
    check_bzimage(os.path.join(work, KERNEL_NAME), kpath)

    initrds = [locate(found, volumes, session.reader, p, "initrd") for p in entry.initrds]
    total = sum(_aligned(size) for _, _, size in initrds)
    if total > INITRD_MAX_BYTES:
        raise _bad_image("initrds of %d bytes together, over the limit of %d" % (total, INITRD_MAX_BYTES))
    if len(initrds) == 1:
        vol, path, size = initrds[0]
        session.reader(vol).dump(path, INITRD_NAME, size)
    elif initrds:
        _concatenate(session, initrds, os.path.join(work, INITRD_NAME))
    cmdline_root = root_volume(entry.options, table, volumes)
    return {
        "kernel": KERNEL_NAME,
        "initrd": INITRD_NAME if initrds else None,
        "cmdline": entry.options,
        "title": entry.title,
        "table": table.kind,
        "root_partition": cmdline_root.number if cmdline_root else None,
        "boot_partition": kvol.number,
        "fs_uuid": kvol.fs_uuid,
        "config": found.config,
        "kernel_path": kpath,
        "initrd_paths": [p for _, p, _ in initrds],
    }


def _aligned(size: int) -> int:
    return -(-size // INITRD_ALIGN) * INITRD_ALIGN


def _concatenate(session: _Session, initrds: List[Tuple[Volume, str, int]], out: str) -> None:
    """Several initrds as one file, in order, each padded with zeros to 4 bytes as GRUB lays them out in memory.

    Linux unpacks one initramfs made of several (compressed or plain) cpio archives one after another, and
    skips the zeros between them (init/initramfs.c): what GRUB hands it for `initrd A B` is this file.
    """
    with open(out, "xb") as dst:
        for i, (vol, path, size) in enumerate(initrds):
            part = "initrd-part-%d" % i
            session.reader(vol).dump(path, part, size)
            part_path = os.path.join(session.work, part)
            with open(part_path, "rb") as src:
                shutil.copyfileobj(src, dst, EXPORT_CHUNK_BYTES)
            os.unlink(part_path)
            if i + 1 < len(initrds):
                dst.write(bytes(_aligned(size) - size))


def _check_out_dir(out_dir: str) -> None:
    try:
        st = os.stat(out_dir)
    except PermissionError:
        raise BootFilesError(ImageToolCode.DENIED, "--out %s: this user (uid %d) cannot reach it"
                             % (out_dir, os.getuid())) from None
    except OSError as e:
        raise BootFilesError(ImageToolCode.USAGE, "--out %s: %s" % (out_dir, e.strerror)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise BootFilesError(ImageToolCode.USAGE, "--out %s is not a folder" % out_dir)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise BootFilesError(ImageToolCode.DENIED, "--out %s: this user (uid %d) cannot write into it"
                             % (out_dir, os.getuid()))
    for name in (KERNEL_NAME, INITRD_NAME):
        if os.path.lexists(os.path.join(out_dir, name)):
            raise BootFilesError(ImageToolCode.USAGE, "%s already exists; not overwriting it"
                                 % os.path.join(out_dir, name))


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except OSError as e:  # cleanup after a refusal must not hide it; say what is left behind
        sys.stderr.write("tenbox-image: warning: cannot remove %s: %s\n" % (path, e.strerror))


def open_image(image: str, fd: int) -> Disk:
    """The image read-only (raw or qcow2 by its magic), a qcow2 backing file refused before it is opened."""
    passed_files.add(image, os.dup(fd))  # the disk code opens `image` through passed_files: it takes this copy
    if os.pread(fd, len(QCOW2_MAGIC), 0) != QCOW2_MAGIC:
        return RawDisk(image, read_only=True, probed=True)

    def refuse_backing(name: str, fmt: Optional[str]) -> Disk:
        raise _bad_image("%s has a backing file (%s): it would expose another file; import a standalone image "
                         "(qemu-img convert -O qcow2 IMAGE NEW)" % (image, name))
    return Qcow2Disk(image, read_only=True, open_backing=refuse_backing)


def _reopenable(fd: int) -> bool:
    """Whether a child of this user can open the image as /dev/fd/N: tenboxd passes a descriptor of a file the
    tool's user may not open itself (then the partition is exported, as for qcow2)."""
    try:
        os.close(os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def extract_boot_files(image: str, out_dir: str) -> Dict[str, Any]:
    """Find the image's default boot entry, write its kernel and initrd into out_dir; the JSON answer.

    The image is read through the descriptor tenboxd passed for it (`--fd N:IMAGE`, passed_files), else
    opened here. Raises BootFilesError (a refusal), DiskError (the image cannot be opened or read),
    OSError (out_dir).
    """
    tool = find_debugfs()
    _check_out_dir(out_dir)
    fd = passed_files.open_fd(image, os.O_RDONLY)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise _bad_image("%s is a folder, not a disk image" % image)
        with open_image(image, fd) as disk:
            # debugfs reads a raw image itself at the partition's offset where it can open it.
            direct = disk.format == "raw" and _reopenable(fd)
            work = tempfile.mkdtemp(prefix=".boot-files-", dir=out_dir)
            try:
                answer = _extract(disk, fd if direct else None, work, tool)
                _install(work, out_dir)
            finally:
                _remove_tree(work)
    finally:
        os.close(fd)
    return answer


def _install(work: str, out_dir: str) -> None:
    """Move the kernel and initrd from the work folder into out_dir: both, or neither."""
    moved = []  # type: List[str]
    try:
        for name in (KERNEL_NAME, INITRD_NAME):
            src = os.path.join(work, name)
            if os.path.exists(src):
                os.chmod(src, 0o644)
                os.rename(src, os.path.join(out_dir, name))
                moved.append(os.path.join(out_dir, name))
    except OSError:
        for path in moved:
            os.unlink(path)
        raise
