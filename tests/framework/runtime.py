"""Command lines of tenbox-vm-runtime (python3 -m tenbox_vmm) for tests and benchmarks (tests and bench; any user).

`boot_argv` is a standalone worker with its guest's serial console on
stdin/stdout, the counterpart of qemu.microvm() on the same guest;
`runtime_argv` takes any arguments (the bad-input tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

from tests.framework.repo import PYTHON

PathLike = Union[str, Path]


def runtime_argv(*args: str) -> List[str]:
    return [PYTHON, "-m", "tenbox_vmm", *args]


def boot_argv(kernel: PathLike, initrd: Optional[PathLike] = None, cmdline: Optional[str] = None, *,
              memory_mb: int = 256, cpus: int = 1, disks: Sequence[str] = (), net: bool = False,
              hostfwds: Sequence[str] = ()) -> List[str]:
    """A worker booting `kernel`; disks are --disk values (PATH[,format=...]), hostfwds imply --net."""
    argv = runtime_argv("--kernel", str(kernel), "--memory", str(memory_mb), "--cpus", str(cpus),
                        "--console", "stdio")
    if initrd is not None:
        argv += ["--initrd", str(initrd)]
    if cmdline is not None:
        argv += ["--cmdline", cmdline]
    for disk in disks:
        argv += ["--disk", disk]
    if net or hostfwds:
        argv.append("--net")
    for fwd in hostfwds:
        argv += ["--hostfwd", fwd]
    return argv
