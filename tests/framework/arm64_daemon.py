"""Inside the arm64 lane: tenboxd runs an arm64 VM, created, started and shut down with tenboxctl (tests; in the arm64 lane, root).

    python3 -m tests.framework.arm64_daemon --kernel K --initrd I [--cpus N]

A real tenboxd on private paths (tests/framework/daemon.py's DaemonProcess,
as the x86 daemon tests use), its worker on the emulated host's KVM. The
guest's init prints `ARM64-VM: ready` and waits for the power key; `vm
shutdown` must end it gracefully. Each step prints one `DAEMON:` line; the
outer test (tests/integration/test_aarch64_lane.py) reads them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.framework.daemon import DaemonProcess

# Everything is emulated here: a worker's imports alone take tens of seconds (as in the x86 lane).
LANE_ENV = {"TENBOX_TEST_START_TIMEOUT_SEC": "180", "TENBOX_TEST_HEARTBEAT_LIVENESS": "30",
            "TENBOX_STANDBY_WORKERS": "0"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    d = DaemonProcess(Path(tempfile.mkdtemp(prefix="tbx-arm64-")), extra_env=LANE_ENV)
    d.start(timeout=180)
    try:
        r = d.ctl("vm", "create", "a64", "--kernel", args.kernel, "--initrd", args.initrd, "--memory", "256",
                  "--cpus", str(args.cpus), "--cmdline", "console=ttyS0 panic=1 quiet")
        print("DAEMON: create rc=%d %s" % (r.returncode, r.stderr.decode().strip()), flush=True)
        r = d.ctl("vm", "start", "a64", timeout=240)
        print("DAEMON: start rc=%d %s" % (r.returncode, r.stderr.decode().strip()), flush=True)
        d.wait_console("a64", "ARM64-VM: ready", timeout=240)
        print("DAEMON: ready", flush=True)
        r = d.ctl("vm", "shutdown", "a64", "--json", timeout=120)
        graceful = json.loads(r.stdout)["graceful"] if r.returncode == 0 else r.stderr.decode().strip()
        print("DAEMON: shutdown rc=%d graceful=%s" % (r.returncode, graceful), flush=True)
        v = d.wait_state("a64", "stopped", 60)
        print("DAEMON: state %s failure=%s" % (v["state"], json.dumps(v["last_failure"])), flush=True)
        for line in d.console("a64"):
            if line.startswith("ARM64-VM:"):
                print("DAEMON: console " + line, flush=True)
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
