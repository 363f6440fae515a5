/*
 * echo: console input by interrupt (guest, CPL0).
 *
 * Prints "echo: ready", then "echo: <line>" for every line received on COM1.
 * "poweroff" reports PASS and powers off; "reboot" resets through the i8042.
 * No command-line parameters.
 */
#include "interactive.h"
#include "test.h"

const char guest_name[] = "echo";

void guest_main(void)
{
	t_start();
	if (!interactive_init())
		return;
	interactive_run(NULL, NULL);
}
