"""Request parameter checks: what each accepts, and the one line each refusal says."""

import pytest

from tenbox_supervisor import params as P
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import ErrorCode
from tenbox_vmm.protocol import Limits

INVALID = ErrorCode.INVALID_ARGUMENT


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"\0" * 512)
    return str(path)


def refused(fn, *args, code=INVALID):
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert e.value.code is code
    return e.value.message


@pytest.mark.parametrize("value, why", [
    ("bad_name!", "name must match [A-Za-z0-9-]{1,64}"),
    ("x" * 65, "name must match"),
    ("", "name must match"),
    (7, "name has the wrong type"),
    (True, "name has the wrong type"),
])
def test_names_are_refused_with_the_rule(value, why):
    assert why in refused(P.name, {"name": value}, "name")


def test_names_absent_null_and_required():
    assert P.name({}, "name") is None and P.name({"name": None}, "name") is None
    assert refused(P.name, {}, "name", True) == "name is required"
    assert P.name({"name": "web-1"}, "name") == "web-1"


@pytest.mark.parametrize("params, ok", [
    ({"cpus": 1}, 1), ({"cpus": Limits.CPUS_MAX}, Limits.CPUS_MAX), ({}, None),
])
def test_cpus_within_the_limits(params, ok):
    assert P.cpus(params) == ok


@pytest.mark.parametrize("params, why", [
    ({"cpus": 0}, "cpus must be in 1..64"),
    ({"cpus": Limits.CPUS_MAX + 1}, "cpus must be in 1..64"),
    ({"cpus": True}, "cpus has the wrong type"),
    ({"cpus": "2"}, "cpus has the wrong type"),
])
def test_cpus_outside_the_limits(params, why):
    assert refused(P.cpus, params) == why


def test_memory_is_bounded_by_the_runtime_minimum_and_the_host():
    assert P.memory_mb({"memory_mb": Limits.MEMORY_MIN_MB}, 4096) == Limits.MEMORY_MIN_MB
    assert refused(P.memory_mb, {"memory_mb": 8}, 4096) == "memory_mb must be in 16..4096"
    assert refused(P.memory_mb, {"memory_mb": 4097}, 4096) == "memory_mb must be in 16..4096"
    assert P.memory_mb({}, 4096, default=256) == 256


def test_file_paths_are_absolute_and_normalised_and_nothing_is_opened(tmp_path, kernel):
    """params only looks at the string: caller_files.py opens the file, with the caller's rights."""
    assert P.file_path({"kernel": str(tmp_path / "." / "vmlinuz")}, "kernel") == kernel
    assert refused(P.file_path, {"kernel": "vmlinuz"}, "kernel") == "kernel must be an absolute path"
    assert refused(P.file_path, {"kernel": "/a\0b"}, "kernel") == "kernel is not a usable path"
    assert P.file_path({"kernel": str(tmp_path / "none")}, "kernel") == str(tmp_path / "none")


def test_disks_take_paths_or_objects_and_check_each(kernel):
    disks = P.disks({"disks": [kernel, {"path": kernel, "read_only": True, "serial": "data1", "format": "raw"}]})
    assert disks == [{"path": kernel, "read_only": False, "serial": "", "owned": False},
                     {"path": kernel, "read_only": True, "serial": "data1", "owned": False, "format": "raw"}]
    assert P.disks({"disk": kernel}) == [disks[0]]  # TenBox's single disk
    assert P.disks({}) is None


@pytest.mark.parametrize("item, why", [
    ({"serial": "x" * 21}, "disks[0]: disk serial must be up to 20"),
    ({"serial": "a,b"}, "disks[0]: disk serial must be up to 20 printable ASCII characters without commas"),
    ({"format": "vmdk"}, "disks[0]: disk format must be raw or qcow2"),
    ({"read_only": "yes"}, "read_only has the wrong type"),
])
def test_bad_disk_objects_are_refused_one_line_each(kernel, item, why):
    assert why in refused(P.disks, {"disks": [dict(item, path=kernel)]})


