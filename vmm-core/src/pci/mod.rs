//! A PCI bus 0 behind an i440FX-style host bridge: configuration mechanism #1 (address at 0xCF8, data at
//! 0xCFC–0xCFF), memory BARs in a 32-bit window below the framebuffer, and INTA# of each slot wired to its
//! own IOAPIC input (see [`slot_gsi`]; the DSDT's `_PRT` says the same).
//!
//! Devices implement [`PciDevice`]. BARs are placed by the VMM when the bus is built (as firmware would);
//! a guest that moves them is followed, because MMIO in the window is dispatched by the BARs' current
//! values.

pub mod config;
pub mod hda;
pub mod hda_codec;
pub mod msix;
pub mod std_vga;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::devices::bus::{UnhandledCounts, lock};
use crate::devices::reset_control::ResetControl;
use crate::devices::{BusDevice, MachineControl};
use config::{PciConfig, PciId};

/// Configuration address port and the data ports after it; 0xCF9 (a byte access) is the reset register.
pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
pub const CONFIG_PORTS_LEN: u64 = 8;
/// Where BARs are placed: 0xC000_0000 up to the framebuffer.
pub const BAR_WINDOW_START: u64 = crate::layout::MMIO_HOLE_START;
pub const BAR_WINDOW_END: u64 = crate::display::LFB_BASE;
/// What the MMIO bus routes to the PCI bus: the whole hole up to the IOAPIC (the framebuffer inside it is a
/// KVM memory slot and never reaches the bus).
pub const MMIO_WINDOW_START: u64 = crate::layout::MMIO_HOLE_START;
pub const MMIO_WINDOW_END: u64 = crate::layout::IOAPIC_BASE;
/// Slots on bus 0.
pub const SLOTS: usize = 32;
/// First IOAPIC input used for PCI interrupts (0–15 are the ISA IRQs).
pub const FIRST_PCI_GSI: u32 = 16;
/// IOAPIC inputs for PCI (KVM's IOAPIC has 24).
pub const PCI_GSIS: u32 = 8;

/// The IOAPIC input INTA# of `slot` is wired to.
pub fn slot_gsi(slot: usize) -> u32 {
    FIRST_PCI_GSI + (slot as u32 % PCI_GSIS)
}

/// A PCI function (function 0 of its slot).
pub trait PciDevice: Send {
    /// Its configuration header.
    fn config(&self) -> &PciConfig;
    /// Reads configuration register `reg` (a dword index, 0..64).
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config().read(reg)
    }
    /// Writes `data` at byte `offset` of configuration register `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// A read at `offset` in memory BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write at `offset` in memory BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Its state for a machine-state file; a device that cannot be saved says so (and nothing is saved).
    fn save_state(&mut self, _w: &mut crate::snapshot::Writer) -> Result<(), crate::snapshot::StateError> {
        Err(crate::snapshot::StateError::Unsupported(format!(
            "the PCI device {:04x}:{:04x} cannot be saved",
            self.config().read(0) & 0xFFFF,
            self.config().read(0) >> 16
        )))
    }
    /// After [`save_state`](Self::save_state), once the state is written: the device may work again.
    fn resume_after_save(&mut self) {}
    /// Loads what [`save_state`](Self::save_state) wrote.
    fn restore_state(&mut self, _r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        Err(crate::snapshot::StateError::Unsupported("this PCI device cannot be restored".into()))
    }
}

/// The host bridge at 00:00.0 (Intel 440FX, as QEMU's `pc` machine and SeaBIOS know it).
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: PciConfig::new(PciId {
                vendor: 0x8086,
                device: 0x1237,
                revision: 2,
                class: 0x06_00_00,
                subsystem_vendor: 0x1AF4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}

    fn save_state(&mut self, w: &mut crate::snapshot::Writer) -> Result<(), crate::snapshot::StateError> {
        self.config.save(w);
        Ok(())
    }

    fn restore_state(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        self.config.restore(r)
    }
}

