"""`tenbox image ...`: disk images (CLI; `create` runs locally as the invoking user)."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from tenbox_ctl import output
from tenbox_ctl.app import handle_errors, json_option
from tenbox_ctl.client import CliError


@click.group("image")
def image_group():
    """Disk images: create them, inspect them.

    \b
    Example:
      tenbox image create data.qcow2 --size 20G
    """


def _imagetool(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tenbox_vmm.imagetool", *args], capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise CliError(lines[-1].replace("tenbox-image: error: ", "") if lines else "image tool failed")
    return json.loads(r.stdout)


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
