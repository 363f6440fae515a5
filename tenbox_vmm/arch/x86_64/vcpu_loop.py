"""The vCPU thread's loop: KVM_RUN, then hand port I/O and MMIO exits to the buses (worker).

This is the hot path of the VMM: every guest access to an emulated device
comes through here, about 7 µs a round trip on this kind of host. It reads
the exit straight out of the shared kvm_run page with precompiled struct
layouts and touches no other Python object than the bus it dispatches to.
"""

from __future__ import annotations

import errno
import struct
from typing import Callable, Optional

from tenbox_vmm.devices.bus import MmioBus, PioBus
from tenbox_vmm.kvm import constants as c
from tenbox_vmm.kvm.api import Vcpu
from tenbox_vmm.kvm.coalesced import CoalescedRing
from tenbox_vmm.kvm.ffi import ffi, libc

# kvm_run: exit_reason at 8, the exit union at 32.
_EXIT_REASON = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_MMIO_DATA_OFFSET = 40
_UNION_OFFSET = 32
_ZERO = ffi.cast("unsigned long", 0)


class ExitOutcome:
    """Why a vCPU loop ended, for the machine to decide what happens next."""

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind  # "halted", "paused", "shutdown", "system_event", "internal_error", "fail_entry", "unhandled"
        self.detail = detail


def run_vcpu(vcpu: Vcpu, pio: PioBus, mmio: MmioBus, halted: Callable[[], bool],
             ring: Optional[CoalescedRing] = None, paused: Optional[Callable[[], bool]] = None) -> ExitOutcome:
    """Run until `halted()` turns true or the guest does something only the machine can answer.

    Writes KVM coalesced into `ring` are played to the buses before each exit is handled.
    `paused()` is asked after a KVM_RUN that a kick interrupted: KVM has then completed
    the last port or MMIO read it handed us (KVM_RUN with immediate_exit does that before
    it returns EINTR), so the vCPU stands at an instruction boundary and its state can be
    saved; the loop returns "paused" and the caller runs it again to resume.
    """
    fd = vcpu.fd
    run = vcpu.run
    mem = vcpu.run_mem
    ioctl = libc.ioctl
    request = c.KVM_RUN
    pio_read, pio_write = pio.read, pio.write
    mmio_read, mmio_write = mmio.read, mmio.write
    io_unpack = _IO.unpack_from
    mmio_unpack = _MMIO.unpack_from
    EXIT_IO, EXIT_MMIO, EXIT_INTR = c.EXIT_IO, c.EXIT_MMIO, c.EXIT_INTR
    pending = ring.pending if ring is not None else None
    exits = 0
    try:
        while not halted():
            if ioctl(fd, request, _ZERO) < 0:
                err = ffi.errno
                if err == errno.EINTR or err == errno.EAGAIN:
                    if paused is not None and paused():
                        return ExitOutcome("paused")
                    continue
                raise OSError(err, "KVM_RUN failed on vcpu%d" % vcpu.index)
            exits += 1
            if pending is not None and pending():
                ring.drain()
            reason = run.exit_reason
            if reason == EXIT_IO:
                out, size, port, count, off = io_unpack(mem, _UNION_OFFSET)
                if out:
                    if count == 1:
                        if size == 1:
                            pio_write(port, 1, mem[off])
                        else:
                            pio_write(port, size, int.from_bytes(mem[off : off + size], "little"))
                    else:
                        for i in range(count):
                            o = off + i * size
                            pio_write(port, size, int.from_bytes(mem[o : o + size], "little"))
                else:
                    if count == 1 and size == 1:
                        mem[off] = pio_read(port, 1) & 0xFF
                    else:
                        for i in range(count):
                            o = off + i * size
                            mem[o : o + size] = (pio_read(port, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            elif reason == EXIT_MMIO:
                addr, data, length, is_write = mmio_unpack(mem, _UNION_OFFSET)
                if length not in (1, 2, 4, 8):
                    return ExitOutcome("unhandled", "MMIO access of %d bytes at %#x" % (length, addr))
                if is_write:
                    mmio_write(addr, length, int.from_bytes(data[:length], "little"))
                else:
                    value = mmio_read(addr, length) & ((1 << (8 * length)) - 1)
                    mem[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + length] = value.to_bytes(length, "little")
            elif reason == EXIT_INTR:
                continue
            else:
                return _special_exit(run, reason)
        return ExitOutcome("halted")
    finally:
        vcpu.exits += exits


def _special_exit(run, reason: int) -> ExitOutcome:
    if reason == c.EXIT_SHUTDOWN:
        return ExitOutcome("shutdown", "triple fault")
    if reason == c.EXIT_SYSTEM_EVENT:
        return ExitOutcome("system_event", str(run.system_event.type))
    if reason == c.EXIT_INTERNAL_ERROR:
        sub = run.internal.suberror
        data = [run.internal.data[i] for i in range(min(run.internal.ndata, 16))]
        what = "emulation failure" if sub == c.INTERNAL_ERROR_EMULATION else "suberror %d" % sub
        return ExitOutcome("internal_error", "%s, data %s" % (what, " ".join("%#x" % d for d in data)))
    if reason == c.EXIT_FAIL_ENTRY:
        return ExitOutcome("fail_entry", "hardware entry failure reason %#x" % run.fail_entry.hardware_entry_failure_reason)
    if reason == c.EXIT_HLT:
        return ExitOutcome("unhandled", "HLT exit with an in-kernel irqchip")
    return ExitOutcome("unhandled", "exit reason %s (%d)" % (c.EXIT_NAMES.get(reason, "?"), reason))
