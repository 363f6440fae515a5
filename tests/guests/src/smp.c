/*
 * smp: start every application processor the MADT lists (guest, CPL0).
 *
 * INIT-SIPI-SIPI through the LAPIC ICR to each enabled MADT entry other than
 * the BSP; the trampoline (smp_tramp.S) at 0x6000 takes each AP to long mode.
 * Every AP prints "info - cpu=<apic id> up" (the BSP too) and halts. The BSP waits, bounded
 * by the RTC, until all are up and checks their APIC IDs against the MADT.
 *
 * Command line: expect.cpus=N   CPUs that must come up, BSP included (default:
 *                               the MADT's enabled entries)
 *               smp.timeout=S   seconds to wait for the APs (default 20)
 */
#include "acpi.h"
#include "apic.h"
#include "bootparams.h"
#include "cpu.h"
#include "layout.h"
#include "printf.h"
#include "test.h"
#include "time.h"
#include "x86.h"

const char guest_name[] = "smp";

#define TRAMP_BASE 0x6000
#define SIPI_VECTOR (TRAMP_BASE >> 12)
#define INIT_DELAY_US 10000
#define SIPI_DELAY_US 200
#define DEFAULT_TIMEOUT_S 20
#define XAPIC_MAX_ID 0xFF

extern char ap_tramp_start[], ap_tramp_end[], ap_stacks[];
void ap_main(void);

u64 ap_stack_next;
static volatile u32 aps_up, ap_slots;
/* APIC ID + 1 per AP that reported; 0 while a slot is still being filled. */
static volatile u32 ap_ids[MAX_CPUS];

void ap_main(void)
{
	cpu_load_tables();
	u32 id = lapic_id();
	/* Print before counting: once the BSP sees every AP counted it reports
	 * and powers off, and no AP line may still be on its way. */
	printf("info - cpu=%u up\n", id);
	u32 slot = __atomic_fetch_add(&ap_slots, 1, __ATOMIC_RELAXED);
	if (slot < MAX_CPUS)
		__atomic_store_n(&ap_ids[slot], id + 1, __ATOMIC_RELEASE);
	__atomic_fetch_add(&aps_up, 1, __ATOMIC_RELEASE);
}

void guest_main(void)
{
	t_start();
	acpi_init();
	if (!t_check(acpi.madt != NULL, "MADT present", "no APIC table"))
		return;
	const struct madt_info *m = &acpi.madt_info;
	u32 enabled = 0;
	for (u32 i = 0; i < m->ncpus; i++)
		enabled += m->cpus[i].enabled;
	bool present;
	u64 expect = cmdline_get_u64("expect.cpus", enabled, &present);
	u64 timeout = cmdline_get_u64("smp.timeout", DEFAULT_TIMEOUT_S, NULL);
	t_check(enabled == expect, "MADT lists expect.cpus enabled processors", "%u enabled, expected %lu", enabled,
		expect);

	pic_mask_all();
	lapic_init();
	u32 bsp = lapic_id();
	t_info("bsp", "apic %u", bsp);
	printf("info - cpu=%u up\n", bsp);

	/* The APs to start: enabled MADT entries other than us, xAPIC-addressable. */
	u32 targets[MAX_CPUS], ntargets = 0;
	bool bsp_listed = false;
	for (u32 i = 0; i < m->ncpus; i++) {
		const struct madt_cpu *c = &m->cpus[i];
		if (!c->enabled)
			continue;
		if (c->apic_id == bsp) {
			bsp_listed = true;
			continue;
		}
		if (c->apic_id > XAPIC_MAX_ID || ntargets >= MAX_CPUS - 1) {
			t_fail("cannot start APIC %u: beyond xAPIC IDs or MAX_CPUS", c->apic_id);
			continue;
		}
		targets[ntargets++] = c->apic_id;
	}
	t_check(bsp_listed, "the BSP's APIC ID is in the MADT", "APIC %u not listed", bsp);

	memcpy(phys(TRAMP_BASE), ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));
	ap_stack_next = (u64)ap_stacks;

	struct deadline d;
	deadline_start(&d, (u32)timeout);
	u32 ipi_failures = 0;
	for (u32 i = 0; i < ntargets; i++)
		ipi_failures += !lapic_ipi(targets[i], ICR_INIT | ICR_ASSERT);
	udelay(INIT_DELAY_US);
	for (int round = 0; round < 2; round++) {
		for (u32 i = 0; i < ntargets; i++)
			ipi_failures += !lapic_ipi(targets[i], ICR_STARTUP | SIPI_VECTOR);
		udelay(SIPI_DELAY_US);
	}
	t_check(ipi_failures == 0, "INIT and SIPI IPIs were accepted by the LAPIC", "%u stayed busy", ipi_failures);

	while (__atomic_load_n(&aps_up, __ATOMIC_ACQUIRE) < ntargets && !deadline_expired(&d))
		cpu_relax();
	u32 up = __atomic_load_n(&aps_up, __ATOMIC_ACQUIRE);
	t_info("aps_up", "%u of %u", up, ntargets);
	t_check(up == ntargets, "every AP in the MADT came up", "%u of %u within %lu s", up, ntargets, timeout);
	t_check(up + 1 == expect, "expect.cpus CPUs are running", "%u running, expected %lu", up + 1, expect);

	/* Unique IDs, each one a MADT target. */
	bool unique = true, listed = true;
	u32 ids[MAX_CPUS], n = 0;
	for (u32 i = 0; i < MAX_CPUS; i++) {
		u32 v = __atomic_load_n(&ap_ids[i], __ATOMIC_ACQUIRE);
		if (v)
			ids[n++] = v - 1;
	}
	for (u32 i = 0; i < n; i++) {
		bool found = false;
		for (u32 j = 0; j < ntargets; j++)
			found |= targets[j] == ids[i];
		listed &= found && ids[i] != bsp;
		for (u32 j = 0; j < i; j++)
			unique &= ids[i] != ids[j];
	}
	t_check(unique, "the APs report unique APIC IDs", "duplicates");
	t_check(listed, "every AP's APIC ID matches a MADT entry", "an AP reported an unlisted ID");
}
