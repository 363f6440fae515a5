"""The CLI's exit codes: every error code of tenboxd has one, and `tenbox --help` (so the man page) lists them."""

import pytest
from click.testing import CliRunner

from tenbox_ctl.__main__ import cli
from tenbox_ctl.client import CliError, Client
from tenbox_supervisor.protocol import EXIT_CODES, ErrorCode, ExitCode, exit_code_for


def test_every_error_code_has_an_exit_code():
    assert set(EXIT_CODES) == set(ErrorCode)


@pytest.mark.parametrize("code, status", [
    (ErrorCode.PERMISSION_DENIED, ExitCode.PERMISSION),
    (ErrorCode.VM_NOT_FOUND, ExitCode.FAILED),
    (ErrorCode.INVALID_ARGUMENT, ExitCode.FAILED),
    (None, ExitCode.FAILED),
])
def test_error_codes_map_to_the_documented_exit_codes(code, status):
    assert exit_code_for(code) is status


def test_an_error_reply_becomes_one_line_its_exit_code_and_its_enum():
    with pytest.raises(CliError) as e:
        Client._check({"ok": False, "error_code": "permission_denied", "error": "host.update is for root only"})
    assert e.value.message == "host.update is for root only (permission_denied)"
    assert e.value.exit_code is ExitCode.PERMISSION and e.value.error_code is ErrorCode.PERMISSION_DENIED


def test_a_code_from_a_newer_daemon_is_shown_as_it_came_and_fails_with_1():
    with pytest.raises(CliError) as e:
        Client._check({"ok": False, "error_code": "quota_exceeded", "error": "too many VMs"})
    assert e.value.message == "too many VMs (quota_exceeded)"
    assert e.value.exit_code is ExitCode.FAILED and e.value.error_code is None


def test_help_lists_every_exit_status():
    out = CliRunner().invoke(cli, ["--help"]).output
    section = out[out.index("Exit status:"):]
    for status in ExitCode:
        assert "  %d  %s" % (status, status.meaning) in section
    assert "permission_denied" in section


def test_an_unreachable_daemon_exits_3(tmp_path):
    r = CliRunner().invoke(cli, ["--socket", str(tmp_path / "none.sock"), "vm", "ls"])
    assert r.exit_code == ExitCode.UNREACHABLE
    assert r.output.startswith("tenbox: tenboxd is not running: no socket at") and r.output.count("\n") == 1
