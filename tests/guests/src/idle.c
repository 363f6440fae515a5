/*
 * idle: a guest that stays up until told to stop (guest, CPL0).
 *
 * Everything echo does ("echo: <line>" per line; "poweroff", "reboot"), but
 * announces itself with "idle: ready"; plus the ACPI power button:
 *   - fixed hardware (tenbox, PC machines): PWRBTN_EN in PM1a_EN and the SCI
 *     (FADT SCI_INT, routed per the MADT override; level/active-low when
 *     there is none); an SCI with PWRBTN_STS set is the button;
 *   - hardware-reduced ACPI (QEMU microvm): the Generic Event Device
 *     (_HID ACPI0013) in the DSDT; its interrupt with the power-down bit
 *     (0x2, QEMU's GED layout) in its event selector is the button.
 * On the button it prints "idle: power button", reports PASS and powers off.
 * No command-line parameters.
 */
#include "acpi.h"
#include "apic.h"
#include "cpu.h"
#include "interactive.h"
#include "layout.h"
#include "printf.h"
#include "test.h"
#include "time.h"
#include "x86.h"

const char guest_name[] = "idle";

#define PWRBTN (1u << 8) /* PM1_STS.PWRBTN_STS and PM1_EN.PWRBTN_EN */
#define SCI_EN 1u
#define SCI_ENABLE_WAIT_S 2
#define GED_SCAN_LEN 256
#define GED_POWER_DOWN 0x2
#define EXT_IRQ_DESC 0x89
#define EXT_IRQ_EDGE 0x02
#define EXT_IRQ_ACTIVE_LOW 0x04
#define AML_OPREGION_0 0x5B
#define AML_OPREGION_1 0x80
#define REGION_SYSTEM_MEMORY 0

static volatile u32 button;
static struct acpi_gas pm1_sts, pm1_en;
static u64 ged_esel;

static void on_button(void)
{
	printf("idle: power button\n");
	t_pass("the ACPI power button reached the guest");
	t_finish();
}

/* ---- fixed-hardware power button ---- */

static void sci_irq(u32 vector)
{
	u32 sts = (u32)gas_read(&pm1_sts);

	if (sts & PWRBTN) {
		gas_write(&pm1_sts, PWRBTN); /* write one to clear */
		button = 1;
	}
}

static bool setup_fixed_button(void)
{
	struct acpi_gas evt, cnt;
	u32 len = fadt_u8(FADT_PM1_EVT_LEN);

	if (!fadt_block(FADT_X_PM1A_EVT_BLK, FADT_PM1A_EVT_BLK, len, &evt))
		return false;
	if (evt.bit_width)
		len = evt.bit_width / 8;
	if (len < 4)
		len = 4;
	/* PM1a_EVT_BLK: PM1_STS in the first half, PM1_EN in the second. */
	pm1_sts = evt;
	pm1_sts.bit_width = (u8)(len / 2 * 8);
	pm1_sts.access_size = 0;
	pm1_en = pm1_sts;
	pm1_en.address += len / 2;
	t_info("pm1a_evt", "space %u addr %lx len %u", evt.space, evt.address, len);

	/* ACPI mode: SCI_EN, through SMI_CMD if the firmware left it off. */
	if (fadt_block(FADT_X_PM1A_CNT_BLK, FADT_PM1A_CNT_BLK, fadt_u8(FADT_PM1_CNT_LEN), &cnt) &&
	    !(gas_read(&cnt) & SCI_EN)) {
		u32 smi = fadt_u32(FADT_SMI_CMD);
		if (smi && fadt_u8(FADT_ACPI_ENABLE)) {
			outb((u16)smi, fadt_u8(FADT_ACPI_ENABLE));
			struct deadline d;
			deadline_start(&d, SCI_ENABLE_WAIT_S);
			while (!(gas_read(&cnt) & SCI_EN) && !deadline_expired(&d))
				cpu_relax();
		}
		t_check(gas_read(&cnt) & SCI_EN, "ACPI mode is on (SCI_EN)", "PM1_CNT=%lx", gas_read(&cnt));
	}

	/* The SCI: an ISA IRQ; without an override it is level, active low (ACPI spec). */
	u8 sci = (u8)fadt_u16(FADT_SCI_INT);
	u32 gsi = sci;
	bool level = true, low = true;
	const struct madt_info *m = &acpi.madt_info;
	for (u32 i = 0; i < m->nisos; i++) {
		const struct madt_iso *s = &m->isos[i];
		if (s->bus || s->source != sci)
			continue;
		gsi = s->gsi;
		if ((s->flags & MPS_TRIGGER_MASK) == MPS_EDGE)
			level = false;
		if ((s->flags & MPS_POLARITY_MASK) == MPS_ACTIVE_HIGH)
			low = false;
	}
	t_info("sci", "irq %u gsi %u %s %s", sci, gsi, level ? "level" : "edge", low ? "active-low" : "active-high");
	if (!t_check(gsi < IRQ_VECTORS && ioapic_route(gsi, (u8)(VEC_IRQ_BASE + gsi), level, low, lapic_id()),
		     "the SCI is routed through an IOAPIC", "gsi %u", gsi))
		return false;
	irq_set_handler(VEC_IRQ_BASE + gsi, sci_irq);
	gas_write(&pm1_sts, PWRBTN);
	gas_write(&pm1_en, gas_read(&pm1_en) | PWRBTN);
	t_check(gas_read(&pm1_en) & PWRBTN, "PWRBTN_EN is set in PM1_EN", "PM1_EN=%lx", gas_read(&pm1_en));
	return true;
}

