/*
 * blk: a virtio-blk driver over virtio-mmio version 2 (guest; set-up at CPL0,
 * byte loops and the benchmark at CPL3).
 *
 * Finds the blk.index-th virtio-blk device among the DSDT's LNRO0005
 * devices, negotiates VERSION_1 plus SIZE_MAX, SEG_MAX, BLK_SIZE, TOPOLOGY,
 * RO, FLUSH, DISCARD, WRITE_ZEROES (and INDIRECT_DESC, EVENT_IDX unless
 * virtio.indirect=0 / virtio.event_idx=0) when offered, reads the config and
 * runs one of three scripts on one request queue:
 *
 * basic (default, blk.test=basic):
 *   GET_ID (the serial), CRC-32 of sector ranges (the host compares them
 *   with zlib.crc32 of the image), the same range through 1 and N data
 *   descriptors, a read past the end (IOERR) and an unknown request type
 *   (UNSUPP); on a read-only disk a write must fail with IOERR; then the
 *   optional write (+ FLUSH + read-back), write-zeroes and discard steps.
 *   Completion by interrupt (IOAPIC, the GSI from _CRS) unless virtio.irq=0.
 * hostile (blk.hostile=loop|oob|huge|move):
 *   a descriptor loop, a buffer outside RAM, a chain longer than the queue,
 *   or a queue address change while DRIVER_OK; reports whether the device
 *   set DEVICE_NEEDS_RESET, failed the request or stopped completing, then
 *   resets the device and checks it works again.
 * bench (blk.bench=seqread|seqwrite|randread|stamp|readcheck):
 *   the submission/completion loop at CPL3, polling the used ring; prints
 *   "blk: start" and "blk: done bytes=<n> ops=<n> tsc=<ticks>".
 *   stamp: sequential writes from sector 0 that never wrap, each sector
 *   stamped with its own number and its request's; a request completed
 *   twice is counted, and once all completed every sector is read back and
 *   must carry its own stamp (a snapshot taken with requests in flight:
 *   none lost, none doubled).
 *
 * Command line:
 *   blk.index=N            the N-th virtio-blk device (default 0)
 *   blk.test=basic|none    the basic script (default basic)
 *   blk.read=L:C[,L:C...]  sector ranges to CRC (default 0:16)
 *   blk.segments=N         data descriptors per request (default 1; the
 *                          basic script also reads its first range through 4)
 *   blk.write=L:C:BB       fill C sectors at L with byte 0xBB, FLUSH, read back
 *   blk.zero=L:C           WRITE_ZEROES, read back zeros
 *   blk.discard=L:C        DISCARD; expect.discard_zeroes=1 checks zeros after it
 *   expect.ro=0|1          the device must (not) offer VIRTIO_BLK_F_RO
 *   blk.hostile=MODE       loop, oob, huge or move
 *   blk.bench=KIND         seqread, seqwrite (overwrites the disk!), randread, stamp (overwrites it too) or
 *                          readcheck (the disk read whole into RAM, round after round, each sector checked:
 *                          sector n must start with the u64 n; blk.bench.mb in all, bs 64 KiB, depth 8)
 *   blk.bench.gap_us=N     readcheck: wait N us after a completion before the next request (default 0)
 *   blk.bench.mb=N         sequential: MiB to move (default 64)
 *   blk.bench.ops=N        random: requests (default 20000)
 *   blk.bench.bs=N         request size in KiB (default 1024 sequential, 4 random)
 *   blk.bench.depth=N      requests in flight (default 32)
 *   blk.bench.stall=N      seconds without a completion that count as a stall (default 10); the
 *                          TSC runs on while the host pauses the VM (a snapshot), so a test that
 *                          snapshots the stream gives the pause room
 *   blk.stay=1             after the basic script, stay up ("blk: ready capacity=<sectors>"):
 *                          a console line "read" runs the blk.read ranges again ("blk: reads done <n>"),
 *                          "quit" ends it; a configuration interrupt that changes the capacity prints
 *                          "blk: capacity=<sectors>" (a disk resized while the VM runs)
 *   virtio.indirect=0 virtio.event_idx=0 virtio.irq=0   (lib/virtio.h)
 */
#include "bootparams.h"
#include "cpu.h"
#include "crc32.h"
#include "printf.h"
#include "serial.h"
#include "test.h"
#include "time.h"
#include "virtio.h"
#include "x86.h"

const char guest_name[] = "blk";

#define SECTOR 512u
#define MIB (1ul << 20)
#define KIB 1024ul

/* Feature bits (virtio 1.2, 5.2.3). */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_CONFIG_WCE 11
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

/* Config space offsets. */
#define CFG_CAPACITY 0
#define CFG_SIZE_MAX 8
#define CFG_SEG_MAX 12
#define CFG_BLK_SIZE 20
#define CFG_PHYS_BLOCK_EXP 24
#define CFG_MIN_IO_SIZE 26
#define CFG_OPT_IO_SIZE 28
#define CFG_NUM_QUEUES 34
#define CFG_MAX_DISCARD_SECTORS 36
#define CFG_MAX_DISCARD_SEG 40
#define CFG_DISCARD_ALIGN 44
#define CFG_MAX_WZ_SECTORS 48
#define CFG_MAX_WZ_SEG 52

/* Request types and status. */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_T_BOGUS 0x7E
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20

#define QUEUE_WANT 256
#define MAX_SEGS 128            /* data descriptors per request */
#define INDIRECT_MAX (MAX_SEGS + 2)
#define MAX_REQ (1ul * MIB)     /* the basic script's request size limit */
#define BASIC_BUF (4ul * MIB)   /* its data area (two of them) */
#define REQ_TIMEOUT_S 10
#define HOSTILE_WAIT_S 3
#define BENCH_STALL_S 10
#define DEFAULT_READ "0:16"
#define MULTI_SEGS 4

static const char *const feature_names[24] = {
	[0] = "BARRIER", [VIRTIO_BLK_F_SIZE_MAX] = "SIZE_MAX", [VIRTIO_BLK_F_SEG_MAX] = "SEG_MAX",
	[VIRTIO_BLK_F_GEOMETRY] = "GEOMETRY", [VIRTIO_BLK_F_RO] = "RO", [VIRTIO_BLK_F_BLK_SIZE] = "BLK_SIZE",
	[7] = "SCSI", [VIRTIO_BLK_F_FLUSH] = "FLUSH", [VIRTIO_BLK_F_TOPOLOGY] = "TOPOLOGY",
	[VIRTIO_BLK_F_CONFIG_WCE] = "CONFIG_WCE", [VIRTIO_BLK_F_MQ] = "MQ", [VIRTIO_BLK_F_DISCARD] = "DISCARD",
	[VIRTIO_BLK_F_WRITE_ZEROES] = "WRITE_ZEROES", [15] = "LIFETIME", [16] = "SECURE_ERASE", [17] = "ZONED",
};

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
} PACKED;

