/* CPU state at entry, descriptor tables, exceptions, IRQ dispatch and CPL3 calls (guest, CPL0). */
#ifndef GUEST_CPU_H
#define GUEST_CPU_H

#include "types.h"

/* Recorded by startup_64 before it changes anything (see head.S). */
struct entry_state {
	u64 rsi, rsp, rflags, cr0, cr3, cr4, efer;
	u16 cs, ds, es, ss;
	u16 gdt_limit;
	u64 gdt_base;
} PACKED;
extern struct entry_state entry_state;

/* Registers as the interrupt stubs save them (head.S). */
struct irq_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

/* Linker symbols: the image and its parts. */
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];

void cpu_init(void);
/* Load this CPU's copy of the shared GDT/IDT (APs). */
void cpu_load_tables(void);

typedef void (*irq_handler_t)(u32 vector);
void irq_set_handler(u32 vector, irq_handler_t fn);

/* Run fn(arg) at CPL3 with IOPL=3 and return its result. Not reentrant.
 * The whole identity map is user-accessible, so fn may read and write any
 * memory; it must not touch descriptor tables or control registers. */
u64 run_user(u64 (*fn)(u64), u64 arg);
/* "int $0x80" or, under kvm_pvm, "#UD at int $0x80" (for info lines). */
extern const char *user_return_path;

/* Halt this CPU for good. */
NORETURN void halt_forever(void);

/* The triple-fault reset: an empty IDT and an exception. */
NORETURN void triple_fault(void);

#endif
