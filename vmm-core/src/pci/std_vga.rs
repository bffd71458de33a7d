//! The display as a PCI function: QEMU's "stdvga" (Bochs VBE) device, 1234:1111, class VGA. BAR 0 is the
//! video memory (16 MiB, prefetchable): a KVM memory slot that follows the BAR wherever firmware or the OS
//! places it; BAR 2 is a 4 KiB register window: the VGA ports 0x3C0-0x3DF at 0x400 and the DISPI registers
//! at 0x500 (16-bit, register n at 0x500 + 2n), as Linux's bochs-drm driver expects. The same registers
//! answer on the legacy ports (see `devices::vga` and `devices::dispi`), which SeaBIOS's vgabios uses.

use std::sync::{Arc, Mutex};

use super::PciDevice;
use super::config::{PciConfig, PciId};
use crate::devices::bus::lock;
use crate::devices::dispi::Dispi;
use crate::devices::{BusDevice, vga::Vga};

/// Size of the register BAR.
pub const MMIO_BAR_SIZE: u64 = 0x1000;
const VGA_PORTS_AT: u64 = 0x400;
const DISPI_AT: u64 = 0x500;
const DISPI_REGISTERS: u64 = 11;

/// Moves the video memory's KVM slot to a new guest address.
pub type MoveVram = Box<dyn FnMut(u64) + Send>;

/// Video memory behind a prefetchable memory BAR: a KVM memory slot that follows the BAR.
pub struct VramBar {
    /// Where the video memory slot is now.
    at: u64,
    bytes: u64,
    move_vram: MoveVram,
}

impl VramBar {
    /// Video memory of `bytes` mapped at `at`, moved by `move_vram`.
    pub fn new(at: u64, bytes: u64, move_vram: MoveVram) -> Self {
        VramBar { at, bytes, move_vram }
    }

    /// Declares the BAR as memory BAR `index` of `config`.
    pub fn declare(&self, config: &mut PciConfig, index: usize) {
        config.add_prefetchable_memory_bar(index, self.bytes, self.at);
    }

    /// After a configuration write: if BAR `index` now decodes somewhere new (and somewhere sane: the
    /// 32-bit hole below the IOAPIC), move the video memory there. While the BAR is being sized or
    /// decoding is off, the slot stays where it was.
    pub fn follow(&mut self, config: &PciConfig, index: usize) {
        let Some((address, _)) = config.memory_bar(index) else { return };
        let sane = address >= crate::layout::MMIO_HOLE_START
            && address.saturating_add(self.bytes) <= crate::layout::IOAPIC_BASE;
        if sane && address != self.at {
            (self.move_vram)(address);
            self.at = address;
        }
    }
}

pub struct StdVga {
    config: PciConfig,
    dispi: Arc<Mutex<Dispi>>,
    vga: Arc<Mutex<Vga>>,
    vram: VramBar,
}

impl StdVga {
    /// The device with video memory of `vram_bytes` mapped at `vram_at` and its register BAR at `mmio_at`.
    pub fn new(
        dispi: Arc<Mutex<Dispi>>,
        vga: Arc<Mutex<Vga>>,
        vram_at: u64,
        vram_bytes: u64,
        mmio_at: u64,
        move_vram: MoveVram,
    ) -> Self {
        let mut config = PciConfig::new(PciId {
            vendor: 0x1234,
            device: 0x1111,
            revision: 2,
            class: 0x03_00_00,
            subsystem_vendor: 0x1AF4,
            subsystem: 0x1100,
        });
        let vram = VramBar::new(vram_at, vram_bytes, move_vram);
        vram.declare(&mut config, 0);
        config.add_memory_bar(2, MMIO_BAR_SIZE, mmio_at);
        // Firmware-style: decoding on, as a VMM that placed the BARs leaves it.
        config.write(1, 0, &[0x03]);
        StdVga { config, dispi, vga, vram }
    }
}

