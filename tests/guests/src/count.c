/*
 * count: counts on the console, one line a step (guest, CPL0).
 *
 * Prints "count: <n>" for n = 1, 2, 3, ... with a TSC delay between lines.
 * The count lives in the guest's registers and stack, so a snapshot taken
 * while it runs and restored (any number of times) goes on from the same
 * number: the snapshot tests read the continuation on the console.
 * With count.to=N it stops after N, reports PASS and powers off.
 *
 * Command line: count.to=N    last number (default 0: count until stopped)
 *               count.ms=MS   delay between lines (default 100)
 */
#include "bootparams.h"
#include "printf.h"
#include "test.h"
#include "time.h"

const char guest_name[] = "count";

void guest_main(void)
{
	u64 to = cmdline_get_u64("count.to", 0, NULL);
	u64 ms = cmdline_get_u64("count.ms", 100, NULL);

	t_start();
	t_info("count.tsc_hz", "%lu%s", tsc_hz(), tsc_hz_known() ? "" : " (ceiling)");
	for (u64 n = 1; !to || n <= to; n++) {
		printf("count: %lu\n", n);
		udelay(ms * 1000);
	}
	t_pass("counted to %lu", to);
}
