"""The cffi declarations of libslirp match <slirp/libslirp.h> (sizes, offsets, constants).

In ABI mode nothing is compiled, so a wrong declaration would pass every
import and then hand libslirp a garbled SlirpConfig. A C program built
against the installed header prints the truth.
"""

import shutil

import pytest

from tenbox_vmm import ffigen
from tenbox_vmm.net import libslirp as ls
from tenbox_vmm.net._slirp_cdef import CDEF
from tenbox_vmm.net.libslirp import ffi
from tests.framework.c_abi import load_pre_parsed, run_c_program

HEADER = "/usr/include/slirp/libslirp.h"

CONFIG_FIELDS = {
    1: ["version", "restricted", "in_enabled", "vnetwork", "vnetmask", "vhost", "in6_enabled",
        "vprefix_addr6", "vprefix_len", "vhost6", "vhostname", "tftp_server_name", "tftp_path", "bootfile",
        "vdhcp_start", "vnameserver", "vnameserver6", "vdnssearch", "vdomainname", "if_mtu", "if_mru",
        "disable_host_loopback", "enable_emu"],
    2: ["outbound_addr", "outbound_addr6"],
    3: ["disable_dns"],
    4: ["disable_dhcp"],
    5: ["mfr_id", "oob_eth_addr"],
}
CB_FIELDS = ["send_packet", "guest_error", "clock_get_ns", "timer_new", "timer_free", "timer_mod",
             "register_poll_fd", "unregister_poll_fd", "notify"]
# Added in libslirp 4.7 (SlirpConfig version 4): absent from Debian 11's 4.4 header.
CB_FIELDS_V4 = ["init_completed", "timer_new_opaque"]
CONSTANTS = {
    "SLIRP_POLL_IN": ls.SLIRP_POLL_IN, "SLIRP_POLL_OUT": ls.SLIRP_POLL_OUT, "SLIRP_POLL_PRI": ls.SLIRP_POLL_PRI,
    "SLIRP_POLL_ERR": ls.SLIRP_POLL_ERR, "SLIRP_POLL_HUP": ls.SLIRP_POLL_HUP, "UINT32_MAX": ls.UINT32_MAX,
}
CONSTANTS_V4 = {"SLIRP_TIMER_RA": 0}


