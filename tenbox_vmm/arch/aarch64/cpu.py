"""arm64 vCPUs and the in-kernel GIC through KVM (worker).

A vCPU is made with KVM_ARM_VCPU_INIT for the host's preferred target,
with PSCI 0.2 (KVM answers the guest's PSCI calls: CPU_ON, SYSTEM_OFF,
SYSTEM_RESET) and, for every vCPU but the first, powered off until the
guest's CPU_ON. The boot vCPU enters the kernel as booting.rst asks: EL1h
with D, A, I and F masked, the MMU off (KVM's reset state), x0 the device
tree's address, x1..x3 zero.

The GIC is KVM's vGIC, a device (KVM_CREATE_DEVICE): v3, with one
redistributor frame per vCPU, where the host has it, or v2 (hosts whose
GIC is a GIC-400, as the Raspberry Pi 4's). Its registers go where
layout.py and the device tree say; it is initialised once every vCPU
exists.
"""

from __future__ import annotations

import os
from typing import List

from tenbox_vmm.arch.aarch64 import layout as L
from tenbox_vmm.kvm import constants as kc
from tenbox_vmm.kvm.api import Vcpu, Vm, set_device_attr

PSTATE_EL1H = 0x5
PSTATE_DAIF = 0x3C0  # D, A, I and F masked
PSTATE_BOOT = PSTATE_DAIF | PSTATE_EL1H
# The vGIC's interrupt count: the 32 private ones and the SPIs, a multiple of 32 (KVM's rule).
# SPIs in use: the UART's, the RTC's, the GPIO's and virtio 16..16+VIRTIO_MAX_DEVICES.
GIC_NR_IRQS = 32 + 64
GIC_VERSIONS = {"v3": kc.DEV_TYPE_ARM_VGIC_V3, "v2": kc.DEV_TYPE_ARM_VGIC_V2}


class GicError(Exception):
    """The host's KVM has no usable GIC for this machine; the message is for the operator."""


def core_reg(u32_index: int) -> int:
    """The KVM_{GET,SET}_ONE_REG id of a 64-bit field of struct kvm_regs, by its offset in 32-bit words."""
    return kc.REG_ARM64 | kc.REG_SIZE_U64 | kc.REG_ARM_CORE | u32_index


def reg_x(n: int) -> int:
    return core_reg(2 * n)  # user_pt_regs.regs[n]


REG_SP = core_reg(62)
REG_PC = core_reg(64)
REG_PSTATE = core_reg(66)


def init_vcpu(vcpu: Vcpu, target: int) -> None:
    """KVM_ARM_VCPU_INIT: PSCI 0.2, and every vCPU but 0 off until the guest's PSCI CPU_ON."""
    features = [kc.ARM_VCPU_PSCI_0_2] + ([kc.ARM_VCPU_POWER_OFF] if vcpu.index else [])
    vcpu.arm_init(target, features)


def set_boot_regs(vcpu: Vcpu, entry: int, fdt: int) -> None:
    for n, value in ((0, fdt), (1, 0), (2, 0), (3, 0)):
        vcpu.set_one_reg(reg_x(n), value)
    vcpu.set_one_reg(REG_PSTATE, PSTATE_BOOT)
    vcpu.set_one_reg(REG_PC, entry)


def supported_gics(vm: Vm) -> List[str]:
    """The vGIC versions this host's KVM can make, best first."""
    out = []
    for name, dev_type in GIC_VERSIONS.items():
        try:
            vm.create_device_test(dev_type)
        except OSError:
            continue
        out.append(name)
    return out


def create_gic(vm: Vm, version: str, cpus: int) -> int:
    """The vGIC (its device fd), placed as layout.py says; call once all `cpus` vCPUs exist."""
    most = L.GICV3_MAX_VCPUS if version == "v3" else L.GICV2_MAX_VCPUS
    if cpus > most:
        raise GicError("a GIC%s machine has at most %d vCPUs, not %d" % (version, most, cpus))
    try:
        fd = vm.create_device(GIC_VERSIONS[version])
    except OSError as e:
        raise GicError("this host's KVM cannot make a GIC%s (%s); it has: %s" % (
            version, e.strerror, ", ".join("GIC" + v for v in supported_gics(vm)) or "no vGIC at all")) from None
    try:
        group = kc.DEV_ARM_VGIC_GRP_ADDR
        if version == "v3":
            set_device_attr(fd, group, kc.VGIC_V3_ADDR_TYPE_DIST, L.GIC_DIST)
            set_device_attr(fd, group, kc.VGIC_V3_ADDR_TYPE_REDIST, L.GICV3_REDIST)
        else:
            set_device_attr(fd, group, kc.VGIC_V2_ADDR_TYPE_DIST, L.GIC_DIST)
            set_device_attr(fd, group, kc.VGIC_V2_ADDR_TYPE_CPU, L.GICV2_CPU)
        set_device_attr(fd, kc.DEV_ARM_VGIC_GRP_NR_IRQS, 0, GIC_NR_IRQS)
        set_device_attr(fd, kc.DEV_ARM_VGIC_GRP_CTRL, kc.DEV_ARM_VGIC_CTRL_INIT)
    except OSError as e:
        os.close(fd)
        raise GicError("setting up the GIC%s failed: %s" % (version, e)) from None
    return fd
