#!/usr/bin/python3 -s
"""Tell a running tenboxd which tenbox version dpkg is configuring (postinst, root).

Installed as /usr/lib/tenbox/update-notify and run by the package's postinst
just before it restarts tenboxd on an upgrade. The daemon uses the request
to finish a pending host.update (send its structured reply to the cloud or
the CLI that asked) and answers; then the postinst restarts it.

Request, one JSON line on the control socket:
  {"id": 1, "type": "host.update.notify",
   "payload": {"version": "<new dpkg version>", "from_version": "<old or empty>"}}
Reply:
  {"id": 1, "ok": true, "payload": {"acknowledged": true, ...}}

Standard library only (it must work with whatever python3 the host has,
3.8 and later), bounded by --timeout in total, and never an error for the
postinst: exit status 0 when the daemon acknowledged, 1 otherwise, and one
line on stderr either way.
"""

import argparse
import json
import socket
import sys
import time

REQUEST_TYPE = "host.update.notify"
REPLY_MAX_BYTES = 1 << 20


def notify(path, version, from_version, timeout):
    """The daemon's reply (a dict); OSError, ValueError or TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    request = {"id": 1, "type": REQUEST_TYPE, "payload": {"version": version, "from_version": from_version}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer within %gs" % timeout)
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                raise ValueError("the daemon closed the connection without answering")
            buf += chunk
            if len(buf) > REPLY_MAX_BYTES:
                raise ValueError("the answer is larger than 1 MiB")
    reply = json.loads(buf.split(b"\n", 1)[0].decode())
    if not isinstance(reply, dict):
        raise ValueError("the answer is not a JSON object")
    return reply


def main(argv=None):
    p = argparse.ArgumentParser(prog="update-notify", description=__doc__.split("\n")[0])
    p.add_argument("--socket", default="/run/tenbox/tenbox.sock")
    p.add_argument("--version", required=True, help="the version dpkg is configuring")
    p.add_argument("--from-version", default="", help="the version it replaces (empty: none)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds in total")
    args = p.parse_args(argv)
    try:
        reply = notify(args.socket, args.version, args.from_version, args.timeout)
    except socket.timeout:
        why = "no answer within %gs" % args.timeout
    except (OSError, ValueError) as e:  # TimeoutError is an OSError
        why = str(e) or e.__class__.__name__
    else:
        if reply.get("ok") and (reply.get("payload") or {}).get("acknowledged"):
            sys.stderr.write("tenbox: tenboxd acknowledged the upgrade to %s\n" % args.version)
            return 0
        why = "%s (%s)" % (reply.get("error") or "not acknowledged", reply.get("error_code") or "no error code")
    sys.stderr.write("tenbox: tenboxd did not acknowledge the upgrade to %s: %s; restarting it anyway\n"
                     % (args.version, why))
    return 1


if __name__ == "__main__":
    sys.exit(main())
