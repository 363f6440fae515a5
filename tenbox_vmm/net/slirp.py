"""SlirpNetwork: libslirp's user-mode NAT behind one virtio-net device (I/O thread).

Thread model. libslirp is not thread-safe, so every call into it happens on
one thread: the virtio-net device's I/O thread, which owns this object. Its
loop is::

    fds, timeout_ms = net.poll_prepare()     # slirp's sockets + ours
    ... poll() them together with the device's own fds (ioeventfds) ...
    net.poll_done(revents)                   # {fd: poll(2) revents}
    net.input(frame)                         # each frame the guest sent

`send_to_guest(frame)` is called on that thread, from inside input(),
poll_done() or a forward change. The object may be built and given its
forwards on another thread before the loop starts; the first poll_prepare()
binds it to the calling thread, and from then on a call from any other
thread raises RuntimeError (unless the owner thread has ended, e.g. the
device joined its I/O thread and now calls close()). An exception raised by
send_to_guest inside a libslirp callback cannot cross the C frames; it is
kept and re-raised when libslirp returns.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from tenbox_vmm.guest_log import GuestLog
from tenbox_vmm.net.alias import TcpAliases
from tenbox_vmm.net.config import NetConfig
from tenbox_vmm.protocol.forwards import (
    ForwardSpecError,
    GuestForward,
    HostForward,
    as_guestfwd,
    as_hostfwd,
)
from tenbox_vmm.net.libslirp import (
    CONFIG_VERSION_DECLARED,
    CONFIG_VERSION_TIMER_OPAQUE,
    SLIRP_POLL_ERR,
    SLIRP_POLL_HUP,
    UINT32_MAX,
    config_version_for,
    ffi,
    library_version,
    open_library,
    poll_to_slirp,
    slirp_to_poll,
)
from tenbox_vmm.net.icmp import port_unreachable
from tenbox_vmm.net.loopback import PASS, UNREACHABLE, HostGuard
from tenbox_vmm.net.ports import bind_error, privileged_port_error
from tenbox_vmm.net.relay import GuestForwardRelay
from tenbox_vmm.net.timers import SlirpTimer, TimerTable
from tenbox_vmm.net.udpfwd import UdpForwards

log = logging.getLogger("tenbox.net")

ETH_HEADER = 14
FRAME_MAX_BYTES = ETH_HEADER + 65535 + 4  # an IPv4/IPv6 maximum packet, with a VLAN tag
NS_PER_MS = 1000000

Failure = Tuple[str, str]  # (spec, reason)
Buffer = Union[bytes, bytearray, memoryview]

# C types of the callbacks, as `(*)` pointer types: the pre-parsed FFI
# (ffigen) reads type strings with a smaller parser than cdef's.
CALLBACK_TYPES = {
    "send_packet": "SlirpWriteCb",
    "guest_error": "void(*)(const char *, void *)",
    "clock_get_ns": "int64_t(*)(void *)",
    "timer_new": "void *(*)(SlirpTimerCb, void *, void *)",
    "timer_free": "void(*)(void *, void *)",
    "timer_mod": "void(*)(void *, int64_t, void *)",
    "register_poll_fd": "void(*)(int, void *)",
    "unregister_poll_fd": "void(*)(int, void *)",
    "notify": "void(*)(void *)",
    "timer_new_opaque": "void *(*)(SlirpTimerId, void *, void *)",
    "add_poll": "SlirpAddPollCb",
    "get_revents": "SlirpGetREventsCb",
}


class SlirpError(Exception):
    """libslirp refused to start; the message says which library and settings."""


def _s_addr(addr: ipaddress.IPv4Address) -> int:
    """An IPv4 address as struct in_addr's s_addr (network order in memory)."""
    return int.from_bytes(addr.packed, sys.byteorder)


def _in_addr(addr: ipaddress.IPv4Address) -> Any:
    return ffi.new("struct in_addr *", {"s_addr": _s_addr(addr)})


