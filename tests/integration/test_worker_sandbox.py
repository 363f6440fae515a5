"""The worker sandbox for real (docs/security-sandbox.md): what a worker's /proc says, what it can open, its limits, its link.

Real tenboxd daemons (without systemd: TENBOX_NO_SCOPES=1, as on CI) and
standalone runtimes run as root, with test guests as VMs.
"""

import os
import pwd
import resource
import subprocess
import time

import pytest
import zmq

from tenbox_vmm.protocol import Limits, VmState
from tenbox_vmm.protocol.link import Hello, Who, decode, encode
from tenbox_vmm.protocol.sandbox import WORKER_USER, worker_data_max, worker_memory_max, worker_tasks_max
from tenbox_vmm.sandbox import SECCOMP_PROBE_ENV
from tests.framework.guests import guest_path
from tests.framework.runtime import boot_argv

pytestmark = pytest.mark.usefixtures("kvm", "guests", "worker_user")

MEMORY_MB = 64
ROGUE_LISTEN_SEC = 4.0  # longer than HEARTBEAT_INTERVAL_SEC * HEARTBEAT_LIVENESS: the daemon would have spoken


@pytest.fixture(scope="module")
def worker_user():
    """The system user workers run as, made as the package's postinst makes it (root only)."""
    if os.geteuid() != 0:
        pytest.fail("the sandbox tests need root: workers drop from root to %s" % WORKER_USER)
    try:
        pwd.getpwnam(WORKER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", WORKER_USER], check=True)
    return pwd.getpwnam(WORKER_USER)


def status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def run_vm(d, name, guest="idle", **payload):
    r = d.call("vm.create", name=name, kernel=guest_path(guest), memory_mb=MEMORY_MB, **payload)
    assert r["ok"], r
    r = d.call("vm.start", vm_id=name)
    assert r["ok"], r
    d.wait_console(name, "ready")
    return d.vm(name)


def assert_sandboxed(st, who):
    assert [int(x) for x in st["Uid"].split()] == [who.pw_uid] * 4
    assert [int(x) for x in st["Gid"].split()] == [who.pw_gid] * 4
    assert st["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert st[cap] == "0000000000000000", cap
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"


def test_a_daemon_worker_runs_as_the_worker_user_without_capabilities_with_no_new_privs_and_seccomp(
        daemon, worker_user):
    v = run_vm(daemon, "jailed")
    assert_sandboxed(status(v["pid"]), worker_user)


def test_a_standalone_runtime_run_as_root_drops_the_same_way(spawn, worker_user):
    p = spawn(boot_argv(guest_path("idle"), memory_mb=MEMORY_MB))
    p.wait_for("idle: ready", 60)
    assert_sandboxed(status(p.proc.pid), worker_user)


def test_a_system_call_outside_the_filter_kills_the_worker_and_the_vm_ends_crashed_saying_so(make_daemon):
    d = make_daemon("probe", **{SECCOMP_PROBE_ENV: "1"})
    d.start()
    assert d.call("vm.create", name="probe", kernel=guest_path("idle"), memory_mb=MEMORY_MB)["ok"]
    d.call("vm.start", vm_id="probe")  # the worker may die before or after it is seen running
    v = d.wait_state("probe", "crashed", 60)
    failure = v["last_failure"]
    assert failure["code"] == "sandbox_violation" and failure["signal"] == "SIGSYS", failure
    assert "seccomp filter" in failure["message"]
    ls = d.ctl("vm", "ls").stdout.decode()
    assert "sandbox_violation" in [line for line in ls.splitlines() if "probe" in line][0]


def test_a_sandboxed_worker_rotates_its_runtime_log_through_the_descriptors_it_was_passed(tmp_path):
    """As tenboxd starts it: stderr on runtime.log, runtime.log (read) and .1, .2 passed with --fd.
    Its folder is out of its sandbox's sight, yet past the size the log moves to .1 and .2."""
    from tenbox_vmm.__main__ import RUNTIME_LOG_MAX_ENV

    logs = tmp_path / "vm" / "logs"
    logs.mkdir(parents=True)
    os.chmod(str(tmp_path), 0o700)  # not even the worker user may look in
    names = [str(logs / n) for n in ("runtime.log", "runtime.log.1", "runtime.log.2")]
    fds = [os.open(names[0], os.O_RDONLY | os.O_CREAT, 0o640)] + [
        os.open(n, os.O_RDWR | os.O_CREAT, 0o640) for n in names[1:]]
    argv = boot_argv(guest_path("idle"), memory_mb=MEMORY_MB) + ["--vm-dir", str(tmp_path / "vm"), "-vv"]
    for fd, name in zip(fds, names):
        argv += ["--fd", "%d:%s" % (fd, name)]
    env = dict(os.environ, **{RUNTIME_LOG_MAX_ENV: "200"})
    try:
        with open(names[0], "ab") as err:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 pass_fds=fds, env=env)
        time.sleep(3)
        p.terminate()
        assert p.wait(30) == 3
    finally:
        for fd in fds:
            os.close(fd)
    texts = [open(n, errors="replace").read() for n in names]
    whole = texts[2] + texts[1] + texts[0]  # oldest first
    assert texts[2] and texts[1] and 0 <= whole.find("sandboxed as") < whole.find("exit 3"), texts
    assert all(len(t) < 200 + 200 for t in texts), texts  # each at most one record past the size


def test_without_the_probe_the_same_worker_keeps_running(daemon):
    """The control of the test above: an idle guest's worker outlives a few heartbeats under its filter."""
    run_vm(daemon, "calm")
    time.sleep(3)
    assert daemon.vm("calm")["state"] == "running"


def _as_worker(pid, who, code, args):
    """Run python `code` in worker `pid`'s mount namespace as the worker user: what a compromised worker could do."""
    argv = ["nsenter", "--target", str(pid), "--mount", "--", "setpriv", "--reuid", str(who.pw_uid),
            "--regid", str(who.pw_gid), "--clear-groups", "--", "/usr/bin/python3", "-S", "-c", code] + args
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_a_worker_cannot_open_another_vms_files_or_the_daemons_data_dir(daemon, worker_user, tmp_path):
    disk = tmp_path / "b.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    os.chmod(disk, 0o644)  # readable by every user on the host: only the sandbox keeps it from A
    a = run_vm(daemon, "a")
    b = run_vm(daemon, "b", disks=[{"path": str(disk)}])
    data = str(daemon.data_dir)
    b_dir = os.path.join(data, "vms", b["id"])
    # What A's root holds: none of the data dir, none of B's files.
    root = "/proc/%d/root" % a["pid"]
    assert os.path.isdir(root + "/usr")
    for path in (data, b_dir, str(disk), os.path.join(data, "vms", a["id"])):
        assert not os.path.exists(root + path), path
    code = ("import os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        open(p, 'rb').close() if not os.path.isdir(p) else os.listdir(p)\n"
            "        print('OPENED', p)\n"
            "    except OSError as e:\n"
            "        print('REFUSED', p, e.errno)\n")
    targets = [str(disk), os.path.join(b_dir, "vm.json"), os.path.join(b_dir, "logs", "console.log"), data,
               "/proc/%d/environ" % b["pid"], "/proc/%d/mem" % b["pid"]]
    r = _as_worker(a["pid"], worker_user, code, targets)
    assert r.returncode == 0, r.stderr
    assert "OPENED" not in r.stdout and r.stdout.count("REFUSED") == len(targets), r.stdout
    # The disk is world-readable on the host: what keeps it from A is A's sandbox, not the file's mode.
    assert os.stat(disk).st_mode & 0o004


def test_the_workers_memory_and_task_limits_are_in_place_without_systemd(daemon):
    v = run_vm(daemon, "bounded", cpus=2)
    pid = v["pid"]
    limits = open("/proc/%d/limits" % pid).read()
    assert _limit(limits, "Max data size") == worker_data_max(MEMORY_MB, 2)
    assert _limit(limits, "Max processes") == Limits.WORKER_USER_TASKS_MAX
    assert _limit(limits, "Max core file size") == 0
    cgroups = _cgroups(pid)
    if not cgroups:
        pytest.skip("this host gives tenboxd no cgroup to manage: the rlimits above are the bound")
    assert all(os.path.basename(path).startswith("tenbox-vm-%s-" % v["id"]) for path in cgroups.values())
    if "" in cgroups:  # cgroup v2
        assert _read(cgroups[""], "memory.max") == worker_memory_max(MEMORY_MB)
        assert _read(cgroups[""], "pids.max") == worker_tasks_max(2)
    else:
        assert _read(cgroups["memory"], "memory.limit_in_bytes") == worker_memory_max(MEMORY_MB)
        assert _read(cgroups["pids"], "pids.max") == worker_tasks_max(2)
    assert daemon.call("vm.stop", vm_id="bounded")["ok"]
    deadline = time.monotonic() + 10
    while any(os.path.isdir(p) for p in cgroups.values()):
        assert time.monotonic() < deadline, "the worker's cgroups were not removed: %s" % cgroups
        time.sleep(0.1)


def _limit(text, name):
    line = [ln for ln in text.splitlines() if ln.startswith(name)][0]
    value = line[len(name):].split()[0]
    return resource.RLIM_INFINITY if value == "unlimited" else int(value)


def _cgroups(pid):
    """controller ("" for v2) -> the folder of the worker's own cgroup, for those tenboxd made."""
    mounts = {}
    for line in open("/proc/self/mountinfo"):
        fields, post = line.split(" - ")[0].split(), line.split(" - ")[1].split()
        if post[0] == "cgroup2":
            mounts.setdefault("", fields[4])
        elif post[0] == "cgroup":
            for opt in post[2].split(","):
                mounts.setdefault(opt, fields[4])
    out = {}
    for line in open("/proc/%d/cgroup" % pid):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            if c in ("", "memory", "pids") and c in mounts and os.path.basename(path).startswith("tenbox-vm-"):
                out[c] = os.path.join(mounts[c], path.lstrip("/"))
    return out


def _read(folder, knob):
    return int(open(os.path.join(folder, knob)).read().split()[0])


def _rogue(endpoint, identity=None):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def _received(sock, seconds):
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(100):
            got.append(decode(sock.recv()))
    return got


def test_a_process_speaking_with_another_vms_id_cannot_take_its_link_over(daemon):
    v = run_vm(daemon, "victim")
    endpoint = "ipc://" + str(daemon.run_dir / "workers" / "link.sock")
    claim = Hello(vm_id=v["id"], pid=v["pid"], create_time=0.0, state=VmState.RUNNING, started_at=0.0, boots=1,
                  version="rogue")
    # As workers before 0.9 named themselves (ROUTER_HANDOVER would give it the victim's route) ...
    squatter = _rogue(endpoint, identity=v["id"].encode())
    # ... and with the victim's pid in its HELLO.
    liar = _rogue(endpoint)
    for sock in (squatter, liar):
        sock.send(encode(claim))
    own = Hello(vm_id=v["id"], pid=os.getpid(), create_time=0.0, state=VmState.RUNNING, started_at=0.0, boots=1,
                version="rogue")
    liar.send(encode(own))
    heard = _received(squatter, ROGUE_LISTEN_SEC) + _received(liar, 0.5)
    assert all(isinstance(m, Who) for m in heard), heard
    # The victim's worker still has its link: it stays running, and a stop reaches it (no SIGKILL needed).
    assert daemon.vm("victim")["state"] == "running"
    r = daemon.ctl("vm", "console", "victim", input=b"still mine\n", timeout=30)
    assert r.returncode == 0, r.stderr
    daemon.wait_console("victim", "echo: still mine")
    assert daemon.call("vm.stop", vm_id="victim")["ok"]
    assert "did not stop" not in daemon.proc.errors and daemon.vm("victim")["last_failure"] is None
    squatter.close()
    liar.close()
