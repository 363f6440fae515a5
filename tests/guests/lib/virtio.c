/* virtio-mmio v2 discovery, handshake, interrupts and split virtqueues (guest, CPL0; fast path CPL0 or CPL3). */
#include "virtio.h"
#include "acpi.h"
#include "apic.h"
#include "bootparams.h"
#include "cpu.h"
#include "layout.h"
#include "printf.h"
#include "time.h"
#include "x86.h"

#define MIB (1ul << 20)
#define MEM_BASE (16 * MIB) /* clear of the image, the setup data and the low firmware areas */
#define MEM_FALLBACK_ALIGN (64 * 1024)
#define MAPPED_LIMIT (3ul << 30) /* the static map caches RAM below 3 GiB */
#define RESET_POLLS 100000
#define CONFIG_GEN_TRIES 16
#define PAGE 4096

/* ---- guest memory for the devices ---- */

static u64 mem_next, mem_end;
static bool mem_ready;

struct fill_job {
	u8 *p;
	u64 len;
	u8 byte;
};

static u64 fill_job(u64 arg)
{
	const struct fill_job *j = (const struct fill_job *)arg;
	memset(j->p, j->byte, j->len);
	return 0;
}

static u64 check_job(u64 arg)
{
	const struct fill_job *j = (const struct fill_job *)arg;
	const u8 *p = j->p;

	for (u64 i = 0; i < j->len; i++)
		if (p[i] != j->byte)
			return i;
	return j->len;
}

void virtio_fill(void *p, u8 byte, u64 len)
{
	struct fill_job j = { p, len, byte };
	run_user(fill_job, (u64)&j);
}

u64 virtio_check_fill(const void *p, u8 byte, u64 len)
{
	struct fill_job j = { (u8 *)p, len, byte };
	return run_user(check_job, (u64)&j);
}

/* The e820 RAM entry at MEM_BASE (or, on a small VM, the one holding the
 * image's end), less the initrd. */
static void mem_setup(void)
{
	u64 image_end = ALIGN_UP((u64)__image_end, MEM_FALLBACK_ALIGN);
	u64 start = 0, end = 0;

	mem_ready = true;
	for (u32 pass = 0; pass < 2 && !end; pass++) {
		u64 want = pass == 0 ? MEM_BASE : image_end;
		for (u32 i = 0; i < bp_e820_count(); i++) {
			const struct e820_entry *e = bp_e820(i);
			if (e->type != E820_RAM || want < e->addr || want >= e->addr + e->size)
				continue;
			start = want;
			end = e->addr + e->size;
			break;
		}
	}
	if (end > MAPPED_LIMIT)
		end = MAPPED_LIMIT;
	u64 rd = bp_ramdisk_image(), rd_size = bp_ramdisk_size();
	if (rd_size && rd < end && rd + rd_size > start) {
		if (rd > start)
			end = rd;
		else
			start = ALIGN_UP(rd + rd_size, PAGE);
	}
	mem_next = start;
	mem_end = end > start ? end : start;
}

void *virtio_alloc(u64 size, u64 align, bool zero)
{
	if (!mem_ready)
		mem_setup();
	if (align < 16)
		align = 16;
	u64 a = ALIGN_UP(mem_next, align);
	if (!size || a + size > mem_end || a + size < a)
		return NULL;
	mem_next = a + size;
	if (zero)
		virtio_fill((void *)a, 0, size);
	return (void *)a;
}

u64 virtio_mem_left(void)
{
	if (!mem_ready)
		mem_setup();
	return mem_end - mem_next;
}

/* ---- discovery: LNRO0005 devices and their _CRS in the DSDT (CPL3) ---- */

struct discover_job {
	const u8 *t;
	u32 len;
	struct virtio_mmio_res *out;
	u32 max;
};

/* AML PkgLength at p: the encoded length (counting its own bytes) and its size. */
static u32 pkg_length(const u8 *p, const u8 *end, u32 *nbytes)
{
	if (p >= end)
		return 0;
	u32 extra = p[0] >> 6, len;
	if (p + 1 + extra > end)
		return 0;
	if (!extra) {
		len = p[0] & 0x3F;
	} else {
		len = p[0] & 0x0F;
		for (u32 i = 0; i < extra; i++)
			len |= (u32)p[1 + i] << (4 + 8 * i);
	}
	*nbytes = 1 + extra;
	return len;
}

