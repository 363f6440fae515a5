"""The tenbox .deb as built: lintian-clean, the right fields and files, a unit systemd accepts (tests; root for apt)."""

from __future__ import annotations

import configparser
import filecmp
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging.build import REPO

TIMEOUT_SEC = 300
# Every distribution in the seed has these (docs/packaging.md, "Dependencies").
EXPECTED_DEPENDS = {
    "ca-certificates", "libslirp0", "python3-apt", "python3-cffi-backend", "python3-click",
    "python3-msgpack", "python3-psutil", "python3-sdnotify", "python3-seccomp", "python3-tenacity",
    "python3-websockets", "python3-zmq", "python3:any",
}
COMMANDS = ["tenboxd", "tenboxctl", "tenbox", "tenbox-vm-runtime"]


def _run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_SEC, **kw)


@pytest.fixture(scope="module")
def unpacked(debs, tmp_path_factory):
    root = tmp_path_factory.mktemp("unpacked")
    _run(["dpkg-deb", "-x", str(debs.old), str(root)], check=True)
    control = root / "DEBIAN"
    _run(["dpkg-deb", "-e", str(debs.old), str(control)], check=True)
    return root


def _field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name], check=True).stdout.strip()


def _names(relation: str):
    return {alt.strip().split()[0] for dep in relation.split(",") if dep.strip() for alt in dep.split("|")}


