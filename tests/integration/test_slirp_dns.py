"""The guest's DNS queries to 10.0.2.3 reach the host's resolver (real libslirp, test resolver).

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


def test_dns_query_to_10_0_2_3_is_answered_by_the_hosts_resolver(tmp_path):
    for tool in ("unshare", "mount", "ip"):
        if not shutil.which(tool):
            pytest.fail("%s is needed for the DNS test (util-linux, iproute2)" % tool)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    script = 'ip link set lo up && mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3"'
    r = subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script, "sh", str(resolv), sys.executable, CHILD],
                       capture_output=True, text=True, timeout=60, env=repo_env(), cwd=str(REPO))
    assert r.returncode == 0, "child failed:\n" + r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["src"] == "10.0.2.3" and out["sport"] == 53
    assert out["id"] == 0x4242 and out["answers"] == ["192.0.2.7"]
    assert out["asked"] == [b"\x03llm\x06tenbox\x04test\x00".hex()]