/* An AML integer (BufferSize): ZeroOp, OneOp, Byte/Word/DWordPrefix. Its size, or 0. */
static u32 aml_int_len(const u8 *p, const u8 *end)
{
	if (p >= end)
		return 0;
	switch (p[0]) {
	case 0x00: case 0x01: case 0xFF: return 1;
	case 0x0A: return 2;
	case 0x0B: return 3;
	case 0x0C: return 5;
	case 0x0E: return 9;
	default: return 0;
	}
}

/* Walk a resource template: Memory32Fixed, Memory32, DWord/QWord memory
 * address spaces; Extended Interrupt and the small IRQ descriptor. */
static void parse_resources(const u8 *p, const u8 *end, struct virtio_mmio_res *r, bool *have_mem)
{
	while (p < end) {
		u8 b = p[0];
		if (!(b & 0x80)) {
			u32 tag = (b >> 3) & 0xF, len = b & 7;
			if (tag == 0xF || p + 1 + len > end)
				return;
			if (tag == 0x4 && len >= 2 && !r->have_irq) {
				u16 mask = get_u16(p + 1);
				for (u32 i = 0; i < 16; i++)
					if (mask & (1u << i)) {
						r->gsi = i;
						r->have_irq = true;
						break;
					}
				u8 info = len >= 3 ? p[3] : 0x01;
				r->level = !(info & 0x01);
				r->active_low = info & 0x08;
			}
			p += 1 + len;
			continue;
		}
		if (p + 3 > end)
			return;
		u32 len = get_u16(p + 1);
		const u8 *body = p + 3;
		if (body + len > end)
			return;
		if (b == 0x86 && len >= 9 && !*have_mem) { /* Memory32Fixed */
			r->base = get_u32(body + 1);
			r->size = get_u32(body + 5);
			*have_mem = true;
		} else if (b == 0x85 && len >= 17 && !*have_mem) { /* Memory32: min, max, align, length */
			r->base = get_u32(body + 1);
			r->size = get_u32(body + 13);
			*have_mem = true;
		} else if (b == 0x87 && len >= 23 && body[0] == 0 && !*have_mem) { /* DWord memory */
			r->base = get_u32(body + 7);
			r->size = get_u32(body + 19);
			*have_mem = true;
		} else if (b == 0x8A && len >= 43 && body[0] == 0 && !*have_mem) { /* QWord memory */
			r->base = get_u64(body + 11);
			r->size = (u32)get_u64(body + 35);
			*have_mem = true;
		} else if (b == 0x89 && len >= 6 && body[1] >= 1 && !r->have_irq) { /* Extended Interrupt */
			r->gsi = get_u32(body + 2);
			r->level = !(body[0] & 0x02);
			r->active_low = body[0] & 0x04;
			r->have_irq = true;
		}
		p = body + len;
	}
}

