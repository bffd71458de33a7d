//! MSI-X (PCI Local Bus 3.0 §6.8.2): a function's vector table and pending-bit array in one of its BARs,
//! and the capability that enables and masks them. Each vector is an eventfd bound (KVM irqfd) to a GSI of
//! its own, which [`GsiRouter`] routes to the address and data the guest wrote in the vector's table entry;
//! so a device's I/O thread interrupts the guest with one eventfd write, no exit and no shared line.
//!
//! Masking follows the specification: an interrupt of a masked vector (or with the function masked) sets
//! its pending bit, and unmasking delivers it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// The capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: message address (low, high), data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Message control bits (the capability's upper half of its first dword).
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const ENTRY_MASKED: u32 = 1;
/// GSIs of the in-kernel IOAPIC (and PIC); MSI routes take GSIs above.
const IRQCHIP_GSIS: u32 = 24;
/// KVM's irqchip numbers.
const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

/// The VM's GSI routing table: the irqchip pins KVM routes by default, plus an MSI route per vector that
/// has been given an address. `KVM_SET_GSI_ROUTING` replaces the whole table, so every change commits all.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
    next: AtomicU32,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter { vm, msi: Mutex::new(BTreeMap::new()), next: AtomicU32::new(IRQCHIP_GSIS) }
    }

    /// A GSI nobody uses yet.
    pub fn allocate(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Routes `gsi` to the message `address`/`data` (or to nothing) and commits the table.
    pub fn set_msi(&self, gsi: u32, route: Option<(u64, u32)>) {
        let mut msi = lock(&self.msi);
        let changed = match route {
            Some(r) => msi.insert(gsi, r) != Some(r),
            None => msi.remove(&gsi).is_some(),
        };
        if !changed {
            return;
        }
        let mut entries = Vec::new();
        for gsi in 0..IRQCHIP_GSIS {
            entries.push(irqchip_route(gsi, IRQCHIP_IOAPIC, gsi));
            if gsi < 16 {
                let chip = if gsi < 8 { IRQCHIP_PIC_MASTER } else { IRQCHIP_PIC_SLAVE };
                entries.push(irqchip_route(gsi, chip, gsi % 8));
            }
        }
        for (&gsi, &(address, data)) in msi.iter() {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi = kvm_irq_routing_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            };
            entries.push(e);
        }
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("{e:?}"))
            .and_then(|table| self.vm.set_gsi_routing(&table).map_err(|e| e.to_string()));
        if let Err(e) = result {
            log::warn!("cannot set the interrupt routing table ({e}); MSI-X interrupts may be lost");
        }
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

/// One vector's interrupt: an eventfd, bound to `gsi` when a router exists.
struct Vector {
    fd: EventFd,
    gsi: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

struct State {
    enabled: bool,
    function_masked: bool,
    entries: Vec<Entry>,
    pending: u64,
}

/// A function's MSI-X vectors (at most 64).
pub struct Msix {
    vectors: Vec<Vector>,
    router: Option<Arc<GsiRouter>>,
    state: Mutex<State>,
}

/// Most vectors a function has here.
pub const MAX_VECTORS: usize = 64;

impl Msix {
    /// `count` vectors, masked, the function's MSI-X disabled. With `router`, each vector's eventfd is a KVM
    /// irqfd on a GSI of its own; without (unit tests), firing only writes the eventfd.
    pub fn new(count: usize, router: Option<Arc<GsiRouter>>) -> std::io::Result<Msix> {
        let count = count.clamp(1, MAX_VECTORS);
        let mut vectors = Vec::with_capacity(count);
        for _ in 0..count {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            let gsi = match &router {
                Some(r) => {
                    let gsi = r.allocate();
                    r.vm().register_irqfd(&fd, gsi).map_err(std::io::Error::other)?;
                    Some(gsi)
                }
                None => None,
            };
            vectors.push(Vector { fd, gsi });
        }
        let entries = vec![Entry { control: ENTRY_MASKED, ..Entry::default() }; count];
        Ok(Msix {
            vectors,
            router,
            state: Mutex::new(State { enabled: false, function_masked: false, entries, pending: 0 }),
        })
    }

    pub fn count(&self) -> usize {
        self.vectors.len()
    }

    /// The capability's bytes (ID, next, message control, table and PBA locations in BAR `bar`).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = CAPABILITY_ID;
        c[2..4].copy_from_slice(&((self.count() - 1) as u16).to_le_bytes());
        c[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        c[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        c
    }

    /// Whether the guest enabled MSI-X (then the function's INTx line stays quiet).
    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// The vector eventfd (unit tests watch it).
    pub fn vector_fd(&self, vector: usize) -> Option<&EventFd> {
        self.vectors.get(vector).map(|v| &v.fd)
    }

    /// Interrupts through `vector`: at once, or as a pending bit while it (or the function) is masked.
    pub fn fire(&self, vector: u16) {
        let v = usize::from(vector);
        let Some(target) = self.vectors.get(v) else { return };
        let mut state = lock(&self.state);
        if state.function_masked || state.entries[v].control & ENTRY_MASKED != 0 {
            state.pending |= 1 << v;
            return;
        }
        drop(state);
        let _ = target.fd.write(1);
    }

    /// The guest wrote the message control word.
    pub fn write_control(&self, control: u16) {
        let mut state = lock(&self.state);
        state.enabled = control & CONTROL_ENABLE != 0;
        state.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_unmasked(&mut state);
    }

    /// Fires what is pending and no longer masked.
    fn deliver_unmasked(&self, state: &mut State) {
        if state.function_masked || state.pending == 0 {
            return;
        }
        for (v, entry) in state.entries.iter().enumerate() {
            if state.pending & (1 << v) != 0 && entry.control & ENTRY_MASKED == 0 {
                state.pending &= !(1 << v);
                let _ = self.vectors[v].fd.write(1);
            }
        }
    }

    /// A guest read of the vector table (dword or qword accesses).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let state = lock(&self.state);
        let Some(entry) = state.entries.get((offset / ENTRY_SIZE) as usize) else { return };
        let mut bytes = [0u8; ENTRY_SIZE as usize];
        bytes[0..8].copy_from_slice(&entry.address.to_le_bytes());
        bytes[8..12].copy_from_slice(&entry.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&entry.control.to_le_bytes());
        let at = (offset % ENTRY_SIZE) as usize;
        if let Some(b) = bytes.get(at..at + data.len()) {
            data.copy_from_slice(b);
        }
    }