struct blk_dwz {
	u64 sector;
	u32 num_sectors;
	u32 flags;
} PACKED;

/* The device-visible parts of one request, in guest memory. */
struct blk_req {
	struct blk_hdr hdr;
	struct blk_dwz dwz;
	u8 id[VIRTIO_BLK_ID_BYTES];
	volatile u8 status;
	u8 pad[64 - 16 - 16 - VIRTIO_BLK_ID_BYTES - 1];
} PACKED;
_Static_assert(sizeof(struct blk_req) == 64, "blk_req size");

static struct virtio_dev dev;
static struct virtq vq;
static struct {
	u64 capacity;
	u32 size_max, seg_max, blk_size;
	bool ro;
	u32 max_discard_sectors, max_discard_seg, discard_align;
	u32 max_wz_sectors, max_wz_seg;
} cfg;
static struct blk_req *req;
static u8 *buf, *buf2;
static u64 buf_size;
static u32 segments = 1;
static u64 max_req = MAX_REQ;
static struct vbuf vb[MAX_SEGS + 2];

/* ---- requests (CPL0, one at a time) ---- */

/* Data buffers for len bytes at data in about `want` pieces, each a multiple
 * of 512 and at most size_max. Returns how many it made (<= max). */
static u32 data_bufs(struct vbuf *b, u32 max, u64 data, u32 len, u32 want, bool device_writes)
{
	u32 n = 0, per;

	if (!len)
		return 0;
	if (want < 1)
		want = 1;
	if (want > len / SECTOR)
		want = len / SECTOR ? len / SECTOR : 1;
	per = (u32)ALIGN_UP((len + want - 1) / want, SECTOR);
	if (cfg.size_max && per > cfg.size_max)
		per = cfg.size_max >= SECTOR ? cfg.size_max & ~(SECTOR - 1) : cfg.size_max;
	for (u32 off = 0; off < len && n < max; n++) {
		u32 c = len - off < per ? len - off : per;
		b[n].addr = data + off;
		b[n].len = c;
		b[n].device_writes = device_writes;
		off += c;
	}
	return n;
}

/* Queue one request and wait for it: its status byte, -1 on a timeout, -2 if it did not fit. */
static int blk_request(u32 type, u64 sector, void *data, u32 len, bool device_writes, u32 segs)
{
	u32 n = 0;

	req->hdr.type = type;
	req->hdr.reserved = 0;
	req->hdr.sector = sector;
	req->status = 0xFF;
	vb[n++] = (struct vbuf){ (u64)&req->hdr, sizeof(req->hdr), false };
	n += data_bufs(vb + n, MAX_SEGS, (u64)data, len, segs, device_writes);
	vb[n++] = (struct vbuf){ (u64)&req->status, 1, true };
	if (virtq_add(&vq, vb, n, req) < 0)
		return -2;
	dev.isr &= ~VIRTIO_INT_USED_RING; /* only this request's interrupt counts (CPL0, interrupts off) */
	virtq_kick(&vq);
	if (!virtq_wait(&vq, REQ_TIMEOUT_S))
		return -1;
	u32 used_len;
	void *tok = virtq_get(&vq, &used_len);
	if (tok != req)
		return -3;
	return req->status;
}

static const char *status_name(int s)
{
	switch (s) {
	case VIRTIO_BLK_S_OK: return "OK";
	case VIRTIO_BLK_S_IOERR: return "IOERR";
	case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
	case -1: return "no completion (timeout)";
	case -2: return "no room in the queue";
	case -3: return "a completion for another request";
	default: return "a bad status byte";
	}
}

/* Read or write count sectors at lba through requests of at most max_req bytes. */
static int blk_rw(bool write, u64 lba, u64 count, u8 *data, u32 segs)
{
	u64 per = max_req / SECTOR;

	for (u64 done = 0; done < count;) {
		u64 c = count - done < per ? count - done : per;
		int s = blk_request(write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, lba + done, data + done * SECTOR,
				    (u32)(c * SECTOR), !write, segs);
		if (s != VIRTIO_BLK_S_OK)
			return s;
		done += c;
	}
	return VIRTIO_BLK_S_OK;
}

static int blk_dwz(u32 type, u64 lba, u32 count)
{
	req->dwz.sector = lba;
	req->dwz.num_sectors = count;
	req->dwz.flags = 0;
	/* The segment is device-readable data after the header. */
	req->hdr.type = type;
	req->hdr.reserved = 0;
	req->hdr.sector = 0;
	req->status = 0xFF;
	struct vbuf b[3] = {
		{ (u64)&req->hdr, sizeof(req->hdr), false },
		{ (u64)&req->dwz, sizeof(req->dwz), false },
		{ (u64)&req->status, 1, true },
	};
	if (virtq_add(&vq, b, 3, req) < 0)
		return -2;
	dev.isr &= ~VIRTIO_INT_USED_RING;
	virtq_kick(&vq);
	if (!virtq_wait(&vq, REQ_TIMEOUT_S))
		return -1;
	return virtq_get(&vq, NULL) == req ? req->status : -3;
}

/* ---- set-up ---- */

