"""The code parses and imports on Python 3.8, the oldest python3 in the seed (Ubuntu 20.04) (tests; no root).

The chroots run Python 3.9, 3.11 and 3.13; no chroot has 3.8 (Debian's mirror
has no Ubuntu), so vermin checks statically that nothing needs more.
"""

from __future__ import annotations

import os
import subprocess

from tests.packaging import deps
from tests.packaging.build import REPO

VERMIN_TIMEOUT_SEC = 300


def test_vermin_finds_nothing_newer_than_python_3_8(host_tools):
    path = deps.vermin()
    targets = ["tenbox_vmm", "tenbox_supervisor", "tenbox_ctl", "debian/update-notify.py"]
    r = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; from vermin.main import main; sys.argv[0] = 'vermin'; sys.exit(main())",
         "-t=3.8-", "--eval-annotations", "--violations", "--no-tips"] + targets,
        cwd=REPO, capture_output=True, text=True, timeout=VERMIN_TIMEOUT_SEC,
        env=dict(os.environ, PYTHONPATH=str(path)))
    assert r.returncode == 0, r.stdout + r.stderr
