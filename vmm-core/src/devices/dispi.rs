//! The Bochs VBE "DISPI" display interface: index port 0x1CE, data port 0x1CF (16-bit registers), as
//! Bochs, QEMU's stdvga and SeaBIOS's vgabios use it. It selects the resolution and depth of the linear
//! framebuffer; enabling it is the "graphics-mode register write" on which the console switches from VGA
//! text to the framebuffer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BusDevice;

pub const DISPI_INDEX_PORT: u16 = 0x1CE;
/// Index and data ports (data at +1, 16-bit wide, so three bytes are claimed).
pub const DISPI_PORT_LEN: u64 = 3;

pub const DISPI_ID5: u16 = 0xB0C5;
pub const ENABLED: u16 = 0x01;
pub const LFB_ENABLED: u16 = 0x40;
pub const NO_CLEAR_MEM: u16 = 0x80;
/// Written with the enable register: XRES, YRES and BPP then read back their maxima (how a VGA BIOS
/// learns what the display can do).
pub const GETCAPS: u16 = 0x02;

const INDEX_ID: usize = 0;
const INDEX_XRES: usize = 1;
const INDEX_YRES: usize = 2;
const INDEX_BPP: usize = 3;
const INDEX_ENABLE: usize = 4;
const INDEX_BANK: usize = 5;
const INDEX_VIRT_WIDTH: usize = 6;
const INDEX_VIRT_HEIGHT: usize = 7;
const INDEX_X_OFFSET: usize = 8;
const INDEX_Y_OFFSET: usize = 9;
const INDEX_VIDEO_MEMORY_64K: usize = 10;

/// Bits per pixel the console can show.
pub const SUPPORTED_BPP: [u16; 2] = [24, 32];

/// A graphics mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphicsMode {
    pub width: u32,
    pub height: u32,
    pub bpp: u32,
    /// Bytes per line in video memory.
    pub stride: u32,
    /// Byte offset of the visible origin in video memory.
    pub offset: u64,
}

/// The register file. `version` counts writes, so the console notices mode changes cheaply.
pub struct Dispi {
    index: u16,
    regs: [u16; 11],
    max_width: u16,
    max_height: u16,
    vram_bytes: u64,
    version: Arc<AtomicU64>,
    /// GETCAPS is set: the resolution and depth registers read their maxima.
    caps: bool,
}

impl Dispi {
    pub fn new(max_width: u16, max_height: u16, vram_bytes: u64, version: Arc<AtomicU64>) -> Self {
        let mut regs = [0u16; 11];
        regs[INDEX_ID] = DISPI_ID5;
        regs[INDEX_BPP] = 32;
        regs[INDEX_VIDEO_MEMORY_64K] = (vram_bytes >> 16).min(u64::from(u16::MAX)) as u16;
        Dispi { index: 0, regs, max_width, max_height, vram_bytes, version, caps: false }
    }

