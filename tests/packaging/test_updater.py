"""host.update for real: a Debian 12 chroot, the package from a signed apt repository on 127.0.0.1, the
cloud on 127.0.0.1 (tests; root).

The chroot's systemctl stand-in is replaced by one that really restarts the
chroot's tenboxd (SIGTERM, then start the new version), so the seed's promise
can be checked end to end: the cloud's host.update gets its structured answer
`{from, to}` *before* the package's postinst restarts the daemon, and the new
daemon comes back on the new version. Then every refusal: vms_running with a
real VM, update_disabled, apt_failed on a broken repository, version_unchanged,
update_in_progress.
"""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest

from tests.cloud_server import LoopbackCloud
from tests.framework.daemon import control_request
from tests.framework.guests import guest_path
from tests.packaging.aptrepo import SUITE
from tests.packaging.chroots import Chroot

SOCKET = "/run/tenbox/tenbox.sock"
DAEMON_START_TIMEOUT_SEC = 30
UPDATE_LOG_WAIT_SEC = 120  # the updater's last log line, after apt-get returns

# systemctl for this test: `restart tenboxd` stops the running daemon and starts
# the installed (new) one, as systemd would; it logs when it sent the SIGTERM.
RESTARTING_STANDIN = r"""#!/bin/sh
echo "$*" >> /var/log/systemctl-standin.log
verb=""; unit=""
for a in "$@"; do
    case $a in -*) ;; *) if [ -z "$verb" ]; then verb=$a; elif [ -z "$unit" ]; then unit=$a; fi ;; esac
done
case $unit in ""|*.*) ;; *) unit=$unit.service ;; esac
wants=/etc/systemd/system/multi-user.target.wants
case $verb in
    enable) mkdir -p "$wants"; ln -sf "/lib/systemd/system/$unit" "$wants/$unit" ;;
    is-enabled) if [ -L "$wants/$unit" ]; then echo enabled; exit 0; fi; echo disabled; exit 1 ;;
    is-active) exit 0 ;;
    restart|try-restart)
        if [ "$unit" = tenboxd.service ]; then
            pid=$(cat /run/tenboxd.pid 2>/dev/null)
            echo "sigterm $(date +%s.%N)" >> /var/log/tenboxd-restarts.log
            [ -n "$pid" ] && kill -TERM "$pid" && while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
            setsid /opt/tenbox/start-daemon.sh </dev/null >>/var/log/tenboxd.log 2>&1 &
            echo "started $(date +%s.%N)" >> /var/log/tenboxd-restarts.log
        fi ;;
esac
exit 0
"""

START_DAEMON = r"""#!/bin/sh
# tenboxd as the unit starts it (systemd's INVOCATION_ID picks the system paths).
mkdir -p -m 0755 /run/tenbox
set -a; [ -f /etc/tenbox/tenboxd.env ] && . /etc/tenbox/tenboxd.env; set +a
export INVOCATION_ID=tenbox-updater-test TENBOX_SOCKET_GROUP=tenbox TENBOX_NO_SCOPES=1
export TENBOX_CLOUD_CA_FILE=/opt/tenbox/cloud-ca.pem
echo $$ > /run/tenboxd.pid
exec tenboxd
"""


def call(chroot, type_, timeout=600.0, **payload):
    return control_request(chroot.path(SOCKET), type_, timeout, **payload)


