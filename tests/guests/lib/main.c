/* The common C entry: console, CPU tables, then the guest's own body (guest, CPL0). */
#include "bootparams.h"
#include "cpu.h"
#include "serial.h"
#include "test.h"

void kmain(u64 boot_params_addr);

void kmain(u64 boot_params_addr)
{
	serial_init();
	cpu_init();
	boot_params_init(boot_params_addr);
	guest_main();
	t_finish();
}