/// Why a device could not be put on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("every PCI slot is taken ({SLOTS})")]
    NoSlot,
    #[error("the PCI memory window has no room for a {0:#x}-byte BAR")]
    NoBarSpace(u64),
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: its devices by slot, and the allocator that places their BARs.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
    next_bar: u64,
    unhandled: Arc<UnhandledCounts>,
}

impl PciBus {
    /// A bus with the host bridge in slot 0. MMIO in the window that no BAR decodes is added to `unhandled`.
    pub fn new(unhandled: Arc<UnhandledCounts>) -> Self {
        let mut slots = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as SharedPciDevice);
        PciBus { slots, next_bar: BAR_WINDOW_START, unhandled }
    }

    /// The next free slot.
    pub fn free_slot(&self) -> Result<usize, PciError> {
        self.slots.iter().position(Option::is_none).ok_or(PciError::NoSlot)
    }

    /// Reserves `size` bytes (a power of two) of the BAR window, aligned to `size`.
    pub fn allocate_bar(&mut self, size: u64) -> Result<u64, PciError> {
        let address = self.next_bar.next_multiple_of(size);
        if address.checked_add(size).is_none_or(|end| end > BAR_WINDOW_END) {
            return Err(PciError::NoBarSpace(size));
        }
        self.next_bar = address + size;
        Ok(address)
    }

    /// Puts `device` in `slot` (from [`free_slot`](Self::free_slot)).
    pub fn insert(&mut self, slot: usize, device: SharedPciDevice) -> Result<(), PciError> {
        match self.slots.get_mut(slot) {
            Some(entry @ None) => {
                *entry = Some(device);
                Ok(())
            }
            _ => Err(PciError::NoSlot),
        }
    }

    /// The state of every device, by slot (for a machine-state file); fails if one cannot be saved.
    pub fn save_state(&self, w: &mut crate::snapshot::Writer) -> Result<(), crate::snapshot::StateError> {
        let used: Vec<(usize, &SharedPciDevice)> =
            self.slots.iter().enumerate().filter_map(|(i, d)| Some((i, d.as_ref()?))).collect();
        w.u32(used.len() as u32);
        for (slot, device) in used {
            let mut one = crate::snapshot::Writer::new();
            lock(device).save_state(&mut one)?;
            w.u8(slot as u8);
            w.bytes(&one.buf);
        }
        Ok(())
    }

    /// Lets every device work again after [`save_state`](Self::save_state) (also after a failed one).
    pub fn resume_after_save(&self) {
        for device in self.slots.iter().flatten() {
            lock(device).resume_after_save();
        }
    }

    /// Loads what [`save_state`](Self::save_state) wrote: the same slots must be occupied.
    pub fn restore_state(&self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let used: Vec<usize> = self.slots.iter().enumerate().filter(|(_, d)| d.is_some()).map(|(i, _)| i).collect();
        let n = r.u32()? as usize;
        if n != used.len() {
            return Err(crate::snapshot::StateError::Damaged(format!(
                "section pci: {n} devices, this VM has {}",
                used.len()
            )));
        }
        for slot in used {
            let saved = usize::from(r.u8()?);
            if saved != slot {
                return Err(crate::snapshot::StateError::Damaged(format!(
                    "section pci: a device in slot {saved}, this VM's is in slot {slot}"
                )));
            }
            let data = r.bytes(crate::snapshot::MAX_SECTION as usize)?;
            let mut one = crate::snapshot::Reader::new("pci", data);
            if let Some(device) = self.device(slot) {
                lock(device).restore_state(&mut one)?;
            }
            one.finish()?;
        }
        Ok(())
    }

    fn device(&self, slot: usize) -> Option<&SharedPciDevice> {
        self.slots.get(slot)?.as_ref()
    }

    fn mmio(&self, address: u64, access: impl FnOnce(&mut dyn PciDevice, usize, u64)) -> bool {
        for device in self.slots.iter().flatten() {
            let mut device = lock(device);
            if let Some((bar, offset)) = device.config().find_bar(address) {
                access(&mut *device, bar, offset);
                return true;
            }
        }
        false
    }
}

