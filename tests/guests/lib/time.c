/* CMOS RTC, TSC frequency and deadlines (guest, CPL0). */
#include "time.h"
#include "x86.h"

/* With no RTC, the TSC backstop assumes the fastest plausible TSC, so the
 * wait is at least as long as asked whatever the real frequency. */
#define TSC_HZ_BACKSTOP 5000000000ul
#define RTC_POLL_US 1000

static u64 cached_hz;
static bool hz_known;

u8 cmos_read(u8 index)
{
	outb(CMOS_INDEX, index);
	return inb(CMOS_DATA);
}

void cmos_write(u8 index, u8 value)
{
	outb(CMOS_INDEX, index);
	outb(CMOS_DATA, value);
}

static u64 hz_from_cpuid(void)
{
	u32 a, b, c, d, max;

	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c)
			return (u64)c * b / a;
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a & 0xFFFF)
			return (u64)(a & 0xFFFF) * 1000000;
	}
	cpuid(1, 0, &a, &b, &c, &d);
	if (c & (1u << 31)) { /* hypervisor present: the timing leaf (KVM, VMware) */
		cpuid(0x40000000, 0, &max, &b, &c, &d);
		if (max >= 0x40000010) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			if (a)
				return (u64)a * 1000;
		}
	}
	return 0;
}

u64 tsc_hz(void)
{
	if (!cached_hz) {
		cached_hz = hz_from_cpuid();
		hz_known = cached_hz != 0;
		if (!cached_hz)
			cached_hz = TSC_HZ_CEILING;
	}
	return cached_hz;
}

bool tsc_hz_known(void)
{
	tsc_hz();
	return hz_known;
}

void udelay(u64 us)
{
	u64 end = rdtsc() + tsc_hz() / 1000000 * us;

	while ((s64)(rdtsc() - end) < 0)
		cpu_relax();
}

/* Register D reads 0x80 (valid RAM and time) on a working RTC, 0xFF where there is none. */
static bool rtc_present(void)
{
	return cmos_read(CMOS_REG_D) == CMOS_REG_D_VRT;
}

void deadline_start(struct deadline *d, u32 seconds)
{
	u64 now = rdtsc();

	d->next_poll = now;
	if (!rtc_present()) {
		/* TSC only: exact if CPUID gave its frequency, else at least as long as asked. */
		d->ticks_left = 0;
		d->tsc_end = now + (tsc_hz_known() ? tsc_hz() : TSC_HZ_BACKSTOP) * seconds;
		return;
	}
	d->last_sec = cmos_read(CMOS_SECONDS);
	/* The first tick may come at once: count one more. */
	d->ticks_left = seconds + 1;
	d->tsc_end = now + TSC_HZ_BACKSTOP * (seconds + 1);
}

bool deadline_expired(struct deadline *d)
{
	u64 now = rdtsc();

	if ((s64)(now - d->tsc_end) >= 0)
		return true;
	if (!d->ticks_left)
		return false; /* no RTC: the TSC alone decides */
	/* Each RTC read is two VM exits: poll it about once a millisecond. */
	if ((s64)(now - d->next_poll) < 0)
		return false;
	d->next_poll = now + tsc_hz() / 1000000 * RTC_POLL_US;
	u8 s = cmos_read(CMOS_SECONDS);
	if (s != d->last_sec) {
		d->last_sec = s;
		if (--d->ticks_left == 0)
			return true;
	}
	return false;
}