def wait_daemon(chroot, version=None):
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_SEC
    while time.monotonic() < deadline:
        try:
            info = call(chroot, "system.info", timeout=5)
            if info.get("ok") and (version is None or info["payload"]["version"] == version):
                return info["payload"]
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    log = chroot.path("/var/log/tenboxd.log")
    pytest.fail("tenboxd (%s) did not answer:\n%s" % (version, log.read_text()[-4000:] if log.exists() else ""))


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    c = LoopbackCloud(tmp_path_factory.mktemp("cloud"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def host(debs, apt_repo, cloud):
    """Debian 12 with the older package installed from the repository and tenboxd running."""
    apt_repo.publish([debs.old])
    with Chroot("bookworm") as c:
        opt = c.path("/opt/tenbox")
        opt.mkdir(parents=True)
        shutil.copy2(apt_repo.keyring, opt / "test-archive-keyring.gpg")
        shutil.copy2(str(cloud.ca_file), opt / "cloud-ca.pem")
        shutil.copy2(guest_path("idle"), opt / "idle.bzImage")
        (opt / "start-daemon.sh").write_text(START_DAEMON)
        (opt / "start-daemon.sh").chmod(0o755)
        keyring = "/usr/share/keyrings/tenbox-test.gpg"
        shutil.copy2(apt_repo.keyring, c.path(keyring))
        sources = c.path("/etc/apt/sources.list.d/tenbox.list")
        sources.write_text("deb [signed-by=%s] %s %s main\n" % (keyring, apt_repo.url, SUITE))
        c.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends tenbox", step="install")
        env = c.path("/etc/tenbox/tenboxd.env")
        env.parent.mkdir(parents=True, exist_ok=True)
        env.write_text("TENBOX_CLOUD_URL=wss://127.0.0.1:%d/api/device-tunnel\n" % cloud.port)
        standin = c.path("/usr/local/sbin/systemctl")
        standin.write_text(RESTARTING_STANDIN)
        c.run("systemctl enable tenboxd")
        c.simulate_systemd(True)  # the postinst notifies and restarts only "under systemd"
        c.popen("/opt/tenbox/start-daemon.sh", c.path("/var/log/tenboxd.log").parent / "tenboxd-first.log")
        wait_daemon(c, debs.v1)
        yield SimpleNamespace(chroot=c, debs=debs, repo=apt_repo, sources=sources, cloud=cloud)
        c.simulate_systemd(False)


def restarts(chroot):
    p = chroot.path("/var/log/tenboxd-restarts.log")
    return p.read_text().splitlines() if p.exists() else []


class TestHostUpdate:
    def test_vms_running_lists_the_active_vm(self, host):
        vm = call(host.chroot, "vm.create", name="busy", kernel="/opt/tenbox/idle.bzImage", memory_mb=32)
        assert vm["ok"], vm
        r = call(host.chroot, "vm.start", vm_id="busy")
        assert r["ok"] and r["payload"]["state"] == "running", r
        try:
            r = call(host.chroot, "host.update")
            assert r["error_code"] == "vms_running"
            assert r["running_vms"] == [{"vm_id": vm["payload"]["id"], "name": "busy", "state": "running"}]
        finally:
            assert call(host.chroot, "vm.stop", vm_id="busy")["ok"]
            call(host.chroot, "vm.delete", vm_id="busy")

    def test_update_disabled_without_the_apt_source(self, host):
        saved = host.sources.read_text()
        host.sources.unlink()
        try:
            r = call(host.chroot, "host.update")
            assert r["error_code"] == "update_disabled" and "apt source" in r["error"]
        finally:
            host.sources.write_text(saved)

    def test_a_bad_target_version_is_refused(self, host):
        r = call(host.chroot, "host.update", version="1.0; rm -rf /")
        assert r["error_code"] == "invalid_argument"

    def test_version_unchanged_when_the_repository_has_nothing_newer(self, host):
        r = call(host.chroot, "host.update")
        assert r["error_code"] == "version_unchanged", r
        assert host.debs.v1 in r["error"]
        log = host.chroot.path("/var/lib/tenbox/logs/update.log").read_text()
        assert "apt-get install exited 0" in log
        assert log.splitlines()[1][:4].isdigit()  # every line carries its timestamp
        assert restarts(host.chroot) == []

    def test_apt_failed_on_a_broken_repository(self, host):
        saved = host.sources.read_text()
        host.sources.write_text(saved.replace(host.repo.url, "http://127.0.0.1:9/broken"))
        try:
            r = call(host.chroot, "host.update")
            assert r["error_code"] == "apt_failed", r
            assert r["exit_code"] != 0 and r["log_tail"]
        finally:
            host.sources.write_text(saved)
        assert host.chroot.run("dpkg --audit").stdout.strip() == ""

    def test_success_is_answered_before_the_restart_and_the_new_daemon_runs(self, host):
        cloud = host.cloud
        cloud.wait_type("device.hello", timeout=60)
        host.repo.publish([host.debs.old, host.debs.new])
        # While this update runs, a second one and vm.start are refused.
        vm = call(host.chroot, "vm.create", name="later", kernel="/opt/tenbox/idle.bzImage", memory_mb=32)
        assert vm["ok"]
        cloud.send({"id": "upd-1", "type": "host.update", "payload": {}})
        deadline = time.monotonic() + 30
        while True:
            r = call(host.chroot, "host.update")
            if r.get("error_code") == "update_in_progress":
                break
            assert time.monotonic() < deadline, r
            time.sleep(0.05)
        assert call(host.chroot, "vm.start", vm_id="later")["error_code"] == "update_in_progress"
        reply = cloud.wait(lambda e: e.get("id") == "upd-1", timeout=600)
        received = time.time()
        assert reply["type"] == "host.update.response"
        assert reply["payload"] == {"ok": True, "payload": {"from": host.debs.v1, "to": host.debs.v2}}, reply
        info = wait_daemon(host.chroot, host.debs.v2)
        assert info["version"] == host.debs.v2
        lines = restarts(host.chroot)
        assert lines and lines[0].startswith("sigterm"), lines
        assert float(lines[0].split()[1]) >= received - 1.0  # the answer left before the restart began
        hello = cloud.wait(lambda e: e["type"] == "device.hello" and
                           e["payload"].get("daemon_version") == host.debs.v2, timeout=60)
        assert hello
        c = host.chroot
        assert c.run("dpkg-query -W -f '${Version}' tenbox").stdout == host.debs.v2
        assert c.run("dpkg --audit").stdout.strip() == ""
        # The new daemon can say hello before apt-get has returned (the postinst restarts it mid-install):
        # the update's last line follows, in its own time.
        log_file = c.path("/var/lib/tenbox/logs/update.log")
        deadline = time.monotonic() + UPDATE_LOG_WAIT_SEC
        while "apt-get install exited" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = log_file.read_text()
        assert "apt-get install exited 0" in log and "tenbox" in log
