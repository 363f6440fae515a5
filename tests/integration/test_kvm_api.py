"""The KVM wrappers against the real /dev/kvm: memory slots, vCPU registers, ioeventfd, irqfd."""

import os
import select

import pytest

from tenbox_vmm.kvm import Kvm
from tenbox_vmm.kvm import constants as c
from tenbox_vmm.memory import MIB, GuestMemory

pytestmark = pytest.mark.usefixtures("kvm")

# Real mode: mov ax, 0x42 ; mov [0xd000], ax ; hlt
CODE = bytes([0xB8, 0x42, 0x00, 0xA3, 0x00, 0xD0, 0xF4])
CODE_AT = 0x1000
MMIO = 0xD000  # no RAM here: a plain exit, or an eventfd once registered


@pytest.fixture
def machine():
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory(MIB)
    # Leave a hole at 0xd000 for the MMIO address: two slots around it.
    vm.map_memory(0, 0, mem.host_buffer, 0, MMIO)
    vm.map_memory(1, MMIO + 0x1000, mem.host_buffer, MMIO + 0x1000, MIB - MMIO - 0x1000)
    mem.write(CODE_AT, CODE)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = CODE_AT, 2
    vcpu.set_regs(regs)
    yield kvm, vm, vcpu, mem
    vcpu.close()
    vm.close()
    mem.close()
    kvm.close()


def run_to(vcpu, reason, limit=10):
    exits = []
    for _ in range(limit):
        assert vcpu.run_once()
        exits.append(vcpu.run.exit_reason)
        if exits[-1] == reason:
            return exits
    raise AssertionError("exits %s" % exits)


def test_mmio_write_exits_to_userspace_without_an_ioeventfd(machine):
    _, _, vcpu, _ = machine
    assert run_to(vcpu, c.EXIT_MMIO)[-1] == c.EXIT_MMIO
    mmio = vcpu.run.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write) == (MMIO, 2, 1)
    assert bytes(mmio.data[0:2]) == b"\x42\x00"


def test_ioeventfd_takes_the_write_in_the_kernel(machine):
    _, vm, vcpu, _ = machine
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vm.ioeventfd(efd, MMIO, 2, datamatch=0x42)
    exits = run_to(vcpu, c.EXIT_HLT)
    assert c.EXIT_MMIO not in exits
    assert os.eventfd_read(efd) == 1
    regs = vcpu.get_regs()
    assert regs.rip == CODE_AT + len(CODE)
    vm.ioeventfd(efd, MMIO, 2, datamatch=0x42, deassign=True)
    os.close(efd)


def test_ioeventfd_datamatch_lets_other_values_through(machine):
    _, vm, vcpu, _ = machine
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vm.ioeventfd(efd, MMIO, 2, datamatch=0x43)
    assert run_to(vcpu, c.EXIT_MMIO)[-1] == c.EXIT_MMIO
    assert not select.select([efd], [], [], 0)[0]
    os.close(efd)


def test_irqfd_assign_and_deassign_with_the_in_kernel_irqchip():
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    efd = os.eventfd(0)
    vm.irqfd(efd, 16)
    os.eventfd_write(efd, 1)  # raises GSI 16 in the in-kernel IOAPIC
    with pytest.raises(OSError):
        vm.irqfd(efd, 16)  # EBUSY: already wired
    vm.irqfd(efd, 16, deassign=True)
    vm.irqfd(efd, 16)  # free again after the deassign
    vm.irqfd(efd, 16, deassign=True)
    os.close(efd)
    vm.close()
    kvm.close()


def test_vcpu_registers_round_trip(machine):
    _, _, vcpu, _ = machine
    regs = vcpu.get_regs()
    regs.rax, regs.r15 = 0x1122334455667788, 7
    vcpu.set_regs(regs)
    back = vcpu.get_regs()
    assert (back.rax, back.r15) == (0x1122334455667788, 7)
    assert vcpu.get_mp_state() == c.MP_STATE_RUNNABLE


def test_what_kvm_supports_is_read_once_per_handle_and_handed_out_as_copies():
    kvm = Kvm()
    try:
        cpuid, msrs = kvm.supported_cpuid(), kvm.msr_index_list()
        assert len(cpuid) > 10 and any(e["function"] == 0 for e in cpuid) and len(msrs) > 10
        cpuid[0]["eax"] ^= 0xFFFF
        cpuid.pop()
        msrs.clear()
        assert kvm.supported_cpuid() == Kvm().supported_cpuid()  # the caller's changes are its own
        assert kvm.msr_index_list() == Kvm().msr_index_list()
        kvm.close()
        assert kvm.supported_cpuid()[0]["function"] == 0  # read once: the handle is no longer asked
    finally:
        kvm.close()


def test_a_spares_handle_opened_ahead_goes_to_its_machine_once(monkeypatch):
    from tenbox_vmm import passed_files
    from tenbox_vmm.kvm import api

    monkeypatch.setattr(api, "_ahead", None)
    api.open_ahead()
    ahead = api._ahead
    assert ahead is not None and ahead._cpuid is not None and ahead._msrs is not None  # read before the order
    try:
        assert api.system_handle() is ahead
        other = api.system_handle()  # the next machine of this process opens its own
        assert other is not ahead and other.fd != ahead.fd
        other.close()
    finally:
        ahead.close()
    assert not passed_files.passed(api.KVM_PATH)


def test_a_spare_that_cannot_read_kvm_ahead_opens_it_as_any_worker_does(monkeypatch):
    """Kvm() failing ahead (here: made to) leaves /dev/kvm a passed file, for the order's machine to open
    and report on."""
    from tenbox_vmm import passed_files
    from tenbox_vmm.kvm import api

    def refused(path=api.KVM_PATH):
        raise api.KvmUnavailable("refused for the test")

    monkeypatch.setattr(api, "_ahead", None)
    monkeypatch.setattr(api, "Kvm", refused)
    api.open_ahead()
    assert api._ahead is None
    assert passed_files.passed(api.KVM_PATH)
    os.close(passed_files.open_fd(api.KVM_PATH, os.O_RDWR))
