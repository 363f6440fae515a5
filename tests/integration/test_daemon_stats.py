"""`tenbox vm stats` and the Prometheus endpoint for real: counters that move with a test guest's disk and network I/O."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.framework.daemon import ok
from tests.framework.guests import guest_path
from tests.framework.ports import free_port, udp_echo
from tests.framework.repo import PYTHON, REPO, repo_env

pytestmark = pytest.mark.usefixtures("kvm", "guests")

SECTOR = 512
# The basic script reads 64 sectors once through 1 and once through 4 descriptors, writes 8 and
# reads them back; then the guest stays up and reads the range again at each "read".
BLK = "console=ttyS0 blk.read=0:64 blk.write=100:8:a5 blk.stay=1"
NET = "console=ttyS0 net.test=dhcp net.udp.echo=7 net.stay=1"


def stats(daemon, *names: str) -> dict:
    r = daemon.ctl("vm", "stats", *names, "--json", "--no-stream")
    return {vm["name"]: vm for vm in json.loads(ok(r))}


def http(s: socket.socket, request: bytes) -> bytes:
    """Send one request on a connected socket; everything the endpoint answers until it closes."""
    try:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    finally:
        s.close()


def scrape_unix(path: str) -> str:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    data = http(s, b"GET /metrics HTTP/1.1\r\nHost: tenbox\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"text/plain; version=0.0.4" in head
    return body.decode()


def samples(text: str) -> dict:
    """{(metric sample name, frozenset of labels): value}, through prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_block_and_net_counters_move_with_guest_io_in_vm_stats_and_prometheus(make_daemon, tmp_path):
    """The blk guest's reads and writes and the net guest's echoed datagrams show in vm stats and in /metrics."""
    metrics_sock = str(tmp_path / "metrics.sock")
    daemon = make_daemon(TENBOX_METRICS_LISTEN="unix:" + metrics_sock)
    daemon.start()
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (4 << 20))
    port = free_port(socket.SOCK_DGRAM)
    ok(daemon.ctl("vm", "create", "b1", "--kernel", guest_path("blk"), "--memory", "64", "--cmdline", BLK,
                  "--disk", str(disk) + ",format=raw"))
    ok(daemon.ctl("vm", "create", "n1", "--kernel", guest_path("net"), "--memory", "64", "--cmdline", NET,
                  "--hostfwd", "udp:127.0.0.1:%d-:7" % port))
    ok(daemon.ctl("vm", "create", "idle", "--kernel", guest_path("idle"), "--memory", "32"))
    ok(daemon.ctl("vm", "start", "b1"))
    ok(daemon.ctl("vm", "start", "n1"))
    daemon.wait_console("b1", "blk: ready capacity=8192", 60)
    daemon.wait_console("n1", "net: ready", 60)

    before = stats(daemon)
    assert set(before) == {"b1", "n1"}  # without names: the running VMs only
    b = before["b1"]
    assert b["state"] == "running" and b["uptime_sec"] > 0 and b["cpu_percent"] is not None
    assert b["cpu_seconds"] > 0
    mem = b["memory"]
    assert mem["guest_ram_bytes"] == 64 << 20
    assert 0 < mem["guest_ram_touched_bytes"] <= 64 << 20
    assert mem["rss_outside_guest_bytes"] == mem["rss_bytes"] - mem["guest_ram_touched_bytes"]
    d = b["disks"][0]
    assert d["path"] == str(disk) and d["capacity_bytes"] == 4 << 20
    # 64 sectors read twice, the 8 written read back; one write of 8 sectors and its flush.
    assert d["read_bytes"] >= (64 + 64 + 8) * SECTOR and d["read_ops"] >= 3
    assert d["write_bytes"] == 8 * SECTOR and d["write_ops"] == 1 and d["flush_ops"] >= 1
    assert b["net"]["tx_packets"] == 0  # every VM has a card; the blk guest does not drive it
    n = before["n1"]
    assert n["disks"] == [] and n["net"]["tx_packets"] > 0  # DHCP went out

    daemon.console_line("b1", "read")
    daemon.wait_console("b1", "blk: reads done 1", 30)
    for i in range(5):
        assert udp_echo(port, b"x" * 1000, tries=10) == b"x" * 1000
    after = stats(daemon, "b1", "n1", "idle")
    d2 = after["b1"]["disks"][0]
    assert d2["read_bytes"] - d["read_bytes"] >= 64 * SECTOR and d2["read_ops"] > d["read_ops"]
    assert d2["write_ops"] == 1
    n2 = after["n1"]["net"]
    assert n2["rx_packets"] - n["net"]["rx_packets"] >= 5 and n2["rx_bytes"] - n["net"]["rx_bytes"] >= 5 * 1000
    assert n2["tx_packets"] - n["net"]["tx_packets"] >= 5 and n2["tx_bytes"] - n["net"]["tx_bytes"] >= 5 * 1000
    idle = after["idle"]  # named: shown although it is stopped, with no figures
    assert idle["state"] == "stopped" and idle["pid"] is None and idle["memory"] is None and idle["net"] is None

    table = ok(daemon.ctl("vm", "stats", "--no-stream"))
    assert table.splitlines()[0].split()[:3] == ["NAME", "STATE", "CPU"]
    assert any(line.startswith("b1 ") and "running" in line for line in table.splitlines())

    got = samples(scrape_unix(metrics_sock))
    b1 = frozenset({("vm_id", after["b1"]["id"]), ("name", "b1")})
    n1 = frozenset({("vm_id", after["n1"]["id"]), ("name", "n1")})
    idle_l = frozenset({("vm_id", idle["id"]), ("name", "idle")})
    disk_l = b1 | {("disk", "0"), ("path", str(disk))}
    assert got[("tenbox_vm_running", b1)] == 1 and got[("tenbox_vm_running", idle_l)] == 0
    assert got[("tenbox_vm_disk_read_bytes_total", disk_l)] >= d2["read_bytes"]
    assert got[("tenbox_vm_disk_writes_total", disk_l)] == 1
    assert got[("tenbox_vm_disk_capacity_bytes", disk_l)] == 4 << 20
    assert got[("tenbox_vm_net_receive_packets_total", n1)] >= n2["rx_packets"]
    assert got[("tenbox_vm_net_transmit_bytes_total", n1)] >= n2["tx_bytes"]
    assert got[("tenbox_vm_cpu_seconds_total", b1)] > 0
    assert got[("tenbox_vm_guest_ram_bytes", b1)] == 64 << 20
    assert not any(labels == idle_l for name, labels in got if name == "tenbox_vm_cpu_seconds_total")


