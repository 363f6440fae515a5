"""Golden outputs: `tenbox vm ls`, `vm ls --json` and error replies, byte for byte, CLI and wire.

The supervisor's insides may be reshaped; what operators and scripts see
may not. A real tenboxd holds a stopped VM, a VM whose start failed, a VM
with disks, forwards, autostart and a restart policy, and a broken entry; the outputs are compared with
the files in golden/ after the values that differ from run to run (ids,
MACs, paths, times) are replaced by fixed names. Regenerate, after a change
that is meant to alter them, with TENBOX_GOLDEN_UPDATE=1.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.framework.guests import guest_path
from tests.framework.repo import REPO

pytestmark = pytest.mark.usefixtures("kvm", "guests")

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("TENBOX_GOLDEN_UPDATE") == "1"
TIME_FIELDS = re.compile(rb'("(?:created_at|time)": )[0-9.e+]+')


class Masks:
    """Run-dependent values and the fixed names they are shown as."""

    def __init__(self) -> None:
        self.pairs = []

    def add(self, value: str, name: str) -> None:
        self.pairs.append((value.encode(), name.encode()))

    def apply(self, data: bytes) -> bytes:
        for value, name in sorted(self.pairs, key=lambda p: -len(p[0])):  # longest first: paths nest
            data = data.replace(value, name)
        return TIME_FIELDS.sub(rb"\1<TIME>", data)


def check(name: str, data: bytes) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(data)
    assert path.exists(), "no golden file %s (TENBOX_GOLDEN_UPDATE=1 writes it)" % path
    expected = path.read_bytes()
    assert data == expected, "%s differs:\n--- expected\n%s\n--- got\n%s" % (
        name, expected.decode(errors="replace"), data.decode(errors="replace"))


@pytest.fixture
def populated(make_daemon, tmp_path):
    """A daemon with four entries in known states, and the masks for their run-dependent values."""
    daemon = make_daemon("golden")
    broken = daemon.data_dir / "vms" / "oldvm1"
    broken.mkdir(parents=True)
    (broken / "vm.json").write_text("{not json")
    daemon.start()
    masks = Masks()
    masks.add(str(REPO), "<REPO>")
    masks.add(str(tmp_path), "<TMP>")

    def create(**params):
        r = daemon.call("vm.create", **params)
        assert r["ok"], r
        vm = r["payload"]
        masks.add(vm["id"], "<id-%s>" % vm["name"])
        masks.add(vm["net"]["mac"], "<mac-%s>" % vm["name"])
        return vm

    create(name="alpha", kernel=guest_path("idle"), memory_mb=32)
    data = tmp_path / "data.raw"
    data.write_bytes(b"\0" * (1 << 20))
    create(name="beta", kernel=guest_path("idle"), memory_mb=64, cpus=2, cmdline="console=ttyS0 quiet",
           disks=[{"path": str(data), "read_only": True, "serial": "data1"}], net=False,
           hostfwds=["tcp:127.0.0.1:2222-:22"], guestfwds=["guestfwd:10.0.2.3:80-127.0.0.1:18981"],
           autostart=True, restart="on-failure:3")
    notkernel = tmp_path / "notes.txt"
    notkernel.write_text("hello\n" * 100)
    create(name="gamma", kernel=str(notkernel), memory_mb=32)
    started = daemon.ctl("vm", "start", "gamma")
    assert started.returncode == 1
    check("vm-start-failed.stderr", masks.apply(started.stderr))
    return daemon, masks


def test_vm_ls_table_and_json_are_unchanged(populated):
    """`vm ls` and `vm ls --json` print exactly what they printed before the supervisor was reshaped."""
    daemon, masks = populated
    table = daemon.ctl("vm", "ls")
    assert table.returncode == 0 and not table.stderr
    check("vm-ls.txt", masks.apply(table.stdout))
    as_json = daemon.ctl("vm", "ls", "--json")
    assert as_json.returncode == 0 and not as_json.stderr
    check("vm-ls.json", masks.apply(as_json.stdout))
    listed = json.loads(as_json.stdout)
    assert [v["state"] for v in listed] == ["stopped", "stopped", "crashed", "broken"]


CLI_ERRORS = [
    ("not-found", ["vm", "start", "nope"], 1),
    ("bad-name", ["vm", "create", "bad_name!", "--kernel", guest_path("idle")], 1),
    ("not-running", ["vm", "stop", "alpha"], 1),
]


def test_error_replies_are_unchanged_on_the_cli(populated):
    """Three refusals: the one stderr line and the exit status of each are as before."""
    daemon, masks = populated
    for name, args, status in CLI_ERRORS:
        r = daemon.ctl(*args)
        assert r.returncode == status and not r.stdout, (name, r.returncode, r.stdout)
        check("cli-%s.stderr" % name, masks.apply(r.stderr))


WIRE_ERRORS = [
    ("not-found", b'{"id": 7, "type": "vm.start", "payload": {"vm_id": "nope"}}\n'),
    ("bad-name", b'{"id": "x", "type": "vm.create", "payload": {"name": "bad_name!", "kernel": "/bin/true"}}\n'),
    ("not-running", b'{"id": 9, "type": "vm.stop", "vm_id": "alpha"}\n'),
    ("unknown-type", b'{"id": 10, "type": "vm.explode"}\n'),
    ("bad-json", b'{"id": 11, "type"\n'),
    ("bad-cpus", b'{"id": 12, "type": "vm.edit", "payload": {"vm_id": "alpha", "cpus": 65}}\n'),
]


def test_error_replies_are_unchanged_on_the_wire(populated):
    """The daemon's error lines, byte for byte: key order, separators, codes and messages."""
    daemon, masks = populated
    out = b"".join(masks.apply(daemon.raw(line)) for _, line in WIRE_ERRORS)
    check("wire-errors.jsonl", out)
