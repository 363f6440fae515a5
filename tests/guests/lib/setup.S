/*
 * The real-mode part of the bzImage: the setup header and the setup code that
 * firmware boot loaders (QEMU's qboot, SeaBIOS linuxboot) enter at
 * setup_seg:0x200 in real mode. It does only what a 32-bit entry needs:
 *   1. a zero page at setup_seg:ZERO_PAGE with the setup header copied in,
 *   2. the e820 map from BIOS int 0x15, eax=0xE820,
 *   3. protected mode, then a far jump to code32_start with ESI = zero page.
 * Real-mode code is emulated instruction by instruction on the machines this
 * runs on, so this is kept short. VMMs that use the 64-bit entry never run it.
 *
 * Fields marked "patched" are filled in by tools/mkbzimage.py.
 */
#define ZERO_PAGE 0x1000	/* offset in the setup segment: setup code fits below */
#define SETUP_STACK 0x3000	/* setup + zero page + stack stay within 12 KiB */
#define E820_ENTRY 20
#define E820_MAX 128
#define SMAP 0x534d4150
#define BP_E820_ENTRIES 0x1e8
#define BP_E820_TABLE 0x2d0
#define SEL_CODE32 0x10		/* the boot protocol's __BOOT_CS/__BOOT_DS */
#define SEL_DATA 0x18

	.code16
	.section .setup, "ax"
	.globl _setup_start
_setup_start:
	/* The boot sector is never executed: a boot loader jumps to 0x200. */
	.org 0x1f1
hdr:
setup_sects:	.byte 0			/* patched */
root_flags:	.word 0
syssize:	.long 0			/* patched: protected-mode part in 16-byte units */
ram_size:	.word 0
vid_mode:	.word 0xffff		/* NORMAL_VGA */
root_dev:	.word 0
boot_flag:	.word 0xaa55

	.org 0x200
	/* A short jump whose target marks the end of the header. */
	.byte 0xeb, setup_code - 0x202
header:		.ascii "HdrS"		/* 0x202 */
version:	.word 0x020f		/* 0x206: boot protocol 2.15 */
realmode_swtch:	.long 0			/* 0x208 */
start_sys_seg:	.word 0x1000		/* 0x20c: obsolete */
kernel_version:	.word version_string - 0x200	/* 0x20e */
type_of_loader:	.byte 0			/* 0x210: written by the loader */
loadflags:	.byte 0x01		/* 0x211: LOADED_HIGH */
setup_move_size: .word 0x8000		/* 0x212 */
code32_start:	.long 0x100000		/* 0x214 */
ramdisk_image:	.long 0			/* 0x218 */
ramdisk_size:	.long 0			/* 0x21c */
bootsect_kludge: .long 0		/* 0x220 */
heap_end_ptr:	.word 0			/* 0x224 */
ext_loader_ver:	.byte 0			/* 0x226 */
ext_loader_type: .byte 0		/* 0x227 */
cmd_line_ptr:	.long 0			/* 0x228 */
initrd_addr_max: .long 0x7fffffff	/* 0x22c */
kernel_alignment: .long 0x200000	/* 0x230 */
relocatable_kernel: .byte 0		/* 0x234: load at pref_address only */
min_alignment:	.byte 21		/* 0x235 */
xloadflags:	.word 0x0001		/* 0x236: XLF_KERNEL_64 */
cmdline_size:	.long 2047		/* 0x238 */
hardware_subarch: .long 0		/* 0x23c */
hardware_subarch_data: .quad 0		/* 0x240 */
payload_offset:	.long 0			/* 0x248 */
payload_length:	.long 0			/* 0x24c */
setup_data:	.quad 0			/* 0x250 */
pref_address:	.quad 0x100000		/* 0x258 */
init_size:	.long 0			/* 0x260: patched */
handover_offset: .long 0		/* 0x264 */
kernel_info_offset: .long 0		/* 0x268 */
hdr_end:

setup_code:
	cli
	cld
	/* Loaders enter with CS = setup_seg + 0x20, IP = 0 (or CS = setup_seg,
	 * IP = 0x200) and DS = setup_seg: make CS = DS so offsets match the link. */
	pushw %ds
	pushw $1f
	lretw
1:	movw %cs, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw $SETUP_STACK, %sp

	/* Zero page: cleared, then the setup header as the loader left it. */
	movw $ZERO_PAGE, %di
	movw $2048, %cx
	xorw %ax, %ax
	rep stosw
	movw $hdr, %si
	movw $ZERO_PAGE + (hdr - _setup_start), %di
	movw $(hdr_end - hdr), %cx
	rep movsb

	/* e820 map, one int 0x15 per entry, straight into the zero page. */
	xorl %ebx, %ebx
	xorw %bp, %bp
	movw $ZERO_PAGE + BP_E820_TABLE, %di
1:	movl $0xe820, %eax
	movl $E820_ENTRY, %ecx
	movl $SMAP, %edx
	int $0x15
	jc 2f
	cmpl $SMAP, %eax
	jne 2f
	incw %bp
	addw $E820_ENTRY, %di
	cmpw $E820_MAX, %bp
	jae 2f
	testl %ebx, %ebx
	jnz 1b
2:	movw %bp, %ax
	movb %al, ZERO_PAGE + BP_E820_ENTRIES

	/* Linear addresses: the GDT's and the zero page's. */
	xorl %ebx, %ebx
	movw %cs, %bx
	shll $4, %ebx
	addl %ebx, gdt_desc + 2
	lgdtl gdt_desc
	movl code32_start, %eax
	movl %eax, jump_target
	leal ZERO_PAGE(%ebx), %esi

	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	/* CS still carries the real-mode base until this jump reloads it. */
	ljmpl *%cs:jump_target

	.balign 8
gdt:
	.quad 0
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x10: flat 32-bit code */
	.quad 0x00cf92000000ffff	/* 0x18: flat data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt			/* + linear base of the setup segment */
jump_target:
	.long 0
	.word SEL_CODE32

version_string:
	.asciz "tenbox test guest"

	/* The setup part ends on a sector boundary; mkbzimage.py checks it. */
	.balign 512
