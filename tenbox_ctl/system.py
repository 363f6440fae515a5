"""`tenbox doctor`, `tenbox system info`, `tenbox version` (CLI)."""

from __future__ import annotations

from typing import Optional

import click

from tenbox_ctl import output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_ctl.client import CliError
from tenbox_supervisor.protocol import VERSION, ExitCode, Method


@click.command("doctor")
@json_option
@pass_app
@handle_errors
def doctor(app: App, as_json: bool):
    """Check that this host can run VMs (asks tenboxd, which runs as root).

    \b
    Example:
      tenbox doctor
    """
    report = app.client().request(Method.DOCTOR)
    if as_json:
        output.emit_json(report)
    else:
        for c in report.get("checks", []):
            mark = "ok " if c["ok"] else ("FAIL" if c.get("required", True) else "warn")
            click.echo("%-4s %-20s %s" % (mark, c["id"], c["message"]))
        click.echo("supported: %s" % ("yes" if report.get("supported") else "no"))
    if not report.get("supported"):
        raise SystemExit(ExitCode.FAILED)


@click.group("system")
def system_group():
    """The host and the daemon.

    \b
    Example:
      tenbox system info --json
    """


@system_group.command("info")
@json_option
@pass_app
@handle_errors
def system_info(app: App, as_json: bool):
    """Show the daemon's version, paths, VM counts and host resources.

    \b
    Example:
      tenbox system info
    """
    info = app.client().request(Method.SYSTEM_INFO)
    if as_json:
        output.emit_json(info)
        return
    res = info.get("resources", {})
    summary = info.get("vm_summary", {})
    rows = [
        ("tenboxd", "%s (pid %s, up %s)" % (info.get("version"), info.get("pid"), output.duration(info.get("uptime_sec")))),
        ("data dir", info.get("data_dir")),
        ("socket", info.get("socket_path")),
        ("cloud", info.get("cloud_url") or "(disabled)"),
        ("VMs", ", ".join("%d %s" % (v, k) for k, v in summary.items() if v and k != "total") or "none"),
        ("CPUs", res.get("cpu_count")),
        ("memory", "%d MiB free of %d MiB" % (res.get("memory_available_bytes", 0) >> 20, res.get("memory_total_bytes", 0) >> 20)),
        ("disk", "%d GiB free of %d GiB" % (res.get("disk_available_bytes", 0) >> 30, res.get("disk_total_bytes", 0) >> 30)),
        ("KVM", "supported" if info.get("doctor", {}).get("supported") else "NOT supported (tenbox doctor)"),
        ("standby", _standby(info.get("standby_workers") or {})),
        ("KSM", _ksm(info.get("ksm"))),
    ]
    for k, v in rows:
        click.echo("%-9s %s" % (k + ":", v))


def _standby(s: dict) -> str:
    if not s.get("wanted"):
        return "off (TENBOX_STANDBY_WORKERS=0)"
    text = "%d of %d workers ready to take a VM's start" % (s.get("ready", 0), s["wanted"])
    if s.get("spares"):
        text += ", %d spare(s) sandboxed ahead" % len(s["spares"])
    return text


def _ksm(k: Optional[dict]) -> str:
    if not k:
        return "not in this kernel"
    if k.get("run") != 1:
        return "off (the workers offer it their interpreter's pages: docs/daemon.md, Standby workers)"
    return "running, %d MiB saved by its merges on this host" % (k.get("saved_bytes", 0) >> 20)


@click.command("version")
@json_option
@pass_app
def version(app: App, as_json: bool):
    """Print the CLI's version and, if reachable, the daemon's.

    \b
    Example:
      tenbox version
    """
    daemon = None
    try:
        daemon = app.client(5).request(Method.SYSTEM_INFO).get("version")
    except CliError:
        pass
    if as_json:
        output.emit_json({"client": VERSION, "daemon": daemon})
    else:
        click.echo("tenbox %s" % VERSION)
        click.echo("tenboxd %s" % (daemon or "(not reachable)"))
