"""Port forwards through real libslirp: hostfwd TCP/UDP, guestfwd, host loopback closed, run-time changes.

Host sockets are on 127.0.0.1 (and ::1) only; the guest is this test
writing frames, with a small TCP endpoint (tests/net_frames.py).
"""

import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from tenbox_vmm.net import NetConfig
from tests import net_frames as nf
from tests.framework.ports import free_port
from tests.framework.repo import REPO, repo_env
from tests.net_frames import GuestLink, GuestTcp, host_accept, host_listener, host_recv

BIG = bytes(range(256)) * 400  # 100 KiB: several windows each way


@pytest.fixture
def link():
    g = GuestLink()
    g.resolve_gateway()
    yield g
    g.close()


def _wait_syn(link, guest_port):
    return link.wait_for(lambda f: f.tcp is not None and f.tcp.flags == nf.TCP_SYN and f.tcp.dport == guest_port
                         and f.ip.dst == link.ip, "SYN for guest port %d" % guest_port)


def test_tcp_hostfwd_moves_data_both_ways_and_closes(link):
    port = free_port()
    assert link.net.add_hostfwd("tcp::%d-:22" % port) is None
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.setblocking(False)
    try:
        syn = _wait_syn(link, 22)
        assert syn.ip.src == "10.0.2.2"  # the host appears as the gateway
        conn = GuestTcp.accept(link, syn)
        client.sendall(b"SSH-2.0-host\r\n")
        assert conn.recv_exactly(14) == b"SSH-2.0-host\r\n"
        conn.send(b"SSH-2.0-guest\r\n" + BIG)
        assert host_recv(link, client, 15 + len(BIG)) == b"SSH-2.0-guest\r\n" + BIG
        client.sendall(BIG)
        assert conn.recv_exactly(len(BIG)) == BIG
        client.shutdown(socket.SHUT_WR)
        conn.pump_until(lambda: conn.fin_received, "FIN from the host side")
        conn.close()
        assert host_recv(link, client, -1) == b""
    finally:
        client.close()


def test_tcp_hostfwd_to_an_explicit_guest_address_and_port():
    g = GuestLink(ip="10.0.2.16")
    try:
        g.resolve_gateway()
        port = free_port()
        assert g.net.add_hostfwd("tcp:127.0.0.1:%d-10.0.2.16:8080" % port) is None
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            syn = _wait_syn(g, 8080)
            assert syn.ip.dst == "10.0.2.16"
    finally:
        g.close()


def test_udp_hostfwd_delivers_to_the_guest_port_and_carries_the_answer_back(link):
    port = free_port(socket.SOCK_DGRAM)
    assert link.net.add_hostfwd("udp:127.0.0.1:%d-:5000" % port) is None
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.setblocking(False)
    try:
        host.sendto(b"ping over udp", ("127.0.0.1", port))
        f = link.wait_for(lambda f: f.udp is not None and f.udp.dport == 5000, "UDP for guest port 5000")
        assert f.ip.dst == link.ip and f.udp.payload == b"ping over udp"
        link.send_ip(nf.udp4(link.ip, f.ip.src, 5000, f.udp.sport, b"pong over udp"))
        got = []

        def answered():
            try:
                got.append(host.recvfrom(100))
            except BlockingIOError:
                pass
            return got

        link.run_until(answered, "the UDP answer at the host socket")
        assert got[0] == (b"pong over udp", ("127.0.0.1", port))
    finally:
        host.close()


def _guestfwd_round_trip(link, guest_ip, guest_port, server, local_port=40000, payload=b"GET / HTTP/1.0\r\n\r\n"):
    conn = GuestTcp(link, local_port, guest_ip, guest_port)
    answer = conn.connect()
    assert answer.tcp is not None and answer.tcp.has(nf.TCP_SYN | nf.TCP_ACK), answer.describe()
    conn.send(payload)
    peer = host_accept(link, server)
    assert host_recv(link, peer, len(payload)) == payload
    return conn, peer


def test_guestfwd_connects_the_guest_to_a_host_server_and_data_round_trips(link):
    server = host_listener()
    try:
        assert link.net.add_guestfwd("guestfwd:10.0.2.100:5432-127.0.0.1:%d" % server.getsockname()[1]) is None
        conn, peer = _guestfwd_round_trip(link, "10.0.2.100", 5432, server)
        peer.sendall(BIG)
        assert conn.recv_exactly(len(BIG)) == BIG
        conn.send(BIG)
        assert host_recv(link, peer, len(BIG)) == BIG
        peer.close()  # the host closes: the guest sees a FIN
        conn.pump_until(lambda: conn.fin_received, "FIN after the host closed")
        conn.close()
        link.run_until(lambda: link.net._relay.connections == 0, "the relay to let go of the connection")
    finally:
        server.close()


