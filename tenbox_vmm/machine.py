"""One virtual machine: build it from a config (or a snapshot), run its vCPUs, snapshot, stop, reboot, power off (worker).

A controller thread owns the lifecycle: it creates the KVM VM, writes the
boot image into RAM, starts one thread per vCPU and waits for the first
thing that ends this boot — guest poweroff or reset, a triple fault, a KVM
error, or a request from the host. A reset boots the guest again in the
same process with zeroed RAM and the same device objects; anything else
ends the machine with an `ExitCode`.

A host stop (`stop()`: SIGTERM, the link's stop command) is sticky: it is
kept apart from the guest's reports, so it holds whichever phase it meets
(boot, run, a reset being processed, the boot after it) and the machine ends
with ExitCode.STOPPED at the next step of the controller. Only a final
event the guest reported before it (poweroff, a crash) takes precedence.

The guest decides how often it resets: beyond a budget (Limits.GUEST_LOG_BURST
per GUEST_LOG_WINDOW_SEC) a reset cycle is neither logged nor reported as
REBOOTING/RUNNING (the VM stays running to tenboxd), and the next report
says how many were left out.

Snapshots are taken by the controller too, between two of its waits: it parks
every vCPU thread at an instruction boundary (`_pause_vcpus`), pauses the
virtio I/O threads, has snapshot/machine_state.py read the state and
snapshot/fileformat.py write the file, and lets everything go again. A machine
built with `MachineConfig.restore` starts its first boot from the snapshot's
state and RAM instead of the kernel. (The pause and the snapshot plumbing are
about 200 lines here; a module of their own is the next step if they grow.)
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, TYPE_CHECKING, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.arch import Board, BoardError, host_board
from tenbox_vmm.arch.x86_64.vcpu_loop import ExitOutcome, run_vcpu
from tenbox_vmm.devices.virtio.mmio import MmioHost, VirtioMmio
from tenbox_vmm.devices.bus import MmioBus, PioBus
from tenbox_vmm.guest_log import Budget, GuestLog
from tenbox_vmm.kernel_kind import KernelError, read_file
from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Kvm, KvmUnavailable, Vcpu, Vm, bitmap_runs, system_handle
from tenbox_vmm.kvm.coalesced import CoalescedRing
from tenbox_vmm.memory import MIB, GuestMemory
from tenbox_vmm.protocol import ExitCode, Limits, VmState
from tenbox_vmm.protocol.disk_arg import DiskArg

if TYPE_CHECKING:  # the link's types: imported where the link asks, not before the guest runs
    from tenbox_vmm.protocol.link import NetStatus, WorkerStats

log = logging.getLogger("tenbox.machine")

INITRD_MAX_BYTES = 2 << 30
KICK_SIGNAL = signal.SIGUSR1
VCPU_JOIN_SEC = 5.0
# A snapshot's pre-copy (Machine._save_live): passes over RAM while the guest runs, at most this many,
# and the guest paused once a pass leaves at most this much written for the last.
PRECOPY_PASSES = 5
PRECOPY_FINAL_BYTES = 2 * MIB
# Console bytes KVM queued without an exit (see _coalesce_console) reach the
# console at the guest's next exit, or from the controller: this often, and
# every RING_FOLLOW_SEC for the first RING_DRAIN_SEC of output after a quiet
# console, until none has come for two of those. A line's last byte has no
# exit after it when the guest goes on computing (a restored count guest's
# first line waited 10 ms for it, measured); a long burst (a verbose boot)
# drains itself at each exit, and is not worth a controller's wake-up every
# 2 ms (costly in the nested lane, where Python runs emulated).
RING_DRAIN_SEC = 0.02
RING_FOLLOW_SEC = 0.002
# Turning coalescing on or off costs KVM an SRCU grace period (4 ms measured on
# the development machines). The transmit interrupt turns it off at once;
# it comes back on only once the interrupt has stayed off this long, so a
# guest that alternates printk and tty output does not pay that per line.
COALESCE_REARM_SEC = 0.25

def default_cmdline() -> str:
    """The kernel command line a VM gets unless told otherwise: its board's."""
    try:
        return host_board().default_cmdline
    except BoardError:
        return ""


DEFAULT_CMDLINE = default_cmdline()


class MachineError(Exception):
    """The configuration cannot make a machine; the message is for the operator."""


class NetSpec(NamedTuple):
    mac: str = "52:54:00:12:34:56"
    hostfwds: Tuple[str, ...] = ()
    guestfwds: Tuple[str, ...] = ()
    link_up: bool = True


class MachineConfig(NamedTuple):
    kernel: Optional[str]  # None only with `restore`: a guest reset then ends the machine
    initrd: Optional[str] = None
    cmdline: str = DEFAULT_CMDLINE
    memory_mb: int = Limits.MEMORY_DEFAULT_MB
    cpus: int = 1
    vm_id: str = "vm"
    disks: Tuple[DiskArg, ...] = ()
    net: Optional[NetSpec] = None
    restore: Optional[str] = None  # a snapshot file to start from instead of booting; memory_mb/cpus 0: its own


class SnapshotDone(NamedTuple):
    """How a snapshot request ended: `message` is one line for the operator either way."""

    message: str
    error: bool
    path: str
    file_bytes: int = 0
    paused_ms: float = 0.0


