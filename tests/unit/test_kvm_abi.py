"""The cffi declarations match the kernel's KVM ABI (sizes, offsets, ioctl numbers).

A C program built against the system's <linux/kvm.h> prints the truth; a
wrong declaration would otherwise show up only as EINVAL or corrupted
registers at run time.
"""

import shutil

import pytest

from tenbox_vmm.kvm import constants as c
from tenbox_vmm.kvm.ffi import ffi
from tests.framework.c_abi import run_c_program

STRUCTS = {
    "kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"],
    "kvm_regs": ["rax", "rsi", "rsp", "r15", "rip", "rflags"],
    "kvm_segment": ["base", "limit", "selector", "type", "present", "l", "g", "unusable"],
    "kvm_dtable": ["base", "limit"],
    "kvm_sregs": ["cs", "tr", "ldt", "gdt", "idt", "cr0", "cr3", "cr4", "efer", "apic_base", "interrupt_bitmap"],
    "kvm_fpu": ["fcw", "fsw", "ftwx", "last_opcode", "last_ip", "xmm", "mxcsr"],
    "kvm_msr_entry": ["index", "data"],
    "kvm_msrs": ["nmsrs", "entries"],
    "kvm_cpuid_entry2": ["function", "index", "flags", "eax", "edx"],
    "kvm_cpuid2": ["nent", "entries"],
    "kvm_lapic_state": ["regs"],
    "kvm_pit_config": ["flags"],
    "kvm_irq_level": ["irq", "level"],
    "kvm_irqfd": ["fd", "gsi", "flags", "resamplefd"],
    "kvm_ioeventfd": ["datamatch", "addr", "len", "fd", "flags"],
    "kvm_mp_state": ["mp_state"],
    "kvm_xsave": ["region"],
    "kvm_xcr": ["xcr", "value"],
    "kvm_xcrs": ["nr_xcrs", "flags", "xcrs", "padding"],
    "kvm_vcpu_events": ["exception", "interrupt", "nmi", "sipi_vector", "flags", "smi",
                        "exception_has_payload", "exception_payload"],
    "kvm_debugregs": ["db", "dr6", "dr7", "flags"],
    # realtime and host_tsc came with Linux 5.16 (Debian 11's headers are 5.10); tenbox saves the
    # struct whole and sets clock and flags only, so the size and those two are what must match.
    "kvm_clock_data": ["clock", "flags"],
    "kvm_irqchip": ["chip_id", "chip"],
    "kvm_pit_channel_state": ["count", "latched_count", "mode", "gate", "count_load_time"],
    "kvm_pit_state2": ["channels", "flags"],
    "kvm_coalesced_mmio_zone": ["addr", "size", "pio"],
    "kvm_coalesced_mmio": ["phys_addr", "len", "pio", "data"],
    "kvm_coalesced_mmio_ring": ["first", "last", "coalesced_mmio"],
    # Generic, used by the arm64 worker (kvm_vcpu_init is arm64's own header's: the arm64 lane's
    # probe, tests/integration/test_aarch64_lane.py, checks it and its ioctls by using them).
    "kvm_create_device": ["type", "fd", "flags"],
    "kvm_device_attr": ["flags", "group", "attr", "addr"],
    "kvm_one_reg": ["id", "addr"],
    "kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason", "if_flag", "cr8", "apic_base",
                "io", "mmio", "internal", "system_event", "kvm_valid_regs", "kvm_dirty_regs", "s"],
}
RUN_UNION_MEMBERS = {
    "io.direction", "io.size", "io.port", "io.count", "io.data_offset",
    "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
    "internal.suberror", "internal.ndata", "internal.data",
    "system_event.type",  # (ndata came with Linux 5.18; tenbox reads only the type)
}
IOCTLS = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
    "KVM_GET_DIRTY_LOG",
    "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_IRQFD",
    "KVM_CREATE_PIT2", "KVM_IOEVENTFD", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
    "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC",
    "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE",
    "KVM_REGISTER_COALESCED_MMIO", "KVM_UNREGISTER_COALESCED_MMIO",
    "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_GET_PIT2", "KVM_SET_PIT2",
    "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
    "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS",
    "KVM_CREATE_DEVICE", "KVM_SET_DEVICE_ATTR", "KVM_HAS_DEVICE_ATTR", "KVM_GET_ONE_REG", "KVM_SET_ONE_REG",
]


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory):
    """sizeof/offsetof/ioctl values as gcc sees them through the system headers."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to check the KVM ABI (apt-get install gcc)")
    d = tmp_path_factory.mktemp("abi")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name, fields in STRUCTS.items():
        lines.append('printf("size %s %%zu\\n", sizeof(struct %s));' % (name, name))
        for f in fields:
            lines.append('printf("off %s.%s %%zu\\n", offsetof(struct %s, %s));' % (name, f, name, f))
    for m in sorted(RUN_UNION_MEMBERS):
        lines.append('printf("off kvm_run.%s %%zu\\n", offsetof(struct kvm_run, %s));' % (m, m))
    for name in IOCTLS:
        lines.append('printf("ioctl %s %%lu\\n", (unsigned long)%s);' % (name, name))
    lines.append("return 0; }")
    out = run_c_program(d, lines)
    result = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        result[(kind, key)] = int(value)
    return result


def test_struct_sizes_match_the_kernel(kernel_abi):
    for name in STRUCTS:
        assert ffi.sizeof("struct " + name) == kernel_abi[("size", name)], name


def test_field_offsets_match_the_kernel(kernel_abi):
    for name, fields in STRUCTS.items():
        for f in fields:
            assert ffi.offsetof("struct " + name, f) == kernel_abi[("off", "%s.%s" % (name, f))], (name, f)
    for m in RUN_UNION_MEMBERS:
        assert ffi.offsetof("struct kvm_run", *m.split(".")) == kernel_abi[("off", "kvm_run." + m)], m


def test_ioctl_numbers_match_the_kernel(kernel_abi):
    for name in IOCTLS:
        assert getattr(c, name) == kernel_abi[("ioctl", name)], name


def test_doctors_own_kvm_numbers_match_the_workers():
    """tenboxd may not import the worker's KVM layer (ARCHITECTURE.md), so doctor.py spells the few
    numbers it needs itself; they must be the worker's, which the headers check above."""
    from tenbox_supervisor import doctor
    from tenbox_vmm.kvm import constants as kc

    assert doctor.KVM_CREATE_VM == kc.KVM_CREATE_VM
    assert doctor.KVM_CREATE_DEVICE == kc.KVM_CREATE_DEVICE
    assert doctor.KVM_CREATE_DEVICE_TEST == kc.CREATE_DEVICE_TEST
    assert dict(doctor.ARM_VGICS) == {"GICv3": kc.DEV_TYPE_ARM_VGIC_V3, "GICv2": kc.DEV_TYPE_ARM_VGIC_V2}


def test_a_dirty_log_bitmap_becomes_runs_of_pages():
    from tenbox_vmm.kvm.api import bitmap_runs

    def bitmap(pages, words=3):
        return sum(1 << p for p in pages).to_bytes(8 * words, "little")

    assert bitmap_runs(bitmap([])) == []
    assert bitmap_runs(bitmap([0])) == [(0, 1)]
    assert bitmap_runs(bitmap(range(3, 70))) == [(3, 67)], "across a word"
    assert bitmap_runs(bitmap(list(range(64, 128)) + [130, 191])) == [(64, 64), (130, 1), (191, 1)]
    assert bitmap_runs(bitmap(range(192))) == [(0, 192)], "to the end"
    assert bitmap_runs(bitmap([5, 7, 8, 63, 64])) == [(5, 1), (7, 2), (63, 2)]
