"""The x86-64 board: legacy devices on their ports, guest RAM contents at boot, vCPU setup (worker).

`PcBoard` is what machine.py runs on an x86-64 host (the interface is arch/__init__.py's).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, NamedTuple, Optional, Sequence

from tenbox_vmm.arch import Board
from tenbox_vmm.arch.x86_64 import acpi, boot, cpu
from tenbox_vmm.arch.x86_64 import layout as L
from tenbox_vmm.devices.acpi_pm import PM1A_EVT_BLK, PM_BLOCK_LEN, RESET_PORT, SCI_IRQ, AcpiPm, ResetControl
from tenbox_vmm.devices.bus import PioBus
from tenbox_vmm.devices.debug_port import DebugPort
from tenbox_vmm.devices.i8042 import I8042
from tenbox_vmm.devices.rtc import CmosRtc
from tenbox_vmm.devices.serial import Serial16550
from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Kvm, Vcpu, Vm
from tenbox_vmm.memory import GuestMemory, ram_regions

log = logging.getLogger("tenbox.board")

COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA = 0x60
I8042_STATUS = 0x64
RTC_PORT = 0x70
DEBUG_PORT = 0x80


class LegacyDevices(NamedTuple):
    serial: Serial16550
    i8042: I8042
    rtc: CmosRtc
    pm: AcpiPm
    reset_control: ResetControl
    debug: DebugPort

    def all(self):
        return (self.serial, self.i8042, self.rtc, self.pm, self.reset_control, self.debug)

    def by_name(self) -> dict:
        """Each device under its snapshot record's name (snapshot/records.py LEGACY)."""
        return self._asdict()


def build_legacy_devices(
    pio: PioBus,
    irq_line: Callable[[int, int], None],
    console_output: Callable[[bytes], None],
    on_poweroff: Callable[[], None],
    on_reset: Callable[[], None],
    on_serial_tx_interrupts: Optional[Callable[[bool], None]] = None,
) -> LegacyDevices:
    """Create COM1, the i8042, the CMOS RTC, the ACPI PM block and the reset port on `pio`."""
    devs = LegacyDevices(
        serial=Serial16550(lambda level: irq_line(COM1_IRQ, level), console_output, on_serial_tx_interrupts),
        i8042=I8042(on_reset),
        rtc=CmosRtc(),
        pm=AcpiPm(lambda level: irq_line(SCI_IRQ, level), on_poweroff),
        reset_control=ResetControl(on_reset),
        debug=DebugPort(),
    )
    pio.register(COM1_PORT, 8, devs.serial)
    pio.register(I8042_DATA, 1, devs.i8042, offset=0)
    pio.register(I8042_STATUS, 1, devs.i8042, offset=4)
    pio.register(RTC_PORT, 2, devs.rtc)
    pio.register(DEBUG_PORT, 1, devs.debug)
    pio.register(PM1A_EVT_BLK, PM_BLOCK_LEN, devs.pm)
    pio.register(RESET_PORT, 1, devs.reset_control)
    return devs


def create_vm(kvm: Kvm, memory: GuestMemory) -> Vm:
    """A KVM VM with its RAM, in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT."""
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(L.TSS_ADDR)
        vm.set_identity_map_addr(L.IDENTITY_MAP_ADDR)
        # RAM before the irqchip, as Firecracker orders it: a memory slot added to a VM that has an
        # in-kernel irqchip took 6-11 ms here (64 MiB), before it 0.1 ms.
        for slot, (gpa, size, offset) in enumerate(memory.slots()):
            vm.map_memory(slot, gpa, memory.host_buffer, offset, size)
        vm.create_irqchip()
        vm.create_pit2()
    except BaseException:
        vm.close()
        raise
    return vm


class BootInfo(NamedTuple):
    entry: int
    boot_params: int
    cr3: int
    initrd: Optional[tuple]


