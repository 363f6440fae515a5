/* Result protocol lines and the pass/fail count (guest, CPL0). */
#include "test.h"
#include "power.h"
#include "printf.h"
#include "serial.h"

static u32 failures;

void t_start(void)
{
	printf("TENBOX-GUEST %s start\n", guest_name);
}

bool t_check(bool cond, const char *desc, const char *detail_fmt, ...)
{
	if (cond) {
		printf("ok - %s\n", desc);
		return true;
	}
	char detail[PRINTF_LINE_MAX - 64];
	va_list ap;
	va_start(ap, detail_fmt);
	vsnprintf(detail, sizeof(detail), detail_fmt, ap);
	va_end(ap);
	failures++;
	printf("not ok - %s: %s\n", desc, detail);
	return false;
}

void t_pass(const char *fmt, ...)
{
	char desc[PRINTF_LINE_MAX - 16];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(desc, sizeof(desc), fmt, ap);
	va_end(ap);
	printf("ok - %s\n", desc);
}

void t_fail(const char *fmt, ...)
{
	char desc[PRINTF_LINE_MAX - 16];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(desc, sizeof(desc), fmt, ap);
	va_end(ap);
	failures++;
	printf("not ok - %s\n", desc);
}

void t_info(const char *key, const char *fmt, ...)
{
	char value[PRINTF_LINE_MAX - 64];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(value, sizeof(value), fmt, ap);
	va_end(ap);
	printf("info - %s=%s\n", key, value);
}

void t_info_long(const char *key, const char *text, size_t len)
{
	serial_lock();
	serial_puts("info - ");
	serial_puts(key);
	serial_putc('=');
	serial_write(text, len);
	serial_putc('\n');
	serial_unlock();
}

u32 t_failures(void)
{
	return failures;
}

void t_result_line(void)
{
	if (failures)
		printf("TENBOX-GUEST %s FAIL %u\n", guest_name, failures);
	else
		printf("TENBOX-GUEST %s PASS\n", guest_name);
}

void t_finish(void)
{
	t_result_line();
	power_off();
}
