/* Ethernet, ARP, IPv4, ICMP, UDP, DHCP and TCP over virtio-net (guest, CPL3; set-up at CPL0). */
#include "net.h"
#include "printf.h"
#include "x86.h"

#define ETH_HLEN 14
#define IP_HLEN 20
#define UDP_HLEN 8
#define TCP_HLEN 20
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define ETH_MTU 1500
#define TCP_MSS (ETH_MTU - IP_HLEN - TCP_HLEN)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10

#define DHCP_CLIENT_PORT 68
#define DHCP_SERVER_PORT 67
#define DHCP_MAGIC 0x63825363
#define DHCP_DISCOVER 1
#define DHCP_OFFER 2
#define DHCP_REQUEST 3
#define DHCP_ACK 5
#define DHCP_NAK 6
#define DHCP_TRIES 6
#define PING_TRIES 4
#define PING_ID 0x7462 /* "tb" */
#define PING_PAYLOAD 56
#define TCP_RETRIES 8
#define TCP_RCV_WINDOW 32768

static const u8 broadcast_mac[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };

/* ---- bytes ---- */

static inline u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }

static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
	for (; len > 1; p += 2, len -= 2)
		sum += (u32)p[0] << 8 | p[1];
	if (len)
		sum += (u32)p[0] << 8;
	return sum;
}

static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (u16)~sum;
}

/* The pseudo-header sum for UDP and TCP. */
static u32 pseudo_sum(u32 src, u32 dst, u8 proto, u32 len)
{
	return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + len;
}

u32 net_crc32(u32 crc, const void *p, u64 len)
{
	const u8 *b = p;

	crc = ~crc;
	for (u64 i = 0; i < len; i++) {
		crc ^= b[i];
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
	}
	return ~crc;
}

const char *net_ip_str(u32 ip, char *buf)
{
	snprintf(buf, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xFF, (ip >> 8) & 0xFF, ip & 0xFF);
	return buf;
}

bool net_parse_ip(const char *s, u32 *ip, const char **end)
{
	u32 v = 0;

	for (int i = 0; i < 4; i++) {
		u32 part = 0, digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 4) {
			part = part * 10 + (u32)(*s++ - '0');
			digits++;
		}
		if (!digits || part > 255)
			return false;
		v = v << 8 | part;
		if (i < 3 && *s++ != '.')
			return false;
	}
	*ip = v;
	if (end)
		*end = s;
	return true;
}

/* ---- the log (read by the CPL0 side) ---- */

void net_log(struct net *n, const char *fmt, ...)
{
	va_list ap;
	u32 room = NET_LOG_SIZE - n->log_len;

	if (room < 2)
		return;
	va_start(ap, fmt);
	int w = vsnprintf(n->log + n->log_len, room - 1, fmt, ap);
	va_end(ap);
	if (w < 0)
		return;
	u32 used = (u32)w < room - 2 ? (u32)w : room - 2;
	n->log_len += used;
	n->log[n->log_len++] = '\n';
	n->log[n->log_len] = '\0';
}

static u64 now(void)
{
	return rdtsc();
}

static u64 ms(const struct net *n, u64 v)
{
	return n->tsc_hz / 1000 * v;
}

/* ---- buffers and the queues ---- */

static void rx_give(struct net *n, u8 *buf)
{
	struct vbuf b = { (u64)buf, NET_BUF_SIZE, true };
	virtq_add(&n->rxq, &b, 1, buf);
}

bool net_buffers_init(struct net *n)
{
	u32 rx = n->rxq.size, tx = n->txq.size;

	n->rx_bufs = virtio_alloc((u64)rx * NET_BUF_SIZE, 4096, false);
	n->tx_bufs = virtio_alloc((u64)tx * NET_BUF_SIZE, 4096, true);
	n->tx_free = virtio_alloc(2ul * tx, 8, false);
	n->reasm = virtio_alloc(65536 + NET_BUF_SIZE, 4096, false);
	n->tcp.sbuf = virtio_alloc(NET_TCP_SBUF, 4096, false);
	if (!n->rx_bufs || !n->tx_bufs || !n->tx_free || !n->reasm || !n->tcp.sbuf)
		return false;
	for (u32 i = 0; i < rx; i++)
		rx_give(n, n->rx_bufs + (u64)i * NET_BUF_SIZE);
	for (u32 i = 0; i < tx; i++)
		n->tx_free[i] = (u16)i;
	n->tx_nfree = n->tx_count = tx;
	virtq_kick(&n->rxq);
	return true;
}

void net_tx_reclaim(struct net *n)
{
	u8 *buf;

	while ((buf = virtq_get(&n->txq, NULL)))
		n->tx_free[n->tx_nfree++] = (u16)((buf - n->tx_bufs) / NET_BUF_SIZE);
}

u8 *net_tx_alloc(struct net *n)
{
	if (!n->tx_nfree)
		net_tx_reclaim(n);
	if (!n->tx_nfree) {
		n->tx_no_buffer++;
		return NULL;
	}
	u8 *buf = n->tx_bufs + (u64)n->tx_free[--n->tx_nfree] * NET_BUF_SIZE;
	return buf + VIRTIO_NET_HDR_LEN;
}

