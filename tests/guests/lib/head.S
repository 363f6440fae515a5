/*
 * Entry points, static page tables, GDT, stacks and interrupt stubs (guest, CPL0).
 *
 * The protected-mode image is linked at 1 MiB (IMAGE_BASE) and is entered
 *   - at +0x000 in 32-bit protected mode, from our own real-mode setup code
 *     (the classic bzImage path QEMU's firmware takes), or
 *   - at +0x200 in 64-bit long mode, straight from a VMM (tenbox, Firecracker,
 *     Cloud Hypervisor) or from the 32-bit entry below.
 * Kernel-mode code is emulated instruction by instruction on the machines
 * this runs on, so nothing here loops over memory except the .bss clear,
 * and the page tables are assembled, not computed.
 */
#include "layout.h"

#define MSR_EFER 0xC0000080
#define EFER_LME 0x100
#define CR0_PE_PG 0x80000001
#define CR4_PAE 0x20
#define CR4_SMEP_SMAP_PKE ((1 << 20) | (1 << 21) | (1 << 22))

/* entry_state offsets; struct entry_state in cpu.h must match. */
#define ES_RSI 0
#define ES_RSP 8
#define ES_RFLAGS 16
#define ES_CR0 24
#define ES_CR3 32
#define ES_CR4 40
#define ES_EFER 48
#define ES_CS 56
#define ES_DS 58
#define ES_ES 60
#define ES_SS 62
#define ES_GDTR 64

	.section .head32, "ax"
	.code32
	.globl startup_32
startup_32:
	/* From setup.S (or any 32-bit boot-protocol loader): ESI = boot_params,
	 * flat 4 GiB segments, paging off, interrupts off. */
	cli
	cld
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	lgdt gdt_desc
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $CR0_PE_PG, %eax
	movl %eax, %cr0
	ljmp $SEL_CODE64, $1f
	.code64
1:
	/* The 64-bit entry contract: DS=ES=SS=__BOOT_DS, RSI = boot_params. */
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %esi, %esi
	/* Our setup code was the loader on this path: tidy its e820 table. */
	leaq boot_stack_top(%rip), %rsp
	movq %rsi, %rbx
	movq %rsi, %rdi
	call fw_e820_sanitize
	movq %rbx, %rsi
	jmp startup_64

	.section .head64, "ax"
	.code64
	.globl startup_64
startup_64:
	/* Record the state the loader left, before any of it changes.
	 * None of these instructions touches RFLAGS or needs a stack. */
	movq %rsi, entry_state + ES_RSI(%rip)
	movq %rsp, entry_state + ES_RSP(%rip)
	movw %cs, entry_state + ES_CS(%rip)
	movw %ds, entry_state + ES_DS(%rip)
	movw %es, entry_state + ES_ES(%rip)
	movw %ss, entry_state + ES_SS(%rip)
	sgdt entry_state + ES_GDTR(%rip)
	movq %cr0, %rax
	movq %rax, entry_state + ES_CR0(%rip)
	movq %cr3, %rax
	movq %rax, entry_state + ES_CR3(%rip)
	movq %cr4, %rax
	movq %rax, entry_state + ES_CR4(%rip)
	movl $MSR_EFER, %ecx
	rdmsr
	movl %eax, entry_state + ES_EFER(%rip)
	movl %edx, entry_state + ES_EFER + 4(%rip)
	leaq boot_stack_top(%rip), %rsp
	pushfq
	popq entry_state + ES_RFLAGS(%rip)

	cli
	cld
	/* Zero .bss (kept small: every iteration is emulated). */
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq

	/* Our own GDT and page tables (user-accessible, for run_user). */
	lgdt gdt_desc(%rip)
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	pushq $SEL_CODE64
	leaq 2f(%rip), %rax
	pushq %rax
	lretq
2:
	leaq pml4(%rip), %rax
	movq %rax, %cr3
	movq %cr4, %rax
	andq $~CR4_SMEP_SMAP_PKE, %rax
	orq $CR4_PAE, %rax
	movq %rax, %cr4

	movq entry_state + ES_RSI(%rip), %rdi
	call kmain
	jmp halt_forever

	.text
	.globl halt_forever
halt_forever:
	cli
1:	hlt
	jmp 1b

	.globl cpu_load_tables
cpu_load_tables:
	lgdt gdt_desc(%rip)
	lidt idt_desc(%rip)
	ret

	.globl triple_fault
triple_fault:
	/* An empty IDT turns the first exception into a triple fault: reset.
	 * ud2 rather than int3: KVM's instruction emulator (all CPL0 code under
	 * kvm_pvm) cannot emulate a software interrupt in long mode. */
	cli
	lidt empty_idt_desc(%rip)
	ud2
	jmp triple_fault

/*
 * run_user(fn, arg): call fn(arg) at CPL3 with IOPL=3 and return its result.
 * fn ends in user_entry's "int $0x80", whose DPL-3 gate lands in user_return.
 */
	.globl run_user
