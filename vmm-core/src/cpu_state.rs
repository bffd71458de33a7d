//! The KVM side of a machine-state file: each vCPU's registers, FPU/XSAVE, XCRs, MSRs, LAPIC, pending
//! events, MP state and debug registers, and the VM's in-kernel PIC, IOAPIC, PIT and kvmclock.
//!
//! Under PVM (KVM on a nested, paravirtualized host) some of these ioctls may be refused; what is refused
//! at save time is recorded as absent (with a log line) and not set on restore, except for the registers,
//! without which nothing can continue.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::snapshot::{Reader, StateError, Writer};

/// The MTRRs: default type, the fixed-range ones, the 8 variable-range pairs.
pub const MTRR_MSRS: [u32; 28] = [
    0x2FF, 0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F, 0x200, 0x201, 0x202, 0x203,
    0x204, 0x205, 0x206, 0x207, 0x208, 0x209, 0x20A, 0x20B, 0x20C, 0x20D, 0x20E, 0x20F,
];

/// Most MSRs a vCPU's state may hold.
pub const MAX_MSRS: usize = 4096;

/// One vCPU's state.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// XSAVE area (includes the FPU and SSE/AVX state), or the legacy FPU state where XSAVE is refused.
    pub xsave: Option<kvm_xsave>,
    pub fpu: Option<kvm_fpu>,
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<(u32, u64)>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: Option<kvm_debugregs>,
}

/// What `get` returned, or None with a log line when KVM refused it (PVM refuses some).
fn optional<T>(index: u32, what: &str, result: Result<T, kvm_ioctls::Error>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            log::warn!("vCPU {index}: KVM refused to {what} ({e}); the state is saved without it");
            None
        }
    }
}

/// Reads the MSRs in `indices` that KVM lets us read; an MSR it refuses is left out (KVM_GET_MSRS stops at
/// the first one it cannot read, so the rest is asked again after it).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Unsupported(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(StateError::kvm("read the MSRs"))?;
        out.extend(msrs.as_slice()[..n.min(chunk.len())].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            log::debug!("MSR {:#x} cannot be read; left out of the state", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Reads a stopped vCPU's state (`msr_indices`: what KVM_GET_MSR_INDEX_LIST reported).
    pub fn capture(fd: &VcpuFd, index: u32, msr_indices: &[u32]) -> Result<Self, StateError> {
        let what = |w: &str| format!("read vCPU {index}'s {w}");
        let xsave = optional(index, "read the XSAVE area (KVM_GET_XSAVE)", fd.get_xsave());
        let fpu = if xsave.is_none() { Some(fd.get_fpu().map_err(StateError::kvm(what("FPU state")))?) } else { None };
        Ok(VcpuState {
            regs: fd.get_regs().map_err(StateError::kvm(what("registers")))?,
            sregs: fd.get_sregs().map_err(StateError::kvm(what("special registers")))?,
            xsave,
            fpu,
            xcrs: optional(index, "read the XCRs (KVM_GET_XCRS)", fd.get_xcrs()),
            msrs: read_msrs(fd, msr_indices)?,
            lapic: fd.get_lapic().map_err(StateError::kvm(what("local APIC")))?,
            events: fd.get_vcpu_events().map_err(StateError::kvm(what("pending events")))?,
            mp_state: fd.get_mp_state().map_err(StateError::kvm(what("MP state")))?,
            debugregs: optional(index, "read the debug registers (KVM_GET_DEBUGREGS)", fd.get_debug_regs()),
        })
    }

    /// Loads the state into a new vCPU that has not run (its CPUID already set).
    pub fn apply(&self, fd: &VcpuFd, index: u32) -> Result<(), StateError> {
        let what = |w: &str| format!("set vCPU {index}'s {w}");
        fd.set_mp_state(self.mp_state).map_err(StateError::kvm(what("MP state")))?;
        fd.set_regs(&self.regs).map_err(StateError::kvm(what("registers")))?;
        fd.set_sregs(&self.sregs).map_err(StateError::kvm(what("special registers")))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: a 4 KiB legacy XSAVE area as KVM_GET_XSAVE returned it (kvm_xsave is exactly that size),
            // so KVM reads only within it.
            unsafe { fd.set_xsave(xsave) }.map_err(StateError::kvm(what("XSAVE area")))?;
        }
        if let Some(fpu) = &self.fpu {
            fd.set_fpu(fpu).map_err(StateError::kvm(what("FPU state")))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(StateError::kvm(what("XCRs")))?;
        }
        if let Some(debugregs) = &self.debugregs {
            fd.set_debug_regs(debugregs).map_err(StateError::kvm(what("debug registers")))?;
        }
        fd.set_lapic(&self.lapic).map_err(StateError::kvm(what("local APIC")))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
            let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Unsupported(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(StateError::kvm(what("MSRs")))?;
            if n < chunk.len() {
                return Err(StateError::Mismatch(format!(
                    "this host's KVM refuses MSR {:#x} that the saved vCPU {index} had",
                    chunk[n].0
                )));
            }
        }
        fd.set_vcpu_events(&self.events).map_err(StateError::kvm(what("pending events")))?;
        Ok(())
    }

    pub fn save(&self, w: &mut Writer) {
        w.pod(&self.regs);
        w.pod(&self.sregs);
        w.bool(self.xsave.is_some());
        if let Some(x) = &self.xsave {
            w.pod(x);
        }
        w.bool(self.fpu.is_some());
        if let Some(f) = &self.fpu {
            save_fpu(w, f);
        }
        w.bool(self.xcrs.is_some());
        if let Some(x) = &self.xcrs {
            w.pod(x);
        }
        w.u32(self.msrs.len() as u32);
        for &(index, data) in &self.msrs {
            w.u32(index);
            w.u64(data);
        }
        w.pod(&self.lapic);
        w.pod(&self.events);
        w.pod(&self.mp_state);
        w.bool(self.debugregs.is_some());
        if let Some(d) = &self.debugregs {
            w.pod(d);
        }
    }

    pub fn load(r: &mut Reader) -> Result<Self, StateError> {
        let regs = r.pod()?;
        let sregs = r.pod()?;
        let xsave = if r.bool()? { Some(r.pod()?) } else { None };
        let fpu = if r.bool()? { Some(load_fpu(r)?) } else { None };
        let xcrs = if r.bool()? { Some(r.pod()?) } else { None };
        let n = r.u32()? as usize;
        if n > MAX_MSRS {
            return Err(StateError::Damaged(format!("a vCPU with {n} MSRs (at most {MAX_MSRS})")));
        }
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32()?, r.u64()?));
        }
        let lapic = r.pod()?;
        let events = r.pod()?;
        let mp_state = r.pod()?;
        let debugregs = if r.bool()? { Some(r.pod()?) } else { None };
        Ok(VcpuState { regs, sregs, xsave, fpu, xcrs, msrs, lapic, events, mp_state, debugregs })
    }
}