class SnapshotRequest(NamedTuple):
    """Take a snapshot to `path` (in the folder `dir_fd`, opened before the sandbox); `done` is told how it went.

    `publish` False: the file is written in place for tenboxd to move (no rename in the worker).
    `overlays`: per virtio-blk disk, in --disk order, None or the name of a new qcow2 overlay in
    `dir_fd` (made by tenboxd, backed by that disk's image) which the disk continues on once
    the snapshot is written: the old image becomes the snapshot's read-only layer.
    """

    path: str
    dir_fd: Optional[int]
    done: Callable[[SnapshotDone], None]
    publish: bool = True
    overlays: Tuple[Optional[str], ...] = ()


class _SlotHost(MmioHost):
    """Wires one virtio-mmio slot's eventfds into the machine's current KVM VM."""

    def __init__(self, machine: "Machine", base: int, gsi: int) -> None:
        self._machine = machine
        self._base = base
        self._gsi = gsi
        self._wired: List[tuple] = []

    def irqfd(self) -> int:
        vm = self._machine._vm
        fd = eventfd.eventfd()
        vm.irqfd(fd, self._gsi)
        self._wired.append((vm, fd, None))
        return fd

    def ioeventfd(self, offset: int, datamatch: int) -> Optional[int]:
        vm = self._machine._vm
        fd = eventfd.eventfd()
        try:
            vm.ioeventfd(fd, self._base + offset, 4, datamatch=datamatch)
        except OSError as e:
            log.debug("no ioeventfd at %#x: %s", self._base + offset, e)
            os.close(fd)
            return None
        self._wired.append((vm, fd, (offset, datamatch)))
        return fd

    def release(self) -> None:
        wired, self._wired = self._wired, []
        for vm, fd, io in wired:
            if vm.fd >= 0:
                try:
                    if io is None:
                        vm.irqfd(fd, self._gsi, deassign=True)
                    else:
                        vm.ioeventfd(fd, self._base + io[0], 4, datamatch=io[1], deassign=True)
                except OSError as e:
                    log.debug("unwiring slot %#x: %s", self._base, e)
            os.close(fd)


