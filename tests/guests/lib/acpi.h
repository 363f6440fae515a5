/* ACPI tables as Linux finds them: RSDP, XSDT/RSDT, FADT, MADT, DSDT (guest, CPL0).
 *
 * Scans and checksums run at CPL3 through run_user(), where they execute
 * natively instead of instruction by instruction.
 */
#ifndef GUEST_ACPI_H
#define GUEST_ACPI_H

#include "types.h"

struct acpi_sdt {
	char sig[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem_id[6];
	char oem_table_id[8];
	u32 oem_revision;
	u32 creator_id;
	u32 creator_revision;
} PACKED;

/* Generic Address Structure. */
struct acpi_gas {
	u8 space;
	u8 bit_width;
	u8 bit_offset;
	u8 access_size;
	u64 address;
} PACKED;

#define GAS_MEMORY 0
#define GAS_IO 1

/* FADT fields (byte offsets in the table). */
#define FADT_DSDT 40
#define FADT_SCI_INT 46
#define FADT_SMI_CMD 48
#define FADT_ACPI_ENABLE 52
#define FADT_PM1A_EVT_BLK 56
#define FADT_PM1B_EVT_BLK 60
#define FADT_PM1A_CNT_BLK 64
#define FADT_PM1B_CNT_BLK 68
#define FADT_PM1_EVT_LEN 88
#define FADT_PM1_CNT_LEN 89
#define FADT_FLAGS 112
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_X_DSDT 140
#define FADT_X_PM1A_EVT_BLK 148
#define FADT_X_PM1B_EVT_BLK 160
#define FADT_X_PM1A_CNT_BLK 172
#define FADT_X_PM1B_CNT_BLK 184
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_SLEEP_STATUS_REG 256

#define FADT_F_RESET_REG_SUP (1u << 10)
#define FADT_F_HW_REDUCED_ACPI (1u << 20)

#define MADT_MAX_CPUS 64
#define MADT_MAX_IOAPICS 8
#define MADT_MAX_ISOS 16

struct madt_cpu {
	u32 apic_id;
	u32 uid;
	bool enabled;
	bool x2apic;
};

struct madt_ioapic {
	u32 id;
	u32 addr;
	u32 gsi_base;
};

struct madt_iso {
	u8 bus;
	u8 source;
	u32 gsi;
	u16 flags;
};

/* MPS INTI flags in an interrupt source override. */
#define MPS_POLARITY_MASK 0x3
#define MPS_ACTIVE_HIGH 0x1
#define MPS_ACTIVE_LOW 0x3
#define MPS_TRIGGER_MASK 0xC
#define MPS_EDGE 0x4
#define MPS_LEVEL 0xC

struct madt_info {
	u64 lapic_addr;
	u32 ncpus;
	struct madt_cpu cpus[MADT_MAX_CPUS];
	u32 nioapics;
	struct madt_ioapic ioapics[MADT_MAX_IOAPICS];
	u32 nisos;
	struct madt_iso isos[MADT_MAX_ISOS];
};

#define ACPI_MAX_TABLES 32

struct acpi_info {
	bool initialised;
	bool found;
	u64 rsdp;
	const char *rsdp_method; /* "boot_params", "ebda" or "bios" */
	u8 rsdp_revision;
	const struct acpi_sdt *root; /* XSDT, or RSDT when there is no XSDT */
	u32 ntables;
	const struct acpi_sdt *tables[ACPI_MAX_TABLES];
	const struct acpi_sdt *fadt, *madt, *dsdt;
	struct madt_info madt_info;
};
extern struct acpi_info acpi;

/* Each RSDP search method on its own; 0 when it finds nothing valid. */
u64 acpi_rsdp_from_boot_params(void);
u64 acpi_rsdp_from_ebda(void);
u64 acpi_rsdp_from_bios(void);
/* Signature, 20-byte checksum and (revision >= 2) extended checksum. */
bool acpi_rsdp_valid(u64 addr);
bool acpi_rsdp_checksum_ok(u64 addr, bool extended);

/* Find the RSDP (boot_params, EBDA, BIOS area: the first that has one) and
 * the tables. Idempotent; returns acpi.found. */
bool acpi_init(void);
u8 acpi_sum(const void *p, u32 len);
bool acpi_table_ok(const struct acpi_sdt *t);
const struct acpi_sdt *acpi_find_table(const char sig[4]);

/* FADT helpers (0 / false when the FADT is too short for the field). */
u32 fadt_u32(u32 off);
u16 fadt_u16(u32 off);
u8 fadt_u8(u32 off);
u64 fadt_u64(u32 off);
bool fadt_gas(u32 off, struct acpi_gas *g);
/* X_ GAS when present, else the 32-bit I/O port field of len_bytes. */
bool fadt_block(u32 x_off, u32 legacy_off, u32 len, struct acpi_gas *g);
u64 gas_read(const struct acpi_gas *g);
void gas_write(const struct acpi_gas *g, u64 value);

/* SLP_TYPa/b from the \_S5_ package in the DSDT; false if there is none. */
bool acpi_s5(u8 *slp_typa, u8 *slp_typb);

/* Bytes search in a table's body, at CPL3. */
u32 acpi_count(const struct acpi_sdt *t, const void *needle, u32 len);
/* Offset of the first occurrence at or after from, or -1. */
s64 acpi_find(const struct acpi_sdt *t, u32 from, const void *needle, u32 len);

/* The MADT's GSI, trigger and polarity for an ISA IRQ (identity, edge, high without an override). */
void acpi_isa_irq(u8 irq, u32 *gsi, bool *level, bool *active_low, bool *overridden);

#endif
