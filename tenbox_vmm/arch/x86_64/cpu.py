"""x86-64 vCPU state at Linux's 64-bit entry: page tables, GDT, registers, CPUID, MSRs (worker)."""

from __future__ import annotations

import struct
from typing import Dict, List, Sequence, Tuple

from tenbox_vmm.arch.x86_64 import layout as L
from tenbox_vmm.memory import GuestMemory

# Control register and EFER bits
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_HUGE = 1 << 7
PAGE_2M = 2 << 20

# GDT descriptors: flat 4 GiB, the layout Linux's boot protocol names.
GDT_CODE64 = 0x00AF9B000000FFFF  # present, DPL 0, execute/read, L=1, G=1
GDT_DATA = 0x00CF93000000FFFF  # present, DPL 0, read/write, D/B=1, G=1
TSS_LIMIT = 0x67

# MSRs
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

# LAPIC local vector table: LINT0 takes the PIC (ExtINT), LINT1 NMIs, as on a PC.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_MASK = 0x700
APIC_MODE_EXTINT = 0x700
APIC_MODE_NMI = 0x400

# CPUID
CPUID_HYPERVISOR = 1 << 31  # leaf 1 ECX
CPUID_TSC_DEADLINE = 1 << 24  # leaf 1 ECX; KVM_GET_SUPPORTED_CPUID leaves it to KVM_CAP_TSC_DEADLINE_TIMER
CPUID_HTT = 1 << 28  # leaf 1 EDX
# Hardware virtualization, never offered: Intel's VMX (leaf 1 ECX) and AMD's SVM (leaf 0x80000001 ECX).
# KVM's nested VMX/SVM code runs only for a guest whose CPUID has them, and it is host-kernel attack
# surface an untrusted guest does not need (docs/security-guest-bounds.md).
CPUID_VMX = 1 << 5
CPUID_SVM = 1 << 2
CPUID_EXT_FEATURES = 0x80000001
CPUID_FLAG_SIGNIFICANT_INDEX = 1
KVM_CPUID_SIGNATURE = 0x40000000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2


def write_page_tables(mem: GuestMemory) -> int:
    """Identity-map 0..4 GiB with 2 MiB pages; returns the CR3 value."""
    mem.write(L.PML4_ADDR, struct.pack("<Q", L.PDPT_ADDR | PTE_PRESENT | PTE_WRITE).ljust(0x1000, b"\0"))
    pdpt = b"".join(
        struct.pack("<Q", (L.PD_ADDR + i * 0x1000) | PTE_PRESENT | PTE_WRITE) for i in range(4)
    )
    mem.write(L.PDPT_ADDR, pdpt.ljust(0x1000, b"\0"))
    flags = PTE_PRESENT | PTE_WRITE | PTE_HUGE
    pds = struct.pack("<2048Q", *[(i * PAGE_2M) | flags for i in range(2048)])
    mem.write(L.PD_ADDR, pds)
    return L.PML4_ADDR


def write_gdt(mem: GuestMemory) -> None:
    """GDT: null, null, code 0x10, data 0x18, 64-bit TSS 0x20 (16 bytes); empty IDT."""
    tss_low = TSS_LIMIT | (0x89 << 40)  # present, type 9 (available 64-bit TSS), base 0
    mem.write(L.GDT_ADDR, struct.pack("<6Q", 0, 0, GDT_CODE64, GDT_DATA, tss_low, 0))
    mem.write(L.IDT_ADDR, bytes(16))


def _segment(seg, selector: int, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def setup_long_mode_sregs(sregs, cr3: int) -> None:
    """Segment, descriptor-table and control registers as startup_64 requires."""
    _segment(sregs.cs, L.SEL_CODE64, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, L.SEL_DATA, code=False)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector = 0, TSS_LIMIT, L.SEL_TSS
    tr.type, tr.present, tr.dpl, tr.db, tr.s, tr.l, tr.g, tr.avl, tr.unusable = 0xB, 1, 0, 0, 0, 0, 0, 0, 0
    sregs.gdt.base, sregs.gdt.limit = L.GDT_ADDR, 6 * 8 - 1
    sregs.idt.base, sregs.idt.limit = L.IDT_ADDR, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def setup_entry_regs(regs, entry: int, boot_params: int) -> None:
    """General registers at the 64-bit entry: RIP, RSI = boot_params, IF clear."""
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsi = boot_params
    regs.rsp = L.BOOT_STACK
    regs.rbp = L.BOOT_STACK


def setup_fpu(fpu) -> None:
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80


def boot_msrs(supported: Sequence[int]) -> List[Tuple[int, int]]:
    """MSR values at boot, restricted to those KVM lets us set."""
    wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    allowed = set(supported)
    return [(index, value) for index, value in wanted if index in allowed]


def setup_lapic(regs: bytearray) -> bytearray:
    """LINT0 as ExtINT and LINT1 as NMI, what PC firmware leaves for the OS."""
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, offset)
        struct.pack_into("<I", regs, offset, (value & ~APIC_MODE_MASK) | mode)
    return regs


