"""Backing-file names: resolving them, probing formats, guarding chains (worker; also daemon/CLI via info and create).

A relative backing file name is relative to the folder of the image that
names it (QEMU's rule), an absolute one is used as is. "file:" prefixes are
stripped; other QEMU protocol names (nbd:, json:, ...) are refused. A chain
is at most BACKING_CHAIN_MAX images deep (reads recurse once per level) and
may not loop.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

from tenbox_vmm import passed_files
from tenbox_vmm.disk.errors import BackingFileError, DiskError, DiskUnsupported
from tenbox_vmm.protocol.limits import Limits

BACKING_CHAIN_MAX = Limits.BACKING_CHAIN_MAX
FORMATS = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"


def resolve(image_path: str, name: str) -> str:
    """The path of backing file `name` as named by the image at `image_path`."""
    proto = _protocol(name)
    if proto == "file":
        name = name[len("file:"):]
    elif proto is not None:
        raise DiskUnsupported("%s: backing file %r uses QEMU's %r protocol; tenbox opens plain files only"
                              % (image_path, name, proto))
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def _protocol(name: str) -> Optional[str]:
    """QEMU's path_has_protocol: a ':' before any '/' makes a protocol prefix."""
    for i, ch in enumerate(name):
        if ch == "/":
            return None
        if ch == ":":
            return name[:i]
    return None


def probe(path: str) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw'."""
    try:
        head = passed_files.read_head(path, len(QCOW2_MAGIC))
    except FileNotFoundError:
        raise DiskError("%s: no such file" % path) from None
    except IsADirectoryError:
        raise DiskError("%s: is a directory, not a disk image" % path) from None
    except OSError as e:
        raise DiskError("%s: cannot read: %s" % (path, e.strerror)) from None
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def check_format(path: str, fmt: Optional[str]) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise DiskUnsupported("%s: image format %r is not supported (raw, qcow2)" % (path, fmt))


def identity(path: str) -> Tuple[int, int]:
    try:
        st = passed_files.stat(path)
    except FileNotFoundError:
        raise DiskError("%s: no such file" % path) from None
    except OSError as e:
        raise DiskError("%s: cannot stat: %s" % (path, e.strerror)) from None
    return st.st_dev, st.st_ino


def locate(image_path: str, name: str, fmt: Optional[str], depth: int, top: Optional[str] = None) -> str:
    """Resolve and check link `depth` (1 = the top image's backing file) of a chain.

    BackingFileError naming the file if it is missing, or if the chain is too deep.
    """
    if depth > BACKING_CHAIN_MAX:
        raise BackingFileError("%s: backing chain deeper than %d images" % (top or image_path, BACKING_CHAIN_MAX))
    path = resolve(image_path, name)
    if fmt is not None and fmt not in FORMATS:
        raise DiskUnsupported("%s: backing file %s has format %r; tenbox supports raw and qcow2 backing files"
                              % (image_path, path, fmt))
    if not passed_files.exists(path):
        raise BackingFileError("%s: backing file %r is missing (looked for %s)" % (image_path, name, path))
    return path
