"""A virtio-net card on libslirp's user-mode NAT, assembled from command-line values (worker and vhost-user backend).

The device model (devices/virtio/net.py) knows frames and rings; the
backend (net/slirp.py) knows sockets and forwards. `UserNic` holds the two
together with what only the pair knows: which forwards failed to set up.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from tenbox_vmm.protocol import Limits
from tenbox_vmm.protocol.link import NetStatus


class NetSetupError(Exception):
    """Bad MAC, bad forward spec, or libslirp refused the network; one line for the operator."""


def parse_mac(text: str) -> bytes:
    if not Limits.MAC_RE.match(text):
        raise NetSetupError("MAC %r is not six hex bytes separated by colons" % text)
    mac = bytes(int(x, 16) for x in text.split(":"))
    if mac[0] & 1:
        raise NetSetupError("MAC %s is a multicast address" % text)
    return mac


class UserNic:
    """A VirtioNet (`device`) and the SlirpNetwork behind it (`backend`)."""

    def __init__(self, mac: str, hostfwds: Sequence[str], guestfwds: Sequence[str], link_up: bool = True) -> None:
        from tenbox_vmm.devices.virtio.net import VirtioNet
        from tenbox_vmm.net.config import NetConfig
        from tenbox_vmm.net.libslirp import SlirpUnavailable
        from tenbox_vmm.net.slirp import SlirpError, SlirpNetwork
        from tenbox_vmm.protocol.forwards import ForwardSpecError, parse_guestfwd, parse_hostfwd

        mac_bytes = parse_mac(mac)
        try:
            hf = tuple(parse_hostfwd(s) for s in hostfwds)
            gf = tuple(parse_guestfwd(s) for s in guestfwds)
            config = NetConfig(hostfwds=hf, guestfwds=gf)
        except (ForwardSpecError, ValueError) as e:
            raise NetSetupError(str(e)) from None
        backends: List[SlirpNetwork] = []

        def factory(send):
            try:
                backends.append(SlirpNetwork(config, send))
            except SlirpUnavailable as e:  # libslirp0 missing or too old
                raise NetSetupError(str(e)) from None
            except (SlirpError, OSError) as e:
                raise NetSetupError("user-mode networking failed: %s" % e) from None
            return backends[-1]

        self.device = VirtioNet(mac_bytes, factory, link_up=link_up)
        self.backend = backends[0]
        self.forward_failures: List[Tuple[str, str]] = [(str(s), r) for s, r in self.backend.startup_failures]
        self.backend.release_thread()  # built here; the device's I/O thread runs it from now on

    def set_link(self, up: bool) -> None:
        self.device.set_link(up)

    def set_forwards(self, hostfwds: Sequence[str], guestfwds: Sequence[str]) -> List[Tuple[str, str]]:
        """Replace the port forwards (any thread); the (spec, reason) of each that failed."""
        failures = self.device.run_on_backend(lambda: self.backend.set_forwards(hostfwds, guestfwds))
        self.forward_failures = [(str(s), r) for s, r in failures]
        return self.forward_failures

    def status(self) -> NetStatus:
        return NetStatus(
            link_up=self.device.link_up,
            mac=":".join("%02x" % b for b in self.device.mac),
            hostfwds=tuple(str(f) for f in self.backend.hostfwds),
            guestfwds=tuple(str(f) for f in self.backend.guestfwds),
            failures=tuple(self.forward_failures),
        )


def warm_up() -> bool:
    """Build a card with no forwards and drop it: whether that worked. For a standby (standby.py): a
    process's first card paid about 1.3 ms of first uses (regular expressions, cffi's types, the config
    class) that each forked worker now finds done. It opens no socket and leaves nothing open."""
    try:
        nic = UserNic("52:54:00:00:00:01", (), ())
    except NetSetupError:
        return False  # no libslirp: the VM that asks for a card says so
    nic.device.close()
    return True
