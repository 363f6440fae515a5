/* CRC-32 (IEEE 802.3, the zlib.crc32 one), computed at CPL3 where it runs natively (guest). */
#ifndef GUEST_CRC32_H
#define GUEST_CRC32_H

#include "types.h"

u32 crc32_user(const void *data, u64 len);

#endif
