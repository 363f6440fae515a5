/* Addresses and selectors shared by the guests' assembly and C (guest). */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

/* The protected-mode image: linked and loaded at 1 MiB, not relocatable. */
#define IMAGE_BASE 0x100000
#define ENTRY64_OFFSET 0x200

/* GDT (the boot protocol's __BOOT_CS/__BOOT_DS at 0x10/0x18). */
#define SEL_CODE32 0x08
#define SEL_CODE64 0x10
#define SEL_DATA 0x18
#define SEL_USER_DATA 0x23 /* index 4, RPL 3 */
#define SEL_USER_CODE64 0x2B /* index 5, RPL 3 */
#define SEL_TSS 0x30 /* 16-byte descriptor: indexes 6 and 7 */
#define GDT_ENTRIES 8

/* Interrupt vectors. */
#define VEC_IRQ_BASE 0x30 /* GSI n arrives on vector 0x30 + n */
#define IRQ_VECTORS 32
#define VEC_USER_RETURN 0x80 /* int $0x80 from CPL3 returns to run_user's caller */
#define VEC_SPURIOUS 0xFF

/* RFLAGS for CPL3 code: IOPL=3 (port I/O allowed), IF=0, reserved bit 1.
 * kvm_pvm keeps neither: its CPL3 runs with IF=1 and IOPL=0, so the TSS I/O
 * bitmap (cpu.c) opens the ports and interrupt handlers must expect to
 * interrupt CPL3 code (they run on the TSS's RSP0 stack). */
#define USER_RFLAGS 0x3002

#define STACK_SIZE 0x4000
#define MAX_CPUS 64  /* tenbox-vm-runtime takes up to 64 vCPUs */
#define AP_STACK_SIZE 0x1000

#endif
