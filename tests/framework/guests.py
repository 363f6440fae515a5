"""The purpose-built test guests (tests/guests): where they are, what they report, one run under tenbox (tests and bench; any user).

A guest reports on its serial console, one line each (tests/guests/README.md):
`ok - CHECK`, `not ok - CHECK`, `info - KEY=VALUE`, and last
`TENBOX-GUEST NAME PASS` (or FAIL).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from tests.framework.process import ConsoleProcess
from tests.framework.repo import REPO
from tests.framework.runtime import boot_argv

GUEST_DIR = REPO / "tests" / "guests" / "out"
BOOT_SEC = 60.0  # boot to poweroff of the slowest guest on the development machines' software KVM, with room
DETAIL_CHARS = 3000


def guest_path(name: str, kind: str = "bzImage") -> str:
    """tests/guests/out/NAME.KIND (bzImage or elf)."""
    return str(GUEST_DIR / ("%s.%s" % (name, kind)))


def guest_results(output: str, name: str) -> dict:
    """A guest's report: {'ok': [...], 'not_ok': [...], 'info': {...}, 'info_list': [...], 'verdict': ...}."""
    res: dict = {"ok": [], "not_ok": [], "info": {}, "info_list": [], "verdict": None}
    for raw in output.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if line.startswith("ok - "):
            res["ok"].append(line[5:])
        elif line.startswith("not ok - "):
            res["not_ok"].append(line[9:])
        elif line.startswith("info - "):
            key, _, value = line[7:].partition("=")
            res["info"][key] = value
            res["info_list"].append((key, value))
        elif line.startswith("TENBOX-GUEST %s " % name):
            word = line.split()[2]
            if word in ("PASS", "FAIL"):
                res["verdict"] = word
    return res


def run_guest(spawn: Callable[..., ConsoleProcess], name: str, *args: str, kind: str = "bzImage",
              cmdline: str = "", timeout: float = BOOT_SEC, memory_mb: int = 64, cpus: int = 1,
              wait: bool = True) -> Tuple[ConsoleProcess, Optional[int], Optional[dict]]:
    """Boot guest NAME under tenbox-vm-runtime (started by `spawn`), wait for its exit; (process, exit code, report).

    args: more runtime arguments. wait=False: (process, None, None) at once.
    """
    p = spawn(boot_argv(guest_path(name, kind), cmdline=cmdline, memory_mb=memory_mb, cpus=cpus) + list(args))
    if not wait:
        return p, None, None
    rc = p.wait_exit(timeout)
    return p, rc, guest_results(p.output, name)


def assert_passed(p: ConsoleProcess, rc: Optional[int], res: Optional[dict]) -> None:
    """The guest's checks all passed, its verdict is PASS and the runtime exited 0."""
    assert res is not None, "the guest was not waited for"
    detail = "\n--- stdout ---\n%s\n--- stderr ---\n%s" % (p.output[-DETAIL_CHARS:], p.errors[-DETAIL_CHARS:])
    assert not res["not_ok"], "guest checks failed: %s%s" % (res["not_ok"], detail)
    assert res["verdict"] == "PASS", detail
    assert rc == 0, "exit %s%s" % (rc, detail)
