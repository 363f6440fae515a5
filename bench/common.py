"""What every benchmark does: interleaved rounds, medians, memory split, a table (bench; any user).

Every benchmark runs tenbox and a reference in the same run, interleaved,
several times, and reports medians and ratios; none of them is a test.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from tests.framework.repo import PYTHON, REPO


PACKAGES = ("tenbox_vmm", "tenbox_supervisor", "tenbox_ctl")


def current_bytecode() -> None:
    """Compile the packages' modules whose bytecode is missing or stale, as the Debian package installs them.

    A worker imports most of its modules inside its sandbox, where it cannot
    write `__pycache__`, and with PYTHONDONTWRITEBYTECODE set nothing does:
    a module edited since would be compiled on every start (machine.py alone,
    about 10 ms), and the figures would be of that.
    """
    import compileall

    for name in PACKAGES:
        compileall.compile_dir(str(REPO / name), quiet=1)


def interleave(runs: int, cases: Dict[str, Callable[[], Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """Run each case once per round, alternating, `runs` rounds; collect every metric (with current bytecode)."""
    current_bytecode()
    results: Dict[str, Dict[str, List[float]]] = {name: {} for name in cases}
    for i in range(runs):
        order = list(cases.items())
        if i % 2:
            order.reverse()  # neither side always goes first
        for name, fn in order:
            for metric, value in fn().items():
                results[name].setdefault(metric, []).append(value)
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def smaps_rss_split(pid: int, guest_bytes: int) -> Tuple[int, int]:
    """(RSS of the guest RAM mapping(s), RSS of everything else) in bytes, from /proc/pid/smaps."""
    guest = other = 0
    size = rss = 0
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:":
                rss = int(parts[1]) * 1024
                if size >= guest_bytes * 3 // 4 and size <= guest_bytes + (64 << 20):
                    guest += rss
                else:
                    other += rss
    return guest, other


def table(rows: List[Tuple[str, ...]], header: Tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def fresh_overlay(overlay: Path, template: Path) -> Path:
    """A new qcow2 overlay of `template` at `overlay` (replacing one left from the last round)."""
    if overlay.exists():
        overlay.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(overlay)],
                   check=True)
    return overlay


def build_static(name: str, workdir: Path) -> Path:
    """bench/NAME.c as a static binary for the guest (the host's gcc and libc6-dev), rebuilt when the source changes."""
    src = REPO / "bench" / (name + ".c")
    out = workdir / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-pthread", "-o", str(out) + ".tmp", str(src)], check=True)
        os.replace(str(out) + ".tmp", str(out))
    return out


def at_checkout(argv: List[str], tree: Path) -> List[str]:
    """A `python3 -m tenbox_vmm ...` argv that runs the worker of another checkout of tenbox.

    For before/after figures in one run: `python3 -m` puts the working directory
    first on sys.path, so the other tree must be both the directory and the path.
    """
    if argv[:3] != [PYTHON, "-m", "tenbox_vmm"]:
        raise ValueError("not a worker argv: %r" % argv[:3])
    tree = tree.resolve()
    return ["env", "-C", str(tree), "PYTHONPATH=%s" % tree] + argv
