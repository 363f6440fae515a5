"""vm.disk.resize's pure parts: the size grammar (never smaller) and which disk a key names."""

from __future__ import annotations

import pytest

from tenbox_supervisor.disk_api import find_disk
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.spec import VmSpec
from tenbox_vmm.protocol.imagetool import SIZE_MAX, parse_new_size

G = 1 << 30


@pytest.mark.parametrize("text, current, want", [
    ("20G", 10 * G, 20 * G), ("+5G", 10 * G, 15 * G), ("10G", 10 * G, 10 * G), ("+512", 0, 512),
])
def test_a_new_size_is_absolute_or_relative(text, current, want):
    assert parse_new_size(text, current) == want


@pytest.mark.parametrize("text, current", [
    ("5G", 10 * G), ("-1G", 10 * G), ("+0", G), ("1.5G", 0), ("+1T", SIZE_MAX), ("100", 0), ("9" * 30, 0),
])
def test_a_size_that_shrinks_or_does_not_parse_is_refused(text, current):
    with pytest.raises(ValueError):
        parse_new_size(text, current)


def spec(*paths):
    return VmSpec.from_json({"id": "vm1", "name": "web", "kernel": "/k", "created_at": 0,
                             "disks": [{"path": p, "read_only": False, "serial": "", "format": "raw"} for p in paths]})


def test_a_disk_is_named_by_index_path_or_unique_file_name():
    s = spec("/a/one.raw", "/b/two.raw", "/c/two.raw")
    assert find_disk(s, "0") == 0 and find_disk(s, "/c/two.raw") == 2 and find_disk(s, "one.raw") == 0
    with pytest.raises(ApiError) as e:
        find_disk(s, "two.raw")
    assert e.value.code.value == "invalid_argument"
    for key in ("3", "three.raw", "/a/one", "x\n" * 3):
        with pytest.raises(ApiError) as e:
            find_disk(s, key)
        assert e.value.code.value == "disk_not_found" and "\n" not in e.value.message
