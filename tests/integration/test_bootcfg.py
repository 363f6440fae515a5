"""Default boot entries from grub.cfg and BLS files that Debian's own tools write (tests; root or user namespaces).

The real files come from Debian's packages, made fresh each session by the
`debian_boot` fixture; the downloads are cached in .cache/bootcfg/:

- `apt-get download` grub-common (the /etc/grub.d scripts, grub-mkconfig_lib,
  grub-script-check), grub2-common (Debian's /etc/default/grub as installed),
  systemd (kernel-install and 90-loaderentry.install, 252 in bookworm: shell
  scripts) and libdevmapper1.02.1 (grub-script-check links it); `dpkg-deb -x`.
- grub.cfg: what grub-mkconfig does, step by step (`_GRUB_DRIVER`): probe the
  devices, source Debian's /etc/default/grub, /etc/default/grub.d/*.cfg and the
  scenario's settings, export the variables grub-mkconfig exports, run every
  /etc/grub.d script in order between its "### BEGIN/END" lines; the first
  test checks each result with grub-script-check, as grub-mkconfig does before
  it installs one. Only grub-probe and grub-mkrelpath need real
  devices: grub-mkconfig_lib takes them from the `grub_probe` and
  `grub_mkrelpath` environment variables when set, and two small shell shims
  (`_GRUB_PROBE`, `_GRUB_MKRELPATH`) answer for an imaginary GPT disk: the root
  file system on /dev/vda1, and /boot on /dev/vda2 when it is separate.
  10_linux looks for kernels at /boot/vmlinuz-*, a path it does not let us
  change, so the scripts run in a private mount namespace (unshare; as a
  user, in a user namespace too) with a tree of empty vmlinuz-*/initrd.img-*
  files mounted on /boot. Nothing outside the namespace sees it. (The kernel
  lines say root=/dev/vda1, not root=UUID=...: 10_linux uses the UUID only
  when /dev/disk/by-uuid/UUID exists on the machine running it.)
- BLS: kernel-install from the systemd package, with only its
  90-loaderentry.install plugin and layout=bls, installs empty kernels into a
  $BOOT_ROOT that is a tmpfs in a private mount namespace (the plugin names
  files relative to the mount point of $BOOT_ROOT, as on a real /boot or ESP).

Needs root or unprivileged user namespaces (Debian's default), and Debian's
mirror the first time. Every expectation below is what the test put in: the
kernels in /boot, the UUIDs the shim answers, GRUB_CMDLINE_LINUX*.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

from tenbox_vmm.bootcfg import (
    MAX_CONFIG_CHARS,
    MAX_ENTRIES,
    BootConfigError,
    BootEntry,
    compare_versions,
    default_bls_entry,
    default_grub_entry,
    glob_match,
)
from tests.framework.process import run_tool
from tests.framework.repo import CACHE

CACHE_DIR = CACHE / "bootcfg"
PACKAGES = ("grub-common", "grub2-common", "systemd", "libdevmapper1.02.1")
APT_TIMEOUT_SEC = 600.0
TOOL_TIMEOUT_SEC = 120.0
HOSTILE_SEC = 10.0  # a hostile input is refused well within this (each takes < 1 s here)
SANE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

ROOT_UUID = "0e8f6d52-4b1c-4a3e-9d2b-6f1a7c3e5b90"
BOOT_UUID = "5d1c2b3a-9e8f-4a7b-8c6d-1e2f3a4b5c6d"
NEW, OLD = "6.1.0-28-cloud-amd64", "6.1.0-9-cloud-amd64"
MACHINE_ID = "6a9857a393724b7a981ebb5b8495b9ea"
BLS_CMDLINE = "root=UUID=%s ro console=ttyS0,115200" % ROOT_UUID
# Debian's cloud images set these in /etc/default/grub.d/ (debian-cloud-images, 15_debian-cloud.cfg).
CLOUD_CMDLINE = "console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
CLOUD_SETTINGS = """GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="%s"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_TIMEOUT=0
""" % CLOUD_CMDLINE

# grub-probe for an imaginary GPT disk: / on /dev/vda1, /boot on /dev/vda2 when BOOT_SEPARATE=1.
_GRUB_PROBE = r"""#!/bin/sh
target= device=
while [ $# -gt 0 ]; do
  case "$1" in
    --target=*) target=${1#--target=} ;;
    -t|--target) shift; target=$1 ;;
    -d|--device) ;;
    /dev/*) device=$1 ;;
    /boot|/boot/*) if [ "$BOOT_SEPARATE" = 1 ]; then device=/dev/vda2; else device=/dev/vda1; fi ;;
    *) device=/dev/vda1 ;;
  esac
  shift
done
case "$device" in /dev/vda2) n=2 uuid=@BOOT_UUID@ ;; *) n=1 uuid=@ROOT_UUID@ ;; esac
case "$target" in
  device) echo "$device" ;;
  fs) echo ext2 ;;
  fs_uuid) echo "$uuid" ;;
  partmap) echo gpt ;;
  abstraction|cryptodisk_uuid) ;;
  compatibility_hint) echo "hd0,gpt$n" ;;
  hints_string) echo "--hint-bios=hd0,gpt$n --hint-efi=hd0,gpt$n --hint-baremetal=ahci0,gpt$n" ;;
  drive) echo "(hd0,gpt$n)" ;;
  *) echo "grub-probe shim: no answer for --target=$target" >&2; exit 1 ;;
esac
""".replace("@ROOT_UUID@", ROOT_UUID).replace("@BOOT_UUID@", BOOT_UUID)

# grub-mkrelpath: a path relative to the root of its file system, no trailing "/" (so a root is "").
_GRUB_MKRELPATH = r"""#!/bin/sh
p=$1
case "$p" in
  /boot|/boot/*) if [ "$BOOT_SEPARATE" = 1 ]; then p=${p#/boot}; fi ;;
esac
echo "${p%/}"
"""

# grub-mkconfig 2.06 (usr/sbin/grub-mkconfig in grub-common), its steps in order, run in the mount namespace.
_GRUB_DRIVER = r"""
mount --bind "$FAKE_BOOT" /boot
GRUB_DEVICE="`${grub_probe} --target=device /`"
GRUB_DEVICE_UUID="`${grub_probe} --device ${GRUB_DEVICE} --target=fs_uuid 2> /dev/null`" || true
GRUB_DEVICE_PARTUUID="`${grub_probe} --device ${GRUB_DEVICE} --target=partuuid 2> /dev/null`" || true
GRUB_DEVICE_BOOT="`${grub_probe} --target=device /boot`"
GRUB_DEVICE_BOOT_UUID="`${grub_probe} --device ${GRUB_DEVICE_BOOT} --target=fs_uuid 2> /dev/null`" || true
GRUB_DISABLE_OS_PROBER="true"
GRUB_FS="`${grub_probe} --device ${GRUB_DEVICE} --target=fs 2> /dev/null || echo unknown`"
GRUB_EARLY_INITRD_LINUX_STOCK="intel-uc.img intel-ucode.img amd-uc.img amd-ucode.img early_ucode.cpio microcode.cpio"
. "$GRUB_ROOT/usr/share/grub/default/grub"
for x in "$GRUB_ROOT"/etc/default/grub.d/*.cfg "$SCENARIO_CFG"; do . "$x"; done
if [ "x${GRUB_TERMINAL}" != "x" ] ; then
  GRUB_TERMINAL_INPUT="${GRUB_TERMINAL}"
  GRUB_TERMINAL_OUTPUT="${GRUB_TERMINAL}"
fi
if [ "x${GRUB_TERMINAL_OUTPUT}" = "x" ]; then GRUB_TERMINAL_OUTPUT=gfxterm; fi
GRUB_ACTUAL_DEFAULT="$GRUB_DEFAULT"
# saved: grub-mkconfig asks grub-editenv for saved_entry; the fake /boot has no grubenv.
if [ "x${GRUB_ACTUAL_DEFAULT}" = "xsaved" ] ; then GRUB_ACTUAL_DEFAULT= ; fi
if [ "x${GRUB_RECOVERY_TITLE}" = "x" ]; then GRUB_RECOVERY_TITLE="recovery mode"; fi
export GRUB_DEVICE GRUB_DEVICE_UUID GRUB_DEVICE_PARTUUID GRUB_DEVICE_BOOT GRUB_DEVICE_BOOT_UUID \
  GRUB_DISABLE_OS_PROBER GRUB_FS GRUB_FONT GRUB_PRELOAD_MODULES GRUB_ACTUAL_DEFAULT
export GRUB_DEFAULT GRUB_HIDDEN_TIMEOUT GRUB_HIDDEN_TIMEOUT_QUIET GRUB_TIMEOUT GRUB_TIMEOUT_STYLE \
  GRUB_DEFAULT_BUTTON GRUB_HIDDEN_TIMEOUT_BUTTON GRUB_TIMEOUT_BUTTON GRUB_TIMEOUT_STYLE_BUTTON \
  GRUB_BUTTON_CMOS_ADDRESS GRUB_BUTTON_CMOS_CLEAN GRUB_DISTRIBUTOR GRUB_CMDLINE_LINUX GRUB_CMDLINE_LINUX_DEFAULT \
  GRUB_CMDLINE_XEN GRUB_CMDLINE_XEN_DEFAULT GRUB_CMDLINE_LINUX_XEN_REPLACE GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT \
  GRUB_CMDLINE_NETBSD GRUB_CMDLINE_NETBSD_DEFAULT GRUB_CMDLINE_GNUMACH GRUB_EARLY_INITRD_LINUX_CUSTOM \
  GRUB_EARLY_INITRD_LINUX_STOCK GRUB_TERMINAL_INPUT GRUB_TERMINAL_OUTPUT GRUB_SERIAL_COMMAND GRUB_DISABLE_UUID \
  GRUB_DISABLE_LINUX_UUID GRUB_DISABLE_LINUX_PARTUUID GRUB_DISABLE_RECOVERY GRUB_VIDEO_BACKEND GRUB_GFXMODE \
  GRUB_BACKGROUND GRUB_THEME GRUB_GFXPAYLOAD_LINUX GRUB_INIT_TUNE GRUB_SAVEDEFAULT GRUB_ENABLE_CRYPTODISK \
  GRUB_BADRAM GRUB_OS_PROBER_SKIP_LIST GRUB_DISABLE_SUBMENU GRUB_RECORDFAIL_TIMEOUT GRUB_RECOVERY_TITLE
printf '#\n# DO NOT EDIT THIS FILE\n#\n# It is automatically generated by grub-mkconfig using templates\n'
printf '# from /etc/grub.d and settings from /etc/default/grub\n#\n'
for i in "$GRUB_ROOT"/etc/grub.d/*; do
  case "$i" in
    # sources /usr/share/grub/grub-mkconfig_lib by its absolute path (an installed grub); colours only
    */05_debian_theme) continue ;;
  esac
  if [ -f "$i" ] && [ -x "$i" ]; then
    echo
    echo "### BEGIN /etc/grub.d/${i##*/} ###"
    "$i"
    echo "### END /etc/grub.d/${i##*/} ###"
  fi
