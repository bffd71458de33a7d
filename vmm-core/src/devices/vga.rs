//! The VGA register file at 0x3C0-0x3DF: attribute controller (index/data flip-flop at 0x3C0, reset by a
//! read of 0x3DA), miscellaneous output, sequencer, DAC (palette, read back in order), graphics controller
//! and CRT controller, each kept and read back as written, so that a VGA BIOS (SeaBIOS's stdvga ROM) can set
//! modes and save/restore state. The console uses the CRT controller (cursor position and shape, start
//! address); the text itself is guest RAM at 0xB8000 (see `display`). Input status 1 at 0x3DA toggles its
//! retrace bits, so guests that wait for vertical retrace do not hang. Planar graphics modes are not drawn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BusDevice;

/// First port claimed: 0x3C0 (attribute controller) .. 0x3DF.
pub const VGA_PORT: u16 = 0x3C0;
pub const VGA_PORT_LEN: u64 = 0x20;

const ATTR_INDEX: u64 = 0x00; // 0x3C0
const ATTR_READ: u64 = 0x01; // 0x3C1
const MISC_OUTPUT_WRITE: u64 = 0x02; // 0x3C2 (read: input status 0)
const SEQ_INDEX: u64 = 0x04; // 0x3C4
const SEQ_DATA: u64 = 0x05; // 0x3C5
const DAC_MASK: u64 = 0x06; // 0x3C6
const DAC_READ_INDEX: u64 = 0x07; // 0x3C7 (read: DAC state)
const DAC_WRITE_INDEX: u64 = 0x08; // 0x3C8
const DAC_DATA: u64 = 0x09; // 0x3C9
const FEATURE_READ: u64 = 0x0A; // 0x3CA
const MISC_OUTPUT_READ: u64 = 0x0C; // 0x3CC
const GC_INDEX: u64 = 0x0E; // 0x3CE
const GC_DATA: u64 = 0x0F; // 0x3CF
const CRTC_INDEX: u64 = 0x14; // 0x3D4
const CRTC_DATA: u64 = 0x15; // 0x3D5
const INPUT_STATUS_1: u64 = 0x1A; // 0x3DA (write: feature control)

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
    /// Attribute controller: index (with the palette-address-source bit), registers, and whether the next
    /// write to 0x3C0 is an index.
    attr_index: u8,
    attr: [u8; 0x15],
    attr_expect_index: bool,
    misc_output: u8,
    seq_index: u8,
    seq: [u8; 0x05],
    gc_index: u8,
    gc: [u8; 0x09],
    /// DAC: 256 RGB entries of 6 bits; the read and write positions count colour components.
    dac: Box<[u8; 768]>,
    dac_read: usize,
    dac_write: usize,
    /// 0: the last index written was for writing, 3: for reading (what 0x3C7 reports).
    dac_state: u8,
    dac_mask: u8,
    feature: u8,
}

