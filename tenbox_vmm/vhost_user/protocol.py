"""vhost-user wire format: message header, request codes, payload layouts (vhost-user backend).

See QEMU's docs/interop/vhost-user.rst. Integers are in the machine's byte order, little
endian on every host tenbox runs on (x86-64, arm64).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
PAYLOAD_MAX = 4096
FDS_MAX = 8  # VHOST_MEMORY_BASELINE_NREGIONS
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# Requests (front end -> back end)
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SEND_RARP = 19
NET_SET_MTU = 20
GET_CONFIG = 24
SET_CONFIG = 25
GET_MAX_MEM_SLOTS = 36

NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int) and k not in (
    "HEADER_SIZE", "PAYLOAD_MAX", "FDS_MAX", "VERSION", "FLAG_VERSION_MASK", "FLAG_REPLY", "FLAG_NEED_REPLY")}

# Feature bits
F_PROTOCOL_FEATURES = 1 << 30
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_MTU = 1 << 4
PF_CONFIG = 1 << 9

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (front-end user addresses)
MEM_HEADER = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

# The least payload each request without fds must carry (shorter ones end the session).
NO_FD_PAYLOAD = {
    SET_FEATURES: U64.size,
    SET_PROTOCOL_FEATURES: U64.size,
    SET_VRING_NUM: VRING_STATE.size,
    SET_VRING_BASE: VRING_STATE.size,
    GET_VRING_BASE: VRING_STATE.size,
    SET_VRING_ENABLE: VRING_STATE.size,
    SET_VRING_ADDR: VRING_ADDR.size,
    GET_CONFIG: CONFIG_HEADER.size,
}
