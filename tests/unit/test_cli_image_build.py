"""`tenbox image build --arch`: which architecture a build is for, and the refusals before any build (CLI, pure)."""

import pytest

from tenbox_ctl.client import CliError
from tenbox_ctl.image import build_arch
from tenbox_supervisor.protocol import ExitCode


@pytest.mark.parametrize("arch, no_import, host, want", [
    (None, False, "x86_64", "amd64"),
    (None, False, "aarch64", "arm64"),
    ("amd64", False, "x86_64", "amd64"),
    ("arm64", False, "aarch64", "arm64"),
    # Another host's architecture: built here, imported there.
    ("arm64", True, "x86_64", "arm64"),
    ("amd64", True, "aarch64", "amd64"),
])
def test_the_default_is_the_hosts_and_another_is_built_without_import(arch, no_import, host, want):
    assert build_arch(arch, no_import, host) == want


@pytest.mark.parametrize("arch, no_import, host, words", [
    ("sparc", False, "x86_64", "--arch 'sparc' is not an architecture tenbox builds images for: amd64 or arm64"),
    ("x86_64", True, "x86_64", "--arch 'x86_64' is not"),  # Debian's names, as the script takes them
    (None, False, "riscv64", "this host is riscv64: tenbox builds images for amd64 or arm64; choose one with --arch"),
    # tenboxd keeps only its own host's images: said before minutes of building, not after.
    ("arm64", False, "x86_64", "tenboxd on this x86_64 host keeps only x86_64 images: build the arm64 image with "
                               "--no-import, then import its folder on an aarch64 host (tenbox image import DIR)"),
])
def test_a_bad_or_unimportable_arch_is_refused_in_one_usage_line(arch, no_import, host, words):
    with pytest.raises(CliError) as e:
        build_arch(arch, no_import, host)
    assert e.value.exit_code == ExitCode.USAGE
    assert words in e.value.message and "\n" not in e.value.message