static u64 discover_job(u64 arg)
{
	const struct discover_job *j = (const struct discover_job *)arg;
	const u8 *t = j->t, *tend = t + j->len;
	u32 n = 0;
	s64 last_dev = -1;

	for (u32 i = sizeof(struct acpi_sdt); i + 8 <= j->len && n < j->max; i++) {
		if (t[i] != 'L' || memcmp(t + i, "LNRO0005", 8))
			continue;
		/* The nearest DeviceOp (5B 82) before the _HID whose package encloses it. */
		s64 dev = -1;
		u32 dev_end = j->len;
		for (s64 d = (s64)i - 2; d >= (s64)sizeof(struct acpi_sdt) && d > (s64)i - 4096; d--) {
			if (t[d] != 0x5B || t[d + 1] != 0x82)
				continue;
			u32 nb, len = pkg_length(t + d + 2, tend, &nb);
			if (len && d + 2 + len > i && d + 2 + len <= j->len) {
				dev = d;
				dev_end = (u32)(d + 2 + len);
				break;
			}
		}
		if (dev >= 0 && dev == last_dev)
			continue; /* a second LNRO0005 (a _CID) in the same device */
		last_dev = dev;
		if (dev < 0 && dev_end > i + 512)
			dev_end = i + 512;

		struct virtio_mmio_res r;
		bool have_mem = false;
		memset(&r, 0, sizeof(r));
		const u8 *scan = dev >= 0 ? t + dev : t + i, *send = t + dev_end;
		/* Name (_CRS, Buffer (size) { descriptors }). */
		for (const u8 *p = scan; p + 6 <= send && !have_mem; p++) {
			if (p[0] != '_' || memcmp(p, "_CRS", 4) || p[4] != 0x11)
				continue;
			u32 nb, blen = pkg_length(p + 5, send, &nb);
			const u8 *bend = p + 5 + blen;
			if (!blen || bend > send)
				continue;
			u32 il = aml_int_len(p + 5 + nb, bend);
			if (!il)
				continue;
			parse_resources(p + 5 + nb + il, bend, &r, &have_mem);
		}
		/* No _CRS buffer: the first Memory32Fixed and Extended Interrupt in the device. */
		if (!have_mem) {
			for (const u8 *p = scan; p + 12 <= send && !have_mem; p++)
				if (p[0] == 0x86 && p[1] == 9 && p[2] == 0)
					parse_resources(p, p + 12, &r, &have_mem);
			for (const u8 *p = scan; p + 9 <= send && !r.have_irq; p++)
				if (p[0] == 0x89 && p[1] >= 6 && p[2] == 0 && p[4] >= 1)
					parse_resources(p, p + 3 + p[1], &r, &have_mem);
		}
		if (have_mem)
			j->out[n++] = r;
	}
	return n;
}

u32 virtio_discover(struct virtio_mmio_res *out, u32 max)
{
	if (!acpi_init() || !acpi.dsdt)
		return 0;
	struct discover_job j = { (const u8 *)acpi.dsdt, acpi.dsdt->length, out, max };
	return (u32)run_user(discover_job, (u64)&j);
}

static struct virtio_mmio_res found[VIRTIO_MAX_DEVICES];
static u32 nfound;
static bool discovered;

bool virtio_find(u32 device_id, u32 index, struct virtio_dev *d, bool verbose)
{
	u32 seen = 0;

	if (!discovered) {
		nfound = virtio_discover(found, VIRTIO_MAX_DEVICES);
		discovered = true;
	}
	if (verbose)
		printf("info - virtio.devices=%u in the DSDT\n", nfound);
	for (u32 i = 0; i < nfound; i++) {
		const struct virtio_mmio_res *r = &found[i];
		u32 magic = 0, version = 0, id = 0, vendor = 0;
		if (r->base && r->base + 0x100 <= (1ul << 32)) {
			magic = mmio_read32(r->base + VIRTIO_MMIO_MAGIC);
			version = mmio_read32(r->base + VIRTIO_MMIO_VERSION);
			id = mmio_read32(r->base + VIRTIO_MMIO_DEVICE_ID);
			vendor = mmio_read32(r->base + VIRTIO_MMIO_VENDOR_ID);
		}
		if (verbose)
			printf("info - virtio.%u=base %lx size %x gsi %u %s %s magic %x version %u device %u vendor %x\n", i,
			       r->base, r->size, r->gsi, r->have_irq ? (r->level ? "level" : "edge") : "no-irq",
			       r->active_low ? "active-low" : "active-high", magic, version, id, vendor);
		if (magic != VIRTIO_MMIO_MAGIC_VALUE || id != device_id)
			continue;
		if (seen++ != index)
			continue;
		memset(d, 0, sizeof(*d));
		d->res = *r;
		d->base = r->base;
		d->version = version;
		d->device_id = id;
		d->vendor_id = vendor;
		return true;
	}
	return false;
}

/* ---- the handshake ---- */

u32 virtio_status(const struct virtio_dev *d)
{
	return virtio_read32(d, VIRTIO_MMIO_STATUS);
}

void virtio_set_status(struct virtio_dev *d, u32 bits)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits);
}

bool virtio_reset(struct virtio_dev *d)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
	for (u32 i = 0; i < RESET_POLLS; i++)
		if (virtio_status(d) == 0)
			return true;
	return false;
}

