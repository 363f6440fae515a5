"""`tenbox events`' one-line form of each kind of entry (tenbox_ctl/events.py)."""

from __future__ import annotations

import pytest

from tenbox_ctl.events import describe

T = 1764950000.0  # any time: the line starts with it in local time


@pytest.mark.parametrize("entry, ends", [
    ({"kind": "vm.state", "name": "web", "old": "running", "new": "crashed", "reason": "killed"},
     "vm.state web: running -> crashed (killed)"),
    ({"kind": "vm.restart", "name": "web", "action": "scheduled", "attempt": 2, "backoff_sec": 4},
     "vm.restart web: restart 2 in 4s"),
    ({"kind": "vm.restart", "name": "web", "action": "gave_up", "reason": "too many"},
     "vm.restart web: gave up: too many"),
    ({"kind": "vm.disk_added", "name": "web", "index": 1, "disk": "disk-1.qcow2", "size_bytes": 1048576},
     "vm.disk_added web: disk 1 disk-1.qcow2, 1048576 bytes"),
    ({"kind": "vm.disk_resized", "name": "web", "index": 0, "disk": "root.qcow2", "size_bytes": 2097152,
      "live": True}, "vm.disk_resized web: disk 0 root.qcow2, 2097152 bytes (live)"),
    ({"kind": "vm.disk_resized", "name": "web", "index": 0, "disk": "root.qcow2", "size_bytes": 2097152,
      "live": False}, "vm.disk_resized web: disk 0 root.qcow2, 2097152 bytes"),
    ({"kind": "image.imported", "image": "deb12"}, "image.imported deb12: "),
    ({"kind": "host.update", "action": "failed", "from": "1.0", "error": "no_network"},
     "host.update : failed from 1.0 to the newest: no_network"),
])
def test_each_kind_is_one_line_naming_what_happened(entry, ends):
    line = describe(dict(entry, time=T))
    assert "\n" not in line and line.endswith(ends), line
