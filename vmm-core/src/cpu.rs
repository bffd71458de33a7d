//! vCPU set-up: CPUID, MSRs, LAPIC local interrupts, and the registers each boot protocol enters with.

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::Entry;
use crate::layout;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM refused {what} of vCPU {index}: {source}")]
    Kvm { what: &'static str, index: u32, source: kvm_ioctls::Error },
    #[error("cannot write boot page tables or GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot build the MSR list: {0}")]
    Msrs(String),
}

fn kvm(what: &'static str, index: u32) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, index, source }
}

// CPUID feature bits we change.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// Builds the CPUID of vCPU `index` of `count` from KVM's supported set: APIC ids, topology (one package,
/// `count` cores, one thread each), the hypervisor bit, and without what we do not emulate (the
/// IA32_ARCH_CAPABILITIES MSR, which nested KVM here refuses; thermal/power and PMU leaves).
pub fn cpuid_for(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let core_bits = 32 - count.saturating_sub(1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_FFFF) | (index << 24) | (count.min(255) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; caches shared by one thread.
                e.eax = (e.eax & 0x03FF_FFFF & !(0xFFF << 14)) | ((count - 1).min(63) << 26);
            }
            6 | 0xA => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            7 if e.index == 0 => e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES,
            0xB | 0x1F => {
                // Level 0: SMT (1 thread per core), level 1: core (`count` per package), then invalid.
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0008 => e.ecx = (e.ecx & !0xFF) | (count - 1).min(255),
            _ => {}
        }
    }
    cpuid
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xC000_0081;
const MSR_LSTAR: u32 = 0xC000_0082;
const MSR_CSTAR: u32 = 0xC000_0083;
const MSR_SYSCALL_MASK: u32 = 0xC000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1A0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2FF;

fn boot_msrs() -> Result<Msrs, CpuError> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ])
    .map_err(|e| CpuError::Msrs(format!("{e:?}")))
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Configures everything common to every vCPU: CPUID, MSRs, LINT0 as ExtINT (the 8259s) and LINT1 as NMI.
pub fn setup_common(vcpu: &VcpuFd, supported: &CpuId, index: u32, count: u32) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&cpuid_for(supported, index, count)).map_err(kvm("CPUID", index))?;
    let msrs = boot_msrs()?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs", index))?;
    if set != msrs.as_slice().len() {
        log::warn!("vCPU {index}: KVM set {set} of {} boot MSRs", msrs.as_slice().len());
    }
    let mut lapic = vcpu.get_lapic().map_err(kvm("reading the LAPIC", index))?;
    for (reg, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let bytes: &mut [u8] = bytemuck_regs(&mut lapic.regs[reg..reg + 4]);
        let value = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        let value = (value & !0x700 & !(1 << 16)) | (mode << 8);
        bytes.copy_from_slice(&value.to_le_bytes());
    }
    vcpu.set_lapic(&lapic).map_err(kvm("the LAPIC", index))?;
    let fpu = kvm_fpu { fcw: 0x37F, mxcsr: 0x1F80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state", index))?;
    Ok(())
}