def host_memory_available_mb() -> int:
    """MiB of RAM the host can give a guest now (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def check_limits(memory_mb: int, cpus: int, max_vcpus: Optional[int] = None) -> None:
    if memory_mb < Limits.MEMORY_MIN_MB:
        raise MachineError("--memory %d is too small: at least %d MiB" % (memory_mb, Limits.MEMORY_MIN_MB))
    available = host_memory_available_mb()
    if memory_mb > available:
        raise MachineError("--memory %d is more than the host can give (%d MiB available)" % (memory_mb, available))
    limit = min(Limits.CPUS_MAX, max_vcpus or Limits.CPUS_MAX)
    if not Limits.CPUS_MIN <= cpus <= limit:
        raise MachineError("--cpus %d is out of range: 1..%d" % (cpus, limit))


WARM_UP_RAM_BYTES = 2 * MIB


def warm_up() -> bool:
    """Build a KVM VM as a start or a restore builds one, never run it, and drop it: whether that worked.

    For a standby (standby.py), before it forks workers: the first VM a
    process makes pays for what Python builds on first use (cffi's struct
    types of each ioctl, the state records' paths): 1-3 ms of a restore
    here. Paid once in the standby, each forked worker finds it done.
    Nothing stays open; a host without KVM just skips it (the VM that
    needs KVM reports it).
    """
    from tenbox_vmm.snapshot import SnapshotError, cpu_model

    kvm = vm = vcpu = memory = None
    try:
        kvm = Kvm()
        board = host_board()
        board.prepare(kvm, 1)
        kvm.coalesced_ring_page()
        memory = GuestMemory(WARM_UP_RAM_BYTES, None, board.ram_regions(WARM_UP_RAM_BYTES))
        vm = board.create_vm(kvm, memory)
        vcpu = vm.create_vcpu(0)
        if board.snapshots:
            from tenbox_vmm.snapshot.machine_state import capture, check_kvm, restore_kvm

            check_kvm(kvm)
            cpu_model.describe(board.supported_cpuid)  # prepare() read it
            restore_kvm(vm, [vcpu], capture(vm, [vcpu], board.supported_msrs, {}, []))
        return True
    except (KvmUnavailable, BoardError, SnapshotError, OSError, ValueError) as e:
        log.debug("warm-up skipped: %s", e)
        return False
    finally:
        for thing in (vcpu, vm, memory, kvm):
            if thing is not None:
                thing.close()


def install_kick_handler() -> None:
    """vCPU threads are interrupted out of KVM_RUN with KICK_SIGNAL; it needs a handler.

    Must be called from the main thread before the machine starts.
    """
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class _Event(NamedTuple):
    code: ExitCode
    reason: str
    reset: bool = False
    by_host: bool = False  # a reset the host asked for is always reported


class Machine:
    """A VM built from a MachineConfig; start() it, then wait() for its ExitCode."""

    def __init__(
        self,
        config: MachineConfig,
        console_output: Callable[[bytes], None],
        on_state: Callable[[VmState, str], None] = lambda state, reason: None,
        kvm: Optional[Kvm] = None,
    ) -> None:
        self._on_state = on_state
        self._snapshot = None
        try:
            self.board: Board = host_board()
        except BoardError as e:
            raise MachineError(str(e)) from None
        if config.restore and not self.board.snapshots:
            raise MachineError("--restore: snapshots are not available on %s hosts yet" % self.board.arch)
        if config.restore:
            kvm, self._snapshot, config = self._open_snapshot(config, kvm)
        self.config = config
        # Cheap checks first: a bad file or option must be reported as such,
        # not hidden behind a missing /dev/kvm.
        try:
            check_limits(config.memory_mb, config.cpus)
        except MachineError:
            self._close_snapshot()
            raise
        size = config.memory_mb * MIB
        snap = self._snapshot
        self.memory = GuestMemory(size, snap.map_ram() if snap is not None else None, self.board.ram_regions(size),
                                  snap.ram_file() if snap is not None else None)
        try:
            self.kernel = None  # the board's loaded kernel
            self.cmdline = b""
            self.initrd = None
            if config.initrd and config.kernel:
                self.initrd = read_file(config.initrd, "initrd", INITRD_MAX_BYTES)
            if config.kernel:
                self.kernel, self.cmdline = self.board.load_kernel(
                    config.kernel, self.memory, config.cmdline, len(self.initrd) if self.initrd is not None else None)
            self.kvm = kvm or system_handle()
            check_limits(config.memory_mb, config.cpus, self.kvm.max_vcpus())
            self.board.prepare(self.kvm, config.cpus)
            disks = self._open_disks(config.disks)
            self.nic = self._make_nic(config.net) if config.net else None
        except (KernelError, BoardError, KvmUnavailable, MachineError) as e:
            self.memory.close()
            self._close_snapshot()
            raise MachineError(str(e)) from None
        self._ring_page = self.kvm.coalesced_ring_page()
        self._ring: Optional[CoalescedRing] = None
        self._coalescing = False
        self._coalesce_lock = threading.Lock()
        self._tx_interrupts_off_at = 0.0  # monotonic time the guest last turned the transmit interrupt off

        self.pio = PioBus()
        self.mmio = MmioBus()
        self._vm: Optional[Vm] = None
        self.devices = self.board.build_devices(
            self.pio,
            self.mmio,
            self._irq_line,
            console_output,
            on_poweroff=lambda: self._end(ExitCode.POWEROFF, "guest powered off"),
            on_reset=lambda: self._end(ExitCode.POWEROFF, "guest reset", reset=True),
            on_serial_tx_interrupts=self._serial_tx_interrupts,
        )
        self.virtio: List[VirtioMmio] = []
        for disk, spec in zip(disks, config.disks):
            from tenbox_vmm.devices.virtio.blk import VirtioBlk
            from tenbox_vmm.devices.virtio.blk_io import runner_for

            self.add_virtio(VirtioBlk(disk, spec.serial, runner_for(disk)))
        if self.nic is not None:
            self.add_virtio(self.nic.device)
        for device in self.board.builtin_virtio(self.devices):
            self.add_virtio(device)
        if self._snapshot is not None:
            self._check_snapshot_devices(self._snapshot.state)

        self._lock = threading.Lock()
        self._event: Optional[_Event] = None  # what the guest (or a vCPU failure) reported first
        self._stop: Optional[_Event] = None  # the host's stop: never cleared, never overridden
        self._event_ready = threading.Event()
        self._wake = threading.Event()  # the controller's: set after _event_ready, and as the console starts
        self._console_played_at = 0.0  # monotonic time the ring last played a console write
        self._console_burst_at = 0.0  # ... and the first it played after a quiet console
        self._halting = False
        self._vcpus: List[Vcpu] = []
        self._threads: List[threading.Thread] = []
        self._controller: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._settled = threading.Event()  # the first boot runs, or the machine has ended
        self._done_callbacks: List[Callable[[], None]] = []
        # A guest that resets itself in a loop decides how often the state changes: each
        # change is a line in tenboxd's log, a write of runtime.json and an event to every
        # watcher. Beyond the budget a reset cycle is not reported (the VM stays running).
        self._reset_reports = Budget()
        self._reset_log = GuestLog(log, "%s: guest resets" % config.vm_id)
        self._report_boot = True  # whether the boot in progress says RUNNING
        # Snapshots: requests for the controller; vCPUs park while `_pausing` until `_resume` is set.
        self._snapshot_requests: List[SnapshotRequest] = []
        self._pausing = False
        self._parked = 0
        self._park_cond = threading.Condition()
        self._resume = threading.Event()
        self.exit_code: Optional[ExitCode] = None
        self.exit_reason = ""
        self.boots = 0
        self.state = VmState.STOPPED
        self.started_at = 0.0

    @staticmethod
    def _open_disks(specs: Sequence[DiskArg]) -> list:
        if not specs:
            return []
        from tenbox_vmm.disk import DiskError, open_disk

        opened: list = []
        try:
            for spec in specs:
                opened.append(open_disk(spec.path, read_only=spec.read_only, fmt=spec.format))
        except DiskError as e:
            for d in opened:
                d.close()
            raise MachineError(str(e)) from None
        return opened

    @staticmethod
    def _make_nic(spec: NetSpec):
        from tenbox_vmm.usernet import NetSetupError, UserNic

        try:
            return UserNic(spec.mac, spec.hostfwds, spec.guestfwds, spec.link_up)
        except NetSetupError as e:
            raise MachineError(str(e)) from None

    @staticmethod
    def _open_snapshot(config: MachineConfig, kvm: Optional[Kvm]):
        """(kvm, the checked snapshot, the config with its RAM size and vCPUs); MachineError says why not."""
        from tenbox_vmm import passed_files
        from tenbox_vmm.snapshot import SnapshotError, cpu_model
        from tenbox_vmm.snapshot.fileformat import read_snapshot
        from tenbox_vmm.snapshot.machine_state import check_kvm

        assert config.restore is not None
        try:
            kvm = kvm or system_handle()
            check_kvm(kvm)
            fd = passed_files.open_fd(config.restore, os.O_RDONLY)
        except (KvmUnavailable, SnapshotError) as e:
            raise MachineError(str(e)) from None
        except OSError as e:
            raise MachineError("%s: cannot open the snapshot: %s" % (config.restore, e.strerror)) from None
        try:
            snap = read_snapshot(config.restore, cpu_model.describe(kvm.supported_cpuid()),
                                 memory_bytes=config.memory_mb * MIB or None, cpus=config.cpus or None, fd=fd)
        except SnapshotError as e:
            raise MachineError(str(e)) from None
        return kvm, snap, config._replace(memory_mb=snap.memory_bytes // MIB, cpus=snap.cpus)

    def _close_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.close()

    def _check_snapshot_devices(self, state: dict) -> None:
        """The snapshot's virtio devices must be this machine's, in the same slots, before anything is loaded."""
        from tenbox_vmm.snapshot import SnapshotError

        try:
            saved = state["virtio"]
            if len(saved) != len(self.virtio):
                raise SnapshotError("the snapshot has %d virtio devices (%s), this VM %d (%s): give the same "
                                    "--disk and --net options" % (
                                        len(saved), ", ".join(r["device"]["name"] for r in saved) or "none",
                                        len(self.virtio), ", ".join(t.device.name for t in self.virtio) or "none"))
            for i, (t, rec) in enumerate(zip(self.virtio, saved)):
                t.check_state("virtio%d" % i, rec)
        except SnapshotError as e:
            self.close()
            raise MachineError("%s: %s" % (self.config.restore, e)) from None

    def request_snapshot(self, path: str, dir_fd: Optional[int], done: Callable[[SnapshotDone], None],
                         publish: bool = True, overlays: Sequence[Optional[str]] = ()) -> None:
        """Snapshot the running machine to `path` at the controller's next step (safe from a signal handler).

        The vCPUs pause at an instruction boundary, the state and RAM are written, the disks
        move to their new overlays (SnapshotRequest), and the guest runs on. `done` is called
        on the controller thread.
        """
        self._snapshot_requests.append(SnapshotRequest(path, dir_fd, done, publish, tuple(overlays)))
        if self._done.is_set():  # came after _finish answered the others: answer it too
            self._refuse_snapshots("the VM has stopped")

    def _next_snapshot_request(self) -> Optional[SnapshotRequest]:
        try:
            return self._snapshot_requests.pop(0)  # atomic: two threads never take the same request
        except IndexError:
            return None

    def _refuse_snapshots(self, why: str) -> None:
        while True:
            req = self._next_snapshot_request()
            if req is None:
                return
            req.done(SnapshotDone("snapshot %s not taken: %s" % (req.path, why), True, req.path))

    def set_link(self, up: bool) -> None:
        """Network link up or down while the VM runs."""
        if self.nic is None:
            raise MachineError("this VM has no network card")
        self.nic.set_link(up)

    def set_forwards(self, hostfwds: Sequence[str], guestfwds: Sequence[str]) -> List[Tuple[str, str]]:
        """Replace the port forwards while the VM runs; the (spec, reason) of each that failed."""
        if self.nic is None:
            raise MachineError("this VM has no network card")
        return self.nic.set_forwards(hostfwds, guestfwds)

    def net_status(self) -> Optional[NetStatus]:
        return self.nic.status() if self.nic is not None else None

    def stats(self) -> WorkerStats:
        """The devices' counters and the guest RAM touched, for tenboxd's vm.stats (link thread)."""
        from tenbox_vmm.devices.virtio.blk import VirtioBlk
        from tenbox_vmm.protocol.link import WorkerStats

        disks = tuple(t.device.counters() for t in self.virtio if isinstance(t.device, VirtioBlk))
        return WorkerStats(guest_ram_bytes=self.memory.size, guest_ram_touched_bytes=self.memory.touched_bytes(),
                           disks=disks, net=self.nic.device.counters() if self.nic is not None else None)

    def grow_disk(self, index: int, size_text: str) -> int:
        """Grow the index-th disk ("20G" or "+5G", never smaller) while the VM runs; its new size in bytes."""
        from tenbox_vmm.devices.virtio.blk import VirtioBlk
        from tenbox_vmm.disk import DiskError
        from tenbox_vmm.protocol.imagetool import parse_new_size

        disks = [t.device for t in self.virtio if isinstance(t.device, VirtioBlk)]
        if not 0 <= index < len(disks):
            raise MachineError("no disk %d: this VM has %d" % (index, len(disks)))
        dev = disks[index]
        try:
            return dev.grow(parse_new_size(size_text, dev.disk.size))
        except (DiskError, ValueError) as e:
            raise MachineError(str(e)) from None

    def add_virtio(self, device) -> VirtioMmio:
        """Put a virtio device on the next virtio-mmio slot; the board describes it to the guest."""
        index = len(self.virtio)
        if index >= self.board.max_virtio():
            raise MachineError("at most %d virtio devices" % self.board.max_virtio())
        base, size, gsi = self.board.virtio_slot(index)
        transport = VirtioMmio(device, self.memory, _SlotHost(self, base, gsi))
        self.mmio.register(base, size, transport)
        self.virtio.append(transport)
        return transport

    # Host-side controls ----------------------------------------------------

    def start(self) -> None:
        self._set_state(VmState.STARTING, "start")
        self.started_at = time.time()
        self._controller = threading.Thread(target=self._control, name="vm-control", daemon=True)
        self._controller.start()

    def stop(self, reason: str = "stopped by the host") -> None:
        """Hard stop: halt every vCPU and end the machine with ExitCode.STOPPED.

        Safe from a signal handler and any thread, before start() too, and
        never lost: see the module's docstring.
        """
        with self._lock:
            if self._stop is None:
                self._stop = _Event(ExitCode.STOPPED, reason)
            self._halting = True
        self._kick_all()
        self._event_ready.set()
        self._wake.set()

    def reboot(self) -> None:
        """Reset the guest as the reset button would."""
        self._end(ExitCode.POWEROFF, "reset by the host", reset=True, by_host=True)

    def power_button(self) -> None:
        """Press the power button; a guest that handles it powers off (MachineError if the board has none)."""
        try:
            self.board.power_button(self.devices)
        except BoardError as e:
            raise MachineError(str(e)) from None

    def console_input(self, data: bytes) -> int:
        return self.devices.serial.receive(data)

    def console_space(self) -> int:
        return self.devices.serial.rx_space()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the machine has ended, on the thread that ends it; at once if it has."""
        with self._lock:
            if not self._done.is_set():
                self._done_callbacks.append(callback)
                return
        callback()

    def wait_running(self, timeout: float) -> bool:
        """Wait until the guest first runs or the machine ends (True), or `timeout` seconds (False)."""
        return self._settled.wait(timeout)

    def wait(self, timeout: Optional[float] = None) -> Optional[ExitCode]:
        self._done.wait(timeout)
        return self.exit_code

    def exits(self) -> int:
        return sum(v.exits for v in self._vcpus)

    # Internals -------------------------------------------------------------

    def _set_state(self, state: VmState, reason: str) -> None:
        self.state = state
        self._on_state(state, reason)
        if state == VmState.RUNNING:
            self._settled.set()

    def _irq_line(self, irq: int, level: int) -> None:
        vm = self._vm
        if vm is not None and vm.fd >= 0:
            self.board.irq_line(vm, irq, level)

    def _end(self, code: ExitCode, reason: str, reset: bool = False, by_host: bool = False) -> None:
        """Record what ends this boot (the first report wins, and none after a stop) and kick every vCPU."""
        with self._lock:
            if self._event is not None or self._stop is not None:
                return
            self._event = _Event(code, reason, reset, by_host)
            self._halting = True
        self._kick_all()
        self._event_ready.set()
        self._wake.set()

    def _kick_all(self) -> None:
        for vcpu, thread in zip(self._vcpus, self._threads):
            run = vcpu.run
            if run is not None:
                run.immediate_exit = 1
            if thread.ident is not None and thread.is_alive() and thread is not threading.current_thread():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass  # the thread ended meanwhile

    def _halted(self) -> bool:
        return self._halting

    def _serial_tx_interrupts(self, enabled: bool) -> None:
        if enabled:
            self._coalesce_console(False)  # at once: each write must raise its interrupt
        else:
            self._tx_interrupts_off_at = time.monotonic()  # on again later, from _service_ring

    def _service_ring(self) -> None:
        """The controller's periodic work: play what KVM queued, and re-arm coalescing when it may."""
        ring = self._ring
        if ring is None:
            return
        if ring.pending():
            ring.drain()
        if (not self._coalescing and not self.devices.serial.tx_interrupts
                and time.monotonic() - self._tx_interrupts_off_at >= COALESCE_REARM_SEC):
            self._coalesce_console(True)

    def _played(self, write: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
        """`write` for the ring's console writes, noting them: the controller follows the start of a burst."""
        def played(addr: int, length: int, value: int) -> None:
            now = time.monotonic()
            if now - self._console_played_at >= RING_DRAIN_SEC:
                self._console_burst_at = now
                self._wake.set()  # the controller may be in a quiet console's longer wait
            self._console_played_at = now
            write(addr, length, value)

        return played

    def _coalesce_console(self, on: bool) -> None:
        """Let KVM queue the guest's console THR writes (COM1, the arm64 UART) in the coalesced ring (on), or exit for each.

        A verbose Linux boot writes its log a byte at a time, each byte a read
        of LSR and a write of THR: two exits. While the guest polls the
        transmitter (its printk console), the write needs no exit of its own:
        the next LSR read plays it first. With the transmit interrupt on, every
        write must be seen at once, so the serial port turns this off then.
        """
        vm = self._vm
        if not self._ring_page or vm is None:
            return
        with self._coalesce_lock:
            if on == self._coalescing or vm.fd < 0:
                return
            try:
                self.board.coalesce_console(vm, on)
            except OSError as e:
                log.debug("%s: coalescing the console's writes %s: %s", self.config.vm_id, "on" if on else "off", e)
                return
            self._coalescing = on

    def _outcome(self) -> _Event:
        """What ends this boot: the guest's final event, else the host's stop, else the guest's reset."""
        with self._lock:
            event, stop = self._event, self._stop
        if stop is not None and (event is None or event.reset):
            return stop
        assert event is not None  # _event_ready is set only once one of them is
        return event

    def _control(self) -> None:
        try:
            while True:
                stop = self._stop
                if stop is not None:  # came while the last boot was reset, or before start()
                    self._finish(stop.code, stop.reason)
                    return
                self._boot()
                while not self._event_ready.is_set():
                    now = time.monotonic()
                    following = (now - self._console_burst_at < RING_DRAIN_SEC
                                 and now - self._console_played_at < 2 * RING_FOLLOW_SEC)
                    self._wake.wait(RING_FOLLOW_SEC if following else RING_DRAIN_SEC)
                    self._wake.clear()  # _event_ready is set before _wake: checked again below
                    if self._event_ready.is_set():
                        break
                    self._service_ring()
                    self._service_snapshots()
                self._teardown()
                event = self._outcome()
                if not event.reset:
                    self._finish(event.code, event.reason)
                    return
                self._reset_log.info("%s: %s, booting again", self.config.vm_id, event.reason)
                self._report_boot = event.by_host or self._reset_reports.allow()
                if self._report_boot:
                    missed = self._reset_reports.take_pending()
                    self._set_state(VmState.REBOOTING, event.reason if not missed else
                                    "%s (%d more resets not reported)" % (event.reason, missed))
                self.memory.clear()
                for dev in self.devices.all():
                    dev.reset()
                with self._lock:
                    self._event = None
                    if self._stop is None:  # else the loop's first step ends the machine
                        self._halting = False
                        self._event_ready.clear()
        except (MachineError, BoardError) as e:
            log.error("%s: %s", self.config.vm_id, e)
            self._teardown()
            self._finish(ExitCode.USAGE, str(e))
        except Exception as e:  # the worker's last line of defence: report, never hang
            log.exception("%s: internal error", self.config.vm_id)
            self._teardown()
            self._finish(ExitCode.ERROR, "internal error: %s" % e)

    def _boot(self) -> None:
        self.boots += 1
        snapshot, self._snapshot = self._snapshot, None  # only the first boot starts from it
        if snapshot is None and self.kernel is None:
            raise MachineError("the guest reset, and there is no kernel to boot: the VM was restored "
                               "from a snapshot without --kernel")
        vm = self.board.create_vm(self.kvm, self.memory)
        self._vm = vm
        vcpus: List[Vcpu] = []
        self._vcpus = vcpus  # filled in place: a failure halfway still closes those made
        if snapshot is not None:
            try:
                for i in range(self.config.cpus):
                    vcpus.append(vm.create_vcpu(i))
                self._load_snapshot(vm, vcpus, snapshot.state)
            finally:
                snapshot.close()  # the RAM mapping stays; the file is no longer needed
            self._new_generation()
        else:
            try:
                info = self.board.load_guest(self.memory, self.kernel, self.initrd, self.cmdline, self.config.cpus)
            except KernelError as e:
                raise MachineError(str(e)) from None
            for i in range(self.config.cpus):
                vcpus.append(vm.create_vcpu(i))
            self.board.setup_vcpus(vm, vcpus, info)
        if self._ring_page:
            start = self._ring_page * mmap.PAGESIZE
            page = memoryview(vcpus[0].run_mem)[start : start + mmap.PAGESIZE]
            self._ring = CoalescedRing(page, self._played(self.pio.write), self._played(self.mmio.write))
            self._coalescing = False
            self._tx_interrupts_off_at = 0.0
            self._coalesce_console(not self.devices.serial.tx_interrupts)
        self._threads = [
            threading.Thread(target=self._vcpu_main, args=(v,), name="vcpu%d" % v.index, daemon=True) for v in vcpus
        ]
        for t in self._threads:
            t.start()
        if self._report_boot:
            self._set_state(VmState.RUNNING, "boot %d" % self.boots)

    def _vcpu_main(self, vcpu: Vcpu) -> None:
        try:
            while True:
                outcome = run_vcpu(vcpu, self.pio, self.mmio, self._halted, self._ring, self._paused)
                if outcome.kind != "paused":
                    break
                self._park()
                vcpu.run.immediate_exit = 0  # a stop meanwhile is seen by run_vcpu's halted() first
        except Exception as e:
            log.exception("%s: vcpu%d failed", self.config.vm_id, vcpu.index)
            self._end(ExitCode.ERROR, "vcpu%d: %s" % (vcpu.index, e))
            return
        if outcome.kind == "halted":
            return
        self._vcpu_outcome(vcpu, outcome)

    def _vcpu_outcome(self, vcpu: Vcpu, outcome: ExitOutcome) -> None:
        if outcome.kind == "system_event":
            kind = int(outcome.detail)
            if kind == kc.SYSTEM_EVENT_RESET:
                self._end(ExitCode.POWEROFF, "guest reset", reset=True)
            elif kind == kc.SYSTEM_EVENT_CRASH:
                log.error("%s: guest crashed; %s", self.config.vm_id, self.board.describe_vcpu(vcpu))
                self._end(ExitCode.GUEST_CRASH, "guest crashed")
            else:
                self._end(ExitCode.POWEROFF, "guest powered off")
            return
        state = self.board.describe_vcpu(vcpu)
        if outcome.kind == "shutdown":
            log.error("%s: guest triple fault; %s", self.config.vm_id, state)
            self._end(ExitCode.TRIPLE_FAULT, "guest triple fault at rip %s" % self.board.fault_address(state))
            return
        log.error("%s: %s: %s; %s", self.config.vm_id, outcome.kind.replace("_", " "), outcome.detail, state)
        self._end(ExitCode.KVM_ERROR, "%s: %s" % (outcome.kind.replace("_", " "), outcome.detail))

    # Snapshots -------------------------------------------------------------

    def _paused(self) -> bool:
        return self._pausing

    def _park(self) -> None:
        """A vCPU thread at an instruction boundary waits here until the snapshot is taken."""
        with self._park_cond:
            self._parked += 1
            self._park_cond.notify_all()
        self._resume.wait()
        with self._park_cond:
            self._parked -= 1
            self._park_cond.notify_all()

    def _pause_vcpus(self) -> None:
        """Every running vCPU parked (MachineError if one does not within VCPU_JOIN_SEC)."""
        with self._park_cond:
            self._resume.clear()
            self._pausing = True
        self._kick_all()
        deadline = time.monotonic() + VCPU_JOIN_SEC
        with self._park_cond:
            while self._parked < sum(1 for t in self._threads if t.is_alive()):
                if self._halting or time.monotonic() > deadline:
                    self._resume_vcpus_locked()
                    raise MachineError("the vCPUs did not pause%s" % (": the guest is stopping" if self._halting else ""))
                self._park_cond.wait(0.01)
                self._kick_all()

    def _resume_vcpus_locked(self) -> None:
        """Let the parked vCPUs go, and wait until each has left the park: a pause right after
        this one must not count a vCPU that is still on its way out as parked again."""
        self._pausing = False
        self._resume.set()
        deadline = time.monotonic() + VCPU_JOIN_SEC
        while self._parked and time.monotonic() < deadline:
            self._park_cond.wait(0.01)

    def _resume_vcpus(self) -> None:
        with self._park_cond:
            self._resume_vcpus_locked()

    def _service_snapshots(self) -> None:
        while True:
            req = self._next_snapshot_request()
            if req is None:
                return
            try:
                result = self._take_snapshot(req)
            except MachineError as e:
                result = SnapshotDone("snapshot %s not taken: %s" % (req.path, e), True, req.path)
            req.done(result)

    def _take_snapshot(self, req: SnapshotRequest) -> SnapshotDone:
        """Save the machine and its RAM to `req.path`, move the disks to their overlays; the vCPUs
        stand still only for the last pass (see _save_live)."""
        from tenbox_vmm.snapshot import SnapshotError
        from tenbox_vmm.snapshot.machine_state import check_kvm

        if not self.board.snapshots:
            raise MachineError("snapshots are not available on %s hosts yet" % self.board.arch)
        vm = self._vm
        if vm is None:
            raise MachineError("the guest is not running")
        blk = self._blk_devices()
        if len(req.overlays) > len(blk):
            raise MachineError("%d overlays for %d disks" % (len(req.overlays), len(blk)))
        try:
            check_kvm(self.kvm)
        except SnapshotError as e:
            raise MachineError(str(e)) from None
        started = time.monotonic()
        size, paused_ms, passes = self._save_live(vm, req, blk)
        took_ms = (time.monotonic() - started) * 1000
        log.info("%s: snapshot %s written (%d MiB file)", self.config.vm_id, req.path, size >> 20)
        return SnapshotDone("snapshot %s written: %d MiB of RAM, %d vCPUs, guest paused %.0f ms (saved in %.0f ms; "
                            "passes over RAM: %s MiB)" % (req.path, self.memory.size >> 20, self.config.cpus, paused_ms,
                                                          took_ms, ", ".join("%.1f" % (n / MIB) for n in passes)),
                            False, req.path, size, paused_ms)

    def _save_live(self, vm: Vm, req: SnapshotRequest, blk: list) -> Tuple[int, float, List[int]]:
        """Write RAM while the vCPUs and the devices run, then the pages they wrote meanwhile, pass after
        pass; stop the devices and pause the vCPUs for the last pass, the machine state and the disks' move.
        (file size, ms paused, bytes of each pass)

        Pre-copy, as a live migration does: KVM logs the pages the guest writes, and the virtqueues mark
        the buffers the devices fill (queue.WriteLog; the devices are stopped while the marking starts,
        so none is under way unmarked). The passes stop once one finds at most PRECOPY_FINAL_BYTES written, finds
        nearly as many as the one before (a guest that writes faster than the file takes it), or after
        PRECOPY_PASSES. The last pass adds every live queue's used ring, the devices' own bookkeeping.
        """
        from tenbox_vmm.devices.virtio.queue import WriteLog, byte_runs
        from tenbox_vmm.snapshot import SnapshotError, cpu_model
        from tenbox_vmm.snapshot.fileformat import RAM_CHUNK, SnapshotWriter, live_ram_offset, pack_state
        from tenbox_vmm.snapshot.machine_state import capture

        ram = memoryview(self.memory.host_buffer).cast("B")
        slots = self.memory.slots()
        wlog = WriteLog(self.memory)
        page = mmap.PAGESIZE

        def dirtied() -> List[Tuple[int, int]]:
            """(offset, bytes) of the RAM written since the last call, by the vCPUs or the devices."""
            runs = []
            for slot, (_, _, offset) in enumerate(slots):
                runs += [(offset + first * page, n * page) for first, n in bitmap_runs(vm.dirty_pages(slot))]
            runs += [(first * page, n * page) for first, n in byte_runs(wlog.take())]
            return runs

        try:
            out = SnapshotWriter(req.path, len(ram), live_ram_offset(self.config.cpus), req.dir_fd, req.publish)
        except SnapshotError as e:
            raise MachineError(str(e)) from None
        try:
            try:
                for t in self.virtio:
                    t.pause()  # between two batches: no chain under way when the marking starts
                    t.track_writes(wlog)
                vm.log_dirty_pages(True)
                for t in self.virtio:
                    t.resume()
                # The first pass: all of it, its zeros left as holes; what was never written is not even read.
                data = self.memory.data_chunks(RAM_CHUNK)
                out.write_ram(ram, data=data)
                passes = [len(ram) if data is None else min(len(ram), data.count(1) * RAM_CHUNK)]
                pending = dirtied()
                while len(passes) < PRECOPY_PASSES:
                    total = sum(n for _, n in pending)
                    if total <= PRECOPY_FINAL_BYTES:
                        break
                    for offset, n in pending:
                        out.write_ram(ram, offset, offset + n, holes=False)
                    passes.append(total)
                    pending = dirtied()
                    if sum(n for _, n in pending) * 4 > total * 3:  # not a quarter fewer: it will not converge
                        break
                out.sync()  # the passes' pages reach the disk while the guest runs: the last sync is short
                for t in self.virtio:
                    t.pause()  # between two batches: every chain taken is back in its used ring
                paused = time.monotonic()
                self._pause_vcpus()
                try:
                    if self._ring is not None:
                        self._ring.drain()  # console bytes KVM queued belong before the snapshot
                    pending += dirtied()
                    for t in self.virtio:
                        pending += [(self.memory.offset(gpa, n), n) for gpa, n in t.used_rings()]
                    for offset, n in pending:
                        out.write_ram(ram, offset, offset + n, holes=False)
                    passes.append(sum(n for _, n in pending))
                    state = capture(vm, self._vcpus, self.board.supported_msrs, self.devices.by_name(), self.virtio)
                    size = out.finish(cpu_model.describe(self.board.supported_cpuid), self.config.cpus,
                                      pack_state(state))
                    self._switch_disks(blk, req.dir_fd, req.overlays)  # the guest's next write goes to the overlay
                finally:
                    self._resume_vcpus()
                return size, (time.monotonic() - paused) * 1000, passes
            except (SnapshotError, OSError) as e:
                raise MachineError(str(e)) from None
            finally:
                for t in self.virtio:
                    t.pause()  # already, unless a pass failed
                    t.track_writes(None)
                    t.resume()
                try:
                    vm.log_dirty_pages(False)
                except OSError as e:
                    log.warning("%s: KVM's dirty log stays on: %s", self.config.vm_id, e.strerror)
        except BaseException:
            out.abort()
            raise

    def _blk_devices(self) -> list:
        from tenbox_vmm.devices.virtio.blk import VirtioBlk

        return [t.device for t in self.virtio if isinstance(t.device, VirtioBlk)]

    def _switch_disks(self, blk: list, dir_fd: Optional[int], overlays: Sequence[Optional[str]]) -> None:
        """Move each disk that has an overlay onto it, its image becoming the overlay's backing (paused).

        All or none: every overlay is opened and checked before the first disk moves.
        """
        from tenbox_vmm import passed_files
        from tenbox_vmm.disk import DiskError
        from tenbox_vmm.disk.qcow2.image import Qcow2Disk

        wanted = [(dev, name) for dev, name in zip(blk, overlays) if name is not None]
        if not wanted:
            return
        if dir_fd is None:
            raise MachineError("disk overlays need a snapshot folder")
        opened: list = []
        try:
            for dev, name in wanted:
                old = dev.disk
                if getattr(old, "format", None) != "qcow2" or old.read_only:
                    raise MachineError("disk %s is not a writable qcow2 image: it cannot get an overlay" % old.path)
                old.flush()  # everything the guest wrote so far is in the layer
                label = "%s (overlay)" % name  # a name for messages: the file is reached through dir_fd
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
                passed_files.add(label, fd)
                new = Qcow2Disk(label, False, open_backing=lambda _name, _fmt, old=old: old)
                opened.append((dev, new))
                if new.size != old.size:
                    raise MachineError("overlay %s is %d bytes, its disk %d" % (name, new.size, old.size))
        except (OSError, DiskError, MachineError) as e:
            for _, new in opened:
                new.backing = None  # the old image stays the device's
                new.close()
            if isinstance(e, MachineError):
                raise
            raise MachineError("cannot open a disk overlay: %s" % (getattr(e, "strerror", None) or e)) from None
        for dev, new in opened:
            dev.swap_backend(new).freeze()  # read-only from here: clones may open it beside us

    def _new_generation(self) -> None:
        """A restored guest is a new generation (the board's vmgenid: x86_64/board.py)."""
        self.board.new_generation(self.memory, self._vm)

    def _load_snapshot(self, vm: Vm, vcpus: List[Vcpu], state: dict) -> None:
        """Put a checked snapshot's state into the new VM and the devices, before any vCPU runs."""
        from tenbox_vmm.snapshot.machine_state import restore_kvm

        try:
            restore_kvm(vm, vcpus, state)
        except (OSError, ValueError) as e:
            raise MachineError("%s: KVM refused the snapshot's state: %s" % (self.config.restore, e)) from None
        for name, dev in self.devices.by_name().items():
            dev.load_state(state["legacy"][name])
        for t, rec in zip(self.virtio, state["virtio"]):
            t.load_state(rec)

    def _teardown(self) -> None:
        with self._lock:
            self._halting = True
        self._kick_all()
        deadline = time.monotonic() + VCPU_JOIN_SEC
        for t in self._threads:
            while t.is_alive():
                t.join(0.05)
                if t.is_alive():
                    self._kick_all()
                if time.monotonic() > deadline:
                    log.error("%s: %s did not stop", self.config.vm_id, t.name)
                    break
        self._threads = []
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.drain()  # the console's last bytes
            ring.release()
        for transport in self.virtio:
            transport.reset()  # stops its I/O thread and unwires it from this VM
        vm, self._vm = self._vm, None
        for v in self._vcpus:
            v.close()
        self.board.end_boot()
        if vm is not None:
            vm.close()

    def _finish(self, code: ExitCode, reason: str) -> None:
        for transport in self.virtio:
            try:
                transport.close()  # flushes disk metadata, releases image locks
            except Exception:
                log.exception("%s: closing virtio-%s failed", self.config.vm_id, transport.device.name)
        self.exit_code = code
        self.exit_reason = reason
        state = VmState.STOPPED if code in (ExitCode.POWEROFF, ExitCode.STOPPED) else VmState.CRASHED
        self._set_state(state, reason)
        with self._lock:  # a callback added from here on is called at once (add_done_callback)
            self._done.set()
            callbacks = list(self._done_callbacks)
        self._settled.set()
        self._refuse_snapshots("the VM has stopped")  # every request is answered, once
        for cb in callbacks:
            cb()

    def close(self) -> None:
        self._close_snapshot()
        self.memory.close()
        self.kvm.close()

