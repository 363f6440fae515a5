"""The virtio-mmio transport, version 2 (worker; registers on vCPU threads).

Register file per the virtio 1.x spec, section 4.2.2. Queue notifications
are ioeventfds (the write never leaves the kernel) and interrupts irqfds,
both wired when the driver sets DRIVER_OK and unwired on reset; without an
ioeventfd the register write kicks the I/O thread itself. A guest that
breaks the rules (bad rings, a queue moved while live) gets
DEVICE_NEEDS_RESET and a config interrupt; the VM goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import List, Optional, Tuple

from tenbox_vmm import eventfd
from tenbox_vmm.devices.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    INT_CONFIG,
    INT_VRING,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
)
from tenbox_vmm.devices.virtio.device import VirtioDevice
from tenbox_vmm.devices.virtio.iothread import IoThread
from tenbox_vmm.devices.virtio.queue import Virtqueue, VirtqueueError
from tenbox_vmm.guest_log import GuestLog
from tenbox_vmm.memory import GuestMemory

log = logging.getLogger("tenbox.virtio")

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR = 0x554D4551  # "QEMU", what Linux and guests expect to see; no vendor-specific behaviour
MMIO_SIZE = 0x200
CONFIG_OFFSET = 0x100

R_MAGIC, R_VERSION, R_DEVICE_ID, R_VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
R_DEVICE_FEATURES, R_DEVICE_FEATURES_SEL = 0x010, 0x014
R_DRIVER_FEATURES, R_DRIVER_FEATURES_SEL = 0x020, 0x024
R_QUEUE_SEL, R_QUEUE_NUM_MAX, R_QUEUE_NUM, R_QUEUE_READY = 0x030, 0x034, 0x038, 0x044
R_QUEUE_NOTIFY = 0x050
R_INTERRUPT_STATUS, R_INTERRUPT_ACK = 0x060, 0x064
R_STATUS = 0x070
R_QUEUE_DESC_LOW, R_QUEUE_DESC_HIGH = 0x080, 0x084
R_QUEUE_DRIVER_LOW, R_QUEUE_DRIVER_HIGH = 0x090, 0x094
R_QUEUE_DEVICE_LOW, R_QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
R_SHM_SEL, R_SHM_LEN_LOW, R_SHM_LEN_HIGH = 0x0AC, 0x0B0, 0x0B4
R_CONFIG_GENERATION = 0x0FC


class MmioHost:
    """What the transport needs from the machine: eventfds wired into KVM for this slot."""

    def irqfd(self) -> int:
        """An eventfd that raises this device's interrupt line when written."""
        raise NotImplementedError

    def ioeventfd(self, offset: int, datamatch: int) -> Optional[int]:
        """An eventfd KVM signals on a 4-byte write of `datamatch` at base+offset (None: not available)."""
        raise NotImplementedError

    def release(self) -> None:
        """Unwire everything irqfd()/ioeventfd() created."""
        raise NotImplementedError


