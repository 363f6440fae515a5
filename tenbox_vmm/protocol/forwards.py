"""Port-forward specs: parse, validate and print them (pure; worker and daemon).

TenBox-compatible grammar; one spec per forward. Part of the worker's
protocol: the runtime's --hostfwd/--guestfwd and the net_forwards command
take these specs, and tenboxd checks them with this same code before it
stores them.

hostfwd (host → guest)::

    [PROTO]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT   QEMU's form
    PROTO:HOSTPORT-[GUESTADDR]:GUESTPORT                 host address left out
    HOSTPORT:GUESTPORT[:LAN]                             TenBox's legacy form

    PROTO      tcp | udp; empty means tcp (as QEMU)
    HOSTADDR   IPv4, [IPv6] or localhost. Empty or left out means 127.0.0.1:
               by default a forward is reachable from this host only, not
               from the network (QEMU would bind 0.0.0.0). Write 0.0.0.0
               explicitly to listen on every address.
    GUESTADDR  IPv4; empty means the guest's DHCP address (10.0.2.15)
    LAN        0 = 127.0.0.1, 1 = 0.0.0.0 (TenBox's "LAN accessible")

    tcp:127.0.0.1:2222-:22   tcp::2222-:22   tcp:2222-:22   2222:22
    udp:0.0.0.0:5353-10.0.2.15:53   tcp:[::1]:8080-:80   8080:80:1

guestfwd (guest → host; TCP, libslirp has no UDP guest forwards)::

    guestfwd:[tcp:]GUESTADDR:GUESTPORT-[HOSTADDR]:HOSTPORT

    GUESTADDR  IPv4 in the guest network, required
    HOSTADDR   IPv4 or localhost; empty means 127.0.0.1

    guestfwd:10.0.2.3:80-127.0.0.1:18981   guestfwd:10.0.2.100:5432-:5432

Ports are 1..65535. Every error is one line that names the spec and the
part that is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple, Optional, Union

from tenbox_vmm.protocol.limits import Limits

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
PORT_MIN = 1
PORT_MAX = 65535

_LEGACY = re.compile(r"^\d+:\d+(:\d+)?$")
_DIGITS = re.compile(r"^[0-9]+$")


class ForwardSpecError(ValueError):
    """A forward spec that does not parse; str() is one line for people.

    `spec` is the text given and `why` the reason alone, for callers that
    report (spec, reason) pairs.
    """

    def __init__(self, kind: str, spec: object, why: str) -> None:
        super().__init__("bad %s %r: %s" % (kind, spec, why))
        self.spec = spec
        self.why = why


class HostForward(NamedTuple):
    """Listen on host_addr:host_port, connect to guest_addr:guest_port."""

    proto: str  # "tcp" | "udp"
    host_addr: IPAddress
    host_port: int
    guest_addr: Optional[ipaddress.IPv4Address]  # None: the guest's DHCP address
    guest_port: int

    @property
    def is_udp(self) -> bool:
        return self.proto == "udp"

    @property
    def key(self) -> tuple:
        """What identifies the listening socket: two forwards with one key clash."""
        return (self.proto, self.host_addr, self.host_port)

    def __str__(self) -> str:
        host = "[%s]" % self.host_addr if self.host_addr.version == 6 else str(self.host_addr)
        guest = "" if self.guest_addr is None else str(self.guest_addr)
        return "%s:%s:%d-%s:%d" % (self.proto, host, self.host_port, guest, self.guest_port)


class GuestForward(NamedTuple):
    """Guest TCP connections to guest_addr:guest_port go to host_addr:host_port."""

    guest_addr: ipaddress.IPv4Address
    guest_port: int
    host_addr: ipaddress.IPv4Address
    host_port: int

    @property
    def key(self) -> tuple:
        return (self.guest_addr, self.guest_port)

    def __str__(self) -> str:
        return "guestfwd:%s:%d-%s:%d" % (self.guest_addr, self.guest_port, self.host_addr, self.host_port)


def _fail(kind: str, spec: str, why: str) -> ForwardSpecError:
    return ForwardSpecError(kind, spec, why)


def _port(kind: str, spec: str, what: str, text: str) -> int:
    if not text:
        raise _fail(kind, spec, "%s is missing" % what)
    if not _DIGITS.match(text):
        raise _fail(kind, spec, "%s %r is not a number" % (what, text))
    value = int(text)
    if not PORT_MIN <= value <= PORT_MAX:
        raise _fail(kind, spec, "%s %s is out of range %d-%d" % (what, text, PORT_MIN, PORT_MAX))
    return value


def _ipv4(kind: str, spec: str, what: str, text: str) -> ipaddress.IPv4Address:
    if text == "localhost":
        return LOOPBACK
    parts = text.split(".")
    if len(parts) != 4 or not all(_DIGITS.match(p) and len(p) <= 3 for p in parts):
        raise _fail(kind, spec, "%s %r is not an IPv4 address" % (what, text))
    if any(len(p) > 1 and p[0] == "0" for p in parts):
        raise _fail(kind, spec, "%s %r has a leading zero (octal or decimal?)" % (what, text))
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise _fail(kind, spec, "%s %r is not an IPv4 address" % (what, text)) from None


def _host_addr(spec: str, text: str) -> IPAddress:
    kind = "hostfwd"
    if text == "":
        return LOOPBACK
    if text.startswith("["):
        if not text.endswith("]"):
            raise _fail(kind, spec, "host address %r lacks its closing ']'" % text)
        try:
            return ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise _fail(kind, spec, "host address %r is not an IPv6 address" % text) from None
    if ":" in text:
        raise _fail(kind, spec, "host address %r: write IPv6 addresses in brackets, as [::1]" % text)
    return _ipv4(kind, spec, "host address", text)


def _check_length(kind: str, spec: str) -> None:
    if not isinstance(spec, str):
        raise _fail(kind, spec, "expected a string, got %s" % type(spec).__name__)
    if len(spec) > Limits.FORWARD_SPEC_MAX_CHARS:
        raise _fail(kind, spec[:32] + "...", "longer than %d characters" % Limits.FORWARD_SPEC_MAX_CHARS)
    if not spec.strip():
        raise _fail(kind, spec, "empty spec")


def parse_hostfwd(spec: str) -> HostForward:
    """Parse a hostfwd spec (see the module docstring); ForwardSpecError if bad."""
    kind = "hostfwd"
    _check_length(kind, spec)
    text = spec.strip()
    if _LEGACY.match(text):
        return _parse_legacy(spec, text)
    halves = text.split("-")
    if len(halves) != 2:
        raise _fail(kind, spec, "expected one '-' between the host part and the guest part")
    left, right = halves
    proto, sep, rest = left.partition(":")
    if not sep:
        raise _fail(kind, spec, "host part %r must start with 'tcp:' or 'udp:'" % left)
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp"):
        raise _fail(kind, spec, "protocol %r is neither tcp nor udp" % proto)
    addr_text, sep, port_text = rest.rpartition(":")
    if not sep:
        # "tcp:2222-:22": no host address at all, which means 127.0.0.1.
        addr_text, port_text = "", rest
    host_addr = _host_addr(spec, addr_text)
    host_port = _port(kind, spec, "host port", port_text)
    gaddr_text, sep, gport_text = right.rpartition(":")
    if not sep:
        raise _fail(kind, spec, "guest part %r must be [ADDRESS]:PORT, as :22" % right)
    guest_addr = None if gaddr_text == "" else _ipv4(kind, spec, "guest address", gaddr_text)
    guest_port = _port(kind, spec, "guest port", gport_text)
    return HostForward(proto, host_addr, host_port, guest_addr, guest_port)


def _parse_legacy(spec: str, text: str) -> HostForward:
    kind = "hostfwd"
    fields = text.split(":")
    host_port = _port(kind, spec, "host port", fields[0])
    guest_port = _port(kind, spec, "guest port", fields[1])
    host_addr = LOOPBACK
    if len(fields) == 3:
        if fields[2] not in ("0", "1"):
            raise _fail(kind, spec, "LAN flag %r must be 0 (this host only) or 1 (all addresses)" % fields[2])
        if fields[2] == "1":
            host_addr = ipaddress.IPv4Address("0.0.0.0")
    return HostForward("tcp", host_addr, host_port, None, guest_port)


def parse_guestfwd(spec: str) -> GuestForward:
    """Parse a guestfwd spec (see the module docstring); ForwardSpecError if bad."""
    kind = "guestfwd"
    _check_length(kind, spec)
    text = spec.strip()
    prefix = "guestfwd:"
    if not text.startswith(prefix):
        raise _fail(kind, spec, "must start with 'guestfwd:'")
    text = text[len(prefix):]
    if text.startswith("udp:"):
        raise _fail(kind, spec, "UDP guest forwards are not supported (libslirp forwards TCP only)")
    if text.startswith("tcp:"):
        text = text[len("tcp:"):]
    halves = text.split("-")
    if len(halves) != 2:
        raise _fail(kind, spec, "expected one '-' between the guest part and the host part")
    left, right = halves
    gaddr_text, sep, gport_text = left.rpartition(":")
    if not sep or not gaddr_text:
        raise _fail(kind, spec, "guest part %r must be ADDRESS:PORT, as 10.0.2.100:80" % left)
    guest_addr = _ipv4(kind, spec, "guest address", gaddr_text)
    guest_port = _port(kind, spec, "guest port", gport_text)
    haddr_text, sep, hport_text = right.rpartition(":")
    if not sep:
        raise _fail(kind, spec, "host part %r must be [ADDRESS]:PORT, as 127.0.0.1:8080" % right)
    host_addr = LOOPBACK if haddr_text == "" else _ipv4(kind, spec, "host address", haddr_text)
    host_port = _port(kind, spec, "host port", hport_text)
    return GuestForward(guest_addr, guest_port, host_addr, host_port)


def as_hostfwd(fwd: Union[str, HostForward]) -> HostForward:
    return fwd if isinstance(fwd, HostForward) else parse_hostfwd(fwd)


def as_guestfwd(fwd: Union[str, GuestForward]) -> GuestForward:
    return fwd if isinstance(fwd, GuestForward) else parse_guestfwd(fwd)
