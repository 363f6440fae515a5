"""`tenbox vm snapshot ...`, `tenbox vm restore`, `tenbox vm clone`: freeze a VM, put it back, multiply it (CLI)."""

from __future__ import annotations

import sys
from typing import List, Optional

import click

from tenbox_ctl import complete, output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_supervisor.protocol import ExitCode, Method

# A snapshot writes guest RAM (live, then the last pages paused), then tenboxd moves files; a clone makes
# overlays and starts workers. tenboxd bounds each; the CLI waits a little longer.
SNAPSHOT_TIMEOUT_SEC = 600.0
CLONE_TIMEOUT_SEC = 600.0


class _TakeByDefault(click.Group):
    """`tenbox vm snapshot NAME` takes a snapshot; `ls` and `rm` are subcommands (VM names cannot be
    told from them otherwise: a VM called `ls` is reached with `tenbox vm snapshot take ls`)."""

    def resolve_command(self, ctx: click.Context, args: List[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["take"] + list(args)
        return super().resolve_command(ctx, args)


@click.group("snapshot", cls=_TakeByDefault)
def snapshot_group():
    """Take, list and remove a VM's snapshots (its machine state, RAM and a disk layer).

    \b
    Example:
      tenbox vm snapshot web --name warm
      tenbox vm snapshot ls web
      tenbox vm restore web warm
      tenbox vm clone web/warm --name agent --count 10
      tenbox vm snapshot rm web warm
    """


@snapshot_group.command("take")
@click.argument("vm", **complete.VM)
@click.option("--name", "snap", metavar="S", help="The snapshot's name ([A-Za-z0-9-], default snap-N).")
@json_option
@pass_app
@handle_errors
def snapshot_take(app: App, vm: str, snap: Optional[str], as_json: bool):
    """Snapshot a VM, running or stopped. A running guest is paused while its RAM is written, then runs
    on; its disks go on as new overlays on the snapshot's read-only layer.

    \b
    Example:
      tenbox vm snapshot web --name warm
    """
    payload = {"vm_id": vm}
    if snap is not None:
        payload["name"] = snap
    result = app.client(timeout=max(app.timeout, SNAPSHOT_TIMEOUT_SEC)).request(Method.VM_SNAPSHOT, payload)
    if as_json:
        output.emit_json(result)
        return
    if result["running"]:
        click.echo("%s: snapshot %s taken (%s of RAM and state, guest paused %.0f ms)"
                   % (vm, result["name"], output.size(result["file_bytes"]), result["paused_ms"]))
    else:
        click.echo("%s: snapshot %s taken (stopped VM: disks only)" % (vm, result["name"]))


@snapshot_group.command("ls")
@click.argument("vm", **complete.VM)
@json_option
@pass_app
@handle_errors
def snapshot_ls(app: App, vm: str, as_json: bool):
    """List a VM's snapshots, oldest first.

    \b
    Example:
      tenbox vm snapshot ls web
    """
    result = app.client().request(Method.VM_SNAPSHOT_LIST, {"vm_id": vm})
    if as_json:
        output.emit_json(result["snapshots"])
        return
    rows = [(s["name"], output.clock(s["created_at"]), "running" if s["running"] else "stopped",
             output.mib(s.get("memory_mb")), s.get("cpus"), output.size(s["file_bytes"]) if s["running"] else None,
             len(s["layers"])) for s in result["snapshots"]]
    output.table(("NAME", "TAKEN", "FROM", "MEMORY", "CPUS", "FILE", "LAYERS"), rows)


@snapshot_group.command("rm")
@click.argument("vm", **complete.VM)
@click.argument("snap", metavar="S")
@pass_app
@handle_errors
def snapshot_rm(app: App, vm: str, snap: str):
    """Remove a snapshot. Its disk layers stay while a VM's disks are built on them.

    \b
    Example:
      tenbox vm snapshot rm web warm
    """
    app.client().request(Method.VM_SNAPSHOT_REMOVE, {"vm_id": vm, "name": snap})
    click.echo("%s: snapshot %s removed" % (vm, snap))


@click.command("restore")
@click.argument("vm", **complete.VM)
@click.argument("snap", metavar="S")
@json_option
@pass_app
@handle_errors
def vm_restore(app: App, vm: str, snap: str, as_json: bool):
    """Put a VM back to snapshot S: a running VM is stopped first (its state since is lost); it then runs
    on from the snapshot (a snapshot of a stopped VM leaves it stopped, with the snapshot's disks).

    \b
    Example:
      tenbox vm restore web warm
    """
    result = app.client(timeout=max(app.timeout, CLONE_TIMEOUT_SEC)).request(
        Method.VM_RESTORE, {"vm_id": vm, "name": snap})
    if as_json:
        output.emit_json(result)
        return
    click.echo("%s: restored to %s, %s" % (vm, snap, result["state"]))
    for path in result.get("detached") or []:
        output.err("%s: disk %s was added after snapshot %s: detached, its file kept" % (vm, path, snap))


@click.command("clone")
@click.argument("snapshot", metavar="[VM/]S")
@click.option("--name", required=True, help="The new VM's name; with --count K, NAME-1 .. NAME-K.")
@click.option("--count", type=click.IntRange(1, 64), default=1, show_default=True, help="How many VMs.")
@click.option("--no-hostfwds", is_flag=True, help="Leave out the snapshot's host port forwards.")
@json_option
@pass_app
@handle_errors
def vm_clone(app: App, snapshot: str, name: str, count: int, no_hostfwds: bool, as_json: bool):
    """Start new VMs from a snapshot: each gets its own disk overlays on the snapshot's layers and its own
    MAC, and continues from the snapshot's RAM, shared between the clones until they write it.

    \b
    Example:
      tenbox vm clone web/warm --name agent --count 10
    """
    result = app.client(timeout=max(app.timeout, CLONE_TIMEOUT_SEC)).request(
        Method.VM_CLONE, {"snapshot": snapshot, "name": name, "count": count, "no_hostfwds": no_hostfwds})
    failed = [v for v in result["vms"] if v.get("error")]
    if as_json:
        output.emit_json(result)
    else:
        rows = [(v["name"], v["id"], v["state"], (v.get("net") or {}).get("mac"), v.get("error"))
                for v in result["vms"]]
        output.table(("NAME", "ID", "STATE", "MAC", "ERROR"), rows)
        click.echo("%d clone(s) of %s started in %.2f s" % (len(result["vms"]) - len(failed), result["snapshot"],
                                                           result["start_sec"]), err=True)
    if failed:
        output.err("%d of %d clones did not start: %s" % (len(failed), len(result["vms"]), failed[0]["error"]))
        sys.exit(ExitCode.FAILED)
