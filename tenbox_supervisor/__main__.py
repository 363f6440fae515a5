"""tenboxd: the tenbox host daemon (root under systemd; a per-user daemon for try-outs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import List, Optional

from tenbox_supervisor.protocol import VERSION

PROG = "tenboxd"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        sys.stderr.write("%s: error: %s (see --help)\n" % (PROG, message))
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The tenbox host daemon: VMs, control socket, cloud link, updates.",
                epilog="example: sudo tenboxd --data-dir /var/lib/tenbox --socket /run/tenbox/tenbox.sock")
    p.add_argument("--data-dir", metavar="DIR", help="VM store and logs (TENBOX_DATA_DIR; default /var/lib/tenbox as root)")
    p.add_argument("--socket", metavar="PATH", help="control socket (TENBOX_SOCK; default /run/tenbox/tenbox.sock as "
                   "root under systemd, else $XDG_RUNTIME_DIR/tenbox.sock or /tmp/tenbox-UID.sock)")
    p.add_argument("--run-dir", metavar="DIR", help="runtime folder for the worker link (default /run/tenbox as root "
                   "under systemd, else $XDG_RUNTIME_DIR/tenbox or /tmp/tenbox-UID)")
    p.add_argument("--cloud-url", metavar="URL", help="cloud control plane (TENBOX_CLOUD_URL; empty disables it)")
    p.add_argument("--doctor", action="store_true", help="check this host for KVM, print JSON, exit 0 if supported else 2")
    p.add_argument("--fix-permissions", action="store_true",
                   help="set the owners and modes of the data directory (docs/security.md) and exit; the package "
                   "runs it on upgrade, tenboxd itself at every start")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, VERSION))
    return p


def fix_permissions(data_dir: str, group: Optional[str]) -> int:
    from tenbox_supervisor.modes import group_id, secure_data_dir

    try:
        secure_data_dir(data_dir, group_id(group))  # logs what it changed; quiet when nothing did
    except OSError as e:
        sys.stderr.write("%s: error: cannot set the modes in %s: %s\n" % (PROG, data_dir, e.strerror or e))
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.doctor:
        from tenbox_supervisor.doctor import run_checks

        report = run_checks()
        print(json.dumps(report, indent=2))
        return 0 if report["supported"] else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    from tenbox_supervisor.config import ConfigError, resolve
    from tenbox_supervisor.daemon import Daemon, StartupError

    try:
        config = resolve(args.data_dir, args.socket, args.run_dir, args.cloud_url)
    except ConfigError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 2
    if args.fix_permissions:
        return fix_permissions(config.data_dir, config.socket_group)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        daemon = Daemon(config)
        return loop.run_until_complete(daemon.run())
    except StartupError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 1
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