/* ---- hardware-reduced: the Generic Event Device ---- */

static void ged_irq(u32 vector)
{
	u32 sel = mmio_read32(ged_esel); /* reading clears it */

	if (sel & GED_POWER_DOWN)
		button = 1;
	if (sel & ~GED_POWER_DOWN)
		printf("info - ged.event=%x\n", sel);
}

/* AML integer at p: BytePrefix, WordPrefix, DWordPrefix, QWordPrefix, Zero, One. */
static bool aml_int(const u8 *p, const u8 *end, u64 *v)
{
	u32 n = p[0] == 0x0A ? 1 : p[0] == 0x0B ? 2 : p[0] == 0x0C ? 4 : p[0] == 0x0E ? 8 : 0;

	if (p[0] == 0x00 || p[0] == 0x01) {
		*v = p[0];
		return true;
	}
	if (!n || p + 1 + n > end)
		return false;
	*v = 0;
	for (u32 i = 0; i < n; i++)
		*v |= (u64)p[1 + i] << (8 * i);
	return true;
}

static bool setup_ged_button(void)
{
	const struct acpi_sdt *d = acpi.dsdt;
	s64 at = acpi_find(d, sizeof(*d), "ACPI0013", 8);

	if (at < 0)
		return false;
	const u8 *p = (const u8 *)d + at, *end = (const u8 *)d + d->length;
	if (end > p + GED_SCAN_LEN)
		end = p + GED_SCAN_LEN;
	u32 gsi = 0, flags = 0;
	bool have_irq = false, have_reg = false;
	for (const u8 *q = p; q + 9 <= end; q++) {
		/* Extended Interrupt Descriptor: 0x89, length 6+, flags, count 1+, GSIs. */
		if (!have_irq && q[0] == EXT_IRQ_DESC && q[1] >= 6 && q[2] == 0 && q[4] >= 1) {
			flags = q[3];
			gsi = get_u32(q + 5);
			have_irq = true;
		}
		/* OperationRegion (name, SystemMemory, offset, length). */
		u64 addr;
		if (!have_reg && q[0] == AML_OPREGION_0 && q[1] == AML_OPREGION_1 && q + 8 < end &&
		    q[6] == REGION_SYSTEM_MEMORY && aml_int(q + 7, end, &addr)) {
			ged_esel = addr;
			have_reg = true;
		}
	}
	bool level = !(flags & EXT_IRQ_EDGE), low = flags & EXT_IRQ_ACTIVE_LOW;
	if (!t_check(have_irq && have_reg, "the DSDT's GED (ACPI0013) has an interrupt and an event register",
		     "irq %s, register %s", have_irq ? "found" : "missing", have_reg ? "found" : "missing"))
		return false;
	t_info("ged", "gsi %u %s %s esel %lx", gsi, level ? "level" : "edge", low ? "active-low" : "active-high",
	       ged_esel);
	if (!t_check(gsi < IRQ_VECTORS && ged_esel < (1ul << 32) &&
			     ioapic_route(gsi, (u8)(VEC_IRQ_BASE + gsi), level, low, lapic_id()),
		     "the GED interrupt is routed through an IOAPIC", "gsi %u", gsi))
		return false;
	irq_set_handler(VEC_IRQ_BASE + gsi, ged_irq);
	mmio_read32(ged_esel); /* drop any stale event */
	return true;
}

void guest_main(void)
{
	t_start();
	if (!interactive_init())
		return;
	if (!t_check(acpi_init() && acpi.fadt, "FADT found", "no ACPI tables"))
		return;
	bool hw_reduced = fadt_u32(FADT_FLAGS) & FADT_F_HW_REDUCED_ACPI;
	struct acpi_gas evt;
	bool ok;
	if (!hw_reduced && fadt_block(FADT_X_PM1A_EVT_BLK, FADT_PM1A_EVT_BLK, fadt_u8(FADT_PM1_EVT_LEN), &evt)) {
		t_info("power_button", "fixed hardware (PM1a_EVT_BLK, SCI)");
		ok = setup_fixed_button();
	} else {
		t_info("power_button", "generic event device (hardware-reduced ACPI)");
		ok = setup_ged_button();
	}
	t_check(ok, "the power button is armed", "no PM1a event block and no GED");
	interactive_run(&button, on_button);
}
