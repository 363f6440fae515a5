/* 8259 PIC masking, the local xAPIC and the IOAPICs from the MADT (guest, CPL0). */
#ifndef GUEST_APIC_H
#define GUEST_APIC_H

#include "types.h"

#define LAPIC_DEFAULT_BASE 0xFEE00000ul
#define LAPIC_ID 0x020
#define LAPIC_VERSION 0x030
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310

#define ICR_INIT 0x00000500
#define ICR_STARTUP 0x00000600
#define ICR_ASSERT 0x00004000
#define ICR_BUSY 0x00001000

void pic_mask_all(void);
/* Base from the MADT (0xFEE00000 if there is none), software-enable with the spurious vector. */
void lapic_init(void);
u64 lapic_base(void);
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 value);
u32 lapic_id(void);
void lapic_eoi(void);
/* Send an IPI; false if the ICR stays busy. */
bool lapic_ipi(u32 dest_apic_id, u32 icr_low);

/* Program the redirection entry of a GSI; false if no IOAPIC serves it. */
bool ioapic_route(u32 gsi, u8 vector, bool level, bool active_low, u32 dest_apic_id);
/* Route an ISA IRQ as the MADT's overrides say; returns the vector, or 0. */
u8 irq_route_isa(u8 irq);

#endif