def _bits_for(count: int) -> int:
    """Bits of APIC ID needed to number `count` things (x2APIC topology shift)."""
    return max(0, (count - 1).bit_length())


def _topology_leaf(fn: int, apic_id: int, cpus: int) -> List[Dict[str, int]]:
    """Leaf 0xB (or 0x1F) subleaves: SMT level, core level, then the terminator."""
    core_bits = _bits_for(cpus)
    levels = [
        (0, 1, TOPOLOGY_LEVEL_SMT),
        (core_bits, cpus, TOPOLOGY_LEVEL_CORE),
        (0, 0, 0),
    ]
    return [
        dict(function=fn, index=sub, flags=CPUID_FLAG_SIGNIFICANT_INDEX,
             eax=shift, ebx=count, ecx=(level << 8) | sub, edx=apic_id)
        for sub, (shift, count, level) in enumerate(levels)
    ]


def vcpu_cpuid(supported: Sequence[Dict[str, int]], index: int, cpus: int,
               tsc_deadline: bool = False) -> List[Dict[str, int]]:
    """CPUID for vCPU `index` of `cpus`: one package, one core per vCPU, one thread per core.

    Starts from what KVM supports and fixes what identifies this vCPU (APIC
    IDs, topology leaves on Intel and AMD), marks the hypervisor, hides VMX
    and SVM (no nested virtualization) and keeps KVM's paravirtual leaves so
    guests find kvm-clock. `tsc_deadline` (KVM's KVM_CAP_TSC_DEADLINE_TIMER)
    offers the LAPIC's TSC-deadline timer mode, as QEMU and Firecracker do:
    Linux then arms its timer with one MSR write and skips calibrating the
    LAPIC timer against the PM timer.
    """
    apic_id = index
    core_bits = _bits_for(cpus)
    out: List[Dict[str, int]] = []
    topology_leaves = set()
    seen_kvm = False
    for src in supported:
        e = dict(src)
        fn = e["function"]
        if fn in (0xB, 0x1F):
            topology_leaves.add(fn)
            continue  # rebuilt below with every subleaf
        if fn == 1:
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (min(cpus, 255) << 16) | (apic_id << 24)
            e["ecx"] |= CPUID_HYPERVISOR
            if tsc_deadline:
                e["ecx"] |= CPUID_TSC_DEADLINE
            if cpus > 1:
                e["edx"] |= CPUID_HTT
            else:
                e["edx"] &= ~CPUID_HTT
            e["ecx"] &= ~CPUID_VMX
        elif fn == CPUID_EXT_FEATURES:
            e["ecx"] &= ~CPUID_SVM
        elif fn == 4 and e["eax"] & 0x1F:
            # Intel deterministic cache parameters: cores per package, and who
            # shares each cache (L1/L2 private to a core, L3 shared by all).
            cache_level = (e["eax"] >> 5) & 0x7
            sharing = cpus if cache_level >= 3 else 1
            e["eax"] = (e["eax"] & 0x3FFF) | ((sharing - 1) << 14) | ((min(cpus, 64) - 1) << 26)
        elif fn == 0x80000008:
            # AMD: cores in the package minus one, and the APIC ID bits for cores.
            e["ecx"] = (e["ecx"] & ~0xF0FF) | (core_bits << 12) | (cpus - 1)
        elif fn == 0x8000001E:
            # AMD extended APIC ID and core ID; one thread per core, one node.
            e.update(eax=apic_id, ebx=index & 0xFF, ecx=0)
        elif fn == KVM_CPUID_SIGNATURE:
            seen_kvm = True
            ebx, ecx, edx = struct.unpack("<3I", KVM_SIGNATURE)
            e.update(ebx=ebx, ecx=ecx, edx=edx)
        out.append(e)
    for fn in sorted(topology_leaves):
        out.extend(_topology_leaf(fn, apic_id, cpus))
    if not seen_kvm:
        ebx, ecx, edx = struct.unpack("<3I", KVM_SIGNATURE)
        out.append(dict(function=KVM_CPUID_SIGNATURE, index=0, flags=0, eax=KVM_CPUID_SIGNATURE + 1, ebx=ebx, ecx=ecx, edx=edx))
    return out
