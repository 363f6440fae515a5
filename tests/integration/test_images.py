"""Guest images: make-rootfs-debian.sh, tenboxd's image store and `tenbox image`, VMs made from an image.

A small Debian bookworm template is built once with
scripts/make-rootfs-debian.sh into <repo>/.cache/images/test-bookworm
(cached between runs by the script's own stamp: a few minutes on a clean
clone, under a second after) and imported into real daemons. The bad-input
tests use small fake images made here, so they do not wait for the build.

The template boots under QEMU TCG (Debian's kernel runs there in seconds, see
docs/testing.md) to a login prompt on its serial console, from the overlay
tenboxd made for a VM: once with QEMU's own virtio-blk, once with tenbox's
virtio-blk and qcow2 code behind vhost-user (tenbox_vmm.vhost_user). The
same boot under tenbox's own KVM worker runs where the CPU has vmx or svm.

Needs root (debootstrap, chroot, tmpfs mounts), qemu-img, qemu-system-x86_64,
debugfs, and Debian's mirror for the first build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.framework import qemu
from tests.framework.daemon import ok
from tests.framework.disk_tools import sha256_file
from tests.framework.images import ROOTFS_SCRIPT, TEMPLATE_NAME, build_template, fake_image, root_sources, write_manifest
from tests.framework.linux_guest import TCG_CPU
from tests.framework.process import ConsoleProcess, login_prompt, run_tool
from tests.framework.repo import PYTHON, REPO, repo_env
from tests.framework.vhost_user import Backend

# systemd under TCG reaches the login prompt in ~25 s on the development machines.
BOOT_DEADLINE = float(os.environ.get("TENBOX_TEST_IMAGE_BOOT_DEADLINE", "240"))
LOGIN = login_prompt("tenbox")
MiB = 1 << 20

_timings: Dict[str, float] = {}


def qemu_img_json(*args: str):
    r = subprocess.run(["qemu-img", *args, "--output=json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def refused(r: subprocess.CompletedProcess, code: str) -> str:
    """A CLI failure with the daemon's error code: exit 1, one line on stderr, no traceback."""
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, "exit %d, expected 1\n%s%s" % (r.returncode, r.stdout.decode(errors="replace"), err)
    assert err.rstrip().endswith("(%s)" % code) and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def store_entries(daemon) -> List[str]:
    """Everything in the daemon's image store folder, hidden entries included."""
    path = daemon.data_dir / "images"
    return sorted(os.listdir(str(path))) if path.exists() else []


def vm_spec(daemon, name: str) -> dict:
    vm_id = daemon.vm(name)["id"]
    return json.loads((daemon.data_dir / "vms" / vm_id / "vm.json").read_text())