const char *virtio_negotiate(struct virtio_dev *d, u64 wanted)
{
	if (d->version != 2)
		return "not a virtio-mmio version 2 (modern) device";
	if (!virtio_reset(d))
		return "Status does not read 0 after a reset";
	virtio_set_status(d, VIRTIO_S_ACKNOWLEDGE);
	virtio_set_status(d, VIRTIO_S_DRIVER);
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 lo = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	u64 hi = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->offered = lo | hi << 32;
	if (!(d->offered & BIT64(VIRTIO_F_VERSION_1))) {
		virtio_set_status(d, VIRTIO_S_FAILED);
		return "the device does not offer VIRTIO_F_VERSION_1";
	}
	u64 want = wanted | BIT64(VIRTIO_F_VERSION_1);
	if (cmdline_get_u64("virtio.indirect", 1, NULL))
		want |= BIT64(VIRTIO_F_INDIRECT_DESC);
	if (cmdline_get_u64("virtio.event_idx", 1, NULL))
		want |= BIT64(VIRTIO_F_EVENT_IDX);
	d->features = d->offered & want;
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
	virtio_set_status(d, VIRTIO_S_FEATURES_OK);
	if (!(virtio_status(d) & VIRTIO_S_FEATURES_OK)) {
		virtio_set_status(d, VIRTIO_S_FAILED);
		return "the device cleared FEATURES_OK";
	}
	return NULL;
}

void virtio_driver_ok(struct virtio_dev *d)
{
	virtio_set_status(d, VIRTIO_S_DRIVER_OK);
}

u8 virtio_config8(const struct virtio_dev *d, u32 off)
{
	return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off);
}

u16 virtio_config16(const struct virtio_dev *d, u32 off)
{
	return mmio_read16(d->base + VIRTIO_MMIO_CONFIG + off);
}

u32 virtio_config32(const struct virtio_dev *d, u32 off)
{
	return mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off);
}

u64 virtio_config64(const struct virtio_dev *d, u32 off)
{
	u64 v = 0;

	for (u32 i = 0; i < CONFIG_GEN_TRIES; i++) {
		u32 g = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		v = virtio_config32(d, off) | (u64)virtio_config32(d, off + 4) << 32;
		if (virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION) == g)
			break;
	}
	return v;
}

static const char *generic_feature(u32 bit)
{
	switch (bit) {
	case 24: return "NOTIFY_ON_EMPTY";
	case 27: return "ANY_LAYOUT";
	case 28: return "INDIRECT_DESC";
	case 29: return "EVENT_IDX";
	case 32: return "VERSION_1";
	case 33: return "ACCESS_PLATFORM";
	case 34: return "RING_PACKED";
	case 35: return "IN_ORDER";
	case 36: return "ORDER_PLATFORM";
	case 37: return "SR_IOV";
	case 38: return "NOTIFICATION_DATA";
	case 39: return "NOTIF_CONFIG_DATA";
	case 40: return "RING_RESET";
	default: return NULL;
	}
}

void virtio_feature_names(u64 f, const char *const *dev_names, char *buf, size_t size)
{
	size_t n = 0;

	if (size)
		buf[0] = '\0';
	for (u32 bit = 0; bit < 64; bit++) {
		if (!(f & BIT64(bit)))
			continue;
		const char *name = bit < 24 ? (dev_names ? dev_names[bit] : NULL) : generic_feature(bit);
		char tmp[24];
		if (!name) {
			snprintf(tmp, sizeof(tmp), "bit%u", bit);
			name = tmp;
		}
		int w = snprintf(buf + n, n < size ? size - n : 0, "%s%s", n ? "," : "", name);
		n += (size_t)w;
		if (n >= size)
			break;
	}
}

/* ---- interrupts ---- */

#define WAKE_VECTOR_INDEX (IRQ_VECTORS - 1)
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3E0
#define LAPIC_DIVIDE_BY_1 0xB
#define LAPIC_LVT_MASKED (1u << 16)
#define CALIBRATE_US 2000

static u32 vectors_used = 1u << WAKE_VECTOR_INDEX;
static struct virtio_dev *vector_dev[IRQ_VECTORS];
static bool apic_ready;
static u64 lapic_ticks_per_ms;

#define STUCK_IRQ_LIMIT 64
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REG_VER 0x01
#define IOAPIC_REDIR 0x10
#define REDIR_MASKED (1u << 16)

