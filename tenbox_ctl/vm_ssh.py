"""`tenbox vm ssh NAME [-- CMD...]`: a shell or a command in a running VM over its SSH forward (CLI).

As `multipass shell` does, without the operator looking up ports:

- the VM's host forward to guest port 22 is used, or one is added on a free
  loopback port (vm.edit, live: the VM keeps running);
- the user is `--user`, else the one the VM was provisioned with
  (cloud-init), else root (tenbox's own images take the key for root);
- the key is `--identity`, else the private key in ~/.ssh whose public key
  the VM was given at create (matched by fingerprint), else whatever ssh
  would use (agent, defaults);
- sshd is waited for up to `--timeout` seconds, with one clear line if it
  never answers;
- each VM's host key is pinned in its own known_hosts file
  (~/.cache/tenbox/known_hosts/VM_ID, trust on first use), so VMs reusing a
  port, and clones with their own keys, never trip each other.

Then ssh replaces this process: its exit status is the command's.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Tuple

import click

from tenbox_ctl import complete
from tenbox_ctl.app import App, handle_errors, pass_app
from tenbox_ctl.client import CliError
from tenbox_supervisor.protocol import ExitCode, Method
from tenbox_vmm.protocol.forwards import ForwardSpecError, parse_hostfwd

SSH_PORT = 22
WAIT_DEFAULT_SEC = 120
PROBE_SEC = 10  # one `ssh ... true` try while waiting
RETRY_SEC = 2.0
PORT_TRIES = 5  # a free port can be taken between finding it and the forward listening on it
KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa", "id_ecdsa_sk", "id_ed25519_sk")


def ssh_forward(hostfwds: List[str]) -> Optional[Tuple[str, int]]:
    """(host address to connect to, port) of the first TCP forward to guest port 22, or None."""
    for spec in hostfwds:
        try:
            fwd = parse_hostfwd(spec)
        except ForwardSpecError:
            continue
        if fwd.is_udp or fwd.guest_port != SSH_PORT:
            continue
        addr = ipaddress.ip_address(fwd.host_addr)
        if addr.is_unspecified:  # listening on every address: loopback reaches it
            addr = ipaddress.ip_address("::1" if addr.version == 6 else "127.0.0.1")
        return str(addr), fwd.host_port
    return None


def fingerprint(pub_line: str) -> Optional[str]:
    words = pub_line.split()
    if len(words) < 2:
        return None
    try:
        blob = base64.b64decode(words[1], validate=True)
    except ValueError:
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def matching_key(fingerprints: List[str], ssh_dir: Path) -> Optional[Path]:
    """The private key in `ssh_dir` whose .pub has one of `fingerprints` (standard names first)."""
    if not fingerprints or not ssh_dir.is_dir():
        return None
    pubs = [ssh_dir / (n + ".pub") for n in KEY_NAMES] + sorted(ssh_dir.glob("*.pub"))
    for pub in pubs:
        private = pub.with_suffix("")
        try:
            line = pub.read_text(errors="replace").strip()
        except OSError:
            continue
        if fingerprint(line) in fingerprints and private.is_file():
            return private
    return None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add_forward(app: App, vm: dict) -> Tuple[str, int]:
    """A new forward 127.0.0.1:PORT -> guest :22 on the running VM; (address, port)."""
    hostfwds = list((vm.get("net") or {}).get("hostfwds", []))
    last = ""
    for _ in range(PORT_TRIES):
        port = _free_loopback_port()
        spec = "tcp:127.0.0.1:%d-:%d" % (port, SSH_PORT)
        result = app.client().request(Method.VM_EDIT, {"vm_id": vm["id"], "hostfwds": hostfwds + [spec]})
        failures = [reason for failed, reason in result.get("forward_failures") or [] if failed == spec]
        if not failures:
            click.echo("tenbox: added the forward %s to VM %s" % (spec, vm["name"]), err=True)
            return "127.0.0.1", port
        last = failures[0]
        app.client().request(Method.VM_EDIT, {"vm_id": vm["id"], "hostfwds": hostfwds})  # take it back
    raise CliError("could not add an SSH forward to VM %s: %s" % (vm["name"], last))


def _ssh_argv(user: str, addr: str, port: int, identity: Optional[Path], known_hosts: Path,
              extra: List[str]) -> List[str]:
    argv = ["ssh", "-p", str(port), "-o", "UserKnownHostsFile=%s" % known_hosts,
            "-o", "StrictHostKeyChecking=accept-new", "-o", "HostKeyAlias=tenbox-vm"]
    if identity is not None:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    return argv + extra + ["%s@%s" % (user, addr)]


def _wait_for_sshd(argv: List[str], name: str, addr: str, port: int, timeout: float) -> None:
    """Until `ssh ... true` gets in (BatchMode: never a prompt), or one line saying why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            r = subprocess.run(argv[:-1] + ["-o", "BatchMode=yes", "-o", "ConnectTimeout=%d" % PROBE_SEC,
                                            argv[-1], "true"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=PROBE_SEC + 5)
            if r.returncode == 0:
                return
            lines = r.stderr.decode(errors="replace").strip().splitlines()
            last = lines[-1] if lines else "ssh exit %d" % r.returncode
            if "Permission denied" in last or "Host key verification failed" in last:
                raise CliError("ssh to VM %s (%s:%d): %s" % (name, addr, port, last))
        except subprocess.TimeoutExpired:
            last = "no answer within %d s" % PROBE_SEC
        if time.monotonic() >= deadline:
            raise CliError("sshd on VM %s did not answer on %s:%d within %.0f s (last: %s); the guest may still "
                           "be booting (tenbox vm console %s)" % (name, addr, port, timeout, last, name))
        time.sleep(RETRY_SEC)


@click.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("vm", **complete.VM)
@click.option("--user", "-l", help="Log in as this user (default: the VM's cloud-init user, else root).")
@click.option("--identity", "-i", type=click.Path(dir_okay=False), help="Private key (default: the one in ~/.ssh "
              "that matches a key the VM was given).")
@click.option("--timeout", type=click.IntRange(0, 3600), default=WAIT_DEFAULT_SEC, show_default=True,
              help="Seconds to wait for sshd.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_app
@handle_errors
def vm_ssh(app: App, vm: str, user: Optional[str], identity: Optional[str], timeout: int, command):
    """Open a shell, or run a command, in a running VM over SSH.

    Uses the VM's host forward to guest port 22, or adds one on a free
    loopback port; waits for sshd.

    \b
    Example:
      tenbox vm ssh box
      tenbox vm ssh box -- hostname
      tenbox vm ssh web --user debian -i ~/.ssh/work_key -- sudo journalctl -b
    """
    info = app.client().request(Method.VM_LIST)
    found = [v for v in info.get("vms", []) if vm in (v.get("id"), v.get("name"))]
    if not found:
        raise CliError("no VM with id or name %r (vm_not_found)" % vm)
    v = found[0]
    if v.get("state") != "running":
        raise CliError("VM %s is %s; start it first (tenbox vm start %s)" % (v["name"], v.get("state"), v["name"]))
    where = ssh_forward((v.get("net") or {}).get("hostfwds", [])) or _add_forward(app, v)
    ci = v.get("cloud_init") or {}
    login = user or ci.get("user") or "root"
    key = Path(identity) if identity else matching_key(ci.get("ssh_key_fingerprints") or [], Path.home() / ".ssh")
    if key is not None and not os.access(str(key), os.R_OK):
        raise CliError("cannot read the key %s" % key, ExitCode.USAGE)
    known = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tenbox" / "known_hosts" / v["id"]
    known.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = _ssh_argv(login, where[0], where[1], key, known, [])
    if timeout:
        _wait_for_sshd(argv, v["name"], where[0], where[1], timeout)
    cmd = list(command)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        argv.insert(1, "-t")  # a shell: a terminal even when stdin is one only through a pipe
    os.execvp("ssh", argv + cmd)
