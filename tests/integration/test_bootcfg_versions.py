"""tenbox_vmm.bootcfg's version order against systemd's own, `systemd-analyze compare-versions` (tests).

In tests/integration, not tests/unit: the oracle is the host's systemd 252
or later (Debian 12's); the unit tests also run in Debian 11 chroots, whose
systemd-analyze has no compare-versions.
"""

from __future__ import annotations

import shutil

from tenbox_vmm.bootcfg import compare_versions
from tests.framework.process import run_tool

TOOL_TIMEOUT_SEC = 30.0


def test_version_order_agrees_with_systemd_analyze_compare_versions():
    """The parser's comparison and systemd's (strverscmp_improved) agree on 120 random version pairs."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze (package systemd) is the oracle of this test"
    import random
    rnd = random.Random(18)
    alphabet = "0129aZz.-~^_+"
    for _ in range(120):
        a, b = ("".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 8))) for _ in range(2))
        r = run_tool([tool, "compare-versions", "--", a, b], TOOL_TIMEOUT_SEC)
        assert r.returncode in (0, 11, 12), r.stderr
        assert compare_versions(a, b) == {0: 0, 11: 1, 12: -1}[r.returncode], (a, b)
