/* Formatted output: %s %d %u %x %lx %p %c with width and zero padding (guest). */
#ifndef GUEST_PRINTF_H
#define GUEST_PRINTF_H

#include "types.h"

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) PRINTF_LIKE(3, 4);
/* Formats into a line buffer, then writes it to COM1 under the console lock,
 * so lines from different CPUs never interleave. CPL0 only. */
void printf(const char *fmt, ...) PRINTF_LIKE(1, 2);
void vprintf(const char *fmt, va_list ap);

#define PRINTF_LINE_MAX 512

#endif
