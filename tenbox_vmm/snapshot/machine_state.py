"""A paused machine's state in and out of KVM and the device models (worker).

`capture` reads every vCPU (registers, sregs, XSAVE, XCRs, the MSRs of
KVM's list, LAPIC, events, MP state, debug registers, CPUID), the
in-kernel PIC, IOAPIC and PIT, kvmclock, and every device model into the
record records.check_state checks. `restore` puts such a record into a
new KVM VM whose vCPUs have not run yet, in the order QEMU uses (CPUID
first; sregs before MSRs before the LAPIC; the TSC-deadline MSR again
after the LAPIC, which ignores it unless its timer is in that mode).
Both run on the machine's controller thread with every vCPU parked.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Kvm, Vcpu, Vm
from tenbox_vmm.snapshot.errors import SnapshotError
from tenbox_vmm.snapshot.fileformat import VCPU_STRUCTS

log = logging.getLogger("tenbox.snapshot")

CPUID_KEYS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
NEEDED_CAPS = {
    kc.CAP_XSAVE: "KVM_CAP_XSAVE",
    kc.CAP_XCRS: "KVM_CAP_XCRS",
    kc.CAP_VCPU_EVENTS: "KVM_CAP_VCPU_EVENTS",
    kc.CAP_DEBUGREGS: "KVM_CAP_DEBUGREGS",
    kc.CAP_ADJUST_CLOCK: "KVM_CAP_ADJUST_CLOCK",
}
# Restore order of the whole structs (regs, XSAVE, XCRs, sregs), then MSRs, MP state, the rest.
FIRST = ("regs", "xsave", "xcrs", "sregs")
LAST = ("lapic", "events", "debugregs")
MSR_IA32_TSC_DEADLINE = 0x6E0
IRQCHIPS = (("pic_master", kc.IRQCHIP_PIC_MASTER), ("pic_slave", kc.IRQCHIP_PIC_SLAVE),
            ("ioapic", kc.IRQCHIP_IOAPIC))


def check_kvm(kvm: Kvm) -> None:
    """SnapshotError unless this KVM can save and load all of a machine's state."""
    missing = [name for cap, name in NEEDED_CAPS.items() if not kvm.check_extension(cap)]
    if missing:
        raise SnapshotError("this KVM cannot save or load machine state: it lacks %s" % ", ".join(missing))


def capture(vm: Vm, vcpus: Sequence[Vcpu], msr_indices: Sequence[int], legacy: Dict[str, object],
            virtio: Sequence[object]) -> dict:
    """The machine record of a paused machine (records.check_state's shape)."""
    out_vcpus: List[dict] = []
    for v in vcpus:
        rec: dict = {name: v.get_state(ctype) for name, ctype in VCPU_STRUCTS.items()}
        rec["mp_state"] = v.get_mp_state()
        rec["msrs"] = [[index, value] for index, value in v.get_all_msrs(msr_indices)]
        rec["cpuid"] = [[e[k] for k in CPUID_KEYS] for e in v.get_cpuid2()]
        out_vcpus.append(rec)
    vm_rec = {name: vm.get_irqchip(chip) for name, chip in IRQCHIPS}
    vm_rec["pit"] = vm.get_pit2()
    vm_rec["clock"] = vm.get_clock()
    return {
        "vcpus": out_vcpus,
        "vm": vm_rec,
        "legacy": {name: dev.save_state() for name, dev in legacy.items()},  # type: ignore[attr-defined]
        "virtio": [t.save_state() for t in virtio],  # type: ignore[attr-defined]
    }


def restore_kvm(vm: Vm, vcpus: Sequence[Vcpu], state: dict) -> None:
    """Load a checked record's KVM part into a new VM (irqchip and PIT created) and vCPUs that have not run."""
    for v, rec in zip(vcpus, state["vcpus"]):
        v.set_cpuid2([dict(zip(CPUID_KEYS, row)) for row in rec["cpuid"]])
    for name, _ in IRQCHIPS:
        vm.set_irqchip(state["vm"][name])
    vm.set_pit2(state["vm"]["pit"])
    for v, rec in zip(vcpus, state["vcpus"]):
        for name in FIRST:
            v.set_state(VCPU_STRUCTS[name], rec[name])
        _set_msrs(v, [(i, val) for i, val in rec["msrs"]])
        v.set_mp_state(rec["mp_state"])
        for name in LAST:
            v.set_state(VCPU_STRUCTS[name], rec[name])
        deadline = [(i, val) for i, val in rec["msrs"] if i == MSR_IA32_TSC_DEADLINE]
        if deadline:
            _set_msrs(v, deadline)
    vm.set_clock(state["vm"]["clock"])


def _set_msrs(vcpu: Vcpu, msrs: List[tuple]) -> None:
    """Every MSR KVM takes; one it refuses (KVM stops at the first) is logged and skipped."""
    todo = msrs
    while todo:
        n = vcpu.set_msrs(todo)
        if n < len(todo):
            log.debug("vcpu%d: KVM refused MSR %#x = %#x", vcpu.index, todo[n][0], todo[n][1])
            n += 1
        todo = todo[n:]
