/* PIC, LAPIC and IOAPIC programming (guest, CPL0). */
#include "apic.h"
#include "acpi.h"
#include "layout.h"
#include "printf.h"
#include "x86.h"

#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1
#define SVR_ENABLE 0x100
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REG_VER 0x01
#define IOAPIC_REDIR 0x10
#define REDIR_ACTIVE_LOW (1u << 13)
#define REDIR_LEVEL (1u << 15)
#define REDIR_MASKED (1u << 16)
#define ICR_POLLS_MAX 100000

static u64 lapic;

void pic_mask_all(void)
{
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);
}

u64 lapic_base(void)
{
	return lapic;
}

u32 lapic_read(u32 reg)
{
	return mmio_read32(lapic + reg);
}

void lapic_write(u32 reg, u32 value)
{
	mmio_write32(lapic + reg, value);
}

void lapic_init(void)
{
	if (!lapic) {
		acpi_init();
		lapic = acpi.madt && acpi.madt_info.lapic_addr ? acpi.madt_info.lapic_addr : LAPIC_DEFAULT_BASE;
	}
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, SVR_ENABLE | VEC_SPURIOUS);
}

u32 lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

void lapic_eoi(void)
{
	if (lapic)
		lapic_write(LAPIC_EOI, 0);
}

bool lapic_ipi(u32 dest, u32 icr_low)
{
	lapic_write(LAPIC_ICR_HIGH, dest << 24);
	lapic_write(LAPIC_ICR_LOW, icr_low);
	for (u32 i = 0; i < ICR_POLLS_MAX; i++)
		if (!(lapic_read(LAPIC_ICR_LOW) & ICR_BUSY))
			return true;
	return false;
}

static u32 ioapic_read(u64 base, u32 reg)
{
	mmio_write32(base + IOAPIC_REGSEL, reg);
	return mmio_read32(base + IOAPIC_WIN);
}

static void ioapic_write(u64 base, u32 reg, u32 v)
{
	mmio_write32(base + IOAPIC_REGSEL, reg);
	mmio_write32(base + IOAPIC_WIN, v);
}

bool ioapic_route(u32 gsi, u8 vector, bool level, bool active_low, u32 dest)
{
	acpi_init();
	const struct madt_info *m = &acpi.madt_info;
	for (u32 i = 0; i < m->nioapics; i++) {
		u64 base = m->ioapics[i].addr;
		u32 first = m->ioapics[i].gsi_base;
		u32 pins = ((ioapic_read(base, IOAPIC_REG_VER) >> 16) & 0xFF) + 1;
		if (gsi < first || gsi >= first + pins)
			continue;
		u32 pin = gsi - first;
		u32 low = vector | (level ? REDIR_LEVEL : 0) | (active_low ? REDIR_ACTIVE_LOW : 0);
		ioapic_write(base, IOAPIC_REDIR + 2 * pin, REDIR_MASKED);
		ioapic_write(base, IOAPIC_REDIR + 2 * pin + 1, dest << 24);
		ioapic_write(base, IOAPIC_REDIR + 2 * pin, low);
		return true;
	}
	return false;
}

u8 irq_route_isa(u8 irq)
{
	u32 gsi;
	bool level, low, over;

	acpi_init();
	acpi_isa_irq(irq, &gsi, &level, &low, &over);
	if (gsi >= IRQ_VECTORS)
		return 0;
	u8 vec = (u8)(VEC_IRQ_BASE + gsi);
	printf("info - irq%u=gsi %u %s %s%s\n", irq, gsi, level ? "level" : "edge", low ? "active-low" : "active-high",
	       over ? " (MADT override)" : "");
	if (!ioapic_route(gsi, vec, level, low, lapic_id()))
		return 0;
	return vec;
}
