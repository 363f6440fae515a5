/* Time sources for timeouts: the CMOS RTC's seconds and the TSC (guest, CPL0).
 *
 * Under instruction emulation a loop count says nothing about time, so every
 * wait is bounded by the RTC (real seconds) with a TSC backstop in case the
 * machine has no RTC.
 */
#ifndef GUEST_TIME_H
#define GUEST_TIME_H

#include "types.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_SECONDS 0x00
#define CMOS_REG_D 0x0D
#define CMOS_REG_D_VRT 0x80

u8 cmos_read(u8 index);
void cmos_write(u8 index, u8 value);

/* TSC ticks per second from CPUID (leaves 0x15, 0x16, 0x40000010); when the
 * CPU does not say, TSC_HZ_CEILING, so TSC delays are never shorter than asked. */
#define TSC_HZ_CEILING 4000000000ul
u64 tsc_hz(void);
bool tsc_hz_known(void);
void udelay(u64 us);

struct deadline {
	u8 last_sec;
	u32 ticks_left;
	u64 tsc_end;
	u64 next_poll;
};
void deadline_start(struct deadline *d, u32 seconds);
bool deadline_expired(struct deadline *d);

#endif