/// kvm_fpu field by field (kvm-bindings gives it no byte view).
fn save_fpu(w: &mut Writer, f: &kvm_fpu) {
    for r in &f.fpr {
        w.bytes(r);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for x in &f.xmm {
        w.bytes(x);
    }
    w.u32(f.mxcsr);
}

fn load_fpu(r: &mut Reader) -> Result<kvm_fpu, StateError> {
    let mut f = kvm_fpu::default();
    for reg in &mut f.fpr {
        *reg = r.fixed()?;
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.u8()?;
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for x in &mut f.xmm {
        *x = r.fixed()?;
    }
    f.mxcsr = r.u32()?;
    Ok(f)
}

/// The VM's in-kernel devices: both PICs, the IOAPIC, the PIT and kvmclock.
pub struct VmKvmState {
    pub irqchips: [kvm_irqchip; 3],
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

impl VmKvmState {
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, id) in irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            vm.get_irqchip(chip).map_err(StateError::kvm("read the PIC/IOAPIC state"))?;
        }
        Ok(VmKvmState {
            irqchips,
            pit: vm.get_pit2().map_err(StateError::kvm("read the PIT state"))?,
            clock: vm.get_clock().map_err(StateError::kvm("read kvmclock"))?,
        })
    }

    /// Loads the state into a new VM (before its vCPUs run). The clock is set to its saved value, so the
    /// guest sees no time pass while it was saved.
    pub fn apply(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_pit2(&self.pit).map_err(StateError::kvm("set the PIT state"))?;
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(StateError::kvm("set kvmclock"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(StateError::kvm("set the PIC/IOAPIC state"))?;
        }
        Ok(())
    }

    pub fn save(&self, w: &mut Writer) {
        for chip in &self.irqchips {
            w.pod(chip);
        }
        w.pod(&self.pit);
        w.pod(&self.clock);
    }

    pub fn load(r: &mut Reader) -> Result<Self, StateError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, id) in irqchips.iter_mut().zip(CHIPS) {
            *chip = r.pod()?;
            if chip.chip_id != id {
                return Err(StateError::Damaged(format!(
                    "section kvm: interrupt controller {} out of place",
                    chip.chip_id
                )));
            }
        }
        Ok(VmKvmState { irqchips, pit: r.pod()?, clock: r.pod()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_state_round_trips() {
        let mut fpu = kvm_fpu { fcw: 0x37F, mxcsr: 0x1F80, last_ip: 7, ..Default::default() };
        fpu.xmm[3][5] = 9;
        let state = VcpuState {
            regs: kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() },
            sregs: kvm_sregs { cr0: 0x8000_0011, ..Default::default() },
            xsave: None,
            fpu: Some(fpu),
            xcrs: Some(kvm_xcrs { nr_xcrs: 1, ..Default::default() }),
            msrs: vec![(0x10, 123_456), (0x4b56_4d01, 0x5000)],
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state { mp_state: 3 },
            debugregs: None,
        };
        let mut w = Writer::new();
        state.save(&mut w);
        let mut r = Reader::new("vcpu0", &w.buf);
        let back = VcpuState::load(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(back.regs, state.regs);
        assert_eq!(back.sregs, state.sregs);
        assert_eq!(back.fpu.unwrap().xmm, fpu.xmm);
        assert_eq!((back.fpu.unwrap().fcw, back.fpu.unwrap().mxcsr, back.fpu.unwrap().last_ip), (0x37F, 0x1F80, 7));
        assert_eq!(back.msrs, state.msrs);
        assert_eq!(back.mp_state.mp_state, 3);
        assert!(back.xsave.is_none() && back.debugregs.is_none() && back.xcrs.is_some());
        // Cut anywhere, it is an error, never a panic.
        for cut in 0..w.buf.len() {
            assert!(VcpuState::load(&mut Reader::new("vcpu0", &w.buf[..cut])).is_err());
        }
    }

    /// Whatever bytes a section holds (its checksum can be right for anything), decoding never panics or
    /// allocates beyond the bounds.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000 {
            let len = (next() % 8192) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && len >= 4 {
                // Plausible lengths up front, so decoding gets past the first field.
                data[..4].copy_from_slice(&(std::mem::size_of::<kvm_regs>() as u32).to_le_bytes());
            }
            let _ = VcpuState::load(&mut Reader::new("vcpu0", &data));
            let _ = VmKvmState::load(&mut Reader::new("kvm", &data));
        }
    }
}
