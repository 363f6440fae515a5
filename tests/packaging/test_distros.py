"""The package on Debian 11, 12 and 13 for real: install-linux.sh, the daemon, the unit tests, upgrade, remove, purge (tests; root).

One class, run once per distribution in a fresh overlay on a cached
debootstrap chroot (tests/packaging/chroots.py). The methods are the steps of
one host's life, in order; each one states the contract it checks.
The package comes from a signed apt repository on 127.0.0.1 (aptrepo.py),
systemctl is a recording stand-in (systemd is not PID 1 in a chroot).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import subprocess
import time
from types import SimpleNamespace

import pytest

from tests.packaging.aptrepo import SUITE
from tests.packaging.chroots import Chroot
from tests.packaging.conftest import RESULTS, TIMINGS

SUITES = ["bullseye", "bookworm", "trixie"]
PYTHONS = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
INSTALLER = "/opt/tenbox/install-linux.sh"
KEYRING = "/opt/tenbox/test-archive-keyring.gpg"
SOCKET = "/run/tenbox/tenbox.sock"
OPERATOR = "alice"  # the $SUDO_USER who runs the installer
OUTSIDER = "mallory"  # not in the tenbox group
DAEMON_START_TIMEOUT_SEC = 30
DAEMON_STOP_TIMEOUT_SEC = 20
# What tests/unit needs beyond the package, and which tests need it:
#   python3-pytest, python3-hypothesis  every test
#   gcc make binutils libc6-dev         test_guest_images (builds the guests), test_kvm_abi
#   linux-libc-dev                      test_kvm_abi (<linux/kvm.h>)
#   libslirp-dev, python3-cffi          test_net_slirp_abi (<slirp/libslirp.h>; parses the declarations)
#   acpica-tools                        test_acpi_tables (iasl)
# None of it is a dependency of the package (python3-cffi deliberately not).
UNIT_TEST_PACKAGES = ("python3-pytest python3-hypothesis gcc make binutils libc6-dev linux-libc-dev "
                      "libslirp-dev python3-cffi acpica-tools python3-prometheus-client")
# After a purge only these may still carry tenbox's name (docs/packaging.md).
ALLOWED_LEFTOVERS = ("/var/lib/tenbox", "/etc/apt/sources.list.d/tenbox.list",
                     "/usr/share/keyrings/tenbox-archive-keyring.", "/var/lib/apt/lists/", "/var/cache/apt/",
                     "/opt/tenbox", "/var/log/", "/tmp/")


@pytest.fixture(scope="class", params=SUITES)
def host(request, debs, apt_repo, tmp_path_factory):
    """A fresh chroot of one suite, the repository holding the older package, the installer copied in."""
    suite = request.param
    started = time.monotonic()
    apt_repo.publish([debs.old])
    with Chroot(suite) as chroot:
        TIMINGS.setdefault(suite, {})["chroot"] = time.monotonic() - started
        opt = chroot.path("/opt/tenbox")
        opt.mkdir(parents=True)
        shutil.copy2(debs.source / "scripts" / "install-linux.sh", opt / "install-linux.sh")
        shutil.copy2(apt_repo.keyring, opt / "test-archive-keyring.gpg")
        for user in (OPERATOR, OUTSIDER):
            chroot.run("useradd --create-home --shell /bin/sh %s" % user)
        state = SimpleNamespace(chroot=chroot, repo=apt_repo, debs=debs, suite=suite, daemon=None,
                                logs=tmp_path_factory.mktemp("logs-" + suite))
        yield state
        if state.daemon is not None and state.daemon.poll() is None:
            state.daemon.kill()
        TIMINGS[suite].update({k: round(v, 1) for k, v in chroot.timings.items()})


# Helpers --------------------------------------------------------------------


def installer(host, *extra, env=None, check=True, step="installer"):
    args = ["--repo", host.repo.url, "--suite", SUITE] + list(extra)
    cmd = "sh %s %s" % (INSTALLER, " ".join("'%s'" % a for a in args))
    return host.chroot.run(cmd, env=dict({"SUDO_USER": OPERATOR}, **(env or {})), check=check, step=step)


def signed(host):
    return ("--keyring", KEYRING)


def tenboxd_calls(host):
    """The stand-in's calls that concern tenboxd, plus daemon reloads."""
    return [c for c in host.chroot.standin_calls() if "tenboxd" in c or "daemon-reload" in c]


