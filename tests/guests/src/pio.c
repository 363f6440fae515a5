/*
 * pio: port-I/O exit benchmark (guest; the loop runs at CPL3).
 *
 * Prints "pio: start n=<N>", then at CPL3 (native speed on kvm_pvm, where
 * kernel code is emulated) runs N "outb %al, $0x80", each a VM exit, and
 * prints "pio: done n=<N> tsc=<TSC ticks for the loop>" before powering off.
 *
 * Command line: pio.count=N   number of port writes (default 100000)
 */
#include "bootparams.h"
#include "cpu.h"
#include "printf.h"
#include "test.h"
#include "x86.h"

const char guest_name[] = "pio";

#define DEFAULT_COUNT 100000
#define POST_PORT 0x80

struct pio_job {
	u64 n;
	u64 tsc;
};

static u64 pio_loop(u64 arg)
{
	struct pio_job *j = (struct pio_job *)arg;
	u64 t0 = rdtsc();

	for (u64 i = 0; i < j->n; i++)
		outb(POST_PORT, (u8)i);
	j->tsc = rdtsc() - t0;
	return 0;
}

void guest_main(void)
{
	struct pio_job j = { cmdline_get_u64("pio.count", DEFAULT_COUNT, NULL), 0 };

	t_start();
	printf("pio: start n=%lu\n", j.n);
	run_user(pio_loop, (u64)&j);
	printf("pio: done n=%lu tsc=%lu\n", j.n, j.tsc);
	t_info("cpl3.return", "%s", user_return_path);
	t_pass("%lu port writes from CPL3", j.n);
}
