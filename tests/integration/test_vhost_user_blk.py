"""Linux's own virtio-blk driver on tenbox's virtio-blk, qcow2 and backing-chain code, over vhost-user.

`tenbox-vhost-user-blk` (python3 -m tenbox_vmm.vhost_user blk) serves
tenbox's VirtioBlk — the class the KVM worker uses — to QEMU's
vhost-user-blk front end; QEMU runs the Debian cloud kernel under TCG with
its RAM in a shared memfd (tests/framework/: linux_guest, qemu, vhost_user). The guest's tools
are the initramfs's busybox and e2fsprogs; the host's oracles are
qemu-img, qemu-io and e2fsck.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.framework import qemu
from tests.framework.disk_tools import qemu_img, qemu_io, sha256_file
from tests.framework.linux_guest import boot_script, initrd_with, marks, run_script
from tests.framework.process import run_tool
from tests.framework.repo import PYTHON, REPO
from tests.framework.vhost_user import Backend, one_line_error

MIB = 1 << 20


@pytest.fixture(autouse=True, scope="module")
def _qemu_installed():
    """QEMU and its tools are test dependencies (make deps): missing, the tests fail, they do not skip."""
    for tool in (qemu.QEMU, "qemu-img", "qemu-io", "e2fsck"):
        if not __import__("shutil").which(tool):
            pytest.fail("%s is not installed (make deps)" % tool)


def blk_backend(tmp_path: Path, disk: str, name: str = "blk.sock", **kw) -> Backend:
    return Backend("blk", tmp_path / name, ["--disk", disk], **kw)


# --- ext4 on a qcow2 overlay ---------------------------------------------------------------

MAKE_FS = r"""
set -e
echo "TB-SECTORS: $(cat /sys/block/vda/size)"
mkfs.ext4 -F -q -L tenbox /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir /mnt/data
i=0
while [ $i -lt 40 ]; do
    head -c $((i * 1531 + 1)) /dev/urandom >/mnt/data/small$i
    i=$((i + 1))
done
head -c 6291456 /dev/urandom >/mnt/data/big
cd /mnt/data
sha256sum big small* >/tmp/sums
cd /
sync
umount /mnt
echo 3 >/proc/sys/vm/drop_caches
e2fsck -fn /dev/vda
mount -t ext4 /dev/vda /mnt
cd /mnt/data
sha256sum -c -s /tmp/sums
cd /
cp /tmp/sums /mnt/sums
echo "TB-SUMS: $(sha256sum </tmp/sums | cut -d' ' -f1)"
umount /mnt
echo TB-DONE
"""

CHECK_FS = r"""
set -e
e2fsck -fn /dev/vda
mount -t ext4 -o ro /dev/vda /mnt
cd /mnt/data
sha256sum big small* >/tmp/sums
sha256sum -c -s /mnt/sums
echo "TB-SUMS: $(sha256sum </tmp/sums | cut -d' ' -f1)"
echo "TB-FILES: $(ls | wc -l)"
cd /
umount /mnt
"""


def test_guest_makes_ext4_on_a_qcow2_overlay_and_a_second_boot_reads_the_files(linux, tsc_khz, tmp_path):
    """On a qcow2 overlay of a template, served by tenbox over vhost-user, the guest
    makes ext4, writes files, syncs, drops its caches and reads them back (its
    own e2fsck clean); after poweroff `qemu-img check` is clean, the host's
    `e2fsck -fn` on a raw export is clean and the template is byte-for-byte
    unchanged; a second boot finds the same files with the same contents."""
    template = tmp_path / "template.qcow2"
    overlay = tmp_path / "overlay.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(template), "96M", ok=None).returncode == 0
    qemu_io(template, "write -P 0xab 0 3M", "write -P 0xcd 50M 1M", fmt="qcow2")
    template_sum = sha256_file(template)
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2",
                       str(overlay), ok=None).returncode == 0

    initrd = initrd_with(tmp_path, linux, MAKE_FS)
    with blk_backend(tmp_path, str(overlay)) as be:
        text = run_script(linux, tsc_khz, initrd, qemu.vhost_user_blk(be.sock))
        assert be.wait_exit() == 0, be.errors
    assert marks(text, "TB-SECTORS") == [str(96 * MIB // 512)]
    assert "TB-DONE" in text
    sums = marks(text, "TB-SUMS")
    assert len(sums) == 1 and len(sums[0]) == 64, text

    check = qemu_img("check", str(overlay), ok=None)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr
    assert sha256_file(template) == template_sum, "the template changed"
    raw = tmp_path / "export.raw"
    assert qemu_img("convert", "-f", "qcow2", "-O", "raw", str(overlay), str(raw), ok=None).returncode == 0
    fsck = run_tool(["e2fsck", "-fn", str(raw)], 120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    raw.unlink()

    initrd2 = initrd_with(tmp_path, linux, CHECK_FS)
    with blk_backend(tmp_path, str(overlay), name="blk2.sock") as be:
        text2 = run_script(linux, tsc_khz, initrd2, qemu.vhost_user_blk(be.sock))
        assert be.wait_exit() == 0, be.errors
    assert marks(text2, "TB-SUMS") == sums
    assert marks(text2, "TB-FILES") == ["41"]
    assert sha256_file(template) == template_sum


# --- a four-level backing chain --------------------------------------------------------------

CHAIN_MB = 24

READ_CHAIN = r"""
set -e
echo "TB-SECTORS: $(cat /sys/block/vda/size)"
i=0
while [ $i -lt %(mb)d ]; do
    echo "TB-MIB: $i $(dd if=/dev/vda bs=1M skip=$i count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
    i=$((i + 1))