static bool parse_range(const char *s, u64 *lba, u64 *count, u64 *byte)
{
	u64 v[3] = { 0, 0, 0 };
	u32 n = 0;
	bool digits = false;

	for (; *s && n < 3; s++) {
		if (*s == ':') {
			if (!digits)
				return false;
			n++;
			digits = false;
			continue;
		}
		u32 d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (n == 2 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (n == 2 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return false;
		v[n] = v[n] * (n == 2 ? 16 : 10) + d;
		digits = true;
	}
	if (!digits || *s)
		return false;
	*lba = v[0];
	*count = v[1];
	if (byte)
		*byte = v[2];
	return byte ? n == 2 : n == 1;
}

static void read_config(void)
{
	cfg.capacity = virtio_config64(&dev, CFG_CAPACITY);
	if (virtio_has(&dev, VIRTIO_BLK_F_SIZE_MAX))
		cfg.size_max = virtio_config32(&dev, CFG_SIZE_MAX);
	if (virtio_has(&dev, VIRTIO_BLK_F_SEG_MAX))
		cfg.seg_max = virtio_config32(&dev, CFG_SEG_MAX);
	cfg.blk_size = virtio_has(&dev, VIRTIO_BLK_F_BLK_SIZE) ? virtio_config32(&dev, CFG_BLK_SIZE) : SECTOR;
	cfg.ro = virtio_has(&dev, VIRTIO_BLK_F_RO);
	if (virtio_has(&dev, VIRTIO_BLK_F_DISCARD)) {
		cfg.max_discard_sectors = virtio_config32(&dev, CFG_MAX_DISCARD_SECTORS);
		cfg.max_discard_seg = virtio_config32(&dev, CFG_MAX_DISCARD_SEG);
		cfg.discard_align = virtio_config32(&dev, CFG_DISCARD_ALIGN);
	}
	if (virtio_has(&dev, VIRTIO_BLK_F_WRITE_ZEROES)) {
		cfg.max_wz_sectors = virtio_config32(&dev, CFG_MAX_WZ_SECTORS);
		cfg.max_wz_seg = virtio_config32(&dev, CFG_MAX_WZ_SEG);
	}
	t_info("blk.capacity", "%lu", cfg.capacity);
	t_info("blk.config", "size_max %u seg_max %u blk_size %u ro %u", cfg.size_max, cfg.seg_max, cfg.blk_size,
	       cfg.ro);
	if (virtio_has(&dev, VIRTIO_BLK_F_TOPOLOGY))
		t_info("blk.topology", "physical_block_exp %u min_io_size %u opt_io_size %u",
		       virtio_config8(&dev, CFG_PHYS_BLOCK_EXP), virtio_config16(&dev, CFG_MIN_IO_SIZE),
		       virtio_config32(&dev, CFG_OPT_IO_SIZE));
	if (virtio_has(&dev, VIRTIO_BLK_F_DISCARD))
		t_info("blk.discard", "max_sectors %u max_seg %u alignment %u", cfg.max_discard_sectors,
		       cfg.max_discard_seg, cfg.discard_align);
	if (virtio_has(&dev, VIRTIO_BLK_F_WRITE_ZEROES))
		t_info("blk.write_zeroes", "max_sectors %u max_seg %u", cfg.max_wz_sectors, cfg.max_wz_seg);
	/* Requests stay within seg_max descriptors of size_max bytes. */
	if (cfg.seg_max && cfg.size_max) {
		u64 lim = (u64)cfg.seg_max * cfg.size_max & ~(u64)(SECTOR - 1);
		if (lim && lim < max_req)
			max_req = lim;
	}
}

/* Everything up to DRIVER_OK. */
static bool blk_setup(bool verbose)
{
	const char *why;
	char names[256];
	u64 want = BIT64(VIRTIO_BLK_F_SIZE_MAX) | BIT64(VIRTIO_BLK_F_SEG_MAX) | BIT64(VIRTIO_BLK_F_BLK_SIZE) |
		   BIT64(VIRTIO_BLK_F_TOPOLOGY) | BIT64(VIRTIO_BLK_F_RO) | BIT64(VIRTIO_BLK_F_FLUSH) |
		   BIT64(VIRTIO_BLK_F_DISCARD) | BIT64(VIRTIO_BLK_F_WRITE_ZEROES);

	why = virtio_negotiate(&dev, want);
	if (!t_check(!why, "virtio-blk feature negotiation (VERSION_1, FEATURES_OK)", "%s", why))
		return false;
	if (verbose) {
		virtio_feature_names(dev.offered, feature_names, names, sizeof(names));
		t_info("blk.offered", "%lx %s", dev.offered, names);
		virtio_feature_names(dev.features, feature_names, names, sizeof(names));
		t_info("blk.features", "%lx %s", dev.features, names);
		read_config();
	}
	why = virtq_init(&dev, &vq, 0, QUEUE_WANT, INDIRECT_MAX);
	if (!t_check(!why, "request queue 0 set up", "%s", why))
		return false;
	if (verbose)
		t_info("blk.queue", "size %u indirect %s event_idx %s", vq.size, vq.indirect ? "on" : "off",
		       vq.event_idx ? "on" : "off");
	virtio_driver_ok(&dev);
	u32 st = virtio_status(&dev);
	return t_check((st & VIRTIO_S_DRIVER_OK) && !(st & VIRTIO_S_NEEDS_RESET), "DRIVER_OK is set", "status %x", st);
}

/* ---- the basic script ---- */

static void get_id(void)
{
	char serial[VIRTIO_BLK_ID_BYTES + 1];

	memset(req->id, 0, sizeof(req->id));
	int s = blk_request(VIRTIO_BLK_T_GET_ID, 0, req->id, VIRTIO_BLK_ID_BYTES, true, 1);
	if (s != VIRTIO_BLK_S_OK) {
		t_info("blk.serial", "(GET_ID: %s)", status_name(s));
		t_check(s == VIRTIO_BLK_S_UNSUPP, "GET_ID completes (OK or UNSUPP)", "%s", status_name(s));
		return;
	}
	u32 n = 0;
	for (; n < VIRTIO_BLK_ID_BYTES && req->id[n]; n++)
		serial[n] = req->id[n] >= 0x20 && req->id[n] < 0x7F ? (char)req->id[n] : '?';
	serial[n] = '\0';
	t_info("blk.serial", "%s", serial);
}

static void crc_ranges(void)
{
	char list[256], *p;
	bool first = true;

	if (!cmdline_get("blk.read", list, sizeof(list)))
		memcpy(list, DEFAULT_READ, sizeof(DEFAULT_READ));
	for (p = list; *p;) {
		char *e = p;
		while (*e && *e != ',')
			e++;
		char save = *e;
		*e = '\0';
		u64 lba, count;
		if (!parse_range(p, &lba, &count, NULL)) {
			t_fail("blk.read range %s does not parse (L:C)", p);
		} else if (!count || count * SECTOR > buf_size || lba + count > cfg.capacity) {
			t_fail("blk.read range %lu:%lu does not fit the disk (%lu sectors) and the buffer (%lu)", lba, count,
			       cfg.capacity, buf_size / SECTOR);
		} else {
			int s = blk_rw(false, lba, count, buf, segments);
			char desc[96];
			snprintf(desc, sizeof(desc), "read %lu sectors at %lu", count, lba);
			if (t_check(s == VIRTIO_BLK_S_OK, desc, "%s", status_name(s))) {
				u32 crc = crc32_user(buf, count * SECTOR);
				printf("info - blk.crc32.%lu.%lu=%08x\n", lba, count, crc);
				if (first && count >= MULTI_SEGS) {
					/* The same sectors through several data descriptors. */
					u32 segs = segments > 1 ? 1 : MULTI_SEGS;
					virtio_fill(buf2, 0xA5, count * SECTOR);
					s = blk_rw(false, lba, count, buf2, segs);
					u32 crc2 = s == VIRTIO_BLK_S_OK ? crc32_user(buf2, count * SECTOR) : 0;
					char d2[96];
					snprintf(d2, sizeof(d2), "the same sectors read through %u and %u data descriptors agree",
						 segments, segs);
					t_check(s == VIRTIO_BLK_S_OK && crc2 == crc, d2, "%s, crc32 %08x vs %08x",
						status_name(s), crc2, crc);
				}
				first = false;
			}
		}
		*e = save;
		p = *e ? e + 1 : e;
	}
}

static void refused_write(void)
{
	u64 lba = 0, count = 1, byte;
	char w[64];

	if (cmdline_get("blk.write", w, sizeof(w)) && parse_range(w, &lba, &count, &byte) && count)
		count = 1;
	/* Write back what is there, so a device that wrongly accepts changes nothing. */
	int s = blk_rw(false, lba, 1, buf, 1);
	if (!t_check(s == VIRTIO_BLK_S_OK, "read the sector the refused write targets", "%s", status_name(s)))
		return;
	s = blk_request(VIRTIO_BLK_T_OUT, lba, buf, SECTOR, false, 1);
	t_check(s == VIRTIO_BLK_S_IOERR, "write refused on a read-only disk", "status %s", status_name(s));
}

static void write_step(void)
{
	char w[64];
	u64 lba, count, byte;

	if (!cmdline_get("blk.write", w, sizeof(w)))
		return;
	if (!parse_range(w, &lba, &count, &byte) || !count || byte > 255) {
		t_fail("blk.write=%s does not parse (L:C:BB)", w);
		return;
	}
	if (count * SECTOR > buf_size || lba + count > cfg.capacity) {
		t_fail("blk.write=%s does not fit the disk (%lu sectors) and the buffer (%lu)", w, cfg.capacity,
		       buf_size / SECTOR);
		return;
	}
	u64 bytes = count * SECTOR;
	virtio_fill(buf, (u8)byte, bytes);
	int s = blk_rw(true, lba, count, buf, segments);
	char desc[96];
	snprintf(desc, sizeof(desc), "write %lu sectors of %02lx at %lu", count, byte, lba);
	if (!t_check(s == VIRTIO_BLK_S_OK, desc, "%s", status_name(s)))
		return;
	if (virtio_has(&dev, VIRTIO_BLK_F_FLUSH)) {
		s = blk_request(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false, 1);
		t_check(s == VIRTIO_BLK_S_OK, "flush", "%s", status_name(s));
	} else {
		t_info("blk.flush", "not offered (write-through device)");
	}
	virtio_fill(buf2, (u8)~byte, bytes);
	s = blk_rw(false, lba, count, buf2, segments);
	u64 bad = s == VIRTIO_BLK_S_OK ? virtio_check_fill(buf2, (u8)byte, bytes) : 0;
	t_check(s == VIRTIO_BLK_S_OK && bad == bytes, "the written sectors read back", "%s, first difference at byte %lu",
		status_name(s), bad);
	if (s == VIRTIO_BLK_S_OK)
		printf("info - blk.crc32.%lu.%lu=%08x\n", lba, count, crc32_user(buf2, bytes));
}

static void dwz_step(const char *key, u32 type, u32 feature, const char *what, bool expect_zeros)
{
	char w[64];
	u64 lba, count;

	if (!cmdline_get(key, w, sizeof(w)))
		return;
	if (!parse_range(w, &lba, &count, NULL) || !count) {
		t_fail("%s=%s does not parse (L:C)", key, w);
		return;
	}
	if (!virtio_has(&dev, feature)) {
		t_info(key, "not offered by the device: skipped");
		return;
	}
	if (count * SECTOR > buf_size || lba + count > cfg.capacity) {
		t_fail("%s=%lu:%lu does not fit the disk (%lu sectors) and the buffer (%lu)", key, lba, count, cfg.capacity,
		       buf_size / SECTOR);
		return;
	}
	int s = blk_dwz(type, lba, (u32)count);
	char desc[96];
	snprintf(desc, sizeof(desc), "%s %lu sectors at %lu", what, count, lba);
	if (!t_check(s == VIRTIO_BLK_S_OK, desc, "%s", status_name(s)))
		return;
	virtio_fill(buf2, 0xEE, count * SECTOR);
	s = blk_rw(false, lba, count, buf2, segments);
	u64 bad = s == VIRTIO_BLK_S_OK ? virtio_check_fill(buf2, 0, count * SECTOR) : 0;
	bool zeros = s == VIRTIO_BLK_S_OK && bad == count * SECTOR;
	snprintf(desc, sizeof(desc), "the sectors read back as zeros after %s", what);
	if (expect_zeros)
		t_check(zeros, desc, "%s, first non-zero byte at %lu", status_name(s), bad);
	else
		printf("info - %s.readback=%s\n", key, zeros ? "zeros" : "data (the device keeps it)");
	if (s == VIRTIO_BLK_S_OK)
		printf("info - blk.crc32.%lu.%lu=%08x\n", lba, count, crc32_user(buf2, count * SECTOR));
}

static void basic(void)
{
	get_id();
	crc_ranges();

	int s = blk_request(VIRTIO_BLK_T_IN, cfg.capacity, buf, SECTOR, true, 1);
	t_check(s == VIRTIO_BLK_S_IOERR, "a read past the last sector completes with IOERR", "%s", status_name(s));
	s = blk_request(VIRTIO_BLK_T_BOGUS, 0, NULL, 0, false, 1);
	t_check(s == VIRTIO_BLK_S_UNSUPP, "an unknown request type completes with UNSUPP", "%s", status_name(s));

	if (cfg.ro) {
		refused_write();
		t_info("blk.ro", "read-only disk: blk.write, blk.zero and blk.discard skipped");
	} else {
		write_step();
		dwz_step("blk.zero", VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_F_WRITE_ZEROES, "write-zeroes", true);
		dwz_step("blk.discard", VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_F_DISCARD, "discard",
			 cmdline_get_u64("expect.discard_zeroes", 0, NULL) != 0);
	}
	if (dev.vector)
		t_check(dev.irqs > 0 && vq.missed_irqs == 0, "every completion arrived with its interrupt",
			"%u interrupts, %u completions without one", dev.irqs, vq.missed_irqs);
	t_info("blk.kicks", "%lu notified, %lu suppressed by the device; %u interrupts", vq.kicks, vq.kicks_saved,
	       dev.irqs);
}

/* ---- hostile requests ---- */

#define OOB_ADDR 0x7FFFF00000ul /* just below 512 GiB: far beyond any test VM's RAM */
#define OOB_LEN (64 * 1024)

/* Wait for a completion, DEVICE_NEEDS_RESET or the deadline; returns a description. */
static const char *hostile_observe(int *status)
{
	struct deadline dl;

	*status = -1;
	deadline_start(&dl, HOSTILE_WAIT_S);
	for (;;) {
		u32 st = virtio_status(&dev);
		if (st & VIRTIO_S_NEEDS_RESET) {
			/* The device should announce it with a configuration-change interrupt. */
			struct deadline g;
			deadline_start(&g, 1);
			while (dev.vector && !dev.config_changes && !deadline_expired(&g)) {
				cli();
				virtio_wake_timer(10000);
				sti_hlt();
				cli();
			}
			if (dev.vector)
				t_info("blk.hostile.config_irq", "%s", dev.config_changes ? "yes" : "no");
			return "needs-reset";
		}
		if (virtq_has_used(&vq)) {
			u32 len;
			virtq_get(&vq, &len);
			*status = req->status;
			return "completed";
		}
		if (deadline_expired(&dl))
			return "stalled";
		if (dev.vector) {
			cli();
			if (virtq_irq_enable(&vq)) {
				virtio_wake_timer(10000);
				sti_hlt();
				cli();
			}
		} else {
			udelay(1000);
		}
	}
}

static void hostile(const char *mode)
{
	u32 crc0 = 0;
	int s = blk_rw(false, 0, 1, buf, 1);
	if (t_check(s == VIRTIO_BLK_S_OK, "read sector 0 before the hostile request", "%s", status_name(s)))
		crc0 = crc32_user(buf, SECTOR);

	req->hdr.type = VIRTIO_BLK_T_IN;
	req->hdr.reserved = 0;
	req->hdr.sector = 0;
	req->status = 0xFF;
	bool bad_request = true;
	if (!strcmp(mode, "loop")) {
		int h = virtq_alloc_chain(&vq, 2);
		u16 a = (u16)h, b = vq.desc[a].next;
		vq.desc[a] = (struct vring_desc){ (u64)&req->hdr, sizeof(req->hdr), VRING_DESC_F_NEXT, b };
		vq.desc[b] = (struct vring_desc){ (u64)buf, SECTOR, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, a };
		t_info("blk.hostile", "loop: descriptor %u -> %u -> %u ...", a, b, a);
		virtq_publish_raw(&vq, a);
	} else if (!strcmp(mode, "oob")) {
		vb[0] = (struct vbuf){ (u64)&req->hdr, sizeof(req->hdr), false };
		vb[1] = (struct vbuf){ OOB_ADDR, OOB_LEN, true };
		vb[2] = (struct vbuf){ (u64)&req->status, 1, true };
		t_info("blk.hostile", "oob: a read of %u bytes into %lx", OOB_LEN, OOB_ADDR);
		/* Direct descriptors (no indirect table): the ring itself carries the bad address. */
		bool ind = vq.indirect;
		vq.indirect = false;
		virtq_add(&vq, vb, 3, req);
		vq.indirect = ind;
	} else if (!strcmp(mode, "huge")) {
		/* Every descriptor of the ring in one chain, the last pointing back to
		 * the first: longer than the queue size. */
		int h = virtq_alloc_chain(&vq, vq.size);
		u16 i = (u16)h, last = i;
		for (u32 k = 0; k < vq.size; k++) {
			struct vring_desc *d = &vq.desc[i];
			d->addr = k == 0 ? (u64)&req->hdr : (u64)buf + (k % 8) * SECTOR;
			d->len = k == 0 ? sizeof(req->hdr) : SECTOR;
			d->flags = VRING_DESC_F_NEXT | (k ? VRING_DESC_F_WRITE : 0);
			last = i;
			i = d->next;
		}
		vq.desc[last].next = (u16)h;
		t_info("blk.hostile", "huge: a chain through all %u descriptors and back to %u", vq.size, h);
		virtq_publish_raw(&vq, (u16)h);
	} else if (!strcmp(mode, "move")) {
		void *nd = virtio_alloc(16ul * vq.size, 4096, true);
		void *na = virtio_alloc(6 + 2ul * vq.size, 4096, true);
		void *nu = virtio_alloc(6 + 8ul * vq.size, 4096, true);
		t_info("blk.hostile", "move: queue 0 to desc %p avail %p used %p while DRIVER_OK", nd, na, nu);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_SEL, 0);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)nd);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)na);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)nu);
		virtio_write32(&dev, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
		/* Then an ordinary read through the rings the device was given first. */
		vb[0] = (struct vbuf){ (u64)&req->hdr, sizeof(req->hdr), false };
		vb[1] = (struct vbuf){ (u64)buf2, SECTOR, true };
		vb[2] = (struct vbuf){ (u64)&req->status, 1, true };
		virtq_add(&vq, vb, 3, req);
		bad_request = false;
	} else {
		t_fail("blk.hostile=%s: unknown mode (loop, oob, huge, move)", mode);
		return;
	}
	virtq_notify(&vq);

	int status;
	const char *what = hostile_observe(&status);
	u32 st = virtio_status(&dev);
	if (!strcmp(what, "completed"))
		t_info("blk.hostile.outcome", "completed with status %s", status_name(status));
	else
		t_info("blk.hostile.outcome", "%s", what);
	t_info("blk.hostile.status", "%x%s", st, st & VIRTIO_S_NEEDS_RESET ? " (DEVICE_NEEDS_RESET)" : "");
	t_info("blk.hostile.irqs", "%u interrupts (%u with InterruptStatus 0), %u configuration changes", dev.irqs,
	       dev.empty_irqs, dev.config_changes);
	t_pass("the VM survived blk.hostile=%s", mode);
	if (bad_request)
		t_check(strcmp(what, "completed") || status != VIRTIO_BLK_S_OK,
			"the device did not complete the bad chain as a success", "it reported OK");
	else if (!strcmp(what, "completed") && status == VIRTIO_BLK_S_OK)
		t_info("blk.hostile.move", "the device ignored the address change while the queue was ready");

	if (dev.irq_masked)
		t_info("blk.hostile.irq_line", "stuck high after the error (%u interrupts with nothing to acknowledge): "
		       "masked at the IOAPIC until the reset", dev.empty_irqs);
	/* A reset brings the device back. */
	t_check(virtio_reset(&dev), "the device resets (Status reads 0)", "status %x", virtio_status(&dev));
	virtio_irq_unmask(&dev);
	if (!blk_setup(false))
		return;
	virtio_fill(buf, 0x5A, SECTOR);
	s = blk_rw(false, 0, 1, buf, 1);
	u32 crc1 = s == VIRTIO_BLK_S_OK ? crc32_user(buf, SECTOR) : 0;
	t_check(s == VIRTIO_BLK_S_OK && crc1 == crc0, "the device works again after a reset", "%s, crc32 %08x vs %08x",
		status_name(s), crc1, crc0);
}

