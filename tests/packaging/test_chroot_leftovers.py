"""The packaging tests' chroot cache after a killed run (tests/packaging/chroots.py): a debootstrap killed in
its second stage leaves /proc mounted in its half-made tree, and the next run must still clear it (root)."""

import subprocess

from tests.packaging import chroots


def mounted_under(path):
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path) + "/")]


def test_a_half_made_chroot_with_proc_still_mounted_is_unmounted_and_removed(tmp_path):
    partial = tmp_path / "bookworm-amd64.partial"
    (partial / "proc").mkdir(parents=True)
    (partial / "etc" / "apt").mkdir(parents=True)
    (partial / "etc" / "apt" / "sources.list").write_text("deb x y\n")
    subprocess.run(["mount", "-t", "proc", "proc", str(partial / "proc")], check=True)
    try:
        assert mounted_under(partial)
        chroots._unmount_and_remove(partial)
        assert not partial.exists() and not mounted_under(partial)
    finally:
        for t in mounted_under(partial):
            subprocess.run(["umount", "-l", t])
