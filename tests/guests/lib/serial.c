/* 16550 UART driver: polled transmit, optional receive interrupt (guest, CPL0). */
#include "serial.h"
#include "x86.h"

#define UART_RBR_THR 0
#define UART_IER 1
#define UART_IIR_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5

#define LCR_8N1 0x03
#define LCR_DLAB 0x80
#define FCR_FIFO_ON_CLEAR 0x07 /* enable, clear RX and TX, RX trigger at 1 byte */
#define MCR_DTR 0x01
#define MCR_RTS 0x02
#define MCR_OUT2 0x08 /* gates the UART's interrupt line on PCs */
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define IER_RDA 0x01
#define BAUD_DIVISOR_115200 1

/* A UART that never drains (or is absent and reads 0xFF) must not hang the
 * guest: after this many polls the byte is written anyway. */
#define THRE_POLLS_MAX 100000

static volatile u32 console_lock;

void serial_init(void)
{
	outb(COM1 + UART_IER, 0);
	outb(COM1 + UART_LCR, LCR_DLAB);
	outb(COM1 + UART_RBR_THR, BAUD_DIVISOR_115200);
	outb(COM1 + UART_IER, 0);
	outb(COM1 + UART_LCR, LCR_8N1);
	outb(COM1 + UART_IIR_FCR, FCR_FIFO_ON_CLEAR);
	outb(COM1 + UART_MCR, MCR_DTR | MCR_RTS);
}

void serial_putc(char c)
{
	for (u32 i = 0; i < THRE_POLLS_MAX; i++)
		if (inb(COM1 + UART_LSR) & LSR_THRE)
			break;
	outb(COM1 + UART_RBR_THR, (u8)c);
}

void serial_write(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		serial_putc(s[i]);
}

void serial_puts(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

void serial_lock(void)
{
	while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
		while (console_lock)
			cpu_relax();
}

void serial_unlock(void)
{
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

void serial_force_unlock(void)
{
	console_lock = 0;
}

bool serial_rx_ready(void)
{
	return inb(COM1 + UART_LSR) & LSR_DR;
}

u8 serial_rx_byte(void)
{
	return inb(COM1 + UART_RBR_THR);
}

void serial_enable_rx_irq(void)
{
	outb(COM1 + UART_MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
	outb(COM1 + UART_IER, IER_RDA);
}