/* ---- the benchmark (CPL3) ---- */

enum { BENCH_SEQREAD, BENCH_SEQWRITE, BENCH_RANDREAD, BENCH_STAMP };

#define STAMP_MAGIC 0x7E4B0C5A3D2F1E09ul

static bool bench_writes(u32 kind)
{
	return kind == BENCH_SEQWRITE || kind == BENCH_STAMP;
}

struct bench {
	struct virtq *q;
	u32 kind;
	u32 req_bytes;
	u32 depth;
	u32 size_max;
	u64 ops_total;
	u64 capacity;
	u64 next_sector;
	u64 rng;
	struct blk_req *reqs;
	u8 *data;
	u8 *outstanding; /* per slot: a request of it is in the queue */
	u64 stall_ticks;
	/* results */
	u64 issued, done, bytes, errors, tsc, doubled;
	bool stalled;
};

static void bench_submit(struct bench *b, u32 slot)
{
	struct blk_req *r = &b->reqs[slot];
	u64 sectors = b->req_bytes / SECTOR, sector;
	struct vbuf v[MAX_SEGS + 2];
	u32 n = 0;

	if (b->kind == BENCH_RANDREAD) {
		b->rng ^= b->rng << 13;
		b->rng ^= b->rng >> 7;
		b->rng ^= b->rng << 17;
		sector = (b->rng % (b->capacity / sectors)) * sectors;
	} else {
		if (b->next_sector + sectors > b->capacity)
			b->next_sector = 0;
		sector = b->next_sector;
		b->next_sector += sectors;
	}
	r->hdr.type = bench_writes(b->kind) ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
	r->hdr.reserved = 0;
	r->hdr.sector = sector;
	r->status = 0xFF;
	v[n++] = (struct vbuf){ (u64)&r->hdr, sizeof(r->hdr), false };
	u64 data = (u64)b->data + (u64)slot * b->req_bytes;
	if (b->kind == BENCH_STAMP) {
		for (u64 i = 0; i < sectors; i++) {
			u64 *stamp = (u64 *)(data + i * SECTOR);
			stamp[0] = sector + i;
			stamp[1] = b->issued ^ STAMP_MAGIC;
		}
	}
	b->outstanding[slot] = 1;
	for (u32 off = 0; off < b->req_bytes && n < MAX_SEGS + 1;) {
		u32 c = b->req_bytes - off;
		if (b->size_max && c > b->size_max)
			c = b->size_max;
		v[n++] = (struct vbuf){ data + off, c, !bench_writes(b->kind) };
		off += c;
	}
	v[n++] = (struct vbuf){ (u64)&r->status, 1, true };
	virtq_add(b->q, v, n, r);
	b->issued++;
}