@pytest.fixture(scope="module")
def header_abi(tmp_path_factory):
    """sizeof/offsetof/constant values as gcc sees them through the installed header."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to check the libslirp ABI (apt-get install gcc)")
    import os
    if not os.path.exists(HEADER):
        pytest.fail("%s is missing: apt-get install libslirp-dev" % HEADER)
    d = tmp_path_factory.mktemp("slirp_abi")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <slirp/libslirp.h>", "int main(void) {",
             'printf("max %d\\n", SLIRP_CONFIG_VERSION_MAX);',
             'printf("size SlirpConfig %zu\\n", sizeof(SlirpConfig));',
             'printf("size SlirpCb %zu\\n", sizeof(SlirpCb));',
             'printf("size in6 %zu\\n", sizeof(struct in6_addr));',
             'printf("align in6 %zu\\n", _Alignof(struct in6_addr));',
             "#if SLIRP_CONFIG_VERSION_MAX >= 4",
             'printf("size timerid %zu\\n", sizeof(SlirpTimerId));',
             "#endif"]
    for version, fields in CONFIG_FIELDS.items():
        lines.append("#if SLIRP_CONFIG_VERSION_MAX >= %d" % version)
        for f in fields:
            lines.append('printf("off SlirpConfig.%s %%zu\\n", offsetof(SlirpConfig, %s));' % (f, f))
        lines.append("#endif")
    for f in CB_FIELDS:
        lines.append('printf("off SlirpCb.%s %%zu\\n", offsetof(SlirpCb, %s));' % (f, f))
    for name in CONSTANTS:
        lines.append('printf("const %s %%llu\\n", (unsigned long long)%s);' % (name, name))
    lines.append("#if SLIRP_CONFIG_VERSION_MAX >= 4")
    for f in CB_FIELDS_V4:
        lines.append('printf("off SlirpCb.%s %%zu\\n", offsetof(SlirpCb, %s));' % (f, f))
    for name in CONSTANTS_V4:
        lines.append('printf("const %s %%llu\\n", (unsigned long long)%s);' % (name, name))
    lines.append("#endif")
    lines.append("return 0; }")
    out = run_c_program(d, lines)
    result = {}
    for line in out.splitlines():
        parts = line.split()
        result[tuple(parts[:-1])] = int(parts[-1])
    return result


def test_config_fields_the_header_has_are_where_the_header_puts_them(header_abi):
    max_version = header_abi[("max",)]
    checked = 0
    for version, fields in CONFIG_FIELDS.items():
        if version > max_version:
            continue
        for f in fields:
            assert ffi.offsetof("SlirpConfig", f) == header_abi[("off", "SlirpConfig.%s" % f)], f
            checked += 1
    assert checked >= 26  # at least version 4, the Debian 12 header
    if max_version <= ls.CONFIG_VERSION_DECLARED and max_version == 5:
        assert ffi.sizeof("SlirpConfig") == header_abi[("size", "SlirpConfig")]


def test_version_5_fields_follow_c_layout_rules():
    """mfr_id and oob_eth_addr (libslirp 4.8) are appended after disable_dhcp."""
    end4 = ffi.offsetof("SlirpConfig", "disable_dhcp") + 1
    assert ffi.offsetof("SlirpConfig", "mfr_id") == (end4 + 3) // 4 * 4
    assert ffi.offsetof("SlirpConfig", "oob_eth_addr") == ffi.offsetof("SlirpConfig", "mfr_id") + 4
    assert ffi.sizeof("SlirpConfig") % ffi.alignof("SlirpConfig") == 0


def test_callback_table_matches(header_abi):
    v4 = header_abi[("max",)] >= 4
    for f in CB_FIELDS + (CB_FIELDS_V4 if v4 else []):
        assert ffi.offsetof("SlirpCb", f) == header_abi[("off", "SlirpCb.%s" % f)], f
    if v4:
        assert ffi.sizeof("SlirpCb") == header_abi[("size", "SlirpCb")]
    else:  # an older header ends before the 4.7 callbacks; ours only adds them at the end
        assert ffi.offsetof("SlirpCb", CB_FIELDS_V4[0]) == header_abi[("size", "SlirpCb")]


def test_address_types_and_constants_match(header_abi):
    assert ffi.sizeof("struct in6_addr") == header_abi[("size", "in6")]
    assert ffi.alignof("struct in6_addr") == header_abi[("align", "in6")]
    v4 = header_abi[("max",)] >= 4
    if v4:
        assert ffi.sizeof("SlirpTimerId") == header_abi[("size", "timerid")]
    for name, value in list(CONSTANTS.items()) + (list(CONSTANTS_V4.items()) if v4 else []):
        assert value == header_abi[("const", name)], name


def test_pre_parsed_module_gives_the_same_layout(tmp_path):
    """The out-of-line module ffigen emits (make ffi) lays structures out as parsing does."""
    mod = load_pre_parsed("tenbox_vmm.net._slirp_ffi", CDEF, tmp_path, "_slirp_ffi_under_test")
    assert mod.CDEF == CDEF
    for struct in ("SlirpConfig", "SlirpCb", "struct in6_addr"):
        assert mod.ffi.sizeof(struct) == ffi.sizeof(struct)
    for version_fields in CONFIG_FIELDS.values():
        for f in version_fields:
            assert mod.ffi.offsetof("SlirpConfig", f) == ffi.offsetof("SlirpConfig", f)


def test_callback_types_mean_the_same_in_the_parsed_and_the_pre_parsed_ffi(tmp_path):
    """slirp.py's callback type strings work with both FFIs ffigen.load() may return."""
    import cffi

    from tenbox_vmm.net.slirp import CALLBACK_TYPES

    parsed = cffi.FFI()
    parsed.cdef(CDEF)
    mod = load_pre_parsed("tenbox_vmm.net._slirp_ffi", CDEF, tmp_path, "_slirp_ffi_types")
    fields = dict(parsed.typeof("SlirpCb").fields)

    def norm(t):
        return t.cname.replace("enum ", "")  # the two spell the SlirpTimerId typedef differently

    for name, ctype in CALLBACK_TYPES.items():
        a = parsed.typeof(ctype)
        assert norm(a) == norm(mod.ffi.typeof(ctype)), name
        if name in fields:
            assert norm(fields[name].type) == norm(a), name


def test_ffigen_knows_the_slirp_module():
    assert ("tenbox_vmm.net._slirp_ffi", "tenbox_vmm.net._slirp_cdef", "CDEF") in ffigen.MODULES