static void ioapic_mask(u32 gsi, bool masked)
{
	const struct madt_info *m = &acpi.madt_info;

	for (u32 i = 0; i < m->nioapics; i++) {
		u64 base = m->ioapics[i].addr;
		mmio_write32(base + IOAPIC_REGSEL, IOAPIC_REG_VER);
		u32 pins = ((mmio_read32(base + IOAPIC_WIN) >> 16) & 0xFF) + 1;
		if (gsi < m->ioapics[i].gsi_base || gsi >= m->ioapics[i].gsi_base + pins)
			continue;
		u32 reg = IOAPIC_REDIR + 2 * (gsi - m->ioapics[i].gsi_base);
		mmio_write32(base + IOAPIC_REGSEL, reg);
		u32 low = mmio_read32(base + IOAPIC_WIN);
		mmio_write32(base + IOAPIC_REGSEL, reg);
		mmio_write32(base + IOAPIC_WIN, masked ? low | REDIR_MASKED : low & ~REDIR_MASKED);
		return;
	}
}

void virtio_irq_unmask(struct virtio_dev *d)
{
	if (d->vector && d->irq_masked) {
		d->irq_masked = false;
		d->empty_run = 0;
		ioapic_mask(d->res.gsi, false);
	}
}

static void virtio_irq(u32 vector)
{
	struct virtio_dev *d = vector_dev[vector - VEC_IRQ_BASE];

	if (!d)
		return;
	u32 isr = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (isr)
		virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	else
		d->empty_irqs++;
	d->isr |= isr;
	d->irqs++;
	/* A level-triggered line that stays high with nothing to acknowledge (QEMU
	 * keeps it up once a device is broken): mask it, as Linux does. */
	d->empty_run = isr ? 0 : d->empty_run + 1;
	if (d->empty_run >= STUCK_IRQ_LIMIT && !d->irq_masked) {
		ioapic_mask(d->res.gsi, true);
		d->irq_masked = true;
	}
	if (isr & VIRTIO_INT_CONFIG)
		d->config_changes++;
}

static void wake_irq(u32 vector)
{
}

static void apic_setup(void)
{
	if (apic_ready)
		return;
	apic_ready = true;
	pic_mask_all();
	lapic_init();
	irq_set_handler(VEC_IRQ_BASE + WAKE_VECTOR_INDEX, wake_irq);
	/* Calibrate the LAPIC timer against the TSC (only roughly needed: it is a wake-up). */
	lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
	lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | (VEC_IRQ_BASE + WAKE_VECTOR_INDEX));
	lapic_write(LAPIC_TIMER_INITIAL, 0xFFFFFFFFu);
	udelay(CALIBRATE_US);
	u32 left = lapic_read(LAPIC_TIMER_CURRENT);
	lapic_write(LAPIC_TIMER_INITIAL, 0);
	lapic_ticks_per_ms = (0xFFFFFFFFu - (u64)left) * 1000 / CALIBRATE_US;
	if (!lapic_ticks_per_ms)
		lapic_ticks_per_ms = 1000000; /* 1 GHz, KVM's and QEMU's APIC bus */
}

void virtio_wake_timer(u64 us)
{
	u64 count = lapic_ticks_per_ms * us / 1000;

	if (!apic_ready)
		return;
	if (!count)
		count = 1;
	if (count > 0xFFFFFFFFu)
		count = 0xFFFFFFFFu;
	lapic_write(LAPIC_LVT_TIMER, VEC_IRQ_BASE + WAKE_VECTOR_INDEX); /* one-shot */
	lapic_write(LAPIC_TIMER_INITIAL, (u32)count);
}

bool virtio_irq_setup(struct virtio_dev *d)
{
	d->vector = 0;
	if (!cmdline_get_u64("virtio.irq", 1, NULL) || !d->res.have_irq)
		return false;
	apic_setup();
	u32 slot = IRQ_VECTORS;
	if (d->res.gsi < IRQ_VECTORS && !(vectors_used & (1u << d->res.gsi)))
		slot = d->res.gsi;
	for (u32 i = IRQ_VECTORS; slot == IRQ_VECTORS && i-- > 0;)
		if (!(vectors_used & (1u << i)))
			slot = i;
	if (slot == IRQ_VECTORS)
		return false;
	u8 vec = (u8)(VEC_IRQ_BASE + slot);
	vector_dev[slot] = d;
	irq_set_handler(vec, virtio_irq);
	if (!ioapic_route(d->res.gsi, vec, d->res.level, d->res.active_low, lapic_id())) {
		vector_dev[slot] = NULL;
		return false;
	}
	vectors_used |= 1u << slot;
	d->vector = vec;
	return true;
}