static void tx_free(struct net *n, u8 *frame)
{
	n->tx_free[n->tx_nfree++] = (u16)((frame - VIRTIO_NET_HDR_LEN - n->tx_bufs) / NET_BUF_SIZE);
}

void net_tx_send(struct net *n, u8 *frame, u32 len, bool kick)
{
	u8 *hdr = frame - VIRTIO_NET_HDR_LEN;

	memset(hdr, 0, VIRTIO_NET_HDR_LEN); /* no checksum offload, no GSO; num_buffers 0 on transmit */
	struct vbuf b = { (u64)hdr, VIRTIO_NET_HDR_LEN + len, false };
	if (virtq_add(&n->txq, &b, 1, hdr) < 0) {
		tx_free(n, frame);
		n->tx_no_buffer++;
		return;
	}
	n->tx_frames++;
	if (kick)
		virtq_kick(&n->txq);
}

/* ---- Ethernet and ARP ---- */

static void eth_header(struct net *n, u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, n->mac, 6);
	put16(f + 12, type);
}

static void arp_learn(struct net *n, u32 ip, const u8 *mac)
{
	if (!ip)
		return;
	for (u32 i = 0; i < NET_ARP_ENTRIES; i++)
		if (n->arp[i].valid && n->arp[i].ip == ip) {
			memcpy(n->arp[i].mac, mac, 6);
			return;
		}
	u32 i = n->arp_next++ % NET_ARP_ENTRIES;
	n->arp[i].ip = ip;
	memcpy(n->arp[i].mac, mac, 6);
	n->arp[i].valid = true;
	if (ip == n->arp_want) {
		n->arp_want = 0;
		n->events++;
	}
	/* Frames that waited for this address go out now. */
	for (u32 k = 0; k < NET_ARP_PENDING; k++) {
		if (!n->arp_pending[k].frame || n->arp_pending[k].hop != ip)
			continue;
		u8 *f = n->arp_pending[k].frame;
		memcpy(f, mac, 6);
		net_tx_send(n, f, n->arp_pending[k].len, true);
		n->arp_pending[k].frame = NULL;
	}
}

static void tx_free(struct net *n, u8 *frame);

static void arp_pending_expire(struct net *n, u64 t)
{
	for (u32 k = 0; k < NET_ARP_PENDING; k++)
		if (n->arp_pending[k].frame && t - n->arp_pending[k].since > ms(n, 1000)) {
			tx_free(n, n->arp_pending[k].frame);
			n->arp_pending[k].frame = NULL;
			n->rx_dropped++;
		}
}

static void arp_send(struct net *n, u16 op, const u8 *tha, u32 tpa, const u8 *eth_dst)
{
	u8 *f = net_tx_alloc(n);
	if (!f)
		return;
	eth_header(n, f, eth_dst, ETH_P_ARP);
	u8 *a = f + ETH_HLEN;
	put16(a, 1);
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, n->mac, 6);
	put32(a + 14, n->ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	memset(a + 28, 0, 60 - ETH_HLEN - 28); /* pad to the Ethernet minimum */
	net_tx_send(n, f, 60, true);
}

static bool on_link(const struct net *n, u32 ip)
{
	return n->mask && (ip & n->mask) == (n->ip & n->mask);
}

static u32 next_hop(const struct net *n, u32 ip)
{
	return on_link(n, ip) || !n->gw ? ip : n->gw;
}

const u8 *net_resolve(struct net *n, u32 ip)
{
	u32 hop = next_hop(n, ip);

	if (ip == 0xFFFFFFFF)
		return broadcast_mac;
	for (u32 i = 0; i < NET_ARP_ENTRIES; i++)
		if (n->arp[i].valid && n->arp[i].ip == hop)
			return n->arp[i].mac;
	/* Ask, at most every 200 ms for the same address. */
	if (n->arp_want != hop || now() >= n->arp_next_tsc) {
		static const u8 zero[6];
		n->arp_want = hop;
		n->arp_next_tsc = now() + ms(n, 200);
		arp_send(n, 1, zero, hop, broadcast_mac);
	}
	return NULL;
}

static void arp_input(struct net *n, const u8 *a, u32 len)
{
	if (len < 28 || be16(a) != 1 || be16(a + 2) != ETH_P_IP || a[4] != 6 || a[5] != 4)
		return;
	u16 op = be16(a + 6);
	u32 spa = be32(a + 14), tpa = be32(a + 24);
	if (op == 2 || (n->ip && tpa == n->ip))
		arp_learn(n, spa, a + 8);
	if (op == 1 && n->ip && tpa == n->ip)
		arp_send(n, 2, a + 8, spa, a + 8);
}

/* ---- IPv4 ---- */

/* Fill the IPv4 and Ethernet headers of frame for an l4len-byte payload and
 * send it, or park it until the next hop answers ARP. */
