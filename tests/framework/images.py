"""Images for tests: the Debian template the image tests boot, built by scripts/make-rootfs-debian.sh, and small fake images (tests; root).

The template is cached by the script's own stamp: a few minutes on a clean
clone, under a second after. The nested lane's runner builds it on the build
host before the lane starts (lane_plugin.py), since the lane has no network.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest

from tests.framework.disk_tools import sha256_file
from tests.framework.process import run_tool
from tests.framework.repo import CACHE, REPO

ROOTFS_SCRIPT = REPO / "scripts" / "make-rootfs-debian.sh"
TEMPLATE_NAME = "test-bookworm"
TEMPLATE_DIR = CACHE / "images" / TEMPLATE_NAME
# make-rootfs-debian.sh --layout cloud: a disk shaped like Debian's genericcloud image (issue 18).
CLOUD_NAME = "test-bookworm-cloud"
CLOUD_DIR = CACHE / "images" / CLOUD_NAME
# make-rootfs-debian.sh --arch arm64 on this amd64 host, through qemu-user (issue 17).
ARM64_NAME = "test-arm64-bookworm"
ARM64_DIR = CACHE / "images" / ARM64_NAME
# A cold build downloads ~50 MB of packages: about a minute on the development machines (an arm64
# one through qemu-user: several).
BUILD_TIMEOUT_SEC = 1800


def _build(what: str, options: Tuple[str, ...], name: str, out: Path, tools: Tuple[str, ...], hint: str) -> Path:
    """Run make-rootfs-debian.sh OPTIONS --suite bookworm --name NAME --out OUT (or find OUT up to date)."""
    if os.geteuid() != 0:
        pytest.fail("building %s needs root (debootstrap, chroot)" % what)
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "debugfs") + tools:
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed (make deps%s)" % (tool, hint))
    started = time.monotonic()
    script = " ".join(("make-rootfs-debian.sh",) + options)
    r = run_tool([ROOTFS_SCRIPT, *options, "--suite", "bookworm", "--name", name, "--out", out], BUILD_TIMEOUT_SEC,
                 cwd=REPO)
    if r.returncode != 0:
        pytest.fail("%s failed (exit %d):\n%s%s" % (script, r.returncode, r.stdout, r.stderr[-6000:]))
    print("%s: %.1f s (%s)" % (script, time.monotonic() - started, "cached" if "up to date" in r.stderr else "built"))
    return out


def build_template() -> Path:
    """The bookworm template, built by make-rootfs-debian.sh (or found up to date in its cache)."""
    return _build("the template", (), TEMPLATE_NAME, TEMPLATE_DIR, (), "")


MiB = 1 << 20


def build_cloud_image() -> Path:
    """The bookworm cloud-layout disk, built by make-rootfs-debian.sh --layout cloud (or found up to date)."""
    return _build("the image", ("--layout", "cloud"), CLOUD_NAME, CLOUD_DIR, ("sfdisk", "mkfs.vfat", "blkid"),
                  "; the cloud layout needs fdisk and dosfstools")


def build_arm64_template() -> Path:
    """The bookworm arm64 template, built on this host through qemu-user (or found up to date)."""
    from tests.framework import arm64_prepare, binfmt

    arm64_prepare.wait()
    if os.geteuid() != 0:
        pytest.fail("building the template needs root (debootstrap, chroot, binfmt_misc)")
    try:
        binfmt.ensure("arm64")
    except binfmt.BinfmtError as e:
        pytest.fail(str(e))
    return _build("the template", ("--arch", "arm64"), ARM64_NAME, ARM64_DIR, (), "")


def write_manifest(folder: Path, **over) -> dict:
    """manifest.json for the files in folder, with their sizes and digests; `over` replaces fields."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    m = {"manifest_version": 1, "name": folder.name, "arch": "x86_64", "kernel": "vmlinuz", "initrd": "initrd.img",
         "rootfs": "rootfs.img", "rootfs_format": "qcow2", "cmdline": "console=ttyS0 root=/dev/vda rw", "files": files}
    m.update(over)
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))
    return m


def fake_image(folder: Path, rootfs_size: int = 16 * MiB, fmt: str = "qcow2", backing: Optional[Path] = None,
               kernel: Optional[str] = None, **over) -> Path:
    """A small image: random initrd bytes, an empty rootfs of the given format, and `kernel`'s bytes (random if None)."""
    folder.mkdir(parents=True)
    if kernel is not None:
        shutil.copyfile(kernel, str(folder / "vmlinuz"))
    else:
        (folder / "vmlinuz").write_bytes(os.urandom(8192))
    (folder / "initrd.img").write_bytes(os.urandom(4096))
    rootfs = folder / "rootfs.img"
    if fmt == "qcow2":
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing is not None:
            args += ["-b", str(backing), "-F", "raw"]
        subprocess.run(args + [str(rootfs), str(rootfs_size)], check=True)
    else:
        with open(str(rootfs), "wb") as f:
            f.write(os.urandom(rootfs_size))
    write_manifest(folder, rootfs_format=over.pop("rootfs_format", fmt), **over)
    return folder


@contextlib.contextmanager
def root_sources(folder: Path) -> Iterator[Tuple[dict, Dict[str, Tuple[str, int]]]]:
    """An image folder's manifest and its files opened as tenboxd opens them for root: (manifest, sources for ImageStore)."""
    from tenbox_supervisor.caller_files import Use, open_uses
    from tenbox_supervisor.images import read_manifest, resolve_sources, source_plan

    source = resolve_sources([str(folder)], folder=True)
    manifest = read_manifest(source.manifest_path)
    plan = source_plan(source, manifest)
    fds = open_uses([(Use(fn, path), None) for fn, path in plan.items()])
    try:
        yield manifest, {fn: (plan[fn], fd) for fn, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)