def test_lintian_reports_no_errors_and_no_warnings(debs):
    """lintian has nothing above "info" to say; the one info tag is overridden with its reason."""
    r = _run(["lintian", "--fail-on", "error,warning", "--display-info", "--show-overrides", str(debs.old)])
    tags = [line for line in r.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert r.returncode == 0 and not tags, r.stdout + r.stderr


def test_control_fields_say_one_architecture_independent_package(debs):
    """Architecture all, section admin, Pre-Depends adduser, and Depends that every seed distribution has."""
    deb = debs.old
    assert _field(deb, "Package") == "tenbox"
    assert _field(deb, "Version") == debs.v1
    assert _field(deb, "Architecture") == "all"
    assert _field(deb, "Section") == "admin"
    assert _names(_field(deb, "Pre-Depends")) == {"adduser"}
    assert _names(_field(deb, "Suggests")) == {"debootstrap", "dosfstools", "fdisk", "qemu-utils", "python3-zstandard",
                                               "qemu-user-static"}
    assert _names(_field(deb, "Recommends")) == {"e2fsprogs", "grub-common", "python3-libfdt", "xorriso"}
    depends = _names(_field(deb, "Depends"))
    assert depends == EXPECTED_DEPENDS
    # ABI mode only: no compiler or pycparser on the host (python3-cffi), and
    # python3-zstandard is missing in Debian 11 and Ubuntu 20.04/22.04.
    assert "python3-cffi" not in depends and "python3-zstandard" not in depends
    assert re.search(r"python3:any \(>= 3\.8", _field(deb, "Depends"))


def test_commands_run_debians_python3_and_the_preparsed_ffi_is_shipped(unpacked):
    for name in COMMANDS:
        path = unpacked / "usr" / "bin" / name
        assert path.stat().st_mode & 0o111, name
        assert path.read_text().splitlines()[0] == "#!/usr/bin/python3 -s", name
    assert list(unpacked.glob("usr/lib/python3/dist-packages/tenbox_vmm/kvm/_kvm_ffi.py"))
    assert not list(unpacked.rglob("*.pyc")), "bytecode is made on the host by py3compile"
    assert not (unpacked / "usr" / "local").exists()
    assert not (unpacked / "etc").exists(), "tenboxd.env is the installer's (and the operator's), not a conffile"
    assert (unpacked / "usr" / "lib" / "tenbox" / "update-notify").stat().st_mode & 0o111
    # One script for every architecture (--arch): not in a folder of one.
    assert (unpacked / "usr" / "lib" / "tenbox" / "scripts" / "make-rootfs-debian.sh").stat().st_mode & 0o111
    assert not (unpacked / "usr" / "lib" / "tenbox" / "scripts" / "x86_64").exists()
    for page in ("tenboxd", "tenbox", "tenboxctl", "tenbox-vm-runtime"):
        assert (unpacked / "usr" / "share" / "man" / "man1" / (page + ".1.gz")).exists(), page


def test_shell_completion_scripts_are_installed_for_both_names(unpacked):
    """bash-completion's and zsh's folders hold click's scripts for tenbox and tenboxctl (tests/integration/test_cli_completion.py runs them)."""
    for prog in ("tenbox", "tenboxctl"):
        bash = (unpacked / "usr" / "share" / "bash-completion" / "completions" / prog).read_text()
        assert "complete -o nosort -F _%s_completion %s" % (prog, prog) in bash
        assert "_%s_COMPLETE=bash_complete" % prog.upper() in bash
        zsh = (unpacked / "usr" / "share" / "zsh" / "vendor-completions" / ("_" + prog)).read_text()
        assert zsh.startswith("#compdef %s\n" % prog)


def test_the_packaged_unit_is_systemd_tenboxd_service(unpacked):
    assert filecmp.cmp(unpacked / "lib" / "systemd" / "system" / "tenboxd.service",
                       REPO / "systemd" / "tenboxd.service", shallow=False)


def test_systemd_analyze_verify_accepts_the_unit(unpacked, tmp_path):
    """`systemd-analyze verify` against a root holding the package's files and systemd's own units."""
    root = tmp_path / "root"
    shutil.copytree(unpacked, root, symlinks=True, ignore=shutil.ignore_patterns("DEBIAN"))
    units = root / "usr" / "lib" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in Path("/lib/systemd/system").iterdir():
        if unit.is_file() and not (units / unit.name).exists():
            shutil.copy2(unit, units / unit.name)
    shutil.copy2(root / "lib" / "systemd" / "system" / "tenboxd.service", units / "tenboxd.service")
    r = _run(["systemd-analyze", "verify", "--man=no", "--root=%s" % root, "tenboxd.service"])
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


def _unit():
    text = (REPO / "systemd" / "tenboxd.service").read_text()
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    cp.read_string(text)
    return text, cp


def test_unit_keeps_vms_and_apt_alive_across_restarts():
    """KillMode=process, workers' run dir preserved, notify with watchdog, no ${VAR} arguments."""
    text, cp = _unit()
    s = cp["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and s["WatchdogSec"]
    assert s["KillMode"] == "process"
    assert s["Restart"] == "on-failure"
    assert s["ExecStart"] == "/usr/bin/tenboxd"
    # Both files, the operator's /etc/default/tenbox last (the parser keeps only the last one).
    files = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("EnvironmentFile=")]
    assert files == ["-/etc/tenbox/tenboxd.env", "-/etc/default/tenbox"]
    assert s["Environment"] == "TENBOX_SOCKET_GROUP=tenbox"
    assert (s["RuntimeDirectory"], s["RuntimeDirectoryMode"], s["RuntimeDirectoryPreserve"]) == ("tenbox", "0755", "yes")
    assert (s["StateDirectory"], s["StateDirectoryMode"]) == ("tenbox", "0750")  # docs/security.md
    assert s["DeviceAllow"] == "/dev/kvm rw" and s["DevicePolicy"] == "closed"
    # Inherited by apt-get in a --scope: these would break dpkg (docs/packaging.md).
    for forbidden in ("ProtectSystem", "PrivateTmp", "PrivateDevices", "ProtectKernelModules", "RestrictSUIDSGID",
                      "SystemCallFilter", "CapabilityBoundingSet", "MemoryDenyWriteExecute", "UMask",
                      "ProtectHostname", "User"):
        assert forbidden not in s, forbidden
    assert cp["Install"]["WantedBy"] == "multi-user.target"


def test_every_unit_directive_says_why():
    """Each directive has its own comment right above it (STYLE.md: comments say the operational why)."""
    text, _ = _unit()
    self_explaining = ("Description=", "Documentation=", "WantedBy=")
    prev = ""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and not line.startswith(self_explaining):
            assert prev.startswith("#"), "no comment above %r" % line
        prev = line


def test_shell_scripts_are_posix_and_shellcheck_clean(unpacked):
    scripts = [unpacked / "DEBIAN" / s for s in ("postinst", "prerm", "postrm")]
    scripts += [REPO / "scripts" / "install-linux.sh", REPO / "debian" / "make-manpages"]
    for script in scripts:
        assert _run(["dash", "-n", str(script)]).returncode == 0, script
    r = _run(["shellcheck", "-s", "sh"] + [str(s) for s in scripts])
    assert r.returncode == 0, r.stdout + r.stderr


def test_building_leaves_the_source_tree_clean(debs):
    """dpkg-buildpackage ran in a copy: no build output appears in the tree."""
    for leftover in ("debian/tenbox", "debian/.debhelper", "debian/files", "debian/debhelper-build-stamp",
                     "debian/man", ".pybuild", "build"):
        assert not (REPO / leftover).exists(), leftover
    assert not list(REPO.glob("*.egg-info"))
