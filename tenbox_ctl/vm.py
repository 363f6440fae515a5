"""`tenbox vm ...`: create, start, stop, inspect and attach to VMs (CLI)."""

from __future__ import annotations

import base64
import os
import sys
from typing import Optional

import click

from tenbox_ctl import complete, output
from tenbox_ctl.app import App, handle_errors, json_option, pass_app
from tenbox_ctl.client import CliError
from tenbox_supervisor.protocol import ErrorCode, Event, ExitCode, Method


RESTART_HELP = ("Restart policy: no, on-failure[:N] (a crashed, killed or lost worker; at most N restarts in a "
                "row) or always (also after the guest powers off); waits 1 s, 2 s, 4 s ... up to 60 s between "
                "restarts. Default: no.")


@click.group("vm")
def vm_group():
    """Manage virtual machines.

    \b
    Example:
      tenbox vm create web --kernel ./vmlinuz --initrd ./initrd.img --memory 512
      tenbox vm start web && tenbox vm console web
    """


def _abs(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(path) if path else None


# A file given to --ssh-key, --user-data or --network-config is read by the CLI, with the
# operator's rights, and sent in the request; tenboxd checks it (and its size) again.
PROVISION_FILE_MAX = 1 << 20


def _read_input(path: str, what: str) -> bytes:
    """The bytes of `path` ('-': standard input), at most PROVISION_FILE_MAX; a one-line error else."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(PROVISION_FILE_MAX + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(PROVISION_FILE_MAX + 1)
    except OSError as e:
        raise CliError("cannot read %s %s: %s" % (what, path, e.strerror or e), ExitCode.USAGE) from None
    if len(data) > PROVISION_FILE_MAX:
        raise CliError("%s %s is larger than %d KiB" % (what, path, PROVISION_FILE_MAX >> 10), ExitCode.USAGE)
    return data


def _text_input(path: str, what: str) -> str:
    try:
        return _read_input(path, what).decode("utf-8")
    except UnicodeDecodeError:
        raise CliError("%s %s is not UTF-8 text" % (what, path), ExitCode.USAGE) from None


def _cloud_init(ssh_keys, user, hostname, user_data, network_config) -> Optional[dict]:
    """vm.create's and vm.edit's cloud_init object from the options given; None when none was."""
    out = {}
    if (list(ssh_keys) + [user_data, network_config]).count("-") > 1:
        raise CliError("standard input (-) can be read once: give one of --ssh-key, --user-data, "
                       "--network-config as -", ExitCode.USAGE)
    if ssh_keys:
        out["ssh_keys"] = "\n".join(_text_input(k, "SSH key file") for k in ssh_keys)
    if user is not None:
        out["user"] = user
    if hostname is not None:
        out["hostname"] = hostname
    if user_data is not None:
        out["user_data_b64"] = base64.b64encode(_read_input(user_data, "user-data file")).decode()
    if network_config is not None:
        out["network_config"] = _text_input(network_config, "network-config file")
    return out or None


def _provision_options(command):
    """--ssh-key, --user, --hostname, --user-data, --network-config (vm create and vm edit)."""
    options = [
        click.option("--network-config", metavar="FILE", help="cloud-init network-config (v1 or v2 YAML)."),
        click.option("--user-data", metavar="FILE|-", help="cloud-init user-data: #cloud-config, a #! script or "
                     "MIME multipart, gzip'd or not, at most 256 KiB."),
        click.option("--hostname", help="The guest's host name (cloud-init; default: the VM's name)."),
        click.option("--user", help="A user cloud-init makes, with sudo and the --ssh-key keys (default: the "
                     "image's default user gets the keys)."),
        click.option("--ssh-key", "ssh_keys", multiple=True, metavar="FILE|-",
                     help="OpenSSH public key file(s) for the user; repeatable."),
    ]
    for option in options:
        command = option(command)
    return command


def _disk_option(ctx, param, values):
    """`PATH[,ro][,serial=S][,format=F]` -> {"path": absolute, "read_only": bool, "serial": str[, "format": F]}."""
    disks = []
    for spec in values or ():
        parts = spec.split(",")
        if not parts[0]:
            raise click.BadParameter("%r: the path is empty" % spec)
        disk = {"path": os.path.abspath(parts[0]), "read_only": False, "serial": ""}
        for opt in parts[1:]:
            if opt in ("ro", "readonly"):
                disk["read_only"] = True
            elif opt.startswith("serial="):
                disk["serial"] = opt[len("serial="):]
            elif opt.startswith("format="):
                disk["format"] = opt[len("format="):]
            else:
                raise click.BadParameter("%r: unknown option %r (ro, serial=S, format=raw|qcow2)" % (spec, opt))
        disks.append(disk)
    return disks


def _disk_line(d: dict) -> str:
    notes = [n for n in (d.get("format"), "ro" if d.get("read_only") else None) if n]
    return d["path"] + (" (%s)" % ", ".join(notes) if notes else "")


def _net_line(net: dict) -> str:
    if not net.get("enabled"):
        return "none"
    return "%s, link %s" % (net.get("mac"), "up" if net.get("link_up", True) else "down")


def _restart_line(vm: dict) -> str:
    """The policy and, while it acts on the VM, its attempts: "on-failure:3, restart 2/3 at 14:02:11"."""
    policy = vm.get("restart") or "no"
    status = vm.get("restart_status") or {}
    if not status:
        return policy
    done = status.get("attempts", 0)
    if status.get("gave_up"):
        return "%s, gave up after %d" % (policy, done)
    if status.get("next_retry_at") is None:
        return "%s, restarted %d" % (policy, done)
    most = status.get("max_retries")
    return "%s, restart %d%s at %s" % (policy, done + 1, "/%d" % most if most else "", output.clock(status["next_retry_at"]))


def _print_vm(vm: dict, as_json: bool) -> None:
    if as_json:
        output.emit_json(vm)
        return
    rows = [
        ("id", vm.get("id")), ("name", vm.get("name")),
        ("state", "%s (%s)" % (vm.get("state"), vm["state_reason"]) if vm.get("state_reason") else vm.get("state")),
        ("image", vm.get("image")),
        ("cpus", vm.get("cpus")), ("memory", output.mib(vm.get("memory_mb"))),
        ("kernel", vm.get("kernel")), ("initrd", vm.get("initrd")), ("cmdline", vm.get("cmdline") or "(runtime default)"),
        ("disks", ", ".join(_disk_line(d) for d in vm.get("disks") or []) or "-"),
        ("network", _net_line(vm.get("net") or {})),
        ("forwards", ", ".join((vm.get("net") or {}).get("hostfwds", []) + (vm.get("net") or {}).get("guestfwds", [])) or "-"),
        ("pid", vm.get("pid")), ("uptime", output.duration(vm.get("uptime_sec"))),
        ("autostart", "yes" if vm.get("autostart") else "no"), ("restart", _restart_line(vm)),
        ("gave up", (vm.get("restart_status") or {}).get("gave_up")),
        ("last failure", output.failure(vm.get("last_failure"))),
        ("cloud-init", _cloud_init_line(vm.get("cloud_init"))),
    ]
    for k, v in rows:
        click.echo("%-13s %s" % (k + ":", "-" if v is None else v))
    for spec, reason in (vm.get("net_status") or {}).get("failures", []):
        click.echo("%-13s %s: %s" % ("failed fwd:", spec, reason))


def _cloud_init_line(ci: Optional[dict]) -> Optional[str]:
    if not ci:
        return None
    parts = ["instance %s" % ci.get("instance_id")]
    if ci.get("hostname"):
        parts.append("host %s" % ci["hostname"])
    if ci.get("user"):
        parts.append("user %s" % ci["user"])
    parts.append("%d key(s)" % (ci.get("ssh_keys") or 0))
    if ci.get("user_data_bytes"):
        parts.append("user-data %d B" % ci["user_data_bytes"])
    if ci.get("network_config_bytes"):
        parts.append("network-config %d B" % ci["network_config_bytes"])
    return ", ".join(parts)


@vm_group.command("ls")
@json_option
@pass_app
@handle_errors
def vm_ls(app: App, as_json: bool):
    """List VMs with their state.

    \b
    Example:
      tenbox vm ls
      tenbox vm ls --json | jq '.[] | select(.state == "running") | .id'
    """
    vms = app.client().request(Method.VM_LIST)["vms"]
    if as_json:
        output.emit_json(vms)
        return
    rows = []
    for v in vms:
        if v.get("state") == "broken":
            rows.append((v["id"], "-", "broken", "-", "-", "-", "-", "-", v.get("error")))
            continue
        rows.append((v["id"], v["name"], v["state"], v["cpus"], output.mib(v["memory_mb"]),
                     output.duration(v.get("uptime_sec")), "yes" if v.get("autostart") else "no", _restart_line(v),
                     output.failure(v.get("last_failure"))))
    output.table(("ID", "NAME", "STATE", "CPUS", "MEMORY", "UPTIME", "AUTOSTART", "RESTART", "LAST FAILURE"), rows)


@vm_group.command("show")
@click.argument("vm", **complete.VM)
@json_option
@pass_app
@handle_errors
def vm_show(app: App, vm: str, as_json: bool):
    """Show one VM in detail.

    \b
    Example:
      tenbox vm show web
    """
    for v in app.client().request(Method.VM_LIST)["vms"]:
        if v["id"] == vm or v.get("name") == vm:
            _print_vm(v, as_json)
            return
    raise CliError("no VM with id or name %r (%s)" % (vm, ErrorCode.VM_NOT_FOUND.value), error_code=ErrorCode.VM_NOT_FOUND)


@vm_group.command("create")
@click.argument("name")
@click.option("--image", metavar="IMAGE", **complete.IMAGE, help="An image from the store (tenbox image ls): its kernel, initrd and "
              "command line, and the VM's own qcow2 overlay of its root file system as the first disk.")
@click.option("--kernel", type=click.Path(dir_okay=False), help="bzImage or ELF vmlinux (required without --image).")
@click.option("--initrd", type=click.Path(dir_okay=False), help="Initial ramdisk.")
@click.option("--cmdline", help="Kernel command line (default: the image's, else the runtime's, console on ttyS0).")
@click.option("--memory", type=click.IntRange(16), default=256, show_default=True, help="RAM in MiB.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True, help="Number of vCPUs.")
@click.option("--disk", "disks", multiple=True, callback=_disk_option, metavar="PATH[,ro][,serial=S][,format=F]",
              help="A disk image (raw or qcow2); repeat for more.")
@click.option("--template", type=click.Path(dir_okay=False), help="Give the VM its own qcow2 overlay of this image as its first disk.")
@click.option("--net/--no-net", "net", default=True, show_default=True, help="Network link up at boot (user-mode NAT).")
@click.option("--hostfwd", "hostfwds", multiple=True, metavar="SPEC", help="Host -> guest forward, e.g. tcp:127.0.0.1:2222-:22.")
@click.option("--guestfwd", "guestfwds", multiple=True, metavar="SPEC", help="Guest -> host forward, e.g. guestfwd:10.0.2.3:80-127.0.0.1:18981.")
@click.option("--autostart", is_flag=True, help="Start the VM when tenboxd starts after a host boot.")
@click.option("--restart", metavar="POLICY", help=RESTART_HELP)
@_provision_options
@json_option
@pass_app
@handle_errors
def vm_create(app: App, name, image, kernel, initrd, cmdline, memory, cpus, disks, template, net, hostfwds, guestfwds,
              autostart, restart, ssh_keys, user, hostname, user_data, network_config, as_json):
    """Create a VM (stopped); prints its id.

    With --image, the VM boots the image's kernel and initrd with its
    command line, from its own qcow2 overlay of the image's root file system
    (vms/ID/disk.qcow2, deleted with the VM; the template is never written).

    \b
    Example:
      tenbox vm create web --image deb12 --memory 512 --cpus 2
      tenbox vm create tiny --kernel /srv/vmlinuz --initrd /srv/initrd.img --memory 512
      tenbox vm create db --kernel /srv/vmlinuz --template /srv/debian.qcow2 --disk /srv/data.raw,serial=data
      tenbox vm create svc --image deb12 --autostart --restart on-failure:5
      tenbox vm create box --image cloud --ssh-key ~/.ssh/id_ed25519.pub --user me --user-data init.yaml

    With --ssh-key, --user, --hostname, --user-data or --network-config,
    the VM gets a cloud-init NoCloud seed (a read-only disk labelled cidata,
    its last) and its own instance-id: an image with cloud-init applies
    them at its first boot.
    """
    if not kernel and not image:
        raise click.UsageError("give --image IMAGE or --kernel PATH")
    if image and template:
        raise click.UsageError("--image and --template do not go together (the image brings its template)")
    payload = {"name": name, "image": image, "kernel": _abs(kernel), "initrd": _abs(initrd), "memory_mb": memory,
               "cpus": cpus, "disks": disks, "template": _abs(template), "net": net, "hostfwds": list(hostfwds),
               "guestfwds": list(guestfwds), "autostart": autostart}
    if restart is not None:
        payload["restart"] = restart
    if cmdline is not None:
        payload["cmdline"] = cmdline
    provision = _cloud_init(ssh_keys, user, hostname, user_data, network_config)
    if provision is not None:
        payload["cloud_init"] = provision
    vm = app.client().request(Method.VM_CREATE, payload)
    if as_json:
        output.emit_json(vm)
    else:
        click.echo(vm["id"])


@vm_group.command("edit")
@click.argument("vm", **complete.VM)
@click.option("--name", help="New name.")
@click.option("--kernel", type=click.Path(dir_okay=False))
@click.option("--initrd", type=click.Path(dir_okay=False))
@click.option("--cmdline")
@click.option("--memory", type=click.IntRange(16), help="RAM in MiB (VM stopped).")
@click.option("--cpus", type=click.IntRange(1, 64), help="vCPUs (VM stopped).")
@click.option("--disk", "disks", multiple=True, callback=_disk_option, metavar="PATH[,ro][,serial=S][,format=F]",
              help="Replace the disks (VM stopped).")
@click.option("--net", type=click.Choice(["on", "off"]), help="Network link up or down, also while running.")
@click.option("--hostfwd", "hostfwds", multiple=True, metavar="SPEC", help="Replace the host forwards (also while running).")
@click.option("--guestfwd", "guestfwds", multiple=True, metavar="SPEC", help="Replace the guest forwards (also while running).")
@click.option("--clear-forwards", is_flag=True, help="Remove every host and guest forward.")
@click.option("--autostart/--no-autostart", default=None, help="Start the VM when tenboxd starts after a host boot.")
@click.option("--restart", metavar="POLICY", help=RESTART_HELP)
@_provision_options
@click.option("--reprovision", is_flag=True, help="A new cloud-init instance-id: the guest provisions itself "
              "again at its next boot.")
@json_option
@pass_app
@handle_errors
def vm_edit(app: App, vm, name, kernel, initrd, cmdline, memory, cpus, disks, net, hostfwds, guestfwds,
            clear_forwards, autostart, restart, ssh_keys, user, hostname, user_data, network_config, reprovision,
            as_json):
    """Change a VM's settings; hardware changes need it stopped, the network changes live.

    \b
    Example:
      tenbox vm edit web --memory 1024 --cpus 2
      tenbox vm edit web --net off
      tenbox vm edit web --hostfwd tcp:127.0.0.1:8080-:80 --hostfwd udp::5353-:53
      tenbox vm edit web --restart always --autostart
      tenbox vm edit box --ssh-key new.pub --reprovision

    The cloud-init options replace the VM's values in its seed, read at its
    next boot; the guest's cloud-init applies its once-per-instance steps
    (users, keys, host name) again only with --reprovision.
    """
    payload = {"vm_id": vm, "name": name, "kernel": _abs(kernel), "initrd": _abs(initrd), "cmdline": cmdline,
               "memory_mb": memory, "cpus": cpus, "disks": disks or None, "net": net, "autostart": autostart,
               "restart": restart}
    if clear_forwards:
        payload["hostfwds"], payload["guestfwds"] = [], []
    if hostfwds:
        payload["hostfwds"] = list(hostfwds)
    if guestfwds:
        payload["guestfwds"] = list(guestfwds)
    payload["cloud_init"] = _cloud_init(ssh_keys, user, hostname, user_data, network_config)
    if reprovision:
        payload["reprovision"] = True
    payload = {k: v for k, v in payload.items() if v is not None}
    if len(payload) == 1:
        raise click.UsageError("nothing to change: give at least one option")
    result = app.client().request(Method.VM_EDIT, payload)
    _print_vm(result, as_json)
    _warn_forwards(result.get("forward_failures"))


def _warn_forwards(failures) -> None:
    for spec, reason in failures or []:
        output.err("forward %s failed: %s" % (spec, reason))


def _simple(verb: str, method: Method, doc: str, timeout_option: bool = False):
    @click.argument("vm", **complete.VM)
    @json_option
    @pass_app
    @handle_errors
    def command(app: App, vm: str, as_json: bool, timeout: Optional[int] = None):
        payload = {"vm_id": vm}
        client_timeout = None
        if timeout is not None:
            payload["timeout"] = timeout
            client_timeout = timeout + 30
        result = app.client(client_timeout).request(method, payload)
        if method is Method.VM_START:
            _warn_forwards((result.get("net_status") or {}).get("failures"))
        if as_json:
            output.emit_json(result)
        else:
            extra = ""
            if method is Method.VM_SHUTDOWN and result.get("graceful") is False:
                extra = " (the guest ignored the power button; stopped hard)"
            click.echo("%s: %s%s" % (result.get("id", vm), result.get("state", "ok"), extra))

    command.__doc__ = doc
    if timeout_option:
        command = click.option("--timeout", type=click.IntRange(1, 3600), help="Seconds to wait before a hard stop.")(command)
    return vm_group.command(verb)(command)


_simple("start", Method.VM_START, """Start a VM and wait until it runs.

    \b
    Example:
      tenbox vm start web
    """)
_simple("stop", Method.VM_STOP, """Stop a VM now (hard stop: like pulling the plug, disks flushed).

    On a crashed VM waiting for a restart, cancels the restart.

    \b
    Example:
      tenbox vm stop web
    """, timeout_option=True)
_simple("shutdown", Method.VM_SHUTDOWN, """Ask the guest to power off (its power button); hard stop after the timeout.

    \b
    Example:
      tenbox vm shutdown web --timeout 120
    """, timeout_option=True)
_simple("reboot", Method.VM_REBOOT, """Reset the VM (like the reset button).

    \b
    Example:
      tenbox vm reboot web
    """)


@vm_group.command("rm")
@click.argument("vm", **complete.VM)
@click.option("--force", is_flag=True, help="Stop the VM first if it is running.")
@pass_app
@handle_errors
def vm_rm(app: App, vm: str, force: bool):
    """Delete a VM and its folder.

    \b
    Example:
      tenbox vm rm web --force
    """
    result = app.client(120).request(Method.VM_DELETE, {"vm_id": vm, "force": force})
    click.echo("%s: deleted" % result.get("id", vm))


@vm_group.command("console")
@click.argument("vm", **complete.VM)
@pass_app
@handle_errors
def vm_console(app: App, vm: str):
    """Attach to a VM's serial console; Ctrl-] detaches.

    \b
    Example:
      tenbox vm console web
    """
    from tenbox_ctl.console import attach

    sys.exit(attach(app.client(), vm))


@vm_group.command("logs")
@click.argument("vm", **complete.VM)
@click.option("--lines", "-n", type=click.IntRange(0, 10000), default=200, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new console lines.")
@click.option("--runtime", is_flag=True, help="The worker's own log instead of the guest console.")
@json_option
@pass_app
@handle_errors
def vm_logs(app: App, vm: str, lines: int, follow: bool, runtime: bool, as_json: bool):
    """Print a VM's console log (or its worker log with --runtime).

    \b
    Example:
      tenbox vm logs web -n 50 -f
    """
    client = app.client()
    result = client.request(Method.VM_LOGS, {"vm_id": vm, "lines": lines, "source": "runtime" if runtime else "console"})
    if as_json and not follow:
        output.emit_json(result)
        return
    for line in result["lines"]:
        click.echo(line)
    if not follow:
        return
    if runtime:
        raise click.UsageError("--follow works on the console log only")
    conn = client.stream(Method.VM_LOGS_FOLLOW, {"vm_id": vm})
    try:
        for ev in conn.events():
            if ev.get("type") == Event.LOGS_APPEND.value:
                for line in ev.get("payload", {}).get("lines", []):
                    click.echo(line)
            elif ev.get("type") == Event.LOGS_CLOSED.value:
                break
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()

