"""hostfwd/guestfwd specs parse as documented, print back canonically, and bad ones say what is wrong."""

import ipaddress

import pytest

from tenbox_vmm.protocol.forwards import (
    ForwardSpecError,
    GuestForward,
    HostForward,
    as_guestfwd,
    as_hostfwd,
    parse_guestfwd,
    parse_hostfwd,
)

A = ipaddress.ip_address

HOSTFWD_GOOD = [
    # spec, (proto, host, hport, guest or None, gport)
    ("tcp:127.0.0.1:2222-:22", ("tcp", "127.0.0.1", 2222, None, 22)),
    ("tcp::2222-:22", ("tcp", "127.0.0.1", 2222, None, 22)),
    ("tcp:2222-:22", ("tcp", "127.0.0.1", 2222, None, 22)),
    ("::2222-:22", ("tcp", "127.0.0.1", 2222, None, 22)),
    ("udp:127.0.0.1:5353-10.0.2.15:53", ("udp", "127.0.0.1", 5353, "10.0.2.15", 53)),
    ("UDP::6000-:7000", ("udp", "127.0.0.1", 6000, None, 7000)),
    ("tcp:0.0.0.0:8080-:80", ("tcp", "0.0.0.0", 8080, None, 80)),
    ("tcp:localhost:8080-:80", ("tcp", "127.0.0.1", 8080, None, 80)),
    ("tcp:[::1]:8080-:80", ("tcp", "::1", 8080, None, 80)),
    ("tcp:[::]:8080-10.0.2.16:80", ("tcp", "::", 8080, "10.0.2.16", 80)),
    ("tcp:127.0.0.1:1-:65535", ("tcp", "127.0.0.1", 1, None, 65535)),
    (" tcp::2222-:22 ", ("tcp", "127.0.0.1", 2222, None, 22)),
    # TenBox's legacy HP:GP[:LAN]
    ("2222:22", ("tcp", "127.0.0.1", 2222, None, 22)),
    ("2222:22:0", ("tcp", "127.0.0.1", 2222, None, 22)),
    ("8080:80:1", ("tcp", "0.0.0.0", 8080, None, 80)),
]


@pytest.mark.parametrize("spec,expect", HOSTFWD_GOOD)
def test_hostfwd_specs_parse(spec, expect):
    proto, host, hport, guest, gport = expect
    f = parse_hostfwd(spec)
    assert f == HostForward(proto, A(host), hport, None if guest is None else A(guest), gport)


def test_empty_host_address_means_loopback_not_all_addresses():
    """Security default: 'tcp::2222-:22' listens on 127.0.0.1, unlike QEMU's 0.0.0.0."""
    assert parse_hostfwd("tcp::2222-:22").host_addr == A("127.0.0.1")
    assert parse_hostfwd("tcp:2222-:22").host_addr == A("127.0.0.1")
    assert parse_hostfwd("2222:22").host_addr == A("127.0.0.1")
    assert parse_hostfwd("tcp:0.0.0.0:2222-:22").host_addr == A("0.0.0.0")


@pytest.mark.parametrize("spec,canonical", [
    ("tcp::2222-:22", "tcp:127.0.0.1:2222-:22"),
    ("2222:22:1", "tcp:0.0.0.0:2222-:22"),
    ("udp:127.0.0.1:5353-10.0.2.15:53", "udp:127.0.0.1:5353-10.0.2.15:53"),
    ("tcp:[::1]:8080-:80", "tcp:[::1]:8080-:80"),
])
def test_hostfwd_prints_canonically_and_round_trips(spec, canonical):
    f = parse_hostfwd(spec)
    assert str(f) == canonical
    assert parse_hostfwd(str(f)) == f


