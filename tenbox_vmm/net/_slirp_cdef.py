"""libslirp declarations for cffi's ABI mode (worker; no privileges).

Copied by hand from <slirp/libslirp.h>, in header order, so that cffi lays
the structures out as the C compiler does. Nothing is compiled: the worker
dlopens libslirp.so.0 and calls it through these declarations, which is why
they must match the header exactly (tests/unit/test_net_slirp_abi.py checks
every size and offset against the installed header with gcc).

`SlirpConfig` is declared up to version 5 (libslirp 4.8). A library reads
only the fields of the version we put in `version`, and every version only
appends fields, so one declaration serves 4.1 to 4.9: the offsets of the
fields a version has do not depend on the fields it lacks. 4.9's version 6
adds no field tenbox needs (it widens socket types on Windows), so tenbox
never asks for it.

Only the functions tenbox calls are declared. Symbols are resolved when
first used, so `slirp_handle_timer` (4.7) and `slirp_add_unix` (4.2) cost
nothing on a library that lacks them.
"""

CDEF = r"""
/* <netinet/in.h> on Linux: only what the slirp API passes. */
struct in_addr { uint32_t s_addr; };
struct in6_addr {
    union {
        uint8_t s6_addr[16];
        uint16_t s6_addr16[8];
        uint32_t s6_addr32[4];
    };
};
struct sockaddr_in;
struct sockaddr_in6;

typedef struct Slirp Slirp;

typedef ssize_t (*SlirpReadCb)(void *buf, size_t len, void *opaque);
typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);

typedef enum SlirpTimerId {
    SLIRP_TIMER_RA,
    SLIRP_TIMER_NUM,
} SlirpTimerId;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    /* SlirpConfig version 4 and later (libslirp 4.7) */
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    /* version 1 (libslirp 4.1) */
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    /* version 2 (4.2) */
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    /* version 3 (4.3) */
    bool disable_dns;
    /* version 4 (4.7) */
    bool disable_dhcp;
    /* version 5 (4.8) */
    uint32_t mfr_id;
    uint8_t oob_eth_addr[6];
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);

void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout,
                        SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error,
                        SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);

int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr,
                      int host_port, struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr,
                         int host_port);
int slirp_add_unix(Slirp *slirp, const char *unixsock,
                   struct in_addr *guest_addr, int guest_port);
int slirp_remove_guestfwd(Slirp *slirp, struct in_addr guest_addr,
                          int guest_port);

const char *slirp_version_string(void);
"""
