"""`tenbox image ...`: the image store through tenboxd, and local disk images (CLI).

`ls`, `inspect`, `import` and `rm` ask tenboxd; `build` runs
scripts/make-rootfs-debian.sh here (as root), then imports what it
built; `create` and `info` work on image files directly, as the invoking user.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click

from tenbox_ctl import complete, output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_ctl.client import CliError
from tenbox_supervisor.protocol import NAME_RE, ErrorCode, ExitCode, Method
from tenbox_vmm.protocol.imagetool import IMAGETOOL_MODULE, ImageToolBroken, ImageToolFailed, read_answer

IMPORT_TIMEOUT_SEC = 6 * 3600  # copying and hashing many GiB on a slow disk
PROGRESS_POLL_SEC = 1.0
BUILD_CACHE = "/var/cache/tenbox/images"
SCRIPTS_ENV = "TENBOX_SCRIPTS_DIR"
# Where the rootfs scripts are: $TENBOX_SCRIPTS_DIR, the source tree, the package. One script
# builds for every architecture (--arch), so the folders are not per architecture.
SCRIPT_DIRS = (Path(__file__).resolve().parents[1] / "scripts", Path("/usr/lib/tenbox/scripts"))
# The architectures `image build` makes images for: Debian's name -> the kernel's (uname -m,
# a manifest's "arch", what tenboxd on such a host keeps).
BUILD_ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}


@click.group("image")
def image_group():
    """Guest images: build, import, list, inspect and remove them in tenboxd's store; make disk images.

    An image is a kernel, an initrd and a root file system template with a
    manifest of their sha256; `tenbox vm create NAME --image IMAGE` gives a
    VM its own qcow2 overlay of the template.

    \b
    Example:
      sudo tenbox image build debian --suite bookworm --name deb12
      tenbox image ls
      tenbox vm create web --image deb12
      tenbox image create data.qcow2 --size 20G
    """


def _imagetool(*args: str) -> dict:
    """Run the image tool here, as the invoking user; its JSON answer, or CliError with its message."""
    r = subprocess.run([sys.executable, "-m", IMAGETOOL_MODULE, *args], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    try:
        return read_answer(r.returncode, r.stdout)
    except ImageToolFailed as e:
        raise CliError(e.message) from None
    except ImageToolBroken as e:
        raise CliError(str(e)) from None


def _check_name(name: Optional[str]) -> None:
    if name is not None and not NAME_RE.match(name):
        raise click.BadParameter("%r: image names match [A-Za-z0-9-]{1,64}" % name, param_hint="--name")


# The store -------------------------------------------------------------------------------------


def _os_line(img: Dict[str, Any]) -> str:
    os_ = img.get("os") or {}
    return " ".join(str(os_[k]) for k in ("id", "suite", "version") if os_.get(k)) or "-"


def _vms_line(vms: List[Dict[str, Any]]) -> str:
    return ", ".join("%s (%s)" % (v["name"], v["id"]) if v.get("name") else v["id"] for v in vms) or "-"


@image_group.command("ls")
@json_option
@pass_app
@handle_errors
def image_ls(app: App, as_json: bool):
    """List the images in tenboxd's store.

    STATE is ready, importing (with how far) or broken (with why); VMS
    counts the VMs made from the image. --json prints the list of image
    objects (name, state, version, os, arch, kernel, kernel_release, initrd,
    rootfs, rootfs_format, virtual_size, size, cmdline, created_at,
    imported_at, path, vms).

    \b
    Example:
      tenbox image ls
      tenbox image ls --json | jq -r '.[] | select(.state == "ready") | .name'
    """
    images = app.client().request(Method.IMAGE_LIST)["images"]
    if as_json:
        output.emit_json(images)
        return
    rows: List[Sequence[Any]] = []
    for img in images:
        state = img.get("state")
        if state == "broken":
            rows.append((img["name"], "broken", "-", "-", "-", "-", "-", "-", img.get("error")))
        elif state == "importing":
            total = img.get("bytes_total") or 0
            done = img.get("bytes_done") or 0
            pct = "%d%%" % (100 * done // total) if total else "-"
            rows.append((img["name"], "importing %s" % pct, "-", "-", "-", output.size(total), "-", "-", "-"))
        else:
            rows.append((img["name"], state, img.get("version"), _os_line(img), img.get("kernel_release"),
                         output.size(img.get("size")), output.size(img.get("virtual_size")), len(img.get("vms") or []),
                         (img.get("imported_at") or "-").replace("T", " ").rstrip("Z")))
    output.table(("NAME", "STATE", "VERSION", "OS", "KERNEL", "SIZE", "VIRTUAL", "VMS", "IMPORTED"), rows)


@image_group.command("inspect")
@click.argument("name", **complete.IMAGE)
@click.option("--verify", is_flag=True, help="Hash every file again and compare with the manifest (exit 1 if one differs).")
@json_option
@pass_app
@handle_errors
def image_inspect(app: App, name: str, verify: bool, as_json: bool):
    """Show one image: its files with their sha256, its manifest and the VMs using it.

    \b
    Example:
      tenbox image inspect deb12
      tenbox image inspect deb12 --verify
    """
    img = app.client(IMPORT_TIMEOUT_SEC if verify else None).request(Method.IMAGE_INSPECT, {"name": name, "verify": verify})
    bad = verify and not (img.get("verify") or {}).get("ok")
    if as_json:
        output.emit_json(img)
    else:
        rootfs_note = "%s, virtual %s" % (img.get("rootfs_format"), output.size(img.get("virtual_size")))
        rows = [
            ("name", img.get("name")), ("version", img.get("version")), ("os", _os_line(img)), ("arch", img.get("arch")),
            ("kernel", "%s (%s)" % (img.get("kernel"), img.get("kernel_release") or "?")), ("initrd", img.get("initrd")),
            ("rootfs", "%s (%s)" % (img.get("rootfs"), rootfs_note)), ("cmdline", img.get("cmdline")),
            ("size", output.size(img.get("size"))), ("created", img.get("created_at")),
            ("imported", img.get("imported_at")), ("vms", _vms_line(img.get("vms") or [])),
        ]
        for k, v in rows:
            click.echo("%-10s %s" % (k + ":", "-" if v is None else v))
        click.echo("files:")
        files = (img.get("manifest") or {}).get("files") or {}
        width = max([len(fn) for fn in files] + [4])
        for fn in sorted(files):
            click.echo("  %-*s  %10s  sha256 %s" % (width, fn, output.size(files[fn].get("size")), files[fn].get("sha256")))
        if verify:
            problems = img["verify"]["problems"]
            click.echo("verify:    %s" % ("ok, every sha256 matches the manifest" if not problems else "FAILED"))
            for p in problems:
                click.echo("  " + p)
    if bad:
        sys.exit(1)


class _ImportProgress:
    """Polls image.list while an import runs and shows how far it is on stderr."""

    def __init__(self, app: App, name: Optional[str]) -> None:
        self.app = app
        self.name = name
        self.tty = sys.stderr.isatty()
        self.last_step = -1
        self.shown = False

    def poll(self) -> None:
        if not self.name:
            return
        try:
            images = self.app.client(10).request(Method.IMAGE_LIST)["images"]
        except CliError:
            return
        for img in images:
            if img.get("name") == self.name and img.get("state") == "importing":
                self.show(img.get("bytes_done") or 0, img.get("bytes_total") or 0, img.get("file") or "")

    def show(self, done: int, total: int, file: str) -> None:
        pct = 100 * done // total if total else 0
        text = "importing %s: %3d%% (%s of %s; checking sha256 of %s)" % (
            self.name, pct, output.size(done), output.size(total), file or "...")
        if self.tty:
            click.echo("\r" + text + "\033[K", nl=False, err=True)
            self.shown = True
        elif pct // 10 != self.last_step:
            self.last_step = pct // 10
            click.echo(text, err=True)

    def end(self) -> None:
        if self.shown:
            click.echo("\r\033[K", nl=False, err=True)


def _manifest_name(paths: List[str]) -> Optional[str]:
    """The name in the manifest being imported, if this user can read it (for the progress line)."""
    candidates = [os.path.join(p, "manifest.json") for p in paths if os.path.isdir(p)] + [p for p in paths if p.endswith(".json")]
    for c in candidates:
        try:
            with open(c) as f:
                name = json.load(f).get("name")
            return name if isinstance(name, str) and NAME_RE.match(name) else None
        except (OSError, ValueError, AttributeError):
            return None
    return None


def _is_disk(paths: List[str]) -> bool:
    """One file that is not a manifest: a distribution's cloud image (a raw or qcow2 disk)."""
    return len(paths) == 1 and not os.path.isdir(paths[0]) and not paths[0].endswith(".json")


