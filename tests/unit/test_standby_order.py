"""The standby order (tenbox_vmm/protocol/standby.py): what tenboxd encodes the worker parses back, and the bounds."""

import pytest

from tenbox_vmm.protocol.standby import ORDER_MAX_BYTES, ORDER_MAX_FDS, OrderError, encode_order, parse_order


def test_an_encoded_order_parses_back_with_each_descriptor_for_its_path():
    payload = encode_order(["--kernel", "/k", "--vm-id", "a b"], ["/k", "/d.qcow2"])
    log_fd, argv = parse_order(payload, [7, 8, 9])
    assert log_fd == 7
    assert argv == ["--kernel", "/k", "--vm-id", "a b", "--fd=8:/k", "--fd=9:/d.qcow2"]


def test_encode_refuses_what_a_standby_would_not_take():
    with pytest.raises(OrderError, match="250 files are more than one order passes"):
        encode_order([], ["/f"] * ORDER_MAX_FDS)
    encode_order([], ["/f"] * (ORDER_MAX_FDS - 1))
    with pytest.raises(OrderError, match="longer than one order"):
        encode_order(["x" * ORDER_MAX_BYTES], [])


@pytest.mark.parametrize("payload", [b"\xff", b"[]", b'{"argv": "--kernel /k", "files": []}',
                                     b'{"argv": [1], "files": []}', b'{"argv": [], "files": ["k"]}'])
def test_parse_refuses_malformed_orders(payload):
    with pytest.raises(OrderError):
        parse_order(payload, [3])
