/*
 * The AP start-up trampoline (guest, CPL0), copied to TRAMP_BASE (0x6000) by
 * the smp guest; a SIPI with vector 0x06 starts an AP there in real mode.
 * Real mode -> protected mode -> long mode with the image's static page
 * tables, then ap_entry64 in the image takes a stack of its own.
 * Everything before ap_entry64 is position-independent apart from
 * TRAMP_BASE itself.
 */
#include "layout.h"

#define TRAMP_BASE 0x6000
#define MSR_EFER 0xC0000080
#define EFER_LME 0x100
#define CR0_PE_PG 0x80000001
#define CR4_PAE 0x20

	.section .rodata
	.code16
	.globl ap_tramp_start
ap_tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tramp_gdt_desc - ap_tramp_start
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $(TRAMP_BASE + ap32 - ap_tramp_start)

	.code32
ap32:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
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
	ljmp $SEL_CODE64, $ap_entry64

	.balign 8
tramp_gdt_desc:
	.word GDT_ENTRIES * 8 - 1
	.long gdt			/* the image's GDT, below 4 GiB */
	.globl ap_tramp_end
ap_tramp_end:

	.text
	.code64
ap_entry64:
	/* Each AP takes the next AP_STACK_SIZE slice of ap_stacks. */
	movl $AP_STACK_SIZE, %eax
	lock xaddq %rax, ap_stack_next(%rip)
	leaq AP_STACK_SIZE(%rax), %rsp
	call ap_main
	jmp halt_forever