def _import(app: App, paths: List[str], name: Optional[str], as_json: bool, sha256: Optional[str] = None) -> None:
    paths = [os.path.abspath(p) for p in paths]
    payload: Dict[str, Any] = {"name": name}
    disk = _is_disk(paths)
    if disk:
        if not name:
            raise click.UsageError("a cloud image needs --name (it has no manifest to name it)")
        payload["disk"] = paths[0]
        if sha256:
            payload["sha256"] = sha256
    elif sha256:
        raise click.UsageError("--sha256 is for a cloud image (one disk file); a manifest has its own digests")
    elif len(paths) == 1 and os.path.isdir(paths[0]):
        payload["path"] = paths[0]
    else:
        payload["files"] = paths
    result: Dict[str, Any] = {}

    def request() -> None:
        try:
            result["image"] = app.client(IMPORT_TIMEOUT_SEC).request(Method.IMAGE_IMPORT, payload)
        except CliError as e:
            result["error"] = e

    progress = _ImportProgress(app, name or _manifest_name(paths))
    started = time.monotonic()
    worker = threading.Thread(target=request, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(PROGRESS_POLL_SEC)
        if worker.is_alive():
            progress.poll()
    progress.end()
    if "error" in result:
        raise result["error"]
    img = result["image"]
    if as_json:
        output.emit_json(img)
    elif disk:
        click.echo("%s: imported in %.0fs (%s, %s)" % (
            img["name"], time.monotonic() - started, output.size(img.get("size")),
            "its sha256 matched --sha256" if sha256 else "no --sha256 given: not verified"))
    else:
        click.echo("%s: imported in %.0fs (%s, every sha256 matched the manifest)"
                   % (img["name"], time.monotonic() - started, output.size(img.get("size"))))


@image_group.command("import")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True),
                metavar="DIR | MANIFEST FILE... | CLOUD-IMAGE")
