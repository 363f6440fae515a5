"""Fixtures shared by unit and integration tests."""

import os
import shutil
import subprocess

import pytest

from tests.framework import linux_guest
from tests.framework.daemon import DaemonProcess
from tests.framework.guests import GUEST_DIR
from tests.framework.process import ConsoleProcess
from tests.framework.repo import REPO

# Tests marked hwvirt run in the nested lane where the CPU lacks vmx/svm.
pytest_plugins = ["tests.framework.lane_plugin"]

# The arm64 tests (the emulated arm64 host, the arm64 template) run last, while their caches are
# built in the background from the start of the session (tests/framework/arm64_prepare.py).
ARM64_MODULES = ("test_aarch64_", "test_image_arm64", "test_arm64_")
_arm64_builder = None


def _is_arm64(item) -> bool:
    return os.path.basename(str(item.fspath)).startswith(ARM64_MODULES)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    items[:] = [i for i in items if not _is_arm64(i)] + [i for i in items if _is_arm64(i)]


def pytest_collection_finish(session):
    global _arm64_builder
    from tests.framework import arm64_prepare

    if any(_is_arm64(i) for i in session.items) and not session.config.option.collectonly:
        _arm64_builder = arm64_prepare.start()


def pytest_sessionfinish(session, exitstatus):
    if _arm64_builder is not None and _arm64_builder.poll() is None:
        os.killpg(_arm64_builder.pid, 15)
        _arm64_builder.wait(timeout=60)


@pytest.fixture(scope="session")
def guests():
    """The test guests, built once per session with `make -C tests/guests`."""
    r = subprocess.run(["make", "-s", "-C", str(REPO / "tests" / "guests")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("building the test guests failed:\n" + r.stdout + r.stderr)
    return GUEST_DIR


@pytest.fixture(scope="session")
def kvm():
    """Tests that boot guests need /dev/kvm; without it they fail, they do not skip."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.fail("/dev/kvm is missing or not accessible: these tests run VMs on KVM")
    return "/dev/kvm"


@pytest.fixture(scope="session")
def linux() -> linux_guest.Artifacts:
    """Debian's kernel and the busybox initramfs, built (or found cached) once per session by the project's scripts."""
    return linux_guest.build()


@pytest.fixture(scope="session")
def tsc_khz(linux: linux_guest.Artifacts) -> int:
    """The Linux guest's TSC frequency under QEMU TCG, for its tsc_early_khz= (linux_guest.tsc_khz)."""
    return linux_guest.tsc_khz(linux)


@pytest.fixture(scope="session")
def qemu_tools():
    """qemu-img and qemu-io, the judges of disk images (qemu-utils): without them the tests fail, they do not skip."""
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        pytest.fail("%s missing: install qemu-utils (the qcow2 oracle)" % ", ".join(missing))


@pytest.fixture
def spawn():
    """Start ConsoleProcess children that are killed when the test ends."""
    procs = []

    def start(argv, **kw):
        p = ConsoleProcess(argv, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


@pytest.fixture
def snap_dir(tmp_path):
    """A folder a worker may write its snapshot in: run as root, it writes as the worker user."""
    d = tmp_path / "snaps"
    d.mkdir()
    if os.geteuid() == 0:
        from tenbox_vmm.protocol.sandbox import worker_user

        who = worker_user()
        os.chown(str(d), who.uid, who.gid)
    return d


@pytest.fixture
def daemon(tmp_path):
    """A running tenboxd on private paths; every worker it started is killed afterwards."""
    d = DaemonProcess(tmp_path)
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def make_daemon(tmp_path):
    """Build (not start) tenboxd instances with extra environment (and a preamble of stubs: DaemonProcess)."""
    made = []

    def make(subdir="d", preamble=None, **env):
        d = DaemonProcess(tmp_path / subdir, extra_env=env, preamble=preamble)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