static u64 bench_job(u64 arg)
{
	struct bench *b = (struct bench *)arg;
	u64 t0 = rdtsc(), last = t0;

	for (u32 i = 0; i < b->depth && b->issued < b->ops_total; i++)
		bench_submit(b, i);
	virtq_kick(b->q);
	while (b->done < b->ops_total) {
		struct blk_req *r;
		bool any = false;
		while ((r = virtq_get(b->q, NULL))) {
			u32 slot = (u32)(r - b->reqs);
			any = true;
			if (r < b->reqs || slot >= b->depth || !b->outstanding[slot]) {
				b->doubled++; /* a completion for no request in the queue */
				continue;
			}
			b->outstanding[slot] = 0;
			b->done++;
			if (r->status != VIRTIO_BLK_S_OK)
				b->errors++;
			else
				b->bytes += b->req_bytes;
			if (b->issued < b->ops_total)
				bench_submit(b, slot);
		}
		if (any) {
			virtq_kick(b->q);
			last = rdtsc();
		} else if (rdtsc() - last > b->stall_ticks) {
			b->stalled = true;
			break;
		} else {
			cpu_relax();
		}
	}
	b->tsc = rdtsc() - t0;
	return 0;
}

/* The stamps of n sectors read into data from lba (CPL3: a byte loop is emulated at CPL0 here). */
struct stamp_scan {
	const u8 *data;
	u64 lba, n, spr;
	u64 bad, first_bad, got_sector, got_op;
};

