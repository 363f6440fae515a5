"""The SlirpConfig version follows the running libslirp, and poll bits translate both ways."""

import select

import pytest

from tenbox_vmm.net import libslirp as ls


@pytest.mark.parametrize("version,expected", [
    ("4.1.0", 1),
    ("4.2.0", 2),
    ("4.3.0", 3),
    ("4.3.1", 3),
    ("4.4.0", 3),  # Debian 11
    ("4.5.0", 3),
    ("4.6.1", 3),
    ("4.7.0", 4),  # Debian 12: timer_new_opaque
    ("4.8.0", 5),
    ("4.9.0", 5),  # would take 6; we declare up to 5
    ("4.9.1", 5),
    ("4.10.0", 5),
    ("5.0.0", 5),
    ("4.7.0-rc1", 4),
    (" 4.4.0\n", 3),
])
def test_config_version_matches_what_each_release_accepts(version, expected):
    assert ls.config_version_for(version) == expected


@pytest.mark.parametrize("version", ["3.1.0", "4.0.0", "4.0.1", "0.1"])
def test_libslirp_older_than_4_1_is_refused_with_a_reason(version):
    with pytest.raises(ls.SlirpUnavailable, match="needs 4.1 or later"):
        ls.config_version_for(version)


def test_unparseable_version_falls_back_to_version_1():
    assert ls.config_version_for("unknown") == 1
    assert ls.config_version_for("") == 1


def test_never_more_than_declared_and_timer_opaque_needs_4_7():
    assert max(ls.config_version_for("4.%d.0" % m) for m in range(1, 20)) == ls.CONFIG_VERSION_DECLARED
    assert ls.config_version_for("4.6.1") < ls.CONFIG_VERSION_TIMER_OPAQUE <= ls.config_version_for("4.7.0")


def test_installed_library_gets_its_own_maximum():
    lib = ls.open_library()
    v = ls.library_version(lib)
    assert ls.parse_version(v) is not None
    assert ls.config_version_for(v) >= 1


PAIRS = [
    (ls.SLIRP_POLL_IN, select.POLLIN),
    (ls.SLIRP_POLL_OUT, select.POLLOUT),
    (ls.SLIRP_POLL_PRI, select.POLLPRI),
    (ls.SLIRP_POLL_ERR, select.POLLERR),
    (ls.SLIRP_POLL_HUP, select.POLLHUP),
]


@pytest.mark.parametrize("slirp_bit,poll_bit", PAIRS)
def test_each_poll_bit_translates_both_ways(slirp_bit, poll_bit):
    assert ls.slirp_to_poll(slirp_bit) == poll_bit
    assert ls.poll_to_slirp(poll_bit) == slirp_bit


def test_poll_bit_combinations_round_trip_and_nval_is_an_error():
    for bits in range(32):
        assert ls.poll_to_slirp(ls.slirp_to_poll(bits)) == bits
    assert ls.poll_to_slirp(select.POLLNVAL) == ls.SLIRP_POLL_ERR
    # libslirp's bits are not poll(2)'s: a translation that forgot would show here.
    assert ls.slirp_to_poll(ls.SLIRP_POLL_OUT) != ls.SLIRP_POLL_OUT
