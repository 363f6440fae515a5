/*
 * net: a virtio-net driver and a small IPv4 stack (guest; set-up at CPL0, the
 * stack and the benchmark at CPL3).
 *
 * Finds the net.index-th virtio-net device among the DSDT's LNRO0005
 * devices, negotiates VERSION_1 plus MAC, STATUS, MRG_RXBUF and MTU (and
 * INDIRECT_DESC, EVENT_IDX) when offered, sets up the receive and transmit
 * queues with 2 KiB buffers and the 12-byte virtio_net_hdr_v1, and runs the
 * stack of lib/net.c at CPL3 (Ethernet, ARP, IPv4, ICMP echo, UDP, DHCP, TCP).
 * Receive completion is interrupt-driven (the CPU waits in hlt, with the
 * LAPIC timer as a backstop for the stack's timers) unless virtio.irq=0.
 *
 * Command line:
 *   net.index=N              the N-th virtio-net device (default 0)
 *   net.test=a,b,...         steps in order: dhcp, ping, udp, tcp, none (default dhcp,ping)
 *   net.ip=A.B.C.D           a static address instead of DHCP (with net.gw=, net.mask=)
 *   net.ping=A.B.C.D         what "ping" pings (default: the gateway)
 *   net.udp.send=IP:PORT:TEXT  "udp": send TEXT, report a reply on the source port
 *   expect.udp_reply=1       "udp": the reply must come and equal TEXT
 *   net.tcp.get=IP:PORT      "tcp": connect, send net.tcp.send (default "tenbox-guest") and a
 *                            newline, read until FIN: bytes, CRC-32, first line
 *   net.udp.echo=PORT        answer UDP datagrams to PORT with their payload
 *   net.tcp.listen=PORT      accept TCP connections on PORT and echo what arrives
 *   net.stay=1               stay up afterwards ("net: ready"): services run, link changes are
 *                            reported; console "quit" or "poweroff", or the power button, end it
 *   net.bench=udp-tx|udp-rx  benchmark against a UDP socket at net.bench.ip:net.bench.port
 *                            (default the gateway, 5555): net.bench.count= (10000), net.bench.size= (1024)
 *   net.bench.wait=1         instead, wait for a datagram on port 40000 (a host forward) and
 *                            take its sender as the peer: udp-tx streams to it, udp-rx counts
 *                            what it streams next
 *   virtio.indirect=0 virtio.event_idx=0 virtio.irq=0   (lib/virtio.h)
 *
 * Lines: info - net.mac=, net.features=, net.link=up|down, net.ip=<ip> gw=<gw> dns=<dns>,
 * ok - ping <ip>, info - net.udp.reply=, info - net.tcp.{bytes,crc32,line}=, net: ready,
 * net: tcp accepted/connected/closed ..., net: udp echo ..., net: start, net: done packets= bytes= tsc=.
 */
#include "acpi.h"
#include "bootparams.h"
#include "cpu.h"
#include "net.h"
#include "power.h"
#include "printf.h"
#include "serial.h"
#include "test.h"
#include "time.h"
#include "virtio.h"
#include "x86.h"

const char guest_name[] = "net";

#define QUEUE_WANT 256
#define CFG_MAC 0
#define CFG_STATUS 6
#define CFG_MTU 10
#define SLICE_MS 10
#define WAKE_US 10000
#define DHCP_TIMEOUT_S 20
#define PING_TIMEOUT_S 10
#define UDP_TIMEOUT_S 5
#define TCP_TIMEOUT_S 30
#define BENCH_PORT_DEFAULT 5555
#define BENCH_LOCAL_PORT 40000
#define UDP_LOCAL_PORT 40001
#define BENCH_STALL_S 5
#define BENCH_IDLE_MS 300
#define LINE_MAX 120

static const char *const feature_names[24] = {
	[VIRTIO_NET_F_CSUM] = "CSUM", [VIRTIO_NET_F_GUEST_CSUM] = "GUEST_CSUM", [2] = "CTRL_GUEST_OFFLOADS",
	[VIRTIO_NET_F_MTU] = "MTU", [VIRTIO_NET_F_MAC] = "MAC", [6] = "GSO", [7] = "GUEST_TSO4", [8] = "GUEST_TSO6",
	[9] = "GUEST_ECN", [10] = "GUEST_UFO", [11] = "HOST_TSO4", [12] = "HOST_TSO6", [13] = "HOST_ECN",
	[14] = "HOST_UFO", [VIRTIO_NET_F_MRG_RXBUF] = "MRG_RXBUF", [VIRTIO_NET_F_STATUS] = "STATUS",
	[VIRTIO_NET_F_CTRL_VQ] = "CTRL_VQ", [18] = "CTRL_RX", [19] = "CTRL_VLAN", [20] = "CTRL_RX_EXTRA",
	[21] = "GUEST_ANNOUNCE", [22] = "MQ", [23] = "CTRL_MAC_ADDR",
};

