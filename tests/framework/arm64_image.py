"""Inside the arm64 lane: `tenbox image build debian --arch arm64` imports the arm64 template into tenboxd, and a VM of it boots Debian (tests; in the arm64 lane, root).

    python3 -m tests.framework.arm64_image --out DIR --name NAME

DIR is the build folder make-rootfs-debian.sh --arch arm64 filled on the
build host (tests/framework/images.py): the lane has no network, so the
script finds it up to date and `image build` only imports it, as on an
arm64 host whose build cache is warm. A real tenboxd on private paths
(DaemonProcess) then creates and starts a VM of the image; its console
must reach systemd's login prompt on ttyS0, and `vm shutdown` must end it
gracefully (the power button). Each step prints one `IMAGE:` line; the outer test
(tests/integration/test_aarch64_image_lane.py) reads them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.framework.arm64_daemon import LANE_ENV
from tests.framework.daemon import DaemonProcess

BUILD_SEC = 300  # the script's up-to-date check and an import of ~180 MB, all emulated
BOOT_SEC = 1200  # systemd under the emulated host's KVM: every exit of the guest crosses emulated EL2
LOGIN = "tenbox login:"
SHUTDOWN_SEC = 300  # systemd stopping its units, emulated as the boot was


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    cmdline = json.loads((Path(args.out) / "manifest.json").read_text())["cmdline"]
    d = DaemonProcess(Path(tempfile.mkdtemp(prefix="tbx-arm64-image-")), extra_env=LANE_ENV)
    d.start(timeout=180)
    try:
        started = time.monotonic()
        r = d.ctl("image", "build", "debian", "--arch", "arm64", "--layout", "plain", "--name", args.name,
                  "--out", args.out, "--json", timeout=BUILD_SEC)
        up_to_date = "up to date" in r.stderr.decode()
        print("IMAGE: build rc=%d up_to_date=%s %.0fs %s" % (r.returncode, up_to_date, time.monotonic() - started,
                                                           r.stderr.decode().strip().splitlines()[-1:]), flush=True)
        if r.returncode != 0:
            return 1
        for img in json.loads(d.ctl("image", "ls", "--json").stdout):
            print("IMAGE: ls %s arch=%s release=%s" % (img["name"], img["arch"], img["kernel_release"]), flush=True)
        shown = d.ctl("image", "inspect", args.name).stdout.decode()
        for line in shown.splitlines():
            if line.split(":", 1)[0] in ("arch", "kernel"):
                print("IMAGE: inspect " + " ".join(line.split()), flush=True)
        # quiet: every console byte is an exit of the nested guest (arm64_daemon.py's guests boot so too).
        r = d.ctl("vm", "create", "deb", "--image", args.name, "--memory", "512", "--cpus", "1",
                  "--cmdline", cmdline + " quiet")
        print("IMAGE: create rc=%d %s" % (r.returncode, r.stderr.decode().strip()), flush=True)
        r = d.ctl("vm", "start", "deb", timeout=240)
        print("IMAGE: start rc=%d %s" % (r.returncode, r.stderr.decode().strip()), flush=True)
        try:
            seconds = d.wait_console("deb", LOGIN, timeout=BOOT_SEC)
            print("IMAGE: login after %.0fs" % seconds, flush=True)
        finally:
            for line in d.console("deb")[-40:]:
                print("IMAGE: console " + line, flush=True)
        # The power button: Debian's cloud kernel has no gpio-keys, so it is tenbox's virtio-input key
        # (virtio_input loaded by udev) that systemd-logind hears; the guest powers off by itself.
        started = time.monotonic()
        r = d.ctl("vm", "shutdown", "deb", "--timeout", str(SHUTDOWN_SEC), "--json", timeout=SHUTDOWN_SEC + 60)
        graceful = json.loads(r.stdout)["graceful"] if r.returncode == 0 else r.stderr.decode().strip()
        print("IMAGE: shutdown rc=%d graceful=%s %.0fs" % (r.returncode, graceful, time.monotonic() - started),
              flush=True)
        v = d.wait_state("deb", "stopped", 60)
        print("IMAGE: state %s failure=%s" % (v["state"], json.dumps(v["last_failure"])), flush=True)
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
