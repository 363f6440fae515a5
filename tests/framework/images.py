"""The Debian template the image tests boot, built by scripts/x86_64/make-rootfs-debian.sh (tests; root).

Cached by the script's own stamp: a few minutes on a clean clone, under a
second after. The nested lane's runner builds it on the build host before
the lane starts (lane_plugin.py), since the lane has no network.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.framework.process import run_tool
from tests.framework.repo import CACHE, REPO

ROOTFS_SCRIPT = REPO / "scripts" / "x86_64" / "make-rootfs-debian.sh"
TEMPLATE_NAME = "test-bookworm"
TEMPLATE_DIR = CACHE / "images" / TEMPLATE_NAME
# A cold build downloads ~50 MB of packages: about a minute on the development machines.
BUILD_TIMEOUT_SEC = 1800


def build_template() -> Path:
    """The bookworm template, built by make-rootfs-debian.sh (or found up to date in its cache)."""
    if os.geteuid() != 0:
        pytest.fail("building the template needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "debugfs"):
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed (make deps)" % tool)
    started = time.monotonic()
    r = run_tool([ROOTFS_SCRIPT, "--suite", "bookworm", "--name", TEMPLATE_NAME, "--out", TEMPLATE_DIR],
                 BUILD_TIMEOUT_SEC, cwd=REPO)
    if r.returncode != 0:
        pytest.fail("make-rootfs-debian.sh failed (exit %d):\n%s%s" % (r.returncode, r.stdout, r.stderr[-6000:]))
    print("make-rootfs-debian.sh: %.1f s (%s)" % (time.monotonic() - started,
                                                  "cached" if "up to date" in r.stderr else "built"))
    return TEMPLATE_DIR
