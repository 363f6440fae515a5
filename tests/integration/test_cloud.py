"""The cloud link against a real WebSocket server over TLS on 127.0.0.1 (trustme CA), speaking the protocol."""

import json
import re
import stat
import time

import pytest

from tests.cloud_server import LoopbackCloud
from tests.framework.guests import guest_path
from tests.framework.images import fake_image

pytestmark = pytest.mark.usefixtures("kvm", "guests")


@pytest.fixture
def cloud(tmp_path):
    c = LoopbackCloud(tmp_path)
    yield c
    c.close()


@pytest.fixture
def linked(cloud, make_daemon):
    d = make_daemon("c", TENBOX_CLOUD_URL=cloud.url, TENBOX_CLOUD_CA_FILE=str(cloud.ca_file))
    d.start()
    return d


def test_pairing_then_the_token_is_used(cloud, linked):
    hello = cloud.wait_type("device.hello")
    code = hello["payload"]["pair_code"]
    assert re.fullmatch(r"\d{8}", code) and "device_token" not in hello["payload"]
    assert hello["host_id"] and hello["payload"]["daemon_version"]
    # Logged before the hello is sent; the test reads stderr on a thread of its own, so wait for it.
    linked.proc.wait_for_stderr(re.escape("Visit https://localhost:%d/pair?code=%s to bind this host"
                                          % (cloud.port, code)), 10)
    cloud.send({"type": "device.paired", "payload": {"device_token": "tok-123"}})
    token = linked.data_dir / "device.token"
    deadline = time.monotonic() + 10
    while not token.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert token.read_text() == "tok-123"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    cloud.drop()
    hello2 = cloud.wait_type("device.hello")
    assert hello2["payload"]["device_token"] == "tok-123" and "pair_code" not in hello2["payload"]
    assert hello2["host_id"] == hello["host_id"]


def test_a_rejected_token_goes_back_to_pairing(cloud, linked):
    cloud.wait_type("device.hello")
    cloud.send({"type": "device.paired", "payload": {"device_token": "tok-bad"}})
    deadline = time.monotonic() + 10
    while not (linked.data_dir / "device.token").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cloud.drop()
    assert cloud.wait_type("device.hello")["payload"]["device_token"] == "tok-bad"
    cloud.send({"type": "device.unauthorized", "payload": {"error": "device_token rejected"}})
    hello = cloud.wait_type("device.hello")
    assert "pair_code" in hello["payload"] and "device_token" not in hello["payload"]
    assert not (linked.data_dir / "device.token").exists()


def test_an_invalid_pair_code_is_replaced_on_the_next_connection(cloud, linked):
    first = cloud.wait_type("device.hello")["payload"]["pair_code"]
    cloud.drop()
    assert cloud.wait_type("device.hello")["payload"]["pair_code"] == first  # kept across reconnects
    cloud.send({"type": "device.pair_invalid", "payload": {}})
    assert cloud.wait_type("device.hello")["payload"]["pair_code"] != first


def test_host_id_survives_a_restart(cloud, linked):
    first = cloud.wait_type("device.hello")["host_id"]
    linked.stop()
    linked.start()
    assert cloud.wait_type("device.hello")["host_id"] == first
    assert (linked.data_dir / "device.id").read_text().strip() == first


def test_reconnects_back_off_while_the_cloud_refuses_then_recover(cloud, linked):
    cloud.wait_type("device.hello")
    cloud.refuse = True
    start = len(cloud.attempts)
    cloud.drop()
    time.sleep(12)
    tries = cloud.attempts[start:]
    assert 2 <= len(tries) <= 8, tries  # retrying, but not in a busy loop
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert max(gaps) > 1.5  # the waits grew
    cloud.refuse = False
    cloud.wait_type("device.hello", timeout=70)