/* ---- split virtqueues ---- */

static inline void mb(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

const char *virtq_init(struct virtio_dev *d, struct virtq *q, u16 index, u16 want, u32 indirect_max)
{
	memset(q, 0, sizeof(*q));
	q->dev = d;
	q->index = index;
	virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY))
		return "QueueReady is already set";
	u32 max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (!max)
		return "QueueNumMax is 0 (no such queue)";
	u32 lim = max < want ? max : want, size = 1;
	while (size * 2 <= lim && size < 32768)
		size *= 2;
	q->size = (u16)size;
	q->desc = virtio_alloc(16ul * size, PAGE, true);
	q->avail = virtio_alloc(6 + 2ul * size, PAGE, true);
	q->used = virtio_alloc(6 + 8ul * size, PAGE, true);
	/* A page of its own, as Linux's used ring has: nothing the driver writes shares it (tenbox's live
	 * snapshots copy it in their last pass; KVM's dirty log never sees the device's writes). */
	q->tokens = virtio_alloc(8ul * size, PAGE, true);
	if (!q->desc || !q->avail || !q->used || !q->tokens)
		return "out of guest memory for the rings";
	q->used_event = (volatile u16 *)((u8 *)q->avail + 4 + 2ul * size);
	q->avail_event = (volatile u16 *)&q->used->ring[size];
	for (u32 i = 0; i + 1 < size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->free_head = 0;
	q->num_free = (u16)size;
	q->event_idx = virtio_has(d, VIRTIO_F_EVENT_IDX);
	if (indirect_max && virtio_has(d, VIRTIO_F_INDIRECT_DESC)) {
		q->indirect_tables = virtio_alloc(16ul * indirect_max * size, 16, false);
		if (q->indirect_tables) {
			q->indirect = true;
			q->indirect_max = indirect_max;
		}
	}
	q->irq_on = true;
	q->notify_addr = d->base + VIRTIO_MMIO_QUEUE_NOTIFY;
	virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) != 1)
		return "QueueReady does not read 1";
	return NULL;
}

int virtq_alloc_chain(struct virtq *q, u32 n)
{
	if (!n || q->num_free < n)
		return -1;
	u16 head = q->free_head, idx = head;
	for (u32 i = 0; i < n; i++) {
		struct vring_desc *d = &q->desc[idx];
		d->flags = i + 1 < n ? VRING_DESC_F_NEXT : 0;
		if (i + 1 < n)
			idx = d->next;
	}
	q->free_head = q->desc[idx].next;
	q->num_free -= (u16)n;
	return head;
}

int virtq_add(struct virtq *q, const struct vbuf *b, u32 n, void *token)
{
	int head;

	if (q->indirect && n > 1 && n <= q->indirect_max) {
		head = virtq_alloc_chain(q, 1);
		if (head < 0)
			return -1;
		struct vring_desc *t = q->indirect_tables + (u64)head * q->indirect_max;
		for (u32 i = 0; i < n; i++) {
			t[i].addr = b[i].addr;
			t[i].len = b[i].len;
			t[i].flags = (b[i].device_writes ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0);
			t[i].next = (u16)(i + 1);
		}
		struct vring_desc *d = &q->desc[head];
		d->addr = (u64)t;
		d->len = 16 * n;
		d->flags = VRING_DESC_F_INDIRECT;
	} else {
		head = virtq_alloc_chain(q, n);
		if (head < 0)
			return -1;
		u16 idx = (u16)head;
		for (u32 i = 0; i < n; i++) {
			struct vring_desc *d = &q->desc[idx];
			d->addr = b[i].addr;
			d->len = b[i].len;
			d->flags = (b[i].device_writes ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0);
			idx = d->next;
		}
	}
	q->tokens[head] = token;
	q->avail->ring[q->avail_shadow & (q->size - 1)] = (u16)head;
	q->avail_shadow++;
	return head;
}

