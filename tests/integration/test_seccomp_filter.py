"""The worker's seccomp filter in a real process: what a running VM does passes, the rest kills (docs/security-sandbox.md).

Each case is a child interpreter that loads the filter the way a worker
does (tenbox_vmm.sandbox.seccomp_filter.install) and then makes one call.
"""

import signal
import subprocess

import pytest

from tests.framework.repo import PYTHON, repo_env

PRELUDE = """
import ctypes, os, socket, sys, threading
from tenbox_vmm.sandbox import seccomp_filter, libc
seccomp_filter.install(os.getpid())
"""

ALLOWED = {
    "threads": "t = threading.Thread(target=lambda: None); t.start(); t.join()",
    "signal to itself": "os.kill(os.getpid(), 0)",
    "inet and unix sockets": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close(); socket.socket(socket.AF_UNIX)",
    "descriptor flags": "r, w = os.pipe(); os.set_inheritable(r, True); os.set_blocking(w, False)",
    "files": "open('/proc/self/status').read(); os.listdir('/')",
    "its own rlimits": "import resource; resource.getrlimit(resource.RLIMIT_NOFILE)",
}

FORBIDDEN = {
    "fork": "os.fork()",
    "exec": "os.execv('/bin/true', ['true'])",
    "a signal to another process": "os.kill(os.getppid(), 0)",
    "a packet socket": "socket.socket(17, socket.SOCK_RAW)",
    "typing into the terminal (TIOCSTI)": "import fcntl; fcntl.ioctl(0, 0x5412, b'x')",
    "a new namespace": "libc.unshare(libc.CLONE_NEWNS)",
    "changing user": "os.setuid(0)",
    "the kernel log (the sandbox test's probe)": "seccomp_filter.probe_forbidden()",
    "another process's rlimits": "import resource; resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE)",
}


def run(code):
    return subprocess.run([PYTHON, "-c", PRELUDE + code + "\nprint('survived')"], capture_output=True, text=True,
                          timeout=60, env=repo_env(), stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_what_a_running_worker_does_passes_the_filter(name):
    r = run(ALLOWED[name])
    assert r.returncode == 0 and "survived" in r.stdout, r.stderr


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_anything_else_kills_the_process_with_sigsys(name):
    r = run(FORBIDDEN[name])
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)


RENAME_PRELUDE = """
import os, sys
from tenbox_vmm.sandbox import seccomp_filter
snap, other = (os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in sys.argv[1:3])
for d in (snap, other):
    os.close(os.open("a", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=d))
seccomp_filter.install(os.getpid(), rename_dir_fd=snap)
"""


@pytest.mark.parametrize("code,survives", [
    ("os.rename('a', 'b', src_dir_fd=snap, dst_dir_fd=snap)", True),
    ("os.rename('a', 'b', src_dir_fd=other, dst_dir_fd=other)", False),
    ("os.rename('a', 'b', src_dir_fd=snap, dst_dir_fd=other)", False),
    ("os.rename(sys.argv[1] + '/a', sys.argv[1] + '/b')", False),
])
def test_a_standalone_runtime_renames_only_in_its_snapshot_folder(tmp_path, code, survives):
    """--snapshot-out's folder descriptor is the only place the filter lets a rename happen."""
    folders = [tmp_path / "snap", tmp_path / "other"]
    for f in folders:
        f.mkdir()
    r = subprocess.run([PYTHON, "-c", RENAME_PRELUDE + code + "\nprint('survived')"] + [str(f) for f in folders],
                       capture_output=True, text=True, timeout=60, env=repo_env(), stdin=subprocess.DEVNULL)
    if survives:
        assert r.returncode == 0 and "survived" in r.stdout, r.stderr
        assert sorted(p.name for p in folders[0].iterdir()) == ["b"]
    else:
        assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)
