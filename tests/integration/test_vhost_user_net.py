"""Linux's own virtio-net driver on tenbox's virtio-net and libslirp NAT, over vhost-user.

`tenbox-vhost-user-net` (python3 -m tenbox_vmm.vhost_user net) serves
tenbox's VirtioNet with its SlirpNetwork — what the KVM worker builds — to
QEMU's `-netdev vhost-user`; QEMU runs the Debian cloud kernel under TCG
(tests/framework/: linux_guest, qemu, vhost_user). One guest boot runs the whole conversation
(busybox udhcpc, ping, wget, nslookup, nc) and each test checks one part of
it, so that a broken part fails its own test.

DNS: libslirp answers 10.0.2.3 by forwarding to the first nameserver of the
host's /etc/resolv.conf. The back end runs in a private mount namespace
(unshare; the tests run as root) where a resolv.conf naming a loopback
address of the test's own is bind-mounted over /etc/resolv.conf; a stub
resolver answers there. Nothing outside the test is touched.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import shutil
import socket
import struct
import threading
import time
from typing import Dict, List

import pytest

from tests.framework import qemu
from tests.framework.linux_guest import Artifacts, boot_script, initrd_with, marks
from tests.framework.ports import free_port
from tests.framework.process import run_tool
from tests.framework.repo import PYTHON, REPO
from tests.framework.vhost_user import Backend, one_line_error

GUESTFWD_ADDR = "10.0.2.100"
GUESTFWD_PORT = 8080
GUEST_LISTEN_PORT = 8081
DNS_NAME = "llm.tenbox.test"
DNS_ANSWER = "192.0.2.7"
BLOB_BYTES = 3 << 20
PAGE_BYTES = 300000
HOST_WAIT_SEC = 30.0

# busybox 1.35's wget crashes with -T: `timeout` bounds it instead.
GUEST = r"""
udhcpc -i eth0 -n -q -t 5 -T 2 >/tmp/dhcp 2>&1
echo "TB-DHCP-RC: $?"
echo "TB-ADDR: $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "TB-ROUTE: $(ip route | awk '/^default/ {print $3}')"
echo "TB-RESOLV: $(awk '/^nameserver/ {print $2}' /etc/resolv.conf)"
ping -c 3 -W 3 10.0.2.2 >/tmp/ping 2>&1
echo "TB-PING: $? $(grep -c 'bytes from 10.0.2.2' /tmp/ping)"
timeout 30 wget -q -O /tmp/blob http://%(fwd_addr)s:%(fwd_port)d/blob
echo "TB-GET: $? $(wc -c </tmp/blob) $(sha256sum </tmp/blob | cut -d' ' -f1)"
nslookup %(name)s 10.0.2.3 >/tmp/ns 2>&1
echo "TB-DNS: $? $(awk '/^Name:/ {n = 1} n && /^Address/ {print $2}' /tmp/ns)"
timeout 10 wget -q -O /tmp/lo http://10.0.2.2:%(host_port)d/blob 2>/tmp/lo.err
echo "TB-LOOPBACK: $? $(cat /tmp/lo.err)"
head -c %(page)d /dev/urandom >/tmp/page
echo "TB-PAGE: $(sha256sum </tmp/page | cut -d' ' -f1)"
echo TB-LISTENING
nc -l -p %(listen)d </tmp/page
echo "TB-NC: $?"
"""


class StubResolver:
    """A DNS server on (addr, 53) that answers A queries for one name, and nothing else."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((addr, 53))
        except OSError as e:
            self.sock.close()
            pytest.fail("cannot run the stub resolver on %s:53: %s" % (addr, e))
        self.asked: List[tuple] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            try:
                end = data.index(b"\0", 12) + 5
            except ValueError:
                continue
            labels, i = [], 12
            while data[i]:
                labels.append(data[i + 1:i + 1 + data[i]].decode("ascii", "replace"))
                i += 1 + data[i]
            name = ".".join(labels)
            qtype = struct.unpack_from("!H", data, end - 4)[0]
            self.asked.append((name, qtype))
            answers = b""
            count = 0
            if name == DNS_NAME and qtype == 1:
                answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(DNS_ANSWER)
                count = 1
            self.sock.sendto(data[:2] + struct.pack("!HHHHH", 0x8180, 1, count, 0, 0) + data[12:end] + answers, peer)

    def close(self) -> None:
        self.sock.close()


class BlobServer:
    """An HTTP server on 127.0.0.1 serving /blob; it counts the requests it gets."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.requests: List[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                if self.path != "/blob":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.blob)))
                self.end_headers()
                self.wfile.write(server.blob)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fetch_from_guest(port: int) -> bytes:
    """Read what the guest's `nc -l` sends through the host forward (retried until it listens)."""
    deadline = time.monotonic() + HOST_WAIT_SEC
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                data = bytearray()
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            data = bytearray()
        if data:
            return bytes(data)
        time.sleep(0.2)  # forwarded before the guest listened: libslirp closed it at once
    return b""


@pytest.fixture(autouse=True, scope="module")
def _tools_installed():
    for tool in (qemu.QEMU, "unshare", "mount"):
        if not shutil.which(tool):
            pytest.fail("%s is not installed (make deps; util-linux)" % tool)


