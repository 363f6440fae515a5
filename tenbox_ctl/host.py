"""`tenbox host update`, `tenbox host update-log`: the self-update; `tenbox host shutdown-vms` (CLI; root)."""

from __future__ import annotations

import click

from tenbox_ctl import output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_ctl.client import CliError
from tenbox_supervisor.protocol import Method

UPDATE_TIMEOUT_SEC = 1800  # apt-get update + install on a slow mirror
# tenboxd's hard stop after the power button: its stop timeout, SIGKILL's wait, and slack.
HARD_STOP_SLACK_SEC = 45
SHUTDOWN_TIMEOUT_ENV = "TENBOX_SHUTDOWN_TIMEOUT"  # set in /etc/default/tenbox for tenbox-guests.service


@click.group("host")
def host_group():
    """This host's tenbox installation.

    \b
    Example:
      sudo tenbox host update
    """


@host_group.command("update")
@click.option("--version", "version", metavar="V", help="Install this version instead of the newest.")
@json_option
@pass_app
@handle_errors
def host_update(app: App, version, as_json):
    """Upgrade tenbox with apt, as the cloud's host.update does (root only; every VM must be stopped).

    \b
    Example:
      sudo tenbox host update
      sudo tenbox host update --version 0.7.5
    """
    payload = {}
    if version:
        payload["version"] = version
    try:
        result = app.client(UPDATE_TIMEOUT_SEC).request(Method.HOST_UPDATE, payload)
    except CliError as e:
        running = (e.reply or {}).get("running_vms")
        if running:
            for vm in running:
                output.err("still %s: %s (%s)" % (vm.get("state"), vm.get("name"), vm.get("vm_id")))
            output.err("stop them with 'tenbox vm stop <vm>', then run the update again")
        raise
    if as_json:
        output.emit_json(result)
    else:
        click.echo("updated tenbox from %s to %s" % (result.get("from"), result.get("to")))


@host_group.command("update-log")
@click.option("--lines", "-n", type=click.IntRange(0, 10000), default=200, show_default=True)
@json_option
@pass_app
@handle_errors
def host_update_log(app: App, lines: int, as_json: bool):
    """Show the transcript of the last update (root only).

    \b
    Example:
      sudo tenbox host update-log -n 50
    """
    result = app.client().request(Method.HOST_UPDATE_LOG, {"lines": lines})
    if as_json:
        output.emit_json(result)
        return
    for line in result.get("lines", []):
        click.echo(line)


@host_group.command("shutdown-vms")
@click.option("--timeout", type=click.IntRange(1, 3600), default=60, show_default=True, envvar=SHUTDOWN_TIMEOUT_ENV,
              help="Seconds each guest has after the power button before a hard stop (env %s)." % SHUTDOWN_TIMEOUT_ENV)
@json_option
@pass_app
@handle_errors
def host_shutdown_vms(app: App, timeout: int, as_json: bool):
    """Power off every running VM at once, as the host shuts down (root only).

    Each guest gets its power button, then a hard stop after the
    timeout; they end stopped with the reason host_shutdown, and restarts
    wait until tenboxd starts again. tenbox-guests.service runs this when
    the system shuts down; a package upgrade restarts tenboxd only and
    leaves the VMs running.

    \b
    Example:
      sudo tenbox host shutdown-vms --timeout 120
    """
    result = app.client(timeout + HARD_STOP_SLACK_SEC).request(Method.HOST_SHUTDOWN, {"timeout": timeout})
    if as_json:
        output.emit_json(result)
        return
    for vm in result.get("vms", []):
        how = {True: "powered off", False: "stopped hard (the guest ignored the power button)"}.get(vm.get("graceful"))
        click.echo("%s: %s" % (vm.get("name") or vm.get("id"), how or vm.get("error")))
