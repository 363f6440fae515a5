"""tenbox-vhost-user-blk / tenbox-vhost-user-net: serve one tenbox virtio device over vhost-user.

    tenbox-vhost-user-blk --socket PATH --disk IMAGE[,ro][,serial=S]
    tenbox-vhost-user-net --socket PATH [--mac MAC] [--hostfwd SPEC]... [--guestfwd SPEC]...
    python3 -m tenbox_vmm.vhost_user {blk|net} ...

The back end listens on PATH, serves the first front end that connects (for
example QEMU's `-chardev socket,path=PATH` with vhost-user-blk or
`-netdev vhost-user`), and exits when it disconnects. Exit codes: 0 the front
end disconnected, 1 protocol or internal error, 2 bad command line or input.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import List, Optional

PROG = "tenbox-vhost-user"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        sys.stderr.write("%s: error: %s (see --help)\n" % (self.prog, message))
        raise SystemExit(2)


def _fail(message: str) -> int:
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    return 2


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        # A socket left by a back end that died; anything else we refuse to touch.
        import stat

        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError("%s exists and is not a socket" % path)
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(1)
    return s


def _serve(device, path: str, protocol_features: int) -> int:
    from tenbox_vmm.vhost_user.backend import Backend, ProtocolError

    try:
        listener = _listen(path)
    except OSError as e:
        return _fail("cannot listen on %s: %s" % (path, getattr(e, "strerror", None) or e))
    logging.getLogger("tenbox.vhost-user").info("waiting for a front end on %s", path)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        conn, _ = listener.accept()
        listener.close()
        os.unlink(path)
        backend = Backend(device, protocol_features)
        try:
            backend.serve(conn)
        except ProtocolError as e:
            logging.getLogger("tenbox.vhost-user").error("%s", e)
            return 1
        finally:
            conn.close()
    finally:
        device.close()
    return 0


def main(argv: Optional[List[str]] = None, kind: Optional[str] = None) -> int:
    p = _Parser(prog=PROG if kind is None else "%s-%s" % (PROG, kind),
                description="Serve a tenbox virtio device over vhost-user.")
    if kind is None:
        p.add_argument("kind", choices=("blk", "net"))
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    p.add_argument("--disk", metavar="IMAGE[,ro][,serial=S]", help="blk: the disk image (raw or qcow2)")
    p.add_argument("--mac", metavar="MAC", default="52:54:00:12:34:56", help="net: the MAC address")
    p.add_argument("--hostfwd", action="append", default=[], metavar="SPEC", help="net: host -> guest forward")
    p.add_argument("--guestfwd", action="append", default=[], metavar="SPEC", help="net: guest -> host forward")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    kind = kind or args.kind
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%s-%s: %%(levelname)s %%(message)s" % (PROG, kind))
    from tenbox_vmm.vhost_user import protocol as P

    if kind == "blk":
        if not args.disk:
            p.error("blk needs --disk")
        from tenbox_vmm.__main__ import parse_disk
        from tenbox_vmm.devices.virtio.blk import VirtioBlk
        from tenbox_vmm.disk import DiskError, open_disk

        try:
            spec = parse_disk(args.disk)
            disk = open_disk(spec.path, read_only=spec.read_only)
        except (ValueError, DiskError) as e:
            return _fail(str(e))
        return _serve(VirtioBlk(disk, spec.serial), args.socket, P.PF_MQ)
    from tenbox_vmm.net_device import NetSetupError, build_net_device

    try:
        device = build_net_device(args.mac, args.hostfwd, args.guestfwd)
    except NetSetupError as e:
        return _fail(str(e))
    return _serve(device, args.socket, 0)


def main_blk() -> None:
    sys.exit(main(kind="blk"))


def main_net() -> None:
    sys.exit(main(kind="net"))


if __name__ == "__main__":
    sys.exit(main())
