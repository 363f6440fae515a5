"""`tenbox events`: what happens to VMs, images and updates, from tenboxd's event log, as it happens (CLI)."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import Any, Dict, Optional

import click

from tenbox_ctl.app import App, handle_errors, pass_app
from tenbox_ctl.client import CliError
from tenbox_supervisor.protocol import Event, EventKind, Method

_AGO_RE = re.compile(r"(\d+)([smhd])\Z")
_UNIT_SEC = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(ctx, param, value: Optional[str]) -> Optional[float]:
    """`10m`, `90s`, `2h`, `1d` ago; seconds since the epoch; or a local time `2026-12-05T14:00:00`."""
    if value is None:
        return None
    m = _AGO_RE.match(value)
    if m:
        return time.time() - int(m.group(1)) * _UNIT_SEC[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter("%r: give a duration ago (30s, 10m, 2h, 1d), seconds since the epoch or a local "
                                 "time (2026-12-05T14:00:00)" % value) from None


def describe(e: Dict[str, Any]) -> str:
    """One event for people: `2026-12-05T15:10:11 vm.state web: running -> crashed (killed: ...)`."""
    when = datetime.fromtimestamp(e.get("time") or 0).strftime("%Y-%m-%dT%H:%M:%S")
    kind = e.get("kind")
    who = e.get("name") or e.get("vm_id") or e.get("image") or ""
    if kind == EventKind.VM_STATE.value:
        what = "%s -> %s (%s)" % (e.get("old"), e.get("new"), e.get("reason"))
    elif kind == EventKind.VM_RESTART.value:
        action = e.get("action")
        if action == "scheduled":
            what = "restart %s in %ss" % (e.get("attempt"), e.get("backoff_sec"))
        elif action == "gave_up":
            what = "gave up: %s" % e.get("reason")
        else:
            what = "%s (%s)" % (action, e.get("why"))
    elif kind == EventKind.VM_SNAPSHOT.value:
        what = "snapshot %s %s%s" % (e.get("snapshot"), e.get("action"),
                                     " into %s" % ", ".join(e.get("clones") or []) if e.get("clones") else "")
    elif kind == EventKind.HOST_UPDATE.value:
        what = "%s from %s to %s%s" % (e.get("action"), e.get("from"), e.get("to") or "the newest",
                                       ": %s" % e["error"] if e.get("error") else "")
    elif kind in (EventKind.VM_DISK_ADDED.value, EventKind.VM_DISK_RESIZED.value):
        what = "disk %s %s, %s bytes%s" % (e.get("index"), e.get("disk"), e.get("size_bytes"),
                                          " (live)" if e.get("live") else "")
    else:
        what = e.get("vm_id") or ""
    return "%s %s %s: %s" % (when, kind, who, what)


@click.command("events")
@click.option("--since", callback=parse_since, metavar="WHEN",
              help="Replay the kept events from then: 30s, 10m, 2h, 1d ago, epoch seconds, or 2026-12-05T14:00:00.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@pass_app
@handle_errors
def events(app: App, since: Optional[float], follow: bool, as_json: bool):
    """Print what happens to VMs (state changes, failures, restarts), images and updates.

    tenboxd keeps the last 1000 events in memory; --since replays those.

    \b
    Example:
      tenbox events
      tenbox events --since 1h --no-follow --json | jq 'select(.kind == "vm.state")'
    """
    payload: Dict[str, Any] = {"follow": follow}
    if since is not None:
        payload["since"] = max(since, 0.0)
    conn = app.client().stream(Method.EVENTS, payload)
    try:
        for ev in conn.events():
            if ev.get("type") == Event.EVENT.value:
                entry = ev.get("payload") or {}
                click.echo(json.dumps(entry, sort_keys=True) if as_json else describe(entry))
            elif ev.get("type") == Event.EVENTS_CLOSED.value:
                raise CliError("tenboxd stopped the events: %s" % ev.get("reason"))
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
