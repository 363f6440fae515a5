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
 * With count.churn=1 it also rewrites one MiB of it after each check, the
 * next MiB each line, round the filled RAM: line n writes MiB n mod the
 * MiBs filled, each word XORed with n as well. The guest writes its RAM
 * while a live snapshot copies it, and a page saved before its last write
 * shows as changed after the restore.
 *
 * Command line: count.to=N       last number (default 0: count until stopped)
 *               count.ms=MS      delay between lines (default 100)
 *               count.fill=MIB   RAM to write first (default 0)
 *               count.verify=1   check that RAM before each line (default 0)
 *               count.churn=1    rewrite a MiB of it after each line (default 0)
 */
#include "bootparams.h"
#include "cpu.h"
#include "printf.h"
#include "test.h"
#include "time.h"

const char guest_name[] = "count";

#define FILL_BASE (16ULL << 20)
#define MAPPED_TOP (3ULL << 30) /* head.S maps 4 GiB; its top GiB is the MMIO hole */

#define FILL_WORD(p, gen) ((u64)(p) ^ 0x5a5a5a5a5a5a5a5aULL ^ ((gen) * 0x9e3779b97f4a7c15ULL))
#define CHURN_BYTES (1ULL << 20)

struct fill_job {
	u64 start;
	u64 end;
	u64 gen;  /* fill_loop: what the words are XORed with */
	u64 done; /* verify_loop: the lines churned so far (0 without count.churn) */
	u64 bad;  /* verify_loop: the first word that differs, or 0 */
};

static u64 fill_loop(u64 arg)
{
	struct fill_job *j = (struct fill_job *)arg;

	for (volatile u64 *p = (u64 *)j->start; p < (u64 *)j->end; p++)
		*p = FILL_WORD(p, j->gen);
	return 0;
}

/* The line that last rewrote MiB k of the filled RAM, `done` lines churned: 0 for the first fill. */
static u64 churned_by(u64 k, u64 done, u64 chunks)
{
	return done < k ? 0 : done - (done - k) % chunks;
}

static u64 verify_loop(u64 arg)
{
	struct fill_job *j = (struct fill_job *)arg;
	u64 chunks = (j->end - j->start) / CHURN_BYTES;

	j->bad = 0;
	for (volatile u64 *p = (u64 *)j->start; p < (u64 *)j->end; p++) {
		u64 gen = j->done ? churned_by(((u64)p - j->start) / CHURN_BYTES, j->done, chunks) : 0;
		if (*p != FILL_WORD(p, gen)) {
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
	bool churn = cmdline_get_u64("count.churn", 0, NULL) != 0;
	struct fill_job j = { FILL_BASE, FILL_BASE, 0, 0, 0 };

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
		if (churn && j.end - j.start >= CHURN_BYTES) {
			u64 chunks = (j.end - j.start) / CHURN_BYTES;
			struct fill_job c = { j.start + (n % chunks) * CHURN_BYTES, 0, n, 0, 0 };
			c.end = c.start + CHURN_BYTES;
			run_user(fill_loop, (u64)&c);
			j.done = n;
		}
		printf("count: %lu\n", n);
		udelay(ms * 1000);
	}
	t_pass("counted to %lu", to);
}