def audit_clean(host):
    r = host.chroot.run("dpkg --audit")
    assert r.stdout.strip() == "", r.stdout


def fake_cpuinfo(host, flags):
    """Bind a /proc/cpuinfo with these flags over the real one; returns an undo function."""
    src = host.logs / ("cpuinfo-" + flags.replace(" ", "-"))
    src.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 %s\n\n" % flags)
    target = host.chroot.path("/proc/cpuinfo")
    subprocess.run(["mount", "--bind", str(src), str(target)], check=True, timeout=30)

    def undo():
        subprocess.run(["umount", str(target)], check=True, timeout=30)

    return undo


def start_daemon(host):
    """tenboxd as systemd would start it: root, /run/tenbox made 0755, the unit's environment and env file."""
    host.chroot.run("rm -f %s; mkdir -p -m 0755 /run/tenbox" % SOCKET)
    log = host.logs / "tenboxd.log"
    # INVOCATION_ID: what systemd sets, so tenboxd picks the system paths.
    # TENBOX_NO_SCOPES: no systemd to make scopes in.
    host.daemon = host.chroot.popen(
        "set -a; . /etc/tenbox/tenboxd.env; set +a; "
        "exec env INVOCATION_ID=tenbox-packaging-test TENBOX_SOCKET_GROUP=tenbox TENBOX_NO_SCOPES=1 tenboxd", log)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_SEC
    sock = host.chroot.path(SOCKET)
    while time.monotonic() < deadline:
        if sock.is_socket() and host.chroot.run("tenbox vm ls", check=False).returncode == 0:
            return
        if host.daemon.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail("tenboxd did not come up:\n" + log.read_text()[-4000:])


def stop_daemon(host):
    host.daemon.send_signal(signal.SIGTERM)
    try:
        rc = host.daemon.wait(DAEMON_STOP_TIMEOUT_SEC)
    except subprocess.TimeoutExpired:
        host.daemon.kill()
        pytest.fail("tenboxd did not stop within %ds of SIGTERM" % DAEMON_STOP_TIMEOUT_SEC)
    host.daemon = None
    assert rc == 0, (host.logs / "tenboxd.log").read_text()[-4000:]


def plant_old_modes(host):
    """A VM folder as tenbox before issue 15 left it: 0755 folders, 0644 spec, disk and console; its path."""
    data = host.chroot.path("/var/lib/tenbox")
    vm = data / "vms" / "0123456789ab"
    (vm / "logs").mkdir(parents=True)
    for name, text in (("vm.json", "{}"), ("disk.qcow2", "guest data"), ("logs/console.log", "login: root")):
        (vm / name).write_text(text)
        (vm / name).chmod(0o644)
    for folder in (data, data / "vms", vm, vm / "logs"):
        folder.chmod(0o755)
    return vm


def check_modes(host, vm):
    """docs/security.md's table on the planted VM folder."""
    gid = int(host.chroot.run("getent group tenbox").stdout.split(":")[2])

    def mode(path):
        st = path.stat()
        return stat.S_IMODE(st.st_mode), st.st_gid

    assert mode(host.chroot.path("/var/lib/tenbox")) == (0o750, gid)
    assert mode(vm.parent)[0] == mode(vm)[0] == 0o700
    assert mode(vm / "vm.json")[0] == mode(vm / "disk.qcow2")[0] == 0o600
    assert mode(vm / "logs") == (0o2750, gid) and mode(vm / "logs" / "console.log") == (0o640, gid)


def leftovers(host):
    r = host.chroot.run("find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o "
                        "\\( -iname '*tenbox*' -print \\)")
    return sorted(p for p in r.stdout.splitlines() if not p.startswith(ALLOWED_LEFTOVERS))


# The life of one host, in order ---------------------------------------------


