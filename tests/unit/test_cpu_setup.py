"""vCPU state at the 64-bit entry: CPUID topology, page tables, GDT, MSRs."""

import struct

from tenbox_vmm.arch.x86_64 import cpu
from tenbox_vmm.arch.x86_64 import layout as L
from tenbox_vmm.kvm.ffi import ffi
from tenbox_vmm.memory import MIB, GuestMemory

SUPPORTED = [
    dict(function=0, index=0, flags=0, eax=0x1C, ebx=0, ecx=0, edx=0),
    dict(function=1, index=0, flags=0, eax=0xA10F11, ebx=0x01020800, ecx=0x1 | 1 << 5, edx=1 << 28),
    dict(function=0xB, index=0, flags=1, eax=0, ebx=0, ecx=0, edx=1),
    dict(function=0x80000001, index=0, flags=0, eax=0, ebx=0, ecx=0x35FF, edx=0x2FD3FBFF),
    dict(function=0x80000008, index=0, flags=0, eax=0x3030, ebx=0, ecx=0x7001, edx=0),
    dict(function=0x40000000, index=0, flags=0, eax=0x40000001, ebx=0, ecx=0, edx=0),
]


def leaf(entries, fn, sub=0):
    matches = [e for e in entries if e["function"] == fn and e["index"] == sub]
    assert len(matches) == 1, (hex(fn), sub)
    return matches[0]


def test_each_vcpu_gets_its_own_apic_id_and_the_topology():
    for index, cpus in ((0, 1), (3, 4), (63, 64)):
        ids = cpu.vcpu_cpuid(SUPPORTED, index, cpus)
        l1 = leaf(ids, 1)
        assert l1["ebx"] >> 24 == index
        assert (l1["ebx"] >> 16) & 0xFF == cpus
        assert l1["ecx"] & cpu.CPUID_HYPERVISOR
        assert bool(l1["edx"] & cpu.CPUID_HTT) == (cpus > 1)
        smt, core, end = (leaf(ids, 0xB, s) for s in range(3))
        assert smt["edx"] == core["edx"] == end["edx"] == index
        assert (smt["ecx"] >> 8, core["ecx"] >> 8, end["ecx"] >> 8) == (1, 2, 0)
        assert core["ebx"] == cpus and (1 << core["eax"]) >= cpus
        assert leaf(ids, 0x80000008)["ecx"] & 0xFF == cpus - 1


def test_tsc_deadline_timer_is_offered_only_where_kvm_has_it():
    assert not leaf(cpu.vcpu_cpuid(SUPPORTED, 0, 2), 1)["ecx"] & cpu.CPUID_TSC_DEADLINE
    assert leaf(cpu.vcpu_cpuid(SUPPORTED, 1, 2, tsc_deadline=True), 1)["ecx"] & cpu.CPUID_TSC_DEADLINE


def test_kvm_paravirt_signature_is_present():
    ids = cpu.vcpu_cpuid(SUPPORTED, 0, 1)
    sig = leaf(ids, 0x40000000)
    assert struct.pack("<3I", sig["ebx"], sig["ecx"], sig["edx"]) == b"KVMKVMKVM\0\0\0"


def test_page_tables_identity_map_4_gib_with_2_mib_pages():
    mem = GuestMemory(16 * MIB)
    cr3 = cpu.write_page_tables(mem)
    for addr in (0, 0x100000, 0x7FFFFFF, 0xD0000000, 0xFEE00000, 0xFFFFFFFF):
        pml4e = mem.read_u64(cr3 + 8 * ((addr >> 39) & 0x1FF))
        pdpte = mem.read_u64((pml4e & ~0xFFF) + 8 * ((addr >> 30) & 0x1FF))
        pde = mem.read_u64((pdpte & ~0xFFF) + 8 * ((addr >> 21) & 0x1FF))
        assert pde & (cpu.PTE_PRESENT | cpu.PTE_HUGE) == cpu.PTE_PRESENT | cpu.PTE_HUGE
        assert (pde & ~0x1FFFFF & ((1 << 52) - 1)) + (addr & 0x1FFFFF) == addr
    assert cr3 + 6 * 0x1000 <= L.PAGE_TABLES_END
    mem.close()


def test_long_mode_segments_follow_the_boot_protocol():
    sregs = ffi.new("struct kvm_sregs *")
    cpu.setup_long_mode_sregs(sregs, 0x9000)
    assert sregs.cs.selector == 0x10 and sregs.cs.l == 1 and sregs.cs.db == 0
    for seg in (sregs.ds, sregs.es, sregs.ss):
        assert seg.selector == 0x18 and seg.db == 1
    assert sregs.cr0 & cpu.CR0_PG and sregs.cr0 & cpu.CR0_PE
    assert sregs.cr4 & cpu.CR4_PAE and sregs.efer & cpu.EFER_LMA
    mem = GuestMemory(16 * MIB)
    cpu.write_gdt(mem)
    assert mem.read_u64(L.GDT_ADDR + 0x10) == cpu.GDT_CODE64
    assert mem.read_u64(L.GDT_ADDR + 0x18) == cpu.GDT_DATA
    mem.close()


def test_boot_msrs_only_those_kvm_supports():
    msrs = dict(cpu.boot_msrs([cpu.MSR_IA32_MISC_ENABLE, cpu.MSR_LSTAR]))
    assert msrs == {cpu.MSR_IA32_MISC_ENABLE: cpu.MISC_ENABLE_FAST_STRING, cpu.MSR_LSTAR: 0}


def test_lapic_lint0_extint_lint1_nmi():
    regs = cpu.setup_lapic(bytearray(1024))
    assert struct.unpack_from("<I", regs, cpu.APIC_LVT_LINT0)[0] & 0x700 == 0x700
    assert struct.unpack_from("<I", regs, cpu.APIC_LVT_LINT1)[0] & 0x700 == 0x400


def test_no_vcpu_is_offered_vmx_or_svm_and_nothing_else_changes():
    assert leaf(SUPPORTED, 1)["ecx"] & cpu.CPUID_VMX and leaf(SUPPORTED, 0x80000001)["ecx"] & cpu.CPUID_SVM
    for index, cpus in ((0, 1), (1, 2)):
        ids = cpu.vcpu_cpuid(SUPPORTED, index, cpus)
        assert not leaf(ids, 1)["ecx"] & cpu.CPUID_VMX
        assert leaf(ids, 1)["ecx"] & 1  # SSE3, beside it, stays
        ext = leaf(ids, 0x80000001)
        assert ext["ecx"] == 0x35FF & ~cpu.CPUID_SVM and ext["edx"] == 0x2FD3FBFF
