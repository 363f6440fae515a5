"""The worker sandbox's pure parts: the --fd grammar, the limits, the passed-file table, log rotation by copy,
peer credentials, the cgroup layout, the files tenboxd passes (docs/security-sandbox.md)."""

import errno
import os
import stat

import pytest

from tenbox_supervisor import cgroups, worker_files
from tenbox_supervisor.link import peer_of
from tenbox_supervisor.spec import SpecError, VmSpec
from tenbox_vmm import passed_files
from tenbox_vmm.console import RotatingLog, log_files
from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.sandbox import PassedFile, worker_data_max, worker_memory_max, worker_tasks_max
from tenbox_vmm.sandbox import jail, seccomp_filter

MIB = 1 << 20


# The command line ----------------------------------------------------------------------


def test_a_passed_file_is_a_descriptor_number_and_an_absolute_path():
    pf = PassedFile.parse("7:/var/lib/tenbox/vms/a/disk:1.qcow2")
    assert (pf.fd, pf.path) == (7, "/var/lib/tenbox/vms/a/disk:1.qcow2")
    assert PassedFile.parse(pf.to_arg()) == pf


@pytest.mark.parametrize("bad", ["", "7", "x:/a", "7:relative", "2:/stderr", "-1:/a", ":/a"])
def test_a_bad_passed_file_is_refused_in_one_line(bad):
    with pytest.raises(ValueError) as e:
        PassedFile.parse(bad)
    assert "--fd" in str(e.value) and "\n" not in str(e.value)


def test_worker_limits_follow_the_vm_size():
    assert worker_memory_max(256) == (256 + Limits.WORKER_MEMORY_OVERHEAD_MB + 4) * MIB
    assert worker_memory_max(16384) == (16384 + Limits.WORKER_MEMORY_OVERHEAD_MB + 256) * MIB
    assert worker_tasks_max(1) == Limits.WORKER_TASKS_BASE + 1
    assert worker_tasks_max(Limits.CPUS_MAX) == Limits.WORKER_TASKS_BASE + Limits.CPUS_MAX
    assert worker_data_max(256, 2) == worker_memory_max(256) + worker_tasks_max(2) * Limits.WORKER_THREAD_STACK_MB * MIB


# The worker's table of passed files ----------------------------------------------------


@pytest.fixture
def table():
    saved = (dict(passed_files._passed), dict(passed_files._failed))
    passed_files._passed.clear()
    passed_files._failed.clear()
    yield passed_files
    for fds in passed_files._passed.values():
        for fd in fds:
            os.close(fd)
    passed_files._passed.clear()
    passed_files._failed.clear()
    passed_files._passed.update(saved[0])
    passed_files._failed.update(saved[1])


def test_each_use_of_a_passed_path_takes_its_own_descriptor_then_the_path_is_opened(table, tmp_path):
    f = tmp_path / "img"
    f.write_bytes(b"QFI\xfbrest")
    first, second = os.open(str(f), os.O_RDWR), os.open(str(f), os.O_RDONLY)
    table.add(str(f), first)
    table.add(str(f), second)
    assert table.read_head(str(f), 4) == b"QFI\xfb" and table.stat(str(f)).st_ino == os.stat(str(f)).st_ino
    assert table.open_fd(str(f), os.O_RDWR) == first
    with pytest.raises(PermissionError):
        table.open_fd(str(f), os.O_RDWR)  # the second was passed read-only
    assert table.open_fd(str(f), os.O_RDONLY) == second
    assert not table.passed(str(f))
    os.close(first)
    os.close(second)
    fd = table.open_fd(str(f), os.O_RDONLY)  # nothing passed any more: the path itself
    assert os.fstat(fd).st_ino == os.stat(str(f)).st_ino
    os.close(fd)


def test_an_error_met_before_the_sandbox_is_raised_where_the_file_is_used(table, tmp_path):
    missing = str(tmp_path / "missing")
    table.open_named([missing], os.O_RDONLY)
    (tmp_path / "missing").write_bytes(b"made later")  # inside the sandbox the path would not be there
    with pytest.raises(FileNotFoundError) as e:
        table.open_fd(missing, os.O_RDONLY)
    assert e.value.filename == missing and e.value.errno == errno.ENOENT
    assert not table.exists(missing)


def test_the_console_log_rotates_by_copying_between_its_files(table, tmp_path):
    path = str(tmp_path / "logs" / "console.log")
    log = RotatingLog(path, max_bytes=10, keep=2)
    ino = os.stat(path).st_ino
    for chunk in (b"aaaaaaaa\n", b"bbbbbbbb\n", b"cccccccc\n", b"dddd\n"):
        log(chunk)
    log.close()
    assert [open(p, "rb").read() for p in log_files(path)] == [b"dddd\n", b"cccccccc\n", b"bbbbbbbb\n"]
    assert os.stat(path).st_ino == ino  # never renamed: the worker may not change its logs folder


