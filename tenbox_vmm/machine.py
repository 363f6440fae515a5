"""One virtual machine: build it from a config, run its vCPUs, stop, reboot, power off (worker).

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
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.arch.x86_64 import acpi, board, boot
from tenbox_vmm.arch.x86_64 import layout as L
from tenbox_vmm.devices.virtio.mmio import MmioHost, VirtioMmio
from tenbox_vmm.arch.x86_64.vcpu_loop import ExitOutcome, run_vcpu
from tenbox_vmm.devices.bus import MmioBus, PioBus
from tenbox_vmm.guest_log import Budget, GuestLog
from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Kvm, KvmUnavailable, Vcpu, Vm
from tenbox_vmm.kvm.coalesced import CoalescedRing
from tenbox_vmm.memory import MIB, GuestMemory
from tenbox_vmm.protocol import ExitCode, Limits, VmState
from tenbox_vmm.protocol.disk_arg import DiskArg
from tenbox_vmm.protocol.link import NetStatus, WorkerStats

log = logging.getLogger("tenbox.machine")

INITRD_MAX_BYTES = 2 << 30
KICK_SIGNAL = signal.SIGUSR1
VCPU_JOIN_SEC = 5.0
# Console bytes KVM queued without an exit (see _coalesce_console) reach the
# console at the guest's next exit, or after this long if it only halts.
RING_DRAIN_SEC = 0.02
# Turning coalescing on or off costs KVM an SRCU grace period (4 ms measured on
# the development machines). The transmit interrupt turns it off at once;
# it comes back on only once the interrupt has stayed off this long, so a
# guest that alternates printk and tty output does not pay that per line.
COALESCE_REARM_SEC = 0.25

DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=k panic=1 pci=off nomodeset "
    "tsc=reliable no_timer_check io_delay=none random.trust_cpu=on"
)


class MachineError(Exception):
    """The configuration cannot make a machine; the message is for the operator."""


class NetSpec(NamedTuple):
    mac: str = "52:54:00:12:34:56"
    hostfwds: Tuple[str, ...] = ()
    guestfwds: Tuple[str, ...] = ()
    link_up: bool = True


class MachineConfig(NamedTuple):
    kernel: str
    initrd: Optional[str] = None
    cmdline: str = DEFAULT_CMDLINE
    memory_mb: int = Limits.MEMORY_DEFAULT_MB
    cpus: int = 1
    vm_id: str = "vm"
    disks: Tuple[DiskArg, ...] = ()
    net: Optional[NetSpec] = None


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
        self.config = config
        self._on_state = on_state
        # Cheap checks first: a bad file or option must be reported as such,
        # not hidden behind a missing /dev/kvm.
        check_limits(config.memory_mb, config.cpus)
        self.memory = GuestMemory(config.memory_mb * MIB)
        try:
            self.kernel = boot.load_kernel(config.kernel, self.memory.ram_end_below_4g())
            self.cmdline = boot.check_cmdline(self.kernel, config.cmdline)
            self.initrd = None
            if config.initrd:
                self.initrd = boot.read_file(config.initrd, "initrd", INITRD_MAX_BYTES)
                boot.place_initrd(self.kernel, len(self.initrd), self.memory.ram_end_below_4g())
            self.kvm = kvm or Kvm()
            check_limits(config.memory_mb, config.cpus, self.kvm.max_vcpus())
            disks = self._open_disks(config.disks)
            self.nic = self._make_nic(config.net) if config.net else None
        except (boot.KernelError, KvmUnavailable, MachineError) as e:
            self.memory.close()
            raise MachineError(str(e)) from None
        self._supported_cpuid = self.kvm.supported_cpuid()
        self._supported_msrs = self.kvm.msr_index_list()
        self._tsc_deadline = bool(self.kvm.check_extension(kc.CAP_TSC_DEADLINE_TIMER))
        self._ring_page = self.kvm.coalesced_ring_page()
        self._ring: Optional[CoalescedRing] = None
        self._coalescing = False
        self._coalesce_lock = threading.Lock()
        self._tx_interrupts_off_at = 0.0  # monotonic time the guest last turned the transmit interrupt off

        self.pio = PioBus()
        self.mmio = MmioBus()
        self._vm: Optional[Vm] = None
        self.devices = board.build_legacy_devices(
            self.pio,
            self._irq_line,
            console_output,
            on_poweroff=lambda: self._end(ExitCode.POWEROFF, "guest powered off"),
            on_reset=lambda: self._end(ExitCode.POWEROFF, "guest reset", reset=True),
            on_serial_tx_interrupts=self._serial_tx_interrupts,
        )
        self.acpi_devices: List[acpi.AcpiDevice] = [acpi.com1_device()]
        self.virtio: List[VirtioMmio] = []
        for disk, spec in zip(disks, config.disks):
            from tenbox_vmm.devices.virtio.blk import VirtioBlk
            from tenbox_vmm.devices.virtio.blk_io import runner_for

            self.add_virtio(VirtioBlk(disk, spec.serial, runner_for(disk)))
        if self.nic is not None:
            self.add_virtio(self.nic.device)

        self._lock = threading.Lock()
        self._event: Optional[_Event] = None  # what the guest (or a vCPU failure) reported first
        self._stop: Optional[_Event] = None  # the host's stop: never cleared, never overridden
        self._event_ready = threading.Event()
        self._halting = False
        self._vcpus: List[Vcpu] = []
        self._threads: List[threading.Thread] = []
        self._controller: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._done_callbacks: List[Callable[[], None]] = []
        # A guest that resets itself in a loop decides how often the state changes: each
        # change is a line in tenboxd's log, a write of runtime.json and an event to every
        # watcher. Beyond the budget a reset cycle is not reported (the VM stays running).
        self._reset_reports = Budget()
        self._reset_log = GuestLog(log, "%s: guest resets" % config.vm_id)
        self._report_boot = True  # whether the boot in progress says RUNNING
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
        """Put a virtio device on the next virtio-mmio slot, with its DSDT entry."""
        index = len(self.virtio)
        if index >= L.VIRTIO_MAX_DEVICES:
            raise MachineError("at most %d virtio devices" % L.VIRTIO_MAX_DEVICES)
        base = L.VIRTIO_MMIO_BASE + index * L.VIRTIO_MMIO_STRIDE
        gsi = L.VIRTIO_GSI_BASE + index
        transport = VirtioMmio(device, self.memory, _SlotHost(self, base, gsi))
        self.mmio.register(base, L.VIRTIO_MMIO_SIZE, transport)
        self.acpi_devices.append(acpi.virtio_mmio_device(index, base, L.VIRTIO_MMIO_SIZE, gsi))
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

    def reboot(self) -> None:
        """Reset the guest as the reset button would."""
        self._end(ExitCode.POWEROFF, "reset by the host", reset=True, by_host=True)

    def power_button(self) -> None:
        """Press the ACPI power button; a guest that handles it powers off."""
        self.devices.pm.press_power_button()

    def console_input(self, data: bytes) -> int:
        return self.devices.serial.receive(data)

    def console_space(self) -> int:
        return self.devices.serial.rx_space()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        self._done_callbacks.append(callback)

    def wait(self, timeout: Optional[float] = None) -> Optional[ExitCode]:
        self._done.wait(timeout)
        return self.exit_code

    def exits(self) -> int:
        return sum(v.exits for v in self._vcpus)

    # Internals -------------------------------------------------------------

    def _set_state(self, state: VmState, reason: str) -> None:
        self.state = state
        self._on_state(state, reason)

    def _irq_line(self, irq: int, level: int) -> None:
        vm = self._vm
        if vm is not None and vm.fd >= 0:
            vm.irq_line(irq, level)

    def _end(self, code: ExitCode, reason: str, reset: bool = False, by_host: bool = False) -> None:
        """Record what ends this boot (the first report wins, and none after a stop) and kick every vCPU."""
        with self._lock:
            if self._event is not None or self._stop is not None:
                return
            self._event = _Event(code, reason, reset, by_host)
            self._halting = True
        self._kick_all()
        self._event_ready.set()

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

    def _coalesce_console(self, on: bool) -> None:
        """Let KVM queue the guest's COM1 THR writes in the coalesced ring (on), or exit for each.

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
                vm.coalesce_pio(board.COM1_PORT, 1, on)
            except OSError as e:
                log.debug("%s: coalescing COM1 writes %s: %s", self.config.vm_id, "on" if on else "off", e)
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
                while not self._event_ready.wait(RING_DRAIN_SEC):
                    self._service_ring()
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
        except MachineError as e:
            log.error("%s: %s", self.config.vm_id, e)
            self._teardown()
            self._finish(ExitCode.USAGE, str(e))
        except Exception as e:  # the worker's last line of defence: report, never hang
            log.exception("%s: internal error", self.config.vm_id)
            self._teardown()
            self._finish(ExitCode.ERROR, "internal error: %s" % e)

    def _boot(self) -> None:
        self.boots += 1
        vm = board.create_vm(self.kvm, self.memory)
        self._vm = vm
        try:
            info = board.load_guest(self.memory, self.kernel, self.initrd, self.cmdline, self.config.cpus, self.acpi_devices)
        except boot.KernelError as e:
            raise MachineError(str(e)) from None
        vcpus = []
        for i in range(self.config.cpus):
            vcpu = vm.create_vcpu(i)
            vcpus.append(vcpu)
            board.setup_vcpu(vcpu, self.config.cpus, self._supported_cpuid, self._supported_msrs, info,
                             self._tsc_deadline)
        self._vcpus = vcpus
        if self._ring_page:
            start = self._ring_page * mmap.PAGESIZE
            page = memoryview(vcpus[0].run_mem)[start : start + mmap.PAGESIZE]
            self._ring = CoalescedRing(page, self.pio.write, self.mmio.write)
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
            outcome = run_vcpu(vcpu, self.pio, self.mmio, self._halted, self._ring)
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
                log.error("%s: guest crashed; %s", self.config.vm_id, board.describe_vcpu(vcpu))
                self._end(ExitCode.GUEST_CRASH, "guest crashed")
            else:
                self._end(ExitCode.POWEROFF, "guest powered off")
            return
        state = board.describe_vcpu(vcpu)
        if outcome.kind == "shutdown":
            log.error("%s: guest triple fault; %s", self.config.vm_id, state)
            self._end(ExitCode.TRIPLE_FAULT, "guest triple fault at rip %s" % _rip(state))
            return
        log.error("%s: %s: %s; %s", self.config.vm_id, outcome.kind.replace("_", " "), outcome.detail, state)
        self._end(ExitCode.KVM_ERROR, "%s: %s" % (outcome.kind.replace("_", " "), outcome.detail))

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
        self._done.set()
        for cb in self._done_callbacks:
            cb()

    def close(self) -> None:
        self.memory.close()
        self.kvm.close()


def _rip(state: str) -> str:
    for part in state.split():
        if part.startswith("rip="):
            return part[4:]
    return "?"
