"""`tenbox vm stats`: CPU, memory, disk and network use of running VMs, once or every second (CLI)."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Sequence

import click

from tenbox_ctl import complete, output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_supervisor.protocol import Method

STREAM_INTERVAL_SEC = 1.0
HEADERS = ("NAME", "STATE", "CPU %", "MEM (OUTSIDE GUEST)", "GUEST RAM USED", "BLOCK R/W", "BLOCK OPS R/W",
           "NET RX/TX", "PACKETS RX/TX", "UPTIME")


def _sum(disks: Sequence[Dict[str, Any]], key: str) -> Optional[int]:
    values = [d[key] for d in disks if isinstance(d.get(key), int)]
    return sum(values) if values else None


def _pair(a: Optional[int], b: Optional[int], fmt=output.size) -> str:
    if a is None and b is None:
        return "-"
    return "%s / %s" % (fmt(a), fmt(b))


def row(vm: Dict[str, Any]) -> List[Any]:
    """One VM for people: sums over its disks, the card's counters."""
    mem = vm.get("memory") or {}
    disks = vm.get("disks") or []
    net = vm.get("net") or {}
    cpu = vm.get("cpu_percent")
    used = mem.get("guest_ram_touched_bytes")
    guest = mem.get("guest_ram_bytes")
    return [
        vm["name"], vm["state"],
        "%.1f" % cpu if cpu is not None else "-",
        output.size(mem.get("rss_outside_guest_bytes")),
        "%s of %s" % (output.size(used), output.size(guest)) if used is not None else "-",
        _pair(_sum(disks, "read_bytes"), _sum(disks, "write_bytes")),
        _pair(_sum(disks, "read_ops"), _sum(disks, "write_ops"), str),
        _pair(net.get("rx_bytes"), net.get("tx_bytes")),
        _pair(net.get("rx_packets"), net.get("tx_packets"), str),
        output.duration(vm.get("uptime_sec")),
    ]


@click.command("stats")
@click.argument("vms", nargs=-1, metavar="[NAME...]", **complete.VM)
@click.option("--no-stream", is_flag=True, help="Print one sample and exit (default: a new one every second).")
@json_option
@pass_app
@handle_errors
def vm_stats(app: App, vms: Sequence[str], no_stream: bool, as_json: bool):
    """Show what running VMs use: CPU %, memory, disk and network counters, uptime.

    CPU % is of one core (200 is two cores busy). MEM is the worker's
    resident memory outside guest RAM; GUEST RAM USED the guest RAM with
    host pages behind it. Counters count since the VM's worker started.
    Without names: every running VM. With --json: one JSON list per sample,
    on one line.

    \b
    Example:
      tenbox vm stats --no-stream
      tenbox vm stats web db --json --no-stream | jq '.[0].net.rx_bytes'
    """
    client = app.client()
    payload = {"vm_ids": list(vms)} if vms else {}
    first = True
    try:
        while True:
            sample = client.request(Method.VM_STATS, payload)["vms"]
            if as_json:
                click.echo(json.dumps(sample, sort_keys=True))
            else:
                if not no_stream and not first:
                    click.echo()
                output.table(HEADERS, [row(vm) for vm in sample])
            if no_stream:
                return
            first = False
            time.sleep(STREAM_INTERVAL_SEC)
    except KeyboardInterrupt:
        pass
