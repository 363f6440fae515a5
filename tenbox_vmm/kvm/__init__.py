"""KVM through cffi (worker): the only code in tenbox that issues KVM ioctls."""

from tenbox_vmm.kvm.api import Kvm, KvmUnavailable, Vcpu, Vm

__all__ = ["Kvm", "KvmUnavailable", "Vm", "Vcpu"]
