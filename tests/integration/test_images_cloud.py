"""`tenbox image import FILE` of a cloud-image-shaped disk through tenboxd: the store's manifest, a VM that
boots the kernel found inside, and refusals that leave nothing behind (tests; root).

The disks are made by real tools (sfdisk, mkfs.ext4 -d, mkfs.vfat, mkfs.xfs,
qemu-img) with the builders of test_imagetool_boot_files.py; the kernel in
them is the `boot` test guest, which reports the initrd it was given.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest

from tests.framework.guests import guest_results
from tests.integration.test_imagetool_boot_files import (
    BIOS_BOOT,
    EFI_SYSTEM,
    LINUX_FS,
    NEW,
    ROOT_UUID,
    grub_cfg,
    kernel,
    make_tree,
    mkfs_ext4,
    mkfs_vfat,
    partition_disk,
    root_files,
    run,
    tools,
)

pytestmark = pytest.mark.usefixtures("kvm", "guests", "tools")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cloud_disk(tools, tmp_path_factory):
    """Debian genericcloud's layout (GPT: BIOS boot, ESP, root ext4 with /boot), raw and qcow2."""
    tmp = tmp_path_factory.mktemp("cloud")
    image = tmp / "cloud.raw"
    parts = partition_disk(image, 64, "gpt", [
        "%s14 : start=2048, size=2048, type=%s" % (image, BIOS_BOOT),
        "%s15 : start=4096, size=16384, type=%s" % (image, EFI_SYSTEM),
        "%s1 : start=20480, type=%s" % (image, LINUX_FS),
    ])
    initrd = os.urandom(200 * 1024)
    files = root_files(kernel("boot"), kernel("echo"), initrd, grub_cfg(ROOT_UUID, ROOT_UUID))
    mkfs_ext4(image, parts[1], make_tree(tmp / "root", files), ROOT_UUID)
    mkfs_vfat(image, parts[15])
    qcow2 = tmp / "cloud.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2))
    os.chmod(tmp, 0o755)
    return image, qcow2, initrd


def store_leftovers(daemon) -> list:
    return sorted(p.name for p in (daemon.data_dir / "images").iterdir())


def test_a_cloud_image_imports_with_its_default_entrys_kernel_and_a_vm_boots_it(daemon, cloud_disk, tmp_path):
    raw, qcow2, initrd = cloud_disk
    r = daemon.ctl("image", "import", str(qcow2), "--name", "cloud", "--sha256", sha256_of(qcow2).upper(),
                   timeout=300)
    assert r.returncode == 0, r.stderr
    assert "its sha256 matched --sha256" in r.stdout.decode()
    view = json.loads(daemon.ctl("image", "inspect", "cloud", "--json").stdout)
    m = view["manifest"]
    folder = Path(view["path"])
    assert m["rootfs"] == "rootfs.qcow2" and m["rootfs_format"] == "qcow2" and m["kernel"] == "vmlinuz"
    assert (folder / "vmlinuz").read_bytes() == kernel("boot")  # the default entry's, not the older kernel's
    assert (folder / "initrd.img").read_bytes() == initrd
    assert m["files"]["rootfs.qcow2"]["sha256"] == sha256_of(qcow2) == m["source"]["sha256"]
    assert m["boot"]["table"] == "gpt" and m["boot"]["root_partition"] == 1 and m["boot"]["fs_uuid"] == ROOT_UUID
    assert m["boot"]["kernel_path"] == "/boot/vmlinuz-" + NEW and m["boot"]["config"] == "/boot/grub/grub.cfg"
    assert ("root=UUID=%s ro" % ROOT_UUID) in m["cmdline"] and "console=ttyS0" in m["cmdline"]
    assert sorted(os.listdir(folder)) == ["initrd.img", "manifest.json", "rootfs.qcow2", "vmlinuz"]
    assert not [n for n in store_leftovers(daemon) if n.startswith(".")]

    # The same disk raw, without --sha256: imported, and the answer says it was not verified.
    r = daemon.ctl("image", "import", str(raw), "--name", "cloud-raw", timeout=300)
    assert r.returncode == 0 and "not verified" in r.stdout.decode(), r.stderr

    # A VM of the image boots the kernel found inside, with the entry's command line and initrd; it
    # gets a NoCloud seed without asking (its own instance-id, its name as host name).
    r = daemon.ctl("vm", "create", "c1", "--image", "cloud", "--memory", "64")
    assert r.returncode == 0, r.stderr
    ci = daemon.vm("c1")["cloud_init"]
    assert ci["hostname"] == "c1" and ci["instance_id"].startswith("tenbox-") and ci["ssh_keys"] == 0
    assert daemon.vm("c1")["disks"][-1]["path"].endswith("/seed.iso")
    assert daemon.ctl("vm", "start", "c1").returncode == 0
    daemon.wait_console("c1", "TENBOX-GUEST boot ", 60)
    daemon.wait_state("c1", "stopped", 30)
    res = guest_results("\n".join(daemon.console("c1")), "boot")
    assert res["verdict"] == "PASS", res
    assert int(res["info"]["initrd.size"]) == len(initrd)
    assert int(res["info"]["initrd.crc32"], 16) == zlib.crc32(initrd)
    assert ("root=UUID=%s" % ROOT_UUID) in res["info"]["cmdline"]