static struct virtio_dev dev;
static struct net n;
static bool irq_mode;
static bool link_up = true;
static u32 config_seen;

/* ---- the CPL0 side of the stack: log, link, console, power button ---- */

static void flush_log(void)
{
	char *p = n.log, *end = n.log + n.log_len;

	while (p < end) {
		char *e = p;
		while (e < end && *e != '\n')
			e++;
		*e = '\0';
		if (!strncmp(p, "not ok - ", 9))
			t_fail("%s", p + 9);
		else if (!strncmp(p, "ok - ", 5))
			t_pass("%s", p + 5);
		else
			printf("%s\n", p);
		p = e + 1;
	}
	n.log_len = 0;
}

static bool read_link(void)
{
	return !virtio_has(&dev, VIRTIO_NET_F_STATUS) || (virtio_config16(&dev, CFG_STATUS) & VIRTIO_NET_S_LINK_UP);
}

/* A configuration change (by interrupt, or InterruptStatus when polling): report the link. */
static void check_link(void)
{
	if (!irq_mode) {
		u32 isr = virtio_read32(&dev, VIRTIO_MMIO_INTERRUPT_STATUS);
		if (isr)
			virtio_write32(&dev, VIRTIO_MMIO_INTERRUPT_ACK, isr);
		if (isr & VIRTIO_INT_CONFIG)
			dev.config_changes++;
	}
	if (dev.config_changes == config_seen)
		return;
	config_seen = dev.config_changes;
	bool up = read_link();
	if (up != link_up) {
		link_up = up;
		t_info("net.link", "%s", up ? "up" : "down");
	}
}

/* One round: the stack at CPL3 for up to a slice (polling) or until it is idle (interrupts). */
static void pump(void)
{
	struct net_poll_job j = { &n, irq_mode ? 0 : rdtsc() + tsc_hz() / 1000 * SLICE_MS };

	run_user(net_poll_job, (u64)&j);
	if (n.log_len)
		flush_log();
	check_link();
}

/* Sleep until a received frame, a configuration interrupt or the wake-up timer. */
static void idle_wait(void)
{
	if (!irq_mode)
		return;
	cli();
	if (virtq_irq_enable(&n.rxq) && dev.config_changes == config_seen) {
		virtio_wake_timer(WAKE_US);
		sti_hlt();
		cli();
	}
	virtq_irq_disable(&n.rxq);
}

static bool wait_for(bool (*done)(void), u32 seconds)
{
	struct deadline dl;

	deadline_start(&dl, seconds);
	for (;;) {
		pump();
		if (done())
			return true;
		if (deadline_expired(&dl))
			return false;
		idle_wait();
	}
}

/* ---- the power button, polled (GED event selector or PM1_STS) ---- */

#define PWRBTN_STS (1u << 8)
#define GED_POWER_DOWN 0x2
static struct acpi_gas pm1_sts;
static u64 ged_esel;
static bool button_armed;

static bool aml_int(const u8 *p, const u8 *end, u64 *v)
{
	u32 nb = p[0] == 0x0A ? 1 : p[0] == 0x0B ? 2 : p[0] == 0x0C ? 4 : p[0] == 0x0E ? 8 : 0;

	if (!nb || p + 1 + nb > end)
		return false;
	*v = 0;
	for (u32 i = 0; i < nb; i++)
		*v |= (u64)p[1 + i] << (8 * i);
	return true;
}

