"""make-rootfs-debian.sh --layout cloud: a disk shaped like Debian's genericcloud image, read back with real tools (tests; root).

A bookworm disk is built once with scripts/make-rootfs-debian.sh
--layout cloud into <repo>/.cache/images/test-bookworm-cloud (cached between
runs by the script's own stamp and lock, as tests/framework/images.py does
for the plain template: a few minutes on a clean clone, under a second
after). It is read without mounting and without loop devices: qemu-img
converts it to raw, sfdisk reads its GPT, blkid and debugfs read its file
systems at their partitions' byte offsets (`debugfs 'disk.raw?offset=N'`).
It then boots under QEMU TCG with a NoCloud seed (the reference boot of
issue 18), kernel and initrd from the build folder and grub.cfg's command
line, and cloud-init names the machine after the seed.

Needs root (debootstrap, chroot), qemu-img, qemu-system-x86_64, sfdisk,
mkfs.vfat, debugfs, blkid, xorriso, and Debian's mirror for the first build.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

from tests.framework import qemu
from tests.framework.disk_tools import sha256_file
from tests.framework.images import CLOUD_NAME, ROOTFS_SCRIPT, build_cloud_image
from tests.framework.linux_guest import TCG_CPU
from tests.framework.process import ConsoleProcess, login_prompt, run_tool
from tests.framework.repo import PYTHON, REPO, repo_env

# cloud-init (Python) under TCG: the login prompt after ~65 s on the development machines.
BOOT_DEADLINE_SEC = 300.0
MiB = 1 << 20
SECTOR = 512

# GPT partition types (sfdisk prints them upper case).
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


@dataclass(frozen=True)
class Disk:
    """The built disk as raw bytes in a temporary folder, and its partition table as sfdisk reads it."""

    raw: Path
    table: dict
    partitions: Dict[int, dict]  # by partition number

    def offset(self, number: int) -> int:
        return self.partitions[number]["start"] * SECTOR

    def at(self, number: int) -> str:
        """The file name e2fsprogs opens as partition `number`'s file system."""
        return "%s?offset=%d" % (self.raw, self.offset(number))


def debugfs(fs: str, command: str) -> str:
    r = subprocess.run(["debugfs", "-R", command, fs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def debugfs_dump(fs: str, path: str, dest: Path) -> Path:
    r = subprocess.run(["debugfs", "-R", "dump %s %s" % (path, dest), fs], capture_output=True, text=True)
    assert r.returncode == 0 and dest.exists(), r.stderr
    return dest


def blkid(raw: Path, offset: int) -> Dict[str, str]:
    """What blkid's low-level probe finds at a byte offset: TYPE, UUID, LABEL..."""
    r = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(offset), str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def image() -> Path:
    return build_cloud_image()


@pytest.fixture(scope="module")
def disk(image, tmp_path_factory) -> Disk:
    raw = tmp_path_factory.mktemp("cloud-disk") / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image / "disk.qcow2"), str(raw)], check=True)
    r = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)["partitiontable"]
    partitions = {int(re.search(r"(\d+)$", p["node"]).group(1)): p for p in table["partitions"]}
    return Disk(raw, table, partitions)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def first_menuentry(grub_cfg: str) -> Dict[str, str]:
    """The default (first) menu entry's linux and initrd lines: {"linux": path, "args": ..., "initrd": path}."""
    m = re.search(r"^menuentry .*?\{\n(.*?)^\}", grub_cfg, re.M | re.S)
    assert m, grub_cfg
    body = m.group(1)
    linux = re.search(r"^\s*linux\s+(\S+)\s+(.*?)\s*$", body, re.M)
    initrd = re.search(r"^\s*initrd\s+(\S+)\s*$", body, re.M)
    assert linux and initrd, body
    return {"linux": linux.group(1), "args": linux.group(2), "initrd": initrd.group(1), "body": body}


# --- the build -----------------------------------------------------------------------------------


