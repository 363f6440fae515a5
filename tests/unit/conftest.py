"""Fixtures shared by the unit tests."""

import pytest

from tenbox_vmm.memory import MIB, GuestMemory
from tests.framework.supervisor_fakes import open_rig


@pytest.fixture
def mem():
    """16 MiB of guest RAM, no VM: for rings and devices driven by tests/virtio_driver.py."""
    m = GuestMemory(16 * MIB)
    yield m
    m.close()


@pytest.fixture
def rig(tmp_path):
    """A WorkerManager on a fake host (supervisor_fakes.Rig); device tests define a `rig` of their own."""
    with open_rig(tmp_path) as r:
        yield r
