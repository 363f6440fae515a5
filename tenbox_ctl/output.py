"""Tables for people, JSON for scripts (CLI)."""

from __future__ import annotations

import json
import time
from typing import Any, List, Optional, Sequence

import click


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: List[Sequence[Any]]) -> None:
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    fmt = "  ".join("{:<%d}" % w for w in widths)
    click.echo(fmt.format(*headers).rstrip())
    for row in cells:
        click.echo(fmt.format(*row).rstrip())


def duration(sec: Optional[float]) -> str:
    if sec is None:
        return "-"
    sec = int(sec)
    if sec < 60:
        return "%ds" % sec
    if sec < 3600:
        return "%dm%02ds" % (sec // 60, sec % 60)
    if sec < 86400:
        return "%dh%02dm" % (sec // 3600, sec % 3600 // 60)
    return "%dd%02dh" % (sec // 86400, sec % 86400 // 3600)


def clock(when: Optional[float]) -> str:
    """A wall-clock time for people: 14:02:11, local time."""
    if when is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(when))


def mib(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return "%d MiB" % value if value < 10240 else "%.1f GiB" % (value / 1024)


def size(value: Optional[int]) -> str:
    """Bytes for people, binary units: 512 B, 3.2 MiB, 2.0 GiB."""
    if value is None:
        return "-"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift:
            return "%.1f %s" % (value / (1 << shift), unit)
    return "%d B" % value


def failure(f: Optional[dict]) -> str:
    if not f:
        return "-"
    return "%s: %s" % (f.get("code"), f.get("message"))


def err(message: str) -> None:
    click.echo("tenbox: %s" % message, err=True)