@click.option("--name", help="Name in the store (default: the manifest's name; required for a cloud image).")
@click.option("--sha256", metavar="HEX", help="A cloud image's expected sha256 (its SHA256SUMS line).")
@json_option
@pass_app
@handle_errors
def image_import(app: App, sources, name: Optional[str], sha256: Optional[str], as_json: bool):
    """Import an image: a folder with manifest.json, a manifest (*.json) and the files it names, or a
    distribution's cloud image (one raw or qcow2 disk).

    A cloud image's kernel and initrd are those of its bootloader's default
    entry (grub.cfg, or BLS entries), read from its ext2/3/4 /boot without
    mounting it; the disk becomes the template, booted with that entry's
    command line. Give --sha256 to check the download.

    Every file's size and sha256 must match the manifest; the rootfs must be
    of its declared format, with no backing file. Nothing enters the store
    unless everything matches. tenboxd reads the files itself, so give paths
    it can read.

    \b
    Example:
      tenbox image import /var/cache/tenbox/images/debian-bookworm --name deb12
      tenbox image import ~/dl/manifest.json ~/dl/vmlinuz ~/dl/initrd.img ~/dl/rootfs.qcow2 --name mine
      tenbox image import debian-12-genericcloud-amd64.qcow2 --name deb12-cloud --sha256 9f0c...
    """
    _check_name(name)
    _import(app, list(sources), name, as_json, sha256)