def test_guestfwd_half_close_from_the_guest_reaches_the_host_and_the_answer_still_comes_back(link):
    server = host_listener()
    try:
        assert link.net.add_guestfwd("guestfwd:10.0.2.100:7-:%d" % server.getsockname()[1]) is None
        conn, peer = _guestfwd_round_trip(link, "10.0.2.100", 7, server, 40020, b"request, then EOF")
        conn.close()  # FIN from the guest
        assert host_recv(link, peer, -1) == b""  # the host sees EOF...
        peer.sendall(b"late answer")  # ...and can still answer before closing
        peer.close()
        conn.pump_until(lambda: conn.fin_received, "FIN after the answer")
        assert bytes(conn.received) == b"late answer"
        link.run_until(lambda: link.net._relay.connections == 0, "the relay to let go of the connection")
    finally:
        server.close()


def test_guestfwd_on_the_dns_address_port_80_serves_several_connections_at_once(link):
    """TenBox's LLM proxy rule: 10.0.2.3:80 → a host port; DNS on 10.0.2.3 keeps working."""
    server = host_listener()
    try:
        spec = "guestfwd:10.0.2.3:80-:%d" % server.getsockname()[1]
        assert link.net.add_guestfwd(spec) is None
        a, peer_a = _guestfwd_round_trip(link, "10.0.2.3", 80, server, 40001, b"first")
        b, peer_b = _guestfwd_round_trip(link, "10.0.2.3", 80, server, 40002, b"second")
        peer_b.sendall(b"to second")
        peer_a.sendall(b"to first")
        assert b.recv_exactly(9) == b"to second"
        assert a.recv_exactly(8) == b"to first"
        # Other ports on 10.0.2.3 are still not a way to the host.
        other = GuestTcp(link, 40003, "10.0.2.3", 81).connect()
        assert other.tcp is None or not other.tcp.has(nf.TCP_SYN)
        peer_a.close()
        peer_b.close()
    finally:
        server.close()


def test_guestfwd_to_a_closed_host_port_closes_the_guest_connection(link):
    port = free_port()
    assert link.net.add_guestfwd("guestfwd:10.0.2.100:80-127.0.0.1:%d" % port) is None
    conn = GuestTcp(link, 40010, "10.0.2.100", 80)
    conn.connect()
    conn.pump_until(lambda: conn.fin_received or conn.rst_received, "the guest connection to be closed")


def test_host_loopback_is_closed_to_the_guest_and_a_guestfwd_opens_one_port(link):
    """Security default: 10.0.2.2:P does not reach a service on the host's 127.0.0.1:P."""
    server = host_listener()
    port = server.getsockname()[1]
    try:
        answer = GuestTcp(link, 41000, "10.0.2.2", port).connect()
        refused = (answer.tcp is not None and answer.tcp.has(nf.TCP_RST)) or answer.icmp is not None
        assert refused, answer.describe()
        for _ in range(10):
            link.pump(5)
        with pytest.raises(BlockingIOError):
            server.accept()
        # Exposed on purpose: a guestfwd on the gateway address.
        assert link.net.add_guestfwd("guestfwd:10.0.2.2:%d-127.0.0.1:%d" % (port, port)) is None
        conn, peer = _guestfwd_round_trip(link, "10.0.2.2", port, server, 41001, b"allowed")
        peer.close()
    finally:
        server.close()


def test_with_host_loopback_allowed_the_gateway_reaches_host_services():
    """The converse of the default, so the test above can tell the difference."""
    g = GuestLink(NetConfig(disable_host_loopback=False))
    server = host_listener()
    try:
        g.resolve_gateway()
        conn, peer = _guestfwd_round_trip(g, "10.0.2.2", server.getsockname()[1], server, 41002, b"open")
        peer.close()
    finally:
        server.close()
        g.close()