done
# Odd-sized, unaligned-to-clusters reads through the page cache.
echo "TB-ODD: $(dd if=/dev/vda bs=4096 skip=1535 count=3 2>/dev/null | sha256sum | cut -d' ' -f1)"
head -c 1048576 /dev/urandom >/tmp/new
dd if=/tmp/new of=/dev/vda bs=1M seek=20 conv=fsync 2>/dev/null
echo "TB-NEW: $(sha256sum </tmp/new | cut -d' ' -f1)"
""" % {"mb": CHAIN_MB}


def test_four_level_backing_chain_reads_right_and_writes_land_on_top(linux, tsc_khz, tmp_path):
    """raw base <- qcow2 <- qcow2 <- qcow2 top, each level written by qemu-io
    (whole clusters, partial clusters, zeroes over data): every MiB the guest
    reads with O_DIRECT matches qemu-img's own reading of the chain; a guest
    write lands in the top image only, and the lower levels are unchanged."""
    base = tmp_path / "l0.raw"
    with open(base, "wb") as f:
        for i in range(CHAIN_MB):
            f.write(bytes([0x10 + i]) * MIB)
    levels = [base]
    writes = {
        1: ["write -P 0x21 4M 4M", "write -P 0x22 10M 0x1e00"],
        2: ["write -P 0x31 6M 4M", "write -z 12M 1M", "write -P 0x32 0x5ff200 0x3000"],
        3: ["write -P 0x41 7M 64k", "write -P 0x42 15M 0x200", "write -z 18M 256k"],
    }
    for n in (1, 2, 3):
        img = tmp_path / ("l%d.qcow2" % n)
        below = levels[-1]
        fmt = "raw" if n == 1 else "qcow2"
        args = ["create", "-q", "-f", "qcow2", "-b", str(below), "-F", fmt]
        if n == 2:
            args += ["-o", "cluster_size=4096"]  # clusters smaller than the guest's reads
        assert qemu_img(*(args + [str(img), "%dM" % CHAIN_MB]), ok=None).returncode == 0
        qemu_io(img, *writes[n], fmt="qcow2")
        levels.append(img)
    top = levels[-1]
    expected = tmp_path / "expected.raw"
    assert qemu_img("convert", "-O", "raw", str(top), str(expected), ok=None).returncode == 0
    data = expected.read_bytes()
    import hashlib

    want = ["%d %s" % (i, hashlib.sha256(data[i * MIB:(i + 1) * MIB]).hexdigest()) for i in range(CHAIN_MB)]
    want_odd = hashlib.sha256(data[1535 * 4096:1538 * 4096]).hexdigest()
    lower_sums = [sha256_file(p) for p in levels[:-1]]

    initrd = initrd_with(tmp_path, linux, READ_CHAIN)
    with blk_backend(tmp_path, str(top)) as be:
        text = run_script(linux, tsc_khz, initrd, qemu.vhost_user_blk(be.sock))
        assert be.wait_exit() == 0, be.errors
    assert marks(text, "TB-SECTORS") == [str(CHAIN_MB * MIB // 512)]
    got = marks(text, "TB-MIB")
    bad = [(w, g) for w, g in zip(want, got) if w != g]
    assert len(got) == CHAIN_MB and not bad, "MiB that differ from qemu-img's reading (want, got): %s" % bad
    assert marks(text, "TB-ODD") == [want_odd]

    assert [sha256_file(p) for p in levels[:-1]] == lower_sums, "a lower level changed"
    assert qemu_img("check", str(top), ok=None).returncode == 0
    assert qemu_img("convert", "-O", "raw", str(top), str(expected), ok=None).returncode == 0
    with open(expected, "rb") as f:
        f.seek(20 * MIB)
        assert hashlib.sha256(f.read(MIB)).hexdigest() == marks(text, "TB-NEW")[0]


# --- read-only -----------------------------------------------------------------------------

READ_ONLY = r"""
echo "TB-RO: $(cat /sys/block/vda/ro)"
echo "TB-SUM: $(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then echo "TB-WRITE: ok"; else echo "TB-WRITE: refused"; fi
true
"""


def test_read_only_disk_is_read_only_for_the_guest(linux, tsc_khz, tmp_path):
    """`--disk IMAGE,ro`: the guest's block device is read-only (the RO
    feature), reads return the image, a write is refused, the file is unchanged."""
    img = tmp_path / "ro.raw"
    img.write_bytes(os.urandom(4 * MIB))
    before = sha256_file(img)
    initrd = initrd_with(tmp_path, linux, READ_ONLY)
    with blk_backend(tmp_path, "%s,ro" % img) as be:
        text = run_script(linux, tsc_khz, initrd, qemu.vhost_user_blk(be.sock))
        assert be.wait_exit() == 0, be.errors
    assert marks(text, "TB-RO") == ["1"]
    assert marks(text, "TB-SUM") == [before]
    assert marks(text, "TB-WRITE") == ["refused"]
    assert sha256_file(img) == before


# --- the back end dies ---------------------------------------------------------------------

REGIONS = 8
REGION_MB = 8

# Each pass writes its own random 8 MiB region with O_DIRECT and ends with
# fsync, which the block layer turns into a virtio FLUSH: from its TB-PASS
# line on, the region must survive anything that happens to the back end.
WRITE_REGIONS = r"""
i=0
while [ $i -lt %(regions)d ]; do
    head -c %(region_bytes)d /dev/urandom >/tmp/p$i
    echo "TB-PATTERN: $i $(sha256sum </tmp/p$i | cut -d' ' -f1)"
    i=$((i + 1))