static u64 stamp_scan_job(u64 arg)
{
	struct stamp_scan *sc = (struct stamp_scan *)arg;

	for (u64 i = 0; i < sc->n; i++) {
		const u64 *stamp = (const u64 *)(sc->data + i * SECTOR);
		u64 sector = sc->lba + i;
		if (stamp[0] != sector || (stamp[1] ^ STAMP_MAGIC) != sector / sc->spr) {
			if (!sc->bad++) {
				sc->first_bad = sector;
				sc->got_sector = stamp[0];
				sc->got_op = stamp[1] ^ STAMP_MAGIC;
			}
		}
	}
	return 0;
}

/* After a stamp run (CPL0): no request completed twice, and every sector written carries its own stamp. */
static void stamp_check(struct bench *b)
{
	static struct stamp_scan sc;
	u64 sectors = b->done * (b->req_bytes / SECTOR), chunk = (u64)b->depth * b->req_bytes / SECTOR;

	t_check(b->doubled == 0, "no request completed twice", "%lu completions for no request in the queue",
		b->doubled);
	sc.data = b->data;
	sc.spr = b->req_bytes / SECTOR;
	for (u64 lba = 0; lba < sectors; lba += chunk) {
		u64 n = sectors - lba < chunk ? sectors - lba : chunk;
		int s = blk_rw(false, lba, n, b->data, 1);
		if (s != VIRTIO_BLK_S_OK) {
			t_fail("the stamped sectors read back: %s at sector %lu", status_name(s), lba);
			return;
		}
		sc.lba = lba;
		sc.n = n;
		run_user(stamp_scan_job, (u64)&sc);
	}
	t_info("blk.stamp", "%lu sectors of %lu requests read back", sectors, b->done);
	t_check(sc.bad == 0, "every stamped sector reads back with its own request's stamp",
		"%lu bad, the first at sector %lu: stamped sector %lu request %lu", sc.bad, sc.first_bad, sc.got_sector,
		sc.got_op);
}

/*
 * readcheck: the disk read whole into RAM, round after round. Sector n of the
 * disk must start with n (a u64; the test writes the image so). Each round
 * marks every sector's place in the buffer as unread (all ones: a guest
 * write), reads the disk into it, `depth` requests of `bs` in flight, each
 * into the buffer at its own disk position, and only then checks every sector
 * of the buffer. A snapshot taken mid-round must hold what the device wrote
 * into guest RAM, not only what the guest did: a restored guest checks
 * sectors the device filled before the pause.
 */
struct readcheck {
	struct virtq *q;
	u32 bs, depth;
	u64 sectors; /* per round: the buffer's */
	u64 rounds;
	u8 *data;
	struct blk_req *reqs;
	u64 stall_ticks;
	u64 gap_ticks; /* between a completion and the next request: a slower stream, rounds longer than a save */
	/* results */
	u64 round, requests, errors, bad, first_bad, got;
	bool stalled;
};