def test_a_port_in_use_is_a_per_forward_failure(link):
    busy = host_listener()
    busy_port = busy.getsockname()[1]
    free = free_port()
    try:
        failures = link.net.set_forwards(["tcp::%d-:22" % busy_port, "tcp::%d-:80" % free], [])
        assert failures == [("tcp::%d-:22" % busy_port, "tcp 127.0.0.1:%d is already in use" % busy_port)]
        assert [str(f) for f in link.net.hostfwds] == ["tcp:127.0.0.1:%d-:80" % free]
        msg = link.net.add_hostfwd("tcp::%d-:22" % busy_port)
        assert msg == "hostfwd tcp:127.0.0.1:%d-:22: tcp 127.0.0.1:%d is already in use" % (busy_port, busy_port)
    finally:
        busy.close()


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except ConnectionRefusedError:
        return False


def test_set_forwards_adds_and_removes_at_run_time(link):
    p1, p2 = free_port(), free_port()
    server = host_listener()
    # On the gateway address: once removed, a SYN there is refused locally
    # (host loopback closed) instead of leaving this host.
    g_spec = "guestfwd:10.0.2.2:8080-:%d" % server.getsockname()[1]
    try:
        assert link.net.set_forwards(["tcp::%d-:22" % p1], [g_spec]) == []
        assert _accepts(p1) and not _accepts(p2)
        conn, peer = _guestfwd_round_trip(link, "10.0.2.2", 8080, server, 42000, b"before")
        assert link.net.set_forwards(["tcp::%d-:22" % p2], []) == []
        assert not _accepts(p1) and _accepts(p2)
        assert link.net.guestfwds == []
        assert host_recv(link, peer, -1) == b""  # its open connection was cut
        answer = GuestTcp(link, 42001, "10.0.2.2", 8080).connect(timeout=2)
        assert answer.tcp is None or not answer.tcp.has(nf.TCP_SYN), "the removed guestfwd still answers"
        assert link.net.remove_hostfwd("tcp::%d-:22" % p2) is True
        assert link.net.remove_hostfwd("tcp::%d-:22" % p2) is False
        assert not _accepts(p2)
    finally:
        server.close()


def test_set_forwards_keeps_unchanged_forwards_and_their_connections(link):
    server = host_listener()
    spec = "guestfwd:10.0.2.100:80-:%d" % server.getsockname()[1]
    try:
        assert link.net.set_forwards([], [spec]) == []
        conn, peer = _guestfwd_round_trip(link, "10.0.2.100", 80, server)
        assert link.net.set_forwards(["tcp::%d-:22" % free_port()], [spec]) == []
        peer.sendall(b"still here")
        assert conn.recv_exactly(10) == b"still here"
        peer.close()
    finally:
        server.close()


def test_bad_forwards_are_reported_one_by_one_and_the_good_ones_still_apply(link):
    good = "tcp::%d-:22" % free_port()
    failures = dict(link.net.set_forwards(
        [good, "tcp::99999-:22", "2222:22:7"],
        ["guestfwd:10.0.2.15:80-:1", "guestfwd:10.0.2.253:80-:1", "guestfwd:10.9.9.9:80-:1", "nonsense"]))
    assert failures == {
        "tcp::99999-:22": "host port 99999 is out of range 1-65535",
        "2222:22:7": "LAN flag '7' must be 0 (this host only) or 1 (all addresses)",
        "guestfwd:10.0.2.15:80-:1": "guest address 10.0.2.15 is in the DHCP pool 10.0.2.15-10.0.2.30",
        "guestfwd:10.0.2.253:80-:1": "guest address 10.0.2.253 is reserved for forwards on 10.0.2.2 and 10.0.2.3",
        "guestfwd:10.9.9.9:80-:1": "guest address 10.9.9.9 is not a host address of the guest network 10.0.2.0/24",
        "nonsense": "must start with 'guestfwd:'",
    }
    assert [str(f) for f in link.net.hostfwds] == [str(nf_parse(good))]


def nf_parse(spec):
    from tenbox_vmm.protocol.forwards import parse_hostfwd

    return parse_hostfwd(spec)


def test_forwards_in_the_config_apply_at_start_and_failures_are_kept():
    busy = host_listener()
    try:
        port = free_port()
        g = GuestLink(NetConfig(hostfwds=["tcp::%d-:22" % port, "tcp::%d-:23" % busy.getsockname()[1]]))
        try:
            assert _accepts(port)
            assert len(g.net.startup_failures) == 1 and "already in use" in g.net.startup_failures[0][1]
        finally:
            g.close()
    finally:
        busy.close()