def test_a_disk_path_the_runtime_argument_cannot_carry_is_refused(tmp_path):
    comma = tmp_path / "a,b.raw"
    comma.write_bytes(b"")
    assert "contains a comma" in refused(P.disks, {"disks": [str(comma)]})
    assert refused(P.disks, {"disks": [42]}) == "disks[0] must be a path or an object"


def test_too_many_disks(kernel):
    assert refused(P.disks, {"disks": [kernel] * (Limits.DISKS_MAX + 1)}) == "disks must be a list of at most 7 disks"


def test_forwards_use_the_workers_grammar_and_limit():
    assert P.forwards({"hostfwds": "tcp::2222-:22"}, "hostfwds") == ["tcp::2222-:22"]
    assert P.forwards({"guestfwds": ["guestfwd:10.0.2.3:80-127.0.0.1:8080"]}, "guestfwds") == [
        "guestfwd:10.0.2.3:80-127.0.0.1:8080"]
    assert "bad hostfwd 'tcp::99999-:22'" in refused(P.forwards, {"hostfwds": ["tcp::99999-:22"]}, "hostfwds")
    assert "must start with 'guestfwd:'" in refused(P.forwards, {"guestfwds": ["tcp::1-:2"]}, "guestfwds")
    too_many = ["tcp::%d-:22" % (2000 + i) for i in range(Limits.FORWARDS_MAX + 1)]
    assert refused(P.forwards, {"hostfwds": too_many}, "hostfwds") == "hostfwds must be a list of at most 64 specs"


@pytest.mark.parametrize("params, value", [
    ({"net": True}, True), ({"net": "off"}, False), ({"net": "UP"}, True), ({"net_enabled": "false"}, False),
    ({"nat_enabled": "on"}, True), ({}, None),
])
def test_the_network_flag_in_every_spelling(params, value):
    assert P.net_flag(params) is value


def test_a_network_flag_that_is_neither_on_nor_off():
    assert refused(P.net_flag, {"net": "maybe"}) == "net must be on or off"


def test_cmdline_is_printable_ascii_and_bounded():
    assert P.cmdline({"cmdline": "console=ttyS0 quiet"}) == "console=ttyS0 quiet"
    assert "printable ASCII" in refused(P.cmdline, {"cmdline": "a\nb"})
    assert "at most 4096" in refused(P.cmdline, {"cmdline": "x" * 4097})


@pytest.mark.parametrize("version, ok", [
    ("0.1.0", True), ("1:2.3-4~bpo12+1", True), ("0.7.5-1", True), ("latest", False), ("1.0; rm -rf /", False),
    ("1" * 65, False),
])
def test_debian_versions(version, ok):
    if ok:
        assert P.debian_version({"version": version}) == version
    else:
        assert refused(P.debian_version, {"version": version}) == "%r is not a Debian version" % version


def test_image_sources_are_a_folder_or_a_file_list_of_absolute_paths():
    assert P.image_sources({"path": "/srv/img/"}, 9) == (["/srv/img"], True)
    assert P.image_sources({"files": ["/srv/m.json", "/srv/k"]}, 9) == (["/srv/m.json", "/srv/k"], False)
    assert refused(P.image_sources, {}, 9) == "give path (a folder) or files (a manifest and its files)"
    assert refused(P.image_sources, {"files": ["relative.json"]}, 9) == "'relative.json' is not an absolute path"
    assert refused(P.image_sources, {"files": ["/a"] * 10}, 9) == "files must list 2 to 9 paths"


def test_log_source_and_timeout():
    assert P.log_source({}) == "console" and P.log_source({"source": "runtime"}) == "runtime"
    assert refused(P.log_source, {"source": "kernel"}) == "source must be console or runtime"
    assert P.timeout({}, 10.0) == 10 and refused(P.timeout, {"timeout": 0}, 10.0) == "timeout must be in 1..3600"
