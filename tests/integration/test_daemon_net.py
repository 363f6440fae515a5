"""Networking through tenboxd: forwards in vm.json, link up/down and forwards changed while the VM runs."""

import json
import socket
import time

import pytest

from tests.framework.guests import guest_path
from tests.framework.ports import free_port, udp_echo

pytestmark = pytest.mark.usefixtures("kvm", "guests")

STAY = "console=ttyS0 net.test=dhcp net.udp.echo=7 net.stay=1"


def test_link_down_stops_traffic_and_link_up_restores_it(daemon):
    port = free_port(socket.SOCK_DGRAM)
    r = daemon.ctl("vm", "create", "n1", "--kernel", guest_path("net"), "--memory", "64", "--cmdline", STAY,
                   "--hostfwd", "udp:127.0.0.1:%d-:7" % port)
    assert r.returncode == 0, r.stderr
    spec = json.loads(next((daemon.data_dir / "vms").glob("*/vm.json")).read_text())
    assert spec["net"]["enabled"] and spec["net"]["hostfwds"] == ["udp:127.0.0.1:%d-:7" % port]
    assert spec["net"]["mac"].startswith("52:54:00:")
    assert daemon.ctl("vm", "start", "n1").returncode == 0
    daemon.wait_console("n1", "net: ready", 60)
    assert udp_echo(port) == b"ping"
    assert daemon.ctl("vm", "edit", "n1", "--net", "off").returncode == 0
    daemon.wait_console("n1", "net.link=down")
    assert udp_echo(port, tries=2) is None
    assert daemon.vm("n1")["net"]["link_up"] is False
    assert daemon.ctl("vm", "edit", "n1", "--net", "on").returncode == 0
    deadline = time.monotonic() + 20
    while daemon.call("vm.logs", vm_id="n1", lines=200)["payload"]["lines"].count("info - net.link=up") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert udp_echo(port) == b"ping"


def test_forwards_change_while_running_and_failures_are_shown(daemon):
    first, second = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    daemon.ctl("vm", "create", "n2", "--kernel", guest_path("net"), "--memory", "64", "--cmdline", STAY,
               "--hostfwd", "udp:127.0.0.1:%d-:7" % first)
    daemon.ctl("vm", "start", "n2")
    daemon.wait_console("n2", "net: ready", 60)
    assert udp_echo(first) == b"ping"
    r = daemon.ctl("vm", "edit", "n2", "--hostfwd", "udp:127.0.0.1:%d-:7" % second)
    assert r.returncode == 0, r.stderr
    assert udp_echo(second) == b"ping"
    assert udp_echo(first, tries=2) is None  # the old forward is gone
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        bport = busy.getsockname()[1]
        r = daemon.ctl("vm", "edit", "n2", "--hostfwd", "tcp:127.0.0.1:%d-:22" % bport,
                       "--hostfwd", "udp:127.0.0.1:%d-:7" % second)
        assert r.returncode == 0, r.stderr
        assert b"forward tcp:127.0.0.1:%d-" % bport in r.stderr and b"in use" in r.stderr
        show = daemon.ctl("vm", "show", "n2").stdout.decode()
        assert "failed fwd:" in show and str(bport) in show
        assert udp_echo(second) == b"ping"
    finally:
        busy.close()


def test_bad_forward_specs_are_refused_by_vm_create(daemon):
    r = daemon.call("vm.create", name="badfwd", kernel=guest_path("net"), hostfwds=["tcp:1.2.3.4.5:1-:2"])
    assert r["error_code"] == "invalid_argument" and "hostfwd" in r["error"]
    r = daemon.ctl("vm", "create", "badfwd", "--kernel", guest_path("net"), "--guestfwd", "guestfwd:nonsense")
    assert r.returncode == 1 and b"invalid_argument" in r.stderr
