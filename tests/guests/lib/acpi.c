/* RSDP search, table walk, FADT/MADT/DSDT access (guest, CPL0; scans at CPL3). */
#include "acpi.h"
#include "bootparams.h"
#include "cpu.h"
#include "x86.h"

#define EBDA_SEGMENT_PTR 0x40E
#define EBDA_SCAN_LEN 1024
#define BIOS_AREA_START 0xE0000
#define BIOS_AREA_END 0x100000
#define RSDP_V1_LEN 20
#define MAPPED_LIMIT (1ul << 32) /* the identity map covers the low 4 GiB */
#define TABLE_MAX_LEN (1u << 24) /* far beyond any table a VMM builds */
#define BP_PROTOCOL_RSDP 0x020E /* acpi_rsdp_addr exists from boot protocol 2.14 */

struct acpi_info acpi;

/* ---- CPL3 jobs: plain memory work, natively fast ---- */

struct sum_job {
	const u8 *p;
	u32 len;
};

static u64 sum_job(u64 arg)
{
	const struct sum_job *j = (const struct sum_job *)arg;
	u8 s = 0;

	for (u32 i = 0; i < j->len; i++)
		s += j->p[i];
	return s;
}

u8 acpi_sum(const void *p, u32 len)
{
	struct sum_job j = { p, len };
	return (u8)run_user(sum_job, (u64)&j);
}

struct scan_job {
	u64 start, end;
};

static u8 sum_bytes(const u8 *p, u32 n)
{
	u8 s = 0;
	while (n--)
		s += *p++;
	return s;
}

/* "RSD PTR " on a 16-byte boundary with a good 20-byte checksum. */
static u64 rsdp_scan_job(u64 arg)
{
	const struct scan_job *j = (const struct scan_job *)arg;

	for (u64 a = j->start; a + RSDP_V1_LEN <= j->end; a += 16) {
		const u8 *p = (const u8 *)a;
		if (!memcmp(p, "RSD PTR ", 8) && sum_bytes(p, RSDP_V1_LEN) == 0)
			return a;
	}
	return 0;
}

struct find_job {
	const u8 *hay;
	u32 len;
	const u8 *needle;
	u32 nlen;
	bool count;
};

static u64 find_job(u64 arg)
{
	const struct find_job *j = (const struct find_job *)arg;
	u64 n = 0;

	for (u32 i = 0; i + j->nlen <= j->len; i++) {
		if (j->hay[i] == j->needle[0] && !memcmp(j->hay + i, j->needle, j->nlen)) {
			if (!j->count)
				return i;
			n++;
		}
	}
	return j->count ? n : (u64)-1;
}

/* ---- RSDP ---- */

bool acpi_rsdp_checksum_ok(u64 addr, bool extended)
{
	const u8 *p = (const u8 *)addr;

	if (!extended)
		return acpi_sum(p, RSDP_V1_LEN) == 0;
	u32 len = get_u32(p + 20);
	if (len < 36 || len > 4096)
		return false;
	return acpi_sum(p, len) == 0;
}

bool acpi_rsdp_valid(u64 addr)
{
	const u8 *p = (const u8 *)addr;

	if (!addr || addr + 36 > MAPPED_LIMIT || memcmp(p, "RSD PTR ", 8))
		return false;
	if (!acpi_rsdp_checksum_ok(addr, false))
		return false;
	return p[15] < 2 || acpi_rsdp_checksum_ok(addr, true);
}

u64 acpi_rsdp_from_boot_params(void)
{
	if (bp_u16(BP_VERSION) < BP_PROTOCOL_RSDP)
		return 0;
	u64 a = bp_u64(BP_ACPI_RSDP_ADDR);
	return acpi_rsdp_valid(a) ? a : 0;
}

static u64 scan(u64 start, u64 end)
{
	struct scan_job j = { start, end };
	u64 a = run_user(rsdp_scan_job, (u64)&j);
	return a && acpi_rsdp_valid(a) ? a : 0;
}

u64 acpi_rsdp_from_ebda(void)
{
	u64 ebda = (u64)get_u16(phys(EBDA_SEGMENT_PTR)) << 4;

	/* As Linux: only an EBDA pointer above the BDA is believed. */
	if (ebda <= 0x400 || ebda >= BIOS_AREA_START)
		return 0;
	return scan(ebda, ebda + EBDA_SCAN_LEN);
}

u64 acpi_rsdp_from_bios(void)
{
	return scan(BIOS_AREA_START, BIOS_AREA_END);
}

/* ---- tables ---- */

bool acpi_table_ok(const struct acpi_sdt *t)
{
	return t->length >= sizeof(*t) && t->length <= TABLE_MAX_LEN && (u64)t + t->length <= MAPPED_LIMIT &&
	       acpi_sum(t, t->length) == 0;
}

static const struct acpi_sdt *table_at(u64 addr)
{
	if (!addr || addr + sizeof(struct acpi_sdt) > MAPPED_LIMIT)
		return NULL;
	const struct acpi_sdt *t = (const struct acpi_sdt *)addr;
	if (t->length < sizeof(*t) || t->length > TABLE_MAX_LEN || addr + t->length > MAPPED_LIMIT)
		return NULL;
	return t;
}

const struct acpi_sdt *acpi_find_table(const char sig[4])
{
	for (u32 i = 0; i < acpi.ntables; i++)
		if (!memcmp(acpi.tables[i]->sig, sig, 4))
			return acpi.tables[i];
	return NULL;
}

static void parse_madt(void)
{
	const struct acpi_sdt *t = acpi.madt;
	struct madt_info *m = &acpi.madt_info;
	const u8 *p = (const u8 *)t;

	m->lapic_addr = get_u32(p + 36);
	for (u32 off = 44; off + 2 <= t->length;) {
		u8 type = p[off], len = p[off + 1];
		const u8 *e = p + off;
		if (len < 2 || off + len > t->length)
			break;
		if (type == 0 && len >= 8 && m->ncpus < MADT_MAX_CPUS) {
			struct madt_cpu *c = &m->cpus[m->ncpus++];
			c->uid = e[2];
			c->apic_id = e[3];
			c->enabled = get_u32(e + 4) & 1;
			c->x2apic = false;
		} else if (type == 9 && len >= 16 && m->ncpus < MADT_MAX_CPUS) {
			struct madt_cpu *c = &m->cpus[m->ncpus++];
			c->apic_id = get_u32(e + 4);
			c->enabled = get_u32(e + 8) & 1;
			c->uid = get_u32(e + 12);
			c->x2apic = true;
		} else if (type == 1 && len >= 12 && m->nioapics < MADT_MAX_IOAPICS) {
			struct madt_ioapic *io = &m->ioapics[m->nioapics++];
			io->id = e[2];
			io->addr = get_u32(e + 4);
			io->gsi_base = get_u32(e + 8);
		} else if (type == 2 && len >= 10 && m->nisos < MADT_MAX_ISOS) {
			struct madt_iso *s = &m->isos[m->nisos++];
			s->bus = e[2];
			s->source = e[3];
			s->gsi = get_u32(e + 4);
			s->flags = get_u16(e + 8);
		} else if (type == 5 && len >= 12) {
			m->lapic_addr = get_u64(e + 4);
		}
		off += len;
	}
}

bool acpi_init(void)
{
	if (acpi.initialised)
		return acpi.found;
	acpi.initialised = true;

	u64 rsdp;
	if ((rsdp = acpi_rsdp_from_boot_params()))
		acpi.rsdp_method = "boot_params";
	else if ((rsdp = acpi_rsdp_from_ebda()))
		acpi.rsdp_method = "ebda";
	else if ((rsdp = acpi_rsdp_from_bios()))
		acpi.rsdp_method = "bios";
	else
		return false;
	acpi.rsdp = rsdp;
	const u8 *r = (const u8 *)rsdp;
	acpi.rsdp_revision = r[15];

	/* XSDT when the RSDP has one, else the RSDT. */
	const struct acpi_sdt *root = NULL;
	u32 entry_size = 8;
	if (acpi.rsdp_revision >= 2)
		root = table_at(get_u64(r + 24));
	if (!root || memcmp(root->sig, "XSDT", 4)) {
		root = table_at(get_u32(r + 16));
		entry_size = 4;
		if (root && memcmp(root->sig, "RSDT", 4))
			root = NULL;
	}
	if (!root)
		return false;
	acpi.root = root;
	acpi.found = true;

	const u8 *rp = (const u8 *)root;
	for (u32 off = sizeof(struct acpi_sdt); off + entry_size <= root->length; off += entry_size) {
		u64 a = entry_size == 8 ? get_u64(rp + off) : get_u32(rp + off);
		const struct acpi_sdt *t = table_at(a);
		if (t && acpi.ntables < ACPI_MAX_TABLES)
			acpi.tables[acpi.ntables++] = t;
	}
	acpi.fadt = acpi_find_table("FACP");
	acpi.madt = acpi_find_table("APIC");
	if (acpi.fadt) {
		u64 d = fadt_u64(FADT_X_DSDT);
		if (!d)
			d = fadt_u32(FADT_DSDT);
		acpi.dsdt = table_at(d);
		if (acpi.dsdt && memcmp(acpi.dsdt->sig, "DSDT", 4))
			acpi.dsdt = NULL;
	}
	if (acpi.madt)
		parse_madt();
	return true;
}

/* ---- FADT ---- */

static bool fadt_has(u32 off, u32 size)
{
	return acpi.fadt && off + size <= acpi.fadt->length;
}

u8 fadt_u8(u32 off)
{
	return fadt_has(off, 1) ? ((const u8 *)acpi.fadt)[off] : 0;
}

u16 fadt_u16(u32 off)
{
	return fadt_has(off, 2) ? get_u16((const u8 *)acpi.fadt + off) : 0;
}

u32 fadt_u32(u32 off)
{
	return fadt_has(off, 4) ? get_u32((const u8 *)acpi.fadt + off) : 0;
}

u64 fadt_u64(u32 off)
{
	return fadt_has(off, 8) ? get_u64((const u8 *)acpi.fadt + off) : 0;
}

bool fadt_gas(u32 off, struct acpi_gas *g)
{
	if (!fadt_has(off, sizeof(*g)))
		return false;
	memcpy(g, (const u8 *)acpi.fadt + off, sizeof(*g));
	return g->address != 0 && (g->space == GAS_MEMORY || g->space == GAS_IO);
}

bool fadt_block(u32 x_off, u32 legacy_off, u32 len, struct acpi_gas *g)
{
	if (fadt_gas(x_off, g))
		return true;
	u32 port = fadt_u32(legacy_off);
	if (!port)
		return false;
	g->space = GAS_IO;
	g->bit_width = (u8)(len * 8);
	g->bit_offset = 0;
	g->access_size = 0;
	g->address = port;
	return true;
}

static u32 gas_bits(const struct acpi_gas *g)
{
	if (g->access_size >= 1 && g->access_size <= 4)
		return 8u << (g->access_size - 1);
	if (g->bit_width == 16 || g->bit_width == 32 || g->bit_width == 64)
		return g->bit_width;
	return 8;
}

u64 gas_read(const struct acpi_gas *g)
{
	u32 bits = gas_bits(g);

	if (g->space == GAS_IO) {
		u16 port = (u16)g->address;
		return bits == 8 ? inb(port) : bits == 16 ? inw(port) : inl(port);
	}
	if (g->address >= MAPPED_LIMIT)
		return 0;
	switch (bits) {
	case 8: return mmio_read8(g->address);
	case 16: return mmio_read16(g->address);
	case 32: return mmio_read32(g->address);
	default: return mmio_read64(g->address);
	}
}

