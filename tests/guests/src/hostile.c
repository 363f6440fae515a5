/*
 * hostile: a guest that works against its host, round after round (guest;
 * CPL0, but each round is a handful of instructions and waits: the flood is
 * one `rep outsb` per 4 KiB and the devices do the work).
 *
 * Each round:
 *   console  hostile.flood KiB of 'x' on COM1, never a newline (rep outsb:
 *            4 KiB an exit)
 *   blk      a DISCARD whose segment data is hostile.overlap descriptors over
 *            the same 1 MiB buffer (the device advertises max_discard_seg 1),
 *            then hostile.errors reads past the end of the disk (IOERR)
 *   net      a frame whose chain is hostile.overlap descriptors over the same
 *            64 KiB buffer (far more than any frame)
 * until the host stops the VM, or hostile.rounds rounds (then a summary, PASS
 * and poweroff). Every hostile.report rounds (0: never) a line
 *   hostile: round <n> discard=<status> read=<status> tx=<used> flood=<KiB>
 * ends the flood's line; statuses are the device's (0 OK, 1 IOERR, 2 UNSUPP,
 * 255 no completion within a second). A device that set DEVICE_NEEDS_RESET
 * is reset and set up again, and counted.
 *
 * Command line:
 *   hostile.flood=KiB      console bytes per round (default 64)
 *   hostile.overlap=N      descriptors per hostile chain (default 64, at most 1024)
 *   hostile.errors=N       block errors per round (default 1)
 *   hostile.rounds=N       stop after N rounds (default 0: never)
 *   hostile.report=N       a progress line every N rounds (default 0: never)
 */
#include "bootparams.h"
#include "printf.h"
#include "test.h"
#include "virtio.h"

const char guest_name[] = "hostile";

#define COM1 0x3F8
#define FLOOD_CHUNK 4096u
#define MIB (1ul << 20)
#define BLK_BUF MIB
#define NET_BUF (64u * 1024)
#define OVERLAP_MAX 1024u
#define QUEUE_WANT 8
#define WAIT_S 1
#define NO_COMPLETION 255

#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_DISCARD 11
#define CFG_CAPACITY 0

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
} PACKED;

struct side {
	struct virtio_dev dev;
	struct virtq q;      /* blk: requests; net: transmit (queue 1) */
	struct virtq rx;     /* net only: set up, never given buffers */
	bool up;
	u32 resets;          /* DEVICE_NEEDS_RESET seen and recovered from */
};

static struct side blk, net;
static struct vbuf *chain;
static struct blk_hdr *hdr;
static volatile u8 *status;
static u8 *blk_buf, *net_buf, *flood_buf;
static u32 overlap;
static u64 capacity;

static void flood(u64 kib)
{
	for (u64 left = kib * 1024; left;) {
		u64 n = left < FLOOD_CHUNK ? left : FLOOD_CHUNK;
		const u8 *p = flood_buf;
		u64 c = n;
		asm volatile("rep outsb" : "+S"(p), "+c"(c) : "d"(COM1) : "memory");
		left -= n;
	}
}

static bool bring_up(struct side *s, u32 device_id, u64 want)
{
	if (virtio_negotiate(&s->dev, want))
		return false;
	if (device_id == VIRTIO_ID_NET && virtq_init(&s->dev, &s->rx, 0, QUEUE_WANT, 0))
		return false;
	if (virtq_init(&s->dev, &s->q, device_id == VIRTIO_ID_NET ? 1 : 0, QUEUE_WANT, overlap + 2))
		return false;
	if (!s->q.indirect)
		return false; /* the chains below are longer than the ring: they need INDIRECT_DESC */
	virtq_irq_disable(&s->q);
	virtio_driver_ok(&s->dev);
	return !(virtio_status(&s->dev) & VIRTIO_S_NEEDS_RESET);
}

/* Queue a chain, notify, poll for its completion; bytes written, or -1 without one. */
static long submit(struct side *s, u32 n)
{
	if (virtq_add(&s->q, chain, n, s) < 0)
		return -1;
	virtq_notify(&s->q);
	if (!virtq_wait(&s->q, WAIT_S))
		return -1;
	u32 len;
	virtq_get(&s->q, &len);
	return len;
}

/* A device that broke (DEVICE_NEEDS_RESET) or stopped completing is reset and set up again. */
static void recover(struct side *s, u32 device_id, u64 want)
{
	if (!(virtio_status(&s->dev) & VIRTIO_S_NEEDS_RESET) && s->q.num_free == s->q.size)
		return;
	s->resets++;
	s->up = virtio_reset(&s->dev) && bring_up(s, device_id, want);
}