done
echo TB-WRITING
i=0
while [ $i -lt %(regions)d ]; do
    dd if=/tmp/p$i of=/dev/vda bs=64k seek=$((i * %(region_blocks)d)) oflag=direct conv=fsync 2>/dev/null \
        || echo "TB-EIO: $i"
    echo "TB-PASS: $i"
    i=$((i + 1))
done
i=0
while [ $i -lt %(regions)d ]; do
    echo "TB-READ: $i $(dd if=/dev/vda bs=1M skip=$((i * %(region_mb)d)) count=%(region_mb)d iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1)"
    i=$((i + 1))
done
""" % {"regions": REGIONS, "region_bytes": REGION_MB * MIB, "region_blocks": REGION_MB * 16, "region_mb": REGION_MB}
KILL_AFTER_PASS = 2


def region_sums(image: Path, workdir: Path) -> list:
    """sha256 of each region of the image as qemu-img reads it."""
    import hashlib

    raw = workdir / "regions.raw"
    r = qemu_img("convert", "-O", "raw", str(image), str(raw), ok=None)
    assert r.returncode == 0, r.stderr
    out = []
    with open(raw, "rb") as f:
        for _ in range(REGIONS):
            out.append(hashlib.sha256(f.read(REGION_MB * MIB)).hexdigest())
    raw.unlink()
    return out


def patterns(text: str) -> list:
    return [v.split()[1] for v in marks(text, "TB-PATTERN")]


def test_backend_killed_during_guest_writes_leaves_a_consistent_qcow2(linux, tsc_khz, tmp_path):
    """SIGKILL of the back end while the guest writes through it: the qcow2
    image has no corruption (`qemu-img check`: clean, or leaked clusters
    only), every region the guest had flushed before the kill reads back
    right, and tenbox opens the image again."""
    img = tmp_path / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), "%dM" % (REGIONS * REGION_MB), ok=None).returncode == 0
    initrd = initrd_with(tmp_path, linux, WRITE_REGIONS)
    with blk_backend(tmp_path, str(img)) as be:
        with boot_script(linux, tsc_khz, initrd, qemu.vhost_user_blk(be.sock)) as vm:
            vm.wait_for(r"^TB-PASS: %d$" % KILL_AFTER_PASS)
            assert be.proc.poll() is None, be.errors
            be.kill()
            text = vm.output
            vm.kill()
    flushed = [int(v) for v in marks(text, "TB-PASS")]
    assert flushed == list(range(len(flushed))) and len(flushed) < REGIONS, text
    check = qemu_img("check", str(img), ok=None)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaked clusters only
    assert "corrupt" not in check.stdout.lower() and "ERROR" not in check.stdout, check.stdout
    assert region_sums(img, tmp_path)[:len(flushed)] == patterns(text)[:len(flushed)]
    from tenbox_vmm.disk import open_disk

    open_disk(str(img)).close()


def test_guest_writes_complete_when_a_killed_backend_is_restarted(linux, tsc_khz, tmp_path):
    """QEMU reconnects (chardev reconnect=1) to a back end started again after a
    SIGKILL mid-write; requests in flight are resubmitted, the guest sees no
    I/O error and finishes, and the image checks clean (leaks from the kill
    allowed). Every region flushed before the kill and every region written
    after the restart reads back right in the guest and on the host. The
    region being written at the kill is not compared: writes the back end
    had completed but the guest had not yet flushed may be lost with it, as
    from a disk's volatile cache (docs/vhost-user.md)."""
    img = tmp_path / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), "%dM" % (REGIONS * REGION_MB), ok=None).returncode == 0
    initrd = initrd_with(tmp_path, linux, WRITE_REGIONS)
    be = blk_backend(tmp_path, str(img))
    try:
        with boot_script(linux, tsc_khz, initrd, qemu.vhost_user_blk(be.sock, reconnect=True)) as vm:
            vm.wait_for(r"^TB-PASS: %d$" % KILL_AFTER_PASS)
            assert be.proc.poll() is None, be.errors
            be.kill()
            be = blk_backend(tmp_path, str(img))  # on the same path: QEMU retries every second
            m = vm.wait_for(r"^TENBOX-INITRAMFS: rc=(\d+)$")
            assert vm.wait_exit() == 0
            text = vm.output
        assert m.group(1) == "0", text
        assert be.wait_exit() == 0, be.errors
    finally:
        be.close()
    assert not marks(text, "TB-EIO"), text
    assert marks(text, "TB-PASS") == [str(i) for i in range(REGIONS)]
    want = patterns(text)
    at_kill = KILL_AFTER_PASS + 1  # its first writes may have been completed, unflushed, by the killed back end
    sure = [i for i in range(REGIONS) if i != at_kill]
    read = [v.split()[1] for v in marks(text, "TB-READ")]
    assert len(read) == REGIONS and [read[i] for i in sure] == [want[i] for i in sure]
    check = qemu_img("check", str(img), ok=None)
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert [region_sums(img, tmp_path)[i] for i in sure] == [want[i] for i in sure]