void virtq_publish_raw(struct virtq *q, u16 head)
{
	q->avail->ring[q->avail_shadow & (q->size - 1)] = head;
	q->avail_shadow++;
}

static void publish(struct virtq *q)
{
	barrier(); /* x86 keeps stores in order: descriptors and ring entries before idx */
	*(volatile u16 *)&q->avail->idx = q->avail_shadow;
	q->avail_kicked = q->avail_shadow;
	mb(); /* the idx store before the notification-suppression loads */
}

void virtq_notify(struct virtq *q)
{
	publish(q);
	mmio_write32(q->notify_addr, q->index);
	q->kicks++;
}

void virtq_kick(struct virtq *q)
{
	u16 old = q->avail_kicked, now = q->avail_shadow;
	bool need;

	if (old == now)
		return;
	publish(q);
	if (q->event_idx)
		need = (u16)(now - *q->avail_event - 1) < (u16)(now - old);
	else
		need = !(*(volatile u16 *)&q->used->flags & VRING_USED_F_NO_NOTIFY);
	if (need) {
		mmio_write32(q->notify_addr, q->index);
		q->kicks++;
	} else {
		q->kicks_saved++;
	}
}

bool virtq_has_used(const struct virtq *q)
{
	return *(volatile u16 *)&q->used->idx != q->last_used;
}

void *virtq_get(struct virtq *q, u32 *len)
{
	for (;;) {
		if (*(volatile u16 *)&q->used->idx == q->last_used)
			return NULL;
		barrier(); /* x86 does not reorder loads: the entry after idx */
		volatile struct vring_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
		u32 id = e->id, l = e->len;
		q->last_used++;
		if (q->event_idx && q->irq_on)
			*q->used_event = q->last_used;
		if (id >= q->size || !q->tokens[id])
			continue; /* a device bug: an id we never gave it */
		/* Back onto the free list; a chain never visits more than size entries. */
		u16 last = (u16)id;
		u32 count = 1;
		while ((q->desc[last].flags & VRING_DESC_F_NEXT) && count < q->size) {
			last = q->desc[last].next;
			count++;
		}
		q->desc[last].next = q->free_head;
		q->free_head = (u16)id;
		q->num_free += (u16)count;
		void *token = q->tokens[id];
		q->tokens[id] = NULL;
		if (len)
			*len = l;
		return token;
	}
}

bool virtq_irq_enable(struct virtq *q)
{
	q->irq_on = true;
	if (q->event_idx)
		*q->used_event = q->last_used;
	else
		*(volatile u16 *)&q->avail->flags = 0;
	mb();
	return !virtq_has_used(q);
}

void virtq_irq_disable(struct virtq *q)
{
	q->irq_on = false;
	if (q->event_idx)
		*q->used_event = (u16)(q->last_used - 1); /* far behind: no interrupt for 65535 entries */
	else
		*(volatile u16 *)&q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
}

#define WAKE_US 10000
#define IRQ_GRACE_S 1

bool virtq_wait(struct virtq *q, u32 seconds)
{
	struct virtio_dev *d = q->dev;
	struct deadline dl, grace;
	bool in_grace = false;

	deadline_start(&dl, seconds);
	if (!d->vector) {
		while (!virtq_has_used(q))
			if (deadline_expired(&dl))
				return false;
		return true;
	}
	/* Interrupt-driven: the used entry and the used-ring interrupt that announces it. */
	for (;;) {
		cli();
		bool used = virtq_has_used(q);
		if (used && (d->isr & VIRTIO_INT_USED_RING)) {
			d->isr &= ~VIRTIO_INT_USED_RING;
			return true;
		}
		if (used && !in_grace) {
			deadline_start(&grace, IRQ_GRACE_S);
			in_grace = true;
		}
		if (in_grace && deadline_expired(&grace)) {
			q->missed_irqs++;
			return true;
		}
		if (!used && deadline_expired(&dl))
			return false;
		virtq_irq_enable(q);
		virtio_wake_timer(WAKE_US);
		sti_hlt(); /* a pending interrupt is taken right after sti */
		cli();
	}
}
