"""Inside the arm64 lane: tenbox installed from its .deb as an operator installs it, then an arm64 VM through tenboxd (tests; in the arm64 lane, root).

    python3 -m tests.framework.arm64_daemon --repo DIR --keyring FILE --installer FILE --kernel K --initrd I
                                            --image-dir DIR --image-name NAME

The lane's root is a dpkg-managed Debian 12 arm64 (lane_arm64.py) with no
network. This script, as root on the emulated arm64 KVM host:

1. serves the signed apt repository DIR on 127.0.0.1 (tests/packaging/aptrepo.py's server);
2. runs install-linux.sh against it, with its real KVM check (/dev/kvm is
   there) and $SUDO_USER `alice`; systemctl is the packaging tests'
   recording stand-in (systemd is not PID 1 here);
3. starts the installed /usr/bin/tenboxd as its unit would (root, the env
   file, INVOCATION_ID so it takes the system paths);
4. as alice, through the group socket: `tenbox vm create` (2 vCPUs), `vm
   start`, waits for the guest's `ARM64-VM: ready`, `vm shutdown` (the power
   button: gpio-keys in Debian's generic kernel), and reads the console back;
5. as root, `tenbox image build debian --arch arm64` on the arm64 template
   the build host made (tests/framework/images.py; the lane has no network,
   so the script finds it up to date and the CLI imports it); as alice, a
   VM of it boots Debian to `tenbox login:` on ttyS0 and `vm shutdown` ends
   it gracefully (Debian's cloud kernel hears tenbox's virtio-input key,
   systemd-logind powers off);
6. stops tenboxd with SIGTERM.

Each step prints one `DAEMON: <step> <facts>` line; the outer test
(tests/packaging/test_arm64_install.py) reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from tests.framework.process import login_prompt
from tests.packaging.aptrepo import SUITE, AptRepository
from tests.packaging.chroots import STANDIN, STANDIN_LOG

OPERATOR = "alice"
SOCKET = "/run/tenbox/tenbox.sock"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Everything is emulated here: a worker's imports alone take tens of seconds (as in the x86 lane).
LANE_ENV = {"TENBOX_TEST_START_TIMEOUT_SEC": "180", "TENBOX_TEST_HEARTBEAT_LIVENESS": "30",
            "TENBOX_STANDBY_WORKERS": "0"}
INSTALL_TIMEOUT_SEC = 900
DAEMON_UP_TIMEOUT_SEC = 240
CTL_TIMEOUT_SEC = 240
READY_TIMEOUT_SEC = 300
STOP_TIMEOUT_SEC = 60
IMPORT_TIMEOUT_SEC = 300  # the script's up-to-date check and an import of ~180 MB, all emulated
LOGIN_TIMEOUT_SEC = 1200  # systemd under the emulated host's KVM: every exit crosses emulated EL2
SHUTDOWN_TIMEOUT_SEC = 300  # systemd stopping its units, emulated as the boot was
LOGIN = login_prompt("tenbox")


def say(step: str, facts: str = "") -> None:
    print(("DAEMON: %s %s" % (step, facts)).rstrip(), flush=True)


def run(argv, timeout: float = CTL_TIMEOUT_SEC, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PATH=PATH, **(env or {})))


def ctl(*args: str, timeout: float = CTL_TIMEOUT_SEC) -> subprocess.CompletedProcess:
    """The installed `tenbox` CLI as the operator (a member of the tenbox group)."""
    return run(["runuser", "-u", OPERATOR, "--", "tenbox"] + list(args), timeout=timeout)


def last_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def install(repo: str, keyring: str, installer: str) -> None:
    standin = Path("/usr/local/sbin/systemctl")
    standin.write_text(STANDIN)
    standin.chmod(0o755)
    server = AptRepository(Path(repo))
    url = server.serve()  # a daemon thread: it ends with this process (no gpg here to close)
    run(["useradd", "--create-home", "--shell", "/bin/sh", OPERATOR])
    r = run(["sh", installer, "--repo", url, "--suite", SUITE, "--keyring", keyring, "--pair-wait", "0"],
            timeout=INSTALL_TIMEOUT_SEC, env={"SUDO_USER": OPERATOR})
    say("install", "rc=%d %s" % (r.returncode, last_line(r)))
    if r.returncode != 0:
        print(r.stdout + r.stderr, flush=True)
    q = run(["dpkg-query", "-W", "-f", "${Status} ${Version} ${Architecture}", "tenbox"])
    say("dpkg", "%s on %s" % (q.stdout.strip(), run(["dpkg", "--print-architecture"]).stdout.strip()))
    say("audit", "[%s]" % run(["dpkg", "--audit"]).stdout.strip())
    say("groups", run(["id", "-nG", OPERATOR]).stdout.strip())
    say("worker_user", run(["getent", "passwd", "tenbox-vm"]).stdout.strip().split(":")[-1])
    calls = [c for c in Path(STANDIN_LOG).read_text().splitlines() if "tenboxd" in c] \
        if Path(STANDIN_LOG).exists() else []
    say("systemctl", json.dumps(calls))


def start_daemon() -> subprocess.Popen:
    os.makedirs("/run/tenbox", mode=0o755, exist_ok=True)
    log = open("/lane-out/tenboxd.log", "wb")
    env = dict(os.environ, PATH=PATH, INVOCATION_ID="tenbox-arm64-lane", TENBOX_SOCKET_GROUP="tenbox",
               TENBOX_NO_SCOPES="1", **LANE_ENV)
    daemon = subprocess.Popen(["sh", "-c", "set -a; . /etc/tenbox/tenboxd.env; set +a; exec tenboxd"],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + DAEMON_UP_TIMEOUT_SEC
    while time.monotonic() < deadline and daemon.poll() is None:
        if os.path.exists(SOCKET) and ctl("vm", "ls").returncode == 0:
            break
        time.sleep(1)
    st, parent = os.stat(SOCKET) if os.path.exists(SOCKET) else None, os.stat("/run/tenbox")
    facts = "socket=%s" % ("%o:%d:%d" % (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) if st else "none")
    tenbox_gid = run(["getent", "group", "tenbox"]).stdout.split(":")[2] if st else "?"
    say("daemon", "%s dir=%o tenbox_gid=%s version=%s" % (
        facts, stat.S_IMODE(parent.st_mode), tenbox_gid, run(["tenboxd", "--version"]).stdout.strip()))
    return daemon


def run_vm(kernel: str, initrd: str) -> None:
    r = ctl("vm", "create", "a64", "--kernel", kernel, "--initrd", initrd, "--memory", "256", "--cpus", "2",
            "--cmdline", "console=ttyS0 panic=1 quiet")
    say("create", "rc=%d %s" % (r.returncode, last_line(r)))
    r = ctl("vm", "start", "a64")
    say("start", "rc=%d %s" % (r.returncode, last_line(r)))
    deadline = time.monotonic() + READY_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if "ARM64-VM: ready" in ctl("vm", "logs", "a64").stdout:
            say("ready")
            break
        time.sleep(2)
    r = ctl("vm", "shutdown", "a64", "--json")
    graceful = json.loads(r.stdout)["graceful"] if r.returncode == 0 else last_line(r)
    say("shutdown", "rc=%d graceful=%s" % (r.returncode, graceful))
    v = wait_stopped("a64")
    say("state", "%s failure=%s" % (v.get("state"), json.dumps(v.get("last_failure"))))
    for line in ctl("vm", "logs", "a64").stdout.splitlines():
        if line.startswith("ARM64-VM:"):
            say("console", line)


def wait_stopped(vm: str) -> dict:
    deadline = time.monotonic() + STOP_TIMEOUT_SEC
    v: dict = {}
    while time.monotonic() < deadline:
        v = json.loads(ctl("vm", "show", vm, "--json").stdout or "{}")
        if v.get("state") == "stopped":
            break
        time.sleep(1)
    return v


def run_image(image_dir: str, name: str) -> None:
    started = time.monotonic()
    r = run(["tenbox", "image", "build", "debian", "--arch", "arm64", "--layout", "plain", "--name", name,
             "--out", image_dir], timeout=IMPORT_TIMEOUT_SEC)
    say("image_build", "rc=%d up_to_date=%s %.0fs %s" % (r.returncode, "up to date" in r.stderr,
                                                          time.monotonic() - started, last_line(r)))
    for img in json.loads(ctl("image", "ls", "--json").stdout or "[]"):
        say("image_ls", "%s arch=%s release=%s" % (img["name"], img["arch"], img["kernel_release"]))
    for line in ctl("image", "inspect", name).stdout.splitlines():
        if line.split(":", 1)[0] in ("arch", "kernel"):
            say("image_inspect", " ".join(line.split()))
    cmdline = json.loads((Path(image_dir) / "manifest.json").read_text())["cmdline"]
    # quiet: every console byte is an exit of the nested guest.
    r = ctl("vm", "create", "deb", "--image", name, "--memory", "512", "--cpus", "1", "--cmdline", cmdline + " quiet")
    say("image_create", "rc=%d %s" % (r.returncode, last_line(r)))
    started = time.monotonic()
    r = ctl("vm", "start", "deb")
    say("image_start", "rc=%d %s" % (r.returncode, last_line(r)))
    logs = ""
    while time.monotonic() < started + LOGIN_TIMEOUT_SEC:
        logs = ctl("vm", "logs", "deb", "-n", "400").stdout
        if LOGIN.search(logs):
            say("image_login", "after %.0fs" % (time.monotonic() - started))
            break
        time.sleep(5)
    for line in logs.splitlines()[-40:]:
        say("image_console", line)
    started = time.monotonic()
    r = ctl("vm", "shutdown", "deb", "--timeout", str(SHUTDOWN_TIMEOUT_SEC), "--json",
            timeout=SHUTDOWN_TIMEOUT_SEC + 60)
    graceful = json.loads(r.stdout)["graceful"] if r.returncode == 0 else last_line(r)
    say("image_shutdown", "rc=%d graceful=%s %.0fs" % (r.returncode, graceful, time.monotonic() - started))
    v = wait_stopped("deb")
    say("image_state", "%s failure=%s" % (v.get("state"), json.dumps(v.get("last_failure"))))


def main() -> int:
    p = argparse.ArgumentParser()
    for opt in ("--repo", "--keyring", "--installer", "--kernel", "--initrd", "--image-dir", "--image-name"):
        p.add_argument(opt, required=True)
    args = p.parse_args()
    install(args.repo, args.keyring, args.installer)
    daemon = start_daemon()
    try:
        run_vm(args.kernel, args.initrd)
        run_image(args.image_dir, args.image_name)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(STOP_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            daemon.kill()
            rc = "timeout"
        say("stopped", "rc=%s" % rc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