def test_the_cloud_build_is_cached_by_its_own_stamp_and_its_manifest_boots_the_whole_disk(image):
    """A rerun is "up to date"; the same folder is not up to date for --layout plain (the layout is
    in the stamp); the folder has disk.qcow2 instead of rootfs.qcow2, a standalone compressed qcow2
    of the whole disk, and a version-1 manifest that tenboxd's own parser accepts: the kernel and
    initrd copied out of /boot, root=PARTUUID= of partition 1, "layout": "cloud"."""
    started = time.monotonic()
    argv = [str(ROOTFS_SCRIPT), "--layout", "cloud", "--suite", "bookworm", "--name", CLOUD_NAME, "--out", str(image)]
    r = run_tool(argv, 60)
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    assert time.monotonic() - started < 10
    plain = [a for a in argv if a not in ("--layout", "cloud")] + ["--check"]
    r = run_tool(plain, 60)
    assert r.returncode == 1 and "not up to date" in r.stderr, r.stderr

    m = manifest_of(image)
    on_disk = sorted(p.name for p in image.iterdir() if p.name not in ("manifest.json", ".stamp"))
    assert sorted(m["files"]) == on_disk == ["disk.qcow2", "initrd.img", "packages.txt", "vmlinuz"]
    for fn, entry in m["files"].items():
        assert (image / fn).stat().st_size == entry["size"] and sha256_file(image / fn) == entry["sha256"], fn
    assert (m["kernel"], m["initrd"], m["rootfs"], m["rootfs_format"]) == ("vmlinuz", "initrd.img", "disk.qcow2", "qcow2")
    assert m["layout"] == "cloud" and m["virtual_size"] == 2 << 30
    assert re.search(r"(^| )root=PARTUUID=[0-9a-f-]{36} ", m["cmdline"]) and "console=ttyS0" in m["cmdline"].split()
    from tenbox_supervisor.images import parse_manifest
    assert parse_manifest((image / "manifest.json").read_bytes())["rootfs"] == "disk.qcow2"

    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image / "disk.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info and info["virtual-size"] == 2 << 30
    assert info["actual-size"] < 400 * MiB, "the disk is not compressed: %d bytes" % info["actual-size"]
    assert subprocess.run(["qemu-img", "check", "-q", str(image / "disk.qcow2")]).returncode == 0
    packages = (image / "packages.txt").read_text()
    for p in ("cloud-init", "openssh-server", "sudo", "grub2-common", "grub-pc-bin", "linux-image-cloud-amd64",
              "initramfs-tools", "systemd-resolved"):
        assert re.search(r"^%s " % re.escape(p), packages, re.M), p


