/* Leaving the guest: ACPI poweroff, resets through the i8042, the FADT and a triple fault (guest, CPL0). */
#ifndef GUEST_POWER_H
#define GUEST_POWER_H

#include "types.h"

/* S5 through the FADT (hardware-reduced SLEEP_CONTROL_REG or PM1a/b_CNT).
 * If the machine is still running two seconds later, prints
 * "TENBOX-GUEST <name> poweroff-failed" and halts with interrupts off. */
NORETURN void power_off(void);
/* Writes S5; returns a reason when it could not even try. */
const char *acpi_sleep_s5(void);

/* Each returns only if the machine did not reset (after a grace period). */
void reset_i8042(void);
/* false when the FADT has no usable RESET_REG. */
bool reset_acpi(void);

#endif
