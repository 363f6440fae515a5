"""The runtime's --disk value, `PATH[,ro][,serial=S][,format=raw|qcow2]`: encoded and decoded here only (worker and daemon; pure).

tenboxd writes it for every disk of a VM it starts; tenbox-vm-runtime and
tenbox-vhost-user-blk read it. A path with a comma cannot be said in this
grammar: tenboxd refuses such paths when a disk is added.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from tenbox_vmm.protocol.limits import Limits


class DiskArg(NamedTuple):
    path: str
    read_only: bool = False
    serial: str = ""
    format: Optional[str] = None  # "raw" or "qcow2"; None: the runtime probes (a probed raw image refuses qcow2 headers)

    def to_arg(self) -> str:
        arg = self.path
        if self.read_only:
            arg += ",ro"
        if self.serial:
            arg += ",serial=" + self.serial
        if self.format:
            arg += ",format=" + self.format
        return arg

    @classmethod
    def parse(cls, text: str) -> "DiskArg":
        """The DiskArg a --disk value says; ValueError with a one-line reason."""
        parts = text.split(",")
        path, read_only, serial, fmt = parts[0], False, "", None
        if not path:
            raise ValueError("--disk %r: the path is empty" % text)
        for opt in parts[1:]:
            if opt in ("ro", "readonly"):
                read_only = True
            elif opt.startswith("serial="):
                serial = opt[len("serial="):]
                if len(serial) > Limits.DISK_SERIAL_MAX or not all(32 < ord(c) < 127 for c in serial):
                    raise ValueError("--disk %r: serial must be up to %d printable ASCII characters"
                                     % (text, Limits.DISK_SERIAL_MAX))
            elif opt.startswith("format="):
                fmt = opt[len("format="):]
                if fmt not in Limits.DISK_FORMATS:
                    raise ValueError("--disk %r: format must be %s" % (text, " or ".join(Limits.DISK_FORMATS)))
            else:
                raise ValueError("--disk %r: unknown option %r (ro, serial=S, format=F)" % (text, opt))
        return cls(path=path, read_only=read_only, serial=serial, format=fmt)