def test_the_disk_has_the_partitions_of_debian_genericcloud(image, disk):
    """sfdisk reads a GPT with partition 14 BIOS boot (1 MiB, 3 MiB long), 15 an EFI system partition
    (4 MiB, vfat), 1 the root (128 MiB to the last MiB, type Linux root x86-64, ext4 without a label),
    not overlapping; the partition UUID the manifest boots is partition 1's."""
    assert disk.table["label"] == "gpt" and disk.table["sectorsize"] == SECTOR
    assert sorted(disk.partitions) == [1, 14, 15]
    bios, esp, root = disk.partitions[14], disk.partitions[15], disk.partitions[1]
    assert (bios["type"], bios["start"] * SECTOR, bios["size"] * SECTOR) == (BIOS_BOOT, 1 * MiB, 3 * MiB)
    assert (esp["type"], esp["start"] * SECTOR, esp["size"] * SECTOR) == (EFI_SYSTEM, 4 * MiB, 124 * MiB)
    assert (root["type"], root["start"] * SECTOR) == (LINUX_ROOT_X86_64, 128 * MiB)
    assert (root["start"] + root["size"]) * SECTOR == (2 << 30) - MiB
    spans = sorted((p["start"], p["start"] + p["size"]) for p in disk.partitions.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert subprocess.run(["sfdisk", "--verify", str(disk.raw)], capture_output=True).returncode == 0

    assert blkid(disk.raw, disk.offset(15))["TYPE"] == "vfat"
    fs = blkid(disk.raw, disk.offset(1))
    assert fs["TYPE"] == "ext4" and "LABEL" not in fs, fs
    partuuid = re.search(r"root=PARTUUID=(\S+)", manifest_of(image)["cmdline"]).group(1)
    assert root["uuid"].lower() == partuuid


def test_grub_cfg_is_debians_own_and_boots_partition_1_by_partuuid(image, disk, tmp_path):
    """/boot/grub/grub.cfg, made by grub-mkconfig from Debian's /etc/grub.d: the first menu entry's
    linux line has root=PARTUUID= of partition 1 and console=ttyS0, its search lines name the root
    ext4's UUID, and the kernel and initrd it names are in /boot, the same bytes as the folder's
    vmlinuz and initrd.img. The image's grub-probe is Debian's program, not the build's stand-in."""
    grub_cfg = debugfs(disk.at(1), "cat /boot/grub/grub.cfg")
    assert "It is automatically generated by grub-mkconfig using templates" in grub_cfg
    assert "### BEGIN /etc/grub.d/10_linux ###" in grub_cfg
    entry = first_menuentry(grub_cfg)
    args = entry["args"].split()
    partuuid = disk.partitions[1]["uuid"].lower()
    fs_uuid = blkid(disk.raw, disk.offset(1))["UUID"]
    assert "root=PARTUUID=%s" % partuuid in args, entry["args"]
    assert any(re.fullmatch(r"console=ttyS0(,\d+)?", a) for a in args), entry["args"]
    searches = re.findall(r"^\s*search .*--fs-uuid .*$", entry["body"], re.M)
    assert searches and all(s.split()[-1] == fs_uuid for s in searches), searches
    assert "insmod part_gpt" in entry["body"] and "insmod ext2" in entry["body"]

    release = manifest_of(image)["kernel_release"]
    assert (entry["linux"], entry["initrd"]) == ("/boot/vmlinuz-%s" % release, "/boot/initrd.img-%s" % release)
    for path, copy in ((entry["linux"], "vmlinuz"), (entry["initrd"], "initrd.img")):
        assert "Type: regular" in debugfs(disk.at(1), "stat %s" % path), path
        dumped = debugfs_dump(disk.at(1), path, tmp_path / copy)
        assert sha256_file(dumped) == sha256_file(image / copy), path
    probe = debugfs_dump(disk.at(1), "/usr/sbin/grub-probe", tmp_path / "grub-probe")
    assert probe.read_bytes()[:4] == b"\x7fELF"


def test_cloud_init_asks_only_nocloud_and_fstab_names_partitions_by_uuid(disk):
    """cloud-init's configuration ends with datasource_list [ NoCloud, None ] (no wait for network
    metadata services); /etc/fstab mounts / and /boot/efi by PARTUUID, never /dev/vda; root's
    password is locked, the template has no SSH host keys (each VM makes its own at first boot),
    and the initramfs hook still loads the virtio modules."""
    fs = disk.at(1)
    names = sorted(re.findall(r"\s(\S+\.cfg)\s*$", debugfs(fs, "ls -l /etc/cloud/cloud.cfg.d"), re.M))
    assert names, "no /etc/cloud/cloud.cfg.d/*.cfg"
    lists = [(n, line) for n in names for line in debugfs(fs, "cat /etc/cloud/cloud.cfg.d/%s" % n).splitlines()
             if line.startswith("datasource_list:")]
    assert lists and re.fullmatch(r"datasource_list:\s*\[\s*NoCloud,\s*None\s*\]", lists[-1][1]), lists
    assert not re.search(r"^datasource_list:", debugfs(fs, "cat /etc/cloud/cloud.cfg"), re.M)

    fstab = [line.split() for line in debugfs(fs, "cat /etc/fstab").splitlines()
             if line.strip() and not line.startswith("#")]
    mounts = {f[1]: f for f in fstab}
    assert mounts["/"][0] == "PARTUUID=%s" % disk.partitions[1]["uuid"].lower() and mounts["/"][2] == "ext4"
    assert mounts["/boot/efi"][0] == "PARTUUID=%s" % disk.partitions[15]["uuid"].lower()
    assert not any(f[0].startswith("/dev/") for f in fstab), fstab

    assert re.search(r"^root:!", debugfs(fs, "cat /etc/shadow"), re.M)
    assert "ssh_host" not in debugfs(fs, "ls /etc/ssh")
    assert "tenbox-ssh-host-keys.service" in debugfs(fs, "ls /etc/systemd/system/multi-user.target.wants")
    assert "cloud-init.service" in debugfs(fs, "ls /etc/systemd/system/cloud-init.target.wants")
    hook = debugfs(fs, "cat /etc/initramfs-tools/hooks/tenbox-virtio")
    assert all(m in hook for m in ("virtio_mmio", "virtio_blk", "virtio_pci", "ext4"))


def test_tenbox_image_build_layout_cloud_is_the_same_build(image):
    """`tenbox image build debian --layout cloud` runs the script with --layout cloud: on the cached
    folder it finds the same inputs (up to date), so the CLI and the script agree on the stamp."""
    r = run_tool([PYTHON, "-m", "tenbox_ctl", "image", "build", "debian", "--layout", "cloud", "--name", CLOUD_NAME,
                  "--out", str(image), "--no-import"], 120, cwd=REPO, env=repo_env())
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr[-3000:]


def test_a_bad_layout_is_refused_with_the_choices():
    r = run_tool([str(ROOTFS_SCRIPT), "--layout", "lvm"], 30)
    assert r.returncode == 2 and "--layout 'lvm'" in r.stderr and "plain" in r.stderr and "cloud" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- the reference boot under QEMU TCG ------------------------------------------------------------


def seed_iso(folder: Path, hostname: str) -> Path:
    """A NoCloud seed: ISO 9660 labelled cidata with meta-data and an empty #cloud-config."""
    files = folder / "seed"
    files.mkdir()
    (files / "meta-data").write_text("instance-id: %s\nlocal-hostname: %s\n" % (hostname, hostname))
    (files / "user-data").write_text("#cloud-config\n{}\n")
    iso = folder / "seed.iso"
    r = subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-volid", "cidata", "-J", "-r",
                        str(files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return iso


def boot_argv(image: Path, disk: Disk, overlay: Path, extra: List[str]) -> List[str]:
    """QEMU's pc machine under TCG: the folder's kernel and initrd with grub.cfg's default command line,
    the disk (through a throwaway overlay) on QEMU's virtio-blk, user networking on virtio-net."""
    args = first_menuentry(debugfs(disk.at(1), "cat /boot/grub/grub.cfg"))["args"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image / "disk.qcow2"), "-F", "qcow2",
                    str(overlay)], check=True)
    devices = qemu.virtio_blk(overlay, "qcow2", pci=True) + extra
    devices += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    return qemu.pc(image / "vmlinuz", image / "initrd.img", args, memory_mb=1024, cpu=TCG_CPU, devices=devices)