    /// A guest write to the vector table: a new message re-routes the vector's GSI; unmasking delivers
    /// what is pending.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        let at = (offset % ENTRY_SIZE) as usize;
        let mut state = lock(&self.state);
        let Some(entry) = state.entries.get_mut(index) else { return };
        let mut bytes = [0u8; ENTRY_SIZE as usize];
        bytes[0..8].copy_from_slice(&entry.address.to_le_bytes());
        bytes[8..12].copy_from_slice(&entry.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&entry.control.to_le_bytes());
        let Some(target) = bytes.get_mut(at..at + data.len()) else { return };
        target.copy_from_slice(data);
        let old = *entry;
        entry.address = u64::from_le_bytes(bytes[0..8].try_into().unwrap_or_default());
        entry.data = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
        entry.control = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default()) & ENTRY_MASKED;
        let new = *entry;
        if (new.address, new.data) != (old.address, old.data)
            && let (Some(router), Some(gsi)) = (&self.router, self.vectors[index].gsi)
        {
            router.set_msi(gsi, Some((new.address, new.data)));
        }
        self.deliver_unmasked(&mut state);
    }

    /// A guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let pending = lock(&self.state).pending.to_le_bytes();
        data.fill(0);
        let at = offset as usize;
        if let Some(b) = pending.get(at..at + data.len()) {
            data.copy_from_slice(b);
        }
    }

    /// The vectors' state for a machine-state file: enable and function mask, the table, the pending bits.
    pub fn save(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.state);
        w.bool(state.enabled);
        w.bool(state.function_masked);
        w.u32(state.entries.len() as u32);
        for e in &state.entries {
            w.u64(e.address);
            w.u32(e.data);
            w.u32(e.control);
        }
        w.u64(state.pending);
    }

    /// Loads what [`save`](Self::save) wrote and routes every vector's GSI to its message again.
    pub fn restore(&self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (enabled, function_masked) = (r.bool()?, r.bool()?);
        let n = r.u32()? as usize;
        if n != self.vectors.len() {
            return Err(crate::snapshot::StateError::Damaged(format!(
                "{n} MSI-X vectors, this device has {}",
                self.vectors.len()
            )));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(Entry { address: r.u64()?, data: r.u32()?, control: r.u32()? & ENTRY_MASKED });
        }
        let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        let pending = r.u64()? & mask;
        let mut state = lock(&self.state);
        for (v, e) in entries.iter().enumerate() {
            if let (Some(router), Some(gsi)) = (&self.router, self.vectors[v].gsi)
                && (e.address, e.data) != (0, 0)
            {
                router.set_msi(gsi, Some((e.address, e.data)));
            }
        }
        *state = State { enabled, function_masked, entries, pending };
        Ok(())
    }

    /// Device reset: disabled, every vector masked, nothing pending (routes stay until rewritten).
    pub fn reset(&self) {
        let mut state = lock(&self.state);
        state.enabled = false;
        state.function_masked = false;
        state.pending = 0;
        for e in &mut state.entries {
            *e = Entry { control: ENTRY_MASKED, ..Entry::default() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(m: &Msix, v: usize) -> bool {
        m.vector_fd(v).unwrap().read().is_ok()
    }

    #[test]
    fn masked_vectors_pend_and_unmasking_delivers() {
        let m = Msix::new(3, None).unwrap();
        m.write_control(CONTROL_ENABLE);
        assert!(m.enabled());
        m.fire(1);
        assert!(!fired(&m, 1), "vectors start masked");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b010);
        // Program entry 1 (address, data), then unmask it: the pending interrupt arrives.
        m.write_table(16, &0xFEE0_0000u32.to_le_bytes());
        m.write_table(16 + 8, &0x4041u32.to_le_bytes());
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(fired(&m, 1));
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        let mut entry = [0u8; 16];
        m.read_table(16, &mut entry);
        assert_eq!(u32::from_le_bytes(entry[0..4].try_into().unwrap()), 0xFEE0_0000);
        assert_eq!(u32::from_le_bytes(entry[8..12].try_into().unwrap()), 0x4041);
        // The function mask holds everything back until cleared.
        m.write_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.fire(1);
        assert!(!fired(&m, 1));
        m.write_control(CONTROL_ENABLE);
        assert!(fired(&m, 1));
    }

    #[test]
    fn out_of_range_accesses_are_ignored() {
        let m = Msix::new(2, None).unwrap();
        m.fire(7);
        m.write_table(1 << 20, &[1, 2, 3, 4]);
        m.write_table(30, &[0xFF; 8]);
        let mut d = [0xAAu8; 8];
        m.read_table(1 << 20, &mut d);
        assert_eq!(d, [0; 8]);
        m.read_pba(4096, &mut d);
        assert_eq!(d, [0; 8]);
        m.reset();
        assert!(!m.enabled());
    }
}