@pytest.mark.usefixtures("host")
class TestDistribution:
    def test_installer_refuses_a_non_root_user(self, host):
        r = host.chroot.run("runuser -u %s -- sh %s --no-kvm-check" % (OPERATOR, INSTALLER), check=False)
        assert r.returncode == 1 and "run as root" in r.stderr

    def test_installer_refuses_a_cpu_without_vmx_or_svm_and_writes_nothing(self, host):
        undo = fake_cpuinfo(host, "")
        try:
            r = installer(host, *signed(host), check=False)
        finally:
            undo()
        assert r.returncode == 1
        assert "neither vmx (Intel VT-x) nor svm (AMD-V)" in r.stderr and "--no-kvm-check" in r.stderr
        assert not host.chroot.path("/etc/apt/sources.list.d/tenbox.list").exists()

    def test_installer_installs_and_enables_then_restarts(self, host):
        """apt source with signed-by, the package, env file, group membership; systemctl enable then restart."""
        undo = fake_cpuinfo(host, "vmx")
        try:
            r = installer(host, *signed(host))
        finally:
            undo()
        out = r.stdout + r.stderr
        c = host.chroot
        assert c.path("/etc/apt/sources.list.d/tenbox.list").read_text().splitlines()[-1] == (
            "deb [signed-by=/usr/share/keyrings/tenbox-archive-keyring.gpg] %s %s main" % (host.repo.url, SUITE))
        env = c.path("/etc/tenbox/tenboxd.env").read_text()
        assert "\nTENBOX_DATA_DIR=/var/lib/tenbox\n" in env and "\nTENBOX_CLOUD_URL=\n" in env
        assert "added %s to the tenbox group" % OPERATOR in out and "newgrp tenbox" in out
        assert c.run("dpkg-query -W -f='${Version} ${db:Status-Abbrev}' tenbox").stdout.strip() == host.debs.v1 + " ii"
        assert tenboxd_calls(host) == ["enable tenboxd", "restart tenboxd"]
        assert not any("--now" in call for call in c.standin_calls())
        assert "no TENBOX_CLOUD_URL" in out
        audit_clean(host)

    def test_group_and_system_user_exist_as_the_seed_says(self, host):
        c = host.chroot
        name, _, uid, gid, _, home, shell = c.run("getent passwd tenbox").stdout.strip().split(":")
        assert (home, shell) == ("/var/lib/tenbox", "/usr/sbin/nologin")
        assert int(uid) < 1000, "a system user"
        group = c.run("getent group tenbox").stdout.strip().split(":")
        assert int(group[2]) == int(gid) and OPERATOR in group[3].split(",")
        assert not c.path("/var/lib/tenbox").exists(), "no home directory is created (it is the StateDirectory)"
        # The workers' user (docs/security-sandbox.md): a system user with its own group, outside tenbox's.
        name, _, uid, gid, _, home, shell = c.run("getent passwd tenbox-vm").stdout.strip().split(":")
        assert 0 < int(uid) < 1000 and (home, shell) == ("/nonexistent", "/usr/sbin/nologin")
        assert c.run("getent group tenbox-vm").stdout.strip().split(":")[2] == gid != group[2]
        assert "tenbox-vm" not in group[3].split(",")

    def test_commands_run_with_the_distributions_python3(self, host):
        c = host.chroot
        assert c.run("tenboxd --version").stdout.strip() == "tenboxd %s" % host.debs.v1
        assert "Usage:" in c.run("tenboxctl --help").stdout
        assert host.debs.v1 in c.run("tenbox --version").stdout
        assert host.debs.v1 in c.run("tenbox-vm-runtime --version").stdout + c.run(
            "tenbox-vm-runtime --version").stderr
        version = c.run("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").stdout.strip()
        assert version == PYTHONS[host.suite]
        RESULTS.setdefault(host.suite, {})["python3"] = version
        # The pre-parsed FFI is used: cffi's parser (python3-cffi) is neither installed nor imported.
        r = c.run("python3 -c 'import sys, tenbox_vmm.kvm.ffi; print(\"cffi\" in sys.modules)'")
        assert r.stdout.strip() == "False"
        assert c.run("dpkg-query -W -f='${db:Status-Abbrev}' python3-cffi", check=False).stdout.strip() in ("", "un")
        doctor = c.run("tenboxd --doctor", check=False)
        assert doctor.returncode in (0, 2) and "checks" in json.loads(doctor.stdout)

    def test_a_second_run_changes_nothing_and_says_so(self, host):
        c = host.chroot
        files = ["/etc/apt/sources.list.d/tenbox.list", "/usr/share/keyrings/tenbox-archive-keyring.gpg",
                 "/etc/tenbox/tenboxd.env"]
        before = {f: c.path(f).stat().st_mtime_ns for f in files}
        c.clear_standin_log()
        r = installer(host, "--no-kvm-check", *signed(host))
        assert "nothing changed" in r.stdout
        assert "already installed" in r.stdout and "already in the tenbox group" in r.stdout
        assert {f: c.path(f).stat().st_mtime_ns for f in files} == before
        # Restarted all the same: that is how an edited env file gets loaded (seed).
        assert tenboxd_calls(host) == ["enable tenboxd", "restart tenboxd"]

    def test_operator_edits_to_the_env_file_are_kept(self, host):
        env = host.chroot.path("/etc/tenbox/tenboxd.env")
        original = env.read_text()
        env.write_text(original.replace("TENBOX_CLOUD_URL=\n", "TENBOX_CLOUD_URL=wss://cloud.example.invalid/api/device-tunnel\n")
                       + "# operator's note\n")
        edited = env.read_text()
        try:
            r = installer(host, "--no-kvm-check", "--cloud-url", "wss://other.example.invalid/api/device-tunnel", *signed(host))
            assert env.read_text() == edited
            assert "kept TENBOX_CLOUD_URL=wss://cloud.example.invalid/api/device-tunnel" in r.stderr
        finally:
            env.write_text(original)

    def test_trusted_is_only_used_when_asked_and_warns(self, host):
        c = host.chroot
        r = installer(host, "--no-kvm-check", "--trusted")
        assert c.path("/etc/apt/sources.list.d/tenbox.list").read_text().splitlines()[-1] == (
            "deb [trusted=yes] %s %s main" % (host.repo.url, SUITE))
        assert "WITHOUT checking signatures" in r.stderr
        assert not c.path("/usr/share/keyrings/tenbox-archive-keyring.gpg").exists()
        bad = installer(host, "--no-kvm-check", "--trusted", *signed(host), check=False)
        assert bad.returncode == 1 and "exclude each other" in bad.stderr
        installer(host, "--no-kvm-check", *signed(host))
        assert "signed-by=" in c.path("/etc/apt/sources.list.d/tenbox.list").read_text()

    def test_daemon_serves_the_cli_through_the_group_socket(self, host):
        """root and tenbox-group members list VMs; anyone else gets a permission error naming the fix."""
        c = host.chroot
        start_daemon(host)
        try:
            st = c.path(SOCKET).stat()
            gid = int(c.run("getent group tenbox").stdout.split(":")[2])
            assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_uid) == (0o660, gid, 0)
            assert stat.S_IMODE(c.path("/run/tenbox").stat().st_mode) == 0o755
            data = c.path("/var/lib/tenbox").stat()  # docs/security.md: members reach it, nobody else
            assert (stat.S_IMODE(data.st_mode), data.st_gid, data.st_uid) == (0o750, gid, 0)
            assert stat.S_IMODE(c.path("/var/lib/tenbox/vms").stat().st_mode) == 0o700
            vms = json.loads(c.run("tenbox vm ls --json").stdout)
            assert vms in ([], {"vms": []}), vms
            assert c.run("runuser -u %s -- tenbox vm ls" % OPERATOR).returncode == 0
            denied = c.run("runuser -u %s -- tenbox vm ls" % OUTSIDER, check=False)
            assert denied.returncode == 4 and "permission denied" in denied.stderr
            doctor = c.run("tenbox doctor --json", check=False)
            assert doctor.returncode in (0, 1) and "checks" in json.loads(doctor.stdout)
            info = json.loads(c.run("tenbox system info --json").stdout)
            assert info["version"] == host.debs.v1 and info["socket_path"] == SOCKET
        finally:
            stop_daemon(host)

    def test_unit_tests_pass_against_the_installed_package(self, host):
        """tests/unit with this distribution's python3, python3-* and tools, importing the installed tenbox."""
        c = host.chroot
        # python3-zstandard (suggested, for zstd-compressed qcow2 clusters) from Debian 12 on.
        extra = "" if host.suite == "bullseye" else " python3-zstandard"
        c.run("apt-get install -y -qq --no-install-recommends %s%s" % (UNIT_TEST_PACKAGES, extra), step="unit-test tools")
        dest = c.path("/opt/tenbox-tests")
        src = host.debs.source  # the snapshot the package was built from
        shutil.copytree(src / "tests", dest / "tests", ignore=shutil.ignore_patterns(
            "packaging", "integration", "__pycache__", "out", "*.pyc"))
        shutil.copy2(src / "pyproject.toml", dest / "pyproject.toml")
        for folder in ("systemd", "debian", "scripts"):  # the unit tests of units and maintainer scripts read them
            shutil.copytree(src / folder, dest / folder)
        where = c.run("cd /opt/tenbox-tests && python3 -c 'import tenbox_vmm; print(tenbox_vmm.__file__)'")
        assert where.stdout.strip() == "/usr/lib/python3/dist-packages/tenbox_vmm/__init__.py"
        # --continue-on-collection-errors: a module this python3-* cannot import fails
        # the step, but the rest still runs and shows what else works there.
        r = c.run("cd /opt/tenbox-tests && python3 -m pytest -q -ra -p no:cacheprovider "
                  "--continue-on-collection-errors tests/unit", check=False, timeout=900, step="unit tests")
        (host.logs / "unit-tests.log").write_text(r.stdout + r.stderr)
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        RESULTS.setdefault(host.suite, {})["tests/unit"] = summary
        assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
        assert "skipped" not in summary and "xfail" not in summary, summary

    def test_reinstall_changes_nothing_and_starts_nothing(self, host):
        c = host.chroot
        c.clear_standin_log()
        c.run("apt-get install -y -qq --reinstall tenbox", step="reinstall")
        assert tenboxd_calls(host) == []
        assert c.run("getent passwd tenbox").returncode == 0
        audit_clean(host)

    def test_systemd_analyze_verify_accepts_the_unit_with_this_systemd(self, host):
        c = host.chroot
        c.run("apt-get install -y -qq --no-install-recommends systemd", step="systemd install")
        r = c.run("systemd-analyze verify --man=no /lib/systemd/system/tenboxd.service", check=False)
        # /bin/systemctl: the real one, not the stand-in earlier on PATH.
        RESULTS.setdefault(host.suite, {})["systemd"] = c.run("/bin/systemctl --version").stdout.split("\n")[0]
        assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr

    def test_upgrade_tells_the_daemon_then_restarts_it(self, host):
        """A newer version in the repository: postinst sets the modes older versions left (world-
        readable disks and consoles), notifies the running tenboxd, then restarts the unit."""
        c = host.chroot
        start_daemon(host)
        old_vm = plant_old_modes(host)
        c.simulate_systemd(True)
        c.clear_standin_log()
        try:
            host.repo.publish([host.debs.old, host.debs.new])
            c.run("apt-get update -qq", step="upgrade")
            r = c.run("apt-get install -y -qq --only-upgrade --no-install-recommends tenbox", step="upgrade")
        finally:
            c.simulate_systemd(False)
            stop_daemon(host)
        # dpkg's maintainer scripts write to apt's stdout or stderr depending on apt's version.
        err = r.stdout + "\n" + r.stderr
        notice = re.search(r"tenbox: tenboxd (acknowledged|did not acknowledge) the upgrade to %s"
                           % re.escape(host.debs.v2), err)
        restart = err.find("restart tenboxd.service")
        assert notice and restart > notice.start(), (err, host.chroot.standin_calls())
        RESULTS.setdefault(host.suite, {})["upgrade notice"] = notice.group(1)
        calls = tenboxd_calls(host)
        assert "--system daemon-reload" in calls
        assert calls[-1].endswith("restart tenboxd.service") and not any(" start " in x for x in calls), calls
        assert c.run("tenboxd --version").stdout.strip() == "tenboxd %s" % host.debs.v2
        check_modes(host, old_vm)
        shutil.rmtree(str(old_vm))
        audit_clean(host)
        start_daemon(host)
        try:
            assert json.loads(c.run("tenbox system info --json").stdout)["version"] == host.debs.v2
        finally:
            stop_daemon(host)

    def test_maintainer_scripts_survive_every_abort_path(self, host):
        """failed-upgrade, abort-* and a repeated configure: exit 0, touch nothing, start nothing."""
        c = host.chroot
        v1, v2 = host.debs.v1, host.debs.v2
        info = "/var/lib/dpkg/info/tenbox."
        c.clear_standin_log()
        for call in ("postinst abort-upgrade %s" % v1, "postinst abort-remove", "postinst abort-deconfigure %s" % v1,
                     "prerm upgrade %s" % v2, "prerm failed-upgrade %s" % v1, "prerm deconfigure in-favour x 1",
                     "postrm upgrade %s" % v2, "postrm failed-upgrade %s" % v1, "postrm abort-upgrade %s" % v1,
                     "postrm abort-install", "postinst configure %s" % v2, "postinst configure %s" % v2):
            c.run(info + call)
        for script in ("postinst", "prerm", "postrm"):
            assert c.run(info + script + " no-such-action", check=False).returncode == 1
        assert tenboxd_calls(host) == []
        assert c.run("getent passwd tenbox").returncode == 0
        assert c.run("dpkg-query -W -f='${db:Status-Abbrev}' tenbox").stdout.strip() == "ii"
        audit_clean(host)

    def test_remove_stops_and_disables_and_keeps_the_configuration(self, host):
        c = host.chroot
        c.simulate_systemd(True)
        c.clear_standin_log()
        try:
            c.run("apt-get remove -y -qq tenbox", step="remove")
        finally:
            c.simulate_systemd(False)
        calls = tenboxd_calls(host)
        assert any(x.endswith("stop tenboxd.service") for x in calls), calls
        assert not c.path("/etc/systemd/system/multi-user.target.wants/tenboxd.service").is_symlink()
        assert not c.path("/usr/bin/tenboxd").exists() and not c.path("/lib/systemd/system/tenboxd.service").exists()
        assert c.path("/etc/tenbox/tenboxd.env").exists()
        assert c.run("dpkg-query -W -f='${db:Status-Abbrev}' tenbox").stdout.strip() == "rc"
        assert not list(c.path("/usr/lib/python3/dist-packages").glob("tenbox*"))
        audit_clean(host)

    def test_purge_removes_config_and_user_and_keeps_operator_data(self, host):
        c = host.chroot
        r = c.run("apt-get purge -y -qq tenbox", step="purge")
        out = r.stdout + r.stderr  # maintainer scripts' stderr reaches apt's stdout or stderr
        assert not c.path("/etc/tenbox").exists() and not c.path("/run/tenbox").exists()
        assert c.run("getent passwd tenbox", check=False).returncode == 2
        assert c.run("getent passwd tenbox-vm", check=False).returncode == 2
        assert c.run("getent group tenbox-vm", check=False).returncode == 2
        # The operator is still a member: the group stays (delgroup --only-if-empty), and postrm says so.
        assert OPERATOR in c.run("getent group tenbox").stdout and "kept the tenbox group" in out, out
        assert c.path("/var/lib/tenbox").is_dir() and "kept /var/lib/tenbox" in out
        assert c.run("dpkg-query -W -f='${db:Status-Abbrev}' tenbox", check=False).stdout.strip() in ("", "un")
        assert leftovers(host) == []
        audit_clean(host)

    def test_a_fresh_install_starts_nothing_and_purge_removes_an_empty_group(self, host):
        c = host.chroot
        c.run("gpasswd -d %s tenbox" % OPERATOR)
        c.simulate_systemd(True)
        c.clear_standin_log()
        try:
            c.run("apt-get install -y -qq --no-install-recommends tenbox", step="fresh install")
            assert [x for x in tenboxd_calls(host) if "daemon-reload" not in x] == []
            assert c.run("getent group tenbox").returncode == 0 and c.run("getent passwd tenbox").returncode == 0
            c.run("apt-get purge -y -qq tenbox", step="purge")
        finally:
            c.simulate_systemd(False)
        assert c.run("getent group tenbox", check=False).returncode == 2
        assert c.run("getent passwd tenbox", check=False).returncode == 2
        assert leftovers(host) == []
        audit_clean(host)