static void readcheck_submit(struct readcheck *rc, u32 slot, u64 sector)
{
	struct blk_req *r = &rc->reqs[slot];
	struct vbuf v[MAX_SEGS + 2];
	u32 n = 0;
	u64 data = (u64)rc->data + sector * SECTOR;

	r->hdr.type = VIRTIO_BLK_T_IN;
	r->hdr.reserved = 0;
	r->hdr.sector = sector;
	r->status = 0xFF;
	v[n++] = (struct vbuf){ (u64)&r->hdr, sizeof(r->hdr), false };
	n += data_bufs(v + n, MAX_SEGS, data, rc->bs, 1, true); /* pieces of at most size_max */
	v[n++] = (struct vbuf){ (u64)&r->status, 1, true };
	virtq_add(rc->q, v, n, r);
}

static u64 readcheck_job(u64 arg)
{
	struct readcheck *rc = (struct readcheck *)arg;
	u64 spr = rc->bs / SECTOR, per_round = rc->sectors / spr;

	for (rc->round = 0; rc->round < rc->rounds; rc->round++) {
		for (u64 i = 0; i < rc->sectors; i++)
			*(volatile u64 *)(rc->data + i * SECTOR) = ~0ul;
		u64 next = 0, done = 0, last = rdtsc();
		u32 slot = 0;
		for (; slot < rc->depth && next < per_round; slot++, next++)
			readcheck_submit(rc, slot, next * spr);
		virtq_kick(rc->q);
		while (done < per_round) {
			struct blk_req *r;
			bool any = false;
			while ((r = virtq_get(rc->q, NULL))) {
				any = true;
				done++;
				rc->requests++;
				if (r->status != VIRTIO_BLK_S_OK)
					rc->errors++;
				if (next < per_round) {
					for (u64 t = rdtsc(); rdtsc() - t < rc->gap_ticks;)
						cpu_relax();
					readcheck_submit(rc, (u32)(r - rc->reqs), next++ * spr);
				}
			}
			if (any) {
				virtq_kick(rc->q);
				last = rdtsc();
			} else if (rdtsc() - last > rc->stall_ticks) {
				rc->stalled = true;
				return 0;
			} else {
				cpu_relax();
			}
		}
		for (u64 i = 0; i < rc->sectors; i++) {
			u64 got = *(volatile u64 *)(rc->data + i * SECTOR);
			if (got != i && !rc->bad++) {
				rc->first_bad = i;
				rc->got = got;
			}
		}
	}
	return 0;
}

static void readcheck(u64 bs, u64 depth, u64 stall_s)
{
	static struct readcheck rc;
	u64 mb = cmdline_get_u64("blk.bench.mb", 64, NULL);
	u64 room = (virtio_mem_left() - MIB) / SECTOR;

	rc.sectors = cfg.capacity < room ? cfg.capacity : room;
	rc.sectors -= rc.sectors % (bs / SECTOR);
	if (!t_check(rc.sectors >= bs / SECTOR, "a round of reads fits RAM and the disk", "%lu sectors", rc.sectors))
		return;
	rc.q = &vq;
	rc.bs = (u32)bs;
	rc.depth = (u32)depth;
	rc.rounds = (mb * MIB + rc.sectors * SECTOR - 1) / (rc.sectors * SECTOR);
	rc.data = virtio_alloc(rc.sectors * SECTOR, 4096, false);
	rc.reqs = virtio_alloc(depth * sizeof(struct blk_req), 64, true);
	rc.stall_ticks = tsc_hz() * stall_s;
	rc.gap_ticks = tsc_hz() / 1000000 * cmdline_get_u64("blk.bench.gap_us", 0, NULL);
	virtq_irq_disable(&vq);
	t_info("blk.readcheck", "%lu rounds of %lu sectors, bs=%lu depth=%lu gap=%lu ticks", rc.rounds, rc.sectors, bs,
	       depth, rc.gap_ticks);
	printf("blk: start\n");
	run_user(readcheck_job, (u64)&rc);
	printf("blk: done rounds=%lu requests=%lu\n", rc.round, rc.requests);
	t_check(!rc.stalled, "the device kept completing requests", "no completion for %lu s in round %lu", stall_s,
		rc.round);
	t_check(rc.errors == 0, "every read completed with OK", "%lu errors", rc.errors);
	t_check(rc.bad == 0, "every sector read carries its own number", "%lu bad, the first at sector %lu: %lx", rc.bad,
		rc.first_bad, rc.got);
}

static void bench(const char *kind_name)
{
	static struct bench b;
	u32 kind;

	if (!strcmp(kind_name, "readcheck")) {
		u64 bs = cmdline_get_u64("blk.bench.bs", 64, NULL) * KIB;
		u64 depth = cmdline_get_u64("blk.bench.depth", 8, NULL);
		u32 per_req = 2 + (u32)(cfg.size_max ? (bs + cfg.size_max - 1) / cfg.size_max : 1);
		if (!t_check(bs >= SECTOR && bs % SECTOR == 0 && per_req <= MAX_SEGS + 2 && depth >= 1 &&
			     depth * (vq.indirect ? 1 : per_req) <= vq.size, "the readcheck requests fit the queue",
			     "bs %lu depth %lu", bs, depth))
			return;
		readcheck(bs, depth, cmdline_get_u64("blk.bench.stall", BENCH_STALL_S, NULL));
		return;
	}
	if (!strcmp(kind_name, "seqread"))
		kind = BENCH_SEQREAD;
	else if (!strcmp(kind_name, "seqwrite"))
		kind = BENCH_SEQWRITE;
	else if (!strcmp(kind_name, "randread"))
		kind = BENCH_RANDREAD;
	else if (!strcmp(kind_name, "stamp"))
		kind = BENCH_STAMP;
	else {
		t_fail("blk.bench=%s: unknown kind (seqread, seqwrite, randread, stamp)", kind_name);
		return;
	}
	bool seq = kind != BENCH_RANDREAD;
	u64 bs = cmdline_get_u64("blk.bench.bs", seq ? 1024 : 4, NULL) * KIB;
	if (bs < SECTOR || bs % SECTOR || bs > 64 * MIB) {
		t_fail("blk.bench.bs must be a multiple of 512 bytes up to 64 MiB");
		return;
	}
	u64 ops = seq ? cmdline_get_u64("blk.bench.mb", 64, NULL) * MIB / bs : cmdline_get_u64("blk.bench.ops", 20000, NULL);
	u64 depth = cmdline_get_u64("blk.bench.depth", 32, NULL);
	u64 stall_s = cmdline_get_u64("blk.bench.stall", BENCH_STALL_S, NULL);
	u32 per_req = 2 + (u32)(cfg.size_max ? (bs + cfg.size_max - 1) / cfg.size_max : 1);
	if (!t_check(per_req <= MAX_SEGS + 2, "the request fits the descriptor limit", "%u descriptors", per_req))
		return;
	u64 ring_cap = vq.indirect && per_req <= vq.indirect_max ? vq.size : vq.size / per_req;
	if (depth > ring_cap)
		depth = ring_cap;
	u64 mem_cap = (virtio_mem_left() - MIB) / bs;
	if (depth > mem_cap)
		depth = mem_cap;
	if (!t_check(depth >= 1 && ops >= 1 && cfg.capacity >= bs / SECTOR, "the benchmark fits the queue, RAM and disk",
		     "depth %lu ops %lu capacity %lu", depth, ops, cfg.capacity))
		return;
	if (bench_writes(kind) && !t_check(!cfg.ro, "the disk is writable", "read-only"))
		return;
	if (kind == BENCH_STAMP && !t_check(ops * (bs / SECTOR) <= cfg.capacity, "the stamped writes fit the disk once",
					    "%lu requests of %lu bytes, capacity %lu sectors", ops, bs, cfg.capacity))
		return;
	b.q = &vq;
	b.kind = kind;
	b.req_bytes = (u32)bs;
	b.depth = (u32)depth;
	b.size_max = cfg.size_max;
	b.ops_total = ops;
	b.capacity = cfg.capacity;
	b.rng = 0x9E3779B97F4A7C15ul;
	b.reqs = virtio_alloc(depth * sizeof(struct blk_req), 64, true);
	b.data = virtio_alloc(depth * bs, 4096, false);
	b.outstanding = virtio_alloc(depth, 64, false);
	virtio_fill(b.outstanding, 0, depth);
	b.stall_ticks = tsc_hz() * stall_s;
	if (kind == BENCH_SEQWRITE)
		virtio_fill(b.data, 0x5A, depth * bs);
	virtq_irq_disable(&vq);
	t_info("blk.bench", "%s bs=%lu depth=%lu ops=%lu indirect=%s event_idx=%s", kind_name, bs, depth, ops,
	       vq.indirect ? "on" : "off", vq.event_idx ? "on" : "off");
	printf("blk: start\n");
	run_user(bench_job, (u64)&b);
	printf("blk: done bytes=%lu ops=%lu tsc=%lu\n", b.bytes, b.done, b.tsc);
	t_info("blk.bench.kicks", "%lu notified, %lu suppressed", vq.kicks, vq.kicks_saved);
	if (tsc_hz_known() && b.tsc)
		t_info("blk.bench.rate", "%lu KiB/s %lu ops/s", b.bytes * tsc_hz() / b.tsc / KIB, b.done * tsc_hz() / b.tsc);
	t_check(!b.stalled, "the device kept completing requests", "no completion for %lu s after %lu of %lu", stall_s,
		b.done, ops);
	t_check(b.errors == 0, "every benchmark request completed with OK", "%lu errors", b.errors);
	if (kind == BENCH_STAMP)
		stamp_check(&b);
}