def test_telemetry_ticks_on_every_connect(cloud, linked):
    linked.call("vm.create", name="tele", kernel=guest_path("idle"), memory_mb=32)
    hello = cloud.wait_type("device.hello")
    tick = cloud.wait_type("host.resources_tick", timeout=10)
    assert tick["_received_at"] - hello["_received_at"] < 5
    for key in ("resources", "vm_summary", "daemon_version", "os_release", "arch", "doctor"):
        assert key in tick["payload"], key
    assert tick["payload"]["arch"] in ("amd64", "arm64"), tick["payload"]["arch"]  # Debian's names, as TenBox's
    vms = cloud.wait_type("vm.resources_tick", timeout=10)["payload"]["vms"]
    assert vms[0]["name"] == "tele" and vms[0]["state"] == "stopped" and "disk_usage_bytes" in vms[0]["resources"]
    cloud.drop()
    cloud.wait_type("device.hello")
    cloud.wait_type("host.resources_tick", timeout=10)


def test_vm_requests_over_the_cloud_use_the_same_methods(cloud, linked, tmp_path):
    """The cloud makes its VMs from images of the store (root imported this one); a file
    elsewhere on the host is permission_denied for it, whoever could read it."""
    cloud.wait_type("device.hello")
    src = fake_image(tmp_path / "idle-img", rootfs_size=1 << 20, fmt="raw", kernel=guest_path("idle"))
    assert linked.call("image.import", path=str(src))["ok"]
    refused = cloud.request("vm.create", {"name": "cvm", "kernel": guest_path("idle"), "memory_mb": 32})["payload"]
    assert refused["error_code"] == "permission_denied" and "image store" in refused["error"], refused
    refused = cloud.request("vm.create", {"name": "cvm", "image": "idle-img", "disks": ["/etc/shadow"]})["payload"]
    assert refused["error_code"] == "permission_denied", refused
    r = cloud.request("vm.create", {"name": "cvm", "image": "idle-img", "memory_mb": 32, "cmdline": "console=ttyS0"})
    assert r["payload"]["ok"] is True, r
    vm_id = r["payload"]["payload"]["id"]
    stored = str(linked.data_dir / "images" / "idle-img" / "vmlinuz")
    assert cloud.request("vm.edit", {"vm_id": vm_id, "kernel": stored})["payload"]["ok"]
    overlay = r["payload"]["payload"]["disks"][0]["path"]  # the VM's own: the cloud may list it again
    assert cloud.request("vm.edit", {"vm_id": vm_id, "disks": [overlay]})["payload"]["ok"]
    r = cloud.request("vm.start", vm_id=vm_id)
    assert r["payload"]["ok"] and r["payload"]["payload"]["state"] == "running" and r["vm_id"] == vm_id
    ev = cloud.wait(lambda e: e["type"] == "vm.state_changed" and e["payload"]["state"] == "running")
    assert ev["vm_id"] == vm_id
    listed = cloud.request("vm.list")["payload"]["payload"]["vms"]
    assert [v["id"] for v in listed] == [vm_id]
    deadline = time.monotonic() + 20
    while True:
        lines = cloud.request("vm.logs.tail", vm_id=vm_id, lines=5)["payload"]["payload"]["lines"]
        if "idle: ready" in lines:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    upd = cloud.request("host.update")
    assert upd["payload"]["ok"] is False and upd["payload"]["error_code"] == "vms_running"
    assert upd["payload"]["running_vms"][0]["vm_id"] == vm_id
    assert cloud.request("vm.stop", vm_id=vm_id)["payload"]["payload"]["state"] == "stopped"
    cloud.wait(lambda e: e["type"] == "vm.state_changed" and e["payload"]["state"] == "stopped")
    upd = cloud.request("host.update")
    assert upd["payload"]["error_code"] == "update_disabled"
    assert cloud.request("vm.delete", vm_id=vm_id)["payload"]["ok"]
    bad = cloud.request("vm.nonsense")["payload"]
    assert bad["ok"] is False and bad["error_code"] == "unknown_request"
    bad = cloud.request("vm.start", {"vm_id": "../x"})["payload"]
    assert bad["error_code"] == "invalid_argument"


def test_large_messages_are_delivered_whole(cloud, linked):
    cloud.wait_type("device.hello")
    for i in range(250):
        assert linked.call("vm.create", name="bulk-%03d" % i, kernel=guest_path("idle"), memory_mb=16)["ok"]
    r = cloud.request("vm.list")
    assert len(r["payload"]["payload"]["vms"]) == 250
    assert len(json.dumps(r)) > 65535  # bigger than TenBox's silent drop limit


def test_no_cloud_url_means_no_cloud_traffic(daemon):
    assert "cloud link disabled" in daemon.proc.errors