def load_guest(
    memory: GuestMemory,
    kernel: boot.KernelImage,
    initrd: Optional[bytes],
    cmdline: bytes,
    cpus: int,
    acpi_devices: Sequence[acpi.AcpiDevice],
) -> BootInfo:
    """Write everything the kernel expects at its 64-bit entry into guest RAM."""
    low_end = memory.ram_end_below_4g()
    for gpa, data in kernel.segments:
        memory.write(gpa, data)
    initrd_range = None
    if initrd:
        addr = boot.place_initrd(kernel, len(initrd), low_end)
        memory.write(addr, initrd)
        initrd_range = (addr, len(initrd))
    memory.write(L.CMDLINE_ADDR, cmdline)
    tables, rsdp = acpi.build(cpus, acpi_devices)
    memory.write(L.ACPI_ADDR, tables)
    memory.write_u16(L.EBDA_POINTER, L.EBDA_ADDR >> 4)
    e820 = boot.e820_map([(r.gpa, r.size) for r in memory.regions])
    memory.write(L.ZERO_PAGE, boot.build_boot_params(kernel, L.CMDLINE_ADDR, initrd_range, e820, rsdp))
    cr3 = cpu.write_page_tables(memory)
    cpu.write_gdt(memory)
    return BootInfo(entry=kernel.entry, boot_params=L.ZERO_PAGE, cr3=cr3, initrd=initrd_range)


def setup_vcpu(
    vcpu: Vcpu,
    cpus: int,
    supported_cpuid: Sequence[dict],
    supported_msrs: Sequence[int],
    info: BootInfo,
    tsc_deadline: bool = False,
) -> None:
    """CPUID, MSRs, FPU and LAPIC for every vCPU; the long-mode entry state for the BSP.

    Application processors stay in KVM's wait-for-SIPI state: the guest
    starts them through its LAPIC, as on hardware.
    """
    vcpu.set_cpuid2(cpu.vcpu_cpuid(supported_cpuid, vcpu.index, cpus, tsc_deadline))
    msrs = cpu.boot_msrs(supported_msrs)
    accepted = vcpu.set_msrs(msrs)
    if accepted != len(msrs):
        log.debug("vcpu%d: KVM accepted %d of %d boot MSRs", vcpu.index, accepted, len(msrs))
    vcpu.set_lapic(cpu.setup_lapic(vcpu.get_lapic()))
    fpu = vcpu.get_fpu()
    cpu.setup_fpu(fpu)
    vcpu.set_fpu(fpu)
    if vcpu.index == 0:
        sregs = vcpu.get_sregs()
        cpu.setup_long_mode_sregs(sregs, info.cr3)
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        cpu.setup_entry_regs(regs, info.entry, info.boot_params)
        vcpu.set_regs(regs)


def describe_vcpu(vcpu: Vcpu) -> str:
    """One line of the vCPU's registers, for the log when a guest dies."""
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except OSError as e:
        return "vcpu%d: registers unavailable (%s)" % (vcpu.index, e)
    return (
        "vcpu%d: rip=%#x rsp=%#x rflags=%#x rax=%#x rbx=%#x rcx=%#x rdx=%#x rsi=%#x rdi=%#x "
        "cs=%#x(l=%d) cr0=%#x cr2=%#x cr3=%#x cr4=%#x efer=%#x"
        % (
            vcpu.index, r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi,
            s.cs.selector, s.cs.l, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
        )
    )