def test_vm_stats_bad_names_are_one_line_errors(daemon):
    r = daemon.ctl("vm", "stats", "nosuchvm", "--no-stream")
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and "(vm_not_found)" in r.stderr.decode()
    r = daemon.call("vm.stats", vm_ids="web")
    assert r["error_code"] == "invalid_argument"
    r = daemon.call("vm.stats", vm_ids=["../x"])
    assert r["error_code"] == "invalid_argument"
    r = daemon.call("vm.stats", vm_ids=["a"] * 257)
    assert r["error_code"] == "invalid_argument" and "at most 256" in r["error"]


def test_the_metrics_endpoint_answers_only_get_metrics(make_daemon, tmp_path):
    port = free_port(socket.SOCK_STREAM)
    daemon = make_daemon(TENBOX_METRICS_LISTEN="127.0.0.1:%d" % port)
    daemon.start()

    def ask(request: bytes) -> bytes:
        return http(socket.create_connection(("127.0.0.1", port), timeout=10), request)

    assert ask(b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert ask(b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert ask(b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert ask(b"GET /metrics HTTP/1.0\r\n" + b"X: " + b"a" * 10000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    assert ask(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert ask(b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")  # still serving


def test_a_non_loopback_metrics_address_is_refused_at_start(make_daemon):
    bad = make_daemon(TENBOX_METRICS_LISTEN="0.0.0.0:9464")
    proc = bad.start(wait=False)
    assert proc.wait_exit(30) == 2
    assert "TENBOX_METRICS_LISTEN" in proc.errors


def test_vm_stats_streams_a_sample_every_second_until_interrupted(daemon):
    """Without --no-stream: one JSON list per second; Ctrl-C (SIGINT) ends it with status 0."""
    # SIGINT as a terminal leaves it: a test run started in the background by a shell without job
    # control inherits it ignored, and so would the CLI (Python then installs no Ctrl-C handler).
    p = subprocess.Popen([PYTHON, "-m", "tenbox_ctl", "vm", "stats", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(REPO), env=repo_env({"TENBOX_SOCK": str(daemon.socket)}),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        started = time.monotonic()
        assert json.loads(p.stdout.readline()) == [] and json.loads(p.stdout.readline()) == []
        assert time.monotonic() - started >= 0.9
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0 and p.stderr.read() == b""
    finally:
        p.kill()
        p.wait()
