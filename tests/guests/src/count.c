/*
 * count: counts on the console, one line a step (guest, CPL0).
 *
 * Prints "count: <n>" for n = 1, 2, 3, ... with a TSC delay between lines.
 * The count lives in the guest's registers and stack, so a snapshot taken
 * while it runs and restored (any number of times) goes on from the same
 * number: the snapshot tests read the continuation on the console.
 * With count.to=N it stops after N, reports PASS and powers off.
 * With count.fill=MIB it first writes that much RAM from 16 MiB up (at
 * CPL3, native speed on kvm_pvm), each 8 bytes their own address XOR a
 * constant: a snapshot then holds memory in use, as a booted system's does,
 * and none of it is a zero page a migration could skip. It prints
 * "count: filled <MiB> MiB" (what fitted in RAM) before the first count.
 * With count.verify=1 it reads that RAM back before each line, and at the
 * first word that is not what it wrote prints "count: RAM changed at <addr>"
 * and fails: a restore that lost or moved a page of RAM in use shows.
 *
 * Command line: count.to=N       last number (default 0: count until stopped)
 *               count.ms=MS      delay between lines (default 100)
 *               count.fill=MIB   RAM to write first (default 0)
 *               count.verify=1   check that RAM before each line (default 0)
 */
#include "bootparams.h"
#include "cpu.h"
#include "printf.h"
#include "test.h"
#include "time.h"

const char guest_name[] = "count";

#define FILL_BASE (16ULL << 20)
#define MAPPED_TOP (3ULL << 30) /* head.S maps 4 GiB; its top GiB is the MMIO hole */

#define FILL_WORD(p) ((u64)(p) ^ 0x5a5a5a5a5a5a5a5aULL)

struct fill_job {
	u64 start;
	u64 end;
	u64 bad; /* verify_loop: the first word that differs, or 0 */
};

static u64 fill_loop(u64 arg)
{
	struct fill_job *j = (struct fill_job *)arg;

	for (volatile u64 *p = (u64 *)j->start; p < (u64 *)j->end; p++)
		*p = FILL_WORD(p);
	return 0;
}

static u64 verify_loop(u64 arg)
{
	struct fill_job *j = (struct fill_job *)arg;

	j->bad = 0;
	for (volatile u64 *p = (u64 *)j->start; p < (u64 *)j->end; p++) {
		if (*p != FILL_WORD(p)) {
			j->bad = (u64)p;
			break;
		}
	}
	return 0;
}

/* The end of the e820 RAM entry that holds FILL_BASE, capped at the mapped top; 0 if none. */
static u64 fill_top(void)
{
	for (u32 i = 0; i < bp_e820_count(); i++) {
		const struct e820_entry *e = bp_e820(i);
		if (e->type == E820_RAM && e->addr <= FILL_BASE && e->addr + e->size > FILL_BASE)
			return e->addr + e->size < MAPPED_TOP ? e->addr + e->size : MAPPED_TOP;
	}
	return 0;
}

void guest_main(void)
{
	u64 to = cmdline_get_u64("count.to", 0, NULL);
	u64 ms = cmdline_get_u64("count.ms", 100, NULL);
	u64 fill_mib = cmdline_get_u64("count.fill", 0, NULL);
	bool verify = cmdline_get_u64("count.verify", 0, NULL) != 0;
	struct fill_job j = { FILL_BASE, FILL_BASE, 0 };

	t_start();
	t_info("count.tsc_hz", "%lu%s", tsc_hz(), tsc_hz_known() ? "" : " (ceiling)");
	if (fill_mib) {
		u64 top = fill_top();
		if (top > FILL_BASE)
			j.end = fill_mib < (top - FILL_BASE) >> 20 ? FILL_BASE + (fill_mib << 20) : top;
		run_user(fill_loop, (u64)&j);
		printf("count: filled %lu MiB\n", (j.end - j.start) >> 20);
	}
	for (u64 n = 1; !to || n <= to; n++) {
		if (verify && j.end > j.start) {
			run_user(verify_loop, (u64)&j);
			if (j.bad) {
				printf("count: RAM changed at 0x%lx\n", j.bad);
				t_fail("RAM changed at 0x%lx", j.bad);
				t_finish();
			}
		}
		printf("count: %lu\n", n);
		udelay(ms * 1000);
	}
	t_pass("counted to %lu", to);
}