static void button_setup(void)
{
	struct acpi_gas evt;

	if (!acpi_init() || !acpi.fadt)
		return;
	if (!(fadt_u32(FADT_FLAGS) & FADT_F_HW_REDUCED_ACPI) &&
	    fadt_block(FADT_X_PM1A_EVT_BLK, FADT_PM1A_EVT_BLK, fadt_u8(FADT_PM1_EVT_LEN), &evt)) {
		pm1_sts = evt;
		pm1_sts.bit_width = 16;
		pm1_sts.access_size = 0;
		gas_write(&pm1_sts, PWRBTN_STS);
		button_armed = true;
		t_info("net.power_button", "PM1_STS polled at %lx", pm1_sts.address);
		return;
	}
	const struct acpi_sdt *d = acpi.dsdt;
	s64 at = d ? acpi_find(d, sizeof(*d), "ACPI0013", 8) : -1;
	if (at < 0)
		return;
	const u8 *p = (const u8 *)d + at, *end = (const u8 *)d + d->length;
	if (end > p + 256)
		end = p + 256;
	for (const u8 *q = p; q + 9 <= end; q++) {
		u64 addr;
		/* OperationRegion (name, SystemMemory, offset, length). */
		if (q[0] == 0x5B && q[1] == 0x80 && q[6] == 0 && aml_int(q + 7, end, &addr) && addr < (1ul << 32)) {
			ged_esel = addr;
			mmio_read32(ged_esel); /* drop a stale event */
			button_armed = true;
			t_info("net.power_button", "GED event selector polled at %lx", ged_esel);
			return;
		}
	}
}

static bool button_pressed(void)
{
	if (!button_armed)
		return false;
	if (ged_esel)
		return mmio_read32(ged_esel) & GED_POWER_DOWN;
	u32 sts = (u32)gas_read(&pm1_sts);
	if (!(sts & PWRBTN_STS))
		return false;
	gas_write(&pm1_sts, PWRBTN_STS);
	return true;
}

/* ---- steps ---- */

static bool dhcp_over(void) { return n.dhcp_state == DHCP_BOUND || n.dhcp_state == DHCP_FAILED; }
static bool ping_over(void) { return n.ping_state == PING_DONE || n.ping_state == PING_FAILED; }
static bool udp_over(void) { return n.udp_replied; }
static bool udp_sent(void) { return n.udp_sent; }
static bool tcp_over(void) { return n.tcp.finished > 0; }
static u32 resolve_ip;
static bool arp_over(void) { return net_resolve(&n, resolve_ip) != NULL; }

