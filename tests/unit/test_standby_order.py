"""The standby order and reply (tenbox_vmm/protocol/standby.py): what one side encodes the other parses back, and the
bounds."""

import pytest

from tenbox_vmm.protocol.standby import (ORDER_MAX_BYTES, ORDER_MAX_FDS, OrderError, encode_forked, encode_order,
                                         encode_spare, order_link, parse_forked, parse_order, parse_spare)


def test_an_encoded_order_parses_back_with_each_descriptor_for_its_path():
    payload = encode_order(["--kernel", "/k", "--vm-id", "a b"], ["/k", "/d.qcow2"])
    log_fd, go_fd, argv = parse_order(payload, [7, 8, 9, 10])
    assert (log_fd, go_fd) == (7, 8)
    assert argv == ["--kernel", "/k", "--vm-id", "a b", "--fd=9:/k", "--fd=10:/d.qcow2"]


def test_encode_refuses_what_a_standby_would_not_take():
    with pytest.raises(OrderError, match="249 files are more than one order passes"):
        encode_order([], ["/f"] * (ORDER_MAX_FDS - 1))
    encode_order([], ["/f"] * (ORDER_MAX_FDS - 2))
    with pytest.raises(OrderError, match="longer than one order"):
        encode_order(["x" * ORDER_MAX_BYTES], [])


@pytest.mark.parametrize("payload", [b"\xff", b"[]", b'{"argv": "--kernel /k", "files": []}',
                                     b'{"argv": [1], "files": []}', b'{"argv": [], "files": ["k"]}'])
def test_parse_refuses_malformed_orders(payload):
    with pytest.raises(OrderError):
        parse_order(payload, [3, 4])


def test_a_reply_names_the_forked_worker_and_nothing_else_passes():
    assert parse_forked(encode_forked(4321)) == 4321
    for bad in [b"", b"P", b"P-1", b"P1", b"P0", b"Q123", b"P12a", b"P" + b"9" * 20, b"R"]:
        with pytest.raises(OrderError, match="not a worker's pid"):
            parse_forked(bad)


def test_a_spare_message_names_a_pid_and_is_not_a_fork_reply():
    assert parse_spare(encode_spare(77)) == 77
    with pytest.raises(OrderError, match="not a worker's pid"):
        parse_forked(encode_spare(77))
    for bad in (b"S", b"S1", b"Sx", b"S" + b"9" * 16):
        with pytest.raises(OrderError, match="not a spare's pid"):
            parse_spare(bad)


@pytest.mark.parametrize("argv,expected", [
    (["--kernel", "/k", "--link", "ipc:///run/l.sock"], ("ipc:///run/l.sock", True)),
    (["--link=ipc:///run/l.sock", "--restore", "/s"], ("ipc:///run/l.sock", True)),
    (["--kernel", "/k"], (None, True)),
    (["--link", "ipc:///a", "--snapshot-out", "/s"], ("ipc:///a", False)),  # renames: a filter of its own
    (["--lin", "ipc:///a"], (None, False)),  # argparse's abbreviation: not read as tenboxd writes it
    (["--link"], (None, True)),  # no value: main() refuses it
])
def test_order_link_reads_the_link_as_tenboxd_writes_it_and_says_whether_a_spare_fits(argv, expected):
    assert order_link(argv) == expected