HOSTFWD_BAD = [
    # spec, words the one-line message must contain
    ("", "empty"),
    ("tcp:127.0.0.1:2222", "one '-'"),
    ("tcp:1-2-:22", "one '-'"),
    ("sctp::2222-:22", "protocol 'sctp'"),
    ("2222-:22", "must start with 'tcp:' or 'udp:'"),
    ("tcp::0-:22", "host port 0 is out of range 1-65535"),
    ("tcp::65536-:22", "host port 65536 is out of range"),
    ("tcp::-:22", "host port is missing"),
    ("tcp::http-:22", "host port 'http' is not a number"),
    ("tcp::2222-:0", "guest port 0 is out of range"),
    ("tcp::2222-:", "guest port is missing"),
    ("tcp::2222-22", "guest part '22' must be [ADDRESS]:PORT"),
    ("tcp:1.2.3:2222-:22", "host address '1.2.3' is not an IPv4 address"),
    ("tcp:256.0.0.1:2222-:22", "host address '256.0.0.1' is not an IPv4 address"),
    ("tcp:010.0.0.1:2222-:22", "leading zero"),
    ("tcp:example.com:2222-:22", "host address 'example.com' is not an IPv4 address"),
    ("tcp:::1:2222-:22", "write IPv6 addresses in brackets"),
    ("tcp:[::1:2222-:22", "closing ']'"),
    ("tcp:[zz::1]:2222-:22", "not an IPv6 address"),
    ("tcp::2222-[fec0::15]:22", "guest address '[fec0::15]' is not an IPv4 address"),
    ("tcp::2222-10.0.2:22", "guest address '10.0.2' is not an IPv4 address"),
    ("2222:22:2", "LAN flag '2' must be 0"),
    ("0:22", "host port 0 is out of range"),
    ("2222:99999", "guest port 99999 is out of range"),
    ("tcp::2222-:22" + "x" * 300, "longer than"),
]


@pytest.mark.parametrize("spec,words", HOSTFWD_BAD)
def test_bad_hostfwd_specs_are_rejected_with_one_clear_line(spec, words):
    with pytest.raises(ForwardSpecError) as e:
        parse_hostfwd(spec)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("bad hostfwd ")
    assert words in msg
    assert words in e.value.why or words == "longer than"


def test_hostfwd_key_is_the_listening_socket():
    a = parse_hostfwd("tcp::2222-:22")
    b = parse_hostfwd("tcp:127.0.0.1:2222-10.0.2.16:23")
    c = parse_hostfwd("udp::2222-:22")
    assert a.key == b.key and a.key != c.key


GUESTFWD_GOOD = [
    ("guestfwd:10.0.2.3:80-127.0.0.1:18981", ("10.0.2.3", 80, "127.0.0.1", 18981)),
    ("guestfwd:10.0.2.3:80-:18981", ("10.0.2.3", 80, "127.0.0.1", 18981)),
    ("guestfwd:tcp:10.0.2.100:5432-localhost:5432", ("10.0.2.100", 5432, "127.0.0.1", 5432)),
    ("guestfwd:10.0.2.2:8080-192.168.1.10:80", ("10.0.2.2", 8080, "192.168.1.10", 80)),
]


@pytest.mark.parametrize("spec,expect", GUESTFWD_GOOD)
def test_guestfwd_specs_parse(spec, expect):
    gaddr, gport, haddr, hport = expect
    f = parse_guestfwd(spec)
    assert f == GuestForward(A(gaddr), gport, A(haddr), hport)
    assert parse_guestfwd(str(f)) == f


def test_guestfwd_prints_the_tenbox_form():
    assert str(parse_guestfwd("guestfwd:10.0.2.3:80-:18981")) == "guestfwd:10.0.2.3:80-127.0.0.1:18981"


GUESTFWD_BAD = [
    ("10.0.2.3:80-127.0.0.1:18981", "must start with 'guestfwd:'"),
    ("guestfwd:udp:10.0.2.3:53-:53", "UDP guest forwards are not supported"),
    ("guestfwd::80-:18981", "guest part ':80' must be ADDRESS:PORT"),
    ("guestfwd:10.0.2.3-:18981", "guest part '10.0.2.3' must be ADDRESS:PORT"),
    ("guestfwd:10.0.2.3:0-:18981", "guest port 0 is out of range"),
    ("guestfwd:10.0.2.3:80-:70000", "host port 70000 is out of range"),
    ("guestfwd:10.0.2.3:80-18981", "host part '18981' must be [ADDRESS]:PORT"),
    ("guestfwd:10.0.2.3:80-db.local:5432", "host address 'db.local' is not an IPv4 address"),
    ("guestfwd:10.0.2.3:80", "one '-'"),
    ("guestfwd:fec0::3:80-:80", "not an IPv4 address"),
]


@pytest.mark.parametrize("spec,words", GUESTFWD_BAD)
def test_bad_guestfwd_specs_are_rejected_with_one_clear_line(spec, words):
    with pytest.raises(ForwardSpecError) as e:
        parse_guestfwd(spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad guestfwd ")
    assert words in msg


def test_parsed_forwards_pass_through_and_non_strings_are_errors():
    f = parse_hostfwd("tcp::2222-:22")
    assert as_hostfwd(f) is f
    g = parse_guestfwd("guestfwd:10.0.2.3:80-:1")
    assert as_guestfwd(g) is g
    with pytest.raises(ForwardSpecError, match="expected a string"):
        as_hostfwd(2222)