static u32 blk_request(u32 type, u64 sector, u64 data, u32 len, u32 copies)
{
	u32 n = 0;
	hdr->type = type;
	hdr->reserved = 0;
	hdr->sector = sector;
	*status = NO_COMPLETION;
	chain[n++] = (struct vbuf){ (u64)hdr, sizeof(*hdr), false };
	for (u32 i = 0; i < copies; i++)
		chain[n++] = (struct vbuf){ data, len, type == VIRTIO_BLK_T_IN };
	chain[n++] = (struct vbuf){ (u64)status, 1, true };
	return submit(&blk, n) < 0 ? NO_COMPLETION : *status;
}

static u32 net_send(void)
{
	for (u32 i = 0; i < overlap; i++)
		chain[i] = (struct vbuf){ (u64)net_buf, NET_BUF, false };
	return submit(&net, overlap) < 0 ? NO_COMPLETION : 0;
}

void guest_main(void)
{
	t_start();
	u64 flood_kib = cmdline_get_u64("hostile.flood", 64, NULL);
	u64 rounds = cmdline_get_u64("hostile.rounds", 0, NULL);
	u64 report = cmdline_get_u64("hostile.report", 0, NULL);
	u64 errors = cmdline_get_u64("hostile.errors", 1, NULL);
	overlap = (u32)cmdline_get_u64("hostile.overlap", 64, NULL);
	if (overlap < 2 || overlap > OVERLAP_MAX) {
		t_fail("hostile.overlap=%u: 2..%u", overlap, OVERLAP_MAX);
		return;
	}
	u64 blk_want = BIT64(VIRTIO_BLK_F_DISCARD);
	if (virtio_find(VIRTIO_ID_BLOCK, 0, &blk.dev, false))
		blk.up = bring_up(&blk, VIRTIO_ID_BLOCK, blk_want);
	if (virtio_find(VIRTIO_ID_NET, 0, &net.dev, false))
		net.up = bring_up(&net, VIRTIO_ID_NET, 0);
	if (blk.up)
		capacity = virtio_config64(&blk.dev, CFG_CAPACITY);
	chain = virtio_alloc(sizeof(*chain) * (OVERLAP_MAX + 2), 64, true);
	hdr = virtio_alloc(64, 64, true);
	status = (volatile u8 *)hdr + sizeof(*hdr);
	blk_buf = virtio_alloc(BLK_BUF, 4096, true); /* zeros: every 16 bytes a discard segment of 0 sectors */
	net_buf = virtio_alloc(NET_BUF, 4096, true);
	flood_buf = virtio_alloc(FLOOD_CHUNK, 4096, false);
	if (!t_check(chain && hdr && blk_buf && net_buf && flood_buf, "guest memory for the hostile chains",
		     "%lu bytes left", virtio_mem_left()))
		return;
	virtio_fill(flood_buf, 'x', FLOOD_CHUNK);
	printf("hostile: blk %s capacity %lu, net %s, overlap %u, flood %lu KiB a round\n", blk.up ? "up" : "absent",
	       capacity, net.up ? "up" : "absent", overlap, flood_kib);

	u32 discard = NO_COMPLETION, read = NO_COMPLETION, tx = NO_COMPLETION;
	for (u64 round = 1; !rounds || round <= rounds; round++) {
		flood(flood_kib);
		if (blk.up) {
			discard = blk_request(VIRTIO_BLK_T_DISCARD, 0, (u64)blk_buf, BLK_BUF, overlap);
			for (u64 i = 0; i < errors; i++)
				read = blk_request(VIRTIO_BLK_T_IN, capacity, (u64)blk_buf, 512, 1);
			recover(&blk, VIRTIO_ID_BLOCK, blk_want);
		}
		if (net.up) {
			tx = net_send();
			recover(&net, VIRTIO_ID_NET, 0);
		}
		if (report && round % report == 0)
			printf("\nhostile: round %lu discard=%u read=%u tx=%u flood=%lu\n", round, discard, read, tx,
			       flood_kib * round);
	}
	printf("\n");
	t_info("hostile.last", "discard=%u read=%u tx=%u", discard, read, tx);
	t_info("hostile.resets", "blk %u net %u", blk.resets, net.resets);
	t_check(!blk.up || read == 1, "a read past the end fails with IOERR", "status %u", read);
	t_check(!blk.up || discard == 2, "a discard of more segments than max_discard_seg is UNSUPP", "status %u", discard);
	t_check(!net.up || tx == 0, "the overlapping frame was taken (and dropped)", "status %u", tx);
	t_check(blk.resets == 0 && net.resets == 0, "no device needed a reset", "blk %u net %u", blk.resets, net.resets);
	t_pass("%lu hostile rounds", rounds);
}