@image_group.command("rm")
@click.argument("name", **complete.IMAGE)
@json_option
@pass_app
@handle_errors
def image_rm(app: App, name: str, as_json: bool):
    """Remove an image from the store; refused while VMs use it (it lists them).

    \b
    Example:
      tenbox image rm deb12
    """
    try:
        result = app.client(600).request(Method.IMAGE_REMOVE, {"name": name})
    except CliError as e:
        if as_json and e.reply is not None:
            output.emit_json(e.reply)
        raise
    if as_json:
        output.emit_json(result)
    else:
        click.echo("%s: removed" % name)


def find_script(name: str) -> str:
    """A rootfs script: in $TENBOX_SCRIPTS_DIR, the source tree or the package, the first that has it."""
    dirs = [Path(os.environ[SCRIPTS_ENV])] if os.environ.get(SCRIPTS_ENV) else []
    dirs += list(SCRIPT_DIRS)
    for d in dirs:
        path = d / name
        if path.is_file():
            return str(path)
    raise CliError("no %s in %s (set $%s to the folder of the scripts)"
                   % (name, ", ".join(str(d) for d in dirs), SCRIPTS_ENV))


def build_arch(arch: Optional[str], no_import: bool, host: str) -> str:
    """`image build --arch` on a `host` (uname -m), checked: Debian's name (default the host's), or a one-line CliError (usage)."""
    if arch is None:
        for debian, machine in BUILD_ARCHES.items():
            if machine == host:
                return debian
        raise CliError("this host is %s: tenbox builds images for %s; choose one with --arch"
                       % (host, " or ".join(BUILD_ARCHES)), ExitCode.USAGE)
    if arch not in BUILD_ARCHES:
        raise CliError("--arch %r is not an architecture tenbox builds images for: %s"
                       % (arch, " or ".join(BUILD_ARCHES)), ExitCode.USAGE)
    if BUILD_ARCHES[arch] != host and not no_import:
        # tenboxd's store takes only images of its own host's architecture: say so before a
        # build of minutes, not after it.
        raise CliError("tenboxd on this %s host keeps only %s images: build the %s image with --no-import, "
                       "then import its folder on an %s host (tenbox image import DIR)"
                       % (host, host, arch, BUILD_ARCHES[arch]), ExitCode.USAGE)
    return arch


@image_group.command("build")
@click.argument("distro", type=click.Choice(["debian"]))
@click.option("--suite", default="bookworm", show_default=True, help="Debian release to bootstrap.")
@click.option("--name", help="Image name in the store (default: debian-SUITE).")
@click.option("--packages", multiple=True, metavar="P1,P2", help="More Debian packages for the template; repeat or comma-separate.")
@click.option("--size", default="2G", show_default=True, help="Virtual size of the root file system.")
@click.option("--hostname", default="tenbox", show_default=True, help="The guest's host name.")
@click.option("--ssh-key", metavar="FILE|KEY", help="A public key for root's authorized_keys (installs openssh-server).")
@click.option("--mirror", metavar="URL", help="Debian mirror (default http://deb.debian.org/debian).")
@click.option("--out", type=click.Path(file_okay=False), help="Build folder, kept as a cache (default %s/NAME)." % BUILD_CACHE)
@click.option("--refresh", is_flag=True, help="Build again even if the build folder is up to date (new Debian updates).")
@click.option("--no-import", "no_import", is_flag=True, help="Only build; import later with tenbox image import DIR.")
@click.option("--layout", type=click.Choice(["cloud", "plain"]),
              help="cloud: a GPT disk like Debian's genericcloud image, with grub.cfg and cloud-init (each VM is "
              "provisioned by vm create --ssh-key/--user/--user-data); plain: ext4 on the whole disk, no "
              "cloud-init (--ssh-key and --hostname fixed at build time). Default: cloud for amd64, plain for "
              "arm64 (cloud is amd64 only for now).")
@click.option("--arch", metavar="amd64|arm64",
              help="The image's architecture, Debian's name (default: this host's). Another host's needs "
              "qemu-user-static registered with binfmt_misc, and --no-import: tenboxd keeps only its own host's.")
