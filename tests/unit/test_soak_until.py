"""The soak's --until: a boot passes once the text is on the console, and the VMM is killed then."""

from __future__ import annotations

import sys
import time

from tests.framework import soak

VMM = [sys.executable, "-c"]


def test_a_boot_passes_at_the_marker_and_the_vmm_is_killed():
    started = time.monotonic()
    r = soak.boot(VMM + ["import time; print('booting'); print('Run /init as init process', flush=True); "
                         "time.sleep(60)"], cpus=2, deadline=30, until="Run /init")
    assert r["ok"] and r["rc"] == 0, r
    assert time.monotonic() - started < 20  # killed at the marker, not at the 60 s sleep's end


def test_a_vmm_that_ends_before_the_marker_fails_with_its_console():
    r = soak.boot(VMM + ["print('Trying to unpack rootfs image as initramfs...')"], cpus=2, deadline=30,
                  until="Run /init")
    assert not r["ok"] and r["rc"] == 0
    assert "unpack rootfs" in r["console_tail"]


def test_a_vmm_that_never_prints_the_marker_fails_at_the_deadline():
    r = soak.boot(VMM + ["import time; print('hung', flush=True); time.sleep(60)"], cpus=1, deadline=1,
                  until="Run /init")
    assert not r["ok"] and r["rc"] is None, r
