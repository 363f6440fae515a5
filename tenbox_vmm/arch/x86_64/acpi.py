"""ACPI tables for a tenbox x86-64 machine: RSDP, XSDT, RSDT, FADT, FACS, MADT, DSDT (worker).

The tables describe what the machine really has: the vCPUs' local APICs,
the in-kernel IOAPIC, the PM1a block and reset port of `devices.acpi_pm`,
COM1, every virtio-mmio device (Debian's kernels find virtio-mmio only
through the DSDT, `_HID "LNRO0005"`), and the VM generation ID (VGEN, with
the Generic Event Device that notifies it). The 8042 is declared absent: it
exists only for its reset line, and Linux then skips a slow keyboard probe.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Sequence, Tuple

from tenbox_vmm.arch.x86_64 import aml
from tenbox_vmm.arch.x86_64 import layout as L
from tenbox_vmm.devices import acpi_pm as pm

OEM_ID = b"TENBOX"
OEM_TABLE_ID = b"TENBOXVM"
OEM_REVISION = 1
CREATOR_ID = b"TNBX"
CREATOR_REVISION = 1
HEADER_LEN = 36

# FADT
FADT_REVISION = 6
FADT_MINOR = 0
FADT_LEN = 276
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5  # no fixed sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
CMOS_CENTURY_INDEX = 0x32
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE, GAS_ACCESS_WORD, GAS_ACCESS_DWORD = 1, 2, 3

# MADT
MADT_PCAT_COMPAT = 1
MADT_LAPIC = 0
MADT_IOAPIC = 1
MADT_ISO = 2
MADT_LAPIC_NMI = 4
LAPIC_ENABLED = 1
MPS_ACTIVE_HIGH = 0x1
MPS_LEVEL = 0xC
IOAPIC_ID = 0


class AcpiDevice(NamedTuple):
    """One device in \\_SB: name, hardware id, unique id, its resources and any other objects."""

    name: str
    hid: bytes  # encoded _HID value (aml.string or aml.eisa_id)
    uid: int
    resources: Tuple[bytes, ...]
    objects: Tuple[bytes, ...] = ()  # encoded names and methods after _CRS

    def aml(self) -> bytes:
        crs = (aml.name("_CRS", aml.resource_template(*self.resources)),) if self.resources else ()
        return aml.device(self.name, aml.name("_HID", self.hid), aml.name("_UID", self.uid), *crs, *self.objects)


def virtio_mmio_device(index: int, base: int, size: int, gsi: int) -> AcpiDevice:
    return AcpiDevice(
        name="VR%02X" % index,
        hid=aml.string("LNRO0005"),
        uid=index,
        resources=(aml.memory32_fixed(base, size), aml.extended_interrupt(gsi, edge=True)),
    )


def com1_device() -> AcpiDevice:
    return AcpiDevice(
        name="COM1",
        hid=aml.eisa_id("PNP0501"),
        uid=1,
        resources=(aml.io_port(0x3F8, 8), aml.irq_no_flags(4)),
    )


# Notify value 0x80: device specific, "the generation ID changed" for a VM generation counter.
VMGENID_CHANGED = 0x80


def vmgenid_devices(addr: int, gsi: int) -> Tuple[AcpiDevice, AcpiDevice]:
    """The VM generation ID (Microsoft's "Virtual Machine Generation ID" device) and its notifier.

    VGEN: Linux's vmgenid driver binds to _HID VMGENCTR, Windows to _CID
    "VM_Gen_Counter"; ADDR is the ID's guest-physical address as two
    DWORDs. GED0, an ACPI Generic Event Device (ACPI0013), owns edge `gsi`:
    when tenbox raises it (a restored snapshot), its _EVT notifies VGEN,
    whose driver reads the new ID and reseeds the kernel's RNG.
    """
    vgen = AcpiDevice(
        name="VGEN",
        hid=aml.string("VMGENCTR"),
        uid=0,
        resources=(),
        objects=(aml.name("_CID", "VM_Gen_Counter"), aml.name("_DDN", "VM_Gen_Counter"),
                 aml.name("ADDR", aml.package([addr & 0xFFFFFFFF, addr >> 32]))),
    )
    ged = AcpiDevice(
        name="GED0",
        hid=aml.string("ACPI0013"),
        uid=0,
        resources=(aml.extended_interrupt(gsi, edge=True),),
        objects=(aml.method("_EVT", 1, aml.notify("\\_SB.VGEN", VMGENID_CHANGED)),),
    )
    return vgen, ged


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = HEADER_LEN + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        length,
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def _gas(address: int, width_bits: int, access: int, space: int = GAS_SYSTEM_IO) -> bytes:
    return struct.pack("<BBBBQ", space, width_bits, 0, access, address)


def build_dsdt(devices: Sequence[AcpiDevice]) -> bytes:
    body = aml.name("\\_S5", aml.package([pm.SLP_TYP_S5, pm.SLP_TYP_S5, 0, 0]))
    body += aml.scope("\\_SB", *(d.aml() for d in devices))
    return _table(b"DSDT", 2, body)


def build_fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    f = bytearray(FADT_LEN - HEADER_LEN)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, f, offset - HEADER_LEN, *values)

    put(36, "<II", facs_addr, dsdt_addr)
    put(46, "<H", pm.SCI_IRQ)
    put(56, "<I", pm.PM1A_EVT_BLK)
    put(64, "<I", pm.PM1A_CNT_BLK)
    put(76, "<I", pm.PM_TMR_BLK)
    put(88, "<BBBB", pm.PM1_EVT_LEN, pm.PM1_CNT_LEN, 0, pm.PM_TMR_LEN)
    put(108, "<B", CMOS_CENTURY_INDEX)
    put(109, "<H", BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    f[116 - HEADER_LEN : 128 - HEADER_LEN] = _gas(pm.RESET_PORT, 8, GAS_ACCESS_BYTE)
    put(128, "<B", pm.RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(132, "<QQ", facs_addr, dsdt_addr)
    f[148 - HEADER_LEN : 160 - HEADER_LEN] = _gas(pm.PM1A_EVT_BLK, 8 * pm.PM1_EVT_LEN, GAS_ACCESS_WORD)
    f[172 - HEADER_LEN : 184 - HEADER_LEN] = _gas(pm.PM1A_CNT_BLK, 8 * pm.PM1_CNT_LEN, GAS_ACCESS_WORD)
    f[208 - HEADER_LEN : 220 - HEADER_LEN] = _gas(pm.PM_TMR_BLK, 8 * pm.PM_TMR_LEN, GAS_ACCESS_DWORD)
    return _table(b"FACP", FADT_REVISION, bytes(f))


def build_facs() -> bytes:
    # FACS has no checksum and a shorter header: signature, length, then fields.
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, b"\0" * 3, 0, b"\0" * 24)


def build_madt(cpus: int) -> bytes:
    body = struct.pack("<II", L.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for i in range(cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, L.IOAPIC_ADDR, 0)
    # The SCI is a level-triggered, active-high line (the in-kernel IOAPIC pin 9).
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, pm.SCI_IRQ, pm.SCI_IRQ, MPS_ACTIVE_HIGH | MPS_LEVEL)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1)
    return _table(b"APIC", 4, body)


def _rsdp(xsdt_addr: int, rsdt_addr: int) -> bytes:
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr))
    first[8] = checksum(first)
    full = bytearray(bytes(first) + struct.pack("<IQB3s", 36, xsdt_addr, 0, b"\0" * 3))
    full[32] = checksum(full)
    return bytes(full)


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def build(cpus: int, devices: Sequence[AcpiDevice], base: int = L.ACPI_ADDR) -> Tuple[bytes, int]:
    """All tables as one blob to place at `base`; returns (blob, RSDP address).

    The RSDP comes first, on a 16-byte boundary inside 0xE0000..0xFFFFF,
    where Linux's BIOS-area scan finds it; boot_params also points at it.
    """
    blob = bytearray()
    placed: List[int] = []

    def place(data: bytes, align: int = 16) -> int:
        pad = _align(len(blob), align) - len(blob)
        blob.extend(b"\0" * pad)
        addr = base + len(blob)
        blob.extend(data)
        placed.append(addr)
        return addr

    rsdp_size = 36
    blob.extend(b"\0" * rsdp_size)  # filled in once the XSDT address is known
    facs = place(build_facs(), 64)
    dsdt = place(build_dsdt(devices))
    fadt = place(build_fadt(dsdt, facs))
    madt = place(build_madt(cpus))
    xsdt = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt, madt)))
    rsdt = place(_table(b"RSDT", 1, struct.pack("<II", fadt, madt)))
    blob[0:rsdp_size] = _rsdp(xsdt, rsdt)
    if base + len(blob) > L.VMGENID_ADDR:
        raise ValueError("ACPI tables do not fit below the VM generation ID at %#x" % L.VMGENID_ADDR)
    return bytes(blob), base