class VirtioMmio:
    """One virtio-mmio slot: the register window at some base, over one device."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, host: MmioHost) -> None:
        self.device = device
        self.mem = mem
        self.host = host
        # A driver can break its rings, reset the device and break them again: rate-limited.
        self._broken_log = GuestLog(log, "virtio-%s: DEVICE_NEEDS_RESET" % device.name)
        self._lock = threading.Lock()
        self.queues = [Virtqueue(mem, i, device.queue_size) for i in range(device.num_queues)]
        device.config_changed = self.config_changed
        self._io: Optional[IoThread] = None
        self._held = False  # pause() until resume(): a driver's DRIVER_OK meanwhile starts no I/O thread
        self._irq_fd: Optional[int] = None
        self._kick_fds: List[Optional[int]] = []
        self._own_kicks: List[int] = []
        self._reset_locked()

    # State ------------------------------------------------------------------------------

    def _reset_locked(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status, or the machine reset)."""
        io = None
        with self._lock:
            io, self._io = self._io, None
        if io is not None:
            io.stop()
        self._unwire()
        with self._lock:
            self._reset_locked()
        self.device.deactivate()

    def close(self) -> None:
        self.reset()
        self.device.close()

    def _unwire(self) -> None:
        for fd in self._own_kicks:
            os.close(fd)
        self._own_kicks = []
        self._kick_fds = []
        self._irq_fd = None
        self.host.release()

    # Snapshots ----------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop the I/O thread between two batches, and start none until resume(): the device writes no
        guest memory and its queues hold still, even while the vCPUs run on (a snapshot's pre-copy)."""
        with self._lock:
            io, self._io = self._io, None
            self._held = True
        if io is not None:
            # However long its batch takes (a slow disk): a snapshot must not go on while it writes
            # guest RAM, nor resume() start a second thread beside it.
            io.stop(timeout=None)

    def resume(self) -> None:
        """Start the I/O thread again after pause(), with the same kicks and interrupt."""
        with self._lock:
            self._held = False
            if (self._io is None and self.status & STATUS_DRIVER_OK and not self.status & STATUS_DEVICE_NEEDS_RESET
                    and self._kick_fds):
                self._start_io()

    def track_writes(self, wlog) -> None:
        """Mark in `wlog` (a queue.WriteLog, or None to stop) what the device writes into guest RAM; paused."""
        for q in self.queues:
            q.track_writes(wlog)

    def used_rings(self) -> List[Tuple[int, int]]:
        """(guest address, length) of each live queue's used ring."""
        return [r for r in (q.used_ring() for q in self.queues) if r is not None]

    def save_state(self) -> dict:
        """The transport's registers and every queue (snapshot/records.py VIRTIO); call paused."""
        with self._lock:
            return {
                "device": dict(name=self.device.name, device_id=self.device.device_id,
                               features=self.device.features),
                "transport": dict(status=self.status, device_features_sel=self.device_features_sel,
                                  driver_features_sel=self.driver_features_sel, driver_features=self.driver_features,
                                  queue_sel=self.queue_sel, interrupt_status=self.interrupt_status,
                                  config_generation=self.config_generation),
                "queues": [q.save_state() for q in self.queues],
            }

    def check_state(self, where: str, s: dict) -> None:
        """SnapshotError unless a checked record fits this device (its type and queues)."""
        from tenbox_vmm.snapshot import SnapshotError

        if s["device"]["device_id"] != self.device.device_id or s["device"]["name"] != self.device.name:
            raise SnapshotError("%s is a virtio-%s, the VM has a virtio-%s there"
                                % (where, s["device"]["name"], self.device.name))
        if len(s["queues"]) != len(self.queues):
            raise SnapshotError("device state out of range: %s has %d queues, virtio-%s has %d"
                                % (where, len(s["queues"]), self.device.name, len(self.queues)))
        for i, (q, rec) in enumerate(zip(self.queues, s["queues"])):
            if rec["size"] > q.max_size:
                raise SnapshotError("device state out of range: %s.queue%d.size = %d (at most %d)"
                                    % (where, i, rec["size"], q.max_size))

    def load_state(self, s: dict) -> None:
        """Take a record back (check_state passed); a live device is wired and its I/O thread started.

        The driver's rings are in the restored guest RAM; chains it offered that were
        not taken yet are taken by the I/O thread as it starts.
        """
        t = s["transport"]
        with self._lock:
            self._reset_locked()
            self.status = t["status"]
            self.device_features_sel, self.driver_features_sel = t["device_features_sel"], t["driver_features_sel"]
            self.driver_features, self.queue_sel = t["driver_features"], t["queue_sel"]
            self.interrupt_status, self.config_generation = t["interrupt_status"], t["config_generation"]
            for q, rec in zip(self.queues, s["queues"]):
                q.load_state(rec)
        if self.status & STATUS_DRIVER_OK and not self.status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED):
            self._activate()
            if self.interrupt_status:
                self._interrupt(0)  # an interrupt the driver had not acknowledged: the line goes up again

    # Interrupts ---------------------------------------------------------------------------

    def _interrupt(self, bit: int) -> None:
        with self._lock:
            self.interrupt_status |= bit
            fd = self._irq_fd
        if fd is not None:
            eventfd.signal(fd)

    def signal_used(self, queue_index: int) -> None:
        self._interrupt(INT_VRING)

    def config_changed(self) -> None:
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._interrupt(INT_CONFIG)

    def needs_reset(self, reason: str) -> None:
        self._broken_log.warning("virtio-%s: DEVICE_NEEDS_RESET: %s", self.device.name, reason)
        with self._lock:
            self.status |= STATUS_DEVICE_NEEDS_RESET
            for q in self.queues:
                q.ready = False
        self.config_changed()

    # Activation -----------------------------------------------------------------------------

    def _activate(self) -> None:
        """DRIVER_OK: check the queues, wire eventfds, start the I/O thread."""
        features = self.driver_features
        event_idx = bool(features & F_RING_EVENT_IDX)
        indirect = bool(features & F_RING_INDIRECT_DESC)
        live = []
        try:
            for q in self.queues:
                if q.ready:
                    q.ready = False
                    q.activate(event_idx, indirect)
                    live.append(q)
        except VirtqueueError as e:
            self.needs_reset(str(e))
            return
        self._irq_fd = self.host.irqfd()
        kicks = []
        for q in self.queues:
            fd = self.host.ioeventfd(R_QUEUE_NOTIFY, q.index)
            if fd is None:
                fd = eventfd.eventfd()
                self._own_kicks.append(fd)
            kicks.append(fd)
        self._kick_fds = kicks
        self.device.activate(features, self.queues)
        with self._lock:
            if not self._held:  # else resume() starts it
                self._start_io()

    def _start_io(self) -> None:
        """Under self._lock: pause() either finds the thread or keeps it from starting."""
        self._io = IoThread("virtio-%s" % self.device.name, self.device, self.queues, self._kick_fds,
                            self.signal_used, self.needs_reset)
        self._io.start()

    # Registers -------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_OFFSET:
            return self.device.config_read(offset - CONFIG_OFFSET, size)
        if size != 4:
            return 0  # the spec allows only 32-bit access to the registers
        with self._lock:
            q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
            if offset == R_MAGIC:
                return MAGIC
            if offset == R_VERSION:
                return VERSION
            if offset == R_DEVICE_ID:
                return self.device.device_id
            if offset == R_VENDOR_ID:
                return VENDOR
            if offset == R_DEVICE_FEATURES:
                feats = self.device.device_features() | F_VERSION_1
                return (feats >> (32 * self.device_features_sel)) & 0xFFFFFFFF if self.device_features_sel < 2 else 0
            if offset == R_QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == R_QUEUE_READY:
                return 1 if q and q.ready else 0
            if offset == R_INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == R_STATUS:
                return self.status
            if offset == R_CONFIG_GENERATION:
                return self.config_generation
            if offset in (R_SHM_LEN_LOW, R_SHM_LEN_HIGH):
                return 0xFFFFFFFF  # no shared memory regions
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET:
            self.device.config_write(offset - CONFIG_OFFSET, size, value)
            return
        if size != 4:
            return
        if offset == R_QUEUE_NOTIFY:
            # Only reached without an ioeventfd for this queue.
            fds = self._kick_fds
            if value < len(fds) and fds[value] is not None:
                eventfd.signal(fds[value])
            return
        if offset == R_STATUS:
            self._write_status(value)
            return
        if offset == R_INTERRUPT_ACK:
            with self._lock:
                self.interrupt_status &= ~value
            return
        moved = False
        with self._lock:
            q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
            if offset == R_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == R_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == R_DRIVER_FEATURES:
                if self.status & STATUS_FEATURES_OK or self.driver_features_sel > 1:
                    return
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == R_QUEUE_SEL:
                self.queue_sel = value
            elif q is None:
                pass
            elif self.status & STATUS_DRIVER_OK and offset in (R_QUEUE_NUM, R_QUEUE_DESC_LOW, R_QUEUE_DESC_HIGH,
                                                                R_QUEUE_DRIVER_LOW, R_QUEUE_DRIVER_HIGH,
                                                                R_QUEUE_DEVICE_LOW, R_QUEUE_DEVICE_HIGH):
                moved = True
            elif offset == R_QUEUE_NUM:
                q.size = value
            elif offset == R_QUEUE_READY:
                q.ready = bool(value & 1)
            elif offset == R_QUEUE_DESC_LOW:
                q.desc_addr = (q.desc_addr & ~0xFFFFFFFF) | value
            elif offset == R_QUEUE_DESC_HIGH:
                q.desc_addr = (q.desc_addr & 0xFFFFFFFF) | (value << 32)
            elif offset == R_QUEUE_DRIVER_LOW:
                q.avail_addr = (q.avail_addr & ~0xFFFFFFFF) | value
            elif offset == R_QUEUE_DRIVER_HIGH:
                q.avail_addr = (q.avail_addr & 0xFFFFFFFF) | (value << 32)
            elif offset == R_QUEUE_DEVICE_LOW:
                q.used_addr = (q.used_addr & ~0xFFFFFFFF) | value
            elif offset == R_QUEUE_DEVICE_HIGH:
                q.used_addr = (q.used_addr & 0xFFFFFFFF) | (value << 32)
        if moved:  # a live queue moved under the device: refuse it loudly
            self.needs_reset("the driver changed queue %d's layout while the device was live" % self.queue_sel)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        with self._lock:
            old = self.status
            if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
                offered = self.device.device_features() | F_VERSION_1
                if self.driver_features & ~offered or not self.driver_features & F_VERSION_1:
                    value &= ~STATUS_FEATURES_OK  # refused: the driver sees the bit did not stick
            self.status = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
            activate = value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK and not value & STATUS_FAILED
        if activate:
            self._activate()