impl Vga {
    pub fn new(version: Arc<AtomicU64>) -> Self {
        let mut crtc = [0u8; 0x19];
        crtc[0x0A] = 0x0D; // cursor start line (a two-line underline, as the BIOS sets it)
        crtc[0x0B] = 0x0E; // cursor end line
        Vga {
            crtc_index: 0,
            crtc,
            retrace: 0,
            version,
            attr_index: 0,
            attr: [0; 0x15],
            attr_expect_index: true,
            misc_output: 0x67, // colour, RAM enabled, 28 MHz clock
            seq_index: 0,
            seq: [0; 0x05],
            gc_index: 0,
            gc: [0; 0x09],
            dac: Box::new([0; 768]),
            dac_read: 0,
            dac_write: 0,
            dac_state: 0,
            dac_mask: 0xFF,
            feature: 0,
        }
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
        let reg = |regs: &[u8], index: u8| regs.get(usize::from(index)).copied().unwrap_or(0xFF);
        data[0] = match offset {
            ATTR_INDEX => self.attr_index,
            ATTR_READ => reg(&self.attr, self.attr_index & 0x1F),
            MISC_OUTPUT_WRITE => 0x10, // input status 0: switch sense
            SEQ_INDEX => self.seq_index,
            SEQ_DATA => reg(&self.seq, self.seq_index),
            DAC_MASK => self.dac_mask,
            DAC_READ_INDEX => self.dac_state,
            DAC_WRITE_INDEX => (self.dac_write / 3) as u8,
            DAC_DATA => {
                let v = self.dac[self.dac_read % 768];
                self.dac_read = (self.dac_read + 1) % 768;
                v
            }
            FEATURE_READ => self.feature,
            MISC_OUTPUT_READ => self.misc_output,
            GC_INDEX => self.gc_index,
            GC_DATA => reg(&self.gc, self.gc_index),
            CRTC_INDEX => self.crtc_index,
            CRTC_DATA => reg(&self.crtc, self.crtc_index),
            INPUT_STATUS_1 => {
                // Reading it resets the attribute controller's flip-flop to "index next".
                self.attr_expect_index = true;
                // Alternate display-enable and vertical-retrace bits on every read.
                self.retrace ^= 0x09;
                self.retrace
            }
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
        let store = |regs: &mut [u8], index: u8, value: u8| {
            if let Some(r) = regs.get_mut(usize::from(index)) {
                *r = value;
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
            ATTR_INDEX => {
                for b in data {
                    if self.attr_expect_index {
                        self.attr_index = *b & 0x3F;
                    } else {
                        store(&mut self.attr, self.attr_index & 0x1F, *b);
                    }
                    self.attr_expect_index = !self.attr_expect_index;
                }
            }
            MISC_OUTPUT_WRITE => self.misc_output = first,
            SEQ_INDEX => {
                self.seq_index = first;
                if let Some(value) = second {
                    store(&mut self.seq, first, value);
                }
            }
            SEQ_DATA => store(&mut self.seq, self.seq_index, first),
            DAC_MASK => self.dac_mask = first,
            DAC_READ_INDEX => {
                self.dac_read = usize::from(first) * 3;
                self.dac_state = 3;
            }
            DAC_WRITE_INDEX => {
                self.dac_write = usize::from(first) * 3;
                self.dac_state = 0;
            }
            DAC_DATA => {
                for b in data {
                    self.dac[self.dac_write % 768] = *b & 0x3F;
                    self.dac_write = (self.dac_write + 1) % 768;
                }
            }
            GC_INDEX => {
                self.gc_index = first;
                if let Some(value) = second {
                    store(&mut self.gc, first, value);
                }
            }
            GC_DATA => store(&mut self.gc, self.gc_index, first),
            INPUT_STATUS_1 => self.feature = first,
            _ => {}
        }
    }
}

impl crate::snapshot::DeviceState for Vga {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u8(self.crtc_index);
        w.bytes(&self.crtc);
        w.u8(self.retrace);
        w.u8(self.attr_index);
        w.bytes(&self.attr);
        w.bool(self.attr_expect_index);
        w.u8(self.misc_output);
        w.u8(self.seq_index);
        w.bytes(&self.seq);
        w.u8(self.gc_index);
        w.bytes(&self.gc);
        w.bytes(&self.dac[..]);
        w.u32(self.dac_read as u32);
        w.u32(self.dac_write as u32);
        w.u8(self.dac_state);
        w.u8(self.dac_mask);
        w.u8(self.feature);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let crtc_index = r.u8()?;
        let crtc = r.fixed::<0x19>()?;
        let retrace = r.u8()?;
        let attr_index = r.u8()?;
        let attr = r.fixed::<0x15>()?;
        let attr_expect_index = r.bool()?;
        let misc_output = r.u8()?;
        let seq_index = r.u8()?;
        let seq = r.fixed::<0x05>()?;
        let gc_index = r.u8()?;
        let gc = r.fixed::<0x09>()?;
        let dac = Box::new(r.fixed::<768>()?);
        // Positions count colour components (0..768); anything else is clamped as the device would wrap it.
        let dac_read = r.u32()? as usize % 768;
        let dac_write = r.u32()? as usize % 768;
        let dac_state = r.u8()?;
        let dac_mask = r.u8()?;
        let feature = r.u8()?;
        self.crtc_index = crtc_index;
        self.crtc = crtc;
        self.retrace = retrace;
        self.attr_index = attr_index;
        self.attr = attr;
        self.attr_expect_index = attr_expect_index;
        self.misc_output = misc_output;
        self.seq_index = seq_index;
        self.seq = seq;
        self.gc_index = gc_index;
        self.gc = gc;
        self.dac = dac;
        self.dac_read = dac_read;
        self.dac_write = dac_write;
        self.dac_state = dac_state;
        self.dac_mask = dac_mask;
        self.feature = feature;
        self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips() {
        use crate::snapshot::{DeviceState, Reader, Writer};
        let mut a = Vga::new(Arc::default());
        let base = u64::from(VGA_PORT);
        for (port, value) in [(0x3D4 - base, 0x0E), (0x3D5 - base, 0x12), (0x3C8 - base, 5)] {
            a.write(port, &[value]);
        }
        for v in [10, 20, 30, 40] {
            a.write(0x3C9 - base, &[v]);
        }
        let mut w = Writer::new();
        a.save(&mut w);
        let mut b = Vga::new(Arc::default());
        let mut r = Reader::new("vga", &w.buf);
        b.restore(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(b.cursor().position, a.cursor().position);
        let mut again = Writer::new();
        b.save(&mut again);
        assert_eq!(again.buf, w.buf);
        assert!(b.restore(&mut Reader::new("vga", &w.buf[..w.buf.len() - 1])).is_err());
    }

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

    #[test]
    fn registers_read_back_as_a_vga_bios_expects() {
        let mut vga = Vga::new(Arc::default());
        let read = |vga: &mut Vga, port: u64| {
            let mut b = [0];
            vga.read(port, &mut b);
            b[0]
        };
        // Attribute controller: index, data, flip-flop reset by input status 1.
        read(&mut vga, INPUT_STATUS_1);
        vga.write(ATTR_INDEX, &[0x10]);
        vga.write(ATTR_INDEX, &[0x0C]);
        vga.write(ATTR_INDEX, &[0x20 | 0x10]); // an index again (with palette-address source)
        assert_eq!(read(&mut vga, ATTR_READ), 0x0C);
        read(&mut vga, INPUT_STATUS_1);
        vga.write(ATTR_INDEX, &[0x14]);
        vga.write(ATTR_INDEX, &[0x05]);
        vga.write(ATTR_INDEX, &[0x14]);
        assert_eq!(read(&mut vga, ATTR_READ), 0x05);
        // Sequencer and graphics controller, by byte and by word.
        vga.write(SEQ_INDEX, &[0x02, 0x03]);
        vga.write(SEQ_INDEX, &[0x02]);
        assert_eq!(read(&mut vga, SEQ_DATA), 0x03);
        vga.write(GC_INDEX, &[0x06]);
        vga.write(GC_DATA, &[0x0E]);
        assert_eq!(read(&mut vga, GC_DATA), 0x0E);
        vga.write(GC_INDEX, &[0x40]);
        vga.write(GC_DATA, &[0x1]); // out of range: ignored
        // DAC: written and read back in RGB order; 6 bits each.
        vga.write(DAC_WRITE_INDEX, &[5]);
        for c in [0xFF, 0x20, 0x01] {
            vga.write(DAC_DATA, &[c]);
        }
        vga.write(DAC_READ_INDEX, &[5]);
        assert_eq!(read(&mut vga, DAC_READ_INDEX), 3);
        assert_eq!([read(&mut vga, DAC_DATA), read(&mut vga, DAC_DATA), read(&mut vga, DAC_DATA)], [0x3F, 0x20, 0x01]);
        vga.write(MISC_OUTPUT_WRITE, &[0x63]);
        assert_eq!(read(&mut vga, MISC_OUTPUT_READ), 0x63);
        // A DAC index past the end wraps instead of overflowing.
        vga.write(DAC_WRITE_INDEX, &[255]);
        for _ in 0..10 {
            vga.write(DAC_DATA, &[1]);
        }
    }
}
