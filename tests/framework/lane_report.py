"""pytest plugin inside the nested lane: every test report, serialized, to one file (tests; in the lane).

The outer pytest (lane_plugin.py) turns each line back into a report with
pytest's own pytest_report_from_serializable hook, the way pytest-xdist
moves reports between processes. Each line is flushed and synced when it is
written: a lane that dies mid-run still leaves the reports before it.
"""

from __future__ import annotations

import json
import os

import pytest

_out = None
_config = None


def pytest_configure(config: pytest.Config) -> None:
    global _out, _config
    path = os.environ.get("TENBOX_LANE_REPORTS")
    if path:
        _config = config
        _out = open(path, "a", encoding="utf-8")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _out is None:
        return
    data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
    _out.write(json.dumps(data) + "\n")
    _out.flush()
    os.fsync(_out.fileno())


def pytest_unconfigure(config: pytest.Config) -> None:
    global _out
    if _out is not None:
        _out.close()
        _out = None