@pytest.mark.slow
def test_the_disk_boots_under_qemu_tcg_and_cloud_init_names_it_from_the_nocloud_seed(image, disk, tmp_path):
    """The reference boot: grub.cfg's command line, root found by PARTUUID on QEMU's virtio-blk (PCI),
    a NoCloud seed ISO as a second read-only disk; cloud-init reads it (DataSourceNoCloud), sets the
    host name, and the serial console shows `cloudtest login:`, with no cloud-init module failing."""
    iso = seed_iso(tmp_path, "cloudtest")
    before = sha256_file(image / "disk.qcow2")
    seed = ["-drive", "file=%s,if=none,format=raw,readonly=on,id=seed" % iso, "-device", "virtio-blk-pci,drive=seed"]
    with ConsoleProcess(boot_argv(image, disk, tmp_path / "overlay.qcow2", seed), BOOT_DEADLINE_SEC) as vm:
        vm.wait_for(login_prompt("cloudtest"))
        elapsed = vm.elapsed()
        vm.wait_for(r"Cloud-init v\. \S+ finished at .*$", timeout=120)
        text = vm.output
    print("cloud layout under QEMU TCG with a NoCloud seed: login prompt after %.1f s" % elapsed)
    assert "Kernel panic" not in text and "Failed to start" not in text, text[-4000:]
    assert "Datasource DataSourceNoCloud" in text, text[-3000:]
    assert not re.search(r"Running module \S+ .* failed", text), re.findall(r".*Running module.*failed.*", text)
    assert sha256_file(image / "disk.qcow2") == before


@pytest.mark.slow
def test_without_a_seed_cloud_init_probes_no_metadata_service(image, disk, tmp_path):
    """No seed: cloud-init looks for NoCloud's seed only, then goes on with the None data source
    (no metadata service is asked, nothing waits for one); the login prompt shows the build's host name."""
    with ConsoleProcess(boot_argv(image, disk, tmp_path / "overlay.qcow2", []), BOOT_DEADLINE_SEC) as vm:
        vm.wait_for(login_prompt("tenbox"))
        elapsed = vm.elapsed()
        vm.wait_for(r"Cloud-init v\. \S+ finished at .*$", timeout=120)
        text = vm.output
    print("cloud layout under QEMU TCG without a seed: login prompt after %.1f s" % elapsed)
    assert "Kernel panic" not in text and "Failed to start" not in text, text[-4000:]
    assert "Datasource DataSourceNone" in text, text[-3000:]
    assert not re.search(r"169\.254\.169\.254|DataSource(Ec2|OpenStack|GCE|Azure)", text), text[-3000:]
    assert not re.search(r"Running module \S+ .* failed", text), re.findall(r".*Running module.*failed.*", text)
