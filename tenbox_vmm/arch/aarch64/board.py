"""The arm64 board behind machine.py: RAM, vCPUs, the vGIC, the UART and RTC, the kernel and its device tree (worker).

`VirtBoard` answers arch/__init__.py's interface for an arm64 host, on
the addresses of layout.py (QEMU virt's):

  * guest RAM in one piece at layout.RAM_START;
  * the kernel's `Image` where image.plan() puts it, the initrd after it,
    and fdt.py's device tree at the start of RAM, x0 pointing at it;
  * the console UART, the 16550 model x86 uses on port I/O, here on MMIO
    (reg-shift 0), a PL031 clock and a PL061 GPIO with the power button; their interrupts and the virtio-mmio
    slots' are SPIs of KVM's vGIC, driven by KVM_IRQ_LINE and irqfds;
  * vCPUs with PSCI 0.2 (KVM runs the guest's PSCI: secondary vCPUs wait
    in KVM for CPU_ON; SYSTEM_OFF and SYSTEM_RESET come to the vCPU
    thread as system events, which machine.py turns into a power-off or
    a reboot in the same process);
  * the vGIC the host has, GICv3 first: `prepare` asks KVM once
    (KVM_CREATE_DEVICE_TEST on a scratch VM) and refuses a host with none.

The power button is QEMU virt's: gpio-keys (KEY_POWER) on line 3 of a
PL061, pressed for 100 ms. Not yet (issue 17): snapshots.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Tuple

from tenbox_vmm.arch import Board, BoardError
from tenbox_vmm.arch.aarch64 import cpu, fdt, image
from tenbox_vmm.arch.aarch64 import layout as L
from tenbox_vmm.devices.pl031 import Pl031
from tenbox_vmm.devices.pl061 import Pl061
from tenbox_vmm.devices.serial import Serial16550
from tenbox_vmm.devices.virtio.input import VirtioPowerKey
from tenbox_vmm.kernel_kind import KernelError, read_file
from tenbox_vmm.kvm.api import Kvm, Vcpu, Vm
from tenbox_vmm.memory import GuestMemory, Region

ARM_IRQ_TYPE_SPI = 1  # KVM_IRQ_LINE's irq field: type << 24 | vcpu << 16 | number
GIC_SPI_BASE = 32  # SPI n is the GIC's interrupt 32 + n


class VirtDevices(NamedTuple):
    serial: Serial16550
    rtc: Pl031
    gpio: Pl061  # line layout.POWER_GPIO is the power button (gpio-keys)
    power_key: VirtioPowerKey  # the power button for kernels without gpio-keys (a virtio-mmio slot)

    def all(self):
        return tuple(self.by_name().values())

    def by_name(self) -> dict:
        """The devices machine.py resets at a reboot: the power key is a virtio device, reset by its transport."""
        return {"serial": self.serial, "rtc": self.rtc, "gpio": self.gpio}


class VirtBoard(Board):
    arch = "aarch64"
    default_cmdline = "console=ttyS0 panic=1 random.trust_cpu=on"
    snapshots = False
    power_button_help = ("gpio-keys on a PL061 (Linux: CONFIG_KEYBOARD_GPIO, a module in Debian's generic arm64 "
                         "kernel, not in its cloud kernel) and a power key handler (systemd-logind)")

    def __init__(self) -> None:
        self.gic = ""  # "v3" or "v2", once prepare() has asked the host
        self.target = -1
        self.virtio_slots: List[int] = []
        self._gic_fd = -1

    def ram_regions(self, size: int) -> list:
        return [Region(L.RAM_START, size, 0)]

    def prepare(self, kvm: Kvm, cpus: int) -> None:
        try:
            import libfdt  # noqa: F401  (fdt.py imports it where it writes the tree)
        except ImportError:
            raise BoardError("an arm64 VM's device tree is written with dtc's libfdt, which this host lacks: "
                             "install python3-libfdt (on Debian 11: pip install pylibfdt)") from None
        vm = kvm.create_vm()
        try:
            gics = cpu.supported_gics(vm)
            self.target = vm.arm_preferred_target()
        except OSError as e:
            raise BoardError("this host's KVM cannot make an arm64 vCPU: %s" % e) from None
        finally:
            vm.close()
        if not gics:
            raise BoardError("this host's KVM has no virtual GIC (neither GICv3 nor GICv2): "
                             "it cannot give an arm64 guest interrupts")
        self.gic = gics[0]
        most = L.GICV3_MAX_VCPUS if self.gic == "v3" else L.GICV2_MAX_VCPUS
        if cpus > most:
            raise BoardError("--cpus %d: this host's GIC%s serves at most %d vCPUs" % (cpus, self.gic, most))

    def load_kernel(self, path: str, memory: GuestMemory, cmdline: str, initrd_size: Optional[int]):
        img = image.parse_image(path, read_file(path, "kernel"))
        image.plan(img, memory.size, initrd_size or 0)  # fits, with the initrd: else KernelError now
        line = cmdline.encode()
        if len(line) > fdt.CMDLINE_MAX or b"\0" in line:
            raise KernelError("the kernel command line is %d bytes; an arm64 kernel takes at most %d, "
                              "and no NUL" % (len(line), fdt.CMDLINE_MAX))
        return img, line

    def build_devices(self, pio, mmio, irq, console_output, on_poweroff, on_reset, on_serial_tx_interrupts):
        # PSCI's SYSTEM_OFF and SYSTEM_RESET reach machine.py as KVM system events: no device reports them.
        devs = VirtDevices(
            serial=Serial16550(lambda level: irq(L.UART_SPI, level), console_output, on_serial_tx_interrupts),
            rtc=Pl031(lambda level: irq(L.RTC_SPI, level)),
            gpio=Pl061(lambda level: irq(L.GPIO_SPI, level)),
            power_key=VirtioPowerKey(),
        )
        mmio.register(L.UART, L.UART_SIZE, devs.serial)
        mmio.register(L.RTC, L.RTC_SIZE, devs.rtc)
        mmio.register(L.GPIO, L.GPIO_SIZE, devs.gpio)
        return devs

    def builtin_virtio(self, devices: VirtDevices) -> list:
        return [devices.power_key]

    def virtio_slot(self, index: int) -> Tuple[int, int, int]:
        base, spi = L.virtio_slot(index)
        self.virtio_slots.append(index)
        return base, L.VIRTIO_MMIO_SIZE, spi  # an irqfd's GSI is the SPI's number (KVM's default routing)

    def max_virtio(self) -> int:
        return L.VIRTIO_MAX_DEVICES

    def create_vm(self, kvm: Kvm, memory: GuestMemory) -> Vm:
        vm = kvm.create_vm()
        try:
            for slot, (gpa, size, offset) in enumerate(memory.slots()):
                vm.map_memory(slot, gpa, memory.host_buffer, offset, size)
        except BaseException:
            vm.close()
            raise
        return vm

    def load_guest(self, memory: GuestMemory, kernel: image.ArmImage, initrd: Optional[bytes], cmdline: bytes,
                   cpus: int) -> image.BootPlan:
        plan = image.plan(kernel, memory.size, len(initrd or b""))
        memory.write(plan.kernel, kernel.data)
        if initrd:
            memory.write(plan.initrd, initrd)
        try:
            blob = fdt.build(fdt.FdtConfig(
                cpus=cpus, ram_bytes=memory.size, cmdline=cmdline.decode(), gic=self.gic,
                initrd=(plan.initrd, plan.initrd_end) if initrd else None, virtio_slots=tuple(self.virtio_slots),
                uart="ns16550a", rtc=True, rng_seed=os.urandom(fdt.RNG_SEED_BYTES)))
        except fdt.FdtError as e:
            raise BoardError(str(e)) from None
        memory.write(plan.fdt, blob)
        return plan

    def setup_vcpus(self, vm: Vm, vcpus: List[Vcpu], info: image.BootPlan) -> None:
        for vcpu in vcpus:
            cpu.init_vcpu(vcpu, self.target)
        try:
            self._gic_fd = cpu.create_gic(vm, self.gic, len(vcpus))
        except cpu.GicError as e:
            raise BoardError(str(e)) from None
        cpu.set_boot_regs(vcpus[0], info.kernel, info.fdt)

    def end_boot(self) -> None:
        fd, self._gic_fd = self._gic_fd, -1
        if fd >= 0:
            os.close(fd)

    def irq_line(self, vm: Vm, irq: int, level: int) -> None:
        if self._gic_fd >= 0:  # no line before the vGIC exists (a device reset between boots)
            vm.irq_line((ARM_IRQ_TYPE_SPI << 24) | (GIC_SPI_BASE + irq), level)

    def coalesce_console(self, vm: Vm, on: bool) -> None:
        vm.coalesce_mmio(L.UART, 1, on)  # the transmit register, reg-shift 0

    def power_button(self, devices: VirtDevices) -> None:
        # One press, on the key the guest's kernel runs: virtio-input once its driver is up (Debian's
        # cloud kernel has it, not gpio-keys), else the PL061 line (gpio-keys: Debian's generic kernel).
        if devices.power_key.listening():
            devices.power_key.press()
        else:
            devices.gpio.pulse(L.POWER_GPIO)

    def describe_vcpu(self, vcpu: Vcpu) -> str:
        try:
            pc = vcpu.get_one_reg(cpu.REG_PC)
            pstate = vcpu.get_one_reg(cpu.REG_PSTATE)
            sp = vcpu.get_one_reg(cpu.REG_SP)
            x = [vcpu.get_one_reg(cpu.reg_x(n)) for n in range(4)]
        except OSError as e:
            return "vcpu%d: registers unavailable (%s)" % (vcpu.index, e)
        return "vcpu%d: pc=%#x pstate=%#x sp=%#x x0=%#x x1=%#x x2=%#x x3=%#x" % (vcpu.index, pc, pstate, sp, *x)
