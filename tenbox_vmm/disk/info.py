"""image_info: format, sizes, features and backing chain of an image (daemon/CLI through imagetool; worker).

Reads headers only and takes no locks, like `qemu-img info -U`: it works on
the disk of a running VM. Every backing file is resolved and its header
read, so a missing backing file is reported (by name) here too.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from tenbox_vmm.disk import backing
from tenbox_vmm.disk.errors import BackingFileError
from tenbox_vmm.disk.fileio import ImageFile
from tenbox_vmm.disk.qcow2 import format as F
from tenbox_vmm.disk.qcow2.header import Header, read_header


def _read_qcow2_header(path: str) -> Tuple[Header, os.stat_result]:
    f = ImageFile(path, False)
    try:
        return read_header(f, path), os.fstat(f.fd)
    finally:
        f.close()


def image_info(path: str) -> Dict[str, Any]:
    """A JSON-ready description of the image at `path`.

    Keys: path, format, virtual_size, file_size, actual_size (bytes on disk),
    backing_chain [(path, format), ...] nearest first; for qcow2 also
    version, cluster_size, refcount_bits, lazy_refcounts, dirty, corrupt,
    compression_type, snapshots, backing_file (as stored), backing_format.
    """
    fmt = backing.probe(path)
    if fmt == "raw":
        st = os.stat(path)
        return {"path": path, "format": "raw", "virtual_size": st.st_size, "file_size": st.st_size,
                "actual_size": st.st_blocks * 512, "backing_chain": []}
    h, st = _read_qcow2_header(path)
    info: Dict[str, Any] = {
        "path": path,
        "format": "qcow2",
        "virtual_size": h.size,
        "file_size": st.st_size,
        "actual_size": st.st_blocks * 512,
        "version": h.version,
        "compat": "1.1" if h.version >= 3 else "0.10",
        "cluster_size": h.cluster_size,
        "refcount_bits": h.refcount_bits,
        "lazy_refcounts": h.lazy_refcounts,
        "dirty": h.dirty,
        "corrupt": h.corrupt,
        "compression_type": F.COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type)),
        "snapshots": h.nb_snapshots,
        "backing_file": h.backing_file,
        "backing_format": h.backing_format,
        "backing_chain": backing_chain(path, h),
    }
    return info


def backing_chain(path: str, h: Header) -> List[Tuple[str, str]]:
    chain: List[Tuple[str, str]] = []
    seen = {backing.identity(path)}
    name: Optional[str] = h.backing_file
    bfmt = h.backing_format
    cur = path
    while name:
        bpath = backing.locate(cur, name, bfmt, len(chain) + 1, path)
        fmt = bfmt or backing.probe(bpath)
        ident = backing.identity(bpath)
        if ident in seen:
            raise BackingFileError("%s: the backing chain loops back to %s" % (path, bpath))
        seen.add(ident)
        chain.append((bpath, fmt))
        if fmt != "qcow2":
            break
        bh, _ = _read_qcow2_header(bpath)
        name, bfmt, cur = bh.backing_file, bh.backing_format, bpath
    return chain
