"""Batches of UDP datagrams: recvmmsg(2), sendmmsg(2) and UDP segmentation, via cffi's ABI mode (worker, I/O thread).

One system call moves a whole batch, and Python makes no object per
datagram beyond what the caller needs: message headers, iovecs, addresses
and receive slots live in C arrays allocated once. A send batch points its
iovecs at the caller's buffers (views of guest memory: no copy), which must
stay valid until `flush()` returns; where the kernel segments UDP (4.18),
a run of datagrams of one size to one peer leaves as one sendmsg(2). The
batch calls exist since Linux 3.0 and glibc 2.14; `available()` says
whether this libc has them, and callers keep their one-datagram path for
when it does not.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any, List, Optional, Tuple

from tenbox_vmm.ffigen import load
from tenbox_vmm.net._mmsg_cdef import CDEF

ffi = load("tenbox_vmm.net._mmsg_ffi", CDEF)

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
SOCKADDR_IN_BYTES = 16
SEND_BATCH_MAX = 64  # datagrams per sendmmsg(2); the kernel takes up to UIO_MAXIOV (1024)
UDP_SEGMENT = 103  # <linux/udp.h>, at level SOL_UDP (IPPROTO_UDP)
GSO_SEGMENTS_MAX = 64  # UDP_MAX_SEGMENTS since Linux 4.18 (later kernels take 128)
UDP_PAYLOAD_MAX = 65535 - 20 - 8  # a segmented run is one IPv4 datagram until the kernel cuts it

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_CMSG_HDR_BYTES = ffi.sizeof("struct cmsghdr")
_CMSG_SPACE_U16 = _CMSG_HDR_BYTES + ffi.sizeof("size_t")  # CMSG_SPACE(2): data padded to size_t
_AF_INET = socket.AF_INET.to_bytes(2, sys.byteorder)

_libc: Optional[Any] = None
_available: Optional[bool] = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ffi.dlopen(None)
    return _libc


def available() -> bool:
    """Whether this libc has sendmmsg and recvmmsg."""
    global _available
    if _available is None:
        lib = _lib()
        try:
            lib.sendmmsg, lib.recvmmsg, lib.sendmsg
            _available = True
        except AttributeError:
            _available = False
    return _available


def sockaddr(ip: bytes, port: int) -> Any:
    """A `struct sockaddr_in *` for IPv4 address `ip` (4 bytes) and `port`."""
    sa = ffi.new("struct sockaddr_in *")
    ffi.memmove(sa, _AF_INET + port.to_bytes(2, "big") + ip + bytes(8), SOCKADDR_IN_BYTES)
    return sa


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel segments UDP for this socket (UDP_SEGMENT, Linux 4.18).

    Asked with getsockopt: an older kernel would not refuse the control
    message but ignore it, and send one big datagram instead of many.
    """
    try:
        sock.getsockopt(socket.IPPROTO_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


class SendBatch:
    """Datagrams for one socket, each one buffer and a destination, sent by `flush()`.

    With `gso`, runs of datagrams to one destination that share a size (the
    last may be shorter) leave as one sendmsg(2) with UDP_SEGMENT: the
    kernel cuts them apart after its IP and UDP work, once per run instead
    of once per datagram. The peer receives the same datagrams either way.
    """

    def __init__(self, capacity: int = SEND_BATCH_MAX, gso: bool = False) -> None:
        self.capacity = capacity
        self.gso = gso
        self._msgs = ffi.new("struct mmsghdr[]", capacity)
        self._iov = ffi.new("struct iovec[]", capacity)
        for i in range(capacity):
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = self._iov + i
            hdr.msg_iovlen = 1
            hdr.msg_namelen = SOCKADDR_IN_BYTES
        # One message for a segmented run, with its control message (the segment size).
        self._run = ffi.new("struct msghdr *")
        self._run.msg_namelen = SOCKADDR_IN_BYTES
        self._cmsg = ffi.new("uint8_t[]", _CMSG_SPACE_U16)
        cmsg = ffi.cast("struct cmsghdr *", self._cmsg)
        cmsg.cmsg_len = _CMSG_HDR_BYTES + 2
        cmsg.cmsg_level = socket.IPPROTO_UDP
        cmsg.cmsg_type = UDP_SEGMENT
        self._segment_size = ffi.cast("uint16_t *", self._cmsg + _CMSG_HDR_BYTES)
        self._run.msg_control = self._cmsg
        self._run.msg_controllen = _CMSG_SPACE_U16
        self._keep: List[Any] = []  # the cdata of queued buffers: alive until sent
        self._names: List[Any] = []
        self._lens: List[int] = []
        self.fd = -1
        self.count = 0

    def full(self) -> bool:
        return self.count == self.capacity

    def add(self, fd: int, data: Any, name: Any) -> None:
        """Queue `data` for `name` (from `sockaddr()`) on socket `fd`; the batch must not be full or for another fd."""
        i = self.count
        p = ffi.from_buffer(data)
        n = len(p)
        self._keep.append(p)
        self._names.append(name)
        self._lens.append(n)
        self._iov[i] = (p, n)
        self._msgs[i].msg_hdr.msg_name = name
        self.fd = fd
        self.count = i + 1

    def flush(self) -> Tuple[int, List[int]]:
        """Send everything queued, in order: (datagrams sent, errno of each that was not)."""
        count = self.count
        if not count:
            return 0, []
        failed: List[int] = []
        names, lens = self._names, self._lens
        single = 0  # start of the datagrams not yet sent that form no run
        i = 0
        while i < count:
            j = i + 1
            size = lens[i]
            if self.gso and size:
                name, total = names[i], size
                # Empty datagrams stay out of runs: the kernel would make no segment of them.
                while (j < count and j - i < GSO_SEGMENTS_MAX and names[j] is name and 0 < lens[j] <= size
                       and total + lens[j] <= UDP_PAYLOAD_MAX):
                    total += lens[j]
                    j += 1
                    if lens[j - 1] < size:
                        break  # a shorter datagram ends a run
            if j - i < 2:
                i = j
                continue
            self._send_each(single, i, failed)
            if not self._send_run(i, j - i, size, total):
                self._send_each(i, j, failed)  # the kernel refused the run: datagram by datagram
            single = i = j
        self._send_each(single, count, failed)
        self._keep.clear()
        names.clear()
        lens.clear()
        self.count = 0
        return count - len(failed), failed

    def _send_run(self, start: int, n: int, size: int, total: int) -> bool:
        run = self._run
        run.msg_name = self._names[start]
        run.msg_iov = self._iov + start
        run.msg_iovlen = n
        self._segment_size[0] = size
        while True:
            sent = _lib().sendmsg(self.fd, run, 0)
            if sent == total:
                return True
            if sent < 0 and ffi.errno == errno.EINTR:
                continue
            return False

    def _send_each(self, start: int, end: int, failed: List[int]) -> None:
        lib = _lib()
        msgs = self._msgs
        fd = self.fd
        done = start
        while done < end:
            n = lib.sendmmsg(fd, msgs + done, end - done, 0)
            if n > 0:
                done += n
                continue
            err = ffi.errno if n < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            failed.append(err)  # the datagram at `done` failed; the kernel sent none after it
            done += 1


class RecvBatch:
    """`slots` receive buffers of `size` bytes, filled by one recvmmsg(2) each `recv()`.

    A datagram lands `headroom` bytes into its slot, so the caller can write
    its headers in front of it and hand out one contiguous view (`view`).
    """

    def __init__(self, slots: int, size: int, headroom: int) -> None:
        self.slots = slots
        self.size = size
        self.headroom = headroom
        self.stride = (headroom + size + 15) & ~15
        self._buf = ffi.new("uint8_t[]", slots * self.stride)
        self.view = memoryview(ffi.buffer(self._buf))
        self._names = ffi.new("struct sockaddr_in[]", slots)
        self._names_view = memoryview(ffi.buffer(self._names))
        self._msgs = ffi.new("struct mmsghdr[]", slots)
        self._iov = ffi.new("struct iovec[]", slots)
        for i in range(slots):
            self._iov[i].iov_base = self._buf + i * self.stride + headroom
            self._iov[i].iov_len = size
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = self._iov + i
            hdr.msg_iovlen = 1
            hdr.msg_name = self._names + i
            hdr.msg_namelen = SOCKADDR_IN_BYTES
        # msg_len and msg_flags of message i, as 32-bit words of the mmsghdr array.
        self._u32 = memoryview(ffi.buffer(self._msgs)).cast("I")
        self._words = ffi.sizeof("struct mmsghdr") // 4
        hdr_at = ffi.offsetof("struct mmsghdr", "msg_hdr")
        self._len_at = ffi.offsetof("struct mmsghdr", "msg_len") // 4
        self._flags_at = (hdr_at + ffi.offsetof("struct msghdr", "msg_flags")) // 4
        self._namelen_at = (hdr_at + ffi.offsetof("struct msghdr", "msg_namelen")) // 4
        self._used = 0

    def recv(self, fd: int, limit: int = 0) -> List[Tuple[int, int, bytes, bool]]:
        """The datagrams waiting on `fd` (non-blocking), up to `limit` or `slots`.

        Each is (start in `view`, length, peer, truncated).
        `peer` is the sender's port (network order) and IPv4 address, 6 bytes;
        a truncated datagram was longer than `size` and its length is `size`.
        OSError for errors other than "nothing to read".
        """
        u32, words, namelen_at = self._u32, self._words, self._namelen_at
        for i in range(self._used):  # the kernel wrote the sender's address length there
            u32[i * words + namelen_at] = SOCKADDR_IN_BYTES
        vlen = self.slots if limit <= 0 else min(limit, self.slots)
        n = _lib().recvmmsg(fd, self._msgs, vlen, MSG_DONTWAIT, ffi.NULL)
        if n < 0:
            self._used = 0
            err = ffi.errno
            if err in _AGAIN:
                return []
            raise OSError(err, "recvmmsg: %s" % errno.errorcode.get(err, err))
        self._used = n
        out = []
        names = self._names_view
        stride, headroom, len_at, flags_at = self.stride, self.headroom, self._len_at, self._flags_at
        for i in range(n):
            w = i * words
            out.append((i * stride + headroom, u32[w + len_at], names[16 * i + 2 : 16 * i + 8].tobytes(),
                        bool(u32[w + flags_at] & MSG_TRUNC)))
        return out