/// Configuration mechanism #1 on ports 0xCF8–0xCFF, with the reset control register at 0xCF9.
pub struct PciConfigPorts {
    bus: Arc<PciBus>,
    address: u32,
    reset: ResetControl,
}

impl PciConfigPorts {
    pub fn new(bus: Arc<PciBus>, machine: MachineControl) -> Self {
        PciConfigPorts { bus, address: 0, reset: ResetControl::new(machine) }
    }

    /// The device and register the address latch selects, if it selects one on bus 0, function 0.
    fn selected(&self) -> Option<(&SharedPciDevice, usize)> {
        let a = self.address;
        let (enabled, bus, slot, function, reg) =
            (a >> 31 != 0, (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, ((a >> 2) & 0x3F) as usize);
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        Some((self.bus.device(slot as usize)?, reg))
    }
}

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (1, 1) => self.reset.read(0, data),
            (4..=7, _) => {
                let value = match self.selected() {
                    Some((device, reg)) => lock(device).config_read(reg),
                    None => 0xFFFF_FFFF,
                };
                let bytes = value.to_le_bytes();
                let start = (offset - 4) as usize;
                match bytes.get(start..start + data.len()) {
                    Some(b) => data.copy_from_slice(b),
                    None => data.fill(0xFF),
                }
            }
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80FF_FFFC,
            (1, 1) => self.reset.write(0, data),
            (4..=7, _) => {
                let start = (offset - 4) as usize;
                if start + data.len() <= 4
                    && let Some((device, reg)) = self.selected()
                {
                    lock(device).config_write(reg, start, data);
                }
            }
            _ => {}
        }
    }
}

/// MMIO in the PCI window, routed to whichever BAR decodes the address.
pub struct PciMmioWindow {
    bus: Arc<PciBus>,
}

