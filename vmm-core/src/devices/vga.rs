//! The VGA registers a text-mode console needs: the CRT controller's index/data pair at 0x3D4/0x3D5 (cursor
//! position and shape, start address) and input status 1 at 0x3DA (retrace bits toggle, so guests that
//! wait for vertical retrace do not hang). The text itself is guest RAM at 0xB8000 (see `display`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BusDevice;

/// First port claimed: 0x3C0 (attribute controller) .. 0x3DF.
pub const VGA_PORT: u16 = 0x3C0;
pub const VGA_PORT_LEN: u64 = 0x20;

const CRTC_INDEX: u64 = 0x14; // 0x3D4
const CRTC_DATA: u64 = 0x15; // 0x3D5
const INPUT_STATUS_1: u64 = 0x1A; // 0x3DA
const MISC_OUTPUT_READ: u64 = 0x0C; // 0x3CC

/// The cursor as the console draws it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextCursor {
    /// Cell index (row * 80 + column).
    pub position: u16,
    /// First and last scan line of the cursor block (0..15), or None when disabled.
    pub lines: Option<(u8, u8)>,
    /// Cell offset of the displayed page (start address registers).
    pub start: u16,
}

pub struct Vga {
    crtc_index: u8,
    crtc: [u8; 0x19],
    retrace: u8,
    version: Arc<AtomicU64>,
}

impl Vga {
    pub fn new(version: Arc<AtomicU64>) -> Self {
        let mut crtc = [0u8; 0x19];
        crtc[0x0A] = 0x0D; // cursor start line (a two-line underline, as the BIOS sets it)
        crtc[0x0B] = 0x0E; // cursor end line
        Vga { crtc_index: 0, crtc, retrace: 0, version }
    }

    pub fn cursor(&self) -> TextCursor {
        let position = u16::from_be_bytes([self.crtc[0x0E], self.crtc[0x0F]]);
        let start = u16::from_be_bytes([self.crtc[0x0C], self.crtc[0x0D]]);
        let (first, last) = (self.crtc[0x0A], self.crtc[0x0B]);
        let disabled = first & 0x20 != 0;
        TextCursor { position, lines: (!disabled).then_some((first & 0x1F, last & 0x1F)), start }
    }
}

impl BusDevice for Vga {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            CRTC_INDEX => self.crtc_index,
            CRTC_DATA => self.crtc.get(usize::from(self.crtc_index)).copied().unwrap_or(0xFF),
            INPUT_STATUS_1 => {
                // Alternate display-enable and vertical-retrace bits on every read.
                self.retrace ^= 0x09;
                self.retrace
            }
            MISC_OUTPUT_READ => 0x67, // colour, RAM enabled, 28 MHz clock
            _ => 0xFF,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (first, second) = match data {
            [a] => (*a, None),
            [a, b] => (*a, Some(*b)), // outw to the index port writes index and data
            _ => return,
        };
        let set_data = |vga: &mut Vga, value: u8| {
            if let Some(reg) = vga.crtc.get_mut(usize::from(vga.crtc_index)) {
                *reg = value;
                vga.version.fetch_add(1, Ordering::Release);
            }
        };
        match offset {
            CRTC_INDEX => {
                self.crtc_index = first;
                if let Some(value) = second {
                    set_data(self, value);
                }
            }
            CRTC_DATA => set_data(self, first),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_position_and_shape() {
        let mut vga = Vga::new(Arc::default());
        vga.write(CRTC_INDEX, &[0x0E]);
        vga.write(CRTC_DATA, &[0x03]);
        vga.write(CRTC_INDEX, &[0x0F, 0x25]); // outw: index 0x0F, data 0x25
        assert_eq!(vga.cursor().position, 0x0325);
        assert_eq!(vga.cursor().lines, Some((0x0D, 0x0E)));
        vga.write(CRTC_INDEX, &[0x0A, 0x20]);
        assert_eq!(vga.cursor().lines, None);
        let mut status = [0];
        vga.read(INPUT_STATUS_1, &mut status);
        let first = status[0];
        vga.read(INPUT_STATUS_1, &mut status);
        assert_ne!(first, status[0], "retrace toggles");
    }
}
