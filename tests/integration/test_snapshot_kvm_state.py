"""Machine state captured from one KVM VM and restored into another reads back the same (real /dev/kvm).

snapshot/machine_state.py against the kernel itself: every vCPU struct,
the MSRs of KVM's list, the irqchip, the PIT and kvmclock. A component that
capture forgot, restore dropped or KVM did not take shows up as a
difference between what was set and what the new VM reports.
"""

import struct

import pytest

from tenbox_vmm.arch.x86_64 import cpu
from tenbox_vmm.kvm import Kvm
from tenbox_vmm.kvm import constants as c
from tenbox_vmm.kvm.ffi import ffi
from tenbox_vmm.memory import MIB, GuestMemory
from tenbox_vmm.snapshot import records
from tenbox_vmm.snapshot.fileformat import VCPU_SIZES, VM_SIZES
from tenbox_vmm.snapshot.machine_state import capture, check_kvm, restore_kvm

pytestmark = pytest.mark.usefixtures("kvm")

MSR_STAR = 0xC0000081
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01


def new_machine(kvm, mem, cpus=2):
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.create_pit2()
    vm.map_memory(0, 0, mem.host_buffer, 0, mem.size)
    vcpus = []
    for i in range(cpus):
        v = vm.create_vcpu(i)
        v.set_cpuid2(cpu.vcpu_cpuid(kvm.supported_cpuid(), i, cpus))
        vcpus.append(v)
    return vm, vcpus


@pytest.fixture
def kvm():
    k = Kvm()
    check_kvm(k)
    yield k
    k.close()


def test_capture_then_restore_into_a_new_vm_reads_back_the_same_state(kvm):
    mem = GuestMemory(16 * MIB)
    vm, vcpus = new_machine(kvm, mem)
    bsp = vcpus[0]
    regs = bsp.get_regs()
    regs.rax, regs.rip, regs.rflags, regs.r15 = 0x1122334455667788, 0x100200, 0x202, 42
    bsp.set_regs(regs)
    sregs = bsp.get_sregs()
    cpu.setup_long_mode_sregs(sregs, 0x9000)
    bsp.set_sregs(sregs)
    dr = ffi.new("struct kvm_debugregs *")
    dr.db[0], dr.dr7 = 0x400000, 0x401  # a breakpoint armed
    bsp.set_state("struct kvm_debugregs", bytes(ffi.buffer(dr)))
    assert bsp.set_msrs([(MSR_STAR, 0x0023001000000000), (MSR_KVM_SYSTEM_TIME_NEW, 0x5001)]) == 2
    bsp.set_lapic(cpu.setup_lapic(bsp.get_lapic()))
    pit = bytearray(vm.get_pit2())
    struct.pack_into("<I", pit, 0, 0x1234)  # channel 0's count
    vm.set_pit2(bytes(pit))
    legacy, virtio = {}, []
    before = capture(vm, vcpus, kvm.msr_index_list(), legacy, virtio)
    before["legacy"] = {name: None for name in records.LEGACY}
    assert before["vcpus"][1]["mp_state"] == c.MP_STATE_UNINITIALIZED  # the AP waits for its SIPI

    vm2, vcpus2 = new_machine(kvm, mem)
    restore_kvm(vm2, vcpus2, before)
    after = capture(vm2, vcpus2, kvm.msr_index_list(), legacy, virtio)
    for i, (b, a) in enumerate(zip(before["vcpus"], after["vcpus"])):
        for name in VCPU_SIZES:
            assert a[name] == b[name], "vcpu%d.%s differs after the restore" % (i, name)
        assert a["mp_state"] == b["mp_state"]
        msrs = dict(map(tuple, a["msrs"]))
        assert msrs == dict(map(tuple, b["msrs"])) or _differ_in_tsc_only(msrs, dict(map(tuple, b["msrs"])))
        assert msrs.get(MSR_STAR) == (0x0023001000000000 if i == 0 else 0)
        assert msrs.get(MSR_KVM_SYSTEM_TIME_NEW) == (0x5001 if i == 0 else 0)
        assert a["cpuid"] == b["cpuid"]
    for name in ("pic_master", "pic_slave", "ioapic"):
        assert after["vm"][name] == before["vm"][name], "vm.%s differs after the restore" % name
    assert _pit_without_load_times(after["vm"]["pit"]) == _pit_without_load_times(before["vm"]["pit"])
    assert struct.unpack_from("<I", after["vm"]["pit"], 0)[0] == 0x1234
    # kvmclock goes on from the saved value: never behind it, and not far ahead.
    clock_before = struct.unpack_from("<Q", before["vm"]["clock"])[0]
    clock_after = struct.unpack_from("<Q", after["vm"]["clock"])[0]
    assert 0 <= clock_after - clock_before < 5 * 10**9
    for v in vcpus + vcpus2:
        v.close()
    vm.close()
    vm2.close()
    mem.close()


MSR_IA32_TSC = 0x10
PIT_CHANNEL_BYTES = 24
PIT_LOAD_TIME_AT = 16  # count_load_time: host nanoseconds at the load, set anew by KVM_SET_PIT2


def _pit_without_load_times(pit):
    out = bytearray(pit)
    for ch in range(3):
        at = ch * PIT_CHANNEL_BYTES + PIT_LOAD_TIME_AT
        out[at : at + 8] = bytes(8)
    return bytes(out)


def _differ_in_tsc_only(a, b):
    """The TSC runs on between two captures; every other MSR must read back as it was restored."""
    return {k: v for k, v in a.items() if k != MSR_IA32_TSC} == {k: v for k, v in b.items() if k != MSR_IA32_TSC}


def test_a_captured_record_passes_the_readers_bounds(kvm):
    """What capture makes is what records.check_state accepts (with the legacy devices' records)."""
    from tests.unit.test_snapshot_file import machine_state

    mem = GuestMemory(16 * MIB)
    vm, vcpus = new_machine(kvm, mem)
    state = capture(vm, vcpus, kvm.msr_index_list(), {}, [])
    state["legacy"] = machine_state()["legacy"]
    records.check_state(state, 2, VCPU_SIZES, VM_SIZES)
    for v in vcpus:
        v.close()
    vm.close()
    mem.close()
