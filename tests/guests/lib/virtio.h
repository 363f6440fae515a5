/* virtio-mmio version 2 (VIRTIO_F_VERSION_1) driver core: discovery in the DSDT,
 * the status handshake, feature negotiation and split virtqueues (guest).
 *
 * Discovery, the handshake and queue set-up run at CPL0 (a few dozen MMIO
 * accesses); the DSDT scan runs at CPL3. The virtqueue fast path
 * (virtq_add, virtq_kick, virtq_get, virtq_irq_*) touches only guest memory
 * and the device's MMIO window, so it runs at CPL0 and, for benchmarks, at
 * CPL3 under run_user() (the static map is user-accessible; a QueueNotify
 * write from CPL3 exits to the VMM like any MMIO access). It never prints.
 *
 * Guest memory for rings and buffers comes from virtio_alloc(): a bump
 * allocator over the e820 RAM entry at 16 MiB, clear of the image and the
 * initrd, zeroed at CPL3.
 *
 * Command line (read by virtio_negotiate / virtio_irq_setup):
 *   virtio.indirect=0   do not negotiate VIRTIO_F_INDIRECT_DESC
 *   virtio.event_idx=0  do not negotiate VIRTIO_F_EVENT_IDX
 *   virtio.irq=0        complete by polling the used ring, no interrupts
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "types.h"

/* virtio-mmio registers (virtio 1.x, 4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00C
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0A0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0A4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0FC
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976 /* "virt" */

#define VIRTIO_INT_USED_RING 0x1
#define VIRTIO_INT_CONFIG 0x2

/* Device status bits. */
#define VIRTIO_S_ACKNOWLEDGE 1
#define VIRTIO_S_DRIVER 2
#define VIRTIO_S_DRIVER_OK 4
#define VIRTIO_S_FEATURES_OK 8
#define VIRTIO_S_NEEDS_RESET 64
#define VIRTIO_S_FAILED 128

/* Device-independent feature bits. */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED 34
#define VIRTIO_F_IN_ORDER 35
#define BIT64(n) (1ul << (n))

/* Device IDs. */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* Split virtqueue layout (2.7). */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} PACKED;

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[]; /* then used_event */
} PACKED;

struct vring_used_elem {
	u32 id;
	u32 len;
} PACKED;

struct vring_used {
	u16 flags;
	u16 idx;
	struct vring_used_elem ring[]; /* then avail_event */
} PACKED;

/* ---- guest memory for the devices ---- */

/* Zeroed (at CPL3) when zero is set; NULL when RAM runs out. align is a power of two. */
void *virtio_alloc(u64 size, u64 align, bool zero);
/* Bytes left in the region. */
u64 virtio_mem_left(void);
/* memset and memcmp-with-a-byte at CPL3, for buffers of any size. */
void virtio_fill(void *p, u8 byte, u64 len);
/* Offset of the first byte != byte, or len when all equal. */
u64 virtio_check_fill(const void *p, u8 byte, u64 len);

/* ---- discovery ---- */

/* One LNRO0005 device in the DSDT and its _CRS. */
struct virtio_mmio_res {
	u64 base;
	u32 size;
	u32 gsi;
	bool have_irq;
	bool level;
	bool active_low;
};

#define VIRTIO_MAX_DEVICES 32

/* Every LNRO0005 device with a memory resource, in DSDT order. */
u32 virtio_discover(struct virtio_mmio_res *out, u32 max);

struct virtio_dev {
	struct virtio_mmio_res res;
	u64 base;
	u32 version, device_id, vendor_id;
	u64 offered;   /* device features */
	u64 features;  /* negotiated */
	u8 vector;     /* 0: no interrupt, complete by polling */
	volatile u32 isr;            /* InterruptStatus bits the handler saw (sticky, clear by hand) */
	volatile u32 irqs;           /* interrupts taken */
	volatile u32 config_changes; /* interrupts with the configuration-change bit */
	volatile u32 empty_irqs;     /* interrupts with InterruptStatus 0 */
	u32 empty_run;               /* ... in a row */
	volatile bool irq_masked;    /* the handler masked a line stuck high (64 empty interrupts in a row) */
};

/* Probe the DSDT's devices for MagicValue, Version and DeviceID; take the
 * index-th (0-based) with device_id. Prints "info - virtio.<n>=..." lines for
 * every device found when verbose. false when there is no such device. */
bool virtio_find(u32 device_id, u32 index, struct virtio_dev *d, bool verbose);

/* ---- the handshake ---- */

static inline u32 virtio_read32(const struct virtio_dev *d, u32 reg)
{
	return *(volatile u32 *)(d->base + reg);
}
static inline void virtio_write32(const struct virtio_dev *d, u32 reg, u32 v)
{
	*(volatile u32 *)(d->base + reg) = v;
}

/* Write 0 to Status and wait (bounded) for it to read 0; false if it does not. */
bool virtio_reset(struct virtio_dev *d);
u32 virtio_status(const struct virtio_dev *d);
void virtio_set_status(struct virtio_dev *d, u32 bits); /* ORs bits into Status */

