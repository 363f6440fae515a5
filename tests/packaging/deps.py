"""Install the host tools the packaging build and tests need (`make deb`, tests/packaging; root for apt).

Like scripts/install-deps.sh: apt runs only when something is missing, with
--no-install-recommends. vermin (not packaged in Debian 12) comes from PyPI
into .cache/packaging/vermin with `pip install --target`, never into the
system's site-packages.

    python3 -m tests.packaging.deps [--build-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "packaging"
VERMIN_VERSION = "1.9.2"
VERMIN_DIR = CACHE / ("vermin-" + VERMIN_VERSION)
APT_TIMEOUT_SEC = 900
PIP_TIMEOUT_SEC = 300

# debian/control's Build-Depends, plus dpkg-buildpackage itself.
BUILD_PACKAGES = [
    "dpkg-dev", "debhelper", "dh-python", "help2man", "python3", "python3-cffi", "python3-click",
    "python3-setuptools",
]
# The tests: lintian, the chroots and their apt repository, unit checks, vermin's pip.
TEST_PACKAGES = [
    "lintian", "debootstrap", "apt-utils", "gpg", "gpgv", "systemd", "shellcheck", "python3-pip",
    "python3-pytest",
]
SANE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def missing(packages: List[str]) -> List[str]:
    out = []
    for p in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, timeout=30)
        if "install ok installed" not in r.stdout:
            out.append(p)
    return out


def apt_install(packages: List[str]) -> None:
    todo = missing(packages)
    if not todo:
        return
    if os.geteuid() != 0:
        raise SystemExit("tests/packaging: run as root to install %s" % " ".join(todo))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SANE_PATH)
    sys.stderr.write("tests/packaging: installing %s\n" % " ".join(todo))
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=APT_TIMEOUT_SEC)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + todo, env=env, check=True,
                   timeout=APT_TIMEOUT_SEC)


def vermin() -> Path:
    """A directory to put on PYTHONPATH for `import vermin`."""
    if (VERMIN_DIR / "vermin" / "__init__.py").exists():
        return VERMIN_DIR
    tmp = VERMIN_DIR.with_name(VERMIN_DIR.name + ".partial")
    subprocess.run(["rm", "-rf", str(tmp)], check=True, timeout=60)
    subprocess.run(["/usr/bin/python3", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--no-compile", "--target", str(tmp), "vermin==" + VERMIN_VERSION],
                   check=True, timeout=PIP_TIMEOUT_SEC, env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"))
    tmp.rename(VERMIN_DIR)
    return VERMIN_DIR


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.packaging.deps", description=__doc__.split("\n")[0])
    p.add_argument("--build-only", action="store_true", help="only what `make deb` needs")
    args = p.parse_args(argv)
    apt_install(BUILD_PACKAGES if args.build_only else BUILD_PACKAGES + TEST_PACKAGES)
    if not args.build_only:
        vermin()
    return 0


if __name__ == "__main__":
    sys.exit(main())