static bool ip_send(struct net *n, u8 *f, u32 dst, u8 proto, u32 l4len, bool kick)
{
	const u8 *mac = net_resolve(n, dst);
	u8 *ip = f + ETH_HLEN;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(IP_HLEN + l4len));
	put16(ip + 4, n->ip_id++);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, n->ip);
	put32(ip + 16, dst);
	put16(ip + 10, csum_fold(csum_add(0, ip, IP_HLEN)));
	eth_header(n, f, mac ? mac : broadcast_mac, ETH_P_IP);
	u32 len = ETH_HLEN + IP_HLEN + l4len;
	if (len < 60) {
		memset(f + len, 0, 60 - len);
		len = 60;
	}
	if (mac) {
		net_tx_send(n, f, len, kick);
		return true;
	}
	for (u32 k = 0; k < NET_ARP_PENDING; k++)
		if (!n->arp_pending[k].frame) {
			n->arp_pending[k].frame = f;
			n->arp_pending[k].hop = next_hop(n, dst);
			n->arp_pending[k].len = len;
			n->arp_pending[k].since = now();
			return true;
		}
	tx_free(n, f);
	return false;
}

bool net_udp_send(struct net *n, u8 *f, u32 dst, u16 sport, u16 dport, u32 len, bool kick)
{
	u8 *u = f + ETH_HLEN + IP_HLEN;
	put16(u, sport);
	put16(u + 2, dport);
	put16(u + 4, (u16)(UDP_HLEN + len));
	put16(u + 6, 0);
	u16 c = csum_fold(csum_add(pseudo_sum(n->ip, dst, IPPROTO_UDP, UDP_HLEN + len), u, UDP_HLEN + len));
	put16(u + 6, c ? c : 0xFFFF);
	return ip_send(n, f, dst, IPPROTO_UDP, UDP_HLEN + len, kick);
}

/* ---- ICMP ---- */

static void ping_send(struct net *n)
{
	u8 *f = net_tx_alloc(n);
	if (!f)
		return;
	u8 *ic = f + ETH_HLEN + IP_HLEN;
	ic[0] = 8;
	ic[1] = 0;
	put16(ic + 2, 0);
	put16(ic + 4, n->ping_id);
	put16(ic + 6, ++n->ping_seq);
	for (u32 i = 0; i < PING_PAYLOAD; i++)
		ic[8 + i] = (u8)(0x20 + i);
	put16(ic + 2, csum_fold(csum_add(0, ic, 8 + PING_PAYLOAD)));
	n->ping_sent = now();
	ip_send(n, f, n->ping_ip, IPPROTO_ICMP, 8 + PING_PAYLOAD, true);
}

static void icmp_input(struct net *n, u32 src, const u8 *ic, u32 len)
{
	if (len < 8 || csum_fold(csum_add(0, ic, len)) != 0)
		return;
	if (ic[0] == 8 && ic[1] == 0) { /* echo request: answer with the same id, sequence and data */
		if (len > ETH_MTU - IP_HLEN)
			return;
		u8 *f = net_tx_alloc(n);
		if (!f)
			return;
		u8 *r = f + ETH_HLEN + IP_HLEN;
		memcpy(r, ic, len);
		r[0] = 0;
		put16(r + 2, 0);
		put16(r + 2, csum_fold(csum_add(0, r, len)));
		if (ip_send(n, f, src, IPPROTO_ICMP, len, true)) {
			char b[16];
			net_log(n, "net: icmp echo answered for %s", net_ip_str(src, b));
		}
	} else if (ic[0] == 0 && n->ping_state == PING_WAITING && src == n->ping_ip && be16(ic + 4) == n->ping_id &&
		   be16(ic + 6) == n->ping_seq) {
		n->ping_rtt = now() - n->ping_sent;
		n->ping_state = PING_DONE;
		n->events++;
	}
}

/* ---- DHCP ---- */

static void dhcp_send(struct net *n, u8 type)
{
	u8 *f = net_tx_alloc(n);
	if (!f)
		return;
	u8 *d = f + NET_UDP_PAYLOAD;
	memset(d, 0, 240);
	d[0] = 1; /* BOOTREQUEST */
	d[1] = 1;
	d[2] = 6;
	put32(d + 4, n->dhcp_xid);
	put16(d + 10, 0x8000); /* broadcast replies: we have no address yet */
	memcpy(d + 28, n->mac, 6);
	put32(d + 236, DHCP_MAGIC);
	u8 *o = d + 240;
	*o++ = 53, *o++ = 1, *o++ = type;
	*o++ = 61, *o++ = 7, *o++ = 1;
	memcpy(o, n->mac, 6);
	o += 6;
	if (type == DHCP_REQUEST) {
		*o++ = 50, *o++ = 4;
		put32(o, n->dhcp_offer);
		o += 4;
		*o++ = 54, *o++ = 4;
		put32(o, n->dhcp_server);
		o += 4;
	}
	*o++ = 55, *o++ = 4, *o++ = 1, *o++ = 3, *o++ = 6, *o++ = 51;
	*o++ = 255;
	u32 len = (u32)(o - d);
	if (len < 300) { /* BOOTP's minimum message size */
		memset(o, 0, 300 - len);
		len = 300;
	}
	u32 saved = n->ip;
	n->ip = 0;
	net_udp_send(n, f, 0xFFFFFFFF, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, len, true);
	n->ip = saved;
}