# --- the command line and the socket ------------------------------------------------------------

def run_cli(*args: str) -> "subprocess.CompletedProcess":
    return run_tool([PYTHON, "-m", "tenbox_vmm.vhost_user"] + list(args), 60, cwd=REPO)


def test_missing_image_is_a_one_line_error(tmp_path):
    """A disk image that does not exist: exit 2 and one line naming it, before listening."""
    r = run_cli("blk", "--socket", str(tmp_path / "s"), "--disk", str(tmp_path / "nope.qcow2"))
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert "nope.qcow2" in line and line.startswith("tenbox-vhost-user"), line
    assert not (tmp_path / "s").exists()


def test_socket_in_a_missing_directory_is_a_one_line_error(tmp_path):
    """A socket path whose directory does not exist: exit 2, one line naming the path."""
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * MIB)
    sock = tmp_path / "no-such-dir" / "blk.sock"
    r = run_cli("blk", "--socket", str(sock), "--disk", str(img))
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert str(sock) in line and "No such file or directory" in line, line


def test_bad_command_lines_are_one_line_errors(tmp_path):
    """blk without --disk, an unknown disk option, an unknown device kind: exit 2, one line each."""
    for args, needle in ((["blk", "--socket", str(tmp_path / "s")], "--disk"),
                         (["blk", "--socket", str(tmp_path / "s"), "--disk", "x,bogus"], "bogus"),
                         (["scsi", "--socket", str(tmp_path / "s")], "scsi")):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in one_line_error(r.stderr), (args, r.stderr)


