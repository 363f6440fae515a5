/* The result protocol on the console, one line each (guest, CPL0).
 *
 *   TENBOX-GUEST <name> start
 *   ok - <description>
 *   not ok - <description>: <detail>
 *   info - <key>=<value>
 *   TENBOX-GUEST <name> PASS            (or: FAIL <number of failed checks>)
 *
 * After the final line the guest powers off through ACPI; if that returns it
 * prints "TENBOX-GUEST <name> poweroff-failed" and halts with interrupts off.
 */
#ifndef GUEST_TEST_H
#define GUEST_TEST_H

#include "types.h"

/* Each guest defines its name and its body; the library calls guest_main()
 * after the CPU tables and the console are set up, then t_finish(). */
extern const char guest_name[];
void guest_main(void);

void t_start(void);
/* ok - desc   or   not ok - desc: <detail_fmt...>; returns cond. */
bool t_check(bool cond, const char *desc, const char *detail_fmt, ...) PRINTF_LIKE(3, 4);
void t_pass(const char *fmt, ...) PRINTF_LIKE(1, 2);
void t_fail(const char *fmt, ...) PRINTF_LIKE(1, 2);
void t_info(const char *key, const char *fmt, ...) PRINTF_LIKE(2, 3);
/* info - <key>=<text>, for values longer than a printf line (the command line). */
void t_info_long(const char *key, const char *text, size_t len);
u32 t_failures(void);
/* Final line, then poweroff. */
NORETURN void t_finish(void);
/* Final line without poweroff (for guests that reset instead). */
void t_result_line(void);

#endif
