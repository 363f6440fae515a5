"""`tenbox-image boot-files IMAGE --out DIR` on small cloud-image-shaped disks made by real tools (tests; any user).

Each disk is a sparse file of a few tens of MiB: sfdisk writes its GPT or
MBR, mkfs.ext4 -d writes each ext4 file system straight into its partition
(`-E offset=`), mkfs.vfat the ESP, mkfs.xfs an xfs one, qemu-img converts to
qcow2. The kernels are the test guests' real bzImages; the grub.cfg files
are hand-written after Debian's (tests/integration/test_bootcfg.py runs bootcfg on
the ones Debian's own grub scripts write). The tool runs as tenboxd runs
it, a child process answering one JSON object.

Needs sfdisk (fdisk), mkfs.ext4 and debugfs (e2fsprogs), mkfs.vfat
(dosfstools), mkfs.xfs (xfsprogs) and qemu-img (qemu-utils): make deps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import pytest

from tests.framework.guests import guest_path
from tests.framework.process import run_tool
from tests.framework.repo import PYTHON, REPO, repo_env

TOOL_TIMEOUT_SEC = 120.0
MiB = 1 << 20
SECTOR = 512

BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"

ROOT_UUID = "0e8f6d52-4b1c-4a3e-9d2b-6f1a7c3e5b90"
BOOT_UUID = "5d1c2b3a-9e8f-4a7b-8c6d-1e2f3a4b5c6d"
NEW, OLD = "6.1.0-28-cloud-amd64", "6.1.0-9-cloud-amd64"
MACHINE_ID = "6a9857a393724b7a981ebb5b8495b9ea"
# What Debian's cloud images put on the command line (debian-cloud-images, 15_debian-cloud.cfg).
CLOUD_CMDLINE = "console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"

Tree = Dict[str, Union[bytes, str, "Link"]]


class Link(str):
    """A symlink's target in a Tree."""


