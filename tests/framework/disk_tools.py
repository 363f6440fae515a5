"""QEMU's disk tools as the judges of images tenbox reads and writes, and file digests (tests; any user).

qemu-img and qemu-io come from Debian's qemu-utils (`make deps`); a test
module that needs them uses the `qemu_tools` fixture (tests/conftest.py),
so that it fails, not skips, where the tools are missing.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple, Union

from tests.framework.process import run_tool

TOOL_TIMEOUT_SEC = 120.0
DIGEST_CHUNK = 1 << 20

PathLike = Union[str, Path]


def qemu_img(*args: PathLike, ok: Optional[Tuple[int, ...]] = (0,)) -> "subprocess.CompletedProcess[str]":
    """qemu-img ARGS; its exit code must be in `ok` (None: any)."""
    __tracebackhide__ = True
    r = run_tool(["qemu-img"] + [str(a) for a in args], TOOL_TIMEOUT_SEC)
    if ok is not None and r.returncode not in ok:
        raise AssertionError("qemu-img %s exited %d:\n%s%s" % (" ".join(r.args[1:]), r.returncode, r.stdout[-2000:],
                                                              r.stderr[-2000:]))
    return r


def qemu_img_create(path: PathLike, size: int, *opts: str, backing: Optional[str] = None,
                    backing_fmt: Optional[str] = None) -> None:
    """A qcow2 image of `size` bytes with -o opts, on an optional backing file."""
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu_img(*args, path, str(size))


def qemu_check(path: PathLike) -> int:
    """`qemu-img check`: 0 (clean) or 3 (leaked clusters only), else the test fails."""
    return qemu_img("check", path, ok=(0, 3)).returncode


def qemu_io(path: PathLike, *cmds: str, fmt: Optional[str] = None, read_only: bool = False) -> str:
    """qemu-io -c CMD... on the image; every command must succeed (exit 0, nothing "failed").

    ERROR lines alone are no failure: qemu-io reports the refcounts it repairs in a dirty image so.
    """
    __tracebackhide__ = True
    argv: List[str] = ["qemu-io"] + (["-f", fmt] if fmt else []) + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    r = run_tool(argv + [str(path)], TOOL_TIMEOUT_SEC)
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "failed" not in said, said
    return r.stdout


def pattern_writes(model: bytearray, rnd: random.Random, n: int, lo: int = 0, hi: Optional[int] = None,
                   zeros: bool = True) -> List[str]:
    """qemu-io commands writing patterns (some unaligned, some zero) into [lo, hi), applied to `model`."""
    hi = len(model) if hi is None else hi
    cmds = []
    for _ in range(n):
        off = rnd.randrange(lo, hi - 1)
        if rnd.random() < 0.6:
            off &= ~511
        ln = min(hi - off, rnd.choice([512, 4096, 65536, 200000, rnd.randrange(1, 1 << 20)]))
        if zeros and rnd.random() < 0.2:
            cmds.append("write -z %d %d" % (off, ln))
            model[off:off + ln] = bytes(ln)
        else:
            pat = rnd.randrange(1, 256)
            cmds.append("write -P 0x%02x %d %d" % (pat, off, ln))
            model[off:off + ln] = bytes([pat]) * ln
    return cmds


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(DIGEST_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