static void dhcp_input(struct net *n, const u8 *d, u32 len)
{
	if (len < 240 || d[0] != 2 || be32(d + 4) != n->dhcp_xid || be32(d + 236) != DHCP_MAGIC ||
	    memcmp(d + 28, n->mac, 6))
		return;
	u8 type = 0;
	u32 mask = 0, router = 0, dns = 0, server = be32(d + 20), lease = 0;
	for (u32 i = 240; i < len;) {
		u8 code = d[i];
		if (code == 255)
			break;
		if (code == 0) {
			i++;
			continue;
		}
		if (i + 2 > len || i + 2 + d[i + 1] > len)
			break;
		const u8 *v = d + i + 2;
		u8 l = d[i + 1];
		if (code == 53 && l >= 1)
			type = v[0];
		else if (code == 1 && l >= 4)
			mask = be32(v);
		else if (code == 3 && l >= 4)
			router = be32(v);
		else if (code == 6 && l >= 4)
			dns = be32(v);
		else if (code == 54 && l >= 4)
			server = be32(v);
		else if (code == 51 && l >= 4)
			lease = be32(v);
		i += 2u + l;
	}
	if (type == DHCP_OFFER && n->dhcp_state == DHCP_DISCOVERING) {
		n->dhcp_offer = be32(d + 16);
		n->dhcp_server = server;
		n->dhcp_state = DHCP_REQUESTING;
		n->dhcp_tries = 0;
		char b[16];
		net_log(n, "net: dhcp offer %s", net_ip_str(n->dhcp_offer, b));
		dhcp_send(n, DHCP_REQUEST);
		n->dhcp_next = now() + ms(n, 1000);
	} else if (type == DHCP_ACK && n->dhcp_state == DHCP_REQUESTING) {
		n->ip = be32(d + 16);
		n->mask = mask ? mask : IP4(255, 255, 255, 0);
		n->gw = router;
		n->dns = dns;
		n->dhcp_lease = lease;
		n->dhcp_state = DHCP_BOUND;
		n->events++;
	} else if (type == DHCP_NAK && n->dhcp_state == DHCP_REQUESTING) {
		net_log(n, "net: dhcp nak, starting over");
		n->dhcp_state = DHCP_DISCOVERING;
		n->dhcp_next = now();
	}
}

static void dhcp_timer(struct net *n, u64 t)
{
	if (n->dhcp_start) {
		n->dhcp_start = false;
		n->dhcp_state = DHCP_DISCOVERING;
		n->dhcp_xid = (u32)(t ^ (t >> 32)) ^ 0x74656e62;
		n->dhcp_tries = 0;
		n->dhcp_next = t;
		n->ip = 0;
	}
	if ((n->dhcp_state != DHCP_DISCOVERING && n->dhcp_state != DHCP_REQUESTING) || t < n->dhcp_next)
		return;
	if (++n->dhcp_tries > DHCP_TRIES) {
		n->dhcp_state = DHCP_FAILED;
		n->events++;
		return;
	}
	dhcp_send(n, n->dhcp_state == DHCP_DISCOVERING ? DHCP_DISCOVER : DHCP_REQUEST);
	n->dhcp_next = t + ms(n, 1000);
}

/* ---- UDP ---- */

static void udp_input(struct net *n, u32 src, u32 dst, const u8 *u, u32 len)
{
	if (len < UDP_HLEN || be16(u + 4) < UDP_HLEN || be16(u + 4) > len)
		return;
	len = be16(u + 4);
	if (be16(u + 6) && csum_fold(csum_add(pseudo_sum(src, dst, IPPROTO_UDP, len), u, len)) != 0) {
		n->rx_bad_csum++;
		return;
	}
	u16 sport = be16(u), dport = be16(u + 2);
	const u8 *data = u + UDP_HLEN;
	u32 dlen = len - UDP_HLEN;
	char b[16];

	if (dport == DHCP_CLIENT_PORT) {
		dhcp_input(n, data, dlen);
	} else if (n->bench_port && dport == n->bench_port) {
		u64 t = now();
		if (!n->bench_packets) {
			n->bench_first = t;
			n->bench_peer_ip = src;
			n->bench_peer_port = sport;
		}
		n->bench_last = t;
		n->bench_packets++;
		n->bench_bytes += dlen;
	} else if (n->udp_echo_port && dport == n->udp_echo_port) {
		u8 *f = net_tx_alloc(n);
		if (!f || dlen > ETH_MTU - IP_HLEN - UDP_HLEN)
			return;
		memcpy(f + NET_UDP_PAYLOAD, data, dlen);
		if (net_udp_send(n, f, src, dport, sport, dlen, true)) {
			n->udp_echoed++;
			net_log(n, "net: udp echo %u bytes to %s:%u", dlen, net_ip_str(src, b), sport);
		}
	} else if (n->udp_src_port && dport == n->udp_src_port && !n->udp_replied) {
		u32 c = dlen < NET_TEXT_MAX - 1 ? dlen : NET_TEXT_MAX - 1;
		for (u32 i = 0; i < c; i++)
			n->udp_reply[i] = data[i] >= 0x20 && data[i] < 0x7F ? (char)data[i] : '.';
		n->udp_reply[c] = '\0';
		n->udp_replied = true;
		n->events++;
	}
}