def test_the_console_log_uses_the_descriptors_it_was_passed(table, tmp_path):
    path = str(tmp_path / "console.log")
    for p in log_files(path):
        table.add(p, os.open(p, os.O_RDWR | os.O_CREAT, 0o640))
    os.chmod(str(tmp_path), 0o500)  # no longer writable: nothing may be created or renamed there
    try:
        log = RotatingLog(path, max_bytes=4, keep=2)
        log(b"12345")
        log(b"678")
        log.close()
    finally:
        os.chmod(str(tmp_path), 0o700)
    assert open(path, "rb").read() == b"678" and open(path + ".1", "rb").read() == b"12345"


# The link's peer credentials ------------------------------------------------------------


class _Frame:
    def __init__(self, address):
        self.address = address

    def get(self, key):
        assert key == "Peer-Address"
        if self.address is None:
            raise OSError(errno.EINVAL, "Invalid argument")
        return self.address


def test_peer_credentials_come_from_libzmqs_peer_address():
    peer = peer_of(_Frame("localhost:999:995:4242"))
    assert (peer.uid, peer.gid, peer.pid) == (999, 995, 4242)
    assert peer_of(_Frame("127.0.0.1")) is None  # a TCP peer has no credentials
    assert peer_of(_Frame(None)) is None
    assert peer_of(_Frame("a:b:c:d")) is None


# The cgroup layout without systemd -----------------------------------------------------