class PcBoard(Board):
    """The x86-64 board behind machine.py (arch/__init__.py's interface)."""

    arch = "x86_64"
    default_cmdline = (
        "console=ttyS0 reboot=k panic=1 pci=off nomodeset "
        "tsc=reliable no_timer_check io_delay=none random.trust_cpu=on"
    )
    snapshots = True
    power_button_help = "ACPI: the guest's button driver (Linux: CONFIG_ACPI_BUTTON) and a power key handler"

    def __init__(self) -> None:
        self.acpi_devices: List[acpi.AcpiDevice] = [acpi.com1_device(),
                                                    *acpi.vmgenid_devices(L.VMGENID_ADDR, L.GED_GSI)]
        # This process's VM generation ID: written at every boot, and over a restored snapshot's
        # (then GED_GSI tells the guest), so that every restore and clone runs as a new generation.
        self.generation_id = os.urandom(L.VMGENID_SIZE)
        self.supported_cpuid: Sequence[dict] = ()
        self.supported_msrs: Sequence[int] = ()
        self.tsc_deadline = False

    def ram_regions(self, size: int) -> list:
        return ram_regions(size)

    def prepare(self, kvm: Kvm, cpus: int) -> None:
        self.supported_cpuid = kvm.supported_cpuid()
        self.supported_msrs = kvm.msr_index_list()
        self.tsc_deadline = bool(kvm.check_extension(kc.CAP_TSC_DEADLINE_TIMER))

    def load_kernel(self, path: str, memory: GuestMemory, cmdline: str, initrd_size: Optional[int]):
        kernel = boot.load_kernel(path, memory.ram_end_below_4g())
        line = boot.check_cmdline(kernel, cmdline)
        if initrd_size is not None:
            boot.place_initrd(kernel, initrd_size, memory.ram_end_below_4g())
        return kernel, line

    def build_devices(self, pio, mmio, irq, console_output, on_poweroff, on_reset, on_serial_tx_interrupts):
        return build_legacy_devices(pio, irq, console_output, on_poweroff, on_reset, on_serial_tx_interrupts)

    def virtio_slot(self, index: int):
        base = L.VIRTIO_MMIO_BASE + index * L.VIRTIO_MMIO_STRIDE
        gsi = L.VIRTIO_GSI_BASE + index
        self.acpi_devices.append(acpi.virtio_mmio_device(index, base, L.VIRTIO_MMIO_SIZE, gsi))
        return base, L.VIRTIO_MMIO_SIZE, gsi

    def max_virtio(self) -> int:
        return L.VIRTIO_MAX_DEVICES

    def create_vm(self, kvm: Kvm, memory: GuestMemory) -> Vm:
        return create_vm(kvm, memory)

    def load_guest(self, memory, kernel, initrd, cmdline, cpus) -> BootInfo:
        info = load_guest(memory, kernel, initrd, cmdline, cpus, self.acpi_devices)
        memory.write(L.VMGENID_ADDR, self.generation_id)
        return info

    def setup_vcpus(self, vm: Vm, vcpus: List[Vcpu], info: BootInfo) -> None:
        for vcpu in vcpus:
            setup_vcpu(vcpu, len(vcpus), self.supported_cpuid, self.supported_msrs, info, self.tsc_deadline)

    def irq_line(self, vm: Vm, irq: int, level: int) -> None:
        vm.irq_line(irq, level)

    def coalesce_console(self, vm: Vm, on: bool) -> None:
        vm.coalesce_pio(COM1_PORT, 1, on)

    def power_button(self, devices: LegacyDevices) -> None:
        devices.pm.press_power_button()

    def new_generation(self, memory: GuestMemory, vm: Vm) -> None:
        """A restored guest is a new generation: its ID changes and the Generic Event Device's edge says so.

        The guest's vmgenid driver reads the new ID and reseeds the kernel's RNG (docs/daemon.md,
        "Snapshots"). A snapshot of a tenbox without VGEN has nothing at VMGENID_ADDR (reserved)
        and its guest never unmasked the line: the write and the edge change nothing there.
        """
        memory.write(L.VMGENID_ADDR, self.generation_id)
        vm.irq_line(L.GED_GSI, 1)
        vm.irq_line(L.GED_GSI, 0)

    def describe_vcpu(self, vcpu: Vcpu) -> str:
        return describe_vcpu(vcpu)
