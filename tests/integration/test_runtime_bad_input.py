"""Bad input to tenbox-vm-runtime: one clear line on stderr, exit code 2, no traceback."""

import os
import shutil
import subprocess

import pytest

from tests.framework.guests import guest_path
from tests.framework.repo import PYTHON, REPO, repo_env
from tests.framework.runtime import runtime_argv

pytestmark = pytest.mark.usefixtures("guests")


def run(argv, timeout=30, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=repo_env(), cwd=str(REPO),
                          stdin=subprocess.DEVNULL, **kw)


def assert_usage_error(r, *fragments):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("tenbox-vm-runtime: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_kernel(tmp_path):
    assert_usage_error(run(runtime_argv("--kernel", str(tmp_path / "vmlinuz"))), "does not exist", "vmlinuz")


def test_kernel_is_a_directory(tmp_path):
    assert_usage_error(run(runtime_argv("--kernel", str(tmp_path))), "not a regular file")


def test_unreadable_kernel(tmp_path):
    k = tmp_path / "k"
    shutil.copy(guest_path("poweroff"), k)
    os.chmod(k, 0)
    r = run(["runuser", "-u", "nobody", "--", PYTHON, "-m", "tenbox_vmm", "--kernel", str(k)])
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_file_that_is_not_a_kernel(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("just some text\n" * 100)
    assert_usage_error(run(runtime_argv("--kernel", str(f))), "not a Linux kernel")


def test_initrd_that_does_not_fit(tmp_path):
    big = tmp_path / "initrd"
    with open(big, "wb") as f:
        f.truncate(20 << 20)
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), "--initrd", str(big), "--memory", "16")),
                       "does not fit")


def test_missing_initrd(tmp_path):
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), "--initrd", str(tmp_path / "x"))),
                       "initrd", "does not exist")


@pytest.mark.parametrize("args, fragment", [
    (["--memory", "8"], "at least 16 MiB"),
    (["--memory", "99999999"], "more than the host can give"),
    (["--memory", "lots"], "invalid int value"),
    (["--cpus", "0"], "1..64"),
    (["--cpus", "65"], "1..64"),
    (["--vm-id", "../etc"], "--vm-id"),
    (["--console", "fancy"], "invalid choice"),
])
def test_out_of_range_options(args, fragment):
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), *args)), fragment)


def test_missing_required_kernel_option():
    assert_usage_error(run(runtime_argv()), "--kernel")


def test_tty_console_without_a_terminal():
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), "--console", "tty")), "terminal")


def test_dev_kvm_not_permitted():
    """An unprivileged user is told it is a permission problem and how to fix it."""
    r = run(["runuser", "-u", "nobody", "--", PYTHON, "-m", "tenbox_vmm", "--kernel", guest_path("poweroff")],
            )
    assert_usage_error(r, "permission denied on /dev/kvm", "kvm group")


def test_dev_kvm_missing(tmp_path):
    """Without /dev/kvm at all the message says so and names the fix (a private mount namespace hides it)."""
    script = "mount -t tmpfs none /dev && exec %s -m tenbox_vmm --kernel %s" % (PYTHON, guest_path("poweroff"))
    r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert_usage_error(r, "/dev/kvm does not exist", "modprobe")


def _image(tmp_path, name="d.raw", size=1 << 20):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.mark.parametrize("suffix, fragment", [
    (",bogus", "unknown option 'bogus'"),
    (",format=vmdk", "format must be raw or qcow2"),
    (",serial=" + "x" * 21, "serial must be"),
])
def test_bad_disk_options(tmp_path, suffix, fragment):
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), "--disk", _image(tmp_path) + suffix)),
                       fragment)


def test_missing_disk(tmp_path):
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), "--disk", str(tmp_path / "none.raw"))),
                       "none.raw")


def test_disk_declared_qcow2_but_raw(tmp_path):
    r = run(runtime_argv("--kernel", guest_path("poweroff"), "--disk", _image(tmp_path) + ",format=qcow2"))
    assert_usage_error(r, "d.raw")


def test_corrupt_qcow2_disk(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(60))
    assert_usage_error(run(runtime_argv("--kernel", guest_path("poweroff"), "--disk", str(bad))), "bad.qcow2")


def test_disk_in_use_by_qemu_io(tmp_path):
    img = _image(tmp_path)
    holder = subprocess.Popen(["qemu-io", "-f", "raw", img], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        holder.stdin.write(b"read 0 512\n")  # once this answers, qemu-io holds its locks
        holder.stdin.flush()
        holder.stdout.readline()
        r = run(runtime_argv("--kernel", guest_path("poweroff"), "--disk", img))
        assert_usage_error(r, "in use by another process")
        unchanged = open(img, "rb").read()
        assert unchanged == bytes(1 << 20)
    finally:
        holder.kill()
        holder.wait()


def test_missing_libslirp_is_one_line_naming_the_package():
    """A host without libslirp0 (the library name changed in this run only): exit 2, the package named."""
    code = ("import sys; import tenbox_vmm.net.libslirp as ls; ls.LIBRARY_NAME = 'libslirp-absent.so.0'; "
            "from tenbox_vmm.__main__ import main; sys.exit(main(sys.argv[1:]))")
    argv = [PYTHON, "-c", code] + runtime_argv("--kernel", guest_path("poweroff"), "--net")[3:]
    assert_usage_error(run(argv), "libslirp0")
