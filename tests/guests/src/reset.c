/*
 * reset: reboot the machine and count the boots in CMOS NVRAM (guest, CPL0).
 *
 * CMOS byte 0x38 (ports 0x70/0x71) holds the boot count: 0 (or anything but
 * 1) -> "reset: boot 1", store 1, reset; 1 -> "reset: boot 2", store 0,
 * PASS and power off. If the reset does not happen, the guest stores 0 and
 * reports FAIL.
 *
 * Command line: reset=kbd     pulse the reset line through the i8042 (default)
 *               reset=acpi    write RESET_VALUE to the FADT's RESET_REG
 *               reset=triple  triple fault (empty IDT, then an exception)
 *               reset=loop    reset through the i8042 at once, on every boot, forever
 *                             ("reset: loop N", N the boot count modulo 256): the
 *                             host's stop must end it whenever it comes
 */
#include "acpi.h"
#include "bootparams.h"
#include "cpu.h"
#include "power.h"
#include "printf.h"
#include "test.h"
#include "time.h"

const char guest_name[] = "reset";

#define CMOS_BOOT_COUNT 0x38

void guest_main(void)
{
	char how[16] = "kbd";

	t_start();
	cmdline_get("reset", how, sizeof(how));
	if (!strcmp(how, "loop")) {
		/* As little CPL0 work as a boot allows: a counter, one line, the reset. */
		u8 n = cmos_read(CMOS_BOOT_COUNT) + 1;
		cmos_write(CMOS_BOOT_COUNT, n);
		printf("reset: loop %u\n", n);
		reset_i8042();
		t_fail("reset through the i8042 (0xFE to port 0x64) did not reset the machine");
		return;
	}
	u8 reg_d = cmos_read(CMOS_REG_D);
	if (!t_check(reg_d == CMOS_REG_D_VRT, "the CMOS RTC/NVRAM is present",
		     "register D reads %x (QEMU microvm leaves the RTC out under KVM unless rtc=on)", reg_d))
		return;
	u8 count = cmos_read(CMOS_BOOT_COUNT);
	if (count == 1) {
		printf("reset: boot 2\n");
		cmos_write(CMOS_BOOT_COUNT, 0);
		t_check(cmos_read(CMOS_BOOT_COUNT) == 0, "CMOS boot counter cleared", "reads back %u",
			cmos_read(CMOS_BOOT_COUNT));
		t_pass("the machine reset and booted again (reset=%s)", how);
		return;
	}
	if (count != 0)
		t_info("cmos.0x38", "%u (taken as boot 1)", count);
	printf("reset: boot 1\n");
	cmos_write(CMOS_BOOT_COUNT, 1);
	if (!t_check(cmos_read(CMOS_BOOT_COUNT) == 1, "CMOS boot counter stored", "reads back %u",
		     cmos_read(CMOS_BOOT_COUNT)))
		return;

	if (!strcmp(how, "kbd")) {
		reset_i8042();
		t_fail("reset through the i8042 (0xFE to port 0x64) did not reset the machine");
	} else if (!strcmp(how, "acpi")) {
		acpi_init();
		t_info("fadt.reset_reg_sup", "%u", (fadt_u32(FADT_FLAGS) & FADT_F_RESET_REG_SUP) ? 1 : 0);
		struct acpi_gas g;
		if (fadt_gas(FADT_RESET_REG, &g))
			t_info("fadt.reset_reg", "space %u addr %lx value %x", g.space, g.address,
			       fadt_u8(FADT_RESET_VALUE));
		if (!reset_acpi())
			t_fail("the FADT has no usable RESET_REG");
		else
			t_fail("reset through the FADT RESET_REG did not reset the machine");
	} else if (!strcmp(how, "triple")) {
		triple_fault();
	} else {
		t_fail("unknown reset=%s (kbd, acpi or triple)", how);
	}
	cmos_write(CMOS_BOOT_COUNT, 0);
}
