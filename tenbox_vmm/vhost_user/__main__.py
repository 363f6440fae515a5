"""tenbox-vhost-user-blk / tenbox-vhost-user-net: serve one tenbox virtio device over vhost-user (own process, any user).

    tenbox-vhost-user-blk --socket PATH --disk IMAGE[,ro][,serial=S][,format=F]
    tenbox-vhost-user-net --socket PATH [--mac MAC] [--hostfwd SPEC]... [--guestfwd SPEC]...
    python3 -m tenbox_vmm.vhost_user {blk|net} ...

The back end listens on PATH (mode 0600), serves the first front end that
connects (QEMU's `-chardev socket,path=PATH` with `-device vhost-user-blk*`
or `-netdev vhost-user`; the guest's RAM must be shared, e.g. a memfd
memory backend with share=on), and exits when it disconnects. A front end
that reconnects (QEMU's chardev reconnect=N) finds a back end started again
on the same PATH and carries on. SIGTERM or SIGINT: flush and exit 0.

Exit codes: 0 the front end disconnected (or a signal), 1 protocol or
internal error, 2 bad command line or input (one line on stderr).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import stat
import sys
from typing import List, Optional

from tenbox_vmm import __version__

PROG = "tenbox-vhost-user"
KINDS = ("blk", "net")
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("tenbox.vhost-user")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        sys.stderr.write("%s: error: %s (see --help)\n" % (self.prog, message))
        raise SystemExit(EXIT_USAGE)


class _Stop(Exception):
    """SIGTERM or SIGINT: leave cleanly."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def _listen(path: str) -> socket.socket:
    """Bind and listen on PATH (mode 0600); a stale socket file is replaced, a live one refused."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a back end that died
        else:
            raise OSError(errno.EADDRINUSE, "another back end is listening there")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        s.bind(path)
    except OSError:
        s.close()
        raise
    finally:
        os.umask(old_umask)
    s.listen(1)
    return s


def _serve(prog: str, device, path: str, protocol_features: int) -> int:
    from tenbox_vmm.vhost_user.backend import Backend, ProtocolError

    try:
        try:
            listener = _listen(path)
        except OSError as e:
            sys.stderr.write("%s: error: cannot listen on %s: %s\n" % (prog, path, e.strerror or e))
            return EXIT_USAGE
        log.info("waiting for a front end on %s", path)
        try:
            conn, _ = listener.accept()
        finally:
            listener.close()
            try:
                os.unlink(path)  # one front end per back end; a restarted back end listens again
            except FileNotFoundError:
                pass  # someone moved or removed it meanwhile
        try:
            Backend(device, protocol_features).serve(conn)
        except ProtocolError as e:
            log.error("%s", e)
            return EXIT_ERROR
        finally:
            conn.close()
    except _Stop:
        log.info("stopped by a signal")
    finally:
        device.close()
    return EXIT_OK


_QEMU_MEMORY = "    -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\\n"
_EXAMPLES = {
    "blk": "example:\n  %(cmd)s --socket /run/vm1-disk.sock --disk disk.qcow2 &\n"
           "  qemu-system-x86_64 -m 1G ... \\\n" + _QEMU_MEMORY
           + "    -chardev socket,id=c0,path=/run/vm1-disk.sock -device vhost-user-blk-pci,chardev=c0",
    "net": "example:\n  %(cmd)s --socket /run/vm1-net.sock --hostfwd tcp:127.0.0.1:2222-:22 &\n"
           "  qemu-system-x86_64 -m 1G ... \\\n" + _QEMU_MEMORY
           + "    -chardev socket,id=c1,path=/run/vm1-net.sock -netdev vhost-user,id=n0,chardev=c1 \\\n"
           "    -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
}


def main(argv: Optional[List[str]] = None, kind: Optional[str] = None) -> int:
    prog = PROG if kind is None else "%s-%s" % (PROG, kind)
    p = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Serve a tenbox virtio device (raw/qcow2 disk, or NAT network) "
                            "to a vhost-user front end such as QEMU.",
                epilog=_EXAMPLES[kind or "blk"] % {"cmd": prog if kind else prog + " " + "blk"})
    if kind is None:
        p.add_argument("kind", choices=KINDS, help="the device to serve")
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    if kind in (None, "blk"):
        p.add_argument("--disk", metavar="IMAGE[,ro][,serial=S][,format=F]",
                       help="blk: the disk image (raw or qcow2, with its backing chain)")
    if kind in (None, "net"):
        p.add_argument("--mac", metavar="MAC", default="52:54:00:12:34:56",
                       help="net: the guest's MAC address (the front end's must match)")
        p.add_argument("--hostfwd", action="append", default=[], metavar="SPEC",
                       help="net: host -> guest forward, e.g. tcp:127.0.0.1:2222-:22 (repeatable)")
        p.add_argument("--guestfwd", action="append", default=[], metavar="SPEC",
                       help="net: guest -> host forward, e.g. guestfwd:10.0.2.100:80-127.0.0.1:8080 (repeatable)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log lines on stderr (-vv: every message)")
    p.add_argument("--version", action="version", version="%s %s" % (prog, __version__))
    args = p.parse_args(argv)
    kind = kind or args.kind
    prog = "%s-%s" % (PROG, kind)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%s: %%(levelname)s %%(message)s" % prog)
    # Signals are handled from here on: the device is closed (image flushed) on the way out.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    from tenbox_vmm.vhost_user import protocol as P

    def fail(message: str) -> int:
        sys.stderr.write("%s: error: %s\n" % (prog, message))
        return EXIT_USAGE

    try:
        if kind == "blk":
            if not getattr(args, "disk", None):
                p.error("blk needs --disk IMAGE")
            from tenbox_vmm.devices.virtio.blk import VirtioBlk
            from tenbox_vmm.devices.virtio.blk_io import runner_for
            from tenbox_vmm.disk import DiskError, open_disk
            from tenbox_vmm.protocol.disk_arg import DiskArg

            try:
                spec = DiskArg.parse(args.disk)
                disk = open_disk(spec.path, read_only=spec.read_only, fmt=spec.format)
            except (ValueError, DiskError) as e:
                return fail(str(e))
            # QEMU's vhost-user-blk reads the geometry with GET_CONFIG (PROTOCOL_F_CONFIG);
            # for net QEMU serves the config space itself and warns if we offer it.
            return _serve(prog, VirtioBlk(disk, spec.serial, runner_for(disk)), args.socket, P.PF_MQ | P.PF_CONFIG)
        from tenbox_vmm.usernet import NetSetupError, UserNic

        try:
            nic = UserNic(args.mac, args.hostfwd, args.guestfwd)
        except NetSetupError as e:
            return fail(str(e))
        return _serve(prog, nic.device, args.socket, 0)
    except _Stop:
        return EXIT_OK


def main_blk() -> None:
    sys.exit(main(kind="blk"))


def main_net() -> None:
    sys.exit(main(kind="net"))


if __name__ == "__main__":
    sys.exit(main())
