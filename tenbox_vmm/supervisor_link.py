"""The worker's end of the worker link: a running VM talks to tenboxd over ZeroMQ (worker).

One thread owns the DEALER socket (ZeroMQ sockets are not thread-safe). It
sends HELLO on every (re)connect, heartbeats every second, the VM's state
changes and console output, and carries out the supervisor's commands. If
the supervisor goes silent the guest keeps running; when a supervisor
reappears (a restarted tenboxd) the worker introduces itself again.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Deque, Optional, Tuple

from tenbox_vmm.protocol import VERSION, Limits, VmState
from tenbox_vmm.protocol.link import (
    HEARTBEAT_INTERVAL_SEC,
    HEARTBEAT_LIVENESS,
    Command,
    CommandName,
    ConsoleData,
    Heartbeat,
    Hello,
    Message,
    NetReport,
    Reply,
    StateReport,
    UnknownCommand,
    WorkerExit,
    Who,
    decode,
    encode,
)

log = logging.getLogger("tenbox.worker")

zmq = None  # pyzmq, imported by the link thread when it starts (see SupervisorLink._run)

EXIT_LINGER_MS = 1000  # how long the EXIT message may take to leave
OUTBOX_MAX = 4096  # queued events while the supervisor is away
PENDING_INPUT_MAX = 1 << 20  # console input waiting for the guest to read it
# ZeroMQ reports a connect before the connection takes messages (IMMEDIATE refuses what is sent
# too early). So for a second after the start and after each connect, the link waits for the
# socket to take messages (POLLOUT) and sends HELLO then, trying again every 5 ms. After that,
# tenboxd's WHO in answer to our next heartbeat asks for it (a second later).
HELLO_RETRY_MS = 5
HELLO_RETRY_SEC = 1.0


def process_create_time(pid: int) -> float:
    """The process start time as psutil computes it (boot time + start ticks), from /proc.

    The supervisor identifies a worker by pid and this value; reading /proc
    directly spares every worker the import of psutil.
    """
    with open("/proc/%d/stat" % pid, "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    start_ticks = int(fields[19])  # field 22 of stat(5), counted after the comm field
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                boot = int(line.split()[1])
                break
        else:
            boot = 0
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


class SupervisorLink:
    """Connects a Machine to the supervisor at `endpoint`."""

    def __init__(self, endpoint: str, vm_id: str) -> None:
        self.endpoint = endpoint
        self.vm_id = vm_id
        self.machine = None
        self.snapshot_dir: Optional[Tuple[str, int]] = None  # --snapshot-dir: its path and descriptor
        self.pid = os.getpid()
        self.create_time = process_create_time(self.pid)
        self._outbox: Deque[Message] = collections.deque(maxlen=OUTBOX_MAX)
        self._console: Deque[bytes] = collections.deque()
        self._console_bytes = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pending_input = b""
        self._exit: Optional[Tuple[int, str]] = None
        # Queued events and console output wait for the first HELLO to go out: a supervisor
        # drops (and answers with WHO) whatever a worker says before it has introduced itself,
        # so a state change sent first (a fast guest reset) would be lost.
        self._introduced = False
        self._thread = threading.Thread(target=self._run, name="worker-link", daemon=True)

    # Called from any thread ------------------------------------------------

    def start(self, machine) -> None:
        """Begin talking for `machine`; events posted before this are sent first."""
        self.machine = machine
        machine.add_done_callback(self.machine_done)
        self._thread.start()

    def console_output(self, data: bytes) -> None:
        with self._lock:
            if self._console_bytes > Limits.LINK_MESSAGE_MAX_BYTES:
                return  # the supervisor is not keeping up; console.log has it all
            self._console.append(data)
            self._console_bytes += len(data)
        self._wake()

    def state_changed(self, state: VmState, reason: str) -> None:
        self._post(StateReport(state, reason))

    def machine_done(self) -> None:
        self._exit = (int(self.machine.exit_code), self.machine.exit_reason)
        self._wake()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _post(self, msg: Message) -> None:
        self._outbox.append(msg)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake

    # The link thread ---------------------------------------------------------

    def _hello(self) -> Hello:
        m = self.machine
        return Hello(vm_id=self.vm_id, pid=self.pid, create_time=self.create_time, state=m.state,
                     started_at=m.started_at, boots=m.boots, version=VERSION, net=m.net_status())

    def _run(self) -> None:
        # Imported here, on the link's own thread: the guest boots meanwhile.
        global zmq
        import zmq
        import zmq.utils.monitor

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        # No IDENTITY: tenboxd routes to this connection once it has checked our HELLO against the
        # kernel's peer credentials; a chosen identity could be squatted by another process.
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, Limits.LINK_MESSAGE_MAX_BYTES)
        sock.setsockopt(zmq.SNDHWM, Limits.LINK_QUEUE_MAX)
        sock.setsockopt(zmq.RCVHWM, Limits.LINK_QUEUE_MAX)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a supervisor that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_heard = time.monotonic()
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL_SEC  # HELLO first: a heartbeat before it only draws a WHO
        present = False
        hello_until = time.monotonic() + HELLO_RETRY_SEC  # HELLO until it goes (see HELLO_RETRY_SEC)
        polled = zmq.POLLIN
        try:
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    self._send(sock, Heartbeat(self.machine.state))
                    next_beat = now + HEARTBEAT_INTERVAL_SEC
                if present and now - last_heard > HEARTBEAT_INTERVAL_SEC * HEARTBEAT_LIVENESS:
                    present = False
                    log.warning("%s: supervisor silent; the guest keeps running", self.vm_id)
                timeout_ms = max(0, int((next_beat - now) * 1000))
                if self._pending_input:
                    timeout_ms = min(timeout_ms, 20)
                if now < hello_until:
                    timeout_ms = min(timeout_ms, HELLO_RETRY_MS)
                wanted = zmq.POLLIN | (zmq.POLLOUT if hello_until and not self._introduced else 0)
                if wanted != polled:
                    poller.modify(sock, wanted)
                    polled = wanted
                events = dict(poller.poll(timeout_ms))
                if monitor in events:
                    try:
                        zmq.utils.monitor.recv_monitor_message(monitor)
                    except zmq.ZMQError:
                        pass
                    self._introduced = False  # a (re)connect: this connection has not heard it
                    hello_until = time.monotonic() + HELLO_RETRY_SEC
                if hello_until and not self._introduced:
                    if time.monotonic() < hello_until:
                        self._introduce(sock)
                    else:
                        hello_until = 0.0  # tenboxd's WHO after our next heartbeat asks for it again
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                if events.get(sock, 0) & zmq.POLLIN:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_heard = time.monotonic()
                        if not present:
                            present = True
                        try:
                            self._handle(sock, frame)
                        except Exception:  # one bad message must not cost the VM its link
                            log.exception("%s: handling a supervisor message failed", self.vm_id)
                self._flush(sock)
                if self._pending_input:
                    self._pending_input = self._pending_input[self.machine.console_input(self._pending_input):]
                # A guest that ended before the link was up: its story waits for the HELLO (within
                # HELLO_RETRY_SEC), and is tried once more without it.
                if self._exit is not None and (self._introduced or not hello_until):
                    if not self._introduced:
                        self._introduce(sock)
                    self._flush(sock)
                    code, reason = self._exit
                    self._send(sock, WorkerExit(code, reason))
                    sock.setsockopt(zmq.LINGER, EXIT_LINGER_MS)
                    return
        except Exception:
            log.exception("%s: worker link failed; the guest keeps running without it", self.vm_id)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close()
            ctx.term()

    def _send(self, sock, msg: Message) -> bool:
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False  # no supervisor connected (IMMEDIATE) or its queue is full

    def _introduce(self, sock) -> None:
        if self._send(sock, self._hello()):
            self._introduced = True

    def _flush(self, sock) -> None:
        """Send queued console output and events; what cannot go yet waits (bounded) for a supervisor."""
        if not self._introduced:
            return
        with self._lock:
            data = b"".join(self._console)
            self._console.clear()
            self._console_bytes = 0
        while data:
            chunk = data[:Limits.CONSOLE_CHUNK_MAX_BYTES]
            if not self._send(sock, ConsoleData(chunk)):
                with self._lock:
                    # Keep the newest output for when a supervisor listens; console.log has everything.
                    kept = data[-Limits.LINK_MESSAGE_MAX_BYTES:]
                    self._console.appendleft(kept)
                    self._console_bytes += len(kept)
                break
            data = data[len(chunk):]
        while self._outbox:
            if not self._send(sock, self._outbox[0]):
                break
            self._outbox.popleft()

    def _handle(self, sock, frame: bytes) -> None:
        try:
            msg = decode(frame)
        except UnknownCommand as e:  # a newer tenboxd: say so, so that it does not wait in vain
            self._send(sock, Reply(e.req_id, False, error=str(e)))
            return
        except ValueError as e:
            log.warning("%s: dropped a bad frame from the supervisor: %s", self.vm_id, e)
            return
        if isinstance(msg, Who):
            self._introduce(sock)
        elif isinstance(msg, Command):
            self._command(sock, msg)

    def _command(self, sock, cmd: Command) -> None:
        args = cmd.args or {}
        error = None
        result = None
        name = cmd.name
        if name is CommandName.STOP:
            self.machine.stop(str(args.get("reason") or "stopped by tenboxd"))
        elif name is CommandName.REBOOT:
            self.machine.reboot()
        elif name is CommandName.SHUTDOWN:
            from tenbox_vmm.machine import MachineError

            try:
                self.machine.power_button()
            except MachineError as e:  # a board without a power button (arm64, for now)
                error = str(e)
        elif name is CommandName.CONSOLE_INPUT:
            data = args.get("data")
            if not isinstance(data, bytes):
                error = "console_input needs bytes"
            elif len(self._pending_input) + len(data) > PENDING_INPUT_MAX:
                error = "console input queue is full"
            else:
                self._pending_input += data
        elif name is CommandName.NET_LINK or name is CommandName.NET_FORWARDS:
            error, result = self._net_command(name, args)
        elif name is CommandName.STATS:
            result = self.machine.stats().to_wire()
        elif name is CommandName.DISK_GROW:
            error, result = self._disk_grow(args)
        elif name is CommandName.SNAPSHOT:
            error = self._snapshot(cmd.id, args)
            if error is None:
                return  # answered when the file is in place
        self._send(sock, Reply(cmd.id, error is None, error=error, result=result))
        if name in (CommandName.NET_LINK, CommandName.NET_FORWARDS) and error is None:
            status = self.machine.net_status()
            if status is not None:
                self._send(sock, NetReport(status))

    def _snapshot(self, req_id, args: dict) -> Optional[str]:
        """Ask the machine for a snapshot to the --snapshot-dir; the reply is posted when it is done."""
        name = args.get("name")
        if not isinstance(name, str) or not Limits.NAME_RE.match(name):
            return "snapshot needs a name matching [A-Za-z0-9-]{1,64}"
        if self.snapshot_dir is None:
            return "this worker was started without --snapshot-dir"
        folder, dir_fd = self.snapshot_dir
        overlays = args.get("overlays", [])
        if not isinstance(overlays, list) or len(overlays) > Limits.DISKS_MAX or not all(
                o is None or (isinstance(o, str) and Limits.NAME_RE.match(o)) for o in overlays):
            return "snapshot overlays must be a list of None or names matching [A-Za-z0-9-]{1,64}"

        def done(result) -> None:  # on the machine's controller thread
            if result.error:
                self._post(Reply(req_id, False, error=result.message))
            else:
                self._post(Reply(req_id, True, result={"path": result.path, "file_bytes": result.file_bytes,
                                                       "paused_ms": round(result.paused_ms, 1)}))

        # No rename here (the filter has none): tenboxd moves the file out of this staging folder.
        self.machine.request_snapshot(os.path.join(folder, name + ".snap"), dir_fd, done, publish=False,
                                      overlays=overlays)
        return None

    def _disk_grow(self, args: dict):
        from tenbox_vmm.machine import MachineError

        index, size = args.get("index"), args.get("size")
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(size, str) or len(size) > 32:
            return "disk_grow needs an index and a size", None
        try:
            return None, {"size": self.machine.grow_disk(index, size)}
        except MachineError as e:
            return str(e), None

    def _net_command(self, name: CommandName, args: dict):
        from tenbox_vmm.machine import MachineError

        try:
            if name is CommandName.NET_LINK:
                self.machine.set_link(bool(args.get("up")))
                return None, None
            hostfwds, guestfwds = args.get("hostfwds") or [], args.get("guestfwds") or []
            if not all(isinstance(s, str) for s in list(hostfwds) + list(guestfwds)):
                return "forwards must be lists of strings", None
            failures = self.machine.set_forwards(hostfwds, guestfwds)
            return None, {"failures": [list(f) for f in failures]}
        except (MachineError, TimeoutError) as e:
            return str(e), None
