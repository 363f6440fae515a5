"""arm64 guest images built on this amd64 host: make-rootfs-debian.sh --arch arm64 and `tenbox image build --arch` (issue 17).

A bookworm arm64 template is built once through qemu-user (binfmt_misc,
tests/framework/binfmt.py) into <repo>/.cache/images/test-arm64-bookworm,
cached by the script's own stamp (a few minutes cold, under a second
after), and judged with the host's own tools: qemu-img, debugfs on the
converted ext4, the kernel's and the programs' headers, zstd for the
initramfs. It boots under QEMU's virt machine with TCG, the reference for
an arm64 machine, to systemd's login prompt (there on QEMU's PL011,
ttyAMA0: the template's getty is for tenbox's ttyS0, systemd adds one on
the kernel's console).

Needs root (debootstrap, chroot), qemu-user-static, qemu-img, debugfs,
zstd, qemu-system-aarch64, and Debian's mirror for the first build.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.framework.daemon import ok
from tests.framework.disk_tools import sha256_file
from tests.framework.images import ARM64_NAME, ROOTFS_SCRIPT, build_arm64_template
from tests.framework.process import ConsoleProcess, login_prompt, run_tool
from tests.framework.repo import repo_env

MiB = 1 << 20
EM_AARCH64 = 183  # the ELF e_machine of arm64
ARM64_IMAGE_MAGIC = (0x38, b"ARM\x64")  # Documentation/arch/arm64/booting.rst
QEMU_AARCH64 = "qemu-system-aarch64"
# systemd on 2 emulated Cortex-A57s reaches the login prompt in about 45 s on the development machines.
BOOT_DEADLINE_SEC = float(os.environ.get("TENBOX_TEST_ARM64_BOOT_DEADLINE", "600"))


@pytest.fixture(scope="session")
def arm64_template() -> Path:
    return build_arm64_template()


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def qemu_img_json(*args: str):
    r = subprocess.run(["qemu-img", *args, "--output=json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def debugfs(image: Path, command: str) -> str:
    r = subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[5] == 1, head  # little-endian
    return struct.unpack_from("<H", head, 18)[0]


def test_an_arm64_template_is_built_here_through_qemu_user_with_its_manifest(arm64_template):
    """make-rootfs-debian.sh --arch arm64 on this amd64 host: a rerun is "up to date" (the arch is in the
    stamp: an amd64 --check of the same folder is not); the manifest says aarch64, names every file with
    its size and sha256, and boots the arm64 board's console; the kernel is Debian's arm64 cloud Image;
    the rootfs a compressed qcow2 without a backing file; packages.txt has the arm64 cloud kernel."""
    common = ["--suite", "bookworm", "--name", ARM64_NAME, "--out", str(arm64_template)]
    started = time.monotonic()
    r = run_tool([str(ROOTFS_SCRIPT), "--arch", "arm64"] + common, 60)
    assert r.returncode == 0 and "up to date" in r.stderr and "arm64" in r.stderr, r.stderr
    assert time.monotonic() - started < 10
    r = run_tool([str(ROOTFS_SCRIPT), "--arch", "amd64", "--check"] + common, 60)
    assert r.returncode == 1 and "not up to date" in r.stderr, r.stderr

    m = manifest_of(arm64_template)
    on_disk = sorted(p.name for p in arm64_template.iterdir() if p.name not in ("manifest.json", ".stamp"))
    assert sorted(m["files"]) == on_disk == ["initrd.img", "packages.txt", "rootfs.qcow2", "vmlinuz"]
    for fn, entry in m["files"].items():
        path = arm64_template / fn
        assert path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"], fn
    assert m["arch"] == "aarch64" and m["name"] == ARM64_NAME and m["os"]["suite"] == "bookworm"
    assert (m["kernel"], m["initrd"], m["rootfs"], m["rootfs_format"]) == ("vmlinuz", "initrd.img", "rootfs.qcow2", "qcow2")
    assert re.match(r"\d+\.\d+\.\d+-\d+-cloud-arm64\Z", m["kernel_release"]), m["kernel_release"]
    # The arm64 board's command line (VirtBoard.default_cmdline) and the root: nothing of the x86 one.
    assert m["cmdline"] == "console=ttyS0 panic=1 random.trust_cpu=on root=/dev/vda rw"

    kernel = (arm64_template / "vmlinuz").read_bytes()
    if kernel[:2] == b"\x1f\x8b":
        kernel = gzip.decompress(kernel)
    offset, magic = ARM64_IMAGE_MAGIC
    assert kernel[offset:offset + 4] == magic, "not an arm64 Image: %r" % kernel[:64]
    info = qemu_img_json("info", str(arm64_template / "rootfs.qcow2"))
    assert info["format"] == "qcow2" and "backing-filename" not in info and info["virtual-size"] == 2 << 30
    assert info["actual-size"] < 400 * MiB, "the template is not compressed: %d bytes" % info["actual-size"]
    assert subprocess.run(["qemu-img", "check", "-q", str(arm64_template / "rootfs.qcow2")]).returncode == 0
    packages = (arm64_template / "packages.txt").read_text()
    assert re.search(r"^linux-image-\S+-cloud-arm64 ", packages, re.M), packages
    assert re.search(r"^linux-image-cloud-arm64 ", packages, re.M)
    assert not re.search(r"amd64", packages)


def test_the_arm64_template_holds_arm64_debian_configured_for_a_vm(arm64_template, tmp_path):
    """Read without mounting (debugfs on a raw copy): Debian 12 bookworm (os-release), its programs arm64 ELF
    (e_machine 183, and `file` agrees), the getty on ttyS0 (the arm64 board's 16550), root on
    /dev/vda; the initramfs (zstd) carries the virtio modules the arm64 cloud kernel has as modules."""
    raw = tmp_path / "rootfs.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(arm64_template / "rootfs.qcow2"), str(raw)], check=True)
    os_release = debugfs(raw, "cat /usr/lib/os-release")  # /etc/os-release links to it
    assert "VERSION_CODENAME=bookworm" in os_release and 'VERSION_ID="12"' in os_release, os_release
    for program in ("/usr/bin/bash", "/usr/lib/systemd/systemd"):
        out = tmp_path / program.rsplit("/", 1)[1]
        debugfs(raw, "dump %s %s" % (program, out))
        assert elf_machine(out) == EM_AARCH64, program
        described = subprocess.run(["file", "-b", str(out)], capture_output=True, text=True, check=True).stdout
        assert "ARM aarch64" in described, described
    assert re.search(r"^/dev/vda\s+/\s+ext4\s", debugfs(raw, "cat /etc/fstab"), re.M)
    assert "serial-getty@ttyS0.service" in debugfs(raw, "ls -l /etc/systemd/system/getty.target.wants")
    assert debugfs(raw, "cat /etc/machine-id") == ""

    cpio = subprocess.run(["zstd", "-dc", str(arm64_template / "initrd.img")], capture_output=True, check=True).stdout
    for module in ("virtio_mmio.ko", "virtio_blk.ko", "virtio_net.ko"):
        assert module.encode() in cpio, module
    assert re.search(rb"virtio_mmio\nvirtio_pci\nvirtio_blk\nvirtio_net\next4\n", cpio), "conf/modules"


def test_the_script_refuses_a_bad_arch_and_an_arm64_cloud_layout_in_one_line(tmp_path):
    """--arch sparc and --layout cloud with arm64: exit 2, one line, nothing made (no root needed to be told)."""
    for args, words in ((["--arch", "sparc"], "--arch 'sparc' is not an architecture tenbox builds images for: "
                                              "amd64 or arm64"),
                        (["--arch", "arm64", "--layout", "cloud"], "--layout cloud is amd64 only for now")):
        r = run_tool(["runuser", "-u", "nobody", "--", str(ROOTFS_SCRIPT), "--out", str(tmp_path / "img")] + args, 30)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_script_says_in_one_line_that_a_foreign_arch_needs_qemu_user_registered(tmp_path):
    """--arch arm64 on this amd64 host with binfmt_misc lacking qemu-aarch64 (its folder replaced by an
    empty one through the script's test hook $TENBOX_BINFMT_DIR), or having it without the F flag:
    exit 3 at once, one line naming qemu-user-static, nothing written in the output's folder."""
    fake = tmp_path / "binfmt_misc"
    fake.mkdir()
    parent = tmp_path / "images"
    parent.mkdir()
    env = repo_env({"TENBOX_BINFMT_DIR": str(fake)})
    for entry in (None, "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PO\noffset 0\n"):
        if entry is not None:
            (fake / "qemu-aarch64").write_text(entry)
        r = run_tool([str(ROOTFS_SCRIPT), "--arch", "arm64", "--out", str(parent / "img")], 30, env=env)
        assert r.returncode == 3, r.stderr
        assert r.stderr.strip().splitlines() == [
            "make-rootfs-debian.sh: error: building an arm64 image on this amd64 host needs qemu-user-static "
            "registered with binfmt_misc with the F flag (%s/qemu-aarch64 is missing, disabled or without F): "
            "apt-get install qemu-user-static binfmt-support, or systemctl restart systemd-binfmt" % fake]
        assert list(parent.iterdir()) == []


def test_image_build_arch_arm64_builds_here_and_this_hosts_tenboxd_will_not_import_it(daemon, arm64_template):
    """Through a real tenboxd on this x86_64 host: `tenbox image build debian --arch arm64` without
    --no-import is refused before any build (exit 2, one line: tenboxd keeps only this host's images);
    with --no-import the build (up to date here) prints its folder; an import of that folder is refused
    (invalid_argument, naming both architectures) and leaves the store empty."""
    args = ["image", "build", "debian", "--arch", "arm64", "--name", ARM64_NAME, "--out", str(arm64_template)]
    started = time.monotonic()
    r = daemon.ctl(*args)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.strip().splitlines() == [
        "tenbox: tenboxd on this x86_64 host keeps only x86_64 images: build the arm64 image with --no-import, "
        "then import its folder on an aarch64 host (tenbox image import DIR)"], err
    assert time.monotonic() - started < 20
    r = daemon.ctl(*args, "--no-import", "--json")
    assert json.loads(ok(r)) == {"name": ARM64_NAME, "path": str(arm64_template)}
    assert "up to date" in r.stderr.decode() and "arm64" in r.stderr.decode()
    r = daemon.ctl("image", "import", str(arm64_template), "--name", ARM64_NAME)
    err = r.stderr.decode()
    assert r.returncode == 1 and "the image is for aarch64, this host is x86_64" in err, err
    assert err.rstrip().endswith("(invalid_argument)") and len(err.strip().splitlines()) == 1
    assert json.loads(ok(daemon.ctl("image", "ls", "--json"))) == []


def test_the_arm64_template_boots_to_a_login_prompt_under_qemu_virt(arm64_template, tmp_path):
    """The image's kernel, initrd and command line (its console moved to QEMU's PL011) on a qcow2
    overlay of the template, QEMU's virt machine with TCG, virtio-blk on virtio-mmio as tenbox offers
    it: the initramfs finds /dev/vda, systemd reaches `tenbox login:`; the template is unchanged."""
    if not shutil.which(QEMU_AARCH64):
        pytest.fail("%s not found: install qemu-system-arm (make deps)" % QEMU_AARCH64)
    m = manifest_of(arm64_template)
    template = arm64_template / "rootfs.qcow2"
    before = sha256_file(template)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(overlay)],
                   check=True)
    cmdline = m["cmdline"].replace("console=ttyS0", "console=ttyAMA0")
    argv = [QEMU_AARCH64, "-M", "virt", "-cpu", "cortex-a57", "-smp", "2", "-m", "1024", "-nographic",
            "-no-reboot", "-kernel", str(arm64_template / m["kernel"]), "-initrd", str(arm64_template / m["initrd"]),
            "-append", cmdline, "-global", "virtio-mmio.force-legacy=false",
            "-drive", "if=none,id=d0,format=qcow2,file=%s" % overlay, "-device", "virtio-blk-device,drive=d0"]
    with ConsoleProcess(argv, BOOT_DEADLINE_SEC) as vm:
        vm.wait_for(login_prompt("tenbox"))
        elapsed = vm.elapsed()
        text = vm.output
    print("arm64 template under QEMU virt (TCG): login prompt after %.1f s" % elapsed)
    assert "Kernel panic" not in text and "Failed to start" not in text, text[-4000:]
    assert re.search(r"^Debian GNU/Linux 12 tenbox ttyAMA0", text, re.M), text[-2000:]
    assert "virtio_blk virtio" in text or "vda" in text, text[-4000:]
    assert sha256_file(template) == before
