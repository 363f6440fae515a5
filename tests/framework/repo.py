"""Where tests and benchmarks find the source tree and how they start its programs (tests and bench; any user).

Everything runs from the source tree, not from an installed package: the
children get the tree on PYTHONPATH and run with Debian's python3, the
interpreter and python3-* packages the .deb uses, whichever python3 runs the
test or the benchmark itself (the first on PATH may be another one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Optional

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"  # git-ignored: kernels, initramfs, images, measurements
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def repo_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment with the tree first on PYTHONPATH, plus `extra`.

    NOTIFY_SOCKET is dropped: a tenboxd started by a test must not talk to
    the systemd that may have started the test run.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NOTIFY_SOCKET", None)
    if extra:
        env.update(extra)
    return env
