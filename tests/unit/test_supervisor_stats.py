"""vm.stats' parts without processes: the STATS reply's codec, the CPU sampler, the Prometheus text, the listen setting."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenbox_supervisor.config import ConfigError, parse_metrics_listen, resolve
from tenbox_supervisor.metrics import render
from tenbox_supervisor.stats import CPU_SAMPLE_MAX_AGE_SEC, CpuSampler
from tenbox_vmm.protocol.link import BlockCounters, Command, CommandName, NetCounters, WorkerStats, decode, encode


def test_the_stats_reply_goes_over_the_link_and_back():
    ws = WorkerStats(guest_ram_bytes=64 << 20, guest_ram_touched_bytes=5 << 20,
                     disks=(BlockCounters(read_bytes=4096, read_ops=1, capacity_bytes=1 << 30),),
                     net=NetCounters(rx_bytes=100, rx_packets=2))
    assert WorkerStats.from_wire(ws.to_wire()) == ws
    assert decode(encode(Command(7, CommandName.STATS))) == Command(7, CommandName.STATS, {})


@pytest.mark.parametrize("bad", [
    {"guest_ram_bytes": -1, "guest_ram_touched_bytes": 0},
    {"guest_ram_bytes": 1, "guest_ram_touched_bytes": "x"},
    {"guest_ram_bytes": 1, "guest_ram_touched_bytes": 1, "disks": [{"read_bytes": True}]},
    {"guest_ram_bytes": 1, "guest_ram_touched_bytes": 1, "disks": [{}] * 9},
    {"guest_ram_bytes": 1, "guest_ram_touched_bytes": 1, "net": [1]},
    [],
])
def test_a_malformed_stats_reply_is_refused(bad):
    with pytest.raises(ValueError):
        WorkerStats.from_wire(bad)


def test_cpu_percent_needs_a_base_sample_of_the_same_worker_neither_too_young_nor_too_old():
    now = [100.0]
    s = CpuSampler(lambda: now[0])
    assert s.sample("a", 10, 5.0) is None  # the first sample: no base
    now[0] += 0.1
    assert not s.has_base("a", 10)  # too young
    now[0] += 0.9
    assert s.sample("a", 10, 5.5) == pytest.approx(50.0)
    now[0] += 2
    assert s.sample("a", 10, 9.5) == pytest.approx(200.0)  # two cores busy
    now[0] += 1
    assert s.sample("a", 11, 0.1) is None  # another worker (a restart): no base
    now[0] += CPU_SAMPLE_MAX_AGE_SEC + 1
    assert s.sample("a", 11, 0.2) is None  # too old
    s.forget_except([])
    assert not s.has_base("a", 11)


ENTRIES = [
    {"id": "a1", "name": "web", "state": "running", "pid": 42, "uptime_sec": 12.5, "cpu_seconds": 3.25,
     "memory": {"rss_bytes": 100, "rss_outside_guest_bytes": 40, "guest_ram_bytes": 1 << 26,
                "guest_ram_touched_bytes": 60},
     "disks": [{"index": 0, "path": '/srv/a "quoted"\\dir/disk.qcow2', "read_bytes": 512, "read_ops": 1,
                "write_bytes": 0, "write_ops": 0, "flush_ops": 0, "errors": 0, "capacity_bytes": 1 << 30}],
     "net": {"rx_bytes": 10, "rx_packets": 1, "rx_dropped": 0, "tx_bytes": 20, "tx_packets": 2, "tx_dropped": 0}},
    {"id": "b2", "name": "db", "state": "stopped", "pid": None, "uptime_sec": None, "cpu_seconds": None,
     "memory": None, "disks": [{"index": 0, "path": "/x"}], "net": None},
]


def test_the_prometheus_text_parses_with_prometheus_clients_parser_and_escapes_labels():
    families = {f.name: f for f in text_string_to_metric_families(render(ENTRIES))}
    running = {s.labels["name"]: s.value for s in families["tenbox_vm_running"].samples}
    assert running == {"web": 1, "db": 0}
    cpu = families["tenbox_vm_cpu_seconds"]  # the parser drops _total from a counter's family name
    assert cpu.type == "counter" and [(s.labels["vm_id"], s.value) for s in cpu.samples] == [("a1", 3.25)]
    (read,) = families["tenbox_vm_disk_read_bytes"].samples
    assert read.labels == {"vm_id": "a1", "name": "web", "disk": "0", "path": '/srv/a "quoted"\\dir/disk.qcow2'}
    assert read.value == 512
    assert [s.value for s in families["tenbox_vm_net_transmit_packets"].samples] == [2]
    assert families["tenbox_vm_guest_ram_touched_bytes"].type == "gauge"


@pytest.mark.parametrize("raw, want", [
    ("", None), ("off", None),
    ("unix:/run/tenbox/metrics.sock", ("unix", "/run/tenbox/metrics.sock")),
    ("127.0.0.1:9464", ("tcp", "127.0.0.1", "9464")),
    ("localhost:9464", ("tcp", "127.0.0.1", "9464")),
    ("[::1]:9464", ("tcp", "::1", "9464")),
])
def test_the_metrics_listen_setting(raw, want):
    assert parse_metrics_listen(raw) == want


@pytest.mark.parametrize("raw", ["0.0.0.0:9464", "192.168.1.5:9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000",
                                 "unix:relative.sock", "unix:/" + "x" * 200, "example.com:80", "[::]:9464"])
def test_a_metrics_address_off_loopback_or_malformed_is_a_config_error(raw):
    with pytest.raises(ConfigError, match="TENBOX_METRICS_LISTEN"):
        parse_metrics_listen(raw)


def test_the_metrics_endpoint_is_off_by_default():
    assert resolve(data_dir="/tmp/x", env={}, uid=1000).metrics_listen is None
