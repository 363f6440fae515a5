"""Fixtures for the packaging tests: host tools, the built .debs, the local apt repository (tests; root).

These tests build the package, debootstrap Debian chroots and install into
them: minutes, root, and Debian's mirror. `pytest tests` (make test) does
not run them: they are deselected -- pytest's summary says how many --
unless tests/packaging is named on the command line (make test-distros,
make deb) or TENBOX_PACKAGING_TESTS=1 is set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest

from tests.packaging import build as debbuild
from tests.packaging import deps
from tests.packaging.aptrepo import AptRepository

HERE = Path(__file__).resolve().parent
ENABLE_ENV = "TENBOX_PACKAGING_TESTS"
# Per distribution and step, seconds: printed at the end, kept in .cache.
TIMINGS: Dict[str, Dict[str, float]] = {}
RESULTS: Dict[str, Dict[str, str]] = {}


def _requested(config) -> bool:
    if os.environ.get(ENABLE_ENV) == "1":
        return True
    base = Path(str(config.invocation_params.dir))
    for arg in config.invocation_params.args:
        arg = str(arg)
        if arg.startswith("-"):
            continue
        p = Path(arg.split("::")[0])
        p = (p if p.is_absolute() else base / p).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _requested(config):
        return
    ours = [i for i in items if HERE in Path(str(i.fspath)).resolve().parents]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [i for i in items if i not in ours]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TIMINGS and not RESULTS:
        return
    tr = terminalreporter
    tr.section("tenbox packaging: distribution matrix")
    for suite, steps in TIMINGS.items():
        total = sum(steps.values())
        tr.write_line("%-9s %5.0fs  %s" % (suite, total, ", ".join("%s %.0fs" % kv for kv in steps.items())))
    for suite, facts in RESULTS.items():
        tr.write_line("%-9s %s" % (suite, "; ".join("%s: %s" % kv for kv in facts.items())))
    out = deps.CACHE / "matrix-last-run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"timings": TIMINGS, "results": RESULTS, "at": time.time()}, indent=2))


@pytest.fixture(scope="session")
def host_tools():
    """dpkg-buildpackage, lintian, debootstrap, ... installed (apt, only what is missing)."""
    if os.geteuid() != 0:
        pytest.fail("the packaging tests need root (apt, debootstrap, chroot, mount)")
    deps.apt_install(deps.BUILD_PACKAGES + deps.TEST_PACKAGES)


@pytest.fixture(scope="session")
def debs(host_tools, tmp_path_factory):
    """Two builds of one snapshot of the tree: its version, and a newer one for the upgrade test.

    `source` is that snapshot: the chroots run its tests/unit, so code and
    tests always match even while someone edits the tree during the run.
    """
    out = tmp_path_factory.mktemp("debs")
    source = debbuild.snapshot(tmp_path_factory.mktemp("snapshot") / "tenbox")
    v1 = debbuild.upstream_version(source)
    v2 = v1 + "+test1"
    started = time.monotonic()
    new = debbuild.build(out, v2, source=source)
    old = debbuild.build(out, None, source=source)
    TIMINGS.setdefault("build", {})["two packages"] = time.monotonic() - started
    return SimpleNamespace(old=old, new=new, v1=v1, v2=v2, source=source)


@pytest.fixture(scope="session")
def apt_repo(host_tools, tmp_path_factory):
    repo = AptRepository(tmp_path_factory.mktemp("aptrepo") / "repo")
    try:
        repo.make_key()
        repo.serve()
        yield repo
    finally:
        repo.close()
