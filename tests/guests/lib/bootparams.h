/* The Linux boot_params ("zero page") the loader hands over in RSI (guest, CPL0). */
#ifndef GUEST_BOOTPARAMS_H
#define GUEST_BOOTPARAMS_H

#include "types.h"

/* Offsets in boot_params (Documentation/arch/x86/zero-page.rst, boot.rst). */
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_EXT_RAMDISK_IMAGE 0x0C0
#define BP_EXT_RAMDISK_SIZE 0x0C4
#define BP_EXT_CMD_LINE_PTR 0x0C8
#define BP_E820_ENTRIES 0x1E8
#define BP_HDR 0x1F1
#define BP_BOOT_FLAG 0x1FE
#define BP_HEADER_MAGIC 0x202
#define BP_VERSION 0x206
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS 0x211
#define BP_CODE32_START 0x214
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21C
#define BP_CMD_LINE_PTR 0x228
#define BP_INITRD_ADDR_MAX 0x22C
#define BP_CMDLINE_SIZE 0x238
#define BP_PREF_ADDRESS 0x258
#define BP_INIT_SIZE 0x260
#define BP_E820_TABLE 0x2D0
#define E820_MAX 128

#define E820_RAM 1

struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} PACKED;

extern u8 *boot_params;

void boot_params_init(u64 addr);
static inline u8 bp_u8(u32 off) { return boot_params[off]; }
static inline u16 bp_u16(u32 off) { return get_u16(boot_params + off); }
static inline u32 bp_u32(u32 off) { return get_u32(boot_params + off); }
static inline u64 bp_u64(u32 off) { return get_u64(boot_params + off); }

u64 bp_cmdline_addr(void);
/* The command line, or NULL when the loader gave none. */
const char *bp_cmdline(void);
/* Length up to the NUL within cmdline_size + 1 bytes; *terminated says if one was found. */
size_t bp_cmdline_len(bool *terminated);
u64 bp_ramdisk_image(void);
u64 bp_ramdisk_size(void);
u32 bp_e820_count(void);
const struct e820_entry *bp_e820(u32 i);

/* key=value lookup on the command line (words split at spaces). */
bool cmdline_get(const char *key, char *val, size_t size);
/* Decimal or 0x-hex value of key, or def when absent or malformed. */
u64 cmdline_get_u64(const char *key, u64 def, bool *present);

#endif
