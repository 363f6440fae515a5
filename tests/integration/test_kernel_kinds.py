"""Kernels of another architecture, given to the x86-64 worker: one line naming both architectures.

The kernels are Debian's own: the amd64 cloud kernel the Linux tests boot, and
the arm64 cloud kernel (get-kernel.sh --arch arm64, from apt's arm64 package
lists kept apart from the host's). `file` (libmagic) is the oracle for what
each file is; the gzip'd form is made with gzip. ELF kernels of other
machines are tests/unit/test_boot_protocol.py's.
"""

import gzip
import shutil
import subprocess

import pytest

from tests.framework import linux_guest
from tests.framework.repo import REPO, repo_env
from tests.framework.runtime import runtime_argv
from tenbox_vmm import kernel_kind

WRONG_ARCH = "this host's worker boots x86-64 (amd64) kernels"


@pytest.fixture(scope="module")
def arm64_image():
    return linux_guest.foreign_kernel("arm64")


def _file(path) -> str:
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout


def test_debians_kernels_are_told_apart_as_file_tells_them(arm64_image, tmp_path):
    amd64 = linux_guest.build().vmlinuz
    assert "x86 boot executable bzImage" in _file(amd64)
    assert kernel_kind.identify_file(str(amd64)) == ("x86_64", "bzImage")
    assert "ARM64 boot executable Image" in _file(arm64_image)
    assert kernel_kind.identify_file(str(arm64_image)) == ("aarch64", "Image")
    gz = tmp_path / "vmlinuz.gz"
    with open(str(arm64_image), "rb") as src, gzip.open(str(gz), "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert "gzip compressed data" in _file(gz)
    kind = kernel_kind.identify_file(str(gz))
    assert kind == ("aarch64", "Image, gzip'd") and kind.describe() == "an arm64 (aarch64) Image, gzip'd"
    notes = tmp_path / "notes.txt"
    notes.write_text("text\n" * 1000)
    assert kernel_kind.identify_file(str(notes)) == ("", "")


@pytest.mark.parametrize("gzipped", [False, True], ids=["Image", "gzip'd Image"])
def test_the_runtime_refuses_an_arm64_kernel_naming_both_architectures(arm64_image, tmp_path, gzipped):
    kernel = arm64_image
    if gzipped:
        kernel = tmp_path / "vmlinuz"
        with open(str(arm64_image), "rb") as src, gzip.open(str(kernel), "wb") as dst:
            shutil.copyfileobj(src, dst)
    r = subprocess.run(runtime_argv("--kernel", str(kernel)), capture_output=True, text=True, timeout=60,
                       env=repo_env(), cwd=str(REPO), stdin=subprocess.DEVNULL)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    what = "an arm64 (aarch64) Image" + (", gzip'd" if gzipped else "")
    assert lines[0] == "tenbox-vm-runtime: error: kernel %s is %s; %s" % (kernel, what, WRONG_ARCH)


def test_tenboxd_reports_the_arm64_kernel_as_the_start_failure(daemon, arm64_image):
    from tests.integration.test_daemon import create

    create(daemon, "arm")
    assert daemon.call("vm.edit", vm_id="arm", kernel=str(arm64_image))["ok"]
    r = daemon.ctl("vm", "start", "arm")
    assert r.returncode == 1
    assert r.stderr.decode().strip() == "tenbox: kernel %s is an arm64 (aarch64) Image; %s (vm_start_failed)" % (
        arm64_image, WRONG_ARCH)
    v = daemon.vm("arm")
    assert v["state"] == "crashed" and v["last_failure"]["code"] == "start_failed"
