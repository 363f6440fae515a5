"""ACPI tables: AML encodings, checksums, MADT contents, and iasl's own reading of them."""

import shutil
import struct
import subprocess

import pytest

from tenbox_vmm.arch.x86_64 import acpi, aml
from tenbox_vmm.arch.x86_64 import layout as L
from tenbox_vmm.devices import acpi_pm as pm


def split_tables(blob, base):
    """{signature: bytes} for every table reachable from the RSDP at `base`."""
    assert blob[:8] == b"RSD PTR "
    xsdt = struct.unpack_from("<Q", blob, 24)[0]

    def table(addr):
        off = addr - base
        length = struct.unpack_from("<I", blob, off + 4)[0]
        return blob[off : off + length]

    out = {"XSDT": table(xsdt)}
    x = out["XSDT"]
    for i in range((len(x) - 36) // 8):
        t = table(struct.unpack_from("<Q", x, 36 + 8 * i)[0])
        out[t[:4].decode()] = t
    facp = out["FACP"]
    out["DSDT"] = table(struct.unpack_from("<Q", facp, 140)[0])
    out["FACS"] = table(struct.unpack_from("<Q", facp, 132)[0])
    out["RSDT"] = table(struct.unpack_from("<I", blob, 16)[0])
    return out


@pytest.fixture
def tables():
    devices = [acpi.com1_device()] + [
        acpi.virtio_mmio_device(i, L.VIRTIO_MMIO_BASE + i * L.VIRTIO_MMIO_STRIDE, L.VIRTIO_MMIO_SIZE, 16 + i)
        for i in range(3)
    ]
    blob, rsdp = acpi.build(4, devices)
    return blob, rsdp, split_tables(blob, rsdp)


def test_pkg_length_counts_its_own_bytes():
    assert aml.pkg_length(0) == b"\x01"
    assert aml.pkg_length(62) == b"\x3f"
    # 63 payload bytes + 2 length bytes = 65 = 0x41: lead 0x41 (1 extra byte, low nibble 1), then 0x04
    assert aml.pkg_length(63) == bytes([0x41, 0x04])
    total = 5000 + 3
    assert aml.pkg_length(5000) == bytes([0x80 | (total & 0xF), (total >> 4) & 0xFF, total >> 12])


def test_integers_use_the_shortest_encoding():
    assert aml.integer(0) == b"\x00"
    assert aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.integer(0xD0000000) == b"\x0c\x00\x00\x00\xd0"
    assert aml.integer(1 << 40) == b"\x0e" + struct.pack("<Q", 1 << 40)


def test_name_strings():
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("\\_S5") == b"\\_S5_"
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    with pytest.raises(ValueError):
        aml.name_seg("bad!")


def test_eisa_id_pnp0501():
    # The value iasl shows for EisaId("PNP0501").
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"


def test_every_table_checksums_to_zero(tables):
    blob, _, t = tables
    assert sum(blob[:20]) & 0xFF == 0
    assert sum(blob[:36]) & 0xFF == 0
    for sig, data in t.items():
        if sig != "FACS":  # the FACS has no checksum
            assert sum(data) & 0xFF == 0, sig


def test_madt_lists_every_vcpu_and_the_ioapic(tables):
    madt = tables[2]["APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == L.LAPIC_ADDR and flags & 1
    off, apic_ids, ioapics, overrides = 44, [], [], []
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            _, apic_id, enabled = struct.unpack_from("<BBI", madt, off + 2)
            assert enabled & 1
            apic_ids.append(apic_id)
        elif kind == 1:
            ioapics.append(struct.unpack_from("<I", madt, off + 4)[0])
        elif kind == 2:
            overrides.append(struct.unpack_from("<BBIH", madt, off + 2))
        off += length
    assert apic_ids == [0, 1, 2, 3]
    assert ioapics == [L.IOAPIC_ADDR]
    assert (0, pm.SCI_IRQ, pm.SCI_IRQ, 0xD) in overrides  # level, active high


def test_fadt_points_at_the_pm_registers(tables):
    facp = tables[2]["FACP"]
    sci, = struct.unpack_from("<H", facp, 46)
    evt, = struct.unpack_from("<I", facp, 56)
    cnt, = struct.unpack_from("<I", facp, 64)
    assert (sci, evt, cnt) == (pm.SCI_IRQ, pm.PM1A_EVT_BLK, pm.PM1A_CNT_BLK)
    flags, = struct.unpack_from("<I", facp, 112)
    assert flags & acpi.FADT_RESET_REG_SUP and not flags & (1 << 20)  # not hardware-reduced
    assert struct.unpack_from("<Q", facp, 116 + 4)[0] == pm.RESET_PORT


def test_tables_fit_for_sixty_four_vcpus():
    blob, rsdp = acpi.build(64, [acpi.com1_device()])
    madt = split_tables(blob, rsdp)["APIC"]
    assert madt.count(bytes([0, 8])) >= 64
    assert rsdp + len(blob) <= L.ACPI_END


def _iasl(tmp_path, sig, data):
    path = tmp_path / (sig.lower() + ".dat")
    path.write_bytes(data)
    r = subprocess.run(["iasl", "-d", str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = (tmp_path / (sig.lower() + ".dsl")).read_text()
    assert "Incorrect checksum" not in dsl
    assert "Error" not in r.stderr
    return dsl


def test_iasl_disassembles_the_dsdt(tmp_path, tables):
    """The DSDT is AML iasl can read back: \\_S5, COM1 and one LNRO0005 device per virtio-mmio slot."""
    if not shutil.which("iasl"):
        pytest.fail("iasl is needed (apt-get install acpica-tools)")
    dsl = _iasl(tmp_path, "DSDT", tables[2]["DSDT"])
    assert "Name (\\_S5, Package (0x04)" in dsl
    assert 'EisaId ("PNP0501")' in dsl
    assert dsl.count('Name (_HID, "LNRO0005")') == 3
    assert "0xD0002000" in dsl and "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive" in dsl


def test_iasl_reads_the_vm_generation_id_and_the_event_device_that_notifies_it(tmp_path):
    """VGEN: Linux's vmgenid _HID, Windows' _CID, ADDR as (low, high) with no _CRS; GED0: ACPI0013 with
    the edge interrupt and an _EVT that notifies VGEN with 0x80."""
    if not shutil.which("iasl"):
        pytest.fail("iasl is needed (apt-get install acpica-tools)")
    dsdt = acpi.build_dsdt(list(acpi.vmgenid_devices(0x1234FF000, 10)))
    dsl = _iasl(tmp_path, "DSDT", dsdt)
    vgen = dsl[dsl.index("Device (VGEN)"):dsl.index("Device (GED0)")]
    assert 'Name (_HID, "VMGENCTR")' in vgen and 'Name (_CID, "VM_Gen_Counter")' in vgen
    assert "_CRS" not in vgen
    assert " ".join(vgen[vgen.index("Name (ADDR"):].split()[:8]) == "Name (ADDR, Package (0x02) { 0x234FF000, One })"
    ged = dsl[dsl.index("Device (GED0)"):]
    assert 'Name (_HID, "ACPI0013"' in ged
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in ged
    assert "0x0000000A," in ged
    assert "Method (_EVT, 1, NotSerialized)" in ged and "Notify (\\_SB.VGEN, 0x80)" in ged


def test_the_tables_end_below_the_vm_generation_id():
    devices = [acpi.com1_device(), *acpi.vmgenid_devices(L.VMGENID_ADDR, L.GED_GSI)] + [
        acpi.virtio_mmio_device(i, L.VIRTIO_MMIO_BASE + i * L.VIRTIO_MMIO_STRIDE, L.VIRTIO_MMIO_SIZE, 16 + i)
        for i in range(L.VIRTIO_MAX_DEVICES)]
    blob, base = acpi.build(64, devices)
    assert base + len(blob) <= L.VMGENID_ADDR
    assert L.VMGENID_ADDR + L.VMGENID_SIZE <= L.ACPI_END


def test_iasl_decodes_fadt_and_madt(tmp_path, tables):
    if not shutil.which("iasl"):
        pytest.fail("iasl is needed (apt-get install acpica-tools)")
    fadt = _iasl(tmp_path, "FACP", tables[2]["FACP"])
    assert "PM1A Control Block Address : 00000604" in fadt
    assert "Hardware Reduced (V5) : 0" in fadt
    madt = _iasl(tmp_path, "APIC", tables[2]["APIC"])
    assert madt.count("Processor Enabled : 1") == 4
    assert "Address : FEC00000" in madt
