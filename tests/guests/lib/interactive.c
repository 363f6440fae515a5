/* Line input from COM1 by interrupt and the command loop (guest, CPL0). */
#include "interactive.h"
#include "apic.h"
#include "cpu.h"
#include "power.h"
#include "printf.h"
#include "serial.h"
#include "test.h"
#include "x86.h"

#define RING_SIZE 256 /* power of two */
#define LINE_MAX 120

static volatile u8 ring[RING_SIZE];
static volatile u32 ring_head, ring_tail;

/* Take what the UART holds, as far as the ring has room; the rest waits in
 * the UART (the sender is held back, nothing is lost). */
static void uart_drain(void)
{
	while (ring_head - ring_tail < RING_SIZE && serial_rx_ready())
		ring[ring_head++ % RING_SIZE] = serial_rx_byte();
}

static void uart_irq(u32 vector)
{
	uart_drain();
}

bool interactive_init(void)
{
	pic_mask_all();
	lapic_init();
	u8 vec = irq_route_isa(COM1_IRQ);
	if (!t_check(vec != 0, "COM1 IRQ 4 is routed through an IOAPIC", "no IOAPIC serves its GSI"))
		return false;
	irq_set_handler(vec, uart_irq);
	serial_enable_rx_irq();
	return true;
}

static int ring_pop(void)
{
	if (ring_tail == ring_head)
		return -1;
	return ring[ring_tail++ % RING_SIZE];
}

static void command(const char *line)
{
	if (!strcmp(line, "poweroff")) {
		t_pass("%s received \"poweroff\"", guest_name);
		t_finish();
	}
	if (!strcmp(line, "reboot")) {
		printf("info - reboot=i8042\n");
		reset_i8042();
		printf("info - reboot=the i8042 did not reset the machine; trying the FADT RESET_REG\n");
		reset_acpi();
		printf("info - reboot=no reset yet; triple fault\n");
		triple_fault();
	}
}

void interactive_run(volatile u32 *event, void (*on_event)(void))
{
	char line[LINE_MAX + 1];
	u32 len = 0;

	printf("%s: ready\n", guest_name);
	for (;;) {
		cli();
		if (event && *event) {
			sti();
			on_event();
			continue;
		}
		int c = ring_pop();
		if (c < 0) {
			/* IRQ 4 is edge-triggered: bytes left behind when the ring was
			 * full raise no new edge, so look before sleeping. */
			if (serial_rx_ready()) {
				uart_drain();
				continue;
			}
			sti_hlt(); /* an interrupt between the check and hlt still wakes us */
			continue;
		}
		sti();
		if (c == '\r' || c == '\n' || len == LINE_MAX) {
			if (len) {
				line[len] = '\0';
				printf("echo: %s\n", line);
				command(line);
			}
			len = 0;
			if (c == '\r' || c == '\n')
				continue;
		}
		if (c == 0x7F || c == 0x08) {
			if (len)
				len--;
		} else if (c >= 0x20 && c < 0x7F) {
			line[len++] = (char)c;
		}
	}
}
