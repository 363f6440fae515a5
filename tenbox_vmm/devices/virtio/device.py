"""What every virtio device model provides, whatever the transport (worker)."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from tenbox_vmm.devices.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from tenbox_vmm.devices.virtio.queue import Virtqueue

COMMON_FEATURES = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX


class VirtioDevice:
    """Base class. Subclasses set `device_id`, `num_queues`, `queue_size` and implement the hooks.

    `process` runs on the device's I/O thread, never on a vCPU thread; the
    config-space hooks run on vCPU threads and must stay cheap.
    """

    device_id = 0
    num_queues = 1
    queue_size = 256
    name = "virtio"

    def __init__(self) -> None:
        self.features = 0  # negotiated, valid once activated
        self.config_changed: Callable[[], None] = lambda: None  # set by the transport
        self.wake: Callable[[], None] = lambda: None  # set by the I/O thread: run its loop again
        # Set by the I/O thread: interrupt the driver now if it wants one for what was pushed on a queue.
        self.notify: Callable[[Virtqueue], None] = lambda queue: None

    def device_features(self) -> int:
        return COMMON_FEATURES

    def config_bytes(self) -> bytes:
        return b""

    def config_read(self, offset: int, size: int) -> int:
        cfg = self.config_bytes()
        if offset + size > len(cfg):
            return 0
        return int.from_bytes(cfg[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # read-only config unless a device says otherwise

    def activate(self, features: int, queues: List[Virtqueue]) -> None:
        self.features = features

    def process(self, queue: Virtqueue) -> None:
        """Handle the chains the driver made available on `queue` (I/O thread)."""

    def wants_kicks(self, queue: Virtqueue) -> bool:
        """Whether the I/O thread should re-arm kicks on `queue` after processing it (I/O thread).

        False leaves them off until the device asks again (a receive queue
        with buffers in hand and no frames for them).
        """
        return True

    def poll_prepare(self) -> Tuple[List[Tuple[int, int]], int]:
        """Extra fds the I/O thread should poll for this device, and a timeout in ms (-1: none)."""
        return [], -1

    def poll_done(self, revents: Dict[int, int]) -> bool:
        """After poll(): handle the device's own fds; True if a queue may have new used buffers."""
        return False

    def deactivate(self) -> None:
        """The driver reset the device: drop per-activation state (I/O thread already stopped)."""
        self.features = 0

    def close(self) -> None:
        """The VM is going away for good: flush and release backends."""
