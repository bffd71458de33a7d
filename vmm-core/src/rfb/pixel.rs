//! RFB pixel formats (RFC 6143 §7.4) and the conversion of the screen's 0x00RRGGBB pixels into them.

/// A client's pixel format. Only true-colour formats are served (colour-map clients are switched to the
/// server's format by refusing SetPixelFormat with a colour map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// What the server offers: 32 bpp, depth 24, little-endian, 0x00RRGGBB.
    pub const SERVER: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// Parses a SetPixelFormat body; None for formats we do not serve (colour maps, odd sizes, shifts
    /// that do not fit the pixel).
    pub fn from_bytes(b: &[u8; 16]) -> Option<PixelFormat> {
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        let bits = u32::from(pf.bits_per_pixel);
        let fits = |max: u16, shift: u8| u32::from(shift) < bits && (u64::from(max) << shift) < (1u64 << bits);
        (pf.true_colour
            && matches!(pf.bits_per_pixel, 8 | 16 | 32)
            && fits(pf.red_max, pf.red_shift)
            && fits(pf.green_max, pf.green_shift)
            && fits(pf.blue_max, pf.blue_shift))
        .then_some(pf)
    }

    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// The pixel value of 0x00RRGGBB in this format.
    #[inline]
    pub fn value(&self, rgb: u32) -> u32 {
        let scale = |c: u32, max: u16| (c * u32::from(max) + 127) / 255;
        let (r, g, b) = ((rgb >> 16) & 0xFF, (rgb >> 8) & 0xFF, rgb & 0xFF);
        (scale(r, self.red_max) << self.red_shift)
            | (scale(g, self.green_max) << self.green_shift)
            | (scale(b, self.blue_max) << self.blue_shift)
    }

    /// Appends one pixel (PIXEL, `bytes_per_pixel` bytes).
    #[inline]
    pub fn put(&self, rgb: u32, out: &mut Vec<u8>) {
        let v = self.value(rgb);
        match (self.bits_per_pixel, self.big_endian) {
            (32, false) => out.extend_from_slice(&v.to_le_bytes()),
            (32, true) => out.extend_from_slice(&v.to_be_bytes()),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            _ => out.push(v as u8),
        }
    }

    /// Appends many pixels.
    pub fn put_all(&self, pixels: &[u32], out: &mut Vec<u8>) {
        out.reserve(pixels.len() * self.bytes_per_pixel());
        if *self == PixelFormat::SERVER {
            for p in pixels {
                out.extend_from_slice(&(p & 0xFF_FFFF).to_le_bytes());
            }
        } else {
            for &p in pixels {
                self.put(p, out);
            }
        }
    }

    /// Whether ZRLE's CPIXEL (and Tight's TPIXEL) is three bytes for this format: 32 bpp, depth ≤ 24,
    /// true colour, and every channel within the low or the high three bytes.
    pub fn compact_pixel(&self) -> Option<CompactSide> {
        if self.bits_per_pixel != 32 || self.depth > 24 || !self.true_colour {
            return None;
        }
        let top = |max: u16, shift: u8| (u64::from(max) << shift) >> 24;
        let all_low =
            [(self.red_max, self.red_shift), (self.green_max, self.green_shift), (self.blue_max, self.blue_shift)]
                .iter()
                .all(|(m, s)| top(*m, *s) == 0);
        let all_high = [self.red_shift, self.green_shift, self.blue_shift].iter().all(|s| *s >= 8);
        if all_low {
            Some(CompactSide::Low)
        } else if all_high {
            Some(CompactSide::High)
        } else {
            None
        }
    }

    /// Appends one CPIXEL (3 bytes when `compact_pixel` allows, else a PIXEL).
    #[inline]
    pub fn put_compact(&self, rgb: u32, side: Option<CompactSide>, out: &mut Vec<u8>) {
        let v = self.value(rgb);
        let bytes = if self.big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        match (side, self.big_endian) {
            (Some(CompactSide::Low), false) | (Some(CompactSide::High), true) => out.extend_from_slice(&bytes[0..3]),
            (Some(CompactSide::Low), true) | (Some(CompactSide::High), false) => out.extend_from_slice(&bytes[1..4]),
            (None, _) => self.put(rgb, out),
        }
    }

    /// Appends many CPIXELs (see [`PixelFormat::put_compact`]).
    pub fn put_all_compact(&self, pixels: &[u32], side: Option<CompactSide>, out: &mut Vec<u8>) {
        if *self == PixelFormat::SERVER && side == Some(CompactSide::Low) {
            out.reserve(pixels.len() * 3);
            for p in pixels {
                out.extend_from_slice(&p.to_le_bytes()[..3]);
            }
        } else {
            for &p in pixels {
                self.put_compact(p, side, out);
            }
        }
    }
}

/// Which three bytes of a 32-bit pixel a compact pixel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactSide {
    Low,
    High,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_format_round_trips_and_converts() {
        let pf = PixelFormat::from_bytes(&PixelFormat::SERVER.to_bytes()).unwrap();
        assert_eq!(pf, PixelFormat::SERVER);
        let mut out = Vec::new();
        pf.put(0x112233, &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11, 0x00]);
        assert_eq!(pf.compact_pixel(), Some(CompactSide::Low));
        out.clear();
        pf.put_compact(0x112233, pf.compact_pixel(), &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11]);
    }

    #[test]
    fn put_all_compact_equals_one_pixel_at_a_time() {
        let pixels = [0x112233, 0xFF00_FF80, 0x00FF_FFFF, 0];
        let mut big_endian = PixelFormat::SERVER;
        big_endian.big_endian = true;
        for pf in [PixelFormat::SERVER, big_endian] {
            for side in [pf.compact_pixel(), None] {
                let (mut all, mut each) = (Vec::new(), Vec::new());
                pf.put_all_compact(&pixels, side, &mut all);
                pixels.iter().for_each(|&p| pf.put_compact(p, side, &mut each));
                assert_eq!(all, each, "{pf:?} {side:?}");
            }
        }
    }

    #[test]
    fn rgb565_big_endian() {
        let pf = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: true,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        let mut out = Vec::new();
        pf.put(0xFF0000, &mut out);
        assert_eq!(out, [0xF8, 0x00]);
        assert_eq!(pf.compact_pixel(), None);
    }

    #[test]
    fn refuses_colour_maps_and_impossible_shifts() {
        let mut b = PixelFormat::SERVER.to_bytes();
        b[3] = 0;
        assert!(PixelFormat::from_bytes(&b).is_none());
        let mut b = PixelFormat::SERVER.to_bytes();
        b[10] = 30; // red 255 << 30 does not fit 32 bits
        assert!(PixelFormat::from_bytes(&b).is_none());
        let mut b = PixelFormat::SERVER.to_bytes();
        b[0] = 24;
        assert!(PixelFormat::from_bytes(&b).is_none());
    }
}