/* ---- staying up (blk.stay=1) ---- */

#define STAY_WAKE_US 10000
#define STAY_LINE_MAX 32

static bool irq_on;

static void stay_check_capacity(u32 *seen)
{
	if (dev.config_changes == *seen)
		return;
	*seen = dev.config_changes;
	u64 cap = virtio_config64(&dev, CFG_CAPACITY);
	if (cap != cfg.capacity) {
		cfg.capacity = cap;
		printf("blk: capacity=%lu\n", cap);
	}
}

static NORETURN void stay(void)
{
	char line[STAY_LINE_MAX + 1];
	u32 len = 0, rounds = 0, seen = dev.config_changes;

	printf("blk: ready capacity=%lu\n", cfg.capacity);
	for (;;) {
		stay_check_capacity(&seen);
		while (serial_rx_ready()) {
			u8 c = serial_rx_byte();
			if (c == '\r' || c == '\n' || len == STAY_LINE_MAX) {
				line[len] = '\0';
				if (!strcmp(line, "read")) {
					crc_ranges();
					printf("blk: reads done %u\n", ++rounds);
				} else if (!strcmp(line, "quit")) {
					t_pass("blk received \"quit\"");
					t_finish();
				}
				len = 0;
			} else if (c >= 0x20 && c < 0x7F) {
				line[len++] = (char)c;
			}
		}
		if (irq_on) {
			cli();
			if (dev.config_changes == seen) {
				virtio_wake_timer(STAY_WAKE_US);
				sti_hlt();
			}
			cli();
		}
	}
}

void guest_main(void)
{
	char mode[32];

	t_start();
	u32 index = (u32)cmdline_get_u64("blk.index", 0, NULL);
	bool found = virtio_find(VIRTIO_ID_BLOCK, index, &dev, true);
	if (!t_check(found, "a virtio-blk device (virtio-mmio, LNRO0005 in the DSDT)", "blk.index=%u not found", index))
		return;
	t_info("blk.device", "base %lx gsi %u version %u vendor %x", dev.base, dev.res.gsi, dev.version, dev.vendor_id);
	if (!t_check(dev.version == 2, "virtio-mmio version 2", "version %u (legacy)", dev.version))
		return;
	if (!blk_setup(true))
		return;
	irq_on = virtio_irq_setup(&dev);
	if (irq_on)
		t_info("blk.completion", "interrupt: gsi %u %s %s, vector %x", dev.res.gsi, dev.res.level ? "level" : "edge",
		       dev.res.active_low ? "active-low" : "active-high", dev.vector);
	else
		t_info("blk.completion", "polling");
	req = virtio_alloc(sizeof(*req), 64, true);
	segments = (u32)cmdline_get_u64("blk.segments", 1, NULL);
	if (segments < 1)
		segments = 1;
	if (segments > MAX_SEGS)
		segments = MAX_SEGS;
	if (cfg.seg_max && segments > cfg.seg_max)
		segments = cfg.seg_max;
	if (cmdline_get("blk.bench", mode, sizeof(mode))) {
		bench(mode);
		return;
	}
	buf_size = BASIC_BUF;
	while (buf_size > 64 * 1024 && 2 * buf_size + MIB > virtio_mem_left())
		buf_size /= 2;
	buf = virtio_alloc(buf_size, 4096, false);
	buf2 = virtio_alloc(buf_size, 4096, false);
	if (!t_check(req && buf && buf2, "guest memory for requests", "%lu bytes left", virtio_mem_left()))
		return;
	if (cmdline_get("blk.hostile", mode, sizeof(mode))) {
		hostile(mode);
		return;
	}
	if (!cmdline_get("blk.test", mode, sizeof(mode)))
		memcpy(mode, "basic", 6);
	bool ro_present;
	u64 ro = cmdline_get_u64("expect.ro", 0, &ro_present);
	if (ro_present)
		t_check(cfg.ro == (ro != 0), "VIRTIO_BLK_F_RO as expect.ro says", "ro %u, expected %lu", cfg.ro, ro);
	if (!strcmp(mode, "basic"))
		basic();
	else if (strcmp(mode, "none"))
		t_fail("blk.test=%s: unknown script (basic, none)", mode);
	if (cmdline_get_u64("blk.stay", 0, NULL))
		stay();
}