static void udp_timer(struct net *n)
{
	if (!n->udp_send)
		return;
	u8 *f = net_tx_alloc(n);
	if (!f)
		return;
	u32 len = (u32)strlen(n->udp_text);
	memcpy(f + NET_UDP_PAYLOAD, n->udp_text, len);
	if (net_udp_send(n, f, n->udp_dst_ip, n->udp_src_port, n->udp_dst_port, len, true)) {
		n->udp_send = false;
		n->udp_sent = true;
		n->events++;
	}
}

/* ---- TCP ---- */

static inline bool seq_lt(u32 a, u32 b) { return (s32)(a - b) < 0; }
static inline bool seq_le(u32 a, u32 b) { return (s32)(a - b) <= 0; }

static void tcp_segment(struct net *n, u32 dst, u16 sport, u16 dport, u32 seq, u32 ack, u8 flags, u16 win,
			const u8 *data, u32 len, bool mss_option)
{
	u8 *f = net_tx_alloc(n);
	if (!f)
		return;
	u8 *t = f + ETH_HLEN + IP_HLEN;
	u32 hlen = TCP_HLEN + (mss_option ? 4 : 0);
	put16(t, sport);
	put16(t + 2, dport);
	put32(t + 4, seq);
	put32(t + 8, ack);
	t[12] = (u8)((hlen / 4) << 4);
	t[13] = flags;
	put16(t + 14, win);
	put16(t + 16, 0);
	put16(t + 18, 0);
	if (mss_option) {
		t[20] = 2;
		t[21] = 4;
		put16(t + 22, TCP_MSS);
	}
	if (len)
		memcpy(t + hlen, data, len);
	put16(t + 16, csum_fold(csum_add(pseudo_sum(n->ip, dst, IPPROTO_TCP, hlen + len), t, hlen + len)));
	ip_send(n, f, dst, IPPROTO_TCP, hlen + len, true);
}

static u16 tcp_window(const struct tcb *c)
{
	if (c->client)
		return TCP_RCV_WINDOW;
	u32 room = NET_TCP_SBUF - c->sbuf_len;
	return room > 65535 ? 65535 : (u16)room;
}

static void tcp_send(struct net *n, struct tcb *c, u8 flags, u32 seq, const u8 *data, u32 len)
{
	tcp_segment(n, c->rip, c->lport, c->rport, seq, c->rcv_nxt, flags, tcp_window(c), data, len,
		    (flags & TCP_SYN) != 0);
}

static void tcp_arm(struct net *n, struct tcb *c)
{
	if (!c->rto)
		c->rto = ms(n, 300);
	c->rto_at = now() + c->rto;
}

static void tcp_closed(struct net *n, struct tcb *c, const char *how)
{
	char b[16];

	net_log(n, "net: tcp %s %s:%u received=%lu sent=%lu", how, net_ip_str(c->rip, b), c->rport, c->rx_bytes,
		c->tx_bytes);
	c->state = n->tcp_listen_port && !c->client ? TCP_LISTEN : TCP_CLOSED;
	c->lport = c->state == TCP_LISTEN ? n->tcp_listen_port : 0;
	c->rto_at = 0;
	c->finished++;
	n->events++;
}

/* Send what the window allows, then the FIN when everything is out. */
static void tcp_output(struct net *n, struct tcb *c)
{
	if (c->state == TCP_ESTABLISHED || c->state == TCP_CLOSE_WAIT || c->state == TCP_FIN_WAIT_1 ||
	    c->state == TCP_LAST_ACK || c->state == TCP_CLOSING) {
		u32 mss = c->peer_mss ? c->peer_mss : 536;
		if (mss > TCP_MSS)
			mss = TCP_MSS;
		for (;;) {
			u32 off = c->snd_nxt - c->snd_una;
			if (off >= c->sbuf_len || c->fin_sent)
				break;
			u32 inflight = off, win = c->snd_wnd > inflight ? c->snd_wnd - inflight : 0;
			u32 len = c->sbuf_len - off;
			if (len > mss)
				len = mss;
			if (len > win)
				len = win;
			if (!len)
				break;
			tcp_send(n, c, TCP_ACK | TCP_PSH, c->snd_nxt, c->sbuf + off, len);
			c->snd_nxt += len;
			c->tx_bytes += len;
			c->ack_now = false;
			if (!c->rto_at)
				tcp_arm(n, c);
		}
		if (c->fin_queued && !c->fin_sent && c->snd_nxt - c->snd_una == c->sbuf_len) {
			tcp_send(n, c, TCP_ACK | TCP_FIN, c->snd_nxt, NULL, 0);
			c->snd_nxt++;
			c->fin_sent = true;
			c->ack_now = false;
			if (c->state == TCP_ESTABLISHED)
				c->state = TCP_FIN_WAIT_1;
			else if (c->state == TCP_CLOSE_WAIT)
				c->state = TCP_LAST_ACK;
			tcp_arm(n, c);
		}
	}
	if (c->ack_now) {
		tcp_send(n, c, TCP_ACK, c->snd_nxt, NULL, 0);
		c->ack_now = false;
	}
}