HYBRID_MOUNTINFO = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
"""
HYBRID_CGROUP = "12:pids:/ci\n4:memory:/ci/job\n3:cpu,cpuacct:/\n0::/init.scope\n"
UNIFIED_MOUNTINFO = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"


def test_the_cgroup_layout_is_read_from_mountinfo_and_the_own_cgroup(tmp_path):
    (tmp_path / "mi").write_text(HYBRID_MOUNTINFO)
    (tmp_path / "cg").write_text(HYBRID_CGROUP)
    layout = cgroups.read_layout(str(tmp_path / "mi"), str(tmp_path / "cg"))
    assert layout.unified == ("/sys/fs/cgroup/unified", "/init.scope")
    assert layout.v1 == {"memory": ("/sys/fs/cgroup/memory", "/ci/job"), "pids": ("/sys/fs/cgroup/pids", "/ci")}
    (tmp_path / "mi").write_text(UNIFIED_MOUNTINFO)
    (tmp_path / "cg").write_text("0::/\n")
    assert cgroups.read_layout(str(tmp_path / "mi"), str(tmp_path / "cg")) == cgroups.Layout(("/sys/fs/cgroup", "/"), {})


def test_a_v1_worker_cgroup_gets_its_limits_and_goes_away(tmp_path):
    for c in ("memory", "pids"):
        (tmp_path / c / "ci").mkdir(parents=True)
    layout = cgroups.Layout(None, {"memory": (str(tmp_path / "memory"), "/ci"), "pids": (str(tmp_path / "pids"), "/ci")})
    made = cgroups.Cgroups(layout).create("tenbox-vm-a-1", cgroups.ResourceLimits(300 * MIB, 65))
    assert made.dirs == (str(tmp_path / "memory/ci/tenbox-vm-a-1"), str(tmp_path / "pids/ci/tenbox-vm-a-1"))
    assert (tmp_path / "memory/ci/tenbox-vm-a-1/memory.limit_in_bytes").read_text() == "%d\n" % (300 * MIB)
    assert (tmp_path / "pids/ci/tenbox-vm-a-1/pids.max").read_text() == "65\n"
    for d in made.dirs:  # a real cgroup's knobs are not files: rmdir takes them with it
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
    made.remove()
    assert not any(os.path.exists(d) for d in made.dirs)


def test_no_cgroup_is_made_where_the_host_has_none():
    assert cgroups.Cgroups(cgroups.Layout(None, {})).create("tenbox-vm-a-1", cgroups.ResourceLimits(1, 1)) is None


# The files tenboxd passes ----------------------------------------------------------------


def _spec(**fields):
    return VmSpec(id="a", name="a", kernel="/k/vmlinuz", **fields)


def test_a_worker_is_passed_its_kernel_initrd_disks_backing_files_and_logs():
    spec = _spec(initrd="/k/initrd", disks=[
        {"path": "/v/a/disk.qcow2", "format": "qcow2", "owned": True, "backing": ["/i/t/rootfs.qcow2"]},
        {"path": "/d/data.qcow2", "format": "qcow2", "read_only": True},
        {"path": "/d/scratch.raw", "format": "raw"},
    ])
    assert [worker_files.needs_chain(d) for d in spec.disks] == [False, True, False]
    files = worker_files.wanted(spec, "/v/a", {"/d/data.qcow2": ["/d/base.qcow2"]})
    assert [(f.path, f.what, f.writable, f.create) for f in files] == [
        ("/k/vmlinuz", "kernel", False, False),
        ("/k/initrd", "initrd", False, False),
        ("/v/a/disk.qcow2", "disk", True, False),
        ("/i/t/rootfs.qcow2", "backing file of /v/a/disk.qcow2", False, False),
        ("/d/data.qcow2", "disk", False, False),
        ("/d/base.qcow2", "backing file of /d/data.qcow2", False, False),
        ("/d/scratch.raw", "disk", True, False),
        ("/v/a/logs/console.log", "console log", True, True),
        ("/v/a/logs/console.log.1", "console log", True, True),
        ("/v/a/logs/console.log.2", "console log", True, True),
        ("/v/a/logs/runtime.log", "runtime log", False, True),  # to read when the worker rotates it
        ("/v/a/logs/runtime.log.1", "runtime log", True, True),
        ("/v/a/logs/runtime.log.2", "runtime log", True, True),
    ]


def test_a_recorded_backing_chain_must_be_absolute_paths():
    with pytest.raises(SpecError):
        _spec(disks=[{"path": "/d/a.qcow2", "backing": ["relative.qcow2"]}]).validate()
    with pytest.raises(SpecError):
        _spec(disks=[{"path": "/d/a.qcow2", "backing": "/d/b.qcow2"}]).validate()


def test_files_are_opened_with_their_modes_and_only_regular_files_pass(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    os.mkfifo(str(tmp_path / "fifo"))
    os.mkdir(str(tmp_path / "logs"))
    os.symlink("/etc/passwd", str(tmp_path / "logs" / "evil.log"))
    opened = worker_files.open_all([worker_files.WorkerFile(str(kernel), "kernel"),
                                    worker_files.WorkerFile(str(tmp_path / "logs" / "c.log"), "console log",
                                                            writable=True, create=True)])
    try:
        assert os.fstat(opened[0].fd).st_ino == kernel.stat().st_ino
        assert stat.S_IMODE(os.stat(str(tmp_path / "logs" / "c.log")).st_mode) == 0o640
        assert os.get_blocking(opened[0].fd)
    finally:
        worker_files.close_all(opened)
    for f, text in ((worker_files.WorkerFile(str(tmp_path / "fifo"), "disk"), "is not a regular file"),
                    (worker_files.WorkerFile(str(tmp_path / "nope"), "initrd"), "cannot open initrd"),
                    (worker_files.WorkerFile(str(tmp_path / "logs" / "evil.log"), "console log", True, True),
                     "cannot open console log")):
        with pytest.raises(worker_files.WorkerFileError) as e:
            worker_files.open_all([worker_files.WorkerFile(str(kernel), "kernel"), f])
        assert text in str(e.value)


# What the sandbox binds and allows ---------------------------------------------------------


def test_the_jail_holds_the_system_the_code_and_the_link_folder_only():
    paths = [b.path for b in jail.default_binds(jail.link_folder("ipc:///run/tenbox/workers/link.sock"))]
    assert "/run/tenbox/workers" in paths and "/usr" in paths and "/dev/kvm" not in paths
    assert not any(p in ("/", "/var/lib/tenbox", "/home", "/root", "/etc") for p in paths)
    assert jail.link_folder("tcp://127.0.0.1:5555") == []


def test_the_filter_pins_what_could_reach_other_processes_or_the_kernel():
    pid = 4242
    rules = seccomp_filter.rules(pid)
    named = {name for name, _ in rules} | set(seccomp_filter.ALLOWED)
    for forbidden in ("execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
                      "mount", "umount2", "unshare", "setns", "pivot_root", "chroot", "bpf", "perf_event_open",
                      "userfaultfd", "io_uring_setup", "keyctl", "add_key", "init_module", "kexec_load", "setuid",
                      "setgid", "setgroups", "capset", "personality", "syslog", "pidfd_open", "symlink", "link"):
        assert forbidden not in named, forbidden
    assert ("kill", [(0, "EQ", pid, 0)]) in rules and ("tgkill", [(0, "EQ", pid, 0)]) in rules
    assert ("ioctl", [(1, "EQ", 0x5412, 0)]) not in rules  # TIOCSTI


def test_renames_are_allowed_only_in_a_standalone_runtimes_snapshot_folder():
    """A worker under tenboxd renames nothing (tenboxd moves its snapshots); a standalone runtime with
    --snapshot-out renames only with that folder's descriptor as both folders."""
    for name in ("rename", "renameat", "renameat2", "linkat", "symlinkat"):
        assert name not in seccomp_filter.ALLOWED, name
    assert not any(name.startswith("rename") for name, _ in seccomp_filter.rules(4242))
    pinned = [(n, c) for n, c in seccomp_filter.rules(4242, rename_dir_fd=9) if n.startswith("rename")]
    assert pinned == [(n, [(0, "EQ", 9, 0), (2, "EQ", 9, 0)]) for n in ("renameat", "renameat2")]
