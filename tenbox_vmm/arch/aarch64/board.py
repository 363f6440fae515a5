"""An arm64 machine booted to its console: RAM, vCPUs, the vGIC, the UART, the kernel and its device tree (worker).

The arm64 counterpart of what machine.py and arch/x86_64 do for x86-64,
as far as issue 17 has come: `Arm64Board` builds the VM (guest RAM at
layout.RAM_START, the vCPUs and the vGIC of cpu.py, the Image and initrd
where image.plan() puts them, fdt.py's tree), serves the console UART (the
16550 model x86 uses on port I/O, here on MMIO with reg-shift 0, its
interrupt an SPI through KVM_IRQ_LINE) and runs one thread per vCPU until
the guest's PSCI SYSTEM_OFF, SYSTEM_RESET or a crash. Secondary vCPUs wait
in KVM for PSCI CPU_ON: KVM runs the guest's PSCI itself.

Not here yet (machine.py's controller does it for x86-64, and is where
this goes next): reboot in the same process, a host stop, virtio devices
and the PL031 the tree can describe, snapshots.
"""

from __future__ import annotations

import mmap
import os
import signal
import threading
from typing import Callable, List, NamedTuple, Optional

from tenbox_vmm.arch.aarch64 import cpu, fdt, image
from tenbox_vmm.arch.aarch64 import layout as L
from tenbox_vmm.devices.bus import MmioBus
from tenbox_vmm.devices.serial import Serial16550
from tenbox_vmm.kernel_kind import KernelError, read_file
from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Kvm, Vcpu

INITRD_MAX_BYTES = 2 << 30
ARM_IRQ_TYPE_SPI = 1  # KVM_IRQ_LINE's irq field: type << 24 | vcpu << 16 | number
GIC_SPI_BASE = 32  # SPI n is the GIC's interrupt 32 + n
KICK_SIGNAL = signal.SIGUSR1
EVENTS = {kc.SYSTEM_EVENT_SHUTDOWN: "poweroff", kc.SYSTEM_EVENT_RESET: "reset", kc.SYSTEM_EVENT_CRASH: "crash"}


class BoardConfig(NamedTuple):
    kernel: str
    initrd: Optional[str] = None
    cmdline: str = "console=ttyS0 panic=-1"
    cpus: int = 1
    memory_mb: int = 256
    gic: str = "auto"  # "v3", "v2", or the best the host has


class Arm64Board:
    """One boot of an arm64 guest; `run()` returns how it ended ("poweroff", "reset", "crash")."""

    def __init__(self, config: BoardConfig, output: Callable[[bytes], None]) -> None:
        self.config = config
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.ram_bytes = config.memory_mb * L.MIB
        self.ram = mmap.mmap(-1, self.ram_bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.vm.map_memory(0, L.RAM_START, self.ram, 0, self.ram_bytes)
        self.gic = ""  # the version, once the vGIC exists
        self.bus = MmioBus()
        self.serial = Serial16550(self._uart_irq, output)
        self.bus.register(L.UART, L.UART_SIZE, self.serial)
        self.vcpus: List[Vcpu] = []
        self._ended = threading.Event()
        self._how = ""
        self._threads: List[threading.Thread] = []

    def _uart_irq(self, level: int) -> None:
        if self.gic:  # the line stays low until the vGIC exists
            self.vm.irq_line((ARM_IRQ_TYPE_SPI << 24) | (GIC_SPI_BASE + L.UART_SPI), level)

    def build(self) -> None:
        """Load the kernel, initrd and tree; make the vCPUs and the vGIC (KernelError, GicError, FdtError)."""
        c = self.config
        img = image.parse_image(c.kernel, read_file(c.kernel, "kernel"))
        initrd = read_file(c.initrd, "initrd", INITRD_MAX_BYTES) if c.initrd else b""
        plan = image.plan(img, self.ram_bytes, len(initrd))
        self._put(plan.kernel, img.data)
        if initrd:
            self._put(plan.initrd, initrd)
        target = self.vm.arm_preferred_target()
        self.vcpus = [self.vm.create_vcpu(i) for i in range(c.cpus)]
        for vcpu in self.vcpus:
            cpu.init_vcpu(vcpu, target)
        gics = cpu.supported_gics(self.vm)
        gic = c.gic if c.gic != "auto" else (gics[0] if gics else "v3")
        cpu.create_gic(self.vm, gic, c.cpus)
        self.gic = gic
        blob = fdt.build(fdt.FdtConfig(cpus=c.cpus, ram_bytes=self.ram_bytes, cmdline=c.cmdline, gic=gic,
                                       initrd=(plan.initrd, plan.initrd_end) if initrd else None,
                                       uart="ns16550a", rtc=False, rng_seed=os.urandom(fdt.RNG_SEED_BYTES)))
        self._put(plan.fdt, blob)
        cpu.set_boot_regs(self.vcpus[0], plan.kernel, plan.fdt)

    def _put(self, gpa: int, data: bytes) -> None:
        offset = gpa - L.RAM_START
        if offset < 0 or offset + len(data) > self.ram_bytes:
            raise KernelError("%d bytes at %#x do not fit in the guest's RAM" % (len(data), gpa))
        self.ram[offset:offset + len(data)] = data

    def run(self, timeout: Optional[float] = None) -> str:
        """Run every vCPU until the guest powers off, resets or crashes; "" if `timeout` passed first."""
        signal.signal(KICK_SIGNAL, lambda signo, frame: None)  # only to break KVM_RUN with EINTR
        for vcpu in self.vcpus:
            t = threading.Thread(target=self._vcpu_loop, args=(vcpu,), name="vcpu%d" % vcpu.index, daemon=True)
            t.start()
            self._threads.append(t)
        self._ended.wait(timeout)
        for vcpu in self.vcpus:
            vcpu.run.immediate_exit = 1
        for t in self._threads:
            while t.is_alive():
                signal.pthread_kill(t.ident, KICK_SIGNAL)
                t.join(0.05)
        return self._how

    def _end(self, how: str) -> None:
        if not self._ended.is_set():
            self._how = how
            self._ended.set()

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        run = vcpu.run
        try:
            while not self._ended.is_set():
                if not vcpu.run_once():
                    continue
                reason = run.exit_reason
                if reason == kc.EXIT_MMIO:
                    m = run.mmio
                    if m.is_write:
                        self.bus.write(m.phys_addr, m.len, int.from_bytes(bytes(m.data[0:m.len]), "little"))
                    else:
                        value = self.bus.read(m.phys_addr, m.len)
                        m.data[0:m.len] = list(value.to_bytes(m.len, "little"))
                elif reason == kc.EXIT_SYSTEM_EVENT:
                    self._end(EVENTS.get(run.system_event.type, "crash"))
                else:
                    self._end("crash: KVM exit %s" % kc.EXIT_NAMES.get(reason, reason))
        except OSError as e:
            self._end("crash: %s" % e)
