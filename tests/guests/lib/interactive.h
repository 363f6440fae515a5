/* Console line input by UART interrupt, for the guests that stay up (guest, CPL0).
 *
 * COM1's receive interrupt (IER bit 0, MCR OUT2) arrives on ISA IRQ 4, routed
 * through the IOAPIC as the MADT's overrides say; the CPU waits in sti;hlt.
 * Every received line is printed back. The line "poweroff"
 * reports PASS and powers off; "reboot" resets through the i8042 (then the
 * FADT RESET_REG, then a triple fault, if the machine is still up).
 * The guest prints "<guest name>: ready" when it starts waiting; received
 * lines are "echo: <line>" whichever guest runs the loop.
 */
#ifndef GUEST_INTERACTIVE_H
#define GUEST_INTERACTIVE_H

#include "types.h"

/* Mask the PIC, enable the LAPIC, route IRQ 4 and enable the receive interrupt. */
bool interactive_init(void);
/* Never returns. When *event becomes non-zero, on_event() runs (with
 * interrupts on); it may power off or clear *event and return. */
NORETURN void interactive_run(volatile u32 *event, void (*on_event)(void));

#endif
