/* A small IPv4 stack over virtio-net: Ethernet, ARP, IPv4, ICMP echo, UDP,
 * a DHCP client and a one-connection TCP (guest; runs at CPL3).
 *
 * Every function here touches only guest memory and the device's QueueNotify
 * register, so the whole stack runs at CPL3 under run_user(), natively fast
 * on machines where kernel code is emulated. It never prints: net_log()
 * appends lines to a buffer that the CPL0 side prints (net_log_take()).
 *
 * The CPL0 side asks for work by setting request fields (dhcp_start,
 * ping_start, udp_send, tcp_connect ...) and then calls net_poll() at CPL3,
 * which sends, receives and runs the timers until something happened or its
 * time slice is over.
 */
#ifndef GUEST_NET_H
#define GUEST_NET_H

#include "types.h"
#include "virtio.h"

/* virtio-net feature bits (virtio 1.2, 5.1.3). */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_S_LINK_UP 1
#define VIRTIO_NET_HDR_LEN 12 /* struct virtio_net_hdr_v1 */

#define NET_BUF_SIZE 2048
#define NET_LOG_SIZE 4096
#define NET_ARP_ENTRIES 8
#define NET_ARP_PENDING 8
#define NET_TEXT_MAX 128
#define NET_TCP_SBUF (64 * 1024)

#define IP4(a, b, c, d) (((u32)(a) << 24) | ((u32)(b) << 16) | ((u32)(c) << 8) | (u32)(d))

enum dhcp_state { DHCP_IDLE, DHCP_DISCOVERING, DHCP_REQUESTING, DHCP_BOUND, DHCP_FAILED };
enum ping_state { PING_IDLE, PING_WAITING, PING_DONE, PING_FAILED };
enum tcp_state {
	TCP_CLOSED, TCP_LISTEN, TCP_SYN_SENT, TCP_SYN_RCVD, TCP_ESTABLISHED, TCP_FIN_WAIT_1, TCP_FIN_WAIT_2,
	TCP_CLOSING, TCP_CLOSE_WAIT, TCP_LAST_ACK
};

struct tcb {
	u32 state;
	bool client;     /* we connected (collect what arrives) or accepted (echo it back) */
	u32 rip;
	u16 rport, lport;
	u32 iss, snd_una, snd_nxt, snd_wnd, irs, rcv_nxt;
	u16 peer_mss;
	u8 *sbuf;        /* bytes from snd_una on: sent-unacked, then unsent */
	u32 sbuf_len;
	bool fin_queued, fin_sent, fin_acked, ack_now;
	u64 rto_at, rto;
	u32 retries;
	/* what the connection did */
	u64 rx_bytes, tx_bytes;
	u32 rx_crc;      /* CRC-32 (zlib) of the received payload, running */
	char line[NET_TEXT_MAX]; /* the first received line */
	u32 line_len;
	bool line_done;
	bool reset;      /* ended by a RST or a timeout */
	u32 finished;    /* connections that reached CLOSED */
};

struct net {
	struct virtio_dev *dev;
	struct virtq rxq, txq;
	u8 mac[6];
	bool mrg_rxbuf;
	u64 tsc_hz;
	u32 ip, mask, gw, dns; /* host byte order; ip == 0: unconfigured */
	u16 ip_id;
	u32 events;      /* bumped on anything the CPL0 side may wait for */

	u8 *rx_bufs;
	u8 *tx_bufs;
	u16 *tx_free;
	u32 tx_nfree, tx_count;
	u8 *reasm;       /* MRG_RXBUF frames spanning buffers are gathered here */

	struct { u32 ip; u8 mac[6]; bool valid; } arp[NET_ARP_ENTRIES];
	u32 arp_next;
	u32 arp_want;    /* an address we asked for and are waiting on */
	u64 arp_next_tsc;
	struct { u8 *frame; u32 hop, len; u64 since; } arp_pending[NET_ARP_PENDING]; /* frames waiting for ARP */

	/* DHCP */
	u32 dhcp_state, dhcp_xid, dhcp_offer, dhcp_server, dhcp_tries;
	u64 dhcp_next, dhcp_lease;
	bool dhcp_start; /* request */

	/* ping (ICMP echo) */
	u32 ping_state, ping_ip, ping_tries;
	u16 ping_id, ping_seq;
	u64 ping_sent, ping_rtt, ping_next;
	bool ping_start; /* request */

	/* UDP */
	u16 udp_echo_port;
	u32 udp_echoed;
	bool udp_send;   /* request: udp_dst_ip:udp_dst_port <- udp_text from udp_src_port */
	u32 udp_dst_ip;
	u16 udp_dst_port, udp_src_port;
	char udp_text[NET_TEXT_MAX];
	bool udp_sent;
	bool udp_replied;
	char udp_reply[NET_TEXT_MAX];

	/* TCP: one connection, optionally a listener */
	struct tcb tcp;
	u16 tcp_listen_port;
	bool tcp_connect; /* request: tcp_dst_ip:tcp_dst_port, send tcp_text */
	u32 tcp_dst_ip;
	u16 tcp_dst_port;
	char tcp_text[NET_TEXT_MAX];

	/* benchmark receive side */
	u16 bench_port;
	u64 bench_packets, bench_bytes, bench_first, bench_last;
	u32 bench_peer_ip;  /* source of the first benchmark datagram */
	u16 bench_peer_port;

	/* counters */
	u64 rx_frames, tx_frames, rx_dropped, tx_no_buffer, rx_bad_csum;

	char log[NET_LOG_SIZE];
	u32 log_len;
};

/* CPL0: buffers for both queues (the queues are set up already), the first rx kick. */
bool net_buffers_init(struct net *n);

/* CPL3 (or CPL0): one round of work: reclaim tx, take every received frame,
 * run the timers. Returns true when it did anything. */
bool net_step(struct net *n);
/* CPL3 job for run_user: net_step until n->events changes, a log line is
 * waiting, or the deadline (a TSC value in arg->until) passes; with
 * until == 0 it returns as soon as a step did nothing. */
struct net_poll_job {
	struct net *n;
	u64 until;
};
u64 net_poll_job(u64 arg);

/* Log a line for the CPL0 side (printf-style, no newline). */
void net_log(struct net *n, const char *fmt, ...) PRINTF_LIKE(2, 3);

/* Sends, for the benchmark jobs and the requests (CPL3). */
u8 *net_tx_alloc(struct net *n);
void net_tx_send(struct net *n, u8 *frame, u32 len, bool kick);
void net_tx_reclaim(struct net *n);
/* A UDP datagram in frame (from net_tx_alloc) whose payload (len bytes at
 * frame + NET_UDP_PAYLOAD) is already there. When the next hop is not in the
 * ARP cache the frame waits (up to a second) for the ARP reply; false when
 * there is no room for it to wait -- the buffer is then freed. */
#define NET_UDP_PAYLOAD (14 + 20 + 8)
bool net_udp_send(struct net *n, u8 *frame, u32 dst_ip, u16 sport, u16 dport, u32 len, bool kick);
/* The MAC for ip's next hop, asking for it when unknown (NULL then). */
const u8 *net_resolve(struct net *n, u32 ip);
u32 net_crc32(u32 crc, const void *p, u64 len);

const char *net_ip_str(u32 ip, char *buf); /* buf: 16 bytes */
bool net_parse_ip(const char *s, u32 *ip, const char **end);

#endif
