/* COM1, the 16550 UART at 0x3F8: the guests' console and result channel (guest, CPL0). */
#ifndef GUEST_SERIAL_H
#define GUEST_SERIAL_H

#include "types.h"

#define COM1 0x3F8
#define COM1_IRQ 4

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);

/* One spinlock serialises whole lines from every CPU. */
void serial_lock(void);
void serial_unlock(void);
/* The exception path takes the console whatever state it is in. */
void serial_force_unlock(void);

/* Receive side, for the interactive guests. */
bool serial_rx_ready(void);
u8 serial_rx_byte(void);
void serial_enable_rx_irq(void);

#endif
