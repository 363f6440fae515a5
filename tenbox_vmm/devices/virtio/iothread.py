"""A virtio device's I/O thread: waits for queue kicks and the device's own fds, processes, interrupts (worker, vhost-user backend).

One thread per device: block I/O and network frames never run on a vCPU
thread. Kicks arrive as ioeventfds (KVM writes them without leaving the
kernel); interrupts leave through `signal_used`, normally an irqfd. An
`IdlePoller` may watch a queue for a while before kicks are re-armed (the
vhost-user backend's adaptive polling); the KVM worker has none.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable, List, Optional, Protocol, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.devices.virtio.device import VirtioDevice
from tenbox_vmm.devices.virtio.queue import Virtqueue, VirtqueueError

log = logging.getLogger("tenbox.virtio")

KICK_BATCH_MAX = 64  # chains processed before re-checking the stop flag


class IdlePoller(Protocol):
    """A step of the service loop between "the driver published nothing new" and re-arming kicks."""

    def woken(self) -> None:
        """The thread was woken and serves a queue."""

    def poll(self, q: Virtqueue, seen: int, stopping: Callable[[], bool]) -> bool:
        """Watch q's avail index (last read as `seen`) for a while; True if the driver published meanwhile."""

    def sleeping(self) -> None:
        """Kicks are re-armed with nothing left to do: the thread goes back to sleep."""


class IoThread:
    def __init__(
        self,
        name: str,
        device: VirtioDevice,
        queues: List[Virtqueue],
        kick_fds: List[int],
        signal_used: Callable[[int], None],
        on_error: Callable[[str], None],
        idle_poller: Optional[IdlePoller] = None,
    ) -> None:
        self.device = device
        self.queues = queues
        self.kick_fds = kick_fds
        self.signal_used = signal_used
        self.on_error = on_error
        self.idle_poller = idle_poller
        self._stop = False
        self._wake = eventfd.eventfd()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.device.wake = self.wake
        self.device.notify = self._notify
        self._thread.start()

    def wake(self) -> None:
        """Make the thread run its loop once more (another thread queued work for it)."""
        eventfd.signal(self._wake)

    def _notify(self, q: Virtqueue) -> None:
        if q.needs_interrupt():
            self.signal_used(q.index)

    def stop(self, timeout: Optional[float] = 5.0) -> None:
        """End the thread after its current batch; wait for it up to `timeout` seconds (None: until it ends)."""
        self._stop = True
        eventfd.signal(self._wake)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        os.close(self._wake)

    def _service(self, q: Virtqueue) -> None:
        """Process a queue with kicks suppressed, then re-arm them without losing a late buffer.

        While the driver keeps publishing, the queue is processed again with
        kicks still off: a busy ring costs no kicks and no wake-ups. A device
        may leave buffers in place (a receive queue with no frames to fill
        them), so "more work" means the driver published something after we
        looked, not that buffers are still available; and a device that says
        it wants no kicks from a queue (`wants_kicks`, e.g. a receive queue
        with buffers in hand) gets none until it asks again. Before kicks are
        re-armed, the idle poller (if any) may watch the ring a while longer.
        """
        poller = self.idle_poller
        if poller is not None:
            poller.woken()
        device = self.device
        avail_idx = q.avail_idx
        q.disable_kicks()
        while q.ready and not self._stop:
            seen = avail_idx()
            device.process(q)
            if q.needs_interrupt():
                self.signal_used(q.index)
            if not device.wants_kicks(q):
                return
            if avail_idx() != seen:
                continue
            if poller is not None and poller.poll(q, seen, self._stopping):
                continue
            q.enable_kicks()
            if avail_idx() == seen:
                if poller is not None:
                    poller.sleeping()
                return
            q.disable_kicks()

    def _stopping(self) -> bool:
        return self._stop

    def _run(self) -> None:
        poller = select.poll()
        by_fd = {}
        for q, fd in zip(self.queues, self.kick_fds):
            poller.register(fd, select.POLLIN)
            by_fd[fd] = q
        poller.register(self._wake, select.POLLIN)
        extra: List[Tuple[int, int]] = []
        try:
            for q in self.queues:  # buffers offered before the thread started
                if q.ready and q.has_work():
                    self._service(q)
            while not self._stop:
                fds, timeout = self.device.poll_prepare()
                polls_device = bool(fds) or timeout >= 0
                if fds != extra:  # the device's fds rarely change: re-register only then
                    for fd, _ in extra:
                        poller.unregister(fd)
                    for fd, events in fds:
                        poller.register(fd, events)
                    extra = list(fds)
                ready = poller.poll(timeout if timeout >= 0 else None)
                if self._stop:
                    break
                revents = {}
                for fd, ev in ready:
                    q = by_fd.get(fd)
                    if q is not None:
                        eventfd.drain(fd)
                        self._service(q)
                    elif fd == self._wake:
                        eventfd.drain(fd)
                    else:
                        revents[fd] = ev
                if polls_device:
                    if self.device.poll_done(revents):
                        for q in self.queues:
                            if q.ready and q.needs_interrupt():
                                self.signal_used(q.index)
        except VirtqueueError as e:
            log.debug("%s: %s; the device needs a reset", self.device.name, e)  # on_error logs it, rate-limited
            self.on_error(str(e))
        except Exception as e:  # a device bug must not take the VM down
            log.exception("%s: I/O thread failed", self.device.name)
            self.on_error("internal error: %s" % e)
