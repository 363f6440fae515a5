"""The cffi declarations of sendmmsg/recvmmsg/sendmsg match the system headers (sizes, offsets, constants).

In ABI mode nothing is compiled: a wrong layout would hand the kernel
garbled message headers. A C program built against <sys/socket.h> prints
the truth, as for libslirp (test_net_slirp_abi.py).
"""

import shutil

import pytest

from tenbox_vmm import ffigen
from tenbox_vmm.net import mmsg
from tenbox_vmm.net._mmsg_cdef import CDEF
from tests.framework.c_abi import load_pre_parsed, run_c_program

FIELDS = {
    "struct iovec": ["iov_base", "iov_len"],
    "struct msghdr": ["msg_name", "msg_namelen", "msg_iov", "msg_iovlen", "msg_control", "msg_controllen",
                      "msg_flags"],
    "struct mmsghdr": ["msg_hdr", "msg_len"],
    "struct cmsghdr": ["cmsg_len", "cmsg_level", "cmsg_type"],
    "struct sockaddr_in": ["sin_family", "sin_port", "sin_addr", "sin_zero"],
}
# label: (C expression, our value)
CONSTANTS = {
    "MSG_DONTWAIT": ("MSG_DONTWAIT", mmsg.MSG_DONTWAIT),
    "MSG_TRUNC": ("MSG_TRUNC", mmsg.MSG_TRUNC),
    "UDP_SEGMENT": ("UDP_SEGMENT", mmsg.UDP_SEGMENT),
    "cmsg_space_u16": ("CMSG_SPACE(2)", mmsg._CMSG_SPACE_U16),
    "cmsg_header": ("CMSG_LEN(0)", mmsg._CMSG_HDR_BYTES),
}


@pytest.fixture(scope="module")
def header_abi(tmp_path_factory):
    """sizeof/offsetof/constants as gcc sees them through the installed headers."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to check the socket ABI (apt-get install gcc)")
    d = tmp_path_factory.mktemp("mmsg_abi")
    lines = ["#define _GNU_SOURCE", "#include <stdio.h>", "#include <stddef.h>", "#include <sys/socket.h>",
             "#include <sys/uio.h>", "#include <netinet/in.h>", "#include <netinet/udp.h>",
             "#ifndef UDP_SEGMENT", "#define UDP_SEGMENT 103", "#endif", "int main(void) {"]
    for struct, fields in FIELDS.items():
        lines.append('printf("size %s %%zu\\n", sizeof(%s));' % (struct.split()[1], struct))
        for f in fields:
            lines.append('printf("off %s.%s %%zu\\n", offsetof(%s, %s));' % (struct.split()[1], f, struct, f))
    for label, (expr, _) in CONSTANTS.items():
        lines.append('printf("const %s %%llu\\n", (unsigned long long)(%s));' % (label, expr))
    lines.append("return 0; }")
    out = run_c_program(d, lines)
    return {tuple(line.split()[:-1]): int(line.split()[-1]) for line in out.splitlines()}


def test_message_structures_are_laid_out_as_the_headers_say(header_abi):
    for struct, fields in FIELDS.items():
        short = struct.split()[1]
        assert mmsg.ffi.sizeof(struct) == header_abi[("size", short)], struct
        for f in fields:
            assert mmsg.ffi.offsetof(struct, f) == header_abi[("off", "%s.%s" % (short, f))], (struct, f)


def test_flag_and_option_numbers_are_the_headers(header_abi):
    for label, (_, value) in CONSTANTS.items():
        assert value == header_abi[("const", label)], label


def test_pre_parsed_module_gives_the_same_layout(tmp_path):
    """What `make ffi` emits lays the structures out as parsing the declarations does."""
    mod = load_pre_parsed("tenbox_vmm.net._mmsg_ffi", CDEF, tmp_path, "_mmsg_ffi_under_test")
    assert mod.CDEF == CDEF
    for struct, fields in FIELDS.items():
        assert mod.ffi.sizeof(struct) == mmsg.ffi.sizeof(struct)
        for f in fields:
            assert mod.ffi.offsetof(struct, f) == mmsg.ffi.offsetof(struct, f)


def test_ffigen_knows_the_mmsg_module():
    assert ("tenbox_vmm.net._mmsg_ffi", "tenbox_vmm.net._mmsg_cdef", "CDEF") in ffigen.MODULES


def test_this_libc_has_the_batch_calls():
    """glibc since 2.14: the forwards' batched paths are what runs here."""
    assert mmsg.available()
