/* IDT, TSS, exception reports and IRQ dispatch (guest, CPL0). */
#include "cpu.h"
#include "apic.h"
#include "layout.h"
#include "power.h"
#include "printf.h"
#include "serial.h"
#include "test.h"
#include "x86.h"

struct idt_gate {
	u16 off_lo;
	u16 selector;
	u8 ist;
	u8 type;
	u16 off_mid;
	u32 off_hi;
	u32 reserved;
} PACKED;

struct tss64 {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} PACKED;

_Static_assert(sizeof(struct idt_gate) == 16, "IDT gate size");
_Static_assert(sizeof(struct tss64) == 104, "TSS size");
_Static_assert(offsetof(struct entry_state, gdt_base) == 66, "entry_state layout (head.S)");
_Static_assert(sizeof(struct irq_frame) == 22 * 8, "irq_frame layout (head.S)");

#define GATE_INTERRUPT 0x8E /* present, DPL 0, 64-bit interrupt gate */
#define GATE_DPL3 0x60
#define TSS_AVAILABLE 0x89
#define STUB_SIZE 16

struct idt_gate idt[256] __attribute__((aligned(16)));
/* Ports 0..IO_BITMAP_PORTS-1 are open to CPL3 through the TSS I/O bitmap as
 * well as through IOPL=3. Real CPUs look at IOPL first; kvm_pvm does not keep
 * a guest's IOPL at CPL3 and emulates the faulting "out" against the bitmap. */
#define IO_BITMAP_PORTS 0x1000
static struct {
	struct tss64 tss;
	u8 io_bitmap[IO_BITMAP_PORTS / 8];
	u8 io_bitmap_end; /* the CPU reads one byte past the bitmap: all ones */
} PACKED tss_io __attribute__((aligned(16)));
static irq_handler_t irq_handlers[IRQ_VECTORS];

extern u64 gdt[GDT_ENTRIES];
extern char exc_stubs[], irq_stubs[], spurious_stub[], trap_stack_top[], user_exit[];
NORETURN void user_return(u64 value);
extern char user_return_gate[];

/* How the last run_user() got back to CPL0 (see user_exit in head.S). */
const char *user_return_path = "none";

static void set_gate(u32 vec, void *handler, u8 type)
{
	u64 a = (u64)handler;
	struct idt_gate *g = &idt[vec];

	g->off_lo = (u16)a;
	g->selector = SEL_CODE64;
	g->ist = 0;
	g->type = type;
	g->off_mid = (u16)(a >> 16);
	g->off_hi = (u32)(a >> 32);
}

void cpu_init(void)
{
	u64 base = (u64)&tss_io;

	/* Interrupts from CPL3 switch to the trap stack. */
	tss_io.tss.rsp0 = (u64)trap_stack_top;
	tss_io.tss.iomap_base = sizeof(struct tss64);
	tss_io.io_bitmap_end = 0xFF;
	gdt[SEL_TSS / 8] = (sizeof(tss_io) - 1) | ((base & 0xFFFFFF) << 16) | ((u64)TSS_AVAILABLE << 40) |
			   (((base >> 24) & 0xFF) << 56);
	gdt[SEL_TSS / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

	for (u32 v = 0; v < 32; v++)
		set_gate(v, exc_stubs + v * STUB_SIZE, GATE_INTERRUPT);
	for (u32 i = 0; i < IRQ_VECTORS; i++)
		set_gate(VEC_IRQ_BASE + i, irq_stubs + i * STUB_SIZE, GATE_INTERRUPT);
	set_gate(VEC_SPURIOUS, spurious_stub, GATE_INTERRUPT);
	set_gate(VEC_USER_RETURN, user_return_gate, GATE_INTERRUPT | GATE_DPL3);
	cpu_load_tables();
}

void irq_set_handler(u32 vector, irq_handler_t fn)
{
	if (vector >= VEC_IRQ_BASE && vector < VEC_IRQ_BASE + IRQ_VECTORS)
		irq_handlers[vector - VEC_IRQ_BASE] = fn;
}

void irq_dispatch(struct irq_frame *f)
{
	u32 i = (u32)f->vector - VEC_IRQ_BASE;

	if (i < IRQ_VECTORS && irq_handlers[i])
		irq_handlers[i]((u32)f->vector);
	else
		printf("info - unexpected-irq=vector %u\n", (u32)f->vector);
	lapic_eoi();
}

static const char *const exc_names[32] = {
	"#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
	"#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor overrun",
	"#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
	"#PF page fault", "reserved 15", "#MF x87 error", "#AC alignment check", "#MC machine check",
	"#XM SIMD error", "#VE virtualization", "#CP control protection",
};

static volatile u32 in_exception;

void exception_handler(struct irq_frame *f)
{
	u32 v = (u32)f->vector;
	u64 cr2;

	if (v == 6 && (f->cs & 3) == 3 && f->rip == (u64)user_exit) {
		/* kvm_pvm turns "int $0x80" at CPL3 into #UD: same return, other door. */
		user_return_path = "#UD at int $0x80";
		user_return(f->rdi);
	}
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	if (__atomic_exchange_n(&in_exception, 1, __ATOMIC_ACQUIRE)) {
		/* A fault while reporting a fault: say so as plainly as possible. */
		serial_force_unlock();
		serial_puts("\nnot ok - nested exception\n");
		halt_forever();
	}
	serial_force_unlock();
	t_fail("exception vector=%u (%s) rip=%lx err=%lx cr2=%lx cs=%lx rsp=%lx", v,
	       exc_names[v] ? exc_names[v] : "reserved", f->rip, f->error, cr2, f->cs, f->rsp);
	t_finish();
}
