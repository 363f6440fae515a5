"""The image store: <data_dir>/images/<name>/ holds a manifest, a kernel, an initrd and a rootfs template (daemon, root).

An image enters the store only through an import: its manifest is checked,
every file it names is copied into a hidden folder beside the store while
its sha256 is computed, and the folder is renamed into place only when
every digest matched. The sources are read through descriptors that
caller_files.py opened with the rights of the user who asked: an import
copies nothing that user could not read. A failed, refused or interrupted import leaves nothing
behind (and a crash leaves a hidden folder that the next start removes).
Templates are never written: the files are made read-only (0444), VMs use
the rootfs only as the read-only backing file of their own qcow2 overlay.

The copying and hashing run on a thread, never on the daemon's event loop.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tenbox_supervisor.fsutil import atomic_write_json, entry_folders, fsync_dir
from tenbox_supervisor.modes import IMAGES_DIR_MODE
from tenbox_supervisor.protocol import NAME_RE, ErrorCode

log = logging.getLogger("tenboxd.images")

MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 1 << 20
MANIFEST_VERSION = 1
FILES_MAX = 32
FILE_SIZE_MAX = 1 << 42  # 4 TiB
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
TEXT_MAX = 256
CMDLINE_MAX = 4096
ROOTFS_FORMATS = ("qcow2", "raw")
# Free space an import leaves untouched: the store shares its file system with the VMs' overlays.
SPACE_RESERVE_BYTES = 256 << 20
COPY_BLOCK = 1 << 20
_ZEROS = bytes(COPY_BLOCK)
TMP_PREFIX = ".import-"
DISK_STAGED = "disk.staged"  # a cloud image's disk in the import folder, before its format is known
TRASH_PREFIX = ".deleted-"
TEMPLATE_MODE = 0o444
HOST_ARCH = platform.machine()


class ImageError(Exception):
    """A refusal with the control protocol's error code and a one-line message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ImportCancelled(Exception):
    """The import was abandoned (the daemon is stopping)."""


# Manifests ----------------------------------------------------------------------------------


def _text(m: Dict[str, Any], key: str, limit: int = TEXT_MAX) -> Optional[str]:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: %s must be printable text of at most %d characters"
                         % (key, limit))
    return value


def parse_manifest(raw: bytes) -> Dict[str, Any]:
    """A manifest's JSON, checked: the files with their sizes and sha256, which is the kernel, initrd, rootfs.

    Raises ImageError (image_corrupt; invalid_argument for a manifest this
    tenbox does not understand or an image for another architecture).
    """
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: larger than 1 MiB")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: not valid JSON (%s)" % e) from None
    if not isinstance(m, dict):
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: not a JSON object")
    version = m.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: manifest_version is missing")
    if version > MANIFEST_VERSION:
        raise ImageError(ErrorCode.INVALID_ARGUMENT, "manifest: version %d is newer than this tenbox reads (%d)"
                         % (version, MANIFEST_VERSION))
    files = m.get("files")
    if not isinstance(files, dict) or not 1 <= len(files) <= FILES_MAX:
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: files must name 1 to %d files" % FILES_MAX)
    for fn, entry in files.items():
        if not FILE_RE.match(fn) or fn == MANIFEST:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: %r is not a plain file name" % fn)
        if not isinstance(entry, dict):
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: files.%s must be an object" % fn)
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= FILE_SIZE_MAX:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: files.%s.size must be a byte count" % fn)
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: files.%s.sha256 must be 64 lowercase hex digits" % fn)
    for key, required in (("kernel", True), ("rootfs", True), ("initrd", False)):
        value = m.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, str) or value not in files:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: %s must name one of its files" % key)
    if m.get("rootfs_format", "qcow2") not in ROOTFS_FORMATS:
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: rootfs_format must be qcow2 or raw")
    cmdline = _text(m, "cmdline", CMDLINE_MAX)
    if cmdline is not None and any(ord(c) > 126 for c in cmdline):
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "manifest: cmdline must be printable ASCII")
    for key in ("name", "version", "arch", "kernel_release", "created_at", "imported_at"):
        _text(m, key)
    arch = m.get("arch")
    if arch is not None and arch != HOST_ARCH:
        raise ImageError(ErrorCode.INVALID_ARGUMENT, "the image is for %s, this host is %s" % (arch, HOST_ARCH))
    return m


