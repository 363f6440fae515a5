"""A virtio-net card on libslirp's NAT: built from command-line values (worker and vhost-user backend)."""

from __future__ import annotations

import logging
import re
from typing import List, Sequence, Tuple

log = logging.getLogger("tenbox.net")

MAC_RE = re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z")


class NetSetupError(Exception):
    """Bad MAC, bad forward spec, or libslirp refused the network; one line for the operator."""


def parse_mac(text: str) -> bytes:
    if not MAC_RE.match(text):
        raise NetSetupError("MAC %r is not six hex bytes separated by colons" % text)
    mac = bytes(int(x, 16) for x in text.split(":"))
    if mac[0] & 1:
        raise NetSetupError("MAC %s is a multicast address" % text)
    return mac


def build_net_device(mac: str, hostfwds: Sequence[str], guestfwds: Sequence[str], link_up: bool = True):
    """A VirtioNet with its SlirpNetwork; forwards that could not be set up are in `.forward_failures`."""
    from tenbox_vmm.devices.virtio.net import VirtioNet
    from tenbox_vmm.net.config import NetConfig
    from tenbox_vmm.net.forwards import ForwardSpecError, parse_guestfwd, parse_hostfwd
    from tenbox_vmm.net.libslirp import SlirpUnavailable
    from tenbox_vmm.net.slirp import SlirpError, SlirpNetwork

    mac_bytes = parse_mac(mac)
    try:
        hf = tuple(parse_hostfwd(s) for s in hostfwds)
        gf = tuple(parse_guestfwd(s) for s in guestfwds)
        config = NetConfig(hostfwds=hf, guestfwds=gf)
    except (ForwardSpecError, ValueError) as e:
        raise NetSetupError(str(e)) from None
    backends = []

    def factory(send):
        try:
            backends.append(SlirpNetwork(config, send))
        except SlirpUnavailable as e:  # libslirp0 missing or too old
            raise NetSetupError(str(e)) from None
        except (SlirpError, OSError) as e:
            raise NetSetupError("user-mode networking failed: %s" % e) from None
        return backends[-1]

    device = VirtioNet(mac_bytes, factory, link_up=link_up)
    slirp = backends[0]
    device.forward_failures: List[Tuple[str, str]] = [(str(s), r) for s, r in slirp.startup_failures]
    slirp.release_thread()  # built here; the device's I/O thread runs it from now on
    return device