/* The gateway's MAC up front (replies to it need not wait for ARP). */
static void resolve_gateway(void)
{
	if (!n.gw)
		return;
	resolve_ip = n.gw;
	if (wait_for(arp_over, 3)) {
		const u8 *m = net_resolve(&n, n.gw);
		t_info("net.gw_mac", "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
	} else {
		t_info("net.gw_mac", "(no ARP reply)");
	}
}

static bool need_ip(const char *step)
{
	if (!n.ip)
		t_fail("%s needs an IPv4 address: add dhcp to net.test or give net.ip=", step);
	return n.ip != 0;
}

static void step_dhcp(void)
{
	char a[16], g[16], s[16];

	n.dhcp_start = true;
	bool over = wait_for(dhcp_over, DHCP_TIMEOUT_S);
	if (!t_check(over && n.dhcp_state == DHCP_BOUND, "DHCP lease (DISCOVER, OFFER, REQUEST, ACK)", "%s",
		     over ? "no answer" : "timed out"))
		return;
	t_info("net.ip", "%s gw=%s dns=%s", net_ip_str(n.ip, a), net_ip_str(n.gw, g), net_ip_str(n.dns, s));
	t_info("net.dhcp", "mask %s server %s lease %lu s", net_ip_str(n.mask, a), net_ip_str(n.dhcp_server, g),
	       n.dhcp_lease);
	resolve_gateway();
}

static bool parse_ip_key(const char *key, u32 *ip)
{
	char v[32];
	const char *end;

	return cmdline_get(key, v, sizeof(v)) && net_parse_ip(v, ip, &end) && !*end;
}

static void step_ping(void)
{
	char a[16];
	u32 target = n.gw;

	if (!need_ip("ping"))
		return;
	parse_ip_key("net.ping", &target);
	n.ping_ip = target;
	n.ping_start = true;
	bool over = wait_for(ping_over, PING_TIMEOUT_S);
	char desc[48];
	snprintf(desc, sizeof(desc), "ping %s", net_ip_str(target, a));
	if (t_check(over && n.ping_state == PING_DONE, desc, "%s after %u echo requests", over ? "no reply" : "timed out",
		    n.ping_tries))
		t_info("net.ping.rtt_us", "%lu", n.ping_rtt * 1000000 / tsc_hz());
}

/* IP:PORT[:TEXT] */
static bool parse_endpoint(const char *v, u32 *ip, u16 *port, char *text, size_t size)
{
	const char *p;
	u64 pt = 0;

	if (!net_parse_ip(v, ip, &p) || *p++ != ':')
		return false;
	if (*p < '0' || *p > '9')
		return false;
	while (*p >= '0' && *p <= '9')
		pt = pt * 10 + (u64)(*p++ - '0');
	if (!pt || pt > 65535)
		return false;
	*port = (u16)pt;
	if (text) {
		if (*p == ':')
			p++;
		else if (*p)
			return false;
		size_t l = strnlen(p, size - 1);
		memcpy(text, p, l);
		text[l] = '\0';
		return true;
	}
	return *p == '\0';
}

static void step_udp(void)
{
	char v[NET_TEXT_MAX + 32], a[16];

	if (!need_ip("udp"))
		return;
	if (!cmdline_get("net.udp.send", v, sizeof(v)) ||
	    !parse_endpoint(v, &n.udp_dst_ip, &n.udp_dst_port, n.udp_text, sizeof(n.udp_text))) {
		t_fail("udp needs net.udp.send=IP:PORT:TEXT");
		return;
	}
	n.udp_src_port = UDP_LOCAL_PORT;
	n.udp_replied = false;
	n.udp_sent = false;
	n.udp_send = true;
	char desc[64];
	snprintf(desc, sizeof(desc), "udp datagram sent to %s:%u", net_ip_str(n.udp_dst_ip, a), n.udp_dst_port);
	if (!t_check(wait_for(udp_sent, UDP_TIMEOUT_S), desc, "the next hop did not answer ARP"))
		return;
	bool expect = cmdline_get_u64("expect.udp_reply", 0, NULL) != 0;
	bool got = wait_for(udp_over, expect ? UDP_TIMEOUT_S : 2);
	if (got)
		t_info("net.udp.reply", "%s", n.udp_reply);
	if (expect)
		t_check(got && !strcmp(n.udp_reply, n.udp_text), "the udp reply echoes the datagram", "%s",
			got ? n.udp_reply : "no reply");
}

static void step_tcp(void)
{
	char v[64], a[16];

	if (!need_ip("tcp"))
		return;
	if (!cmdline_get("net.tcp.get", v, sizeof(v)) || !parse_endpoint(v, &n.tcp_dst_ip, &n.tcp_dst_port, NULL, 0)) {
		t_fail("tcp needs net.tcp.get=IP:PORT");
		return;
	}
	if (!cmdline_get("net.tcp.send", n.tcp_text, sizeof(n.tcp_text) - 1))
		memcpy(n.tcp_text, "tenbox-guest", 13);
	size_t l = strlen(n.tcp_text);
	n.tcp_text[l] = '\n';
	n.tcp_text[l + 1] = '\0';
	u16 saved_listen = n.tcp_listen_port;
	n.tcp_listen_port = 0; /* the one connection block is the client's now */
	n.tcp.finished = 0;
	n.tcp_connect = true;
	bool over = wait_for(tcp_over, TCP_TIMEOUT_S);
	char desc[64];
	snprintf(desc, sizeof(desc), "tcp get %s:%u", net_ip_str(n.tcp_dst_ip, a), n.tcp_dst_port);
	if (t_check(over && !n.tcp.reset, desc, "%s", !over ? "timed out" : "connection reset or refused")) {
		t_info("net.tcp.bytes", "%lu", n.tcp.rx_bytes);
		t_info("net.tcp.crc32", "%08x", n.tcp.rx_crc);
		n.tcp.line[n.tcp.line_len] = '\0';
		t_info("net.tcp.line", "%s", n.tcp.line);
	}
	if (!over) {
		n.tcp.state = TCP_CLOSED;
		n.tcp.rto_at = 0;
	}
	n.tcp_listen_port = saved_listen;
	n.tcp.finished = 0;
}

/* ---- the benchmark (CPL3) ---- */

struct udp_bench {
	struct net *n;
	u32 dst;
	u16 sport, dport;
	u32 size;
	u64 count;
	u64 stall_ticks, idle_ticks;
	u64 packets, bytes, tsc;
	bool stalled;
	bool wait;
};

static bool bench_peer_seen(void)
{
	net_step(&n);
	return n.bench_packets > 0;
}

static u64 udp_tx_job(u64 arg)
{
	struct udp_bench *b = (struct udp_bench *)arg;
	struct net *nn = b->n;
	u64 t0 = rdtsc(), last = t0;
	u32 batch = 0;

	while (b->packets < b->count) {
		u8 *f = net_tx_alloc(nn);
		if (!f) {
			virtq_kick(&nn->txq);
			batch = 0;
			if (rdtsc() - last > b->stall_ticks) {
				b->stalled = true;
				break;
			}
			cpu_relax();
			continue;
		}
		u8 *p = f + NET_UDP_PAYLOAD;
		memset(p, 0x61 + (u8)(b->packets % 26), b->size);
		memcpy(p, &b->packets, sizeof(b->packets));
		if (!net_udp_send(nn, f, b->dst, b->sport, b->dport, b->size, false))
			continue;
		b->packets++;
		b->bytes += b->size;
		last = rdtsc();
		if (++batch == 32) {
			virtq_kick(&nn->txq);
			batch = 0;
		}
	}
	virtq_kick(&nn->txq);
	/* Done when the device has taken every frame. */
	while (!b->stalled) {
		net_tx_reclaim(nn);
		if (nn->tx_nfree == nn->tx_count)
			break;
		if (rdtsc() - last > b->stall_ticks)
			b->stalled = true;
		cpu_relax();
	}
	b->tsc = rdtsc() - t0;
	return 0;
}

static u64 udp_rx_job(u64 arg)
{
	struct udp_bench *b = (struct udp_bench *)arg;
	struct net *nn = b->n;
	u64 t0 = rdtsc();

	nn->bench_port = b->sport;
	nn->bench_packets = nn->bench_bytes = 0;
	if (!b->wait) {
		u8 *f = NULL;
		while (!f)
			f = net_tx_alloc(nn);
		int len = snprintf((char *)f + NET_UDP_PAYLOAD, 128, "tenbox-bench udp-rx count=%lu size=%u", b->count,
				   b->size);
		net_udp_send(nn, f, b->dst, b->sport, b->dport, (u32)len, true);
	}
	for (;;) {
		net_step(nn);
		u64 t = rdtsc();
		if (nn->bench_packets >= b->count)
			break;
		if (nn->bench_packets && t - nn->bench_last > b->idle_ticks)
			break;
		if (!nn->bench_packets && t - t0 > b->stall_ticks) {
			b->stalled = true;
			break;
		}
	}
	b->packets = nn->bench_packets;
	b->bytes = nn->bench_bytes;
	b->tsc = nn->bench_packets ? nn->bench_last - t0 : rdtsc() - t0;
	nn->bench_port = 0;
	return 0;
}

static void bench(const char *kind)
{
	static struct udp_bench b;
	char a[16];
	bool tx = !strcmp(kind, "udp-tx");

	if (!tx && strcmp(kind, "udp-rx")) {
		t_fail("net.bench=%s: unknown kind (udp-tx, udp-rx)", kind);
		return;
	}
	if (!need_ip("the benchmark"))
		return;
	b.n = &n;
	b.dst = n.gw;
	parse_ip_key("net.bench.ip", &b.dst);
	b.dport = (u16)cmdline_get_u64("net.bench.port", BENCH_PORT_DEFAULT, NULL);
	b.sport = BENCH_LOCAL_PORT;
	b.size = (u32)cmdline_get_u64("net.bench.size", 1024, NULL);
	b.count = cmdline_get_u64("net.bench.count", 10000, NULL);
	b.wait = cmdline_get_u64("net.bench.wait", 0, NULL) != 0;
	b.stall_ticks = tsc_hz() * BENCH_STALL_S;
	b.idle_ticks = tsc_hz() / 1000 * BENCH_IDLE_MS;
	if (b.size < 8 || b.size > 1472) {
		t_fail("net.bench.size must be 8..1472");
		return;
	}
	if (b.wait) {
		/* The host opens the conversation through its forward; its sender is our peer. */
		n.bench_port = b.sport;
		n.bench_packets = 0;
		printf("net: bench waiting on port %u\n", b.sport);
		bool seen = wait_for(bench_peer_seen, 60);
		n.bench_port = 0;
		if (!t_check(seen, "a datagram opened the benchmark", "none in 60 s"))
			return;
		b.dst = n.bench_peer_ip;
		b.dport = n.bench_peer_port;
	}
	/* The next hop's MAC first, so the loop never waits for ARP. */
	resolve_ip = b.dst;
	bool resolved = wait_for(arp_over, 5);
	if (!t_check(resolved, "the benchmark's next hop answers ARP", "no ARP reply"))
		return;
	virtq_irq_disable(&n.rxq);
	virtq_irq_disable(&n.txq);
	t_info("net.bench", "%s to %s:%u count=%lu size=%u", kind, net_ip_str(b.dst, a), b.dport, b.count, b.size);
	printf("net: start\n");
	run_user(tx ? udp_tx_job : udp_rx_job, (u64)&b);
	printf("net: done packets=%lu bytes=%lu tsc=%lu\n", b.packets, b.bytes, b.tsc);
	t_info("net.bench.kicks", "tx %lu notified, %lu suppressed; rx %lu notified", n.txq.kicks, n.txq.kicks_saved,
	       n.rxq.kicks);
	if (tsc_hz_known() && b.tsc)
		t_info("net.bench.rate", "%lu packets/s %lu KiB/s", b.packets * tsc_hz() / b.tsc,
		       b.bytes * tsc_hz() / b.tsc / 1024);
	if (tx)
		t_check(!b.stalled && b.packets == b.count, "every benchmark datagram went out", "%lu of %lu%s", b.packets,
			b.count, b.stalled ? " (the device stopped taking frames)" : "");
	else
		t_check(b.packets > 0, "benchmark datagrams arrived", "none in %u s", BENCH_STALL_S);
}

/* ---- staying up ---- */

static NORETURN void stay(void)
{
	char line[LINE_MAX + 1];
	u32 len = 0;

	button_setup();
	printf("net: ready\n");
	for (;;) {
		pump();
		while (serial_rx_ready()) {
			u8 c = serial_rx_byte();
			if (c == '\r' || c == '\n' || len == LINE_MAX) {
				line[len] = '\0';
				if (len)
					printf("echo: %s\n", line);
				if (!strcmp(line, "quit") || !strcmp(line, "poweroff")) {
					t_pass("net received \"%s\"", line);
					t_finish();
				}
				len = 0;
			} else if (c >= 0x20 && c < 0x7F) {
				line[len++] = (char)c;
			}
		}
		if (button_pressed()) {
			printf("net: power button\n");
			t_pass("the ACPI power button reached the guest");
			t_finish();
		}
		idle_wait();
	}
}

/* ---- set-up ---- */

static bool setup(void)
{
	char names[256];
	u64 want = BIT64(VIRTIO_NET_F_MAC) | BIT64(VIRTIO_NET_F_STATUS) | BIT64(VIRTIO_NET_F_MRG_RXBUF) |
		   BIT64(VIRTIO_NET_F_MTU);
	const char *why = virtio_negotiate(&dev, want);

	if (!t_check(!why, "virtio-net feature negotiation (VERSION_1, FEATURES_OK)", "%s", why))
		return false;
	virtio_feature_names(dev.offered, feature_names, names, sizeof(names));
	t_info("net.offered", "%lx %s", dev.offered, names);
	virtio_feature_names(dev.features, feature_names, names, sizeof(names));
	t_info("net.features", "%lx %s", dev.features, names);
	if (virtio_has(&dev, VIRTIO_NET_F_MAC)) {
		for (u32 i = 0; i < 6; i++)
			n.mac[i] = virtio_config8(&dev, CFG_MAC + i);
	} else {
		u64 t = rdtsc();
		n.mac[0] = 0x02; /* locally administered */
		for (u32 i = 1; i < 6; i++)
			n.mac[i] = (u8)(t >> (8 * i));
	}
	t_info("net.mac", "%02x:%02x:%02x:%02x:%02x:%02x%s", n.mac[0], n.mac[1], n.mac[2], n.mac[3], n.mac[4], n.mac[5],
	       virtio_has(&dev, VIRTIO_NET_F_MAC) ? "" : " (made up: no VIRTIO_NET_F_MAC)");
	if (virtio_has(&dev, VIRTIO_NET_F_MTU))
		t_info("net.mtu", "%u", virtio_config16(&dev, CFG_MTU));
	n.mrg_rxbuf = virtio_has(&dev, VIRTIO_NET_F_MRG_RXBUF);
	why = virtq_init(&dev, &n.rxq, 0, QUEUE_WANT, 0);
	if (!t_check(!why, "receive queue 0 set up", "%s", why))
		return false;
	why = virtq_init(&dev, &n.txq, 1, QUEUE_WANT, 0);
	if (!t_check(!why, "transmit queue 1 set up", "%s", why))
		return false;
	t_info("net.queues", "rx %u tx %u event_idx %s mrg_rxbuf %s", n.rxq.size, n.txq.size,
	       n.rxq.event_idx ? "on" : "off", n.mrg_rxbuf ? "on" : "off");
	virtio_driver_ok(&dev);
	u32 st = virtio_status(&dev);
	if (!t_check((st & VIRTIO_S_DRIVER_OK) && !(st & VIRTIO_S_NEEDS_RESET), "DRIVER_OK is set", "status %x", st))
		return false;
	if (!t_check(net_buffers_init(&n), "receive and transmit buffers", "out of guest memory"))
		return false;
	n.dev = &dev;
	n.tsc_hz = tsc_hz();
	virtq_irq_disable(&n.txq); /* transmit buffers are reclaimed by polling */
	virtq_irq_disable(&n.rxq);
	irq_mode = virtio_irq_setup(&dev);
	if (irq_mode)
		t_info("net.completion", "interrupt: gsi %u %s %s, vector %x", dev.res.gsi, dev.res.level ? "level" : "edge",
		       dev.res.active_low ? "active-low" : "active-high", dev.vector);
	else
		t_info("net.completion", "polling");
	link_up = read_link();
	t_info("net.link", "%s", link_up ? "up" : "down");
	return true;
}

static bool in_list(const char *list, const char *word)
{
	size_t wl = strlen(word);

	for (const char *p = list; *p;) {
		const char *e = p;
		while (*e && *e != ',')
			e++;
		if ((size_t)(e - p) == wl && !memcmp(p, word, wl))
			return true;
		p = *e ? e + 1 : e;
	}
	return false;
}

void guest_main(void)
{
	char list[128], v[32];

	t_start();
	u32 index = (u32)cmdline_get_u64("net.index", 0, NULL);
	bool found = virtio_find(VIRTIO_ID_NET, index, &dev, true);
	if (!t_check(found, "a virtio-net device (virtio-mmio, LNRO0005 in the DSDT)", "net.index=%u not found", index))
		return;
	t_info("net.device", "base %lx gsi %u version %u vendor %x", dev.base, dev.res.gsi, dev.version, dev.vendor_id);
	if (!t_check(dev.version == 2, "virtio-mmio version 2", "version %u (legacy)", dev.version))
		return;
	if (!setup())
		return;

	if (parse_ip_key("net.ip", &n.ip)) {
		n.mask = IP4(255, 255, 255, 0);
		parse_ip_key("net.mask", &n.mask);
		parse_ip_key("net.gw", &n.gw);
		parse_ip_key("net.dns", &n.dns);
		resolve_gateway();
	}
	n.udp_echo_port = (u16)cmdline_get_u64("net.udp.echo", 0, NULL);
	n.tcp_listen_port = (u16)cmdline_get_u64("net.tcp.listen", 0, NULL);

	if (!cmdline_get("net.test", list, sizeof(list)))
		memcpy(list, "dhcp,ping", 10);
	for (char *p = list; *p;) {
		char *e = p;
		while (*e && *e != ',')
			e++;
		char save = *e;
		*e = '\0';
		if (!strcmp(p, "dhcp"))
			step_dhcp();
		else if (!strcmp(p, "ping"))
			step_ping();
		else if (!strcmp(p, "udp"))
			step_udp();
		else if (!strcmp(p, "tcp"))
			step_tcp();
		else if (strcmp(p, "none"))
			t_fail("net.test: unknown step \"%s\" (dhcp, ping, udp, tcp, none)", p);
		*e = save;
		p = *e ? e + 1 : e;
	}
	if (cmdline_get("net.udp.send", NULL, 0) && !in_list(list, "udp"))
		step_udp();
	if (cmdline_get("net.tcp.get", NULL, 0) && !in_list(list, "tcp"))
		step_tcp();
	if (cmdline_get("net.bench", v, sizeof(v)))
		bench(v);
	if (cmdline_get_u64("net.stay", 0, NULL))
		stay();
	t_info("net.stats", "rx %lu tx %lu dropped %lu bad_csum %lu tx_full %lu irqs %u", n.rx_frames, n.tx_frames,
	       n.rx_dropped, n.rx_bad_csum, n.tx_no_buffer, dev.irqs);
}