done
"""

# kernel-install 252 with its loader-entry plugin, into a tmpfs $BOOT_ROOT; tries=3 for the newest kernel.
_BLS_DRIVER = r"""
mount -t tmpfs -o mode=0755 tenbox-test "$BOOT_ROOT"
for v in "$OLD" "$NEW"; do
  /bin/sh "$SYSTEMD_ROOT/usr/bin/kernel-install" add "$v" "$SRC/vmlinuz-$v" "$SRC/initrd.img-$v"
done
echo 3 > "$KERNEL_INSTALL_CONF_ROOT/tries"
/bin/sh "$SYSTEMD_ROOT/usr/bin/kernel-install" add "$NEWEST" "$SRC/vmlinuz-$NEWEST" "$SRC/initrd.img-$NEWEST"
cp -R "$BOOT_ROOT/." "$OUT/"
"""
NEWEST = "6.1.0-31-cloud-amd64"


class Scenario(NamedTuple):
    kernels: List[str]
    settings: str  # the scenario's /etc/default/grub.d file
    early: bool = False  # an amd-ucode.img early initrd beside the kernels
    separate_boot: bool = False


def _init_entries_per_kernel() -> int:
    """10_linux adds one entry per init system installed beside the one /sbin/init is (SUPPORTED_INITS)."""
    init = os.path.realpath("/sbin/init")
    return sum(1 for path in ("/lib/sysvinit/init", "/lib/systemd/systemd", "/sbin/upstart")
               if os.access(path, os.X_OK) and os.path.realpath(path) != init)


# Entries per kernel in "Advanced options": the kernel, other inits, recovery mode.
PER_KERNEL = 2 + _init_entries_per_kernel()
ADVANCED = "gnulinux-advanced-%s" % ROOT_UUID

SCENARIOS: Dict[str, Scenario] = {
    "one-kernel": Scenario([NEW], 'GRUB_DISTRIBUTOR=Debian\n'),  # Debian's /etc/default/grub as installed
    "two-kernels": Scenario([NEW, OLD], "GRUB_DISTRIBUTOR=Debian\n" + CLOUD_SETTINGS, early=True),
    "separate-boot": Scenario([NEW, OLD], "GRUB_DISTRIBUTOR=Debian\n" + CLOUD_SETTINGS, separate_boot=True),
    "saved": Scenario([NEW, OLD], "GRUB_DISTRIBUTOR=Debian\nGRUB_DEFAULT=saved\nGRUB_SAVEDEFAULT=true\n"
                      + CLOUD_SETTINGS),
    "submenu-old": Scenario([NEW, OLD], 'GRUB_DISTRIBUTOR=Debian\nGRUB_DEFAULT="1>%d"\n' % PER_KERNEL
                            + CLOUD_SETTINGS),
    "submenu-recovery": Scenario([NEW, OLD], 'GRUB_DISTRIBUTOR=Debian\nGRUB_DEFAULT="1>%d"\n' % (PER_KERNEL - 1)
                                 + CLOUD_SETTINGS),
    "by-id": Scenario([NEW, OLD], 'GRUB_DISTRIBUTOR=Debian\nGRUB_DEFAULT="%s>gnulinux-%s-advanced-%s"\n'
                      % (ADVANCED, OLD, ROOT_UUID) + CLOUD_SETTINGS),
    "old-title": Scenario([NEW, OLD], 'GRUB_DISTRIBUTOR=Debian\nGRUB_DEFAULT="Debian GNU/Linux, with Linux %s"\n'
                          % OLD + CLOUD_SETTINGS),
    "flat": Scenario([NEW, OLD], "GRUB_DISTRIBUTOR=Debian\nGRUB_DISABLE_SUBMENU=y\nGRUB_DEFAULT=%d\n" % PER_KERNEL
                     + CLOUD_SETTINGS),
}


class DebianBoot(NamedTuple):
    grub: Dict[str, str]  # scenario -> grub.cfg
    bls: Dict[str, str]  # /loader/entries/NAME -> text
    script_check: List[str]  # argv of grub-script-check, file to follow
    script_env: Dict[str, str]


# -- the fixture --------------------------------------------------------------------------------------------------

def _run(argv: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
         timeout: float = TOOL_TIMEOUT_SEC) -> subprocess.CompletedProcess:
    r = run_tool(argv, timeout, cwd=cwd, env=env)
    said = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, "%s exited %d:\n%s" % (" ".join(argv), r.returncode, said)
    return r


def _downloaded() -> List[Path]:
    """The .deb files of PACKAGES in the cache, downloaded with apt-get the first time."""
    debs = CACHE_DIR / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_", 1)[0]: p for p in debs.glob("*.deb")}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        tmp = Path(str(debs) + ".part-%d" % os.getpid())
        shutil.rmtree(str(tmp), ignore_errors=True)
        tmp.mkdir()
        argv = ["apt-get", "download"] + missing
        r = run_tool(argv, APT_TIMEOUT_SEC, cwd=tmp)
        if r.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
            _run(["apt-get", "update"], timeout=APT_TIMEOUT_SEC)
            r = run_tool(argv, APT_TIMEOUT_SEC, cwd=tmp)
        assert r.returncode == 0, "apt-get download %s failed (Debian's mirror is needed once):\n%s" % (
            " ".join(missing), r.stderr[-2000:])
        for p in tmp.glob("*.deb"):
            os.replace(str(p), str(debs / p.name))
        shutil.rmtree(str(tmp), ignore_errors=True)
        have = {p.name.split("_", 1)[0]: p for p in debs.glob("*.deb")}
    return [have[p] for p in PACKAGES]


def _extracted(debs: List[Path]) -> Path:
    """The packages unpacked with dpkg-deb -x, once per set of .deb files."""
    key = hashlib.sha256("\n".join(sorted(p.name for p in debs)).encode()).hexdigest()[:16]
    root = CACHE_DIR / ("root-" + key)
    if not (root / ".complete").exists():
        tmp = Path(str(root) + ".part-%d" % os.getpid())
        shutil.rmtree(str(tmp), ignore_errors=True)
        tmp.mkdir(parents=True)
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        (tmp / ".complete").write_text("\n".join(p.name for p in debs) + "\n")
        shutil.rmtree(str(root), ignore_errors=True)
        os.replace(str(tmp), str(root))
    return root


def _namespace(script: str, env: Dict[str, str]) -> str:
    """Run `script` with /bin/sh -e in a private mount namespace (a user namespace too when not root)."""
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    r = run_tool(unshare + ["--", "/bin/sh", "-ec", script], TOOL_TIMEOUT_SEC, env=env)
    assert r.returncode == 0, ("%s failed (%d): this test needs root or user namespaces\n%s"
                               % (" ".join(unshare), r.returncode, r.stderr[-3000:]))
    return r.stdout


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _grub_cfg(root: Path, work: Path, name: str, scenario: Scenario) -> str:
    boot = work / name / "boot"
    boot.mkdir(parents=True)
    for v in scenario.kernels:
        (boot / ("vmlinuz-" + v)).write_bytes(b"")
        (boot / ("initrd.img-" + v)).write_bytes(b"")
    if scenario.early:
        (boot / "amd-ucode.img").write_bytes(b"")
    cfg = work / name / "50-scenario.cfg"
    cfg.write_text(scenario.settings)
    env = {
        "PATH": SANE_PATH, "LC_ALL": "C", "FAKE_BOOT": str(boot), "GRUB_ROOT": str(root),
        "SCENARIO_CFG": str(cfg), "pkgdatadir": str(root / "usr/share/grub"),
        "grub_probe": str(work / "grub-probe"), "grub_mkrelpath": str(work / "grub-mkrelpath"),
        "BOOT_SEPARATE": "1" if scenario.separate_boot else "0",
    }
    text = _namespace(_GRUB_DRIVER, env)
    (work / name / "grub.cfg").write_text(text)
    return text


@pytest.fixture(scope="session")
def debian_boot(tmp_path_factory) -> DebianBoot:
    root = _extracted(_downloaded())
    work = tmp_path_factory.mktemp("bootcfg")
    _executable(work / "grub-probe", _GRUB_PROBE)
    _executable(work / "grub-mkrelpath", _GRUB_MKRELPATH)
    grub = {name: _grub_cfg(root, work, name, s) for name, s in SCENARIOS.items()}

    src, conf, esp, out = (work / "bls" / d for d in ("src", "conf", "esp", "out"))
    for d in (src, conf, esp, out):
        d.mkdir(parents=True)
    for v in (OLD, NEW, NEWEST):
        (src / ("vmlinuz-" + v)).write_bytes(b"")
        (src / ("initrd.img-" + v)).write_bytes(b"")
    (conf / "install.conf").write_text("layout=bls\n")
    (conf / "cmdline").write_text(BLS_CMDLINE + "\n")
    _namespace(_BLS_DRIVER, {
        "PATH": SANE_PATH, "LC_ALL": "C", "TMPDIR": str(work), "SYSTEMD_ROOT": str(root), "SRC": str(src),
        "OUT": str(out), "OLD": OLD, "NEW": NEW, "NEWEST": NEWEST, "MACHINE_ID": MACHINE_ID,
        "BOOT_ROOT": str(esp), "KERNEL_INSTALL_CONF_ROOT": str(conf),
        "KERNEL_INSTALL_PLUGINS": str(root / "usr/lib/kernel/install.d/90-loaderentry.install"),
    })
    bls_dir = out / "loader" / "entries"
    bls = {"/loader/entries/" + p.name: p.read_text() for p in sorted(bls_dir.glob("*.conf"))}
    libs = [str(root / "lib/x86_64-linux-gnu"), str(root / "usr/lib/x86_64-linux-gnu")]
    return DebianBoot(grub, bls, [str(root / "usr/bin/grub-script-check")],
                      {"PATH": SANE_PATH, "LD_LIBRARY_PATH": ":".join(libs)})


def _script_check(boot: DebianBoot, text: str, tmp_path: Path) -> bool:
    """What grub-script-check (GRUB's own parser, as grub-mkconfig runs it) says of `text`."""
    path = tmp_path / "check.cfg"
    path.write_text(text)
    r = run_tool(boot.script_check + [str(path)], TOOL_TIMEOUT_SEC, env=boot.script_env)
    assert "error while loading shared libraries" not in r.stderr, r.stderr
    return r.returncode == 0


def _os_release() -> Dict[str, str]:
    """The host's os-release, which 90-loaderentry.install puts in the title and sort-key."""
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if os.path.exists(path):
            out = {}
            for line in Path(path).read_text().splitlines():
                key, eq, value = line.partition("=")
                if eq and not key.startswith("#"):
                    out[key.strip()] = " ".join(shlex.split(value))
            return out
    return {}


# -- grub.cfg from Debian's grub-mkconfig scripts -----------------------------------------------------------------

def _assert_entry(e: BootEntry, kernel: str, options: str, initrds: List[str], uuid: str = ROOT_UUID,
                  title: Optional[str] = None) -> None:
    assert (e.kernel, e.initrds, e.options, e.root_uuid) == (kernel, initrds, options, uuid)
    if title is not None:
        assert e.title == title


def test_every_generated_grub_cfg_is_valid_for_grubs_own_parser(debian_boot, tmp_path):
    """The fixture made what grub-mkconfig would install: grub-script-check accepts each config."""
    for name, text in debian_boot.grub.items():
        assert "### BEGIN /etc/grub.d/10_linux ###" in text, name
        assert _script_check(debian_boot, text, tmp_path), name


def test_one_kernel_with_debians_default_settings_boots_it_with_quiet(debian_boot):
    """Debian's /etc/default/grub as installed (quiet, gfxterm): entry 0 is the simple entry of the kernel."""
    e = default_grub_entry(debian_boot.grub["one-kernel"])
    _assert_entry(e, "/boot/vmlinuz-" + NEW, "root=/dev/vda1 ro quiet", ["/boot/initrd.img-" + NEW],
                  title="Debian GNU/Linux")


def test_two_kernels_boot_the_newest_with_the_early_microcode_initrd_first(debian_boot):
    """Entry 0 is the newest kernel (10_linux sorts with dpkg); initrd lists amd-ucode.img before the initrd."""
    e = default_grub_entry(debian_boot.grub["two-kernels"])
    _assert_entry(e, "/boot/vmlinuz-" + NEW, "root=/dev/vda1 ro " + CLOUD_CMDLINE,
                  ["/boot/amd-ucode.img", "/boot/initrd.img-" + NEW], title="Debian GNU/Linux")


def test_a_separate_boot_partition_names_kernels_from_its_root_and_searches_its_uuid(debian_boot):
    """/boot on its own file system: /vmlinuz-..., and root_uuid is /boot's file system, not /'s."""
    e = default_grub_entry(debian_boot.grub["separate-boot"])
    _assert_entry(e, "/vmlinuz-" + NEW, "root=/dev/vda1 ro " + CLOUD_CMDLINE, ["/initrd.img-" + NEW],
                  uuid=BOOT_UUID)


def test_grub_default_saved_without_grubenv_is_entry_0(debian_boot):
    """GRUB_DEFAULT=saved writes set default="${saved_entry}": on a first boot (no grubenv) that is entry 0."""
    text = debian_boot.grub["saved"]
    assert 'set default="${saved_entry}"' in text
    _assert_entry(default_grub_entry(text), "/boot/vmlinuz-" + NEW, "root=/dev/vda1 ro " + CLOUD_CMDLINE,
                  ["/boot/initrd.img-" + NEW])


@pytest.mark.parametrize("saved", [
    "%s>gnulinux-%s-advanced-%s" % (ADVANCED, OLD, ROOT_UUID),
    "Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux %s" % OLD,
])
def test_grub_default_saved_with_grubenv_boots_the_saved_entry(debian_boot, saved):
    """With grubenv's variables, load_env runs and saved_entry (an id or a title path) picks the old kernel."""
    e = default_grub_entry(debian_boot.grub["saved"], grubenv={"saved_entry": saved})
    _assert_entry(e, "/boot/vmlinuz-" + OLD, "root=/dev/vda1 ro " + CLOUD_CMDLINE, ["/boot/initrd.img-" + OLD],
                  title="Debian GNU/Linux, with Linux %s" % OLD)


def test_grub_reboots_next_entry_before_the_saved_one(debian_boot):
    """grub-reboot's next_entry wins over saved_entry (00_header's first if)."""
    e = default_grub_entry(debian_boot.grub["saved"], grubenv={"saved_entry": "0", "next_entry": "1>%d" % PER_KERNEL})
    assert e.kernel == "/boot/vmlinuz-" + OLD


def test_a_submenu_path_default_boots_that_entry_of_advanced_options(debian_boot):
    """GRUB_DEFAULT="1>N": entry N of the submenu, here the old kernel's normal entry."""
    e = default_grub_entry(debian_boot.grub["submenu-old"])
    _assert_entry(e, "/boot/vmlinuz-" + OLD, "root=/dev/vda1 ro " + CLOUD_CMDLINE, ["/boot/initrd.img-" + OLD],
                  title="Debian GNU/Linux, with Linux %s" % OLD)


def test_a_submenu_path_to_a_recovery_entry_boots_single_user(debian_boot):
    """The entry before it is the newest kernel's recovery mode: "single" comes before GRUB_CMDLINE_LINUX."""
    e = default_grub_entry(debian_boot.grub["submenu-recovery"])
    _assert_entry(e, "/boot/vmlinuz-" + NEW, "root=/dev/vda1 ro single " + CLOUD_CMDLINE,
                  ["/boot/initrd.img-" + NEW], title="Debian GNU/Linux, with Linux %s (recovery mode)" % NEW)


def test_a_default_by_menu_ids_boots_that_entry(debian_boot):
    """GRUB_DEFAULT="gnulinux-advanced-UUID>gnulinux-VERSION-advanced-UUID", the form grub-mkconfig recommends."""
    assert default_grub_entry(debian_boot.grub["by-id"]).kernel == "/boot/vmlinuz-" + OLD


def test_an_old_style_title_default_falls_back_to_entry_0_as_in_grub(debian_boot):
    """A bare title of a submenu entry matches no top-level entry, so GRUB boots entry 0.

    10_linux writes a correction (`if [ "x$default" = 'TITLE' ]; then default='Advanced...>TITLE'; fi`)
    whose comparison lacks the "x" on the right and never holds; the parser runs it and agrees.
    """
    text = debian_boot.grub["old-title"]
    assert "if [ \"x$default\" = 'Debian GNU/Linux, with Linux %s' ]" % OLD in text
    assert default_grub_entry(text).kernel == "/boot/vmlinuz-" + NEW


def test_without_a_submenu_the_index_counts_every_entry(debian_boot):
    """GRUB_DISABLE_SUBMENU=y: a flat menu, PER_KERNEL entries per kernel; the first of the old kernel's."""
    e = default_grub_entry(debian_boot.grub["flat"])
    assert (e.kernel, e.options) == ("/boot/vmlinuz-" + OLD, "root=/dev/vda1 ro " + CLOUD_CMDLINE)


def test_an_index_past_the_end_of_a_real_menu_is_refused(debian_boot):
    """GRUB would boot entry 0; an image whose default names no entry is refused instead, in one line."""
    text = debian_boot.grub["two-kernels"].replace('set default="0"', 'set default="7"')
    with pytest.raises(BootConfigError, match=r"default entry '7' is past the end of the menu \(\d entries\)"):
        default_grub_entry(text)
    text = debian_boot.grub["two-kernels"].replace('set default="0"', 'set default="1>99"')
    with pytest.raises(BootConfigError, match="past the end of submenu 'Advanced options for Debian GNU/Linux'"):
        default_grub_entry(text)


# -- grub.cfg: the language, on hand-written configs ---------------------------------------------------------------

# After Ubuntu 22.04's grub.cfg (Ubuntu's grub2 is not on Debian's mirror): gfxmode sets vt_handoff.
UBUNTU = (Path(__file__).parent / "data_bootcfg" / "ubuntu-jammy-grub.cfg").read_text()


def test_ubuntu_vt_handoff_is_expanded_as_gfxmode_sets_it():
    """gfxmode keep (no gfxblacklist.txt) sets $vt_handoff in a function; the linux line gets its value."""
    e = default_grub_entry(UBUNTU)
    assert e == BootEntry("Ubuntu", "/boot/vmlinuz-5.15.0-91-generic", ["/boot/initrd.img-5.15.0-91-generic"],
                          "root=UUID=9c6f7d0e-1111-2222-3333-444455556666 ro quiet splash vt.handoff=7",
                          "9c6f7d0e-1111-2222-3333-444455556666")


def test_variables_set_in_the_file_expand_and_unknown_ones_vanish():
    """${kernelopts} set at the top (RHEL 8 style) expands; $tuned_params, never set, is dropped."""
    text = ('set kernelopts="root=/dev/mapper/rhel-root ro crashkernel=auto"\n'
            "menuentry 'RHEL' {\n  linux16 /vmlinuz-4.18.0 ${kernelopts} $tuned_params quiet\n"
            "  initrd16 /initramfs-4.18.0.img $tuned_initrd\n}\n")
    e = default_grub_entry(text)
    assert (e.kernel, e.options, e.initrds) == ("/vmlinuz-4.18.0", "root=/dev/mapper/rhel-root ro crashkernel=auto "
                                                "quiet", ["/initramfs-4.18.0.img"])


def test_quoting_continuations_and_comments_are_read_as_grub_does():
    """Single quotes keep everything, double quotes expand, backslash escapes, a backslash-newline joins lines."""
    text = r"""# a comment
set v="a b"   # trailing comment
menuentry "It's \"quoted\"" --id 'x#1' {
    linux /vm\ linuz 'single=$v' "double=$v" bare=$v \
        joined=yes#not-a-comment # a comment
    initrd '/a' "/b"\
/c
}
"""
    e = default_grub_entry(text)
    assert e.title == 'It\'s "quoted"'
    assert e.kernel == "/vm linuz"
    assert e.options == 'single=$v "double=a b" bare=a b joined=yes#not-a-comment'
    assert e.initrds == ["/a", "/b/c"]


def test_efi_and_16_bit_loaders_count_as_linux_and_initrd():
    for linux, initrd in (("linuxefi", "initrdefi"), ("linux16", "initrd16"), ("linux", "initrd")):
        e = default_grub_entry("menuentry x {\n%s /k a=1\n%s /i1 /i2\n}\n" % (linux, initrd))
        assert (e.kernel, e.options, e.initrds) == ("/k", "a=1", ["/i1", "/i2"]), linux


def test_the_default_counts_entries_the_script_defines_not_those_it_skips():
    """A menuentry in an if that is false (an EFI-only entry on a PC) is not in the menu."""
    text = ('set default=1\nmenuentry a { linux /a }\n'
            'if [ "$grub_platform" = efi ]; then menuentry fw { fwsetup }; fi\n'
            'menuentry b { linux /b }\n')
    assert default_grub_entry(text).kernel == "/b"


@pytest.mark.parametrize("default, kernel", [
    ("0x1", "/b"),  # grub_strtoul: hex
    ("010", "/i"),  # octal 8
    ("2 ignored", "/c"),
    ("B title", "/b"),
    ("id-c", "/c"),
    ("menu>>with>>gt", "/d"),  # ">>" is a ">" of the title
    ("nothing matches this", "/a"),  # GRUB: entry 0
    ("", "/a"),
])
def test_default_numbers_titles_and_ids_are_read_as_grub_reads_them(default, kernel):
    entries = "".join("menuentry 'T%d' { linux /x%d }\n" % (k, k) for k in range(4, 8))
    text = ("set default='%s'\nmenuentry 'A' { linux /a }\nmenuentry 'B title' { linux /b }\n"
            "menuentry 'C' --id id-c { linux /c }\nmenuentry 'menu>with>gt' { linux /d }\n%s"
            "menuentry 'I' { linux /i }\n" % (default, entries))
    assert default_grub_entry(text).kernel == kernel


def test_test_expressions_choose_branches():
    """-z, -n, !, -a, -o, parentheses, numbers and strings, as [ and test evaluate them."""
    text = ('if [ -z "$unset" -a -n x ]; then set a=1; fi\n'
            'if test ! 3 -lt 2 -o false; then set b=2; fi\n'
            'if [ ( x = y ) -o ( 10 -ge 9 ) ]; then set c=3; else set c=no; fi\n'
            'if [ -n "$unset" ]; then set d=no; elif [ "a" != "a" ]; then set d=no; else set d=4; fi\n'
            'menuentry x { linux /k $a $b $c $d }\n')
    assert default_grub_entry(text).options == "1 2 3 4"


def test_search_fs_uuid_sets_root_and_a_later_set_root_forgets_it():
    text = ("menuentry a {\n search.fs_uuid 1234-ABCD\n linux /a\n}\n"
            "menuentry b {\n search --fs-uuid --set root 1234-ABCD\n set root='hd0,msdos1'\n linux /b\n}\n"
            "menuentry c {\n search --no-floppy --label --set=root cloudimg-rootfs\n linux /c\n}\n")
    assert default_grub_entry(text).root_uuid == "1234-ABCD"
    assert default_grub_entry("set default=1\n" + text).root_uuid is None
    assert default_grub_entry("set default=2\n" + text).root_uuid is None


def test_functions_get_positional_parameters_and_entries_their_title_as_1():
    text = ("function opts { set o=\"$1 $2\"; return 0; echo unreachable; }\n"
            "menuentry 'Title' extra {\n opts first second\n linux /k $o \"$1\" $2\n}\n")
    assert default_grub_entry(text).options == 'first second Title extra'


def test_a_for_loop_runs_and_an_argument_with_spaces_is_quoted_on_the_command_line():
    text = 'menuentry x {\n for w in a b c; do set l="$l$w"; done\n linux /k l=$l "p=x y"\n}\n'
    assert default_grub_entry(text).options == 'l=abc "p=x y"'


def test_fedora_blscfg_is_refused_with_a_pointer_to_bls():
    text = "set default=\"${saved_entry}\"\ninsmod blscfg\nblscfg\n"
    with pytest.raises(BootConfigError, match="blscfg.*default_bls_entry"):
        default_grub_entry(text)


def test_a_stub_that_loads_another_config_says_which():
    """Ubuntu's ESP grub.cfg only finds /boot/grub and loads it: no entries, and the message names the file."""
    text = ("search.fs_uuid 9c6f7d0e root hd0,gpt1\nset prefix=($root)'/boot/grub'\n"
            "configfile $prefix/grub.cfg\n")
    with pytest.raises(BootConfigError, match=r"no menu entries.*configfile \(\)/boot/grub/grub.cfg"):
        default_grub_entry(text)


def test_an_entry_without_linux_is_refused():
    with pytest.raises(BootConfigError, match="menu entry 'Windows' loads no kernel"):
        default_grub_entry("menuentry 'Windows' {\n chainloader +1\n}\n")


# -- grub.cfg: hostile input ---------------------------------------------------------------------------------------

def _refused(text: str, match: str) -> BootConfigError:
    """The config is refused with one line matching `match`, quickly."""
    start = time.monotonic()
    with pytest.raises(BootConfigError, match=match) as info:
        default_grub_entry(text)
    assert time.monotonic() - start < HOSTILE_SEC
    assert "\n" not in str(info.value)
    return info.value


HOSTILE = {
    "huge": ("#" * (MAX_CONFIG_CHARS + 1), "larger than"),
    "deep-if": ("if true; then\n" * 200 + "fi\n" * 200, "nest deeper than"),
    "deep-menu": ("submenu x {\n" * 200 + "}\n" * 200, "nest deeper than"),
    "deep-test": ("if [ " + "( " * 100 + "x" + " )" * 100 + " ]; then true; fi\nmenuentry a { linux /a }\n",
                  "nests deeper than"),
    "index-past-end": ("set default=1\nmenuentry a { linux /a }\n", "past the end"),
    "no-linux": ("menuentry a {\n echo hello\n}\n", "loads no kernel"),
    "no-entries": ("set timeout=5\n", "no menu entries"),
    "many-entries": ("menuentry a { linux /a }\n" * (MAX_ENTRIES + 500), "more than %d menu entries" % MAX_ENTRIES),
    "many-in-loop": ("for i in " + "x " * 3000 + "; do menuentry $i { linux /a }; done\n", "more than"),
    "single-quote": ("menuentry 'a {\n linux /a\n}\n", "line 1: unterminated single quote"),
    "double-quote": ('menuentry a {\n linux "/a\n}\n', "line 2: unterminated double quote"),
    "brace": ("menuentry a {\n linux /a\n", "menuentry without }"),
    "no-brace": ("menuentry a\n linux /a\n", "menuentry without {"),
    "stray-brace": ("}\n", "unexpected }"),
    "stray-fi": ("fi\n", "unexpected fi"),
    "if-no-fi": ("if true; then\n echo\n", "if without fi"),
    "var-brace": ("set a=${foo\n", r"\$\{ without \}"),
    "var-name": ("set a=${1x}\n", "bad variable name"),
    "recursion": ("function f { f }\nf\nmenuentry a { linux /a }\n", "nest deeper than"),
    "doubling": ('set a=x\n' + 'set a="$a$a"\n' * 40 + "menuentry a { linux /a }\n", "longer than"),
    "copying": ('set a="' + "y" * 60000 + '"\nfor i in ' + "1 " * 3000 + '; do set b="$a"; done\n', "in all"),
    "busy": ("function f { true; true; true; true; true; true; true; true; true; true; }\nfor i in " + "1 " * 100
             + "; do for j in " + "1 " * 100 + "; do f; done; done\n", "runs more than"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_grub_cfg_is_refused_in_one_line(name):
    text, match = HOSTILE[name]
    _refused(text, match)


@pytest.mark.parametrize("snippet", [
    "menuentry 'x' {\n linux /a\n}\n",
    "menuentry x { linux /a }\n",
    "set a='multi\nline'\nmenuentry \"$a\" {\n linux /a \\\n  b=1\n}\n",
    "for x in a b; do echo $x; done\nwhile false; do echo; done\nmenuentry x { linux /a }\n",
    "menuentry 'x {\n",
    'echo "abc\n',
    "menuentry x {\n linux /a\n",
    "if true; then\n echo\n",
    "fi\n",
    "}\n",
    "echo ${foo\n",
    "set a=${1x}\n",
    "menuentry\n{\n}\n",
])
def test_syntax_errors_agree_with_grub_script_check(debian_boot, tmp_path, snippet):
    """What GRUB's own parser rejects, the parser rejects as a syntax error; what it accepts parses.

    (The parser is more lenient than GRUB in places no generated config goes: "echo {", "a}b", an empty then.)
    """
    grub_ok = _script_check(debian_boot, snippet, tmp_path)
    try:
        default_grub_entry(snippet)
        ours_ok = True
    except BootConfigError as e:
        ours_ok = not re.search(r"unterminated|unexpected|without|variable", str(e))
    assert ours_ok == grub_ok


# -- BLS entries from systemd's kernel-install ---------------------------------------------------------------------

def _bls_expect(version: str) -> BootEntry:
    osr = _os_release()
    title = osr.get("PRETTY_NAME") or "Linux %s" % version
    base = "/%s/%s/" % (MACHINE_ID, version)
    return BootEntry(title, base + "linux", [base + "initrd.img-" + version],
                     BLS_CMDLINE + " systemd.machine_id=" + MACHINE_ID, None)


def test_kernel_install_wrote_bls_type1_entries_with_boot_counting(debian_boot):
    """Three entries; the newest with "+3" (tries left) in its name, the sort-key from os-release."""
    names = sorted(p.rsplit("/", 1)[-1] for p in debian_boot.bls)
    assert names == sorted(["%s-%s.conf" % (MACHINE_ID, OLD), "%s-%s.conf" % (MACHINE_ID, NEW),
                            "%s-%s+3.conf" % (MACHINE_ID, NEWEST)])
    osr = _os_release()
    sort_key = osr.get("IMAGE_ID") or osr.get("ID")
    if sort_key:
        assert all("sort-key   %s\n" % sort_key in t for t in debian_boot.bls.values())


def test_bls_default_is_the_newest_version_even_while_it_is_being_tried(debian_boot):
    """Same sort-key and machine-id: the highest version first; "+3" (indeterminate) does not demote it."""
    assert default_bls_entry(debian_boot.bls) == _bls_expect(NEWEST)


def test_bls_entry_with_no_tries_left_goes_last(debian_boot):
    """After three failed boots systemd-boot renames it "+0-3": bad entries sort after all others."""
    files = {k.replace("+3.conf", "+0-3.conf"): v for k, v in debian_boot.bls.items()}
    assert default_bls_entry(files) == _bls_expect(NEW)


@pytest.mark.parametrize("pattern", ["*-%s.conf" % OLD, "*%s*" % OLD.upper(), "%s-%s" % (MACHINE_ID, OLD),
                                     "%s-%s.conf" % (MACHINE_ID, OLD)])
def test_bls_default_glob_or_saved_entry_picks_that_entry(debian_boot, pattern):
    """loader.conf's glob (case-insensitive, ".conf" included) or GRUB's saved_entry (without ".conf")."""
    assert default_bls_entry(debian_boot.bls, default=pattern) == _bls_expect(OLD)


def test_bls_default_matching_nothing_or_saved_is_the_first_entry(debian_boot):
    assert default_bls_entry(debian_boot.bls, default="nothing*") == _bls_expect(NEWEST)
    assert default_bls_entry(debian_boot.bls, default="@saved") == _bls_expect(NEWEST)


def test_bls_default_matches_the_id_without_the_boot_counter(debian_boot):
    assert default_bls_entry(debian_boot.bls, default="*-%s.conf" % NEWEST) == _bls_expect(NEWEST)


# -- BLS: the specification on hand-written entries ---------------------------------------------------------------

# systemd's own test of the order (src/test/test-bootspec.c, bootspec_sort), with linux lines added.
SYSTEMD_SORT_TEST = {
    "a-10.conf": "title A\nversion 10\nmachine-id dd235d00696545768f6f693bfd23b15f\n",
    "a-5.conf": "title A\nversion 5\nmachine-id dd235d00696545768f6f693bfd23b15f\n",
    "b.conf": "title B\nversion 3\nmachine-id b75451ad92f94feeab50b0b442768dbd\n",
    "c.conf": "title C\nsort-key xxxx\nversion 5\nmachine-id 309de666fd5044268a9a26541ac93176\n",
    "cx.conf": "title C\nsort-key xxxx\nversion 10\nmachine-id 309de666fd5044268a9a26541ac93176\n",
    "d.conf": "title D\nsort-key kkkk\nversion 100\nmachine-id 81c6e3147cf544c19006af023e22b292\n",
}


def test_bls_order_is_systemd_boots_own_test_order():
    """d (lowest sort-key), cx, c (newest first), then without sort-key by id, newest first: b, a-10, a-5."""
    files = {k: v + "linux /%s\n" % k for k, v in SYSTEMD_SORT_TEST.items()}
    order = []
    while files:
        first = default_bls_entry(files).kernel[1:]
        order.append(first)
        del files[first]
    assert order == ["d.conf", "cx.conf", "c.conf", "b.conf", "a-10.conf", "a-5.conf"]


@pytest.mark.parametrize("files, first", [
    ({"z.conf": "sort-key bbb\nversion 9\n", "b.conf": "sort-key aaa\nversion 1\n"}, "b.conf"),  # sort-key
    ({"z.conf": "sort-key f\nmachine-id 22\nversion 9\n", "b.conf": "sort-key f\nmachine-id 11\nversion 1\n"},
     "b.conf"),  # then machine-id
    ({"z-5.1.conf": "sort-key f\nversion 5.1\n", "a-6.1.conf": "sort-key f\nversion 6.1\n"}, "a-6.1.conf"),
    ({"z.conf": "version 1\n", "b.conf": "sort-key f\nversion 1\n"}, "b.conf"),  # a sort-key sorts first
])
def test_bls_sort_key_machine_id_and_version_decide_before_the_file_name(files, first):
    """Where the file names alone would order the other way round, the spec's keys decide."""
    files = {k: v + "linux /%s\n" % k for k, v in files.items()}
    assert default_bls_entry(files).kernel == "/" + first


def test_bls_keys_repeat_and_variables_expand():
    """Two options lines join; several initrds; $kernelopts from the caller; unknown $tuned_initrd dropped."""
    text = ("# Fedora\ntitle  Fedora Linux 39\nversion 6.5.6-300.fc39.x86_64\nlinux /vmlinuz-6.5.6\n"
            "initrd /intel-ucode.img\ninitrd /initramfs-6.5.6.img $tuned_initrd\n"
            "options $kernelopts\noptions   quiet\ngrub_class fedora\n")
    e = default_bls_entry({"x.conf": text}, variables={"kernelopts": "root=UUID=abc ro"})
    assert e == BootEntry("Fedora Linux 39", "/vmlinuz-6.5.6", ["/intel-ucode.img", "/initramfs-6.5.6.img"],
                          "root=UUID=abc ro quiet", None)


def test_bls_entries_for_other_architectures_or_without_kernel_are_not_in_the_menu():
    files = {"a.conf": "title arm\narchitecture aa64\nlinux /a\n", "b.conf": "title none\noptions x\n",
             "c.conf": "title ok\narchitecture X64\nlinux /c\n", "notes.txt": "linux /n\n",
             ".hidden.conf": "linux /h\n"}
    assert default_bls_entry(files).kernel == "/c"


def test_bls_hostile_or_empty_sets_are_refused_in_one_line():
    cases = [
        ({}, "no entries"),
        ({"readme.txt": "x"}, "no entries"),
        ({"a.conf": "title nothing\noptions quiet\n"}, "no entry has a linux or efi line"),
        ({"a.conf": "title fw\nefi /EFI/shell.efi\n"}, "has no linux line"),
        ({"%d.conf" % k: "linux /k\n" for k in range(MAX_ENTRIES + 1)}, "more than %d entry files" % MAX_ENTRIES),
        ({"a.conf": "linux /k\noptions " + "x" * MAX_CONFIG_CHARS}, "larger than"),
        ({"a.conf": "linux /k\n"}, "default pattern longer"),
        ({"a" * 300 + ".conf": "linux /k\n"}, "file name longer than"),
        ({"a.conf": "linux /k\nversion " + "1." * 200 + "\n"}, "version longer than"),
        ({"a.conf": "linux /k\noptions " + "$x " * 100000 + "\n"}, "once its variables are expanded"),
    ]
    for files, match in cases:
        default = "*" * 300 if "pattern" in match else None
        with pytest.raises(BootConfigError, match=match) as info:
            default_bls_entry(files, default=default, variables={"x": "y" * 60000})
        assert "\n" not in str(info.value)


def test_bls_glob_is_linear_on_a_hostile_pattern():
    start = time.monotonic()
    assert not glob_match("a*" * 120 + "b", "a" * 255)
    assert time.monotonic() - start < HOSTILE_SEC
    assert glob_match("[!x]-[a-c]?.conf", "y-b1.conf") and glob_match(r"\*", "*") and not glob_match(r"\*", "a")


@pytest.mark.parametrize("a, b, expected", [
    ("6.1.0-28-cloud-amd64", "6.1.0-9-cloud-amd64", 1), ("123~rc1", "123", -1), ("123^post1", "123.a-1", -1),
    ("123a", "123.a", 1), ("A", "a", -1), ("00123", "123", 0), ("1_2_3", "1.3.3", 1), ("", "~", 1),
    ("5.14.0-362.el9", "5.14.0-70.el9", 1), ("a", "1", -1),
])
def test_version_order_is_the_uapi_specifications(a, b, expected):
    """Pairs from the Version Format Specification and kernel versions (systemd-analyze is the oracle in
    tests/integration/test_bootcfg_versions.py)."""
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected
