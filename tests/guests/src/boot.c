/*
 * boot: the Linux x86 boot contract at the 64-bit entry (guest, CPL0).
 *
 * Checks the CPU state startup_64 recorded before touching anything, the
 * boot_params page, the loader's identity map, the e820 table, the command
 * line and the initrd.
 *
 * Command line: expect.mem_mb=N      total e820 RAM is within (N-1 MiB, N MiB]
 *               expect.initrd_size=N the initrd is N bytes
 */
#include "bootparams.h"
#include "cpu.h"
#include "crc32.h"
#include "layout.h"
#include "printf.h"
#include "test.h"
#include "x86.h"

const char guest_name[] = "boot";

#define PAGE 0x1000ul
#define MIB (1ul << 20)
#define PTE_P 0x1ul
#define PTE_PS 0x80ul
#define PTE_ADDR 0x000FFFFFFFFFF000ul
#define MAPPED_LIMIT (1ul << 32)
#define DESC_P (1ul << 47)
#define DESC_L (1ul << 53)
#define DESC_S (1ul << 44)
#define DESC_CODE (1ul << 43)
#define DESC_WRITABLE (1ul << 41)

/* Translate va through the 4-level tables at cr3; false if unmapped or the
 * tables are out of reach. *span is how far the mapping at va extends. */
static bool translate(u64 cr3, u64 va, u64 *pa, u64 *span)
{
	u64 table = cr3 & PTE_ADDR;

	for (int level = 3; level >= 0; level--) {
		if (table >= MAPPED_LIMIT)
			return false;
		u32 shift = 12 + 9 * level;
		u64 e = ((const u64 *)phys(table))[(va >> shift) & 511];
		if (!(e & PTE_P))
			return false;
		if (level == 0 || ((level == 1 || level == 2) && (e & PTE_PS))) {
			u64 size = 1ul << shift;
			u64 base = e & PTE_ADDR & ~(size - 1);
			*pa = base + (va & (size - 1));
			*span = size - (va & (size - 1));
			return true;
		}
		table = e & PTE_ADDR;
	}
	return false;
}

/* First address in [start, end) that is not identity-mapped, or end. */
static u64 identity_mapped_upto(u64 cr3, u64 start, u64 end)
{
	u64 va = start;

	while (va < end) {
		u64 pa, span;
		if (!translate(cr3, va, &pa, &span) || pa != va)
			return va;
		va += span;
	}
	return end;
}

static void check_identity(const char *what, u64 start, u64 len)
{
	char desc[128];
	u64 end = start + (len ? len : 1);
	u64 bad = identity_mapped_upto(entry_state.cr3, start, end);

	snprintf(desc, sizeof(desc), "entry page tables identity-map the %s (%lx-%lx)", what, start, end - 1);
	t_check(bad == end, desc, "%lx is not identity-mapped", bad);
}

static bool in_e820_ram(u64 start, u64 len)
{
	for (u32 i = 0; i < bp_e820_count(); i++) {
		const struct e820_entry *e = bp_e820(i);
		if (e->type == E820_RAM && start >= e->addr && start + len <= e->addr + e->size)
			return true;
	}
	return false;
}

static void check_entry_state(void)
{
	const struct entry_state *s = &entry_state;

	t_info("entry.cs", "%x", s->cs);
	t_info("entry.ds", "%x", s->ds);
	t_info("entry.es", "%x", s->es);
	t_info("entry.ss", "%x", s->ss);
	t_info("entry.rflags", "%lx", s->rflags);
	t_info("entry.cr0", "%lx", s->cr0);
	t_info("entry.cr3", "%lx", s->cr3);
	t_info("entry.cr4", "%lx", s->cr4);
	t_info("entry.efer", "%lx", s->efer);
	t_info("entry.rsi", "%lx", s->rsi);
	t_info("entry.rsp", "%lx", s->rsp);
	t_info("entry.gdtr", "%lx limit %x", s->gdt_base, s->gdt_limit);

	t_check((s->efer & EFER_LMA) && (s->cr0 & CR0_PG) && (s->cr0 & CR0_PE) && (s->cr4 & CR4_PAE),
		"long mode is active at the 64-bit entry (EFER.LMA, CR0.PG, CR4.PAE)", "efer=%lx cr0=%lx cr4=%lx",
		s->efer, s->cr0, s->cr4);
	t_check(s->cs == SEL_CODE64, "CS is 0x10 at the 64-bit entry", "CS=%x", s->cs);
	t_check(s->ds == SEL_DATA && s->es == SEL_DATA && s->ss == SEL_DATA,
		"DS, ES and SS are 0x18 at the 64-bit entry", "DS=%x ES=%x SS=%x", s->ds, s->es, s->ss);
	t_check(!(s->rflags & RFLAGS_IF), "interrupts are disabled at the 64-bit entry", "RFLAGS=%lx", s->rflags);

	/* The descriptors behind those selectors, in the GDT the loader left. */
	u32 ci = s->cs >> 3, di = s->ds >> 3;
	bool gdt_ok = (u32)(s->gdt_limit + 1) >= (ci + 1) * 8 && (u32)(s->gdt_limit + 1) >= (di + 1) * 8 &&
		      s->gdt_base + s->gdt_limit < MAPPED_LIMIT;
	u64 cd = 0, dd = 0;
	if (gdt_ok) {
		cd = ((const u64 *)phys(s->gdt_base))[ci];
		dd = ((const u64 *)phys(s->gdt_base))[di];
	}
	t_check(gdt_ok && (cd & (DESC_P | DESC_S | DESC_CODE | DESC_L)) == (DESC_P | DESC_S | DESC_CODE | DESC_L) &&
			(dd & (DESC_P | DESC_S | DESC_CODE | DESC_WRITABLE)) == (DESC_P | DESC_S | DESC_WRITABLE),
		"the entry GDT makes CS 64-bit code and DS writable data", "gdt=%lx limit=%x cs-desc=%lx ds-desc=%lx",
		s->gdt_base, s->gdt_limit, cd, dd);
}

static bool check_boot_params(void)
{
	u64 bp = (u64)boot_params;

	bool hdrs = bp && bp + PAGE <= MAPPED_LIMIT && !memcmp(boot_params + BP_HEADER_MAGIC, "HdrS", 4);
	if (!t_check(hdrs, "RSI points at boot_params (\"HdrS\" at +0x202)", "RSI=%lx", bp))
		return false;
	t_info("boot_params.version", "%x", bp_u16(BP_VERSION));
	t_info("boot_params.type_of_loader", "%x", bp_u8(BP_TYPE_OF_LOADER));
	t_check(bp_u8(BP_TYPE_OF_LOADER) != 0, "type_of_loader is set", "type_of_loader=0");
	return true;
}

static void check_e820(u64 image_start, u64 image_end)
{
	u32 n = bp_e820_count();
	u64 ram = 0;
	bool sorted = true, disjoint = true, ram_at_0 = false;

	for (u32 i = 0; i < n; i++) {
		const struct e820_entry *e = bp_e820(i);
		printf("info - e820=%lx %lx %u\n", e->addr, e->size, e->type);
		if (e->type == E820_RAM) {
			ram += e->size;
			if (e->addr == 0 && e->size)
				ram_at_0 = true;
		}
		if (i) {
			const struct e820_entry *p = bp_e820(i - 1);
			if (e->addr < p->addr)
				sorted = false;
			if (p->addr + p->size > e->addr && e->addr + e->size > p->addr)
				disjoint = false;
		}
	}
	t_info("e820.ram_bytes", "%lu", ram);
	t_check(n >= 2, "e820 has at least 2 entries", "%u entries", n);
	t_check(sorted, "e820 is sorted by address", "entries out of order");
	t_check(disjoint, "e820 entries do not overlap", "overlapping neighbours");
	t_check(ram_at_0, "e820 has RAM at address 0", "no RAM entry at 0");
	t_check(in_e820_ram(image_start, image_end - image_start), "e820 RAM covers the kernel image at 1 MiB",
		"%lx-%lx is not inside one RAM entry", image_start, image_end - 1);

	bool present;
	u64 mb = cmdline_get_u64("expect.mem_mb", 0, &present);
	if (present)
		t_check(ram > (mb - 1) * MIB && ram <= mb * MIB, "e820 RAM matches expect.mem_mb",
			"%lu bytes of RAM for %lu MiB", ram, mb);
}

static void check_cmdline(void)
{
	bool term;
	u64 addr = bp_cmdline_addr();
	const char *c = bp_cmdline();
	size_t len = bp_cmdline_len(&term);

	t_info("cmdline.addr", "%lx", addr);
	if (!t_check(c != NULL, "the command line pointer is set and mapped", "cmd_line_ptr=%lx", addr))
		return;
	t_check(term, "the command line is NUL-terminated within cmdline_size", "no NUL in %u bytes",
		bp_u32(BP_CMDLINE_SIZE) + 1);
	t_check(in_e820_ram(addr, len + 1), "the command line is inside e820 RAM", "%lx-%lx", addr, addr + len);
	t_info_long("cmdline", c, len);
}

static void check_initrd(u64 image_start, u64 image_end)
{
	u64 addr = bp_ramdisk_image(), size = bp_ramdisk_size();
	u64 max = bp_u32(BP_INITRD_ADDR_MAX);
	bool present;
	u64 expect = cmdline_get_u64("expect.initrd_size", 0, &present);

	if (!size) {
		t_info("initrd", "none");
		if (present)
			t_check(false, "an initrd was loaded (expect.initrd_size)", "ramdisk_size is 0");
		return;
	}
	t_info("initrd.addr", "%lx", addr);
	t_info("initrd.size", "%lu", size);
	t_check(in_e820_ram(addr, size), "the initrd is inside e820 RAM", "%lx-%lx", addr, addr + size - 1);
	t_check(!(addr & (PAGE - 1)), "the initrd is page-aligned", "at %lx", addr);
	t_check(addr >= image_end || addr + size <= image_start, "the initrd does not overlap the kernel image",
		"initrd %lx-%lx, image %lx-%lx", addr, addr + size - 1, image_start, image_end - 1);
	t_check(addr + size - 1 <= max, "the initrd ends below initrd_addr_max", "ends at %lx, max %lx",
		addr + size - 1, max);
	if (present)
		t_check(size == expect, "the initrd size matches expect.initrd_size", "%lu bytes, expected %lu", size,
			expect);
	if (addr + size <= MAPPED_LIMIT)
		t_info("initrd.crc32", "%08x", crc32_user(phys(addr), size));
}

static u64 plus_one(u64 x)
{
	return x + 1;
}

void guest_main(void)
{
	u64 image_start = (u64)__image_start;
	u64 image_end = image_start + ALIGN_UP(bp_u32(BP_INIT_SIZE), PAGE);

	t_start();
	check_entry_state();
	if (!check_boot_params())
		return;
	if (image_end < (u64)__image_end)
		image_end = (u64)__image_end;
	check_identity("kernel image", image_start, image_end - image_start);
	check_identity("boot_params page", (u64)boot_params, PAGE);
	bool term;
	if (bp_cmdline())
		check_identity("command line", bp_cmdline_addr(), bp_cmdline_len(&term) + 1);
	check_e820(image_start, image_end);
	check_cmdline();
	check_initrd(image_start, image_end);
	/* The library's CPL3 helper, which benchmarks depend on. */
	t_check(run_user(plus_one, 41) == 42, "code runs at CPL3 and returns to CPL0", "wrong result");
	t_info("cpl3.return", "%s", user_return_path);
}
