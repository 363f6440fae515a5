"""How `vm ls` and `vm show` put a VM's restart policy and its attempts (CLI, pure)."""

import time

import pytest

from tenbox_ctl.vm import _restart_line

AT = time.mktime((2026, 12, 5, 14, 2, 11, 0, 0, -1))


@pytest.mark.parametrize("vm, line", [
    ({}, "no"),
    ({"restart": "always", "restart_status": None}, "always"),
    ({"restart": "on-failure:3", "restart_status": {"attempts": 1, "max_retries": 3, "next_retry_at": AT}},
     "on-failure:3, restart 2/3 at 14:02:11"),
    ({"restart": "always", "restart_status": {"attempts": 0, "max_retries": None, "next_retry_at": AT}},
     "always, restart 1 at 14:02:11"),
    ({"restart": "on-failure:3", "restart_status": {"attempts": 3, "next_retry_at": None,
                                                    "gave_up": "on-failure:3: gave up after 3 restarts"}},
     "on-failure:3, gave up after 3"),
    ({"restart": "always", "restart_status": {"attempts": 2, "next_retry_at": None, "gave_up": None}},
     "always, restarted 2"),
])
def test_the_policy_its_next_attempt_and_its_end_in_one_cell(vm, line):
    assert _restart_line(vm) == line
