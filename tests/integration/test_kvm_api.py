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
