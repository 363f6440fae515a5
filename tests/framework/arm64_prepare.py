"""The arm64 tests' caches, built in the background while the rest of the session runs (tests; root).

    python3 -m tests.framework.arm64_prepare

Building the arm64 lane's userland and the arm64 template takes about ten
minutes on a clean clone, nearly all of it one core running arm64 programs
through qemu-user, or waiting for Debian's mirror. tests/conftest.py starts
this module once a session has collected arm64 tests, and runs those tests
last; meanwhile the x86 tests use the rest of the machine. It holds LOCK
while it builds; the builders the tests call (lane_arm64.build,
images.build_arm64_template) wait for it first (wait()), then find their
caches up to date, or build, and fail, themselves, so an error here is
never lost: it is printed to the log and met again by the test.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from typing import Optional

from tests.framework.repo import CACHE, REPO

LOCK = CACHE / ".arm64-prepare.lock"
LOG = CACHE / "arm64-prepare.log"
INSIDE_ENV = "TENBOX_ARM64_PREPARING"  # set in the builder itself: it must not wait for itself
OFF_ENV = "TENBOX_ARM64_PREPARE"  # "0": no background build (the tests build when they need to)


def wait() -> None:
    """Block until a background build (if any) has released LOCK."""
    if os.environ.get(INSIDE_ENV) == "1" or not LOCK.exists():
        return
    with open(str(LOCK), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def start() -> Optional[subprocess.Popen]:
    """Start the background build (root only, not inside a lane, not when turned off)."""
    if os.geteuid() != 0 or os.environ.get("TENBOX_LANE") or os.environ.get(OFF_ENV) == "0":
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    log = open(str(LOG), "w")
    # At the lowest CPU and I/O priority: the x86 tests running meanwhile have timing checks of their own
    # (CI20 lost one to a worker that took longer than 10 s to end beside this build and two lanes).
    return subprocess.Popen(["nice", "-n", "19", "ionice", "-c", "2", "-n", "7",
                             sys.executable, "-m", "tests.framework.arm64_prepare"], cwd=str(REPO),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, **{INSIDE_ENV: "1"}), start_new_session=True)


def main() -> int:
    from tests.framework import lane_arm64
    from tests.framework.images import build_arm64_template

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(str(LOCK), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        rc = 0
        for what, build in (("the arm64 lane", lane_arm64.build), ("the arm64 template", build_arm64_template)):
            started = time.monotonic()
            try:
                build()
                print("arm64_prepare: %s ready in %.0f s" % (what, time.monotonic() - started), flush=True)
            except BaseException as e:  # pytest.fail raises a BaseException; the test meets it again
                print("arm64_prepare: %s failed after %.0f s: %s" % (what, time.monotonic() - started, e), flush=True)
                rc = 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