@pytest.fixture(scope="module")
def tools(guests):
    missing = [t for t in ("sfdisk", "mkfs.ext4", "debugfs", "mkfs.vfat", "mkfs.xfs", "mkfs.btrfs", "grub-fstest",
                           "qemu-img")
               if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        pytest.fail("%s missing: make deps (fdisk, e2fsprogs, dosfstools, xfsprogs, btrfs-progs, grub-common, qemu-utils)" % ", ".join(missing))


def kernel(name: str) -> bytes:
    """A real x86 bzImage: a test guest."""
    return Path(guest_path(name)).read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(*argv: str, stdin: Optional[str] = None) -> None:
    r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SEC,
                       env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"))
    assert r.returncode == 0, "%s failed:\n%s%s" % (" ".join(argv), r.stdout, r.stderr)


def make_tree(folder: Path, files: Tree) -> Path:
    for rel, content in files.items():
        path = folder / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            os.symlink(str(content), str(path))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_text(content)
    return folder


def partition_disk(image: Path, size_mib: int, label: str, parts: List[str]) -> Dict[int, Tuple[int, int]]:
    """A sparse disk with sfdisk's table; {number: (start, size)} in bytes, as sfdisk reads it back."""
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    run("sfdisk", "-q", str(image), stdin="label: %s\n%s\n" % (label, "\n".join(parts)))
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")).stdout
    table = json.loads(out)["partitiontable"]
    return {int(p["node"][len(str(image)):]): (p["start"] * SECTOR, p["size"] * SECTOR) for p in table["partitions"]}


def mkfs_ext4(image: Path, where: Tuple[int, int], tree: Path, fs_uuid: str) -> None:
    """An ext4 file system of `tree` written into [start, start + size) of the disk file (or the whole file)."""
    start, size = where
    run("mkfs.ext4", "-q", "-F", "-d", str(tree), "-U", fs_uuid, "-E", "offset=%d,nodiscard" % start,
        str(image), "%dk" % (size // 1024))


def mkfs_vfat(image: Path, where: Tuple[int, int]) -> None:
    start, size = where
    run("mkfs.vfat", "--offset=%d" % (start // SECTOR), str(image), str(size // 1024))


def whole_disk_ext4(tmp_path: Path, files: Tree, size_mib: int = 24) -> Path:
    """A disk without a table: one ext4 file system of `files`."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    mkfs_ext4(image, (0, size_mib * MiB), make_tree(tmp_path / "tree", files), ROOT_UUID)
    return image


def grub_cfg(fs_uuid: str, root_uuid: str, prefix: str = "/boot", default: str = "0",
             initrds: Optional[List[str]] = None, kernel_path: Optional[str] = None) -> str:
    """grub.cfg after the one Debian 12's grub-mkconfig writes (00_header, 10_linux): an entry for the newest
    kernel, a submenu with each kernel and its recovery mode, `search --fs-uuid` for the file system
    holding /boot. `kernel_path`/`initrds` replace the newest entry's files."""
    def entry(title: str, ident: str, version: str, extra: str, indent: str, files: Tuple[str, List[str]]) -> str:
        k, irs = files
        return """{i}menuentry '{t}' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option \
'{id}' {{
{i}	load_video
{i}	insmod gzio
{i}	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
{i}	insmod part_gpt
{i}	insmod ext2
{i}	search --no-floppy --fs-uuid --set=root {fs}
{i}	echo	'Loading Linux {v} ...'
{i}	linux	{k} root=UUID={root} ro {extra}
{i}	echo	'Loading initial ramdisk ...'
{i}	initrd	{irs}
{i}}}
""".format(i=indent, t=title, id=ident, fs=fs_uuid, v=version, k=k, root=root_uuid, extra=extra,
           irs=" ".join(irs))

    def files(version: str) -> Tuple[str, List[str]]:
        return "%s/vmlinuz-%s" % (prefix, version), ["%s/initrd.img-%s" % (prefix, version)]

    newest = (kernel_path or files(NEW)[0], initrds if initrds is not None else files(NEW)[1])
    header = """#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
#

### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="%s"
fi

if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi

export menuentry_id_option

function load_video {
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  else
    insmod efi_gop
    insmod vbe
  fi
}

serial --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=0
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
""" % default
    out = [header, entry("Debian GNU/Linux", "gnulinux-simple-" + root_uuid, NEW, CLOUD_CMDLINE, "", newest)]
    out.append("submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-%s' {\n"
               % root_uuid)
    for version in (NEW, OLD):
        out.append(entry("Debian GNU/Linux, with Linux %s" % version, "gnulinux-%s-advanced-%s" % (version, root_uuid),
                         version, CLOUD_CMDLINE, "\t", files(version)))
        out.append(entry("Debian GNU/Linux, with Linux %s (recovery mode)" % version,
                         "gnulinux-%s-recovery-%s" % (version, root_uuid), version, "single", "\t", files(version)))
    out.append("}\n\n### END /etc/grub.d/10_linux ###\n")
    return "".join(out)


def boot_files(image: Path, out: Path) -> Tuple[int, dict, str]:
    """Run the tool as tenboxd does; (exit status, its JSON answer, stderr)."""
    out.mkdir(exist_ok=True)
    r = run_tool([PYTHON, "-m", "tenbox_vmm.imagetool", "boot-files", image, "--out", out], TOOL_TIMEOUT_SEC,
                 cwd=REPO, env=repo_env())
    lines = r.stdout.splitlines()
    assert len(lines) == 1, "one JSON line expected on stdout:\n%s\nstderr:\n%s" % (r.stdout, r.stderr)
    return r.returncode, json.loads(lines[0]), r.stderr


def extracted(image: Path, out: Path) -> dict:
    rc, answer, err = boot_files(image, out)
    assert rc == 0, "boot-files refused: %s\n%s" % (answer, err)
    assert sorted(os.listdir(out)) == sorted(n for n in ("vmlinuz", answer["initrd"]) if n), \
        "DIR holds exactly the kernel and initrd (the work folder is gone)"
    return answer


def refused(image: Path, out: Path, code: str, *words: str) -> str:
    """The tool refuses with `code`, one line naming `words`, exit status 2, and leaves DIR empty."""
    rc, answer, err = boot_files(image, out)
    assert rc == 2 and answer.get("code") == code, (answer, err)
    message = answer["message"]
    assert "\n" not in message and message in err
    for w in words:
        assert w in message, (w, message)
    assert os.listdir(out) == [], "a refusal leaves DIR as it was"
    return message


# ---- the disks ---------------------------------------------------------------------------------------------------

def root_files(k_new: bytes, k_old: bytes, initrd: bytes, cfg: str) -> Tree:
    """A Debian root file system as the cloud image has it, /boot included."""
    return {
        "/etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n',
        "/etc/fstab": "UUID=%s / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1\n" % ROOT_UUID,
        "/boot/vmlinuz-" + NEW: k_new,
        "/boot/initrd.img-" + NEW: initrd,
        "/boot/vmlinuz-" + OLD: k_old,
        "/boot/initrd.img-" + OLD: b"old initrd",
        "/boot/grub/grub.cfg": cfg,
        "/vmlinuz": Link("boot/vmlinuz-" + NEW),
        "/initrd.img": Link("boot/initrd.img-" + NEW),
    }


@pytest.fixture(scope="module")
def debian_gpt(tools, tmp_path_factory) -> Tuple[Path, bytes, bytes]:
    """Debian genericcloud's layout: GPT with BIOS boot (14), ESP (15, vfat), root ext4 (1) with /boot."""
    tmp = tmp_path_factory.mktemp("debian-gpt")
    image = tmp / "disk.raw"
    parts = partition_disk(image, 64, "gpt", [
        "%s14 : start=2048, size=2048, type=%s" % (image, BIOS_BOOT),
        "%s15 : start=4096, size=16384, type=%s" % (image, EFI_SYSTEM),
        "%s1 : start=20480, type=%s" % (image, LINUX_FS),
    ])
    initrd = os.urandom(300 * 1024 + 3)
    files = root_files(kernel("boot"), kernel("echo"), initrd, grub_cfg(ROOT_UUID, ROOT_UUID))
    mkfs_ext4(image, parts[1], make_tree(tmp / "root", files), ROOT_UUID)
    mkfs_vfat(image, parts[15])
    return image, kernel("boot"), initrd


# ---- what it finds -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qcow2-compressed"])
def test_debian_cloud_layout_gives_the_default_entrys_kernel_initrd_and_cmdline(debian_gpt, tmp_path, fmt):
    """Raw (debugfs at the partition's offset) and qcow2, plain or compressed (exported by tenbox's reader):
    the same answer, the kernel and initrd byte for byte."""
    raw, k, initrd = debian_gpt
    image = raw
    if fmt != "raw":
        image = tmp_path / "disk.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", *(["-c"] if fmt == "qcow2-compressed" else []), str(raw), str(image))
    answer = extracted(image, tmp_path / "out")
    assert answer == {
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "cmdline": "root=UUID=%s ro %s" % (ROOT_UUID, CLOUD_CMDLINE),
        "title": "Debian GNU/Linux",
        "table": "gpt",
        "root_partition": 1,
        "boot_partition": 1,
        "fs_uuid": ROOT_UUID,
        "config": "/boot/grub/grub.cfg",
        "kernel_path": "/boot/vmlinuz-" + NEW,
        "initrd_paths": ["/boot/initrd.img-" + NEW],
    }
    assert sha256((tmp_path / "out" / "vmlinuz").read_bytes()) == sha256(k)
    assert (tmp_path / "out" / "initrd.img").read_bytes() == initrd


def test_mbr_with_a_separate_boot_partition_reads_paths_without_boot(tools, tmp_path):
    """MBR, root (1) and /boot (2): grub.cfg is /grub/grub.cfg on /boot and names /vmlinuz-...; the default
    `1>2` is the old kernel in the submenu; root= names partition 1."""
    image = tmp_path / "disk.raw"
    parts = partition_disk(image, 64, "dos", ["start=2048, size=20480, type=83", "start=22528, type=83"])
    mkfs_ext4(image, parts[1], make_tree(tmp_path / "root", {"/etc/hostname": "debian\n", "/boot/": ""}),
              ROOT_UUID)
    boot = {
        "/vmlinuz-" + NEW: kernel("boot"),
        "/initrd.img-" + NEW: b"new initrd",
        "/vmlinuz-" + OLD: kernel("echo"),
        "/initrd.img-" + OLD: b"old initrd",
        "/grub/grub.cfg": grub_cfg(BOOT_UUID, ROOT_UUID, prefix="", default="1>2"),
    }
    mkfs_ext4(image, parts[2], make_tree(tmp_path / "boot", boot), BOOT_UUID)
    answer = extracted(image, tmp_path / "out")
    assert (answer["table"], answer["root_partition"], answer["boot_partition"]) == ("mbr", 1, 2)
    assert (answer["config"], answer["fs_uuid"], answer["title"]) == \
        ("/grub/grub.cfg", BOOT_UUID, "Debian GNU/Linux, with Linux %s" % OLD)
    assert (answer["kernel_path"], answer["initrd_paths"]) == ("/vmlinuz-" + OLD, ["/initrd.img-" + OLD])
    assert answer["cmdline"] == "root=UUID=%s ro %s" % (ROOT_UUID, CLOUD_CMDLINE)
    assert sha256((tmp_path / "out" / "vmlinuz").read_bytes()) == sha256(kernel("echo"))
    assert (tmp_path / "out" / "initrd.img").read_bytes() == b"old initrd"


def test_kernel_is_read_from_the_file_system_grubs_search_names(tools, tmp_path):
    """grub.cfg on the root file system whose entry searches --fs-uuid for another partition: the kernel
    comes from that one."""
    image = tmp_path / "disk.raw"
    parts = partition_disk(image, 64, "gpt", ["start=2048, size=20480, type=%s" % LINUX_FS,
                                              "start=22528, type=%s" % LINUX_FS])
    cfg = grub_cfg(BOOT_UUID, ROOT_UUID, prefix="")
    mkfs_ext4(image, parts[1], make_tree(tmp_path / "root", {"/boot/grub/grub.cfg": cfg}), ROOT_UUID)
    mkfs_ext4(image, parts[2], make_tree(tmp_path / "boot", {"/vmlinuz-" + NEW: kernel("boot"),
                                                             "/initrd.img-" + NEW: b"initrd"}), BOOT_UUID)
    answer = extracted(image, tmp_path / "out")
    assert (answer["config"], answer["boot_partition"], answer["root_partition"], answer["fs_uuid"]) == \
        ("/boot/grub/grub.cfg", 2, 1, BOOT_UUID)
    assert sha256((tmp_path / "out" / "vmlinuz").read_bytes()) == sha256(kernel("boot"))


def test_whole_disk_ext4_without_a_table_follows_fast_and_slow_symlinks(tools, tmp_path):
    """No partition table: the disk is the file system. /vmlinuz is a fast symlink, /initrd.img a slow one
    (a target longer than the inode holds)."""
    long_name = "/boot/initrd.img-%s-with-a-name-long-enough-for-a-slow-symlink" % NEW
    files = {
        "/boot/vmlinuz-" + NEW: kernel("boot"),
        long_name: b"the initrd",
        "/vmlinuz": Link("boot/vmlinuz-" + NEW),
        "/initrd.img": Link(long_name),
        "/boot/grub/grub.cfg": grub_cfg(ROOT_UUID, ROOT_UUID, kernel_path="/vmlinuz", initrds=["/initrd.img"]),
    }
    answer = extracted(whole_disk_ext4(tmp_path, files), tmp_path / "out")
    assert (answer["table"], answer["root_partition"], answer["boot_partition"]) == ("none", None, None)
    assert (answer["kernel_path"], answer["initrd_paths"]) == ("/boot/vmlinuz-" + NEW, [long_name])
    assert sha256((tmp_path / "out" / "vmlinuz").read_bytes()) == sha256(kernel("boot"))
    assert (tmp_path / "out" / "initrd.img").read_bytes() == b"the initrd"


def test_two_initrds_are_concatenated_in_order_padded_to_4_bytes_as_grub_loads_them(tools, tmp_path):
    ucode = os.urandom(1001)
    main = os.urandom(5000)
    files = {
        "/boot/vmlinuz-" + NEW: kernel("boot"),
        "/boot/intel-ucode.img": ucode,
        "/boot/initrd.img-" + NEW: main,
        "/boot/grub/grub.cfg": grub_cfg(ROOT_UUID, ROOT_UUID,
                                        initrds=["/boot/intel-ucode.img", "/boot/initrd.img-" + NEW]),
    }
    answer = extracted(whole_disk_ext4(tmp_path, files), tmp_path / "out")
    assert answer["initrd_paths"] == ["/boot/intel-ucode.img", "/boot/initrd.img-" + NEW]
    assert (tmp_path / "out" / "initrd.img").read_bytes() == ucode + bytes(3) + main


def bls_conf(version: str, root_uuid: str, prefix: str = "") -> str:
    """An entry as kernel-install's 90-loaderentry.install writes it (Fedora)."""
    return """title Fedora Linux ({v}) 40 (Cloud Edition)
version {v}
linux {p}/vmlinuz-{v}
initrd {p}/initramfs-{v}.img
options root=UUID={r} ro rootflags=subvol=root no_timer_check console=tty1 console=ttyS0,115200n8
grub_users $grub_users
grub_arg --unrestricted
grub_class fedora
""".format(v=version, r=root_uuid, p=prefix)


def test_fedora_layout_reads_bls_entries_through_blscfg_and_grubenvs_saved_entry(tools, tmp_path):
    """GPT: ESP (1), XBOOTLDR /boot (2) with grub2/grub.cfg running blscfg, grubenv's saved_entry naming
    the older of two BLS entries, and the root (3)."""
    new, old = "6.8.5-301.fc40.x86_64", "6.8.4-300.fc40.x86_64"
    image = tmp_path / "disk.raw"
    parts = partition_disk(image, 64, "gpt", ["start=2048, size=16384, type=%s" % EFI_SYSTEM,
                                              "start=18432, size=20480, type=%s" % XBOOTLDR,
                                              "start=38912, type=%s" % LINUX_FS])
    mkfs_vfat(image, parts[1])
    grubenv = ("# GRUB Environment Block\nsaved_entry=%s-%s\nboot_success=1\n" % (MACHINE_ID, old)).ljust(1024, "#")
    boot = {
        "/grub2/grub.cfg": "set default=\"${saved_entry}\"\ninsmod blscfg\nblscfg\n",
        "/grub2/grubenv": grubenv,
        "/loader/entries/%s-%s.conf" % (MACHINE_ID, new): bls_conf(new, ROOT_UUID),
        "/loader/entries/%s-%s.conf" % (MACHINE_ID, old): bls_conf(old, ROOT_UUID),
        "/vmlinuz-" + new: kernel("boot"),
        "/initramfs-%s.img" % new: b"new",
        "/vmlinuz-" + old: kernel("echo"),
        "/initramfs-%s.img" % old: b"old",
    }
    mkfs_ext4(image, parts[2], make_tree(tmp_path / "boot", boot), BOOT_UUID)
    mkfs_ext4(image, parts[3], make_tree(tmp_path / "root", {"/etc/hostname": "fedora\n", "/boot/": ""}), ROOT_UUID)
    answer = extracted(image, tmp_path / "out")
    assert (answer["config"], answer["title"]) == ("/loader/entries/*.conf", "Fedora Linux (%s) 40 (Cloud Edition)"
                                                   % old)
    assert (answer["boot_partition"], answer["root_partition"], answer["kernel_path"]) == (2, 3, "/vmlinuz-" + old)
    assert answer["cmdline"].startswith("root=UUID=%s ro " % ROOT_UUID)
    assert sha256((tmp_path / "out" / "vmlinuz").read_bytes()) == sha256(kernel("echo"))
    assert (tmp_path / "out" / "initrd.img").read_bytes() == b"old"


def test_bls_entries_under_boot_on_the_root_file_system_without_grub_cfg(tools, tmp_path):
    """/boot/loader/entries/*.conf on the root file system naming /vmlinuz-... (relative to /boot): the
    newest entry, its files found under /boot."""
    files = {
        "/boot/loader/entries/%s-%s.conf" % (MACHINE_ID, NEW): bls_conf(NEW, ROOT_UUID),
        "/boot/loader/entries/%s-%s.conf" % (MACHINE_ID, OLD): bls_conf(OLD, ROOT_UUID),
        "/boot/vmlinuz-" + NEW: kernel("boot"),
        "/boot/initramfs-%s.img" % NEW: b"new",
        "/boot/vmlinuz-" + OLD: kernel("echo"),
        "/boot/initramfs-%s.img" % OLD: b"old",
    }
    answer = extracted(whole_disk_ext4(tmp_path, files), tmp_path / "out")
    assert (answer["config"], answer["kernel_path"]) == ("/boot/loader/entries/*.conf", "/boot/vmlinuz-" + NEW)
    assert sha256((tmp_path / "out" / "vmlinuz").read_bytes()) == sha256(kernel("boot"))


NOBODY = 65534  # a user with no rights on the image (tenboxd runs the tool as its worker user)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_as_a_user_who_cannot_open_the_image_it_is_read_through_the_passed_descriptor(debian_gpt, tmp_path, fmt):
    """As tenboxd runs it: another user, the image (mode 0600 in a root-only folder) passed as `--fd N:PATH`;
    debugfs cannot open it by name, so the partition is exported through the descriptor."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: the tool runs as nobody with the image passed open")
    raw, k, initrd = debian_gpt
    image = tmp_path / ("disk." + fmt)
    if fmt == "raw":
        shutil.copyfile(str(raw), str(image))
    else:
        run("qemu-img", "convert", "-O", "qcow2", str(raw), str(image))
    os.chmod(str(image), 0o600)
    out = Path(tempfile.mkdtemp(prefix="tenbox-boot-files-"))  # nobody cannot reach into tmp_path
    try:
        os.chown(str(out), NOBODY, NOBODY)
        fd = os.open(str(image), os.O_RDONLY)
        try:
            r = subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", "--",
                                PYTHON, "-m", "tenbox_vmm.imagetool", "--fd", "%d:%s" % (fd, image), "boot-files",
                                str(image), "--out", str(out)], pass_fds=(fd,), cwd="/", env=repo_env(),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SEC)
        finally:
            os.close(fd)
        assert r.returncode == 0, r.stdout + r.stderr
        answer = json.loads(r.stdout)
        assert (answer["kernel_path"], answer["root_partition"]) == ("/boot/vmlinuz-" + NEW, 1)
        assert sorted(os.listdir(str(out))) == ["initrd.img", "vmlinuz"]
        assert sha256((out / "vmlinuz").read_bytes()) == sha256(k)
        assert (out / "initrd.img").read_bytes() == initrd
    finally:
        shutil.rmtree(str(out))


# ---- what it refuses ---------------------------------------------------------------------------------------------

def test_image_with_a_backing_file_is_refused(debian_gpt, tmp_path):
    raw, _, _ = debian_gpt
    over = tmp_path / "over.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(over))
    refused(over, tmp_path / "out", "bad_image", "backing file", str(raw))


def test_kernel_the_entry_names_but_the_image_lacks_is_refused_naming_its_path(tools, tmp_path):
    files = {
        "/boot/initrd.img-" + NEW: b"initrd",
        "/boot/grub/grub.cfg": grub_cfg(ROOT_UUID, ROOT_UUID, kernel_path="/boot/vmlinuz-missing"),
    }
    refused(whole_disk_ext4(tmp_path, files), tmp_path / "out", "no_kernel", "/boot/vmlinuz-missing", "not found")


def test_symlink_loop_is_refused(tools, tmp_path):
    files = {
        "/vmlinuz": Link("vmlinuz.old"),
        "/vmlinuz.old": Link("/vmlinuz"),
        "/boot/grub/grub.cfg": grub_cfg(ROOT_UUID, ROOT_UUID, kernel_path="/vmlinuz"),
    }
    refused(whole_disk_ext4(tmp_path, files), tmp_path / "out", "no_kernel", "symlink loop", "/vmlinuz")


def test_arm64_kernel_is_refused_naming_the_architecture(tools, tmp_path):
    arm64 = bytearray(64 * 1024)
    arm64[56:60] = b"ARM\x64"  # Documentation/arch/arm64/booting.rst: the Image header's magic
    files = {
        "/boot/vmlinuz-" + NEW: bytes(arm64),
        "/boot/initrd.img-" + NEW: b"initrd",
        "/boot/grub/grub.cfg": grub_cfg(ROOT_UUID, ROOT_UUID),
    }
    refused(whole_disk_ext4(tmp_path, files), tmp_path / "out", "unsupported", "not an x86 bzImage", "arm64")


def xfs_proto(tree: Path, proto: Path) -> Path:
    """mkfs.xfs's protofile (xfsprogs 6.1 has no -d FOLDER) for the regular files and folders of `tree`."""
    lines = ["tenbox", "0 0", "d--755 0 0"]

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                lines.append("%s l--777 0 0 %s" % (entry.name, os.readlink(str(entry))))
            elif entry.is_dir():
                lines.append("%s d--755 0 0" % entry.name)
                walk(entry)
                lines.append("$")
            else:
                lines.append("%s ---644 0 0 %s" % (entry.name, entry))
    walk(tree)
    lines.append("$")
    proto.write_text("\n".join(lines) + "\n")
    return proto


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
def test_xfs_and_btrfs_roots_are_read_through_grubs_own_drivers(tools, tmp_path, fs):
    """RHEL's layout (xfs root) and Fedora's (btrfs), with /boot on the root: BIOS boot, ESP, the root
    made by mkfs.xfs / mkfs.btrfs from a folder and copied into partition 3. grub-fstest reads grub.cfg
    and follows /vmlinuz's symlink itself; the kernel and initrd come out byte for byte."""
    image = tmp_path / "disk.raw"
    parts = partition_disk(image, 340, "gpt", ["start=2048, size=2048, type=%s" % BIOS_BOOT,
                                               "start=4096, size=16384, type=%s" % EFI_SYSTEM,
                                               "start=20480, type=%s" % LINUX_FS])
    mkfs_vfat(image, parts[2])
    initrd = os.urandom(100 * 1024 + 5)
    tree = make_tree(tmp_path / "tree", root_files(kernel("boot"), kernel("echo"), initrd,
                                                  grub_cfg(ROOT_UUID, ROOT_UUID, kernel_path="/vmlinuz")))
    part = tmp_path / ("root." + fs)
    with open(part, "wb") as f:
        f.truncate(parts[3][1])
    if fs == "xfs":
        run("mkfs.xfs", "-q", "-m", "uuid=" + ROOT_UUID, "-p", str(xfs_proto(tree, tmp_path / "proto")), str(part))
    else:
        run("mkfs.btrfs", "-q", "-U", ROOT_UUID, "--rootdir", str(tree), str(part))
    run("dd", "if=%s" % part, "of=%s" % image, "bs=1M", "seek=%d" % (parts[3][0] // MiB), "conv=sparse,notrunc",
        "status=none")
    answer = extracted(image, tmp_path / "out")
    assert answer["boot_partition"] == 3 and answer["fs_uuid"] == ROOT_UUID and answer["table"] == "gpt"
    assert answer["kernel_path"] == "/vmlinuz" and answer["config"] == "/boot/grub/grub.cfg"
    assert (tmp_path / "out" / "vmlinuz").read_bytes() == kernel("boot")
    assert (tmp_path / "out" / "initrd.img").read_bytes() == initrd


def test_an_lvm_root_is_refused_naming_it(tools, tmp_path):
    """A Linux partition holding an LVM physical volume (its label at sector 1): not a file system tenbox reads."""
    image = tmp_path / "disk.raw"
    parts = partition_disk(image, 48, "gpt", ["start=2048, type=%s" % LINUX_FS])
    with open(image, "r+b") as f:
        f.seek(parts[1][0] + 512)
        f.write(b"LABELONE" + bytes(16) + b"LVM2 001")
    refused(image, tmp_path / "out", "unsupported", "unsupported file system LVM2_member on partition 1",
            "tenbox reads ext2/3/4, xfs and btrfs")


def test_partition_table_pointing_past_the_disk_is_refused(tools, tmp_path):
    """An MBR made for a 64 MiB disk, the image cut to 32 MiB."""
    image = tmp_path / "disk.raw"
    partition_disk(image, 64, "dos", ["start=2048, type=83"])
    os.truncate(str(image), 32 * MiB)
    refused(image, tmp_path / "out", "bad_image", "partition table refused", "past the end of the disk")
