/*
 * poweroff: the boot benchmark's guest (guest, CPL0).
 *
 * Its first console line is "hello from the tenbox test guest"; then it
 * reports and powers off through the FADT. The boot benchmark measures
 * process start -> that line -> process exit.
 */
#include "acpi.h"
#include "serial.h"
#include "test.h"

const char guest_name[] = "poweroff";

void guest_main(void)
{
	serial_puts("hello from the tenbox test guest\n");
	t_start();
	acpi_init();
	t_check(acpi.fadt != NULL, "FADT found for the poweroff", "no FADT (RSDP %s)",
		acpi.found ? "found" : "not found");
}