void gas_write(const struct acpi_gas *g, u64 v)
{
	u32 bits = gas_bits(g);

	if (g->space == GAS_IO) {
		u16 port = (u16)g->address;
		if (bits == 8)
			outb(port, (u8)v);
		else if (bits == 16)
			outw(port, (u16)v);
		else
			outl(port, (u32)v);
		return;
	}
	if (g->address >= MAPPED_LIMIT)
		return;
	switch (bits) {
	case 8: mmio_write8(g->address, (u8)v); break;
	case 16: mmio_write16(g->address, (u16)v); break;
	case 32: mmio_write32(g->address, (u32)v); break;
	default: mmio_write64(g->address, v); break;
	}
}

/* ---- DSDT ---- */

s64 acpi_find(const struct acpi_sdt *t, u32 from, const void *needle, u32 len)
{
	if (!t || from >= t->length)
		return -1;
	struct find_job j = { (const u8 *)t + from, t->length - from, needle, len, false };
	s64 r = (s64)run_user(find_job, (u64)&j);
	return r < 0 ? -1 : r + from;
}

u32 acpi_count(const struct acpi_sdt *t, const void *needle, u32 len)
{
	if (!t || t->length <= sizeof(*t))
		return 0;
	struct find_job j = { (const u8 *)t + sizeof(*t), t->length - (u32)sizeof(*t), needle, len, true };
	return (u32)run_user(find_job, (u64)&j);
}

/* One AML integer as the first elements of \_S5_ hold them. */
static u32 aml_small_int(const u8 *p, const u8 *end, u8 *out)
{
	if (p >= end)
		return 0;
	switch (p[0]) {
	case 0x0A: /* BytePrefix */
		if (p + 1 >= end)
			return 0;
		*out = p[1];
		return 2;
	case 0x0B: /* WordPrefix: SLP_TYP is 3 bits, the low byte is all that counts */
	case 0x0C: /* DWordPrefix */
		if (p + 1 >= end)
			return 0;
		*out = p[1];
		return p[0] == 0x0B ? 3 : 5;
	case 0x00: /* ZeroOp */
		*out = 0;
		return 1;
	case 0x01: /* OneOp */
		*out = 1;
		return 1;
	default: /* a raw byte, as some firmware writes it */
		*out = p[0];
		return 1;
	}
}

bool acpi_s5(u8 *slp_typa, u8 *slp_typb)
{
	static const u8 name[] = { 0x08, '_', 'S', '5', '_', 0x12 };
	static const u8 rooted[] = { 0x08, '\\', '_', 'S', '5', '_', 0x12 };
	const struct acpi_sdt *d = acpi.dsdt;

	if (!d)
		return false;
	s64 at = acpi_find(d, sizeof(*d), name, sizeof(name));
	u32 skip = sizeof(name);
	if (at < 0) {
		at = acpi_find(d, sizeof(*d), rooted, sizeof(rooted));
		skip = sizeof(rooted);
	}
	if (at < 0)
		return false;
	const u8 *p = (const u8 *)d + at + skip, *end = (const u8 *)d + d->length;
	/* PkgLength: bits 7:6 of the lead byte count the bytes that follow. */
	if (p >= end)
		return false;
	p += 1 + (p[0] >> 6);
	p++; /* NumElements */
	u32 n = aml_small_int(p, end, slp_typa);
	if (!n)
		return false;
	if (!aml_small_int(p + n, end, slp_typb))
		*slp_typb = *slp_typa;
	return true;
}

/* ---- MADT ---- */

void acpi_isa_irq(u8 irq, u32 *gsi, bool *level, bool *active_low, bool *overridden)
{
	const struct madt_info *m = &acpi.madt_info;

	*gsi = irq;
	*level = false;
	*active_low = false;
	*overridden = false;
	for (u32 i = 0; i < m->nisos; i++) {
		const struct madt_iso *s = &m->isos[i];
		if (s->bus != 0 || s->source != irq)
			continue;
		*gsi = s->gsi;
		*level = (s->flags & MPS_TRIGGER_MASK) == MPS_LEVEL;
		*active_low = (s->flags & MPS_POLARITY_MASK) == MPS_ACTIVE_LOW;
		*overridden = true;
	}
}