run_user:
	pushq %rbp
	pushq %rbx
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	pushfq
	cli
	movq %rsp, user_saved_rsp(%rip)
	pushq $SEL_USER_DATA
	leaq user_stack_top(%rip), %rax
	pushq %rax
	pushq $USER_RFLAGS
	pushq $SEL_USER_CODE64
	leaq user_entry(%rip), %rax
	pushq %rax
	movq %rdi, %rax
	movq %rsi, %rdi
	iretq

user_entry:
	call *%rax
	movq %rax, %rdi
	.globl user_exit
user_exit:
	/* On PVM-style KVM (kvm_pvm) a software interrupt at CPL3 raises #UD
	 * here instead; exception_handler finishes the return then. */
	int $VEC_USER_RETURN
	ud2

	/* The int $0x80 gate (DPL 3); also called from exception_handler with
	 * RDI = the value, for the #UD fallback. Never returns to its caller. */
	.globl user_return_gate
user_return_gate:
	leaq str_int80(%rip), %rax
	movq %rax, user_return_path(%rip)
	.globl user_return
user_return:
	movq user_saved_rsp(%rip), %rsp
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq %rdi, %rax
	popfq
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbx
	popq %rbp
	ret

/* Exception and IRQ stubs: push (error code, vector), save all registers,
 * call the C handler with a struct irq_frame *. At entry the CPU has aligned
 * RSP to 16 and pushed 5 words; 2 + 15 more keep the call aligned. */
	.macro SAVE_AND_CALL fn
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi
	call \fn
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq
	.endm

exc_common:
	SAVE_AND_CALL exception_handler
irq_common:
	SAVE_AND_CALL irq_dispatch

	.macro EXC vec
	.if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq $0
	.endif
	pushq $\vec
	{disp32} jmp exc_common	/* fixed size: stubs sit 16 bytes apart */
	.endm

	.macro IRQ vec
	pushq $0
	pushq $\vec
	{disp32} jmp irq_common
	.endm

	/* .org fails the build if a stub outgrows its 16 bytes. */
	.balign 16
	.globl exc_stubs
exc_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	EXC \v
	.org exc_stubs + 16 * (\v + 1), 0xcc
	.endr

	/* One stub per IRQ vector, VEC_IRQ_BASE (0x30) onwards: 16 bytes each. */
	.globl irq_stubs
irq_stubs:
	.irp v, 48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79
	IRQ \v
	.org irq_stubs + 16 * (\v - VEC_IRQ_BASE + 1), 0xcc
	.endr

	.globl spurious_stub
spurious_stub:
	/* The LAPIC's spurious vector needs no EOI. */
	iretq

	.section .rodata
str_int80:
	.asciz "int $0x80"
	.balign 8
empty_idt_desc:
	.word 0
	.quad 0

	.data
	.balign 16
	.globl entry_state
entry_state:
	.fill 80, 1, 0

	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08: 32-bit code, DPL 0 */
	.quad 0x00af9a000000ffff	/* 0x10: 64-bit code, DPL 0 */
	.quad 0x00cf92000000ffff	/* 0x18: data, DPL 0 */
	.quad 0x00cff2000000ffff	/* 0x20: data, DPL 3 */
	.quad 0x00affa000000ffff	/* 0x28: 64-bit code, DPL 3 */
	.quad 0, 0			/* 0x30: 64-bit TSS, filled in by cpu_init */
gdt_end:
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.globl idt_desc
idt_desc:
	.word 256 * 16 - 1
	.quad idt

/*
 * Identity map of 0..4 GiB with 2 MiB pages, every level user-accessible
 * (run_user). The top GiB, where the MMIO hole is, is uncached (PCD|PWT).
 */
#define PTE_P_RW_U 0x7
#define PDE_LARGE 0x87
#define PDE_LARGE_UC 0x9f
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + PTE_P_RW_U
	.fill 511, 8, 0
pdpt:
	.quad pd + PTE_P_RW_U
	.quad pd + 0x1000 + PTE_P_RW_U
	.quad pd + 0x2000 + PTE_P_RW_U
	.quad pd + 0x3000 + PTE_P_RW_U
	.fill 508, 8, 0
pd:
	.set addr, 0
	.rept 2048
	.if addr >= 0xC0000000
	.quad addr + PDE_LARGE_UC
	.else
	.quad addr + PDE_LARGE
	.endif
	.set addr, addr + 0x200000
	.endr

/* Stacks are not zeroed: they live past .bss in a NOLOAD section. */
	.section .stack, "aw", @nobits
	.balign 16
	.skip STACK_SIZE
	.globl boot_stack_top
boot_stack_top:
	.skip STACK_SIZE
	.globl trap_stack_top
trap_stack_top:
	.skip STACK_SIZE
	.globl user_stack_top
user_stack_top:
	.globl ap_stacks
ap_stacks:
	.skip MAX_CPUS * AP_STACK_SIZE
	.globl ap_stacks_end
ap_stacks_end:

	.section .bss
	.balign 8
user_saved_rsp:
	.skip 8