def test_hostfwd_on_an_ipv6_host_address_is_refused_with_the_reason(link):
    msg = link.net.add_hostfwd("tcp:[::1]:%d-:22" % free_port())
    assert msg.endswith("IPv6 host addresses are not supported (the guest side of a forward is IPv4)")
    assert link.net.hostfwds == []


def test_udp_hostfwd_before_the_guest_spoke_asks_for_its_mac_then_delivers():
    g = GuestLink()  # no ARP from the guest yet: its MAC is unknown
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        port = free_port(socket.SOCK_DGRAM)
        assert g.net.add_hostfwd("udp::%d-:6000" % port) is None
        client.sendto(b"early", ("127.0.0.1", port))
        f = g.wait_for(lambda f: f.udp is not None and f.udp.dport == 6000, "the held datagram")
        assert f.dst == g.mac and f.udp.payload == b"early" and f.ip.src == "10.0.2.2"
    finally:
        client.close()
        g.close()


def test_udp_hostfwd_answers_go_only_to_the_flow_not_to_other_loopback_ports(link):
    """The guest may answer a forwarded UDP peer, not reach other host services via 10.0.2.2."""
    port = free_port(socket.SOCK_DGRAM)
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind(("127.0.0.1", 0))
    victim.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert link.net.add_hostfwd("udp::%d-:5000" % port) is None
        client.sendto(b"hello", ("127.0.0.1", port))
        f = link.wait_for(lambda f: f.udp is not None and f.udp.dport == 5000, "UDP for guest port 5000")
        # From the forwarded guest port, but to another host port: not an answer.
        link.send_ip(nf.udp4(link.ip, f.ip.src, 5000, victim.getsockname()[1], b"sneak"))
        refused = link.wait_for(lambda f: f.icmp is not None and f.icmp.type == 3, "ICMP unreachable")
        assert refused.ip.dst == link.ip
        with pytest.raises(BlockingIOError):
            victim.recvfrom(100)
    finally:
        victim.close()
        client.close()


@pytest.mark.parametrize("dst", ["127.0.0.1", "0.0.0.0"])
def test_a_guest_cannot_address_the_hosts_loopback_directly(link, dst):
    """libslirp would connect a SYN for 127.0.0.1 (or 0.0.0.0) to the host; tenbox drops it."""
    server = host_listener()
    try:
        GuestTcp(link, 43000, dst, server.getsockname()[1])._send(nf.TCP_SYN, options=nf.MSS_OPTION)
        for _ in range(20):
            link.pump(5)
        assert not [f for f in link.rx if f.tcp is not None]
        with pytest.raises(BlockingIOError):
            server.accept()
        assert link.net.frames_dropped == 1
    finally:
        server.close()


def test_without_the_security_default_libslirp_connects_to_127_0_0_1():
    """The converse: shows that the drop above is what protects the host."""
    g = GuestLink(NetConfig(disable_host_loopback=False))
    server = host_listener()
    try:
        g.resolve_gateway()
        answer = GuestTcp(g, 43001, "127.0.0.1", server.getsockname()[1]).connect()
        assert answer.tcp is not None and answer.tcp.has(nf.TCP_SYN | nf.TCP_ACK)
        host_accept(g, server).close()
    finally:
        server.close()
        g.close()


PRIVILEGED_CHILD = textwrap.dedent("""
    import json
    from tenbox_vmm.net import NetConfig, SlirpNetwork
    net = SlirpNetwork(NetConfig(), lambda frame: None)
    print(json.dumps([net.add_hostfwd("tcp::80-:80"), net.add_hostfwd("tcp::%d-:80")]))
    net.close()
""")


def test_privileged_host_port_without_cap_net_bind_service_is_refused_with_the_fix():
    if not shutil.which("capsh"):
        pytest.fail("capsh is needed to drop CAP_NET_BIND_SERVICE (apt-get install libcap2-bin)")
    high = free_port()
    r = subprocess.run(["capsh", "--drop=cap_net_bind_service", "--", "-c",
                        '"$0" -c "$1"', sys.executable, PRIVILEGED_CHILD % high],
                       capture_output=True, text=True, timeout=30, env=repo_env(), cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    import json

    low, ok = json.loads(r.stdout.strip().splitlines()[-1])
    assert low == ("hostfwd tcp:127.0.0.1:80-:80: host port 80 is privileged (below 1024) and this process "
                   "lacks CAP_NET_BIND_SERVICE: use a port of 1024 or above")
    assert ok is None
