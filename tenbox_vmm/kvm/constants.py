"""KVM ioctl numbers, exit reasons and capabilities (worker).

Request numbers follow the kernel's _IOC encoding; their sizes come from the
cffi declarations, so a wrong declaration shows up as a wrong number in
tests/unit/test_kvm_abi.py rather than as EINVAL at run time.
"""

from __future__ import annotations

from tenbox_vmm.kvm.ffi import ffi

KVMIO = 0xAE
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_READ, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_WRITE, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_READ | _WRITE, nr, ffi.sizeof(ctype))


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")

# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_GET_DIRTY_LOG = _iow(0x42, "uint64_t[2]")  # struct kvm_dirty_log: u32 slot, u32 pad, u64 bitmap address
KVM_MEM_LOG_DIRTY_PAGES = 1  # kvm_userspace_memory_region.flags
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")  # sic: the kernel declares it _IOR
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, "struct kvm_coalesced_mmio_zone")
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, "struct kvm_coalesced_mmio_zone")

# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")

# Capabilities (KVM_CHECK_EXTENSION)
CAP_IRQCHIP = 0
CAP_HLT = 1
CAP_USER_MEMORY = 3
CAP_COALESCED_MMIO = 15  # KVM_CHECK_EXTENSION answers the ring's page offset in the vCPU mapping
CAP_SET_TSS_ADDR = 4
CAP_EXT_CPUID = 7
CAP_NR_VCPUS = 9
CAP_NR_MEMSLOTS = 10
CAP_IRQFD = 32
CAP_ADJUST_CLOCK = 39
CAP_VCPU_EVENTS = 41
CAP_DEBUGREGS = 50
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_PIT2 = 33
CAP_IOEVENTFD = 36
CAP_MAX_VCPUS = 66
CAP_TSC_DEADLINE_TIMER = 72
CAP_IMMEDIATE_EXIT = 136
CAP_COALESCED_PIO = 162

CAP_DEVICE_CTRL = 89
CAP_ARM_PSCI_0_2 = 102

REQUIRED_CAPS = {
    CAP_IRQCHIP: "in-kernel irqchip",
    CAP_USER_MEMORY: "user memory regions",
    CAP_EXT_CPUID: "KVM_GET_SUPPORTED_CPUID",
    CAP_IRQFD: "irqfd",
    CAP_PIT2: "in-kernel PIT",
    CAP_IOEVENTFD: "ioeventfd",
    CAP_IMMEDIATE_EXIT: "immediate_exit",
}
# An arm64 host's KVM: the GIC is a device (KVM_CREATE_DEVICE), PSCI is KVM's.
REQUIRED_CAPS_AARCH64 = {
    CAP_USER_MEMORY: "user memory regions",
    CAP_IRQFD: "irqfd",
    CAP_IOEVENTFD: "ioeventfd",
    CAP_IMMEDIATE_EXIT: "immediate_exit",
    CAP_DEVICE_CTRL: "in-kernel devices (the vGIC)",
    CAP_ARM_PSCI_0_2: "PSCI 0.2",
}

# arm64 (Documentation/virt/kvm/api.rst; arch/arm64/include/uapi/asm/kvm.h)
KVM_ARM_VCPU_INIT = _iow(0xAE, "struct kvm_vcpu_init")
KVM_ARM_PREFERRED_TARGET = _ior(0xAF, "struct kvm_vcpu_init")
KVM_GET_ONE_REG = _iow(0xAB, "struct kvm_one_reg")
KVM_SET_ONE_REG = _iow(0xAC, "struct kvm_one_reg")
KVM_CREATE_DEVICE = _iowr(0xE0, "struct kvm_create_device")
KVM_SET_DEVICE_ATTR = _iow(0xE1, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR = _iow(0xE3, "struct kvm_device_attr")
CREATE_DEVICE_TEST = 1  # kvm_create_device.flags: ask whether the type exists, make nothing
ARM_VCPU_POWER_OFF = 0  # kvm_vcpu_init.features bits
ARM_VCPU_PSCI_0_2 = 2
DEV_TYPE_ARM_VGIC_V2 = 5
DEV_TYPE_ARM_VGIC_V3 = 7
DEV_ARM_VGIC_GRP_ADDR = 0
DEV_ARM_VGIC_GRP_NR_IRQS = 3
DEV_ARM_VGIC_GRP_CTRL = 4
DEV_ARM_VGIC_CTRL_INIT = 0
VGIC_V2_ADDR_TYPE_DIST = 0
VGIC_V2_ADDR_TYPE_CPU = 1
VGIC_V3_ADDR_TYPE_DIST = 2
VGIC_V3_ADDR_TYPE_REDIST = 3
REG_ARM64 = 0x6000000000000000
REG_SIZE_U64 = 0x0030000000000000
REG_ARM_CORE = 0x0010 << 16
SYSTEM_EVENT_SHUTDOWN = 1  # kvm_run.system_event.type
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# kvm_run.exit_reason
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24

EXIT_NAMES = {
    EXIT_UNKNOWN: "unknown",
    EXIT_EXCEPTION: "exception",
    EXIT_IO: "io",
    EXIT_HYPERCALL: "hypercall",
    EXIT_DEBUG: "debug",
    EXIT_HLT: "hlt",
    EXIT_MMIO: "mmio",
    EXIT_IRQ_WINDOW_OPEN: "irq_window_open",
    EXIT_SHUTDOWN: "shutdown",
    EXIT_FAIL_ENTRY: "fail_entry",
    EXIT_INTR: "intr",
    EXIT_INTERNAL_ERROR: "internal_error",
    EXIT_SYSTEM_EVENT: "system_event",
}

EXIT_IO_IN = 0
EXIT_IO_OUT = 1

INTERNAL_ERROR_EMULATION = 1

SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3
MP_STATE_SIPI_RECEIVED = 4
MP_STATE_MAX = 9  # KVM_MP_STATE_* run 0..8 (x86 uses 0..4 and 7..8)

IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

VCPUEVENT_VALID_NMI_PENDING = 1 << 0
VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1

PIT_SPEAKER_DUMMY = 1
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
IRQFD_FLAG_DEASSIGN = 1 << 0
IRQFD_FLAG_RESAMPLE = 1 << 1