def _spare_addresses(config: NetConfig, count: int) -> List[ipaddress.IPv4Address]:
    """Addresses of the guest network nobody uses, from the top down."""
    first, last = config.dhcp_pool
    taken = {config.host, config.dns}
    out: List[ipaddress.IPv4Address] = []
    addr = config.network.broadcast_address - 1
    while len(out) < count and addr > config.network.network_address:
        if addr not in taken and not first <= addr <= last:
            out.append(addr)
        addr -= 1
    if len(out) < count:
        raise ValueError("network %s has no spare address for forward aliases" % config.network)
    return out


class SlirpNetwork:
    """One guest network: libslirp's NAT, DHCP, DNS proxy and port forwards.

    `clock_ns` is libslirp's clock (monotonic nanoseconds); tests replace it
    to run timers without waiting. `config_version` overrides the SlirpConfig
    version probed from the library (tests use it to drive the pre-4.7 timer
    path on a 4.7 library).
    """

    def __init__(self, config: NetConfig, send_to_guest: Callable[[bytes], None], *,
                 clock_ns: Callable[[], int] = time.monotonic_ns,
                 config_version: Optional[int] = None) -> None:
        self.config = config
        self._send_to_guest = send_to_guest
        self._clock_ns = clock_ns
        self._lib = open_library()
        self.library_version = library_version(self._lib)
        self.config_version = config_version or config_version_for(self.library_version)
        if not 1 <= self.config_version <= CONFIG_VERSION_DECLARED:
            raise ValueError("config_version %d is not 1..%d" % (self.config_version, CONFIG_VERSION_DECLARED))
        self._slirp: Any = None
        self._deferred: Optional[BaseException] = None
        self._owner: Optional[threading.Thread] = None
        self._owner_ident: Optional[int] = None
        self._poll_entries: List[Tuple[int, int]] = []  # (fd, SLIRP_POLL_*) from the last fill
        self._revents: Dict[int, int] = {}
        self._registered_fds: Set[int] = set()
        self._wake = False
        self._timers = TimerTable()
        self._relay = GuestForwardRelay(clock=lambda: self._clock_ns() / 1e9)
        self._udp = UdpForwards(config, send_to_guest, clock=lambda: self._clock_ns() / 1e9)
        self._guard_loopback = bool(config.disable_host_loopback)
        self._host_guard = HostGuard(config.dns.packed, config.dns6.packed)
        self._aliases = TcpAliases()
        spare = _spare_addresses(config, 2)
        self._alias_of = {config.host: spare[0], config.dns: spare[1]}
        self._hostfwds: Dict[tuple, HostForward] = {}
        self._guestfwds: Dict[tuple, GuestForward] = {}
        # guest_error messages are the guest's to trigger: a bounded number is logged.
        self._guest_error_log = GuestLog(log, "guest network errors", clock=lambda: self._clock_ns() / 1e9)
        self.frames_dropped = 0  # runts, giants, frames to the host's loopback, anything but DNS to the DNS address
        self._make_callbacks()
        self._make_config()
        self._timeout = ffi.new("uint32_t *")
        slirp = self._lib.slirp_new(self._cfg, self._cb, ffi.NULL)
        if slirp == ffi.NULL:
            self._relay.close()
            raise SlirpError("libslirp %s refused the network settings (SlirpConfig version %d, mtu %d, %s)"
                             % (self.library_version, self.config_version, config.mtu, config.network))
        self._slirp = slirp
        log.debug("libslirp %s, SlirpConfig version %d", self.library_version, self.config_version)
        self._raise_deferred()
        self.startup_failures: List[Failure] = self.set_forwards(config.hostfwds, config.guestfwds)
        for spec, why in self.startup_failures:
            log.warning("forward %s not set up: %s", spec, why)

    # -- construction ----------------------------------------------------------

    def _make_callbacks(self) -> None:
        cb = ffi.new("SlirpCb *")
        handlers = {
            "send_packet": self._guard(self._on_send_packet, -1),
            "guest_error": self._guard(self._on_guest_error),
            "clock_get_ns": self._guard(self._on_clock_get_ns, 0),
            "timer_new": self._guard(self._on_timer_new, ffi.NULL),
            "timer_free": self._guard(self._on_timer_free),
            "timer_mod": self._guard(self._on_timer_mod),
            "register_poll_fd": self._guard(self._on_register_poll_fd),
            "unregister_poll_fd": self._guard(self._on_unregister_poll_fd),
            "notify": self._guard(self._on_notify),
        }
        if self.config_version >= CONFIG_VERSION_TIMER_OPAQUE:
            handlers["timer_new_opaque"] = self._guard(self._on_timer_new_opaque, ffi.NULL)
        # Every cffi callback object must outlive libslirp's use of it; they
        # live in self._callbacks until the object goes away.
        made = {name: ffi.callback(CALLBACK_TYPES[name], fn) for name, fn in handlers.items()}
        for name, fn in made.items():
            setattr(cb, name, fn)
        self._callbacks = made
        self._cb = cb
        self._add_poll_cb = ffi.callback(CALLBACK_TYPES["add_poll"], self._guard(self._on_add_poll, -1))
        self._get_revents_cb = ffi.callback(CALLBACK_TYPES["get_revents"], self._guard(self._on_get_revents, 0))

    def _make_config(self) -> None:
        c = self.config
        cfg = ffi.new("SlirpConfig *")
        cfg.version = self.config_version
        cfg.restricted = 1 if c.restricted else 0
        cfg.in_enabled = True
        cfg.vnetwork.s_addr = _s_addr(c.network.network_address)
        cfg.vnetmask.s_addr = _s_addr(c.network.netmask)
        cfg.vhost.s_addr = _s_addr(c.host)
        cfg.vdhcp_start.s_addr = _s_addr(c.dhcp_start)
        cfg.vnameserver.s_addr = _s_addr(c.dns)
        cfg.in6_enabled = bool(c.ipv6)
        if c.ipv6:
            ffi.memmove(ffi.addressof(cfg, "vprefix_addr6"), c.ipv6_prefix.network_address.packed, 16)
            cfg.vprefix_len = c.ipv6_prefix.prefixlen
            ffi.memmove(ffi.addressof(cfg, "vhost6"), c.host6.packed, 16)
            ffi.memmove(ffi.addressof(cfg, "vnameserver6"), c.dns6.packed, 16)
        self._strings = []  # char buffers cfg points into, kept alive with it
        if c.hostname:
            name = ffi.new("char[]", c.hostname.encode("ascii"))
            self._strings.append(name)
            cfg.vhostname = name
        cfg.if_mtu = c.mtu
        cfg.if_mru = c.mtu
        cfg.disable_host_loopback = bool(c.disable_host_loopback)
        cfg.enable_emu = False  # libslirp: "this code isn't safe"
        self._cfg = cfg

    # -- callbacks from libslirp (on the I/O thread, inside a libslirp call) ----

    def _guard(self, fn: Callable, default: Any = None) -> Callable:
        """Wrap a callback: an exception is kept for _raise_deferred, never lost."""

        def callback(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException as e:  # re-raised once libslirp has returned
                if self._deferred is None:
                    self._deferred = e
                return default

        return callback

    def _raise_deferred(self) -> None:
        e = self._deferred
        if e is not None:
            self._deferred = None
            raise e

    def _on_send_packet(self, buf: Any, size: int, opaque: Any) -> int:
        frame = ffi.buffer(buf, size)[:]
        if self._aliases:
            rewritten = self._aliases.to_guest(frame)
            if rewritten is not frame:
                frame = bytes(rewritten)
        self._send_to_guest(frame)
        return size

    def _on_guest_error(self, msg: Any, opaque: Any) -> None:
        self._guest_error_log.warning("guest network error: %s", ffi.string(msg).decode("utf-8", "replace"))

    def _on_clock_get_ns(self, opaque: Any) -> int:
        return self._clock_ns()

    def _new_timer(self, fire: Callable[[], None]) -> Any:
        t = self._timers.new(fire)
        t.handle = ffi.new_handle(t)
        return t.handle

    def _on_timer_new(self, cb: Any, cb_opaque: Any, opaque: Any) -> Any:
        # SlirpConfig version < 4: libslirp hands us a C function to call.
        return self._new_timer(lambda: cb(cb_opaque))

    def _on_timer_new_opaque(self, timer_id: int, cb_opaque: Any, opaque: Any) -> Any:
        # Version >= 4: we hand the id back through slirp_handle_timer.
        return self._new_timer(lambda: self._lib.slirp_handle_timer(self._slirp, timer_id, cb_opaque))

    def _on_timer_free(self, timer: Any, opaque: Any) -> None:
        t: SlirpTimer = ffi.from_handle(timer)
        self._timers.free(t)
        t.handle = None

    def _on_timer_mod(self, timer: Any, expire_ms: int, opaque: Any) -> None:
        self._timers.mod(ffi.from_handle(timer), expire_ms)

    def _on_register_poll_fd(self, fd: int, opaque: Any) -> None:
        # A hint for event loops that keep fd sets (Windows); we poll what
        # slirp_pollfds_fill lists each time, and only keep count.
        self._registered_fds.add(fd)

    def _on_unregister_poll_fd(self, fd: int, opaque: Any) -> None:
        self._registered_fds.discard(fd)

    def _on_notify(self, opaque: Any) -> None:
        # Some socket can take data again: poll once more without sleeping.
        self._wake = True

    def _on_add_poll(self, fd: int, events: int, opaque: Any) -> int:
        self._poll_entries.append((fd, events))
        return len(self._poll_entries) - 1

    def _on_get_revents(self, idx: int, opaque: Any) -> int:
        entries = self._poll_entries
        if not 0 <= idx < len(entries):
            return 0
        fd, events = entries[idx]
        rev = self._revents.get(fd, 0)
        if not rev:
            return 0
        # Only what this entry asked for (the caller polled the union of all
        # entries of this fd), plus the conditions poll(2) always reports.
        return poll_to_slirp(rev) & (events | SLIRP_POLL_ERR | SLIRP_POLL_HUP)

    # -- thread ownership ------------------------------------------------------

    def _check_thread(self, bind: bool = False) -> None:
        if self._slirp is None:
            raise RuntimeError("this SlirpNetwork is closed")
        ident = threading.get_ident()
        if ident == self._owner_ident:
            return
        owner = self._owner
        if owner is not None and owner.is_alive():
            raise RuntimeError("SlirpNetwork is owned by thread %r; called from %r"
                               % (owner.name, threading.current_thread().name))
        if bind or owner is not None:
            self._owner = threading.current_thread()
            self._owner_ident = ident

    def release_thread(self) -> None:
        """The owning thread is done for now: the next thread to use the network takes it over.

        For callers that use the network on their own thread only while no
        I/O thread runs it (the virtio-net device before the guest's driver
        is up), and hand it back under a lock.
        """
        if threading.get_ident() == self._owner_ident:
            self._owner = None
            self._owner_ident = None

    # -- data path -------------------------------------------------------------

    @property
    def guest_room(self) -> Optional[Callable[[], int]]:
        """How many frames the guest can take now (set by the device; None: no limit).

        The UDP forwards read no more datagrams than that from their sockets:
        while the guest has no receive buffers, datagrams wait in the kernel.
        """
        return self._udp.guest_room

    @guest_room.setter
    def guest_room(self, fn: Optional[Callable[[], int]]) -> None:
        self._udp.guest_room = fn

    def input(self, frame: Buffer) -> None:
        """Give libslirp one Ethernet frame from the guest (no FCS, checksums complete)."""
        self.input_many((frame,))

    def input_many(self, frames: Iterable[Buffer]) -> None:
        """Frames from the guest, in order, as input() takes them one by one.

        The answers of UDP forwards among them leave in one batch; once this
        returns, nothing refers to the frames any more (the caller may give
        guest buffers back).
        """
        if threading.get_ident() != self._owner_ident:
            self._check_thread()
        udp = self._udp
        try:
            for frame in frames:
                n = len(frame)
                if not ETH_HEADER <= n <= FRAME_MAX_BYTES:
                    self.frames_dropped += 1
                    continue
                # An answer within a UDP forward's flow goes to that flow's peer, whom the guest
                # sees as the gateway (a peer on this host) or at its own address, never at a
                # loopback one: the loopback guard below has nothing to say about it. Checked
                # first: it is the frame a busy forward sends most.
                if udp and udp.from_guest(frame):
                    continue
                # Guest forwards on 10.0.2.2 and 10.0.2.3 go to their alias addresses first:
                # a forward on the DNS address is the operator's to open, not the guard's to refuse.
                if self._aliases:
                    rewritten = self._aliases.from_guest(frame)
                    if rewritten is not frame:
                        frame = rewritten
                if self._guard_loopback:
                    verdict = self._host_guard.verdict(frame)
                    if verdict != PASS:
                        self.frames_dropped += 1
                        if verdict == UNREACHABLE:
                            self._send_to_guest(port_unreachable(frame))
                        continue
                self._lib.slirp_input(self._slirp, ffi.from_buffer("uint8_t[]", frame), n)
                if self._deferred is not None:
                    self._raise_deferred()
        finally:
            udp.flush()

    def poll_prepare(self) -> Tuple[List[Tuple[int, int]], int]:
        """(fd, poll(2) events) to watch and the poll timeout in ms (-1: none).

        The first call binds this object to the calling thread.
        """
        self._check_thread(bind=True)
        self._poll_entries = []
        self._timeout[0] = UINT32_MAX
        self._lib.slirp_pollfds_fill(self._slirp, self._timeout, self._add_poll_cb, ffi.NULL)
        self._raise_deferred()
        merged: Dict[int, int] = {}
        for fd, events in self._poll_entries:
            merged[fd] = merged.get(fd, 0) | slirp_to_poll(events)
        relay_fds, relay_timeout = self._relay.poll_fds()
        for fd, events in relay_fds + self._udp.poll_fds():
            merged[fd] = merged.get(fd, 0) | events
        timeout = -1 if self._timeout[0] == UINT32_MAX else int(self._timeout[0])
        due = self._timers.next_due_ms()
        if due is not None:
            wait = max(0, due - self._clock_ns() // NS_PER_MS)
            timeout = wait if timeout < 0 else min(timeout, wait)
        if relay_timeout is not None:
            wait = int(relay_timeout * 1000) + 1
            timeout = wait if timeout < 0 else min(timeout, wait)
        if self._wake:
            self._wake = False
            timeout = 0
        return list(merged.items()), timeout

    def poll_done(self, revents: Dict[int, int]) -> None:
        """After the caller's poll(): libslirp's socket work, relayed forwards, due timers.

        `revents` maps fd → poll(2) revents; fds that are not ours are ignored.
        """
        self._check_thread()
        self._revents = revents
        try:
            self._lib.slirp_pollfds_poll(self._slirp, 0, self._get_revents_cb, ffi.NULL)
        finally:
            self._revents = {}
        self._relay.handle(revents)
        self._udp.handle(revents)
        self._timers.run_due(self._clock_ns() // NS_PER_MS)
        self._raise_deferred()

    # -- forwards --------------------------------------------------------------

    @property
    def hostfwds(self) -> List[HostForward]:
        return list(self._hostfwds.values())

    @property
    def guestfwds(self) -> List[GuestForward]:
        return list(self._guestfwds.values())

    def add_hostfwd(self, fwd: Union[str, HostForward]) -> Optional[str]:
        """Listen on the host for `fwd`; None, or one line saying why not."""
        self._check_thread()
        try:
            f = as_hostfwd(fwd)
        except ForwardSpecError as e:
            return str(e)
        why = self._add_hostfwd(f)
        return None if why is None else "hostfwd %s: %s" % (f, why)

    def _add_hostfwd(self, f: HostForward) -> Optional[str]:
        existing = self._hostfwds.get(f.key)
        if existing is not None:
            return None if existing == f else "its host port is already forwarded by %s" % existing
        guest = f.guest_addr if f.guest_addr is not None else self.config.dhcp_start
        why = self._check_guest_target(guest)
        if why:
            return why
        if not isinstance(f.host_addr, ipaddress.IPv4Address):
            # libslirp 4.5+ can listen on IPv6, but then talks IPv6 to the
            # guest, whose forwarded address is IPv4: it cannot bridge the two.
            return "IPv6 host addresses are not supported (the guest side of a forward is IPv4)"
        why = privileged_port_error(f.host_port)
        if why:
            return why
        if f.is_udp:
            why = self._udp.add(f, guest.packed)
        else:
            # cffi cdata made for a call must stay referenced until it returns.
            haddr, gaddr = _in_addr(f.host_addr), _in_addr(guest)
            ffi.errno = 0
            rc = self._lib.slirp_add_hostfwd(self._slirp, 0, haddr[0], f.host_port, gaddr[0], f.guest_port)
            err = ffi.errno
            self._raise_deferred()
            why = bind_error(err, "tcp %s:%d" % (f.host_addr, f.host_port)) if rc < 0 else None
        if why:
            return why
        self._hostfwds[f.key] = f
        return None

    def remove_hostfwd(self, fwd: Union[str, HostForward]) -> bool:
        """Stop the forward listening on fwd's host address and port; False if none was."""
        self._check_thread()
        try:
            f = as_hostfwd(fwd)
        except ForwardSpecError:
            return False
        existing = self._hostfwds.pop(f.key, None)
        if existing is None:
            return False
        if f.is_udp:
            return self._udp.remove(f.key)
        assert isinstance(f.host_addr, ipaddress.IPv4Address)  # IPv6 ones are never added
        haddr = _in_addr(f.host_addr)
        rc = self._lib.slirp_remove_hostfwd(self._slirp, 0, haddr[0], f.host_port)
        self._raise_deferred()
        return rc == 0

    def add_guestfwd(self, fwd: Union[str, GuestForward]) -> Optional[str]:
        """Forward the guest's TCP connections for `fwd`; None, or one line saying why not."""
        self._check_thread()
        try:
            f = as_guestfwd(fwd)
        except ForwardSpecError as e:
            return str(e)
        why = self._add_guestfwd(f)
        return None if why is None else "guestfwd %s: %s" % (f, why)

    def _add_guestfwd(self, f: GuestForward) -> Optional[str]:
        existing = self._guestfwds.get(f.key)
        if existing is not None:
            if existing == f:
                return None
            return "%s:%d is already forwarded by %s" % (f.guest_addr, f.guest_port, existing)
        c = self.config
        first, last = c.dhcp_pool
        if f.guest_addr not in c.network or f.guest_addr in (c.network.network_address, c.network.broadcast_address):
            return "guest address %s is not a host address of the guest network %s" % (f.guest_addr, c.network)
        if first <= f.guest_addr <= last:
            return "guest address %s is in the DHCP pool %s-%s" % (f.guest_addr, first, last)
        if f.guest_addr in self._alias_of.values():
            return "guest address %s is reserved for forwards on %s and %s" % (f.guest_addr, c.host, c.dns)
        try:
            add_unix = self._lib.slirp_add_unix
        except AttributeError:
            return "guest forwards need libslirp 4.2 or later (this is %s)" % self.library_version
        slirp_addr = self._alias_of.get(f.guest_addr, f.guest_addr)
        try:
            path = self._relay.add(f.key, str(f), (str(f.host_addr), f.host_port))
        except OSError as e:
            return "cannot create its relay socket: %s" % (e.strerror or e)
        addr = _in_addr(slirp_addr)
        rc = add_unix(self._slirp, path.encode(), addr, f.guest_port)
        self._raise_deferred()
        if rc < 0:
            self._relay.remove(f.key)
            return "libslirp refused %s:%d" % (f.guest_addr, f.guest_port)
        if slirp_addr != f.guest_addr:
            self._aliases.add(f.guest_addr, slirp_addr, f.guest_port)
        self._guestfwds[f.key] = f
        return None

    def remove_guestfwd(self, fwd: Union[str, GuestForward]) -> bool:
        """Stop forwarding fwd's guest address and port, cutting its open connections."""
        self._check_thread()
        try:
            f = as_guestfwd(fwd)
        except ForwardSpecError:
            return False
        existing = self._guestfwds.pop(f.key, None)
        if existing is None:
            return False
        slirp_addr = self._alias_of.get(f.guest_addr, f.guest_addr)
        addr = _in_addr(slirp_addr)
        rc = self._lib.slirp_remove_guestfwd(self._slirp, addr[0], f.guest_port)
        self._aliases.remove(f.guest_addr, f.guest_port)
        self._relay.remove(f.key)
        self._raise_deferred()
        return rc == 0

    def set_forwards(self, hostfwds: Iterable[Union[str, HostForward]],
                     guestfwds: Iterable[Union[str, GuestForward]]) -> List[Failure]:
        """Make the forwards exactly these, at run time; the (spec, reason) of each that failed.

        Forwards already in place and wanted again are left alone (their
        connections live on); the others are removed before new ones are
        added, so a port can move from one forward to another in one call.
        """
        self._check_thread()
        failures: List[Failure] = []
        want_h: Dict[tuple, Tuple[str, HostForward]] = {}
        for spec in hostfwds:
            try:
                f = as_hostfwd(spec)
            except ForwardSpecError as e:
                failures.append((str(spec), e.why))
                continue
            if f.key in want_h and want_h[f.key][1] != f:
                failures.append((str(spec), "its host port is also used by %s" % want_h[f.key][0]))
                continue
            want_h[f.key] = (str(spec), f)
        want_g: Dict[tuple, Tuple[str, GuestForward]] = {}
        for gspec in guestfwds:
            try:
                g = as_guestfwd(gspec)
            except ForwardSpecError as e:
                failures.append((str(gspec), e.why))
                continue
            if g.key in want_g and want_g[g.key][1] != g:
                failures.append((str(gspec), "%s:%d is also forwarded by %s"
                                 % (g.guest_addr, g.guest_port, want_g[g.key][0])))
                continue
            want_g[g.key] = (str(gspec), g)
        for key, f in list(self._hostfwds.items()):
            if key not in want_h or want_h[key][1] != f:
                self.remove_hostfwd(f)
        for key, g in list(self._guestfwds.items()):
            if key not in want_g or want_g[key][1] != g:
                self.remove_guestfwd(g)
        for spec, f in want_h.values():
            why = self._add_hostfwd(f)
            if why:
                failures.append((spec, why))
        for gspec, g in want_g.values():
            why = self._add_guestfwd(g)
            if why:
                failures.append((gspec, why))
        return failures

    def _check_guest_target(self, guest: ipaddress.IPv4Address) -> Optional[str]:
        c = self.config
        if (guest not in c.network or guest in (c.network.network_address, c.network.broadcast_address,
                                                c.host, c.dns)):
            return "guest address %s is not a guest's address in %s" % (guest, c.network)
        return None

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Shut libslirp down and close every socket; idempotent."""
        if self._slirp is None:
            return
        self._check_thread()
        self._relay.close()
        self._udp.close()
        self._lib.slirp_cleanup(self._slirp)
        self._slirp = None
        self._owner = None
        self._owner_ident = None
        self._timers.clear()
        self._hostfwds.clear()
        self._guestfwds.clear()
        self._deferred = None

    def __enter__(self) -> "SlirpNetwork":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
