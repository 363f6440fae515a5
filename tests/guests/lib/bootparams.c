/* boot_params accessors and command-line lookup (guest, CPL0). */
#include "bootparams.h"

u8 *boot_params;

void boot_params_init(u64 addr)
{
	boot_params = (u8 *)addr;
}

u64 bp_cmdline_addr(void)
{
	return bp_u32(BP_CMD_LINE_PTR) | ((u64)bp_u32(BP_EXT_CMD_LINE_PTR) << 32);
}

const char *bp_cmdline(void)
{
	u64 a = bp_cmdline_addr();

	/* Only the low 4 GiB is mapped. */
	if (!a || a >= (1ul << 32))
		return NULL;
	return (const char *)a;
}

size_t bp_cmdline_len(bool *terminated)
{
	const char *c = bp_cmdline();
	u32 max = bp_u32(BP_CMDLINE_SIZE);

	if (!c) {
		*terminated = false;
		return 0;
	}
	if (!max || max > 0x100000)
		max = 255;
	size_t n = strnlen(c, (size_t)max + 1);
	*terminated = n <= max;
	return n;
}

u64 bp_ramdisk_image(void)
{
	return bp_u32(BP_RAMDISK_IMAGE) | ((u64)bp_u32(BP_EXT_RAMDISK_IMAGE) << 32);
}

u64 bp_ramdisk_size(void)
{
	return bp_u32(BP_RAMDISK_SIZE) | ((u64)bp_u32(BP_EXT_RAMDISK_SIZE) << 32);
}

u32 bp_e820_count(void)
{
	u32 n = bp_u8(BP_E820_ENTRIES);
	return n > E820_MAX ? E820_MAX : n;
}

const struct e820_entry *bp_e820(u32 i)
{
	return (const struct e820_entry *)(boot_params + BP_E820_TABLE + i * sizeof(struct e820_entry));
}

bool cmdline_get(const char *key, char *val, size_t size)
{
	bool term;
	const char *c = bp_cmdline();
	size_t len = bp_cmdline_len(&term), klen = strlen(key);

	if (!c)
		return false;
	for (size_t i = 0; i < len;) {
		while (i < len && c[i] == ' ')
			i++;
		size_t start = i;
		while (i < len && c[i] != ' ')
			i++;
		if (i - start > klen && !memcmp(c + start, key, klen) && c[start + klen] == '=') {
			size_t vs = start + klen + 1, vn = i - vs;
			if (size) {
				if (vn >= size)
					vn = size - 1;
				memcpy(val, c + vs, vn);
				val[vn] = '\0';
			}
			return true;
		}
	}
	return false;
}

u64 cmdline_get_u64(const char *key, u64 def, bool *present)
{
	char v[32];
	u64 n = 0;
	unsigned base = 10;
	const char *p = v;

	if (present)
		*present = false;
	if (!cmdline_get(key, v, sizeof(v)) || !v[0])
		return def;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	if (!*p)
		return def;
	for (; *p; p++) {
		unsigned d;
		if (*p >= '0' && *p <= '9')
			d = *p - '0';
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = *p - 'a' + 10;
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = *p - 'A' + 10;
		else
			return def;
		n = n * base + d;
	}
	if (present)
		*present = true;
	return n;
}