impl PciDevice for StdVga {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == 1 || reg == 4 {
            self.vram.follow(&self.config, 0);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 2 {
            return; // BAR 0 is a memory slot: only reached in the instant it moves
        }
        match offset {
            o if (VGA_PORTS_AT..VGA_PORTS_AT + 0x20).contains(&o) => {
                for (i, b) in data.iter_mut().enumerate() {
                    let mut one = [0u8];
                    lock(&self.vga).read(o - VGA_PORTS_AT + i as u64, &mut one);
                    *b = one[0];
                }
            }
            o if (DISPI_AT..DISPI_AT + 2 * DISPI_REGISTERS).contains(&o) => {
                let value = lock(&self.dispi).read_register(((o - DISPI_AT) / 2) as usize);
                let bytes = value.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(((o - DISPI_AT) % 2) as usize + i).copied().unwrap_or(0);
                }
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 2 {
            return;
        }
        match offset {
            o if (VGA_PORTS_AT..VGA_PORTS_AT + 0x20).contains(&o) => {
                for (i, b) in data.iter().enumerate() {
                    lock(&self.vga).write(o - VGA_PORTS_AT + i as u64, &[*b]);
                }
            }
            o if (DISPI_AT..DISPI_AT + 2 * DISPI_REGISTERS).contains(&o) && o % 2 == 0 && data.len() >= 2 => {
                let value = u16::from_le_bytes([data[0], data[1]]);
                lock(&self.dispi).write_register(((o - DISPI_AT) / 2) as usize, value);
            }
            _ => {}
        }
    }

    fn save_state(&mut self, w: &mut crate::snapshot::Writer) -> Result<(), crate::snapshot::StateError> {
        self.config.save(w);
        w.u64(self.vram.at);
        Ok(())
    }

    /// The configuration space, and the video memory slot moved where BAR 0 was.
    fn restore_state(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        self.config.restore(r)?;
        let _saved_at = r.u64()?;
        self.vram.follow(&self.config, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn identifies_as_stdvga_and_moves_video_memory_with_bar0() {
        let version = Arc::new(AtomicU64::new(0));
        let dispi = Arc::new(Mutex::new(Dispi::new(1920, 1080, 16 << 20, version.clone())));
        let vga = Arc::new(Mutex::new(Vga::new(version)));
        let moved = Arc::new(Mutex::new(Vec::new()));
        let m = moved.clone();
        let mut d = StdVga::new(
            dispi.clone(),
            vga,
            0xE000_0000,
            16 << 20,
            0xC000_0000,
            Box::new(move |a| m.lock().unwrap().push(a)),
        );
        assert_eq!(d.config().read(0), 0x1111_1234);
        assert_eq!(d.config().read(2) >> 8, 0x03_00_00);
        assert_eq!(d.config().read(4), 0xE000_0008, "BAR 0: prefetchable, at the framebuffer");
        // Sizing, then a new address: only the final, decoding address moves the slot.
        d.config_write(4, 0, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(d.config().read(4), 0xFF00_0008, "16 MiB");
        d.config_write(4, 0, &0xFD00_0000u32.to_le_bytes());
        assert_eq!(*moved.lock().unwrap(), [0xFD00_0000]);
        // Not into RAM or over the IOAPIC.
        d.config_write(4, 0, &0x0100_0000u32.to_le_bytes());
        d.config_write(4, 0, &0xFF00_0000u32.to_le_bytes());
        assert_eq!(*moved.lock().unwrap(), [0xFD00_0000]);
        // DISPI through BAR 2: register 1 (XRES) at 0x502.
        d.bar_write(2, 0x502, &800u16.to_le_bytes());
        let mut v = [0u8; 2];
        d.bar_read(2, 0x502, &mut v);
        assert_eq!(u16::from_le_bytes(v), 800);
        d.bar_read(2, 0x500, &mut v);
        assert_eq!(u16::from_le_bytes(v), crate::devices::dispi::DISPI_ID5);
        // VGA ports through BAR 2: misc output (0x3C2 write, 0x3CC read).
        d.bar_write(2, 0x402, &[0x63]);
        let mut b = [0u8];
        d.bar_read(2, 0x40C, &mut b);
        assert_eq!(b, [0x63]);
    }
}
