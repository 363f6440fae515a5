"""Fixtures shared by the unit tests."""

import pytest

from tenbox_vmm.memory import MIB, GuestMemory


@pytest.fixture
def mem():
    """16 MiB of guest RAM, no VM: for rings and devices driven by tests/virtio_driver.py."""
    m = GuestMemory(16 * MIB)
    yield m
    m.close()