static void tcp_reset_reply(struct net *n, u32 src, const u8 *t, u32 seglen)
{
	u8 flags = t[13];
	if (flags & TCP_RST)
		return;
	if (flags & TCP_ACK)
		tcp_segment(n, src, be16(t + 2), be16(t), be32(t + 8), 0, TCP_RST, 0, NULL, 0, false);
	else
		tcp_segment(n, src, be16(t + 2), be16(t), 0, be32(t + 4) + seglen, TCP_RST | TCP_ACK, 0, NULL, 0, false);
}

static void tcp_new(struct tcb *c, u32 rip, u16 rport, u16 lport, bool client, u32 iss)
{
	u8 *sbuf = c->sbuf;
	u32 finished = c->finished;
	memset(c, 0, sizeof(*c));
	c->sbuf = sbuf;
	c->finished = finished;
	c->client = client;
	c->rip = rip;
	c->rport = rport;
	c->lport = lport;
	c->iss = iss;
	c->snd_una = iss;
	c->snd_nxt = iss + 1;
	c->peer_mss = 536;
}

static void tcp_deliver(struct net *n, struct tcb *c, const u8 *data, u32 len)
{
	c->rx_bytes += len;
	c->rx_crc = net_crc32(c->rx_crc, data, len);
	for (u32 i = 0; i < len && !c->line_done; i++) {
		if (data[i] == '\n' || c->line_len == NET_TEXT_MAX - 1) {
			c->line_done = true;
			break;
		}
		if (data[i] != '\r')
			c->line[c->line_len++] = data[i] >= 0x20 && data[i] < 0x7F ? (char)data[i] : '.';
	}
	if (!c->client) { /* echo */
		memcpy(c->sbuf + c->sbuf_len, data, len);
		c->sbuf_len += len;
	}
}

static void tcp_parse_mss(struct tcb *c, const u8 *t, u32 hlen)
{
	for (u32 i = TCP_HLEN; i < hlen;) {
		u8 kind = t[i];
		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (i + 1 >= hlen || t[i + 1] < 2 || i + t[i + 1] > hlen)
			break;
		if (kind == 2 && t[i + 1] == 4)
			c->peer_mss = be16(t + i + 2);
		i += t[i + 1];
	}
}

static void tcp_input(struct net *n, u32 src, u32 dst, const u8 *t, u32 len)
{
	struct tcb *c = &n->tcp;
	char b[16];

	if (len < TCP_HLEN || csum_fold(csum_add(pseudo_sum(src, dst, IPPROTO_TCP, len), t, len)) != 0) {
		n->rx_bad_csum++;
		return;
	}
	u32 hlen = (u32)(t[12] >> 4) * 4;
	if (hlen < TCP_HLEN || hlen > len)
		return;
	u16 sport = be16(t), dport = be16(t + 2);
	u32 seq = be32(t + 4), ack = be32(t + 8);
	u8 flags = t[13];
	u16 win = be16(t + 14);
	const u8 *data = t + hlen;
	u32 dlen = len - hlen;
	u32 seglen = dlen + ((flags & TCP_SYN) ? 1 : 0) + ((flags & TCP_FIN) ? 1 : 0);

	bool ours = c->state != TCP_CLOSED && c->state != TCP_LISTEN && c->rip == src && c->rport == sport &&
		    c->lport == dport;
	if (!ours) {
		if (c->state == TCP_LISTEN && dport == c->lport && (flags & (TCP_SYN | TCP_ACK | TCP_RST)) == TCP_SYN) {
			u32 iss = (u32)now() * 2654435761u;
			tcp_new(c, src, sport, dport, false, iss);
			c->state = TCP_SYN_RCVD;
			c->irs = seq;
			c->rcv_nxt = seq + 1;
			c->snd_wnd = win;
			tcp_parse_mss(c, t, hlen);
			tcp_send(n, c, TCP_SYN | TCP_ACK, c->iss, NULL, 0);
			tcp_arm(n, c);
			return;
		}
		tcp_reset_reply(n, src, t, seglen);
		return;
	}

	if (c->state == TCP_SYN_SENT) {
		if ((flags & TCP_ACK) && ack != c->iss + 1) {
			tcp_reset_reply(n, src, t, seglen);
			return;
		}
		if (flags & TCP_RST) {
			if (flags & TCP_ACK) {
				c->reset = true;
				tcp_closed(n, c, "refused");
			}
			return;
		}
		if ((flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK)) {
			c->irs = seq;
			c->rcv_nxt = seq + 1;
			c->snd_una = ack;
			c->snd_wnd = win;
			c->rto_at = 0;
			c->retries = 0;
			tcp_parse_mss(c, t, hlen);
			c->state = TCP_ESTABLISHED;
			net_log(n, "net: tcp connected %s:%u", net_ip_str(c->rip, b), c->rport);
			n->events++;
			c->ack_now = true;
			tcp_output(n, c);
		}
		return;
	}

	if (flags & TCP_RST) {
		if (seq_le(c->rcv_nxt, seq) && seq_lt(seq, c->rcv_nxt + TCP_RCV_WINDOW + 1)) {
			c->reset = true;
			tcp_closed(n, c, "reset by");
		}
		return;
	}
	if (flags & TCP_SYN) { /* a retransmitted SYN (our SYN-ACK was lost) or a bad one */
		if (c->state == TCP_SYN_RCVD && seq + 1 == c->rcv_nxt)
			tcp_send(n, c, TCP_SYN | TCP_ACK, c->iss, NULL, 0);
		else
			c->ack_now = true;
		tcp_output(n, c);
		return;
	}
	if (!(flags & TCP_ACK))
		return;

	/* The acknowledgment. */
	if (seq_lt(c->snd_una, ack) && seq_le(ack, c->snd_nxt)) {
		u32 acked = ack - c->snd_una;
		if (c->state == TCP_SYN_RCVD) {
			acked--; /* our SYN */
			c->state = TCP_ESTABLISHED;
			net_log(n, "net: tcp accepted %s:%u", net_ip_str(c->rip, b), c->rport);
			n->events++;
		}
		if (acked > c->sbuf_len) { /* our FIN too */
			acked = c->sbuf_len;
			c->fin_acked = true;
		}
		if (acked) {
			memmove(c->sbuf, c->sbuf + acked, c->sbuf_len - acked);
			c->sbuf_len -= acked;
		}
		c->snd_una = ack;
		c->retries = 0;
		c->rto = 0;
		if (c->snd_una == c->snd_nxt)
			c->rto_at = 0;
		else
			tcp_arm(n, c);
	}
	c->snd_wnd = win;
	if (c->state == TCP_SYN_RCVD) /* an ACK that did not acknowledge our SYN */
		return;

	/* Data, in order only. */
	if (dlen) {
		if (seq == c->rcv_nxt &&
		    (c->state == TCP_ESTABLISHED || c->state == TCP_FIN_WAIT_1 || c->state == TCP_FIN_WAIT_2)) {
			u32 take = dlen;
			if (!c->client && take > NET_TCP_SBUF - c->sbuf_len)
				take = NET_TCP_SBUF - c->sbuf_len;
			tcp_deliver(n, c, data, take);
			c->rcv_nxt += take;
			if (take < dlen)
				flags &= (u8)~TCP_FIN; /* the FIN comes again with the rest */
		} else {
			flags &= (u8)~TCP_FIN;
		}
		c->ack_now = true;
	}
	if ((flags & TCP_FIN) && seq + dlen == c->rcv_nxt) {
		c->rcv_nxt++;
		c->ack_now = true;
		switch (c->state) {
		case TCP_ESTABLISHED:
			c->state = TCP_CLOSE_WAIT;
			c->fin_queued = true; /* the echo (or the request) is out: close our side too */
			break;
		case TCP_FIN_WAIT_1:
			c->state = c->fin_acked ? TCP_FIN_WAIT_2 : TCP_CLOSING;
			if (c->fin_acked) {
				tcp_output(n, c);
				tcp_closed(n, c, "closed");
				return;
			}
			break;
		case TCP_FIN_WAIT_2:
			tcp_output(n, c);
			tcp_closed(n, c, "closed");
			return;
		default:
			break;
		}
	}
	if (c->fin_acked) {
		if (c->state == TCP_FIN_WAIT_1) {
			c->state = TCP_FIN_WAIT_2;
		} else if (c->state == TCP_CLOSING || c->state == TCP_LAST_ACK) {
			tcp_output(n, c);
			tcp_closed(n, c, "closed");
			return;
		}
	}
	tcp_output(n, c);
}

