"""`tenbox vm disk ...`: list a VM's disks, add a new one, grow one (live where the VM runs) (CLI)."""

from __future__ import annotations

import click

from tenbox_ctl import complete, output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_supervisor.protocol import Method

# Growing a qcow2 in a worker writes and syncs a new L1 table; tenboxd waits up to 60 s for it.
RESIZE_TIMEOUT_SEC = 90.0


@click.group("disk")
def disk_group():
    """List, add and grow a VM's disks.

    \b
    Example:
      tenbox vm disk add web --size 10G
      tenbox vm disk resize web disk-1.qcow2 --size +5G
      tenbox vm disk ls web
    """


@disk_group.command("ls")
@click.argument("vm", **complete.VM)
@json_option
@pass_app
@handle_errors
def disk_ls(app: App, vm: str, as_json: bool):
    """List a VM's disks with their virtual size and the space their files take.

    \b
    Example:
      tenbox vm disk ls web
    """
    result = app.client().request(Method.VM_DISK_LIST, {"vm_id": vm})
    if as_json:
        output.emit_json(result["disks"])
        return
    rows = []
    for d in result["disks"]:
        notes = [n for n in ("ro" if d.get("read_only") else None, "own" if d.get("owned") else None) if n]
        rows.append((d["index"], d["name"], d.get("format"), output.size(d.get("size_bytes")),
                     output.size(d.get("file_bytes")), ",".join(notes), d.get("error") or d["path"]))
    output.table(("INDEX", "NAME", "FORMAT", "SIZE", "ON DISK", "FLAGS", "PATH"), rows)


@disk_group.command("add")
@click.argument("vm", **complete.VM)
@click.option("--size", required=True, help="The new disk's size: 10G, 512M (binary units).")
@json_option
@pass_app
@handle_errors
def disk_add(app: App, vm: str, size: str, as_json: bool):
    """Add a new empty qcow2 disk to a stopped VM; it is made in the VM's folder and deleted with the VM.

    \b
    Example:
      tenbox vm disk add web --size 10G
    """
    result = app.client().request(Method.VM_DISK_ADD, {"vm_id": vm, "size": size})
    if as_json:
        output.emit_json(result)
        return
    click.echo("%s: disk %d %s (%s)" % (vm, result["index"], result["path"], output.size(result["size_bytes"])))


@disk_group.command("resize")
@click.argument("vm", **complete.VM)
@click.argument("disk")
@click.option("--size", required=True, help="The new size (20G) or how much to add (+5G); never smaller.")
@json_option
@pass_app
@handle_errors
def disk_resize(app: App, vm: str, disk: str, size: str, as_json: bool):
    """Grow a disk (qcow2 or raw), named by its index, file name or path. On a running VM the guest sees the
    new size at once (a virtio configuration change); shrinking is refused.

    \b
    Example:
      tenbox vm disk resize web 1 --size +5G
      tenbox vm disk resize web disk-1.qcow2 --size 20G
    """
    result = app.client(timeout=max(app.timeout, RESIZE_TIMEOUT_SEC)).request(
        Method.VM_DISK_RESIZE, {"vm_id": vm, "disk": disk, "size": size})
    if as_json:
        output.emit_json(result)
        return
    click.echo("%s: disk %d %s is now %s%s" % (vm, result["index"], result["path"], output.size(result["size_bytes"]),
                                               " (live)" if result.get("live") else ""))
