"""NetConfig: the addresses and options of one user-mode network (pure; worker).

Defaults are QEMU's `-netdev user` plan, which guests and users know:
network 10.0.2.0/24, gateway 10.0.2.2, DNS 10.0.2.3, DHCP from 10.0.2.15,
IPv6 fec0::/64 with gateway fec0::2 and DNS fec0::3. Forwards are kept as
given (specs or parsed objects); the network parses them so that one bad
spec is a per-forward failure, not a refused configuration.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.forwards import GuestForward, HostForward

MTU_MIN = 68  # libslirp IF_MTU_MIN
MTU_MAX = 65521  # libslirp IF_MTU_MAX
MTU_MIN_IPV6 = 1280  # RFC 8200 minimum link MTU
DHCP_POOL_SIZE = 16  # libslirp NB_BOOTP_CLIENTS: leases handed out from dhcp_start
HOSTNAME_MAX_BYTES = 32  # libslirp client_hostname[33]

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class NetConfig:
    """One guest network.

    Addresses are ipaddress objects; strings are accepted too and parsed
    (NetConfig(host="10.0.2.2")), so configs can come straight from JSON.
    """

    network: ipaddress.IPv4Network = ipaddress.IPv4Network("10.0.2.0/24")
    host: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.2")  # the gateway, the host's NAT
    dns: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.3")  # DNS proxy to the host's resolver
    dhcp_start: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.15")  # first (normally only) guest address
    ipv6: bool = True
    ipv6_prefix: ipaddress.IPv6Network = ipaddress.IPv6Network("fec0::/64")
    host6: ipaddress.IPv6Address = ipaddress.IPv6Address("fec0::2")
    dns6: ipaddress.IPv6Address = ipaddress.IPv6Address("fec0::3")
    hostname: Optional[str] = None  # DHCP option 12 offered to the guest
    mtu: int = 1500
    # Specs or parsed forwards, any sequence; stored as a tuple.
    hostfwds: Sequence[Union[str, HostForward]] = ()
    guestfwds: Sequence[Union[str, GuestForward]] = ()
    # Security default: the guest cannot reach the host's 127.0.0.1 through
    # the gateway address; only guestfwds expose host services.
    disable_host_loopback: bool = True
    restricted: bool = False  # True: no connections out of the guest network at all

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        try:
            net = ipaddress.IPv4Network(self.network)
        except ValueError as e:
            raise ValueError("network %r: %s" % (self.network, e)) from None
        put("network", net)
        if net.num_addresses < 8:
            raise ValueError("network %s is too small (at least a /29)" % net)
        for name in ("host", "dns", "dhcp_start"):
            try:
                addr = ipaddress.IPv4Address(getattr(self, name))
            except ValueError as e:
                raise ValueError("%s: %s" % (name, e)) from None
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise ValueError("%s %s is not a host address of %s" % (name, addr, net))
            put(name, addr)
        if len({self.host, self.dns, self.dhcp_start}) != 3:
            raise ValueError("host, dns and dhcp_start must be three different addresses")
        last = self.dhcp_start + (DHCP_POOL_SIZE - 1)
        if last not in net or last == net.broadcast_address:
            raise ValueError("DHCP pool %s-%s does not fit in %s" % (self.dhcp_start, last, net))
        for name in ("host", "dns"):
            addr = getattr(self, name)
            if self.dhcp_start <= addr <= last:
                raise ValueError("%s %s is inside the DHCP pool %s-%s" % (name, addr, self.dhcp_start, last))
        try:
            prefix = ipaddress.IPv6Network(self.ipv6_prefix)
            put("ipv6_prefix", prefix)
            put("host6", ipaddress.IPv6Address(self.host6))
            put("dns6", ipaddress.IPv6Address(self.dns6))
        except ValueError as e:
            raise ValueError("IPv6 settings: %s" % e) from None
        if self.ipv6:
            for name in ("host6", "dns6"):
                if getattr(self, name) not in prefix:
                    raise ValueError("%s %s is not in %s" % (name, getattr(self, name), prefix))
        if not isinstance(self.mtu, int) or not MTU_MIN <= self.mtu <= MTU_MAX:
            raise ValueError("mtu %r is out of range %d-%d" % (self.mtu, MTU_MIN, MTU_MAX))
        if self.ipv6 and self.mtu < MTU_MIN_IPV6:
            raise ValueError("mtu %d is below IPv6's minimum %d: raise it or set ipv6=False" % (self.mtu, MTU_MIN_IPV6))
        if self.hostname is not None:
            if len(self.hostname.encode("utf-8")) > HOSTNAME_MAX_BYTES or not _HOSTNAME.match(self.hostname):
                raise ValueError("hostname %r must be letters, digits, '-' and '.', at most %d bytes"
                                 % (self.hostname, HOSTNAME_MAX_BYTES))
        for name in ("hostfwds", "guestfwds"):
            value = tuple(getattr(self, name))
            if len(value) > Limits.FORWARDS_MAX:
                raise ValueError("%d %s: at most %d" % (len(value), name, Limits.FORWARDS_MAX))
            put(name, value)

    @property
    def dhcp_pool(self) -> Tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """First and last address libslirp's DHCP server may hand out."""
        return self.dhcp_start, self.dhcp_start + (DHCP_POOL_SIZE - 1)
