"""C programs that print the truth about the host's headers, and the pre-parsed cffi modules (tests; any user).

The ABI tests compare tenbox's cffi declarations with what gcc sees through
the installed headers, and `make ffi`'s output with the declarations.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Sequence, Union


def run_c_program(workdir: Union[str, Path], lines: Sequence[str]) -> str:
    """Compile `lines` (one C file) with the host's gcc in workdir, run it, return its stdout."""
    src = Path(workdir) / "abi.c"
    src.write_text("\n".join(lines) + "\n")
    exe = Path(workdir) / "abi"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def load_pre_parsed(module: str, cdef: str, workdir: Union[str, Path], as_name: str) -> ModuleType:
    """What `make ffi` emits for `module`, written into workdir and imported as `as_name`."""
    from tenbox_vmm import ffigen

    path = Path(workdir) / (module.rsplit(".", 1)[-1] + ".py")
    ffigen.emit(module, cdef, str(path))
    spec = importlib.util.spec_from_file_location(as_name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
