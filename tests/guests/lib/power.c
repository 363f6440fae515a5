/* ACPI S5 poweroff and the reset paths (guest, CPL0). */
#include "power.h"
#include "acpi.h"
#include "cpu.h"
#include "printf.h"
#include "test.h"
#include "time.h"
#include "x86.h"

#define SLP_TYP_SHIFT 10
#define SLP_TYP_MASK (7u << SLP_TYP_SHIFT)
#define SLP_EN (1u << 13)
#define HWR_SLP_TYP_SHIFT 2
#define HWR_SLP_EN (1u << 5)
#define I8042_STATUS 0x64
#define I8042_IBF 0x02
#define I8042_PULSE_RESET 0xFE
/* How long to wait for the i8042's input buffer; with no i8042 the status
 * port reads 0xFF (busy) forever, and every poll is a VM exit. */
#define I8042_WAIT_US 10000
/* A VMM acts on the write asynchronously: give it this long before concluding it failed. */
#define GRACE_SECONDS 2

static void pm1_sleep(u32 x_off, u32 legacy_off, u8 typ)
{
	struct acpi_gas g;

	if (!fadt_block(x_off, legacy_off, fadt_u8(FADT_PM1_CNT_LEN), &g))
		return;
	u32 v = (u32)gas_read(&g);
	v = (v & ~(SLP_TYP_MASK | SLP_EN)) | ((u32)(typ & 7) << SLP_TYP_SHIFT) | SLP_EN;
	gas_write(&g, v);
}

const char *acpi_sleep_s5(void)
{
	u8 a, b;

	if (!acpi_init() || !acpi.fadt)
		return "no FADT";
	if (!acpi_s5(&a, &b))
		return "no \\_S5_ in the DSDT";
	if (fadt_u32(FADT_FLAGS) & FADT_F_HW_REDUCED_ACPI) {
		struct acpi_gas g;
		if (!fadt_gas(FADT_SLEEP_CONTROL_REG, &g))
			return "hardware-reduced FADT without SLEEP_CONTROL_REG";
		gas_write(&g, ((u32)(a & 7) << HWR_SLP_TYP_SHIFT) | HWR_SLP_EN);
		return NULL;
	}
	struct acpi_gas g;
	if (!fadt_block(FADT_X_PM1A_CNT_BLK, FADT_PM1A_CNT_BLK, fadt_u8(FADT_PM1_CNT_LEN), &g))
		return "FADT without PM1a_CNT_BLK";
	pm1_sleep(FADT_X_PM1A_CNT_BLK, FADT_PM1A_CNT_BLK, a);
	pm1_sleep(FADT_X_PM1B_CNT_BLK, FADT_PM1B_CNT_BLK, b);
	return NULL;
}

static void grace_period(void)
{
	struct deadline d;

	deadline_start(&d, GRACE_SECONDS);
	while (!deadline_expired(&d))
		cpu_relax();
}

void power_off(void)
{
	cli();
	const char *why = acpi_sleep_s5();
	if (!why)
		grace_period();
	else
		printf("info - poweroff=%s\n", why);
	printf("TENBOX-GUEST %s poweroff-failed\n", guest_name);
	halt_forever();
}

void reset_i8042(void)
{
	u64 end = rdtsc() + tsc_hz() / 1000000 * I8042_WAIT_US;

	while ((inb(I8042_STATUS) & I8042_IBF) && (s64)(rdtsc() - end) < 0)
		cpu_relax();
	outb(I8042_STATUS, I8042_PULSE_RESET);
	grace_period();
}

bool reset_acpi(void)
{
	struct acpi_gas g;

	if (!acpi_init() || !fadt_gas(FADT_RESET_REG, &g))
		return false;
	gas_write(&g, fadt_u8(FADT_RESET_VALUE));
	grace_period();
	return true;
}
