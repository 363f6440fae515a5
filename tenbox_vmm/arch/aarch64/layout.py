"""Guest-physical layout of a tenbox arm64 machine (worker).

The same addresses as QEMU's `virt` board for the devices both have, so
that QEMU's virt machine, given tenbox's own device tree (`-dtb`), is an
oracle for that tree (tests/integration/test_aarch64_fdt.py):

    0x0800_0000  GIC distributor (64 KiB)
    0x0801_0000  GICv2 CPU interface (64 KiB; GICv3 has none)
    0x080a_0000  GICv3 redistributors, 128 KiB per vCPU
    0x0900_0000  UART (4 KiB): an ns16550a for tenbox's worker, QEMU's PL011 for the oracle
    0x0901_0000  PL031 real-time clock (4 KiB)
    0x0903_0000  PL061 GPIO (4 KiB): line 3 is the power button (gpio-keys)
    0x0a00_0000  virtio-mmio slots, 0x200 apart: the VM's disks and NIC, then the
                 board's virtio-input power key
    0x4000_0000  RAM: the device tree in its first 2 MiB, the kernel at the next
                 2 MiB boundary (plus its text_offset), the initrd after it

Interrupts are GIC SPIs (the device tree's first cell 0, numbered from 32
on the GIC); PPIs (cell 1) are the arch timer's.
"""

from tenbox_vmm.protocol.limits import Limits

MIB = 1 << 20
GIB = 1 << 30

GIC_DIST = 0x08000000
GIC_DIST_SIZE = 0x10000
GICV2_CPU = 0x08010000
GICV2_CPU_SIZE = 0x10000
GICV3_REDIST = 0x080A0000
GICV3_REDIST_STRIDE = 0x20000  # RD_base and SGI_base frames, 64 KiB each
GICV3_REDIST_END = 0x09000000  # the redistributors must end below the UART
GICV3_MAX_VCPUS = (GICV3_REDIST_END - GICV3_REDIST) // GICV3_REDIST_STRIDE  # 123
GICV2_MAX_VCPUS = 8  # a GICv2 targets at most 8 CPUs

UART = 0x09000000
UART_SIZE = 0x1000
UART_SPI = 1
RTC = 0x09010000
RTC_SIZE = 0x1000
RTC_SPI = 2

GPIO = 0x09030000  # a PL061: the power button's line
GPIO_SIZE = 0x1000
GPIO_SPI = 7
POWER_GPIO = 3

VIRTIO_MMIO_BASE = 0x0A000000
VIRTIO_MMIO_STRIDE = 0x200
VIRTIO_MMIO_SIZE = 0x200
VIRTIO_SPI_BASE = 16
# The VM's disks and NIC (Limits.VIRTIO_SLOTS, as on x86), plus one for the board's power key.
VIRTIO_MAX_DEVICES = Limits.VIRTIO_SLOTS + 1

RAM_START = 0x40000000
FDT_ADDR = RAM_START
FDT_MAX_BYTES = 2 * MIB  # Documentation/arch/arm64/booting.rst: at most 2 MiB, on an 8-byte boundary
KERNEL_ALIGN = 2 * MIB
KERNEL_BASE = RAM_START + KERNEL_ALIGN  # the first 2 MiB boundary above the device tree
INITRD_ALIGN = 0x1000

# Arch timer PPIs (the device tree numbers PPIs from 0: PPI n is GIC interrupt 16 + n).
TIMER_PPI_SECURE = 13
TIMER_PPI_NONSECURE = 14
TIMER_PPI_VIRTUAL = 11
TIMER_PPI_HYP = 10

# Device tree interrupt cells: type, number, flags.
IRQ_TYPE_SPI = 0
IRQ_TYPE_PPI = 1
IRQ_EDGE_RISING = 1
IRQ_LEVEL_HIGH = 4
IRQ_LEVEL_LOW = 8


def virtio_slot(index: int):
    """(address, SPI) of virtio-mmio slot `index`."""
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE, VIRTIO_SPI_BASE + index


def mpidr(vcpu: int) -> int:
    """The affinity KVM gives vCPU `vcpu` (Aff0: 16 per cluster, then Aff1, then Aff2)."""
    return (vcpu & 0xF) | (((vcpu >> 4) & 0xFF) << 8) | (((vcpu >> 12) & 0xFF) << 16)
