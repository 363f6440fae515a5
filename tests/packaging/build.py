"""Build the tenbox .deb from a temporary copy of the tree (`make deb`, tests/packaging; root not needed).

dpkg-buildpackage writes build/, *.egg-info, debian/tenbox/ and more into
the tree it builds; doing it in a copy keeps the source tree clean, and lets
the tests build a second, newer version (for the upgrade test) by rewriting
the copy's version in debian/changelog and tenbox_vmm/__init__.py.

    python3 -m tests.packaging.build [--out DIR] [--version V]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_SEC = 600
# Never copied into the build tree: caches, VCS data, build output.
IGNORE = shutil.ignore_patterns(
    ".git", ".cache", ".hypothesis", ".pytest_cache", ".benchmarks", ".venv", "__pycache__", "*.pyc",
    "build", "dist", "*.egg-info", "out", "_kvm_ffi.py", "_slirp_ffi.py",
)
VERSION_RE = re.compile(r"[0-9][A-Za-z0-9.+~]*\Z")


def upstream_version(tree: Path = REPO) -> str:
    text = (tree / "tenbox_vmm" / "__init__.py").read_text()
    m = re.search(r'__version__ = "([^"]+)"', text)
    if not m:
        raise RuntimeError("no __version__ in tenbox_vmm/__init__.py")
    return m.group(1)


def set_version(tree: Path, version: str) -> None:
    """Make the copy at `tree` say `version` in both places debian/rules compares."""
    if not VERSION_RE.match(version):
        raise ValueError("not a native Debian version: %r" % version)
    init = tree / "tenbox_vmm" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "%s"' % version, init.read_text()))
    changelog = tree / "debian" / "changelog"
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    entry = ("tenbox (%s) unstable; urgency=medium\n\n  * Test build of version %s.\n\n"
             " -- TenBox maintainers <packaging@tenbox.ai>  %s\n\n" % (version, version, date))
    changelog.write_text(entry + changelog.read_text())


def snapshot(dest: Path, source: Path = REPO) -> Path:
    """A copy of the tree without caches and build output (what the package is built from)."""
    shutil.copytree(source, dest, ignore=IGNORE, symlinks=True)
    return dest


def build(out_dir: Path, version: Optional[str] = None, log=None, source: Path = REPO) -> Path:
    """Build the package from `source` (the tree, or a snapshot of it) into `out_dir`; returns the .deb."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tenbox-deb-") as tmp:
        tree = snapshot(Path(tmp) / "tenbox", source)
        if version:
            set_version(tree, version)
        version = version or upstream_version(tree)
        env = dict(os.environ, LC_ALL="C.UTF-8", DEB_BUILD_OPTIONS="nocheck")
        env.pop("PYTHONPATH", None)  # the build uses the copy, never the source tree
        r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=BUILD_TIMEOUT_SEC)
        if log is not None:
            log.write(r.stdout)
        if r.returncode != 0:
            raise RuntimeError("dpkg-buildpackage failed (exit %d):\n%s" % (r.returncode, r.stdout[-6000:]))
        debs = sorted(Path(tmp).glob("tenbox_%s_all.deb" % version))
        if len(debs) != 1:
            raise RuntimeError("expected tenbox_%s_all.deb, found %s" % (version, os.listdir(tmp)))
        target = out_dir / debs[0].name
        shutil.copy2(debs[0], target)
        for extra in Path(tmp).glob("tenbox_%s_*.buildinfo" % version):
            shutil.copy2(extra, out_dir / extra.name)
        return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.packaging.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "dist"), help="where the .deb goes (default: dist/)")
    p.add_argument("--version", help="build this version instead of tenbox_vmm.__version__ (tests)")
    args = p.parse_args(argv)
    started = time.monotonic()
    deb = build(Path(args.out), args.version, log=sys.stdout)
    print("built %s in %.0fs" % (deb, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
