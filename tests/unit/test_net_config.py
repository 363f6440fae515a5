"""NetConfig has QEMU's address plan by default and refuses settings libslirp would misuse."""

import ipaddress

import pytest

from tenbox_vmm.net import NetConfig
from tenbox_vmm.protocol import Limits


def test_defaults_are_qemus_user_network_with_loopback_closed():
    c = NetConfig()
    assert c.network == ipaddress.IPv4Network("10.0.2.0/24")
    assert (str(c.host), str(c.dns), str(c.dhcp_start)) == ("10.0.2.2", "10.0.2.3", "10.0.2.15")
    assert c.ipv6 and str(c.ipv6_prefix) == "fec0::/64" and str(c.host6) == "fec0::2"
    assert c.mtu == 1500 and c.disable_host_loopback and not c.restricted
    assert tuple(map(str, c.dhcp_pool)) == ("10.0.2.15", "10.0.2.30")


def test_forward_lists_become_tuples_and_the_config_stays_frozen():
    c = NetConfig(hostfwds=["tcp::2222-:22"], guestfwds=[])
    assert c.hostfwds == ("tcp::2222-:22",)
    with pytest.raises(Exception):
        c.mtu = 9000  # type: ignore[misc]


@pytest.mark.parametrize("kw,words", [
    ({"network": "10.0.2.0/33"}, "network"),
    ({"network": "10.0.2.0/30"}, "too small"),
    ({"host": "10.0.3.2"}, "host 10.0.3.2 is not a host address of 10.0.2.0/24"),
    ({"dns": "10.0.2.255"}, "dns 10.0.2.255 is not a host address"),
    ({"dns": "10.0.2.2"}, "three different addresses"),
    ({"dhcp_start": "10.0.2.250"}, "DHCP pool"),
    ({"host": "10.0.2.20"}, "inside the DHCP pool"),
    ({"mtu": 67}, "mtu 67 is out of range"),
    ({"mtu": 70000}, "out of range"),
    ({"mtu": 1000}, "below IPv6's minimum"),
    ({"host6": "fec1::2"}, "not in fec0::/64"),
    ({"hostname": "bad name"}, "hostname"),
    ({"hostname": "x" * 33}, "at most 32 bytes"),
    ({"hostfwds": ["tcp::%d-:1" % p for p in range(1, 300)]}, "at most %d" % Limits.FORWARDS_MAX),
])
def test_bad_settings_are_refused_with_the_reason(kw, words):
    with pytest.raises(ValueError) as e:
        NetConfig(**kw)
    assert words in str(e.value)


def test_small_mtu_is_fine_without_ipv6():
    assert NetConfig(mtu=576, ipv6=False).mtu == 576