def _hdr(request: int, size: int, flags: int = 1) -> bytes:
    return struct.pack("<III", request, flags, size)


def test_backend_exits_when_the_front_end_disconnects(tmp_path):
    """A front end that asks for the features and hangs up: the back end
    answers, exits 0 within seconds, and leaves no socket file behind."""
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * MIB)
    with blk_backend(tmp_path, str(img)) as be:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(be.sock))
        c.sendall(_hdr(1, 0))  # GET_FEATURES
        reply = c.recv(20)
        request, flags, size = struct.unpack_from("<III", reply)
        assert (request, flags & 7, size) == (1, 5, 8)
        features = struct.unpack_from("<Q", reply, 12)[0]
        assert features & (1 << 32) and features & (1 << 30)  # VERSION_1, PROTOCOL_FEATURES
        c.close()
        assert be.wait_exit() == 0, be.errors
        assert "disconnected" in be.errors
    assert not be.sock.exists()


def test_garbage_on_the_socket_ends_the_session_with_one_error(tmp_path):
    """A message with a bad version field: exit 1, one error line in the log, no traceback."""
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * MIB)
    with blk_backend(tmp_path, str(img)) as be:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(be.sock))
        c.sendall(b"\xff" * 64)
        assert be.wait_exit() == 1, be.errors
        c.close()
        errors = [ln for ln in be.errors.splitlines() if "ERROR" in ln]
        assert len(errors) == 1 and "bad header" in errors[0], be.errors
        assert "Traceback" not in be.errors
