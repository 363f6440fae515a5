"""Guest-physical layout of a tenbox x86-64 machine (worker).

    0x0000_0500  GDT (null, null, 64-bit code 0x10, data 0x18, TSS 0x20)
    0x0000_0540  IDT (empty: interrupts stay off until the kernel sets its own)
    0x0000_7000  boot_params ("zero page")
    0x0000_8ff0  initial stack pointer
    0x0000_9000  PML4, then PDPT and four page directories: 0..4 GiB, 2 MiB pages
    0x0002_0000  kernel command line
    0x0009_fc00  EBDA (reserved)
    0x000e_0000  ACPI tables, RSDP first (reserved; found by the BIOS-area scan)
    0x000f_f000  VM generation ID, 16 bytes (reserved; the DSDT's VGEN device points at it)
    0x0010_0000  kernel (or its pref_address), then the initrd as high as allowed
    0xc000_0000  32-bit MMIO hole: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC
    0x1_0000_0000 RAM above 3 GiB continues here
"""

from tenbox_vmm.protocol.limits import Limits

GDT_ADDR = 0x500
IDT_ADDR = 0x540
ZERO_PAGE = 0x7000
BOOT_STACK = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four pages
PAGE_TABLES_END = 0xF000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_ADDR = 0x9FC00
BIOS_AREA = 0xA0000
ACPI_ADDR = 0xE0000
VMGENID_ADDR = 0xFF000  # the last page of the ACPI area: the tables end below it
VMGENID_SIZE = 16
ACPI_END = 0x100000
HIMEM_START = 0x100000

# The 16-bit word at 0x40e holds the EBDA segment, as PC firmware leaves it.
EBDA_POINTER = 0x40E

SEL_CODE64 = 0x10
SEL_DATA = 0x18
SEL_TSS = 0x20

VIRTIO_MMIO_BASE = 0xD0000000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_SIZE = 0x200
VIRTIO_GSI_BASE = 16  # IOAPIC pins 16..23: free of every ISA IRQ
VIRTIO_MAX_DEVICES = Limits.VIRTIO_SLOTS  # 8 slots, pins 16..23; the daemon's DISKS_MAX counts on it
GED_GSI = 10  # the Generic Event Device's edge: "the VM generation ID changed" (ISA IRQ 10 is free)

IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
TSS_ADDR = 0xFFFBD000  # three pages KVM needs on Intel, inside the hole
IDENTITY_MAP_ADDR = 0xFFFBC000

# E820 types
E820_RAM = 1
E820_RESERVED = 2