# --- the template --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template() -> Path:
    """The bookworm template (built once; the nested lane's runner builds it on the host first)."""
    return build_template()


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_the_build_is_cached_and_its_manifest_has_the_sha256_of_every_file(template):
    """A second run with the same inputs does nothing ("up to date"); the manifest names every file
    of the build with its size and sha256, the kernel and initrd to pair with the rootfs, and a
    command line with root=/dev/vda; the rootfs is a compressed, standalone qcow2 that qemu-img
    finds clean."""
    started = time.monotonic()
    r = run_tool([str(ROOTFS_SCRIPT), "--suite", "bookworm", "--name", TEMPLATE_NAME, "--out", str(template)], 60)
    cached = time.monotonic() - started
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    assert cached < 10, "a cached run took %.1f s" % cached
    r = run_tool([str(ROOTFS_SCRIPT), "--suite", "bookworm", "--name", TEMPLATE_NAME, "--out", str(template), "--check"], 60)
    assert r.returncode == 0, r.stderr
    r = run_tool([str(ROOTFS_SCRIPT), "--suite", "bookworm", "--name", TEMPLATE_NAME, "--out", str(template),
                  "--hostname", "other", "--check"], 60)
    assert r.returncode == 1 and "not up to date" in r.stderr, r.stderr

    m = manifest_of(template)
    on_disk = sorted(p.name for p in template.iterdir() if p.name not in ("manifest.json", ".stamp"))
    assert sorted(m["files"]) == on_disk == ["initrd.img", "packages.txt", "rootfs.qcow2", "vmlinuz"]
    for fn, entry in m["files"].items():
        assert (template / fn).stat().st_size == entry["size"] and sha256_file(template / fn) == entry["sha256"], fn
    assert (m["kernel"], m["initrd"], m["rootfs"], m["rootfs_format"]) == ("vmlinuz", "initrd.img", "rootfs.qcow2", "qcow2")
    assert m["manifest_version"] == 1 and m["name"] == TEMPLATE_NAME and m["arch"] == "x86_64"
    assert m["os"]["suite"] == "bookworm" and m["os"]["version"].startswith("12.")
    assert re.match(r"\d+\.\d+\.\d+-\d+-cloud-amd64\Z", m["kernel_release"]), m["kernel_release"]
    assert "root=/dev/vda" in m["cmdline"].split() and "console=ttyS0" in m["cmdline"].split()
    assert (template / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    info = qemu_img_json("info", str(template / "rootfs.qcow2"))
    assert info["format"] == "qcow2" and "backing-filename" not in info and info["virtual-size"] == 2 << 30
    assert m["virtual_size"] == 2 << 30
    assert info["actual-size"] < 400 * MiB, "the template is not compressed: %d bytes" % info["actual-size"]
    assert subprocess.run(["qemu-img", "check", "-q", str(template / "rootfs.qcow2")]).returncode == 0
    packages = (template / "packages.txt").read_text()
    for p in ("systemd-sysv", "udev", "systemd-resolved", "linux-image-cloud-amd64", "initramfs-tools"):
        assert re.search(r"^%s " % re.escape(p), packages, re.M), p
    assert not re.search(r"^openssh-server ", packages, re.M)  # only with --packages or --ssh-key


def debugfs(image: Path, command: str) -> str:
    r = subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_template_is_configured_for_a_vm(template, tmp_path):
    """Read without mounting (debugfs on a raw copy): root on /dev/vda, a getty on ttyS0, DHCP by
    systemd-networkd with systemd-resolved, the hostname, root's password locked, an empty
    machine-id (each VM makes its own), no SSH host keys, no apt lists."""
    raw = tmp_path / "rootfs.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(template / "rootfs.qcow2"), str(raw)], check=True)
    assert re.search(r"^/dev/vda\s+/\s+ext4\s", debugfs(raw, "cat /etc/fstab"), re.M)
    assert debugfs(raw, "cat /etc/hostname").strip() == "tenbox"
    assert debugfs(raw, "cat /etc/machine-id") == ""
    shadow = debugfs(raw, "cat /etc/shadow")
    assert re.search(r"^root:!", shadow, re.M), shadow.splitlines()[0]
    network = debugfs(raw, "cat /etc/systemd/network/80-tenbox-dhcp.network")
    assert "DHCP=yes" in network and "Name=en* eth*" in network
    wants = debugfs(raw, "ls -l /etc/systemd/system/getty.target.wants")
    assert "serial-getty@ttyS0.service" in wants
    assert "systemd-networkd.service" in debugfs(raw, "ls -l /etc/systemd/system/multi-user.target.wants")
    assert "systemd-resolved.service" in debugfs(raw, "ls -l /etc/systemd/system/sysinit.target.wants")
    assert "stub-resolv.conf" in debugfs(raw, "stat /etc/resolv.conf") or \
        "Fast link dest: \"../run/systemd/resolve/stub-resolv.conf\"" in debugfs(raw, "stat /etc/resolv.conf")
    assert "ssh_host" not in debugfs(raw, "ls /etc")
    assert "Packages" not in debugfs(raw, "ls /var/lib/apt/lists")
    hooks = debugfs(raw, "cat /etc/initramfs-tools/hooks/tenbox-virtio")
    assert "virtio_blk" in hooks and "virtio_mmio" in hooks


# --- the store through the daemon ----------------------------------------------------------------


def test_two_vms_on_one_image_get_their_own_overlays_and_rm_waits_for_both(daemon, template):
    """`image import` verifies and stores the build; `vm create --image` twice gives two qcow2
    overlays backed by the stored template (qemu-img --backing-chain) and the image's kernel,
    initrd and command line; the template's sha256 does not change; `image rm` is refused
    (image_in_use, naming both VMs) until both are deleted, and deleting a VM deletes only its
    overlay."""
    r = daemon.ctl("image", "import", str(template), "--name", "deb")
    assert "deb: imported" in ok(r)
    stored = daemon.data_dir / "images" / "deb"
    m = manifest_of(template)
    assert sha256_file(stored / "rootfs.qcow2") == m["files"]["rootfs.qcow2"]["sha256"]
    for fn in m["files"]:
        assert (stored / fn).stat().st_mode & 0o777 == 0o444, fn
    for name in ("a", "b"):
        ok(daemon.ctl("vm", "create", name, "--image", "deb", "--memory", "512"))
    overlays = []
    for name in ("a", "b"):
        spec = vm_spec(daemon, name)
        assert spec["image"] == "deb"
        assert (spec["kernel"], spec["initrd"], spec["cmdline"]) == (
            str(stored / "vmlinuz"), str(stored / "initrd.img"), m["cmdline"])
        disk = spec["disks"][0]
        assert disk["owned"] and disk["format"] == "qcow2" and disk["path"].endswith("/disk.qcow2")
        chain = qemu_img_json("info", "--backing-chain", "-U", disk["path"])
        assert [c["filename"] for c in chain] == [disk["path"], str(stored / "rootfs.qcow2")]
        assert chain[0]["backing-filename-format"] == "qcow2"
        overlays.append(disk["path"])
    assert overlays[0] != overlays[1]
    listed = json.loads(ok(daemon.ctl("image", "ls", "--json")))
    assert [(i["name"], i["state"], sorted(v["name"] for v in i["vms"])) for i in listed] == [("deb", "ready", ["a", "b"])]
    table = ok(daemon.ctl("image", "ls")).splitlines()
    assert table[0].split()[:3] == ["NAME", "STATE", "VERSION"] and table[1].split()[:2] == ["deb", "ready"]
    assert "image:        deb" in ok(daemon.ctl("vm", "show", "a"))

    err = refused(daemon.ctl("image", "rm", "deb"), "image_in_use")
    assert "a (" in err and "b (" in err
    r = daemon.call("image.remove", name="deb")
    assert r["error_code"] == "image_in_use" and sorted(v["name"] for v in r["vms"]) == ["a", "b"]
    ok(daemon.ctl("vm", "rm", "a"))
    assert not os.path.exists(overlays[0]) and os.path.exists(overlays[1])
    assert sha256_file(stored / "rootfs.qcow2") == m["files"]["rootfs.qcow2"]["sha256"]
    err = refused(daemon.ctl("image", "rm", "deb"), "image_in_use")
    assert "b (" in err and "a (" not in err
    inspect = json.loads(ok(daemon.ctl("image", "inspect", "deb", "--verify", "--json")))
    assert inspect["verify"] == {"ok": True, "problems": []} and [v["name"] for v in inspect["vms"]] == ["b"]
    ok(daemon.ctl("vm", "rm", "b"))
    assert "deb: removed" in ok(daemon.ctl("image", "rm", "deb"))
    assert store_entries(daemon) == []
    assert json.loads(ok(daemon.ctl("image", "ls", "--json"))) == []


def test_image_build_runs_the_script_then_imports(daemon, template):
    """`tenbox image build debian` runs make-rootfs-debian.sh (up to date here: it reuses the
    build folder) and imports the result; a name already in the store is refused before any
    build; without root it says so (exit 4)."""
    r = daemon.ctl("image", "build", "debian", "--layout", "plain", "--suite", "bookworm", "--name", TEMPLATE_NAME,
                   "--out", str(template))
    out = ok(r)
    assert "up to date" in r.stderr.decode() and "%s: imported" % TEMPLATE_NAME in out
    assert json.loads(ok(daemon.ctl("image", "ls", "--json")))[0]["name"] == TEMPLATE_NAME
    started = time.monotonic()
    refused(daemon.ctl("image", "build", "debian", "--layout", "plain", "--name", TEMPLATE_NAME, "--out", str(template)),
            "image_exists")
    assert time.monotonic() - started < 20
    r = daemon.ctl("image", "build", "debian", "--name", "x", user="nobody")
    assert r.returncode == 4 and b"needs root" in r.stderr, r.stderr


def test_a_tampered_build_is_refused(daemon, template, tmp_path):
    """The real build with its manifest's digest of the rootfs changed, or its kernel changed:
    image_corrupt naming the file, and nothing in the store."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in template.iterdir():
        try:
            os.link(str(p), str(copy / p.name))  # the same bytes, without copying them
        except OSError:
            shutil.copy2(str(p), str(copy / p.name))
    m = manifest_of(template)
    m["files"]["rootfs.qcow2"]["sha256"] = "0" * 64
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(m))
    err = refused(daemon.ctl("image", "import", str(copy), "--name", "t1"), "image_corrupt")
    assert "rootfs.qcow2: sha256" in err
    (copy / "manifest.json").unlink()
    shutil.copy2(str(template / "manifest.json"), str(copy / "manifest.json"))
    (copy / "vmlinuz").unlink()
    kernel = bytearray((template / "vmlinuz").read_bytes())
    kernel[-1] ^= 0xFF
    (copy / "vmlinuz").write_bytes(bytes(kernel))
    err = refused(daemon.ctl("image", "import", str(copy), "--name", "t2"), "image_corrupt")
    assert "vmlinuz: sha256" in err
    assert store_entries(daemon) == []


# --- bad input with small fake images ------------------------------------------------------------


def test_an_image_given_as_files_imports_and_vm_create_uses_it(daemon, tmp_path):
    """`image import MANIFEST FILE...` with the files in other folders; the VM gets the image's
    kernel, initrd and command line, an explicit --cmdline wins."""
    src = fake_image(tmp_path / "f")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(src / "rootfs.img"), str(elsewhere / "rootfs.img"))
    out = ok(daemon.ctl("image", "import", str(src / "manifest.json"), str(src / "vmlinuz"), str(src / "initrd.img"),
                        str(elsewhere / "rootfs.img"), "--json"))
    img = json.loads(out)
    assert img["name"] == "f" and img["verified"] is True and img["virtual_size"] == 16 * MiB
    ok(daemon.ctl("vm", "create", "v1", "--image", "f"))
    ok(daemon.ctl("vm", "create", "v2", "--image", "f", "--cmdline", "console=ttyS0 quiet"))
    assert vm_spec(daemon, "v1")["cmdline"] == "console=ttyS0 root=/dev/vda rw"
    assert vm_spec(daemon, "v2")["cmdline"] == "console=ttyS0 quiet"
    r = daemon.ctl("vm", "create", "v3", "--image", "f", "--template", str(elsewhere / "rootfs.img"))
    assert r.returncode == 2 and b"--image and --template" in r.stderr
    r = daemon.call("vm.create", name="v3", image="f", template=str(elsewhere / "rootfs.img"))
    assert r["error_code"] == "invalid_argument"
    r = daemon.ctl("vm", "create", "v3")
    assert r.returncode == 2 and b"--image IMAGE or --kernel" in r.stderr


@pytest.mark.parametrize("tamper, code, words", [
    ("flip a byte of the rootfs", "image_corrupt", "rootfs.img: sha256"),
    ("append to the initrd", "image_corrupt", "the manifest says"),
    ("change a digest in the manifest", "image_corrupt", "vmlinuz: sha256"),
    ("manifest is not JSON", "image_corrupt", "not valid JSON"),
    ("manifest names a missing file", "file_missing", "extra.bin"),
    ("delete the kernel", "file_missing", "vmlinuz does not exist"),
    ("rootfs declared raw", "image_corrupt", "is qcow2, the manifest says raw"),
])
def test_a_tampered_or_incomplete_image_is_refused_and_leaves_nothing(daemon, tmp_path, tamper, code, words):
    src = fake_image(tmp_path / "bad")
    m = json.loads((src / "manifest.json").read_text())
    if tamper == "flip a byte of the rootfs":
        with open(str(src / "rootfs.img"), "r+b") as f:
            f.seek(300)
            b = f.read(1)
            f.seek(300)
            f.write(bytes([b[0] ^ 1]))
    elif tamper == "append to the initrd":
        with open(str(src / "initrd.img"), "ab") as f:
            f.write(b"x")
    elif tamper == "change a digest in the manifest":
        m["files"]["vmlinuz"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
        (src / "manifest.json").write_text(json.dumps(m))
    elif tamper == "manifest is not JSON":
        (src / "manifest.json").write_text(json.dumps(m)[:-5])
    elif tamper == "manifest names a missing file":
        m["files"]["extra.bin"] = {"size": 1, "sha256": "0" * 64}
        (src / "manifest.json").write_text(json.dumps(m))
    elif tamper == "delete the kernel":
        (src / "vmlinuz").unlink()
    elif tamper == "rootfs declared raw":
        write_manifest(src, rootfs_format="raw")
    err = refused(daemon.ctl("image", "import", str(src), "--name", "bad"), code)
    assert words in err, err
    assert store_entries(daemon) == []
    refused(daemon.ctl("image", "inspect", "bad"), "image_not_found")


def test_a_rootfs_with_a_backing_file_is_refused(daemon, tmp_path):
    """A template naming a backing file would let every VM on it read that host file."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"secret" * 1000)
    src = fake_image(tmp_path / "chain", backing=secret)
    err = refused(daemon.ctl("image", "import", str(src)), "image_corrupt")
    assert "backing file" in err
    assert store_entries(daemon) == []


def test_rm_also_finds_vms_that_reach_the_template_another_way(daemon, tmp_path):
    """A VM whose disk is an overlay (made outside tenbox) of the stored template, and one given
    the stored template directly (--template), count as users: image_in_use names them."""
    ok(daemon.ctl("image", "import", str(fake_image(tmp_path / "f")), "--name", "f"))
    stored = daemon.data_dir / "images" / "f" / "rootfs.img"
    mine = tmp_path / "mine.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(stored), "-F", "qcow2", str(mine)], check=True)
    ok(daemon.ctl("vm", "create", "by-disk", "--kernel", str(tmp_path / "f" / "vmlinuz"), "--disk", str(mine)))
    ok(daemon.ctl("vm", "create", "by-template", "--kernel", str(tmp_path / "f" / "vmlinuz"), "--template", str(stored)))
    r = daemon.call("image.remove", name="f")
    assert r["error_code"] == "image_in_use" and sorted(v["name"] for v in r["vms"]) == ["by-disk", "by-template"], r
    ok(daemon.ctl("vm", "rm", "by-disk"))
    ok(daemon.ctl("vm", "rm", "by-template"))
    ok(daemon.ctl("image", "rm", "f"))


def test_unknown_images_and_name_clashes(daemon, tmp_path):
    """Unknown names are image_not_found everywhere; a second import under a taken name is
    image_exists; a bad name is refused before anything is read."""
    refused(daemon.ctl("image", "inspect", "nope"), "image_not_found")
    refused(daemon.ctl("image", "rm", "nope"), "image_not_found")
    refused(daemon.ctl("vm", "create", "v", "--image", "nope"), "image_not_found")
    assert daemon.call("vm.list")["payload"]["vms"] == []
    ok(daemon.ctl("image", "import", str(fake_image(tmp_path / "one")), "--name", "same"))
    err = refused(daemon.ctl("image", "import", str(fake_image(tmp_path / "two")), "--name", "same"), "image_exists")
    assert "'same'" in err
    assert store_entries(daemon) == ["same"]
    r = daemon.ctl("image", "import", str(tmp_path / "two"), "--name", "../x")
    assert r.returncode == 2 and b"[A-Za-z0-9-]" in r.stderr
    r = daemon.call("image.import", name="x", path="relative/path")
    assert r["error_code"] == "invalid_argument"
    r = daemon.call("image.import", name="x", path=str(tmp_path / "two"), files=[str(tmp_path / "two")])
    assert r["error_code"] == "invalid_argument"


def test_an_import_shows_progress_and_does_not_hold_up_other_requests(daemon, tmp_path):
    """While a 2 GiB image is hashed and copied, `image ls` shows it as importing with its
    progress and the daemon answers other requests at once (the work runs on a thread); the
    zeros of a raw rootfs stay holes in the store."""
    src = tmp_path / "large"
    src.mkdir()
    (src / "vmlinuz").write_bytes(os.urandom(4096))
    with open(str(src / "rootfs.img"), "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(2 << 30)
    write_manifest(src, rootfs_format="raw", initrd=None)
    importer = subprocess.Popen([PYTHON, "-m", "tenbox_ctl", "image", "import", str(src), "--name", "large"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=repo_env({"TENBOX_SOCK": str(daemon.socket)}), cwd=str(REPO))
    seen, slowest = [], 0.0
    try:
        while importer.poll() is None:
            t0 = time.monotonic()
            images = daemon.call("image.list", timeout=10)["payload"]["images"]
            daemon.call("system.info", timeout=10)
            slowest = max(slowest, time.monotonic() - t0)
            seen += [i for i in images if i["state"] == "importing"]
            time.sleep(0.02)
        out, err = importer.communicate(timeout=60)
    finally:
        if importer.poll() is None:
            importer.kill()
    assert importer.returncode == 0, err
    assert b"importing large: " in err and b"large: imported" in out, (out, err)
    assert seen, "the import was never listed as importing"
    assert seen[0]["name"] == "large" and seen[0]["bytes_total"] == (2 << 30) + 4096
    assert slowest < 1.0, "a request waited %.2f s during the import" % slowest
    stored = daemon.data_dir / "images" / "large" / "rootfs.img"
    assert stored.stat().st_size == 2 << 30 and stored.stat().st_blocks * 512 < 16 * MiB


# --- disk space ----------------------------------------------------------------------------------


class Tmpfs:
    """A tmpfs of a given size mounted on a folder (root); unmounted at the end of the test."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dM,mode=0755" % size_mb, "tenbox-test", str(path)],
                       check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the disk space tests mount a tmpfs: they need root")
    mounts: List[Tmpfs] = []

    def make(name: str, size_mb: int) -> Path:
        t = Tmpfs(tmp_path / name, size_mb)
        mounts.append(t)
        return t.path

    yield make
    for t in reversed(mounts):
        t.close()


def test_not_enough_space_is_refused_before_the_import_copies_anything(make_daemon, tmpfs, tmp_path):
    """A data dir on a 320 MiB tmpfs: a 128 MiB image does not fit with the store's 256 MiB
    reserve: insufficient_space, with the figures, and the store stays empty."""
    d = make_daemon("small")
    tmpfs("small/data", 320)
    d.start()
    try:
        src = fake_image(tmp_path / "big", rootfs_size=128 * MiB, fmt="raw")
        err = refused(d.ctl("image", "import", str(src), "--name", "big"), "insufficient_space")
        assert "needs 128.0 MiB" in err and "free" in err
        assert store_entries(d) == []
        ok(d.ctl("image", "import", str(fake_image(tmp_path / "small-img", rootfs_size=MiB, fmt="raw"))))
        assert store_entries(d) == ["small-img"]
    finally:
        d.stop()


def test_a_disk_that_fills_up_during_an_import_leaves_nothing(tmpfs, tmp_path, monkeypatch):
    """ENOSPC while copying (another writer took the space after the check): insufficient_space
    and the hidden folder is gone."""
    from tenbox_supervisor import images

    root = tmpfs("tiny", 8)
    store = images.ImageStore(str(root / "images"))
    monkeypatch.setattr(store, "free_bytes", lambda: 1 << 40)
    src = fake_image(tmp_path / "big", rootfs_size=16 * MiB, fmt="raw")
    with root_sources(src) as (manifest, files):
        name, progress = store.prepare_import("big", manifest, files)
        with pytest.raises(images.ImageError) as e:
            store.copy_files(name, manifest, files, progress)
    assert e.value.code.value == "insufficient_space"
    assert os.listdir(str(root / "images")) == []


def test_the_script_checks_free_space_before_building(tmpfs):
    """make-rootfs-debian.sh with its output on a 100 MiB tmpfs: exit 4 and one line, at once,
    and nothing written there."""
    root = tmpfs("build", 100)
    started = time.monotonic()
    r = run_tool([str(ROOTFS_SCRIPT), "--out", str(root / "img")], 60)
    assert r.returncode == 4 and "not enough free space" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 10
    assert os.listdir(str(root)) == []


def test_the_script_refuses_bad_arguments_and_says_so_without_root(tmp_path):
    r = run_tool([str(ROOTFS_SCRIPT), "--name", "a/b"], 30)
    assert r.returncode == 2 and "--name" in r.stderr
    r = run_tool([str(ROOTFS_SCRIPT), "--size", "10"], 30)
    assert r.returncode == 2 and "too small" in r.stderr
    r = run_tool([str(ROOTFS_SCRIPT), "--packages", "ok,Not_A_Package"], 30)
    assert r.returncode == 2 and "Not_A_Package" in r.stderr
    r = run_tool([str(ROOTFS_SCRIPT), "--ssh-key", "not a key"], 30)
    assert r.returncode == 2 and "--ssh-key" in r.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    r = run_tool([str(ROOTFS_SCRIPT), "--out", str(tmp_path / "mine")], 30)
    assert r.returncode == 2 and "not made by this script" in r.stderr
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    r = run_tool(["runuser", "-u", "nobody", "--", str(ROOTFS_SCRIPT), "--out", "/tmp/tenbox-test-never"], 30)
    assert r.returncode == 3 and "needs root" in r.stderr, r.stderr


# --- booting the template ------------------------------------------------------------------------


@pytest.fixture
def vm_on_template(daemon, template):
    """A VM made from the imported template: (daemon, its spec, the stored template's folder)."""
    ok(daemon.ctl("image", "import", str(template), "--name", "deb"))
    ok(daemon.ctl("vm", "create", "boot", "--image", "deb", "--memory", "512"))
    return daemon, vm_spec(daemon, "boot"), daemon.data_dir / "images" / "deb"


def qemu_argv(spec: dict, devices: List[str], shared_memory: bool = False) -> List[str]:
    # QEMU's pc machine (an HPET for the TSC calibration that microvm lacks under TCG, see
    # tests/framework/linux_guest.py) with virtio on PCI: the image's command line without pci=off.
    cmdline = " ".join(w for w in spec["cmdline"].split() if w != "pci=off")
    return qemu.pc(spec["kernel"], spec["initrd"], cmdline, memory_mb=spec["memory_mb"], cpu=TCG_CPU,
                   shared_memory=shared_memory, devices=devices)


def boot_to_login(argv: List[str], what: str) -> float:
    with ConsoleProcess(argv, BOOT_DEADLINE) as vm:
        vm.wait_for(LOGIN)
        elapsed = vm.elapsed()
        text = vm.output
    assert "Kernel panic" not in text and "Failed to start" not in text, text[-4000:]
    assert re.search(r"^Debian GNU/Linux 12 tenbox ttyS0$", text, re.M), text[-2000:]
    _timings[what] = elapsed
    print("%s: login prompt after %.1f s" % (what, elapsed))
    return elapsed


def test_a_vm_overlay_boots_to_a_login_prompt_under_qemu_tcg(vm_on_template):
    """The VM's own overlay, with the image's kernel, initrd and command line, boots Debian to
    `tenbox login:` on ttyS0 under QEMU TCG (QEMU's virtio-blk); the template is unchanged
    and the overlay took the guest's writes and checks clean."""
    daemon, spec, stored = vm_on_template
    overlay = spec["disks"][0]["path"]
    before = sha256_file(stored / "rootfs.qcow2")
    boot_to_login(qemu_argv(spec, qemu.virtio_blk(overlay, "qcow2", pci=True)), "QEMU virtio-blk")
    assert sha256_file(stored / "rootfs.qcow2") == before
    assert qemu_img_json("info", "-U", overlay)["actual-size"] > MiB
    assert subprocess.run(["qemu-img", "check", "-q", overlay]).returncode == 0


def test_a_vm_overlay_boots_to_a_login_prompt_through_tenbox_vhost_user_blk(vm_on_template, tmp_path):
    """The same boot with the disk served by tenbox's own virtio-blk device and qcow2 code
    (`python3 -m tenbox_vmm.vhost_user blk`), QEMU as the vhost-user front end."""
    daemon, spec, stored = vm_on_template
    overlay = spec["disks"][0]["path"]
    before = sha256_file(stored / "rootfs.qcow2")
    sock = tmp_path / "blk.sock"
    with Backend("blk", sock, ["--disk", overlay]) as backend:
        boot_to_login(qemu_argv(spec, qemu.vhost_user_blk(sock, pci=True), shared_memory=True),
                      "tenbox vhost-user-blk")
        assert backend.wait_exit(30) == 0, backend.errors[-3000:]  # the front end went away: the back end ends
    assert sha256_file(stored / "rootfs.qcow2") == before
    assert subprocess.run(["qemu-img", "check", "-q", overlay]).returncode == 0


@pytest.mark.hwvirt(prepare=("template",), budget=420)
def test_a_vm_from_the_image_boots_to_a_login_prompt_under_tenbox(vm_on_template, kvm):
    """`tenbox vm start` on a VM made from the image: the console log shows the login prompt."""
    daemon, spec, stored = vm_on_template
    ok(daemon.ctl("vm", "start", "boot"))
    deadline = time.monotonic() + BOOT_DEADLINE
    while time.monotonic() < deadline:
        lines = daemon.call("vm.logs", vm_id="boot", lines=200)["payload"]["lines"]
        if LOGIN.search("\n".join(lines)):
            break
        time.sleep(1)
    else:
        pytest.fail("no login prompt within %.0f s:\n%s" % (BOOT_DEADLINE, "\n".join(lines[-40:])))
    ok(daemon.ctl("vm", "stop", "boot"))
