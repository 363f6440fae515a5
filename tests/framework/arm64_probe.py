"""Inside the arm64 lane: tenbox's arm64 KVM layer runs its first guest instructions (tests; in the arm64 lane, root).

    python3 -m tests.framework.arm64_probe --gic v3|v2 --cpus N

Makes a VM the way the arm64 worker will (tenbox_vmm.kvm.api and
tenbox_vmm.arch.aarch64.cpu): N vCPUs initialised for KVM's preferred
target with PSCI 0.2 (all but vCPU 0 powered off), the vGIC at layout.py's
addresses, RAM at 0x4000_0000, and vCPU 0's boot registers as for a
kernel. The "kernel" is six instructions: a byte to the UART's address (a
KVM_EXIT_MMIO, since no memory is there), then PSCI SYSTEM_OFF through
`hvc` (KVM's own PSCI: a KVM_EXIT_SYSTEM_EVENT). Each step prints one
`PROBE:` line; the outer test (tests/integration/test_aarch64_lane.py)
reads them.
"""

from __future__ import annotations

import argparse
import mmap
import struct

from tenbox_vmm.arch.aarch64 import cpu
from tenbox_vmm.arch.aarch64 import layout as L
from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Kvm

PROGRAM = (
    0xD2A12002,  # movz x2, #0x0900, lsl #16   (x2 = the UART, 0x0900_0000)
    0x52800821,  # movz w1, #0x41              ('A')
    0x39000041,  # strb w1, [x2]
    0xD2800100,  # movz x0, #0x0008
    0xF2B08000,  # movk x0, #0x8400, lsl #16   (x0 = PSCI SYSTEM_OFF, 0x8400_0008)
    0xD4000002,  # hvc #0
)
RAM_BYTES = 4 * L.MIB


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gic", choices=sorted(cpu.GIC_VERSIONS), required=True)
    p.add_argument("--cpus", type=int, default=1)
    args = p.parse_args()
    kvm = Kvm()
    vm = kvm.create_vm()
    target = vm.arm_preferred_target()
    print("PROBE: target=%d gics=%s" % (target, ",".join(cpu.supported_gics(vm))), flush=True)
    ram = mmap.mmap(-1, RAM_BYTES)
    struct.pack_into("<%dI" % len(PROGRAM), ram, L.KERNEL_BASE - L.RAM_START, *PROGRAM)
    vm.map_memory(0, L.RAM_START, ram, 0, RAM_BYTES)
    vcpus = [vm.create_vcpu(i) for i in range(args.cpus)]
    for vcpu in vcpus:
        cpu.init_vcpu(vcpu, target)
    try:
        cpu.create_gic(vm, args.gic, args.cpus)
    except cpu.GicError as e:
        print("PROBE: error %s" % e, flush=True)
        return 3
    cpu.set_boot_regs(vcpus[0], L.KERNEL_BASE, L.FDT_ADDR)
    print("PROBE: pc=%#x pstate=%#x x0=%#x" % (vcpus[0].get_one_reg(cpu.REG_PC),
                                               vcpus[0].get_one_reg(cpu.REG_PSTATE),
                                               vcpus[0].get_one_reg(cpu.reg_x(0))), flush=True)
    run = vcpus[0].run
    for _ in range(4):
        vcpus[0].run_once()
        if run.exit_reason == kc.EXIT_MMIO:
            m = run.mmio
            print("PROBE: mmio addr=%#x len=%d write=%d data=%s" % (
                m.phys_addr, m.len, m.is_write, bytes(m.data[0:m.len]).hex()), flush=True)
        elif run.exit_reason == kc.EXIT_SYSTEM_EVENT:
            print("PROBE: system_event type=%d" % run.system_event.type, flush=True)
            return 0
        else:
            print("PROBE: exit %d" % run.exit_reason, flush=True)
            return 1
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
