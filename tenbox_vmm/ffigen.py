"""Pre-parsed cffi modules (build time and worker start-up; no privileges).

cffi's ABI mode parses C declarations with pycparser at import, which costs
about 20 ms of every worker start. Out-of-line ABI mode does that parse once,
at build time, and emits a pure-Python module: nothing is compiled and the
package stays `Architecture: all`. `load()` uses the emitted module when it
matches the declarations and falls back to parsing them otherwise, so a
source checkout works without a build step, only slower to start.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# (module name, declarations module, attribute) for every pre-parsed FFI.
MODULES = (
    ("tenbox_vmm.kvm._kvm_ffi", "tenbox_vmm.kvm._cdef", "CDEF"),
    ("tenbox_vmm.net._slirp_ffi", "tenbox_vmm.net._slirp_cdef", "CDEF"),
    ("tenbox_vmm.net._mmsg_ffi", "tenbox_vmm.net._mmsg_cdef", "CDEF"),
    ("tenbox_vmm.disk._fallocate_ffi", "tenbox_vmm.disk.fallocate", "CDEF"),
)


def load(module: str, cdef: str) -> Any:
    """The FFI for `cdef`: the pre-parsed `module` if current, else parsed now."""
    try:
        mod = importlib.import_module(module)
        if getattr(mod, "CDEF", None) == cdef:
            return mod.ffi
    except ImportError:
        pass
    import cffi  # only needed when the pre-parsed module is missing or stale

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi


def emit(module: str, cdef: str, path: str) -> None:
    """Write the pre-parsed module for `cdef` to `path`."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(cdef)
    builder.set_source(module, None)
    tmp = path + ".tmp"
    builder.emit_python_code(tmp)
    with open(tmp, "a") as f:
        f.write("\n# The declarations this module was made from; load() compares them.\nCDEF = %r\n" % cdef)
    os.replace(tmp, path)


def emit_all(root: str) -> list:
    """Emit every module in MODULES under the package tree at `root`."""
    written = []
    for module, decl_module, attr in MODULES:
        cdef = getattr(importlib.import_module(decl_module), attr)
        path = os.path.join(root, *module.split(".")) + ".py"
        emit(module, cdef, path)
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for p in emit_all(sys.argv[1] if len(sys.argv) > 1 else "."):
        print("wrote", p)