/* Reset, ACKNOWLEDGE, DRIVER, read the offered features (select 0 and 1),
 * write offered & (wanted | VERSION_1 | INDIRECT_DESC | EVENT_IDX, less what
 * the command line switches off), FEATURES_OK and check it stuck. Returns
 * NULL on success, else why (the device is then marked FAILED). */
const char *virtio_negotiate(struct virtio_dev *d, u64 wanted);
void virtio_driver_ok(struct virtio_dev *d);
static inline bool virtio_has(const struct virtio_dev *d, u32 bit) { return d->features & BIT64(bit); }

/* Device configuration space; 64-bit reads retry across ConfigGeneration changes. */
u8 virtio_config8(const struct virtio_dev *d, u32 off);
u16 virtio_config16(const struct virtio_dev *d, u32 off);
u32 virtio_config32(const struct virtio_dev *d, u32 off);
u64 virtio_config64(const struct virtio_dev *d, u32 off);

/* Comma-separated names of the feature bits in f ("VERSION_1,EVENT_IDX,..."); names for
 * device bits below 24 come from dev_names (index = bit), may be NULL. */
void virtio_feature_names(u64 f, const char *const *dev_names, char *buf, size_t size);

/* ---- interrupts ---- */

/* Route the device's GSI (from _CRS: edge/level, polarity) through the
 * IOAPIC to a vector of its own and install the handler (InterruptStatus ->
 * InterruptACK, then LAPIC EOI). Does nothing and returns false when
 * virtio.irq=0, the device has no interrupt or no IOAPIC serves the GSI. */
bool virtio_irq_setup(struct virtio_dev *d);
/* Unmask the IOAPIC pin the handler masked as stuck (after a device reset lowered the line). */
void virtio_irq_unmask(struct virtio_dev *d);
/* The LAPIC timer as a wake-up for waits in hlt (one-shot, about us microseconds). */
void virtio_wake_timer(u64 us);

/* ---- split virtqueues ---- */

struct virtq {
	struct virtio_dev *dev;
	u16 index;
	u16 size;          /* a power of two */
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	volatile u16 *used_event;  /* &avail->ring[size] */
	volatile u16 *avail_event; /* &used->ring[size] */
	bool event_idx;
	bool indirect;     /* INDIRECT_DESC negotiated and tables allocated */
	u32 indirect_max;  /* entries per indirect table */
	struct vring_desc *indirect_tables; /* indirect_max entries per head */
	void **tokens;     /* per head */
	u16 free_head;
	u16 num_free;
	u16 avail_shadow;  /* next avail index to publish */
	u16 avail_kicked;  /* avail->idx as last published */
	u16 last_used;
	bool irq_on;       /* the driver asked for used-ring interrupts */
	u64 notify_addr;
	u64 kicks;         /* QueueNotify writes */
	u64 kicks_saved;   /* kicks the device's suppression spared */
	u32 missed_irqs;   /* virtq_wait: used entries whose interrupt never came */
};

/* One buffer of a chain: device_writes marks VRING_DESC_F_WRITE. */
struct vbuf {
	u64 addr;
	u32 len;
	bool device_writes;
};

/* Select the queue, size it (the largest power of two <= min(QueueNumMax,
 * want)), allocate and zero the rings, program the addresses and set
 * QueueReady. indirect_max > 0 allocates that many entries of indirect
 * table per head when INDIRECT_DESC was negotiated. NULL on success, else why. */
const char *virtq_init(struct virtio_dev *d, struct virtq *q, u16 index, u16 want, u32 indirect_max);

/* Queue a chain; it goes through one indirect table when there is one and
 * n > 1 (and n fits), else through n ring descriptors. -1 when there is no
 * room. Not visible to the device before virtq_kick(). */
int virtq_add(struct virtq *q, const struct vbuf *b, u32 n, void *token);
/* Publish the queued chains (avail->idx) and notify unless the device has
 * suppressed notifications (EVENT_IDX avail_event, or VRING_USED_F_NO_NOTIFY). */
void virtq_kick(struct virtq *q);
/* Publish and notify unconditionally. */
void virtq_notify(struct virtq *q);
/* Chains the device finished, in used-ring order: the token, *len = bytes written. NULL when none. */
void *virtq_get(struct virtq *q, u32 *len);
bool virtq_has_used(const struct virtq *q);
/* Ask for used-ring interrupts (avail flags or EVENT_IDX used_event); false
 * when used entries are already waiting, so the caller must not sleep. */
bool virtq_irq_enable(struct virtq *q);
void virtq_irq_disable(struct virtq *q);
/* Put head at the next avail slot as is (the caller built desc[head...]); for hostile tests. */
void virtq_publish_raw(struct virtq *q, u16 head);
/* Take n ring descriptors off the free list (chained by NEXT, last without); the head, or -1. */
int virtq_alloc_chain(struct virtq *q, u32 n);

/* CPL0: wait until q has a used entry. With a vector: in hlt until the entry
 * and the used-ring interrupt are both there (the LAPIC timer wakes it to
 * check the deadline); an entry whose interrupt does not come within a second
 * counts in missed_irqs and is returned anyway. Without one: polling.
 * false after `seconds` without an entry. */
bool virtq_wait(struct virtq *q, u32 seconds);

#endif