@pytest.mark.parametrize("case, words", [
    ("wrong-sha256", ["sha256", "--sha256 says"]),
    ("xfs-without-grub-cfg", ["no boot configuration", "xfs"]),
    ("lvm", ["unsupported file system LVM2_member"]),
    ("no-kernel", ["vmlinuz-" + NEW]),
    ("backing", ["backing file"]),
    ("not-a-disk", ["no bootable kernel"]),
])
def test_a_refused_cloud_image_is_one_line_and_leaves_nothing_in_the_store(daemon, cloud_disk, tmp_path, case,
                                                                          words):
    raw, qcow2, _ = cloud_disk
    image = tmp_path / "image"
    args = []
    if case == "wrong-sha256":
        image = raw
        args = ["--sha256", "0" * 64]
    elif case == "lvm":
        parts = partition_disk(image, 48, "gpt", ["%s1 : start=2048, type=%s" % (image, LINUX_FS)])
        with open(image, "r+b") as f:
            f.seek(parts[1][0] + 512)
            f.write(b"LABELONE" + bytes(16) + b"LVM2 001")
    elif case == "xfs-without-grub-cfg":
        parts = partition_disk(image, 320, "gpt", ["%s1 : start=2048, type=%s" % (image, LINUX_FS)])
        start, size = parts[1]
        part = tmp_path / "part.xfs"
        with open(part, "wb") as f:
            f.truncate(size)
        run("mkfs.xfs", "-q", str(part))
        with open(image, "r+b") as f, open(part, "rb") as src:
            f.seek(start)
            f.write(src.read())
    elif case == "no-kernel":
        parts = partition_disk(image, 48, "gpt", ["%s1 : start=2048, type=%s" % (image, LINUX_FS)])
        files = root_files(kernel("boot"), kernel("echo"), b"initrd", grub_cfg(ROOT_UUID, ROOT_UUID))
        del files["/boot/vmlinuz-" + NEW]
        mkfs_ext4(image, parts[1], make_tree(tmp_path / "root", files), ROOT_UUID)
    elif case == "backing":
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(qcow2), "-F", "qcow2", str(image))
    else:
        image.write_bytes(os.urandom(1 << 20))
    os.chmod(tmp_path, 0o755)
    before = store_leftovers(daemon)
    r = daemon.ctl("image", "import", str(image), "--name", "bad", *args, timeout=300)
    err = r.stderr.decode()
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("importing bad:")]  # progress lines
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert store_leftovers(daemon) == before
    assert "bad" not in json.dumps(daemon.call("image.list")["payload"])


def test_a_cloud_image_needs_a_name_and_sha256_only_goes_with_one(daemon, cloud_disk, tmp_path):
    raw, _, _ = cloud_disk
    r = daemon.ctl("image", "import", str(raw))
    assert r.returncode == 2 and "--name" in r.stderr.decode()
    folder = tmp_path / "img"
    folder.mkdir()
    r = daemon.ctl("image", "import", str(folder), "--sha256", "0" * 64)
    assert r.returncode == 2 and "--sha256 is for a cloud image" in r.stderr.decode()
    r = daemon.call("image.import", name="x", disk=str(raw), sha256="xyz")
    assert r["error_code"] == "invalid_argument" and "64 hexadecimal" in json.dumps(r)