@json_option
@pass_app
@handle_errors
def image_build(app: App, distro, suite, name, packages, size, hostname, ssh_key, mirror, out, refresh, no_import, layout,
                arch, as_json):
    """Build an image with scripts/make-rootfs-debian.sh, then import it into tenboxd's store.

    Needs root (debootstrap, chroot). The build runs in this process's
    terminal, one progress line per stage; it is cached in --out, so building
    the same inputs again only imports. Before the build starts, tenboxd must
    answer and the name must be free in its store (unless --no-import).

    \b
    Example:
      sudo tenbox image build debian
      sudo tenbox image build debian --suite bookworm --name deb12 --packages openssh-server,curl --ssh-key ~/.ssh/id_ed25519.pub
      sudo tenbox image build debian --arch arm64 --no-import --out /srv/images/deb12-arm64   # on an amd64 host
    """
    name = name or "%s-%s" % (distro, suite)
    _check_name(name)
    arch = build_arch(arch, no_import, platform.machine())
    if layout is None:
        layout = "cloud" if arch == "amd64" else "plain"
    elif layout == "cloud" and arch != "amd64":
        raise CliError("--layout cloud is amd64 only for now (build %s images with --layout plain)" % arch,
                       ExitCode.USAGE)
    if os.geteuid() != 0:
        raise CliError("image build needs root: debootstrap and chroot do (run it with sudo)", ExitCode.PERMISSION)
    script = find_script("make-rootfs-%s.sh" % distro)
    if not no_import:
        try:
            app.client().request(Method.IMAGE_INSPECT, {"name": name})
        except CliError as e:
            if e.error_code is not ErrorCode.IMAGE_NOT_FOUND:
                raise
        else:
            raise CliError("an image named %r exists; remove it (tenbox image rm %s) or choose another --name (%s)"
                           % (name, name, ErrorCode.IMAGE_EXISTS.value), error_code=ErrorCode.IMAGE_EXISTS)
    out = os.path.abspath(out) if out else os.path.join(BUILD_CACHE, name)
    argv = [script, "--arch", arch, "--suite", suite, "--name", name, "--size", size, "--hostname", hostname,
            "--out", out]
    if layout != "plain":
        argv += ["--layout", layout]
    for p in packages:
        argv += ["--packages", p]
    if ssh_key:
        argv += ["--ssh-key", os.path.abspath(ssh_key) if os.path.isfile(ssh_key) else ssh_key]
    if mirror:
        argv += ["--mirror", mirror]
    if refresh:
        argv.append("--refresh")
    # The script's progress and errors go straight to this terminal (its stdout is unused).
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr)
    if r.returncode != 0:
        raise CliError("building the image failed: %s exited with status %d (the reason is above)"
                       % (os.path.basename(script), r.returncode))
    if no_import:
        if as_json:
            output.emit_json({"name": name, "path": out})
        else:
            click.echo(out)
        return
    _import(app, [out], name, as_json)


@image_group.command("create")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--size", required=True, help="Virtual size: 10G, 512M, ... (binary units).")
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True)
@click.option("--backing", type=click.Path(dir_okay=False, exists=True), help="qcow2 overlay on this image.")
@json_option
@handle_errors
def image_create(path, size, fmt, backing, as_json):
    """Create an empty disk image (or a qcow2 overlay with --backing).

    \b
    Example:
      tenbox image create data.qcow2 --size 20G
      tenbox image create mine.qcow2 --size 10G --backing /srv/debian.qcow2
    """
    args = ["create", path, "--size", size, "--format", fmt]
    if backing:
        args += ["--backing", backing]
    info = _imagetool(*args)
    if as_json:
        output.emit_json(info)
    else:
        click.echo("%s: %s, %d bytes" % (path, info.get("format"), info.get("virtual_size", 0)))


@image_group.command("info")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@json_option
@handle_errors
def image_info(path, as_json):
    """Show an image's format, size and backing chain.

    \b
    Example:
      tenbox image info mine.qcow2
    """
    info = _imagetool("info", path)
    if as_json:
        output.emit_json(info)
        return
    for k in sorted(info):
        click.echo("%-14s %s" % (k + ":", info[k]))