def read_manifest(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(MANIFEST_MAX_BYTES + 1)
    return parse_manifest(raw)


def read_manifest_fd(fd: int) -> Dict[str, Any]:
    """A manifest read through a descriptor (from its start, at most 1 MiB and a byte), checked."""
    chunks: List[bytes] = []
    got = 0
    while got <= MANIFEST_MAX_BYTES:
        chunk = os.pread(fd, MANIFEST_MAX_BYTES + 1 - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return parse_manifest(b"".join(chunks))


# Copying --------------------------------------------------------------------------------------


@dataclass
class Progress:
    """How far an import is; read by image.list from the event loop, written by the copying thread."""

    name: str
    bytes_total: int
    bytes_done: int = 0
    file: str = ""
    started_at: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)

    def view(self) -> Dict[str, Any]:
        return {"name": self.name, "state": "importing", "file": self.file, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "started_at": self.started_at}


def copy_and_hash(src_fd: int, src: str, dst: str, expected_size: int, progress: Optional[Progress] = None) -> str:
    """Copy the file open as src_fd (`src` in messages) to a new file dst, at most expected_size + 1 bytes.

    Returns the sha256 of what was copied. The file is read once, from its
    start, through the descriptor: what is hashed is what is written. Blocks of zeros become holes (a raw template
    stays sparse). Returns the hex digest; the caller compares it and the
    size with the manifest.
    """
    h = hashlib.sha256()
    copied = 0
    with open(dst, "xb") as fout:
        while copied <= expected_size:
            if progress is not None and progress.cancel.is_set():
                raise ImportCancelled()
            block = os.pread(src_fd, min(COPY_BLOCK, expected_size + 1 - copied), copied)
            if not block:
                break
            h.update(block)
            if block == _ZEROS[:len(block)]:
                fout.seek(len(block), os.SEEK_CUR)
            else:
                fout.write(block)
            copied += len(block)
            if progress is not None:
                progress.bytes_done += len(block)
        fout.truncate(copied)  # a hole at the end still counts
        fout.flush()
        os.fsync(fout.fileno())
    if copied != expected_size:
        raise ImageError(ErrorCode.IMAGE_CORRUPT, "%s: %s bytes, the manifest says %d"
                         % (src, "more than %d" % expected_size if copied > expected_size else str(copied), expected_size))
    return h.hexdigest()


def hash_file(path: str, progress: Optional[Progress] = None) -> Tuple[int, str]:
    """(size, sha256) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            if progress is not None and progress.cancel.is_set():
                raise ImportCancelled()
            block = f.read(COPY_BLOCK)
            if not block:
                return size, h.hexdigest()
            h.update(block)
            size += len(block)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# The store ------------------------------------------------------------------------------------


@dataclass
class Image:
    """One stored image: its folder and checked manifest."""

    name: str
    path: str
    manifest: Dict[str, Any]

    def file(self, key: str) -> Optional[str]:
        fn = self.manifest.get(key)
        return os.path.join(self.path, fn) if fn else None

    @property
    def kernel(self) -> str:
        return self.file("kernel")  # type: ignore[return-value]

    @property
    def initrd(self) -> Optional[str]:
        return self.file("initrd")

    @property
    def rootfs(self) -> str:
        return self.file("rootfs")  # type: ignore[return-value]

    def view(self) -> Dict[str, Any]:
        m = self.manifest
        files = m["files"]
        return {
            "name": self.name,
            "state": "ready",
            "path": self.path,
            "version": m.get("version"),
            "arch": m.get("arch"),
            "os": m.get("os") if isinstance(m.get("os"), dict) else None,
            "kernel": self.kernel,
            "kernel_release": m.get("kernel_release"),
            "initrd": self.initrd,
            "rootfs": self.rootfs,
            "rootfs_format": m.get("rootfs_format", "qcow2"),
            "virtual_size": m.get("virtual_size") if isinstance(m.get("virtual_size"), int) else None,
            "cmdline": m.get("cmdline"),
            "size": sum(f["size"] for f in files.values()),
            "created_at": m.get("created_at"),
            "imported_at": m.get("imported_at"),
        }


@dataclass
class ImportSource:
    """Where the manifest and each file it names are, before the import."""

    manifest_path: str
    files: Dict[str, str]  # file name in the manifest -> source path


def resolve_sources(paths: List[str], folder: bool) -> ImportSource:
    """Where the manifest and the files are.

    `folder`: a folder with manifest.json (or a manifest's path, its files
    beside it); else files of which one is named *.json (the manifest) and
    the others by name.

    Only the names are looked at: the files are opened later, with the
    caller's rights. Raises ImageError(invalid_argument) for a set of files
    that does not fit together.
    """
    if folder:
        path = paths[0]
        return ImportSource(path if path.endswith(".json") else os.path.join(path, MANIFEST), {})
    manifests = [p for p in paths if p.endswith(".json")]
    if len(manifests) != 1:
        raise ImageError(ErrorCode.INVALID_ARGUMENT,
                         "give a folder with %s, or files of which exactly one is the manifest (*.json)" % MANIFEST)
    files: Dict[str, str] = {}
    for p in paths:
        if p in manifests:
            continue
        base = os.path.basename(p)
        if base in files:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, "two files are named %s" % base)
        files[base] = p
    return ImportSource(manifests[0], files)


def source_plan(source: ImportSource, manifest: Dict[str, Any]) -> Dict[str, str]:
    """Each file the manifest names -> its source path; ImageError if one is not given, or one given is not named."""
    folder = os.path.dirname(source.manifest_path)
    plan: Dict[str, str] = {}
    for fn in manifest["files"]:
        src = source.files.get(fn) if source.files else os.path.join(folder, fn)
        if src is None:
            raise ImageError(ErrorCode.FILE_MISSING, "the manifest names %s, which is not among the files given" % fn)
        plan[fn] = src
    extra = sorted(set(source.files) - set(plan)) if source.files else []
    if extra:
        raise ImageError(ErrorCode.INVALID_ARGUMENT, "the manifest does not name %s" % ", ".join(extra))
    return plan


# A source file: the path it was named by (for messages) and the descriptor it is read through.
Sources = Dict[str, Tuple[str, int]]


class ImageStore:
    """Image folders under `images_dir`."""

    def __init__(self, images_dir: str) -> None:
        self.images_dir = images_dir
        self.pending: Dict[str, Progress] = {}
        os.makedirs(images_dir, exist_ok=True)
        os.chmod(images_dir, IMAGES_DIR_MODE)  # tenboxd's umask is 027; the group reads images
        self._sweep()

    def _sweep(self) -> None:
        """Remove what an import or removal cut short by a crash left behind."""
        for entry in os.listdir(self.images_dir):
            if entry.startswith(TMP_PREFIX) or entry.startswith(TRASH_PREFIX):
                log.warning("removing %s, left by an interrupted import or removal", entry)
                remove_tree(os.path.join(self.images_dir, entry))

    def image_dir(self, name: str) -> str:
        if not NAME_RE.match(name):
            raise ImageError(ErrorCode.INVALID_ARGUMENT, "image names match [A-Za-z0-9-]{1,64}")
        return os.path.join(self.images_dir, name)

    def get(self, name: str) -> Image:
        path = self.image_dir(name)
        if not os.path.isdir(path):
            if name in self.pending:
                raise ImageError(ErrorCode.IMAGE_NOT_FOUND, "image %s is still being imported" % name)
            raise ImageError(ErrorCode.IMAGE_NOT_FOUND, "no image named %r (tenbox image ls lists them)" % name)
        try:
            return Image(name, path, read_manifest(os.path.join(path, MANIFEST)))
        except OSError as e:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "image %s: cannot read its manifest: %s" % (name, e.strerror))
        except ImageError as e:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "image %s: %s" % (name, e.message))

    def list(self) -> Tuple[List[Image], Dict[str, str]]:
        """(images, reasons by name for folders that are not usable images)."""
        images: List[Image] = []
        broken: Dict[str, str] = {}
        for name in entry_folders(self.images_dir, NAME_RE, log):
            try:
                images.append(self.get(name))
            except ImageError as e:
                broken[name] = e.message
        return images, broken

    def free_bytes(self) -> int:
        st = os.statvfs(self.images_dir)
        return st.f_bavail * st.f_frsize

    # Import ---------------------------------------------------------------------------------

    def prepare_import(self, name: Optional[str], manifest: Dict[str, Any], sources: Sources) -> Tuple[str, Progress]:
        """Every check that needs no hashing, on a checked manifest and its open sources: (name, progress).

        Registers the import as pending, so a second import of the same name
        is refused until this one ends (finish_import or end_import).
        """
        if name is None:
            name = manifest.get("name")
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ImageError(ErrorCode.INVALID_ARGUMENT, "the manifest's name is not a usable image name; give one")
        final = self.image_dir(name)
        if os.path.lexists(final):
            raise ImageError(ErrorCode.IMAGE_EXISTS, "an image named %r exists; remove it or import under another name" % name)
        if name in self.pending:
            raise ImageError(ErrorCode.IMAGE_EXISTS, "an image named %r is being imported right now" % name)
        for fn, entry in manifest["files"].items():
            src, fd = sources[fn]
            size = os.fstat(fd).st_size
            if size != entry["size"]:
                raise ImageError(ErrorCode.IMAGE_CORRUPT, "%s has %d bytes, the manifest says %d" % (src, size, entry["size"]))
        total = sum(e["size"] for e in manifest["files"].values())
        free = self.free_bytes()
        if total + SPACE_RESERVE_BYTES > free:
            raise ImageError(ErrorCode.INSUFFICIENT_SPACE, "image %s needs %s (and %s to spare); %s has %s free"
                             % (name, _human(total), _human(SPACE_RESERVE_BYTES), self.images_dir, _human(free)))
        progress = Progress(name, total)
        self.pending[name] = progress
        return name, progress

    def copy_files(self, name: str, manifest: Dict[str, Any], sources: Sources, progress: Progress) -> str:
        """Copy and check every file into a hidden folder (a thread runs this); that folder's path.

        Any failure removes the folder and raises ImageError (image_corrupt
        for a digest or size that differs, insufficient_space for ENOSPC).
        """
        tmp = os.path.join(self.images_dir, "%s%s-%s" % (TMP_PREFIX, name, secrets.token_hex(4)))
        os.mkdir(tmp, 0o755)
        try:
            for fn in sorted(sources):
                progress.file = fn
                entry = manifest["files"][fn]
                src, fd = sources[fn]
                digest = copy_and_hash(fd, src, os.path.join(tmp, fn), entry["size"], progress)
                if digest != entry["sha256"]:
                    raise ImageError(ErrorCode.IMAGE_CORRUPT, "%s: sha256 %s, the manifest says %s"
                                     % (src, digest, entry["sha256"]))
            return tmp
        except OSError as e:
            remove_tree(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ImageError(ErrorCode.INSUFFICIENT_SPACE, "the disk of %s filled up during the import"
                                 % self.images_dir) from None
            raise ImageError(ErrorCode.STORE_FAILED, "cannot copy %s: %s" % (e.filename or "a file", e.strerror)) from None
        except BaseException:
            remove_tree(tmp)
            raise

    def copy_disk(self, name: str, src: str, fd: int, size: int, expected_sha256: Optional[str],
                  progress: Progress) -> Tuple[str, str]:
        """A cloud image's disk copied into a new hidden folder as DISK_STAGED (a thread runs this): (folder, sha256).

        Its sha256, computed while copying, must be `expected_sha256` when one
        was given (image_corrupt otherwise); the folder is removed on any failure.
        """
        tmp = os.path.join(self.images_dir, "%s%s-%s" % (TMP_PREFIX, name, secrets.token_hex(4)))
        os.mkdir(tmp, 0o755)
        try:
            progress.file = os.path.basename(src)
            digest = copy_and_hash(fd, src, os.path.join(tmp, DISK_STAGED), size, progress)
            if expected_sha256 is not None and digest != expected_sha256:
                raise ImageError(ErrorCode.IMAGE_CORRUPT, "%s: sha256 %s, --sha256 says %s" % (src, digest, expected_sha256))
            return tmp, digest
        except OSError as e:
            remove_tree(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ImageError(ErrorCode.INSUFFICIENT_SPACE, "the disk of %s filled up during the import"
                                 % self.images_dir) from None
            raise ImageError(ErrorCode.STORE_FAILED, "cannot copy %s: %s" % (src, e.strerror)) from None
        except BaseException:
            remove_tree(tmp)
            raise

    def finish_import(self, name: str, tmp: str, manifest: Dict[str, Any]) -> Image:
        """Write the store's manifest, make the files read-only, rename the folder into place (a thread runs this)."""
        try:
            stored = dict(manifest, imported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            stored.setdefault("name", name)
            for fn in manifest["files"]:
                os.chmod(os.path.join(tmp, fn), TEMPLATE_MODE)
            atomic_write_json(os.path.join(tmp, MANIFEST), stored, mode=TEMPLATE_MODE)
            final = self.image_dir(name)
            if os.path.lexists(final):
                raise ImageError(ErrorCode.IMAGE_EXISTS, "an image named %r appeared during the import" % name)
            os.chmod(tmp, IMAGES_DIR_MODE)  # made under tenboxd's umask 027; the group reads images
            os.rename(tmp, final)
            fsync_dir(self.images_dir)
        except OSError as e:
            remove_tree(tmp)
            raise ImageError(ErrorCode.STORE_FAILED, "cannot store image %s: %s" % (name, e.strerror)) from None
        except BaseException:
            remove_tree(tmp)
            raise
        return Image(name, final, stored)

    def discard(self, tmp: str) -> None:
        remove_tree(tmp)

    def end_import(self, name: str) -> None:
        self.pending.pop(name, None)

    # Removal ----------------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Rename the folder out of the store, then delete it (a thread runs this)."""
        path = self.image_dir(name)
        trash = os.path.join(self.images_dir, "%s%s-%d" % (TRASH_PREFIX, name, int(time.time() * 1000)))
        try:
            os.rename(path, trash)
            fsync_dir(self.images_dir)
        except OSError as e:
            raise ImageError(ErrorCode.STORE_FAILED, "cannot remove image %s: %s" % (name, e.strerror)) from None
        remove_tree(trash)

    # Checking -------------------------------------------------------------------------------

    def verify(self, image: Image, progress: Optional[Progress] = None) -> List[str]:
        """Hash every file again (a thread runs this); the problems found, none if it is as imported."""
        problems = []
        for fn, entry in sorted(image.manifest["files"].items()):
            path = os.path.join(image.path, fn)
            try:
                size, digest = hash_file(path, progress)
            except OSError as e:
                problems.append("%s: %s" % (fn, e.strerror))
                continue
            if size != entry["size"]:
                problems.append("%s: %d bytes, the manifest says %d" % (fn, size, entry["size"]))
            elif digest != entry["sha256"]:
                problems.append("%s: sha256 differs from the manifest" % fn)
        return problems


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return "%.1f %s" % (n / (1 << shift), unit)
    return "%d bytes" % n


def path_in(path: str, folder: str) -> bool:
    """Whether `path` (symlinks resolved) lies inside `folder`."""
    real = os.path.realpath(path)
    base = os.path.realpath(folder)
    return real.startswith(base + os.sep)