/// The LAPIC register page is `[c_char; 1024]`; view it as bytes.
fn bytemuck_regs(regs: &mut [std::os::raw::c_char]) -> &mut [u8] {
    // SAFETY: c_char and u8 have the same size and alignment, and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

// Boot GDT: 0x08 32-bit code (PVH), 0x10 64-bit code (__BOOT_CS), 0x18 data (__BOOT_DS), 0x20 TSS.
const GDT: [u64; 5] = [0, 0x00CF_9B00_0000_FFFF, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x0000_8B00_0000_0067];
const CODE32: u16 = 0x08;
const CODE64: u16 = 0x10;
const DATA: u16 = 0x18;
const TSS: u16 = 0x20;
/// `__BOOT_CS` of the Linux 32-bit boot protocol; its GDT slot holds 32-bit code for that entry only.
const LINUX32_BOOT_CS: u16 = 0x10;

fn segment(selector: u16) -> kvm_segment {
    let d = GDT[usize::from(selector >> 3)];
    let flags = (d >> 40) & 0xF0FF;
    let limit = ((d & 0xFFFF) | ((d >> 32) & 0xF_0000)) as u32;
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: ((d >> 16) & 0xFF_FFFF) | ((d >> 32) & 0xFF00_0000),
        limit: if g == 1 { (limit << 12) | 0xFFF } else { limit },
        selector,
        type_: (flags & 0xF) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the boot GDT, an empty IDT and (for Linux) identity page tables covering the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: Entry) -> Result<(), CpuError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::BOOT_GDT + i as u64 * 8))?;
    }
    if let Entry::Linux32 { .. } = entry {
        // The 32-bit boot protocol wants __BOOT_CS (0x10) to be flat 32-bit code.
        mem.write_obj(GDT[usize::from(CODE32 >> 3)], GuestAddress(layout::BOOT_GDT + u64::from(LINUX32_BOOT_CS)))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))?;
    if let Entry::Linux64 { .. } = entry {
        mem.write_obj(layout::PDPT | 0x3, GuestAddress(layout::PML4))?;
        for gib in 0..4u64 {
            let pd = layout::PD + gib * 0x1000;
            mem.write_obj(pd | 0x3, GuestAddress(layout::PDPT + gib * 8))?;
            for i in 0..512u64 {
                let page = (gib << 30) | (i << 21);
                mem.write_obj(page | 0x83, GuestAddress(pd + i * 8))?; // present, writable, 2 MiB
            }
        }
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel's entry as its protocol requires.
pub fn setup_boot_registers(vcpu: &VcpuFd, entry: Entry) -> Result<(), CpuError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("reading special registers", 0))?;
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    let data = segment(DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS);
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        Entry::Pvh { rip } | Entry::Multiboot { rip, .. } => {
            sregs.cs = segment(CODE32);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            // Neither protocol defines %esp; see boot::Entry for why this stack.
            regs.rsp = layout::BOOT_STACK_TOP;
            if let Entry::Multiboot { eax, ebx, .. } = entry {
                regs.rax = u64::from(eax);
                regs.rbx = u64::from(ebx);
            } else {
                regs.rbx = layout::PVH_START_INFO;
            }
        }
        Entry::Linux32 { rip } => {
            sregs.cs = kvm_segment { selector: LINUX32_BOOT_CS, ..segment(CODE32) };
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rsi = layout::ZERO_PAGE;
        }
        Entry::Linux64 { rip } => {
            sregs.cs = segment(CODE64);
            sregs.cr3 = layout::PML4;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = layout::ZERO_PAGE;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers", 0))?;
    vcpu.set_regs(&regs).map_err(kvm("registers", 0))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors_decode_to_flat_segments() {
        let code64 = segment(CODE64);
        assert_eq!((code64.base, code64.limit, code64.l, code64.db, code64.type_), (0, 0xFFFF_FFFF, 1, 0, 0xB));
        let code32 = segment(CODE32);
        assert_eq!((code32.l, code32.db, code32.present, code32.s), (0, 1, 1, 1));
        let data = segment(DATA);
        assert_eq!((data.type_, data.limit, data.g), (3, 0xFFFF_FFFF, 1));
        let tss = segment(TSS);
        assert_eq!((tss.type_, tss.limit, tss.s), (0xB, 0x67, 0));
    }

    #[test]
    fn cpuid_carries_apic_ids_and_topology() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let c = cpuid_for(&supported, 3, 4);
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xFF, 4);
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        if let Some(leaf7) = c.as_slice().iter().find(|e| e.function == 7 && e.index == 0) {
            assert_eq!(leaf7.edx & LEAF7_EDX_ARCH_CAPABILITIES, 0);
        }
    }
}