static void tcp_timer(struct net *n, u64 t)
{
	struct tcb *c = &n->tcp;

	if (n->tcp_connect) {
		n->tcp_connect = false;
		u32 iss = (u32)t * 2654435761u;
		u16 lport = (u16)(49152 + (t >> 4) % 16000);
		tcp_new(c, n->tcp_dst_ip, n->tcp_dst_port, lport, true, iss);
		u32 len = (u32)strlen(n->tcp_text);
		memcpy(c->sbuf, n->tcp_text, len);
		c->sbuf_len = len;
		c->state = TCP_SYN_SENT;
		tcp_send(n, c, TCP_SYN, c->iss, NULL, 0);
		tcp_arm(n, c);
	}
	if (n->tcp_listen_port && c->state == TCP_CLOSED) {
		c->state = TCP_LISTEN;
		c->lport = n->tcp_listen_port;
	}
	if (!c->rto_at || t < c->rto_at)
		return;
	if (++c->retries > TCP_RETRIES) {
		c->reset = true;
		tcp_segment(n, c->rip, c->lport, c->rport, c->snd_nxt, c->rcv_nxt, TCP_RST | TCP_ACK, 0, NULL, 0, false);
		tcp_closed(n, c, "timed out with");
		return;
	}
	c->rto = c->rto * 2;
	if (c->rto > ms(n, 4000))
		c->rto = ms(n, 4000);
	c->rto_at = t + c->rto;
	switch (c->state) {
	case TCP_SYN_SENT:
		tcp_send(n, c, TCP_SYN, c->iss, NULL, 0);
		break;
	case TCP_SYN_RCVD:
		tcp_send(n, c, TCP_SYN | TCP_ACK, c->iss, NULL, 0);
		break;
	default: /* go back to the first unacknowledged byte */
		c->snd_nxt = c->snd_una;
		if (c->fin_sent && !c->fin_acked)
			c->fin_sent = false;
		if (!c->sbuf_len && !c->fin_queued)
			c->rto_at = 0;
		tcp_output(n, c);
		break;
	}
}

