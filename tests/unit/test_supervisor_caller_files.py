"""Who may name which files (caller_files.py): the rights each use is opened with, and the refusals."""

import os

import pytest

from tenbox_supervisor.api import Caller
from tenbox_supervisor.caller_files import CallerFiles, Credentials, Use, open_uses
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import ErrorCode

ROOT = Caller(0, 0, 1)
MEMBER = Caller(1000, 1000, 2, groups=(1000, 998))
CLOUD = Caller(0, 0, 0, transport="cloud")
STORE = "/var/lib/tenbox/images"


@pytest.fixture
def files():
    return CallerFiles(STORE + "/")


def rights(files, caller, path, write=False, own=()):
    return files.rights_for(caller, Use("kernel", path, write), own)


def test_root_opens_everything_with_the_daemons_rights(files):
    assert rights(files, ROOT, "/etc/shadow") is None
    assert rights(files, ROOT, STORE + "/deb/rootfs.qcow2", write=True) is None


def test_a_member_opens_its_paths_with_its_own_uid_and_groups(files):
    assert rights(files, MEMBER, "/home/u/disk.raw", write=True) == Credentials(1000, 1000, (1000, 998))
    assert Credentials(1000, 1000, (1000, 998)).setpriv_argv()[:4] == [
        "setpriv", "--reuid=1000", "--regid=1000", "--groups=1000,998"]


def test_the_image_store_is_open_to_every_caller_for_reading_only(files):
    assert rights(files, MEMBER, STORE + "/deb/vmlinuz") is None
    assert rights(files, CLOUD, STORE + "/deb/rootfs.qcow2") is None
    for caller in (MEMBER, CLOUD):
        with pytest.raises(ApiError) as e:
            rights(files, caller, STORE + "/deb/rootfs.qcow2", write=True)
        assert e.value.code is ErrorCode.PERMISSION_DENIED and "only read" in e.value.message


def test_dot_dot_does_not_lead_out_of_the_store(files):
    assert rights(files, MEMBER, STORE + "/deb/../../vms/x/disk.qcow2") is not None
    with pytest.raises(ApiError) as e:
        rights(files, CLOUD, STORE + "/../device.token")
    assert e.value.code is ErrorCode.PERMISSION_DENIED and "image store" in e.value.message


def test_a_vms_own_files_are_the_daemons_and_the_cloud_gets_nothing_else(files):
    own = ["/var/lib/tenbox/vms/abc/disk.qcow2"]
    assert rights(files, MEMBER, own[0], write=True, own=own) is None
    assert rights(files, CLOUD, own[0], write=True, own=own) is None
    with pytest.raises(ApiError) as e:
        rights(files, CLOUD, "/srv/vmlinuz")
    assert e.value.message == "kernel /srv/vmlinuz: the cloud may name files of the image store (%s) only" % STORE


def test_opening_with_the_daemons_rights_says_what_is_wrong(tmp_path):
    good = tmp_path / "k"
    good.write_bytes(b"x")
    fds = open_uses([(Use("kernel", str(good)), None), (Use("disks[0]", str(good), write=True), None)])
    assert sorted(fds) == ["disks[0]", "kernel"]
    for fd in fds.values():
        os.close(fd)
    os.mkfifo(str(tmp_path / "fifo"))
    cases = [(str(tmp_path / "none"), ErrorCode.FILE_MISSING, "does not exist"),
             (str(tmp_path), ErrorCode.FILE_MISSING, "is not a regular file"),
             (str(tmp_path / "fifo"), ErrorCode.FILE_MISSING, "is not a regular file")]
    for path, code, words in cases:
        with pytest.raises(ApiError) as e:
            open_uses([(Use("kernel", str(good)), None), (Use("initrd", path), None)])
        assert e.value.code is code and e.value.message == "initrd %s %s" % (path, words)


def test_two_uses_with_one_key_are_refused_before_anything_is_opened(tmp_path):
    """Descriptors are kept by key: a second use of a key would leave the first descriptor open."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match=r"same key: \['disk'\]"):
        open_uses([(Use("disk", str(a), write=True), None), (Use("disk", str(b)), None)])
    assert len(os.listdir("/proc/self/fd")) == before
