/*
 * acpi: the ACPI tables a guest kernel finds (guest, CPL0).
 *
 * Looks for the RSDP each way Linux does, checks every checksum, the FADT,
 * the DSDT's \_S5_ and virtio-mmio devices, and the MADT's CPUs and IOAPIC.
 *
 * Command line: expect.cpus=N    enabled (x2)APIC entries in the MADT (default 1)
 *               expect.virtio=N  "LNRO0005" occurrences in the DSDT
 */
#include "acpi.h"
#include "bootparams.h"
#include "printf.h"
#include "test.h"

const char guest_name[] = "acpi";

static void print_table(const struct acpi_sdt *t)
{
	printf("info - table=%c%c%c%c len=%u oem=%c%c%c%c%c%c\n", t->sig[0], t->sig[1], t->sig[2], t->sig[3],
	       t->length, t->oem_id[0], t->oem_id[1], t->oem_id[2], t->oem_id[3], t->oem_id[4], t->oem_id[5]);
}

static void check_table(const struct acpi_sdt *t)
{
	char desc[64];

	print_table(t);
	snprintf(desc, sizeof(desc), "%c%c%c%c checksum", t->sig[0], t->sig[1], t->sig[2], t->sig[3]);
	t_check(acpi_table_ok(t), desc, "bytes sum to %u", acpi_sum(t, t->length));
}

static void check_rsdp(void)
{
	u64 by_bp = acpi_rsdp_from_boot_params();
	u64 by_ebda = acpi_rsdp_from_ebda();
	u64 by_bios = acpi_rsdp_from_bios();

	t_info("rsdp.boot_params", "%lx", by_bp);
	t_info("rsdp.boot_params_field", "%lx", bp_u16(BP_VERSION) >= 0x020E ? bp_u64(BP_ACPI_RSDP_ADDR) : 0);
	t_info("rsdp.ebda", "%lx", by_ebda);
	t_info("rsdp.bios", "%lx", by_bios);
	t_check(by_bp || by_ebda || by_bios, "an RSDP is found", "not in boot_params, the EBDA or 0xE0000-0xFFFFF");
	if (by_bp && by_bios)
		t_check(by_bp == by_bios, "boot_params and the BIOS-area scan find the same RSDP",
			"boot_params says %lx, the scan finds %lx", by_bp, by_bios);
	if (by_bp && by_ebda)
		t_check(by_bp == by_ebda, "boot_params and the EBDA scan find the same RSDP",
			"boot_params says %lx, the scan finds %lx", by_bp, by_ebda);
}

static void check_madt(void)
{
	bool present;
	u64 expect = cmdline_get_u64("expect.cpus", 1, &present);
	const struct madt_info *m = &acpi.madt_info;
	u32 enabled = 0;

	if (!t_check(acpi.madt != NULL, "MADT present", "no APIC table"))
		return;
	t_info("madt.lapic", "%lx", m->lapic_addr);
	for (u32 i = 0; i < m->ncpus; i++) {
		const struct madt_cpu *c = &m->cpus[i];
		printf("info - madt.cpu=apic %u uid %u %s%s\n", c->apic_id, c->uid, c->enabled ? "enabled" : "disabled",
		       c->x2apic ? " x2apic" : "");
		enabled += c->enabled;
	}
	for (u32 i = 0; i < m->nioapics; i++)
		printf("info - madt.ioapic=id %u addr %x gsi_base %u\n", m->ioapics[i].id, m->ioapics[i].addr,
		       m->ioapics[i].gsi_base);
	for (u32 i = 0; i < m->nisos; i++)
		printf("info - madt.override=irq %u -> gsi %u flags %x\n", m->isos[i].source, m->isos[i].gsi,
		       m->isos[i].flags);
	t_check(enabled == expect, "MADT lists expect.cpus enabled processors", "%u enabled, expected %lu", enabled,
		expect);
	t_check(m->nioapics > 0, "MADT has an IOAPIC entry", "none");
}

static void check_dsdt(void)
{
	u8 a, b;
	bool present;
	u64 expect = cmdline_get_u64("expect.virtio", 0, &present);

	if (!t_check(acpi.dsdt != NULL, "DSDT present (FADT X_DSDT or DSDT)", "X_DSDT=%lx DSDT=%x",
		     fadt_u64(FADT_X_DSDT), fadt_u32(FADT_DSDT)))
		return;
	check_table(acpi.dsdt);
	bool s5 = acpi_s5(&a, &b);
	if (t_check(s5, "DSDT has a \\_S5_ package", "no NameOp _S5_ Package"))
		t_info("s5", "SLP_TYPa=%u SLP_TYPb=%u", a, b);
	u32 n = acpi_count(acpi.dsdt, "LNRO0005", 8);
	t_info("dsdt.virtio_mmio", "%u", n);
	if (present)
		t_check(n == expect, "DSDT declares expect.virtio virtio-mmio devices (LNRO0005)",
			"%u found, expected %lu", n, expect);
}

void guest_main(void)
{
	t_start();
	check_rsdp();
	if (!acpi_init())
		return;
	const u8 *r = (const u8 *)acpi.rsdp;
	t_info("rsdp", "%lx revision %u oem %c%c%c%c%c%c via %s", acpi.rsdp, acpi.rsdp_revision, r[9], r[10],
	       r[11], r[12], r[13], r[14], acpi.rsdp_method);
	t_check(acpi_rsdp_checksum_ok(acpi.rsdp, false), "RSDP checksum (first 20 bytes)", "bad");
	if (acpi.rsdp_revision >= 2)
		t_check(acpi_rsdp_checksum_ok(acpi.rsdp, true), "RSDP extended checksum", "bad");
	check_table(acpi.root);
	for (u32 i = 0; i < acpi.ntables; i++)
		check_table(acpi.tables[i]);
	if (t_check(acpi.fadt != NULL, "FADT present", "no FACP table")) {
		t_info("fadt.flags", "%x", fadt_u32(FADT_FLAGS));
		t_info("fadt.sci_int", "%u", fadt_u16(FADT_SCI_INT));
	}
	check_dsdt();
	check_madt();
}