@pytest.fixture(scope="module")
def session(tmp_path_factory, linux: Artifacts, tsc_khz: int) -> Dict[str, object]:
    """One guest boot through the whole conversation; what every test checks."""
    work = tmp_path_factory.mktemp("vhost-user-net")
    blob = os.urandom(BLOB_BYTES)
    server = BlobServer(blob)
    resolver_addr = "127.%d.%d.%d" % (random.randint(100, 250), random.randint(1, 250), random.randint(2, 250))
    resolver = StubResolver(resolver_addr)
    resolv = work / "resolv.conf"
    resolv.write_text("nameserver %s\n" % resolver_addr)
    host_port = free_port()
    script = GUEST % {"fwd_addr": GUESTFWD_ADDR, "fwd_port": GUESTFWD_PORT, "name": DNS_NAME,
                      "host_port": server.port, "page": PAGE_BYTES, "listen": GUEST_LISTEN_PORT}
    initrd = initrd_with(work, linux, script)
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv)]
    args = ["--hostfwd", "tcp:127.0.0.1:%d-:%d" % (host_port, GUEST_LISTEN_PORT),
            "--guestfwd", "guestfwd:tcp:%s:%d-127.0.0.1:%d" % (GUESTFWD_ADDR, GUESTFWD_PORT, server.port)]
    out: Dict[str, object] = {"blob_sha": hashlib.sha256(blob).hexdigest()}
    try:
        with Backend("net", work / "net.sock", args, wrap=wrap) as be:
            with boot_script(linux, tsc_khz, initrd, qemu.vhost_user_net(be.sock)) as vm:
                vm.wait_for(r"^TB-LISTENING$")
                page = fetch_from_guest(host_port)
                vm.wait_for(r"^TENBOX-INITRAMFS: rc=\d+$")
                out["qemu_rc"] = vm.wait_exit()
                out["text"] = vm.output
                out["seconds"] = vm.elapsed()
            out["backend_rc"] = be.wait_exit()
            out["backend_log"] = be.errors
    finally:
        server.close()
        resolver.close()
    out["page"] = page
    out["server_requests"] = list(server.requests)
    out["dns_asked"] = list(resolver.asked)
    print("QEMU TCG guest with vhost-user net: %.2f s" % out["seconds"])
    if os.environ.get("TENBOX_TEST_DUMP"):
        print(out["text"])
    return out


def mark(session, tag: str) -> str:
    values = marks(session["text"], tag)
    assert len(values) == 1, "expected one %s line in:\n%s" % (tag, session["text"])
    return values[0]


def test_guest_gets_a_dhcp_lease(session):
    """udhcpc gets 10.0.2.15/24 with gateway 10.0.2.2 and DNS 10.0.2.3 from libslirp."""
    assert mark(session, "TB-DHCP-RC") == "0", session["text"]
    assert mark(session, "TB-ADDR") == "10.0.2.15/24"
    assert mark(session, "TB-ROUTE") == "10.0.2.2"
    assert mark(session, "TB-RESOLV") == "10.0.2.3"


def test_guest_pings_the_gateway(session):
    """Three ICMP echoes to 10.0.2.2, three answers."""
    assert mark(session, "TB-PING") == "0 3"


def test_tcp_download_through_a_guestfwd_matches_the_checksum(session):
    """wget of 3 MiB from an HTTP server on the host's 127.0.0.1, through the
    guestfwd 10.0.2.100:8080: every byte arrives (sha256 matches)."""
    assert mark(session, "TB-GET") == "0 %d %s" % (BLOB_BYTES, session["blob_sha"])


def test_hostfwd_reaches_a_guest_listener(session):
    """A host client on the hostfwd port gets what the guest's `nc -l` sends, intact."""
    page = session["page"]
    assert len(page) == PAGE_BYTES, "got %d bytes" % len(page)
    assert hashlib.sha256(page).hexdigest() == mark(session, "TB-PAGE")
    assert mark(session, "TB-NC") == "0"


def test_dns_through_10_0_2_3_reaches_the_hosts_resolver(session):
    """nslookup at 10.0.2.3 is answered by the resolver named in the host's resolv.conf."""
    assert mark(session, "TB-DNS") == "0 %s" % DNS_ANSWER, session["text"]
    assert (DNS_NAME, 1) in session["dns_asked"]


def test_host_loopback_is_closed_without_a_forward(session):
    """The guest cannot reach the host's 127.0.0.1 through the gateway address:
    the same HTTP server that the guestfwd reaches refuses it (it saw one request)."""
    rc, _, why = mark(session, "TB-LOOPBACK").partition(" ")
    assert rc != "0", session["text"]
    # libslirp refuses the connection (EPERM): the guest sees an ICMP unreachable or a reset.
    assert any(w in why.lower() for w in ("unreachable", "refused", "reset")), why
    assert session["server_requests"] == ["/blob"]


def test_backend_and_qemu_exit_cleanly_after_the_guest_powers_off(session):
    """QEMU exits 0 at guest poweroff; the back end sees the disconnect and exits 0."""
    assert session["qemu_rc"] == 0
    assert session["backend_rc"] == 0, session["backend_log"]
    assert "front end disconnected" in session["backend_log"]
    assert "ERROR" not in session["backend_log"] and "Traceback" not in session["backend_log"]


def test_net_command_line_errors_are_one_line(tmp_path):
    """A bad MAC or forward spec: exit 2, one line naming it, no socket left behind."""
    for args, needle in ((["--mac", "zz"], "zz"),
                         (["--mac", "01:00:00:00:00:01"], "multicast"),
                         (["--hostfwd", "tcp::99999-:22"], "99999"),
                         (["--guestfwd", "nonsense"], "nonsense")):
        r = run_tool([PYTHON, "-m", "tenbox_vmm.vhost_user", "net", "--socket", str(tmp_path / "s")] + args,
                        60, cwd=REPO)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in one_line_error(r.stderr), (args, r.stderr)
        assert not (tmp_path / "s").exists()
