"""virtio-net on libslirp in a real VM: the `net` test guest's own driver and IPv4 stack on tenbox's device.

Loopback only: the guest talks to the gateway, to host services on 127.0.0.1
through forwards, and to nothing else.
"""

import socket
import threading
import zlib

import pytest

from tests.framework.guests import assert_passed, guest_path, run_guest
from tests.framework.ports import free_port
from tests.framework.runtime import runtime_argv

pytestmark = pytest.mark.usefixtures("kvm", "guests")


def run_net(spawn, cmdline, *extra, timeout=60, wait=True):
    return run_guest(spawn, "net", "--net", *extra, cmdline="console=ttyS0 " + cmdline, timeout=timeout, wait=wait)


def test_dhcp_lease_and_ping_the_gateway(spawn):
    p, rc, res = run_net(spawn, "net.test=dhcp,ping")
    assert_passed(p, rc, res)
    assert res["info"]["net.ip"] == "10.0.2.15 gw=10.0.2.2 dns=10.0.2.3"
    assert "ping 10.0.2.2" in res["ok"]


class TcpServer:
    """A host service on 127.0.0.1 that sends a known payload and records what it got."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.got = b""
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(60)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(30)
            try:
                self.got += conn.recv(4096)
                conn.sendall(self.payload)
            finally:
                conn.close()

    def close(self):
        self.sock.close()


def test_host_loopback_is_closed_without_a_forward_and_open_with_a_guestfwd(spawn):
    payload = bytes(range(256)) * 400  # 100 KiB
    server = TcpServer(payload)
    try:
        # Straight at the gateway: the host's 127.0.0.1 must not answer.
        p, rc, res = run_net(spawn, "net.test=dhcp,tcp net.tcp.get=10.0.2.2:%d" % server.port)
        assert server.connections == 0
        assert any("tcp get 10.0.2.2" in f for f in res["not_ok"]), p.output[-2000:]
        # Through a guestfwd: exactly that service, the whole payload.
        p, rc, res = run_net(spawn, "net.test=dhcp,tcp net.tcp.get=10.0.2.100:80",
                             "--guestfwd", "guestfwd:10.0.2.100:80-127.0.0.1:%d" % server.port)
        assert_passed(p, rc, res)
        assert int(res["info"]["net.tcp.bytes"]) == len(payload)
        assert int(res["info"]["net.tcp.crc32"], 16) == zlib.crc32(payload)
        assert server.got.startswith(b"tenbox-guest")
    finally:
        server.close()


def test_hostfwd_reaches_guest_tcp_and_udp_listeners(spawn):
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    p, _, _ = run_net(spawn, "net.test=dhcp net.udp.echo=7 net.tcp.listen=7 net.stay=1",
                      "--hostfwd", "tcp:127.0.0.1:%d-:7" % tport, "--hostfwd", "udp:127.0.0.1:%d-:7" % uport,
                      wait=False)
    p.wait_for("net: ready", 60)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    got = None
    for _ in range(10):
        u.sendto(b"datagram-through-hostfwd", ("127.0.0.1", uport))
        try:
            got = u.recvfrom(2048)[0]
            break
        except socket.timeout:
            continue
    assert got == b"datagram-through-hostfwd"
    c = socket.create_connection(("127.0.0.1", tport), timeout=30)
    blob = b"x" * 30000 + b"\n"
    c.sendall(blob)
    echoed = b""
    while len(echoed) < len(blob):
        chunk = c.recv(65536)
        if not chunk:
            break
        echoed += chunk
    c.close()
    assert echoed == blob
    p.send(b"quit\n")
    assert p.wait_exit(30) == 0


def test_bad_forward_specs_are_refused_before_the_vm_starts(spawn):
    for args, fragment in ((["--hostfwd", "tcp:127.0.0.1:99999-:22"], "99999"),
                           (["--hostfwd", "sctp::80-:80"], "sctp"),
                           (["--guestfwd", "guestfwd:10.0.2.100-127.0.0.1:80"], "guestfwd"),
                           (["--mac", "01:00:5e:00:00:01"], "multicast")):
        p = spawn(runtime_argv("--kernel", guest_path("net"), "--net", "--console", "stdio", *args))
        assert p.wait_exit(30) == 2
        assert fragment in p.errors and "Traceback" not in p.errors
        assert len(p.errors.strip().splitlines()) == 1, p.errors


def test_a_port_in_use_is_a_reported_failure_not_a_dead_vm(spawn):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        p, rc, res = run_net(spawn, "net.test=dhcp,ping", "--hostfwd", "tcp:127.0.0.1:%d-:22" % port, "-v")
        assert_passed(p, rc, res)
        assert "forward tcp:127.0.0.1:%d-" % port in p.errors and "in use" in p.errors
    finally:
        busy.close()
