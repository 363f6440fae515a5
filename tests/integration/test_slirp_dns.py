"""The guest's DNS queries to 10.0.2.3 reach the host's resolver, and nothing else does (real libslirp, test resolver).

libslirp reads the host resolver from /etc/resolv.conf. To point it at a
resolver of the test's own without touching the host, the test runs in a
child process in private mount and network namespaces (`unshare`; the
tests run as root): /etc/resolv.conf is bind-mounted over with a file that
names 127.0.0.1, a stub resolver listens on 127.0.0.1:53 there, and the
namespace has no other interface, so no query can leave the machine.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.framework.repo import REPO, repo_env

CHILD = textwrap.dedent(r"""
    import json, socket, struct, threading
    from tests import net_frames as nf
    from tests.net_frames import GuestLink

    asked = []

    def resolver(sock):
        while True:
            data, peer = sock.recvfrom(2048)
            qid = data[:2]
            end = data.index(b"\0", 12) + 5
            asked.append(data[12:end - 4])
            answer = (qid + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + data[12:end]
                      + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 7]))
            sock.sendto(answer, peer)

    stub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stub.bind(("127.0.0.1", 53))
    threading.Thread(target=resolver, args=(stub,), daemon=True).start()

    link = GuestLink()
    link.resolve_gateway()
    link.send_ip(nf.udp4(link.ip, "10.0.2.3", 40053, 53, nf.dns_query(0x4242, "llm.tenbox.test")))
    f = link.wait_for(lambda f: f.udp is not None and f.udp.dport == 40053, "DNS answer")
    qid, addrs = nf.dns_answers(f.udp.payload)
    out = {"src": f.ip.src, "sport": f.udp.sport, "id": qid, "answers": addrs,
           "asked": [a.hex() for a in asked]}
    link.close()
    print(json.dumps(out))
""")


def _in_namespaces(tmp_path, resolv_conf: str, child: str) -> dict:
    """Run `child` with python in private mount and network namespaces whose resolv.conf says resolv_conf."""
    for tool in ("unshare", "mount", "ip"):
        if not shutil.which(tool):
            pytest.fail("%s is needed for the DNS test (util-linux, iproute2)" % tool)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(resolv_conf)
    script = 'ip link set lo up && mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3"'
    r = subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script, "sh", str(resolv), sys.executable, child],
                       capture_output=True, text=True, timeout=120, env=repo_env(), cwd=str(REPO))
    assert r.returncode == 0, "child failed:\n" + r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_dns_query_to_10_0_2_3_is_answered_by_the_hosts_resolver(tmp_path):
    out = _in_namespaces(tmp_path, "nameserver 127.0.0.1\n", CHILD)
    assert out["src"] == "10.0.2.3" and out["sport"] == 53
    assert out["id"] == 0x4242 and out["answers"] == ["192.0.2.7"]
    assert out["asked"] == [b"\x03llm\x06tenbox\x04test\x00".hex()]


# The host runs services on loopback next to its resolver (ports 7777 and 80, TCP and UDP, on
# 127.0.0.1, 127.0.0.53 and ::1). The guest knocks on every port but DNS's at the DNS address
# and at the gateway, over IPv4 and IPv6; nothing may reach them. DNS itself keeps working.
LOOPBACK_CHILD = textwrap.dedent(r"""
    import ipaddress, json, socket, sys, time
    from tests import net_frames as nf
    from tests.net_frames import GuestLink, GuestTcp

    resolver = sys.argv[1]
    services = []
    for host in ("127.0.0.1", "127.0.0.53", "::1"):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        for port in (7777, 80) + ((53,) if host == resolver else ()):
            t = socket.socket(fam, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((host, port))
            t.listen(8)
            t.setblocking(False)
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.bind((host, port))
            u.setblocking(False)
            services.append((host, port, t, u))

    reached = []

    def watch(link, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            link.pump()
            for host, port, t, u in services:
                try:
                    t.accept()
                    reached.append("tcp %s:%d" % (host, port))
                except BlockingIOError:
                    pass
                try:
                    u.recvfrom(2048)
                    reached.append("udp %s:%d" % (host, port))
                except BlockingIOError:
                    pass

    link = GuestLink()
    link.resolve_gateway()
    ll = next(iter(link.ip6))
    slaac = str(ipaddress.IPv6Address("fec0::" + ll.split("fe80::")[1]))
    link.ip6.add(slaac)
    sport = 41000
    for dst in ("10.0.2.3", "10.0.2.2"):
        for port in ((7777, 80) if dst == "10.0.2.3" else (7777, 80, 53)):
            sport += 1
            link.send_ip(nf.tcp4(link.ip, dst, sport, port, 1, 0, nf.TCP_SYN, options=nf.MSS_OPTION))
            link.send_ip(nf.udp4(link.ip, dst, sport, port, b"knock"))
    for dst in ("fec0::3", "fec0::2"):
        for port in (7777, 80):
            sport += 1
            link.send_ip(nf.tcp6(slaac, dst, sport, port, 1, 0, nf.TCP_SYN, options=nf.MSS_OPTION))
            link.send_ip(nf.udp6(slaac, dst, sport, port, b"knock"))
    watch(link, 2.0)
    knocks_dropped = link.net.frames_dropped
    unreachable = sum(1 for f in link.rx if f.icmp is not None and f.ip.src in ("10.0.2.3", "fec0::3")
                      and (f.icmp.type, f.icmp.code) in ((3, 3), (1, 4)) and f.checksums_ok())

    # DNS over TCP still reaches the resolver: a SYN to port 53 at the DNS address is connected.
    dns = "fec0::3" if ":" in resolver else "10.0.2.3"
    src = slaac if ":" in resolver else link.ip
    build = nf.tcp6 if ":" in resolver else nf.tcp4
    link.send_ip(build(src, dns, 42053, 53, 1, 0, nf.TCP_SYN, options=nf.MSS_OPTION))
    watch(link, 1.0)
    link.close()
    print(json.dumps({"reached": reached, "dropped": knocks_dropped, "unreachable": unreachable}))
""")


@pytest.mark.parametrize("resolv_conf, resolver", [
    ("nameserver 127.0.0.1\n", "127.0.0.1"),  # dnsmasq, unbound
    ("nameserver 127.0.0.53\noptions edns0 trust-ad\n", "127.0.0.53"),  # systemd-resolved's stub
    ("nameserver ::1\n", "::1"),
    ("# no nameserver\n", "none"),  # no resolver at all
])
def test_only_dns_to_10_0_2_3_reaches_the_hosts_loopback_whatever_resolv_conf_says(tmp_path, resolv_conf, resolver):
    """TCP and UDP to 10.0.2.3, 10.0.2.2, fec0::3 and fec0::2 on ports other than DNS reach no host loopback service.

    The frames to the DNS address are kept from libslirp (counted, and answered with ICMP
    port unreachable), so the
    answer does not depend on the libslirp release (4.7 refuses them itself; older releases,
    which tenbox also runs on, are not tested here).
    """
    out = _in_namespaces(tmp_path, resolv_conf, LOOPBACK_CHILD.replace("sys.argv[1]", repr(resolver)))
    dns_port = ["tcp %s:53" % resolver] if resolver != "none" else []
    assert out["reached"] == dns_port  # DNS over TCP connects to the resolver; nothing else anywhere
    assert out["dropped"] == 8  # TCP and UDP to ports 7777 and 80 of 10.0.2.3 and fec0::3
    assert out["unreachable"] == 8  # each answered at once: port unreachable
