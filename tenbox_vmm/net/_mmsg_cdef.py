"""libc's batched datagram calls for cffi's ABI mode (worker; no privileges).

sendmsg(2) is here for UDP segmentation offload: one call, one control
message (SOL_UDP/UDP_SEGMENT) and many datagrams of one size.

From <sys/socket.h>, <sys/uio.h> and <netinet/in.h> on Linux/glibc (LP64:
x86-64 and arm64), in header order so that cffi lays the structures out as
the C compiler does; tests/unit/test_net_mmsg.py checks every size and
offset against the installed headers with gcc. socklen_t is uint32_t and
`struct timespec *` is passed as NULL only, hence `void *`.
"""

CDEF = r"""
struct iovec {
    void *iov_base;
    size_t iov_len;
};

struct msghdr {
    void *msg_name;
    uint32_t msg_namelen;
    struct iovec *msg_iov;
    size_t msg_iovlen;
    void *msg_control;
    size_t msg_controllen;
    int msg_flags;
};

struct mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};

struct cmsghdr {
    size_t cmsg_len;
    int cmsg_level;
    int cmsg_type;
};

struct sockaddr_in {
    uint16_t sin_family;
    uint16_t sin_port;
    uint32_t sin_addr;
    uint8_t sin_zero[8];
};

ssize_t sendmsg(int sockfd, const struct msghdr *msg, int flags);
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout);
"""
