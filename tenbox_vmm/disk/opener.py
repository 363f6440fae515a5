"""open_disk: format detection and backing chains (worker; create_qcow2 uses it to check a backing file).

Pass `fmt` for any image a guest has written to: probing a raw image lets a
guest that wrote a qcow2 header into its disk pick a host file as backing
file. A probed raw image therefore refuses writes that would create a qcow2
magic at offset 0 (see raw.py).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from tenbox_vmm.disk import backing
from tenbox_vmm.disk.base import Disk
from tenbox_vmm.disk.errors import BackingFileError
from tenbox_vmm.disk.fileio import ImageFile
from tenbox_vmm.disk.qcow2.image import Qcow2Disk
from tenbox_vmm.disk.raw import RawDisk


def open_disk(path: str, read_only: bool = False, fmt: Optional[str] = None) -> Disk:
    """Open a raw or qcow2 image (format probed by magic when `fmt` is None) with its backing chain."""
    return _open(path, read_only, fmt, ())


def _open(path: str, read_only: bool, fmt: Optional[str], chain: Tuple[Tuple[int, int], ...],
          file_factory: Optional[Callable[[str, bool], ImageFile]] = None, top: Optional[str] = None) -> Disk:
    backing.check_format(path, fmt)
    probed = fmt is None
    if fmt is None:
        fmt = backing.probe(path)
    ident = backing.identity(path)
    if ident in chain:
        raise BackingFileError("%s: the backing chain loops back to this file" % path)
    kw = {} if file_factory is None else {"file_factory": file_factory}
    if fmt == "raw":
        return RawDisk(path, read_only, probed=probed, **kw)

    def open_backing(name: str, bfmt: Optional[str]) -> Disk:
        bpath = backing.locate(path, name, bfmt, len(chain) + 1, top or path)
        return _open(bpath, True, bfmt, chain + (ident,), top=top or path)

    return Qcow2Disk(path, read_only, open_backing=open_backing, **kw)
