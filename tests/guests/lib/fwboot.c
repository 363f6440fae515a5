/* The firmware path's last loader step, run between startup_32 and startup_64 (guest, CPL0).
 *
 * On the classic bzImage path our own setup code (setup.S) is the boot loader
 * that builds boot_params, and it copies the BIOS e820 answers verbatim. QEMU's
 * qboot answers with entries out of order and a trailing empty one, which
 * Linux tidies up before use (e820__update_table). This does the same, so the
 * 64-bit entry sees the sorted table a VMM would build. Runs before .bss is
 * cleared: it must touch nothing but boot_params.
 */
#include "bootparams.h"

void fw_e820_sanitize(u8 *bp);

void fw_e820_sanitize(u8 *bp)
{
	struct e820_entry *t = (struct e820_entry *)(bp + BP_E820_TABLE);
	u32 n = bp[BP_E820_ENTRIES], kept = 0;

	if (n > E820_MAX)
		n = E820_MAX;
	for (u32 i = 0; i < n; i++) {
		if (!t[i].size)
			continue;
		/* Insertion sort by address: a handful of entries. */
		struct e820_entry e = t[i];
		u32 j = kept++;
		while (j && t[j - 1].addr > e.addr) {
			t[j] = t[j - 1];
			j--;
		}
		t[j] = e;
	}
	bp[BP_E820_ENTRIES] = (u8)kept;
}