impl PciMmioWindow {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciMmioWindow { bus }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let address = MMIO_WINDOW_START + offset;
        let mut hit = false;
        self.bus.mmio(address, |device, bar, off| {
            device.bar_read(bar, off, data);
            hit = true;
        });
        if !hit {
            data.fill(0xFF);
            self.bus.unhandled.reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let address = MMIO_WINDOW_START + offset;
        if !self.bus.mmio(address, |device, bar, off| device.bar_write(bar, off, data)) {
            self.bus.unhandled.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl crate::snapshot::DeviceState for PciConfigPorts {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u32(self.address);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        self.address = r.u32()? & 0x80FF_FFFC;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::MachineRequest;

    /// A device with one 4 KiB BAR of scratch memory.
    struct Scratch {
        config: PciConfig,
        bytes: Vec<u8>,
    }

    impl PciDevice for Scratch {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
            self.config.write(reg, offset, data);
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.bytes[o..o + data.len()]);
        }
        fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.bytes[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn machine() -> (Arc<PciBus>, PciConfigPorts, PciMmioWindow, MachineControl) {
        let mut bus = PciBus::new(Arc::default());
        let slot = bus.free_slot().unwrap();
        assert_eq!(slot, 1);
        let address = bus.allocate_bar(0x1000).unwrap();
        assert_eq!(address, BAR_WINDOW_START);
        let mut config = PciConfig::new(PciId {
            vendor: 0x1AF4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1AF4,
            subsystem: 2,
        });
        config.add_memory_bar(0, 0x1000, address);
        bus.insert(slot, Arc::new(Mutex::new(Scratch { config, bytes: vec![0; 0x1000] }))).unwrap();
        let bus = Arc::new(bus);
        let m = MachineControl::new().unwrap();
        (bus.clone(), PciConfigPorts::new(bus.clone(), m.clone()), PciMmioWindow::new(bus), m)
    }

    fn config_read(ports: &mut PciConfigPorts, slot: u32, reg: u32) -> u32 {
        ports.write(0, &(0x8000_0000 | (slot << 11) | (reg << 2)).to_le_bytes());
        let mut v = [0; 4];
        ports.read(4, &mut v);
        u32::from_le_bytes(v)
    }

    /// A device without machine-state support makes the whole save fail, naming it; the host bridge's
    /// configuration (the guest-writable bits only) round-trips.
    #[test]
    fn a_device_that_cannot_be_saved_fails_the_save_and_the_bridge_round_trips() {
        let (bus, _, _, _) = machine();
        let mut w = crate::snapshot::Writer::new();
        let err = bus.save_state(&mut w).unwrap_err().to_string();
        assert!(err.contains("1af4:1042") && err.contains("cannot be saved"), "{err}");

        let mut bridge = HostBridge::new();
        bridge.config_write(1, 0, &[0x07, 0x00]);
        let mut w = crate::snapshot::Writer::new();
        bridge.save_state(&mut w).unwrap();
        let mut other = HostBridge::new();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        other.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        for reg in 0..64 {
            assert_eq!(other.config().read(reg), bridge.config().read(reg), "register {reg}");
        }
    }

    #[test]
    fn enumerates_the_host_bridge_and_the_device() {
        let (_, mut ports, _, _) = machine();
        assert_eq!(config_read(&mut ports, 0, 0), 0x1237_8086);
        assert_eq!(config_read(&mut ports, 0, 2) >> 8, 0x06_00_00);
        assert_eq!(config_read(&mut ports, 1, 0), 0x1042_1AF4);
        assert_eq!(config_read(&mut ports, 2, 0), 0xFFFF_FFFF, "an empty slot");
        // Function 1 and bus 1 are empty; a disabled address reads nothing.
        ports.write(0, &(0x8000_0000u32 | (1 << 11) | (1 << 8)).to_le_bytes());
        let mut v = [0; 4];
        ports.read(4, &mut v);
        assert_eq!(v, [0xFF; 4]);
        ports.write(0, &(0x8001_0000u32).to_le_bytes());
        ports.read(4, &mut v);
        assert_eq!(v, [0xFF; 4]);
        // Byte and word reads of the data port.
        ports.write(0, &(0x8000_0000u32 | (1 << 11)).to_le_bytes());
        let mut w = [0; 2];
        ports.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
    }

    #[test]
    fn mmio_follows_the_bar_and_the_memory_enable_bit() {
        let (bus, mut ports, mut window, _) = machine();
        let base = BAR_WINDOW_START - MMIO_WINDOW_START;
        window.write(base + 8, &[1, 2, 3, 4]);
        assert_eq!(bus.unhandled.writes.load(Ordering::Relaxed), 1, "memory decoding is off");
        ports.write(0, &(0x8000_0000u32 | (1 << 11) | (1 << 2)).to_le_bytes());
        ports.write(4, &[0x06, 0]);
        window.write(base + 8, &[1, 2, 3, 4]);
        let mut v = [0; 4];
        window.read(base + 8, &mut v);
        assert_eq!(v, [1, 2, 3, 4]);
        // The guest moves the BAR: the old address is dead, the new one decodes.
        ports.write(0, &(0x8000_0000u32 | (1 << 11) | (4 << 2)).to_le_bytes());
        ports.write(4, &0xD000_0000u32.to_le_bytes());
        window.read(base + 8, &mut v);
        assert_eq!(v, [0xFF; 4]);
        window.read(0xD000_0000 - MMIO_WINDOW_START + 8, &mut v);
        assert_eq!(v, [1, 2, 3, 4]);
    }

    #[test]
    fn a_byte_at_0xcf9_is_the_reset_register() {
        let (_, mut ports, _, machine) = machine();
        ports.write(0, &(0x8000_0000u32).to_le_bytes());
        ports.write(1, &[0x06]);
        assert_eq!(machine.take(), MachineRequest::Reset);
        let mut v = [0; 4];
        ports.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x8000_0000, "the address latch is untouched");
    }

    #[test]
    fn the_bar_window_runs_out_cleanly() {
        let mut bus = PciBus::new(Arc::default());
        assert_eq!(bus.allocate_bar(0x1000_0000).unwrap(), 0xC000_0000);
        assert_eq!(bus.allocate_bar(0x1000_0000).unwrap(), 0xD000_0000);
        assert_eq!(bus.allocate_bar(0x1000), Err(PciError::NoBarSpace(0x1000)));
    }
}
