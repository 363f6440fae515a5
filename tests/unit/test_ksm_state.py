"""telemetry.ksm_state and `tenbox system info`'s KSM row: what the host's KSM does, from its sysfs files."""

import os

from tenbox_ctl.system import _ksm
from tenbox_supervisor.telemetry import ksm_state


def sysfs(tmp_path, run: str, sharing: str):
    (tmp_path / "run").write_text(run)
    (tmp_path / "pages_sharing").write_text(sharing)
    return str(tmp_path)


def test_a_running_ksm_reports_what_its_merges_save_in_bytes(tmp_path):
    state = ksm_state(sysfs(tmp_path, "1\n", "2560\n"))
    assert state == {"run": 1, "saved_bytes": 2560 * os.sysconf("SC_PAGE_SIZE")}
    assert _ksm(state) == "running, %d MiB saved by its merges on this host" % (state["saved_bytes"] >> 20)


def test_ksm_stopped_or_unmerging_is_off_and_names_where_to_read_why(tmp_path):
    for run in ("0", "2"):
        state = ksm_state(sysfs(tmp_path, run, "0"))
        assert state == {"run": int(run), "saved_bytes": 0}
        assert _ksm(state).startswith("off (") and "docs/daemon.md" in _ksm(state)


def test_a_kernel_without_ksm_or_unreadable_files_is_none(tmp_path):
    assert ksm_state(str(tmp_path / "absent")) is None
    assert ksm_state(sysfs(tmp_path, "on", "0")) is None
    assert _ksm(None) == "not in this kernel"
