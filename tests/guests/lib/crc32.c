/* Bitwise CRC-32: slow per byte, but it runs at CPL3 (native) and needs no table. */
#include "crc32.h"
#include "cpu.h"

struct crc_job {
	const u8 *data;
	u64 len;
};

static u64 crc32_job(u64 arg)
{
	const struct crc_job *j = (const struct crc_job *)arg;
	u32 crc = 0xFFFFFFFFu;

	for (u64 i = 0; i < j->len; i++) {
		crc ^= j->data[i];
		for (int b = 0; b < 8; b++)
			crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
	}
	return crc ^ 0xFFFFFFFFu;
}

u32 crc32_user(const void *data, u64 len)
{
	struct crc_job j = { data, len };
	return (u32)run_user(crc32_job, (u64)&j);
}