    /// Sets a mode as firmware would before handing over to an OS (for Linux booted with a VLFB).
    pub fn set_mode(&mut self, width: u16, height: u16, bpp: u16) {
        self.regs[INDEX_XRES] = width;
        self.regs[INDEX_YRES] = height;
        self.regs[INDEX_BPP] = bpp;
        self.regs[INDEX_VIRT_WIDTH] = width;
        self.regs[INDEX_VIRT_HEIGHT] = height;
        self.regs[INDEX_ENABLE] = ENABLED | LFB_ENABLED;
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The current graphics mode, or None in VGA (text) mode or for a mode the console cannot show.
    pub fn mode(&self) -> Option<GraphicsMode> {
        let r = &self.regs;
        if r[INDEX_ENABLE] & ENABLED == 0 || !SUPPORTED_BPP.contains(&r[INDEX_BPP]) {
            return None;
        }
        let (width, height) = (u32::from(r[INDEX_XRES]), u32::from(r[INDEX_YRES]));
        if width == 0 || height == 0 {
            return None;
        }
        let bytes_pp = u32::from(r[INDEX_BPP]) / 8;
        let virt_width = u32::from(r[INDEX_VIRT_WIDTH]).max(width);
        let stride = virt_width * bytes_pp;
        let offset =
            u64::from(r[INDEX_Y_OFFSET]) * u64::from(stride) + u64::from(r[INDEX_X_OFFSET]) * u64::from(bytes_pp);
        // The visible area must lie inside video memory.
        let end = offset + u64::from(stride) * u64::from(height - 1) + u64::from(width * bytes_pp);
        (end <= self.vram_bytes).then_some(GraphicsMode { width, height, bpp: u32::from(r[INDEX_BPP]), stride, offset })
    }

    /// Reads register `index` (as the data port does after the index port selected it).
    pub fn read_register(&self, index: usize) -> u16 {
        match index {
            INDEX_XRES if self.caps => self.max_width,
            INDEX_YRES if self.caps => self.max_height,
            INDEX_BPP if self.caps => 32,
            _ => self.regs.get(index).copied().unwrap_or(0),
        }
    }

    /// Writes register `index`.
    pub fn write_register(&mut self, index: usize, value: u16) {
        let r = &mut self.regs;
        match index {
            INDEX_ID => r[INDEX_ID] = value.clamp(0xB0C0, DISPI_ID5),
            INDEX_XRES => r[INDEX_XRES] = value.min(self.max_width),
            INDEX_YRES => r[INDEX_YRES] = value.min(self.max_height),
            INDEX_BPP => r[INDEX_BPP] = if [8, 15, 16, 24, 32].contains(&value) { value } else { 32 },
            INDEX_ENABLE => {
                self.caps = value & GETCAPS != 0;
                r[INDEX_ENABLE] = value & (ENABLED | LFB_ENABLED | NO_CLEAR_MEM);
                if value & ENABLED != 0 {
                    // Enabling resets the virtual size and panning, as Bochs does.
                    r[INDEX_VIRT_WIDTH] = r[INDEX_XRES];
                    r[INDEX_VIRT_HEIGHT] = r[INDEX_YRES];
                    r[INDEX_X_OFFSET] = 0;
                    r[INDEX_Y_OFFSET] = 0;
                }
            }
            INDEX_BANK => r[INDEX_BANK] = value,
            INDEX_VIRT_WIDTH => r[INDEX_VIRT_WIDTH] = value.min(self.max_width.saturating_mul(2)),
            INDEX_VIRT_HEIGHT => r[INDEX_VIRT_HEIGHT] = value,
            INDEX_X_OFFSET => r[INDEX_X_OFFSET] = value,
            INDEX_Y_OFFSET => r[INDEX_Y_OFFSET] = value,
            _ => return, // read-only or unknown
        }
        self.version.fetch_add(1, Ordering::Release);
    }
}

impl BusDevice for Dispi {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.index,
            1 => self.read_register(usize::from(self.index)),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (d, b) in data.iter_mut().zip(bytes) {
            *d = b;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = match data {
            [lo] => u16::from(*lo),
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [] => return,
        };
        match offset {
            0 => self.index = value,
            1 => self.write_register(usize::from(self.index), value),
            _ => {}
        }
    }
}

impl crate::snapshot::DeviceState for Dispi {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u16(self.index);
        for reg in self.regs {
            w.u16(reg);
        }
        w.bool(self.caps);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let index = r.u16()?;
        let mut regs = [0u16; 11];
        for reg in &mut regs {
            *reg = r.u16()?;
        }
        let caps = r.bool()?;
        (self.index, self.regs, self.caps) = (index, regs, caps);
        // The console redraws with the restored mode.
        self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispi() -> Dispi {
        Dispi::new(1920, 1080, 16 << 20, Arc::default())
    }

    fn set(d: &mut Dispi, index: u16, value: u16) {
        d.write(0, &index.to_le_bytes());
        d.write(1, &value.to_le_bytes());
    }

    fn get(d: &mut Dispi, index: u16) -> u16 {
        d.write(0, &index.to_le_bytes());
        let mut v = [0; 2];
        d.read(1, &mut v);
        u16::from_le_bytes(v)
    }

    #[test]
    fn identifies_and_sets_a_mode() {
        let mut d = dispi();
        assert_eq!(get(&mut d, 0), DISPI_ID5);
        assert_eq!(d.mode(), None, "VGA mode at power-on");
        set(&mut d, 1, 1280);
        set(&mut d, 2, 800);
        set(&mut d, 3, 32);
        assert_eq!(d.mode(), None, "not enabled yet");
        set(&mut d, 4, ENABLED | LFB_ENABLED);
        assert_eq!(d.mode(), Some(GraphicsMode { width: 1280, height: 800, bpp: 32, stride: 5120, offset: 0 }));
        assert_eq!(get(&mut d, 10), 256, "16 MiB of video memory");
        set(&mut d, 9, 10); // pan down 10 lines
        assert_eq!(d.mode().unwrap().offset, 51_200);
    }

    #[test]
    fn absurd_values_are_clamped_or_refused() {
        let mut d = dispi();
        set(&mut d, 1, 60_000);
        set(&mut d, 2, 60_000);
        set(&mut d, 3, 7);
        set(&mut d, 4, 0xFFFF);
        let mode = d.mode().unwrap();
        assert_eq!((mode.width, mode.height, mode.bpp), (1920, 1080, 32));
        set(&mut d, 9, 0xFFFF); // panned past video memory
        assert_eq!(d.mode(), None);
        set(&mut d, 0x77, 1);
        assert_eq!(get(&mut d, 0x77), 0);
    }
}