/* ---- receive ---- */

static void ip_input(struct net *n, const u8 *ip, u32 len)
{
	if (len < IP_HLEN || (ip[0] >> 4) != 4)
		return;
	u32 ihl = (u32)(ip[0] & 0xF) * 4, tot = be16(ip + 2);
	if (ihl < IP_HLEN || tot < ihl || tot > len || csum_fold(csum_add(0, ip, ihl)) != 0)
		return;
	if (be16(ip + 6) & 0x3FFF) /* fragments: not for this stack */
		return;
	u32 src = be32(ip + 12), dst = be32(ip + 16);
	bool for_us = dst == 0xFFFFFFFF || (n->ip && dst == n->ip) || (!n->ip && ip[9] == IPPROTO_UDP) ||
		      (n->mask && dst == (n->ip | ~n->mask));
	if (!for_us)
		return;
	const u8 *l4 = ip + ihl;
	u32 l4len = tot - ihl;
	switch (ip[9]) {
	case IPPROTO_ICMP: icmp_input(n, src, l4, l4len); break;
	case IPPROTO_UDP: udp_input(n, src, dst, l4, l4len); break;
	case IPPROTO_TCP: if (n->ip) tcp_input(n, src, dst, l4, l4len); break;
	default: break;
	}
}

static void eth_input(struct net *n, const u8 *f, u32 len)
{
	if (len < ETH_HLEN)
		return;
	if (memcmp(f, n->mac, 6) && memcmp(f, broadcast_mac, 6))
		return;
	n->rx_frames++;
	u16 type = be16(f + 12);
	if (type == ETH_P_ARP)
		arp_input(n, f + ETH_HLEN, len - ETH_HLEN);
	else if (type == ETH_P_IP)
		ip_input(n, f + ETH_HLEN, len - ETH_HLEN);
}

/* Take one received frame (several buffers with MRG_RXBUF); false when there is none. */
static bool rx_one(struct net *n)
{
	u32 len;
	u8 *buf = virtq_get(&n->rxq, &len);

	if (!buf)
		return false;
	if (len > NET_BUF_SIZE)
		len = NET_BUF_SIZE;
	u32 nbufs = n->mrg_rxbuf ? ((u32)buf[10] | (u32)buf[11] << 8) : 1; /* num_buffers, little-endian */
	if (nbufs <= 1 || len < VIRTIO_NET_HDR_LEN) {
		if (len >= VIRTIO_NET_HDR_LEN)
			eth_input(n, buf + VIRTIO_NET_HDR_LEN, len - VIRTIO_NET_HDR_LEN);
		else
			n->rx_dropped++;
		rx_give(n, buf);
		return true;
	}
	/* A frame spread over nbufs buffers: gather, then hand them all back. */
	u32 total = len - VIRTIO_NET_HDR_LEN;
	memcpy(n->reasm, buf + VIRTIO_NET_HDR_LEN, total);
	rx_give(n, buf);
	bool ok = true;
	for (u32 i = 1; i < nbufs; i++) {
		u8 *more = NULL;
		for (u32 spin = 0; !more && spin < 1000000; spin++)
			more = virtq_get(&n->rxq, &len);
		if (!more) {
			ok = false;
			break;
		}
		if (len > NET_BUF_SIZE)
			len = NET_BUF_SIZE;
		if (total + len <= 65536)
			memcpy(n->reasm + total, more, len);
		total += len;
		rx_give(n, more);
	}
	if (ok && total <= 65536)
		eth_input(n, n->reasm, total);
	else
		n->rx_dropped++;
	return true;
}

bool net_step(struct net *n)
{
	bool did = false;
	u32 got = 0;

	net_tx_reclaim(n);
	while (rx_one(n)) {
		did = true;
		if (++got == 32) { /* hand buffers back in batches */
			virtq_kick(&n->rxq);
			got = 0;
		}
	}
	if (did)
		virtq_kick(&n->rxq);
	u64 t = now();
	arp_pending_expire(n, t);
	u32 before = n->events;
	u32 log_before = n->log_len;
	u64 tx_before = n->tx_frames;
	dhcp_timer(n, t);
	if (n->ping_start) {
		n->ping_start = false;
		n->ping_state = PING_WAITING;
		n->ping_id = PING_ID;
		n->ping_tries = 0;
		n->ping_next = t;
	}
	if (n->ping_state == PING_WAITING && t >= n->ping_next) {
		if (++n->ping_tries > PING_TRIES) {
			n->ping_state = PING_FAILED;
			n->events++;
		} else {
			ping_send(n);
			n->ping_next = t + ms(n, 1000);
		}
	}
	udp_timer(n);
	tcp_timer(n, t);
	return did || n->events != before || n->log_len != log_before || n->tx_frames != tx_before;
}

u64 net_poll_job(u64 arg)
{
	struct net_poll_job *j = (struct net_poll_job *)arg;
	struct net *n = j->n;
	u32 events = n->events;

	for (;;) {
		bool did = net_step(n);
		if (n->events != events || n->log_len)
			return 1;
		if (!j->until && !did)
			return 0;
		if (j->until && rdtsc() >= j->until)
			return 0;
		if (!did)
			cpu_relax();
	}
}
