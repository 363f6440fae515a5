"""Thin wrappers over the KVM file descriptors (worker; needs access to /dev/kvm).

`Kvm` is /dev/kvm, `Vm` a VM fd, `Vcpu` a vCPU fd with its mmap'ed kvm_run.
This package is the only code in tenbox that issues KVM ioctls; everything
above it speaks in Python values.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tenbox_vmm import passed_files
from tenbox_vmm.kvm import constants as c
from tenbox_vmm.kvm.ffi import ffi, libc

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12
CPUID_MAX_ENTRIES = 256
MSR_LIST_MAX = 1024

_ZERO = ffi.cast("unsigned long", 0)


class KvmUnavailable(Exception):
    """/dev/kvm cannot be used; the message says why and how to fix it."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ffi.errno
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return rc


def _ioctl(fd: int, request: int, arg, what: str) -> int:
    return _check(libc.ioctl(fd, request, arg), what)


def _ioctl_int(fd: int, request: int, value: int, what: str) -> int:
    return _ioctl(fd, request, ffi.cast("unsigned long", value), what)


def bitmap_runs(bitmap: bytes) -> List[Tuple[int, int]]:
    """(first page, pages) of each run of set bits in a dirty-log bitmap (little-endian 64-bit words)."""
    runs: List[Tuple[int, int]] = []
    start = -1
    for i, word in enumerate(memoryview(bitmap).cast("Q")):
        if word == 0 or word == 0xFFFFFFFFFFFFFFFF:  # whole words end or extend a run at once
            if word == 0 and start >= 0:
                runs.append((start, i * 64 - start))
                start = -1
            elif word and start < 0:
                start = i * 64
            continue
        for bit in range(64):
            if word >> bit & 1:
                if start < 0:
                    start = i * 64 + bit
            elif start >= 0:
                runs.append((start, i * 64 + bit - start))
                start = -1
    if start >= 0:
        runs.append((start, len(bitmap) * 8 - start))
    return runs


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            self.fd = passed_files.open_fd(path, os.O_RDWR)  # opened before the worker's sandbox
        except FileNotFoundError:
            raise KvmUnavailable(
                "%s does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                "and enable virtualization in the firmware" % path
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                "permission denied on %s: run as root or add your user to the kvm group" % path
            ) from None
        except OSError as e:
            raise KvmUnavailable("cannot open %s: %s" % (path, e.strerror)) from None
        self._cpuid: Optional[List[Dict[str, int]]] = None
        self._msrs: Optional[List[int]] = None
        try:
            version = _ioctl(self.fd, c.KVM_GET_API_VERSION, _ZERO, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise KvmUnavailable("%s speaks KVM API %d, tenbox needs %d" % (path, version, KVM_API_VERSION))
            required = c.REQUIRED_CAPS_AARCH64 if os.uname().machine == "aarch64" else c.REQUIRED_CAPS
            missing = [name for cap, name in required.items() if not self.check_extension(cap)]
            if missing:
                raise KvmUnavailable("%s lacks: %s" % (path, ", ".join(missing)))
            self.vcpu_mmap_size = _ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE, _ZERO, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return _ioctl_int(self.fd, c.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def max_vcpus(self) -> int:
        return self.check_extension(c.CAP_MAX_VCPUS) or self.check_extension(c.CAP_NR_VCPUS) or 4

    # What KVM supports is read once per handle: the open fd pins the module, so it cannot change
    # under it, and KVM_GET_SUPPORTED_CPUID costs 0.4 ms here (a restore asked twice). Copies out.

    def supported_cpuid(self) -> List[Dict[str, int]]:
        if self._cpuid is None:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": CPUID_MAX_ENTRIES, "entries": CPUID_MAX_ENTRIES})
            _ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            self._cpuid = [_cpuid_entry_dict(buf.entries[i]) for i in range(buf.nent)]
        return [dict(entry) for entry in self._cpuid]

    def msr_index_list(self) -> List[int]:
        if self._msrs is None:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": MSR_LIST_MAX, "indices": MSR_LIST_MAX})
            _ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
            self._msrs = [buf.indices[i] for i in range(buf.nmsrs)]
        return list(self._msrs)

    def coalesced_ring_page(self) -> int:
        """The page (of a vCPU's mapping) that holds KVM's coalesced-write ring, where KVM can
        coalesce port writes; 0 where it cannot (no KVM_CAP_COALESCED_PIO)."""
        if not self.check_extension(c.CAP_COALESCED_PIO):
            return 0
        page = self.check_extension(c.CAP_COALESCED_MMIO)
        if page <= 0 or (page + 1) * mmap.PAGESIZE > self.vcpu_mmap_size:
            return 0
        return page

    def create_vm(self) -> "Vm":
        fd = _ioctl_int(self.fd, c.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _get_struct(fd: int, ctype: str, request: int, what: str, init=None) -> bytes:
    """The struct a GET ioctl fills, as bytes."""
    buf = ffi.new(ctype, init)
    _ioctl(fd, request, buf, what)
    return bytes(ffi.buffer(buf))


def set_device_attr(fd: int, group: int, attr: int, value: Optional[int] = None) -> None:
    """KVM_SET_DEVICE_ATTR on an in-kernel device's fd; `value` is passed as a u64 (None: no value)."""
    data = ffi.new("uint64_t *", value or 0)
    addr = int(ffi.cast("uintptr_t", data)) if value is not None else 0
    arg = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr, "addr": addr})
    _ioctl(fd, c.KVM_SET_DEVICE_ATTR, arg, "KVM_SET_DEVICE_ATTR")


def _struct_from(ctype: str, data: bytes):
    """A new C struct holding `data`, which must be exactly its size."""
    buf = ffi.new(ctype)
    size = ffi.sizeof(buf[0])
    if len(data) != size:
        raise ValueError("%s: %d bytes, the struct has %d" % (ctype, len(data), size))
    ffi.memmove(buf, data, size)
    return buf


# vCPU state kept whole in snapshots: the struct and its (get, set) ioctls.
STATE_IOCTLS = {
    "struct kvm_regs": (c.KVM_GET_REGS, c.KVM_SET_REGS),
    "struct kvm_sregs": (c.KVM_GET_SREGS, c.KVM_SET_SREGS),
    "struct kvm_fpu": (c.KVM_GET_FPU, c.KVM_SET_FPU),
    "struct kvm_xsave": (c.KVM_GET_XSAVE, c.KVM_SET_XSAVE),
    "struct kvm_xcrs": (c.KVM_GET_XCRS, c.KVM_SET_XCRS),
    "struct kvm_lapic_state": (c.KVM_GET_LAPIC, c.KVM_SET_LAPIC),
    "struct kvm_vcpu_events": (c.KVM_GET_VCPU_EVENTS, c.KVM_SET_VCPU_EVENTS),
    "struct kvm_debugregs": (c.KVM_GET_DEBUGREGS, c.KVM_SET_DEBUGREGS),
}


def struct_size(ctype: str) -> int:
    return ffi.sizeof(ctype)


def _cpuid_entry_dict(e) -> Dict[str, int]:
    return {
        "function": e.function,
        "index": e.index,
        "flags": e.flags,
        "eax": e.eax,
        "ebx": e.ebx,
        "ecx": e.ecx,
        "edx": e.edx,
    }


_ahead: Optional[Kvm] = None


def open_ahead() -> None:
    """A standby's spare, before its order: open /dev/kvm as its machine will and read what KVM supports.

    system_handle() hands that handle to the order's machine. If it cannot be opened, /dev/kvm is
    opened as a passed file instead (passed_files.open_named), whose error the machine reports.
    """
    global _ahead
    kvm = None
    try:
        kvm = Kvm()
        kvm.supported_cpuid()
        kvm.msr_index_list()
    except (KvmUnavailable, OSError):
        if kvm is not None:
            kvm.close()
        passed_files.open_named([KVM_PATH], os.O_RDWR)
        return
    _ahead = kvm


def system_handle() -> Kvm:
    """The /dev/kvm handle for this process's machine: the one opened ahead (once), else a new one."""
    global _ahead
    kvm, _ahead = _ahead, None
    return kvm if kvm is not None else Kvm()


class Vm:
    """A KVM virtual machine: memory slots, irqchip, PIT, eventfds, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._mapped = []  # cffi buffer handles keeping guest RAM exported
        self._slots: Dict[int, Tuple[int, int, int]] = {}  # slot -> (guest address, size, host address)

    def map_memory(self, slot: int, guest_phys_addr: int, buffer, offset: int, size: int) -> None:
        """Back guest-physical [gpa, gpa+size) with `buffer[offset:offset+size]`."""
        if offset < 0 or offset + size > len(buffer):
            raise ValueError("memory slot outside its buffer")
        handle = ffi.from_buffer(buffer)
        self._mapped.append(handle)
        host = int(ffi.cast("uintptr_t", handle)) + offset
        self.set_user_memory_region(slot, guest_phys_addr, size, host)
        self._slots[slot] = (guest_phys_addr, size, host)

    def log_dirty_pages(self, on: bool) -> None:
        """Have KVM log the pages the guest writes in every slot map_memory made (or stop logging)."""
        for slot, (gpa, size, host) in sorted(self._slots.items()):
            self.set_user_memory_region(slot, gpa, size, host, c.KVM_MEM_LOG_DIRTY_PAGES if on else 0)

    def dirty_pages(self, slot: int) -> bytes:
        """The slot's pages written since logging began or the last call, as a bitmap (bit i: page i of
        the slot, little-endian 64-bit words); KVM clears it and watches those pages again."""
        pages = self._slots[slot][1] // mmap.PAGESIZE
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        arg = ffi.new("uint64_t[2]", [slot, int(ffi.cast("uintptr_t", bitmap))])
        _ioctl(self.fd, c.KVM_GET_DIRTY_LOG, arg, "KVM_GET_DIRTY_LOG")
        return bytes(ffi.buffer(bitmap))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": size,
                "userspace_addr": host_addr,
            },
        )
        _ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_int(self.fd, c.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, c.KVM_CREATE_IRQCHIP, _ZERO, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *", {"flags": c.PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, c.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        """Set the level of an interrupt line of the in-kernel PIC/IOAPIC.

        Thread-safe: one ioctl on a private struct would race between threads,
        so each call fills its own.
        """
        arg = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        _ioctl(self.fd, c.KVM_IRQ_LINE, arg, "KVM_IRQ_LINE")

    def irqfd(self, fd: int, gsi: int, resample_fd: Optional[int] = None, deassign: bool = False) -> None:
        flags = 0
        if resample_fd is not None:
            flags |= c.IRQFD_FLAG_RESAMPLE
        if deassign:
            flags |= c.IRQFD_FLAG_DEASSIGN
        arg = ffi.new(
            "struct kvm_irqfd *",
            {"fd": fd, "gsi": gsi, "flags": flags, "resamplefd": resample_fd or 0},
        )
        _ioctl(self.fd, c.KVM_IRQFD, arg, "KVM_IRQFD")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: Optional[int] = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        flags = 0
        if datamatch is not None:
            flags |= c.IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= c.IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= c.IOEVENTFD_FLAG_DEASSIGN
        arg = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        _ioctl(self.fd, c.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def coalesce_pio(self, port: int, length: int, on: bool) -> None:
        """Let KVM queue the guest's writes to ports port..port+length-1 in the coalesced ring
        instead of exiting (on), or stop doing so (off)."""
        self._coalesce(port, length, on, pio=1)

    def coalesce_mmio(self, addr: int, length: int, on: bool) -> None:
        """The same for guest-physical addresses addr..addr+length-1."""
        self._coalesce(addr, length, on, pio=0)

    def _coalesce(self, addr: int, length: int, on: bool, pio: int) -> None:
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": length, "pio": pio})
        request = c.KVM_REGISTER_COALESCED_MMIO if on else c.KVM_UNREGISTER_COALESCED_MMIO
        _ioctl(self.fd, request, zone, "KVM_REGISTER_COALESCED_MMIO" if on else "KVM_UNREGISTER_COALESCED_MMIO")

    # Machine state for snapshots: each as the kernel's struct, in bytes --------

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: one in-kernel chip (c.IRQCHIP_PIC_MASTER, _SLAVE, _IOAPIC), the whole struct."""
        return _get_struct(self.fd, "struct kvm_irqchip *", c.KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", {"chip_id": chip_id})

    def set_irqchip(self, data: bytes) -> None:
        _ioctl(self.fd, c.KVM_SET_IRQCHIP, _struct_from("struct kvm_irqchip *", data), "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        return _get_struct(self.fd, "struct kvm_pit_state2 *", c.KVM_GET_PIT2, "KVM_GET_PIT2")

    def set_pit2(self, data: bytes) -> None:
        _ioctl(self.fd, c.KVM_SET_PIT2, _struct_from("struct kvm_pit_state2 *", data), "KVM_SET_PIT2")

    def get_clock(self) -> bytes:
        """KVM_GET_CLOCK: kvmclock's time base (ns) for this VM."""
        return _get_struct(self.fd, "struct kvm_clock_data *", c.KVM_GET_CLOCK, "KVM_GET_CLOCK")

    def set_clock(self, data: bytes) -> None:
        """KVM_SET_CLOCK with the clock value only (flags 0): the guest's kvmclock goes on from there."""
        clock = _struct_from("struct kvm_clock_data *", data)
        clock.flags = 0  # the realtime and host_tsc fields are of the host that took it
        _ioctl(self.fd, c.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")

    # arm64 ----------------------------------------------------------

    def arm_preferred_target(self) -> int:
        """KVM_ARM_PREFERRED_TARGET: the CPU model KVM emulates best on this host."""
        init = ffi.new("struct kvm_vcpu_init *")
        _ioctl(self.fd, c.KVM_ARM_PREFERRED_TARGET, init, "KVM_ARM_PREFERRED_TARGET")
        return init.target

    def create_device(self, dev_type: int) -> int:
        """KVM_CREATE_DEVICE: an in-kernel device's fd (the caller closes it)."""
        dev = ffi.new("struct kvm_create_device *", {"type": dev_type})
        _ioctl(self.fd, c.KVM_CREATE_DEVICE, dev, "KVM_CREATE_DEVICE")
        return dev.fd

    def create_device_test(self, dev_type: int) -> None:
        """KVM_CREATE_DEVICE with KVM_CREATE_DEVICE_TEST: OSError if KVM cannot make that type."""
        dev = ffi.new("struct kvm_create_device *", {"type": dev_type, "flags": c.CREATE_DEVICE_TEST})
        _ioctl(self.fd, c.KVM_CREATE_DEVICE, dev, "KVM_CREATE_DEVICE")

    def create_vcpu(self, index: int) -> "Vcpu":
        fd = _ioctl_int(self.fd, c.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        return Vcpu(self, fd, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for handle in self._mapped:
            ffi.release(handle)
        self._mapped = []


class Vcpu:
    """One vCPU fd and its shared kvm_run page."""

    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        self.exits = 0  # exits handled in userspace, for statistics
        try:
            self.run_mem = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self.run_ptr = ffi.from_buffer(self.run_mem)
        self.run = ffi.cast("struct kvm_run *", self.run_ptr)

    def run_once(self) -> bool:
        """One KVM_RUN. False when interrupted by a signal or immediate_exit."""
        if libc.ioctl(self.fd, c.KVM_RUN, _ZERO) < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return False
            raise OSError(err, "KVM_RUN: %s" % os.strerror(err))
        return True

    # Register state ----------------------------------------------------

    def arm_init(self, target: int, features: Iterable[int]) -> None:
        """KVM_ARM_VCPU_INIT with the feature bits `features` (constants ARM_VCPU_*)."""
        init = ffi.new("struct kvm_vcpu_init *", {"target": target})
        for bit in features:
            init.features[bit // 32] |= 1 << (bit % 32)
        _ioctl(self.fd, c.KVM_ARM_VCPU_INIT, init, "KVM_ARM_VCPU_INIT")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """KVM_SET_ONE_REG of a 64-bit register."""
        data = ffi.new("uint64_t *", value)
        reg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", data))})
        _ioctl(self.fd, c.KVM_SET_ONE_REG, reg, "KVM_SET_ONE_REG")

    def get_one_reg(self, reg_id: int) -> int:
        data = ffi.new("uint64_t *")
        reg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", data))})
        _ioctl(self.fd, c.KVM_GET_ONE_REG, reg, "KVM_GET_ONE_REG")
        return data[0]

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, c.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        _ioctl(self.fd, c.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, c.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        _ioctl(self.fd, c.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        _ioctl(self.fd, c.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu) -> None:
        _ioctl(self.fd, c.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_msrs(self, msrs: Sequence[Tuple[int, int]]) -> int:
        """Write (index, value) pairs; returns how many KVM accepted."""
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for i, (index, value) in enumerate(msrs):
            buf.entries[i].index = index
            buf.entries[i].data = value
        return _ioctl(self.fd, c.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
        indices = list(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = _ioctl(self.fd, c.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_cpuid2(self, entries: Sequence[Dict[str, int]]) -> None:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            dst = buf.entries[i]
            for key in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                setattr(dst, key, e[key])
        _ioctl(self.fd, c.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_lapic(self) -> bytearray:
        state = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, c.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return bytearray(ffi.buffer(state))

    def set_lapic(self, regs: bytes) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(state, regs, ffi.sizeof(state[0]))
        _ioctl(self.fd, c.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, c.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        _ioctl(self.fd, c.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def get_cpuid2(self) -> List[Dict[str, int]]:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": CPUID_MAX_ENTRIES, "entries": CPUID_MAX_ENTRIES})
        _ioctl(self.fd, c.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        return [_cpuid_entry_dict(buf.entries[i]) for i in range(buf.nent)]

    def get_state(self, ctype: str) -> bytes:
        """One of the vCPU state structs (STATE_IOCTLS) as the kernel fills it."""
        return _get_struct(self.fd, ctype + " *", STATE_IOCTLS[ctype][0], "KVM_GET %s" % ctype)

    def set_state(self, ctype: str, data: bytes) -> None:
        _, put = STATE_IOCTLS[ctype]
        buf = _struct_from(ctype + " *", data)
        if ctype == "struct kvm_vcpu_events":
            # What GET leaves out of flags it did not return; the pending NMI and the SIPI
            # vector it always returns, so they are restored too (as QEMU does).
            buf.flags |= c.VCPUEVENT_VALID_NMI_PENDING | c.VCPUEVENT_VALID_SIPI_VECTOR
        _ioctl(self.fd, put, buf, "KVM_SET %s" % ctype)

    def get_all_msrs(self, indices: Sequence[int]) -> List[Tuple[int, int]]:
        """(index, value) of every MSR in `indices` KVM can read; those it cannot are left out."""
        out: List[Tuple[int, int]] = []
        todo = list(indices)
        while todo:
            got = self.get_msrs(todo)
            n = len(got)
            out.extend((i, got[i]) for i in todo[:n])
            todo = todo[n + 1:]  # KVM stops at the first it cannot read: skip that one
        return out

    def close(self) -> None:
        if self.fd >= 0:
            self.run = None
            ffi.release(self.run_ptr)
            self.run_ptr = None
            self.run_mem.close()
            os.close(self.fd)
            self.fd = -1
