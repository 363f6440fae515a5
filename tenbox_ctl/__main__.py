"""tenboxctl / tenbox: the operator CLI (any user in the tenbox group, or root).

Exit codes: tenbox_supervisor.protocol.ExitCode and its EXIT_CODES table,
printed by `tenbox --help` and so in the manual page.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import DefaultDict, List

import click

from tenbox_ctl import complete
from tenbox_ctl.app import App
from tenbox_ctl.client import DEFAULT_TIMEOUT_SEC
from tenbox_ctl.events import events
from tenbox_ctl.host import host_group
from tenbox_ctl.image import image_group
from tenbox_ctl.system import doctor, system_group, version
from tenbox_ctl.vm import vm_group
from tenbox_ctl.vm_disk import disk_group
from tenbox_ctl.vm_snapshot import snapshot_group, vm_clone, vm_restore
from tenbox_ctl.vm_ssh import vm_ssh
from tenbox_ctl.vm_stats import vm_stats
from tenbox_supervisor.protocol import EXIT_CODES, VERSION, ExitCode


def exit_status_help() -> str:
    """The exit codes and which of tenboxd's error codes lead to each (help2man makes it a man page section)."""
    codes: DefaultDict[ExitCode, List[str]] = defaultdict(list)
    for error, status in EXIT_CODES.items():
        codes[status].append(error.value)
    lines = ["\b", "Exit status:"]
    for status in ExitCode:
        note = ""
        if status is ExitCode.FAILED:
            note = "; error codes: all but those named below"
        elif codes[status]:
            note = "; error code%s: %s" % ("s" if len(codes[status]) > 1 else "", ", ".join(sorted(codes[status])))
        lines.append("  %d  %s%s" % (status, status.meaning, note))
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=exit_status_help())
@click.option("--socket", "socket_path", envvar="TENBOX_SOCK", metavar="PATH",
              help="tenboxd's control socket (default: the seed's lookup, /run/tenbox/tenbox.sock first).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=DEFAULT_TIMEOUT_SEC, show_default=True,
              help="Seconds to wait for tenboxd.")
@click.version_option(VERSION, prog_name="tenbox")
@click.pass_context
def cli(ctx: click.Context, socket_path, timeout):
    """Manage tenbox VMs through tenboxd.

    \b
    Example:
      tenbox vm ls
      tenbox vm create demo --kernel ./vmlinuz --initrd ./initrd.img && tenbox vm start demo
    """
    ctx.obj = App(socket_path, timeout)


vm_group.add_command(vm_stats)  # in modules of their own: vm.py is long enough
vm_group.add_command(disk_group)
vm_group.add_command(snapshot_group)
vm_group.add_command(vm_restore)
vm_group.add_command(vm_clone)
vm_group.add_command(vm_ssh)
cli.add_command(vm_group)
cli.add_command(system_group)
cli.add_command(host_group)
cli.add_command(image_group)
cli.add_command(events)
cli.add_command(doctor)
cli.add_command(version)


def main() -> None:
    # Installed as both names; each has its own completion script and variable (complete.py).
    prog = os.path.basename(sys.argv[0]) if os.path.basename(sys.argv[0]) in complete.PROGS else "tenbox"
    if complete.answering_old_click(prog, dict(os.environ)):
        return  # click 7 cannot answer click 8's completion scripts: complete nothing, run nothing
    cli(prog_name=prog)


if __name__ == "__main__":
    main()
