//! Tight encoding (7), chosen per rectangle as TigerVNC's encoder does: fill for a single colour; the
//! palette filter, lossless, for few colours (two: one bit per pixel through zlib stream 1; up to
//! [`MAX_PALETTE`], or [`MAX_PALETTE_WITH_JPEG`] when JPEG is allowed: one byte per pixel through stream
//! 2) — text, window borders, flat UI stay sharp and small; JPEG for the rest when the client asked for a
//! quality level (and takes 32-bit true colour) — photos, video; otherwise the basic "copy" filter through
//! stream 0. Rectangles must be at most 2048 pixels wide; `split` cuts larger ones.

use super::ZStream;
use crate::display::Rect;
use crate::rfb::pixel::PixelFormat;

const FILL: u8 = 0x80;
const JPEG: u8 = 0x90;
const MIN_TO_COMPRESS: usize = 12;
/// Largest width, and largest area, of one Tight rectangle.
pub const MAX_WIDTH: u32 = 2048;
pub const MAX_AREA: u32 = 65536;

/// Most colours of a rectangle sent with the palette filter, without JPEG and with it (beyond that many,
/// JPEG is smaller and the eye does not tell; below it, anti-aliased text keeps its edges).
pub const MAX_PALETTE: usize = 256;
pub const MAX_PALETTE_WITH_JPEG: usize = 24;

/// The per-connection state: the zlib streams (0 full colour, 1 two-colour, 2 palette; 1 and 2 made at
/// their first use), the JPEG quality, if any, and libjpeg-turbo's compressor (made at the first JPEG
/// rectangle).
pub struct TightState {
    pub stream: ZStream,
    mono: Option<ZStream>,
    indexed: Option<ZStream>,
    compress_level: u32,
    pub jpeg_quality: Option<u8>,
    jpeg: Option<turbojpeg::Compressor>,
    palette: Palette,
}

impl TightState {
    pub fn new(compress_level: u32) -> Self {
        TightState {
            stream: ZStream::new(compress_level),
            mono: None,
            indexed: None,
            compress_level,
            jpeg_quality: None,
            jpeg: None,
            palette: Palette::new(),
        }
    }
}

/// The distinct colours of a rectangle in order of appearance, each with its index: a small open-addressing
/// table (pixels are `0x00RRGGBB`, so `u32::MAX` marks a free slot).
struct Palette {
    slots: Box<[(u32, u8); PALETTE_SLOTS]>,
    colours: Vec<u32>,
}

const PALETTE_SLOTS: usize = 1024;

impl Palette {
    fn new() -> Self {
        Palette { slots: Box::new([(u32::MAX, 0); PALETTE_SLOTS]), colours: Vec::with_capacity(MAX_PALETTE) }
    }

    fn slot(colour: u32) -> usize {
        (colour.wrapping_mul(0x9E37_79B1) >> 22) as usize
    }

    /// Collects the colours of `pixels`; false as soon as there are more than `limit` (at most
    /// [`MAX_PALETTE`]).
    fn collect(&mut self, pixels: &[u32], limit: usize) -> bool {
        for &c in &self.colours {
            let mut i = Self::slot(c);
            while self.slots[i].0 != c {
                i = (i + 1) % PALETTE_SLOTS;
            }
            self.slots[i].0 = u32::MAX;
        }
        self.colours.clear();
        let limit = limit.min(MAX_PALETTE);
        let mut previous = u32::MAX;
        for &c in pixels {
            if c == previous {
                continue;
            }
            previous = c;
            let mut i = Self::slot(c);
            loop {
                match self.slots[i].0 {
                    x if x == c => break,
                    u32::MAX => {
                        if self.colours.len() == limit {
                            return false;
                        }
                        self.slots[i] = (c, self.colours.len() as u8);
                        self.colours.push(c);
                        break;
                    }
                    _ => i = (i + 1) % PALETTE_SLOTS,
                }
            }
        }
        true
    }

    /// The index of `colour`, one of those collected.
    fn index(&self, colour: u32) -> u8 {
        let mut i = Self::slot(colour);
        loop {
            match self.slots[i] {
                (c, index) if c == colour => return index,
                (u32::MAX, _) => return 0, // not collected: cannot happen for the rectangle's own pixels
                _ => i = (i + 1) % PALETTE_SLOTS,
            }
        }
    }
}

/// How our pixels (`0x00RRGGBB` in a native-endian u32) lie in memory, for libjpeg-turbo.
#[cfg(target_endian = "little")]
const PIXEL_BYTES: turbojpeg::PixelFormat = turbojpeg::PixelFormat::BGRX;
#[cfg(target_endian = "big")]
const PIXEL_BYTES: turbojpeg::PixelFormat = turbojpeg::PixelFormat::XRGB;

/// `pixels` (`width` × `height`) as a JPEG of `quality` appended to `out` (libjpeg-turbo, straight from our
/// pixels: no conversion pass); false, `out` untouched, when libjpeg-turbo fails.
fn put_jpeg(st: &mut TightState, pixels: &[u32], width: usize, height: usize, quality: u8, out: &mut Vec<u8>) -> bool {
    let compressor = match &mut st.jpeg {
        Some(c) => c,
        None => match turbojpeg::Compressor::new() {
            Ok(c) => st.jpeg.insert(c),
            Err(e) => {
                log::warn!("RFB: libjpeg-turbo cannot start ({e}); Tight without JPEG");
                st.jpeg_quality = None;
                return false;
            }
        },
    };
    compressor.set_quality(i32::from(quality));
    // Chroma at half resolution both ways below quality 90, as the JPEG encoders of VNC servers do.
    compressor.set_subsamp(if quality < 90 { turbojpeg::Subsamp::Sub2x2 } else { turbojpeg::Subsamp::None });
    let image = turbojpeg::Image {
        pixels: zerocopy::IntoBytes::as_bytes(pixels),
        width,
        pitch: width * 4,
        height,
        format: PIXEL_BYTES,
    };
    match compressor.compress_to_vec(image) {
        Ok(jpeg) => {
            out.push(JPEG);
            put_compact_len(jpeg.len(), out);
            out.extend_from_slice(&jpeg);
            true
        }
        Err(e) => {
            log::debug!("RFB: a {width}x{height} JPEG failed ({e}); sent lossless");
            false
        }
    }
}

/// Cuts `r` into pieces Tight accepts.
pub fn split(r: Rect) -> Vec<Rect> {
    let mut pieces = Vec::new();
    let mut x = r.x;
    while x < r.right() {
        let w = (r.right() - x).min(MAX_WIDTH);
        let rows = (MAX_AREA / w).max(1);
        let mut y = r.y;
        while y < r.bottom() {
            let h = (r.bottom() - y).min(rows);
            pieces.push(Rect::new(x, y, w, h));
            y += h;
        }
        x += w;
    }
    pieces
}

/// Whether TPIXEL is three bytes (red, green, blue) for this format.
fn tpixel_rgb(pf: &PixelFormat) -> bool {
    pf.bits_per_pixel == 32 && pf.depth == 24 && pf.red_max == 255 && pf.green_max == 255 && pf.blue_max == 255
}

fn put_tpixels(pixels: &[u32], pf: &PixelFormat, out: &mut Vec<u8>) {
    if tpixel_rgb(pf) {
        out.reserve(pixels.len() * 3);
        for p in pixels {
            out.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, *p as u8]);
        }
    } else {
        pf.put_all(pixels, out);
    }
}

/// Appends a compact length: 7 bits in each of the first two bytes (high bit = more follows), 8 in the
/// third, so at most 2^22 - 1.
pub fn put_compact_len(len: usize, out: &mut Vec<u8>) {
    let len = len.min((1 << 22) - 1);
    if len <= 0x7F {
        out.push(len as u8);
    } else if len <= 0x3FFF {
        out.extend_from_slice(&[(len & 0x7F) as u8 | 0x80, (len >> 7) as u8]);
    } else {
        out.extend_from_slice(&[(len & 0x7F) as u8 | 0x80, ((len >> 7) & 0x7F) as u8 | 0x80, (len >> 14) as u8]);
    }
}

pub fn encode(
    pixels: &[u32],
    width: usize,
    height: usize,
    pf: &PixelFormat,
    st: &mut TightState,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    let first = pixels[0];
    if pixels.iter().all(|p| *p == first) {
        out.push(FILL);
        put_tpixels(&[first], pf, out);
        return;
    }
    let limit = if st.jpeg_quality.is_some() { MAX_PALETTE_WITH_JPEG } else { MAX_PALETTE };
    if st.palette.collect(pixels, limit) {
        put_palette(pixels, width, pf, st, scratch, out);
        return;
    }
    if let Some(quality) = st.jpeg_quality
        && tpixel_rgb(pf)
        && width >= 16
        && height >= 16
        && put_jpeg(st, pixels, width, height, quality, out)
    {
        return;
    }
    // Basic compression, stream 0, no filter.
    out.push(0x00);
    scratch.clear();
    put_tpixels(pixels, pf, scratch);
    if scratch.len() < MIN_TO_COMPRESS {
        out.extend_from_slice(scratch);
        return;
    }
    let mut compressed = Vec::new();
    st.stream.deflate(scratch, &mut compressed);
    put_compact_len(compressed.len(), out);
    out.extend_from_slice(&compressed);
}

/// The palette filter: `st.palette` holds the rectangle's 2..=256 colours. Two colours go as one bit per
/// pixel (rows padded to a byte, first pixel in the high bit) through stream 1, more as one byte per pixel
/// through stream 2.
fn put_palette(
    pixels: &[u32],
    width: usize,
    pf: &PixelFormat,
    st: &mut TightState,
    data: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    let palette = &st.palette;
    let mono = palette.colours.len() == 2;
    let stream_id = if mono { 1 } else { 2 };
    out.push(0x40 | stream_id << 4); // basic compression, explicit filter
    out.push(1); // the palette filter
    out.push((palette.colours.len() - 1) as u8);
    put_tpixels(&palette.colours, pf, out);
    data.clear();
    if mono {
        let background = palette.colours[0];
        for row in pixels.chunks(width) {
            for bits in row.chunks(8) {
                let mut byte = 0u8;
                for (i, &p) in bits.iter().enumerate() {
                    byte |= u8::from(p != background) << (7 - i);
                }
                data.push(byte);
            }
        }
    } else {
        let mut previous = (u32::MAX, 0u8);
        data.extend(pixels.iter().map(|&p| {
            if p != previous.0 {
                previous = (p, palette.index(p));
            }
            previous.1
        }));
    }
    if data.len() < MIN_TO_COMPRESS {
        out.extend_from_slice(data);
        return;
    }
    let level = st.compress_level;
    let stream = if mono { &mut st.mono } else { &mut st.indexed };
    let mut compressed = Vec::new();
    stream.get_or_insert_with(|| ZStream::new(level)).deflate(data, &mut compressed);
    put_compact_len(compressed.len(), out);
    out.extend_from_slice(&compressed);
}

/// The JPEG quality for a Tight quality level 0–9.
pub fn jpeg_quality(level: u8) -> u8 {
    [15, 29, 41, 42, 62, 77, 79, 86, 92, 100][usize::from(level.min(9))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_lengths() {
        for (len, bytes) in [
            (0usize, vec![0u8]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16383, vec![0xFF, 0x7F]),
            (16384, vec![0x80, 0x80, 0x01]),
            (4_194_303, vec![0xFF, 0xFF, 0xFF]),
        ] {
            let mut out = Vec::new();
            put_compact_len(len, &mut out);
            assert_eq!(out, bytes, "{len}");
        }
    }

    #[test]
    fn fill_and_split() {
        let mut st = TightState::new(6);
        let mut out = Vec::new();
        encode(&[0x102030; 64], 8, 8, &PixelFormat::SERVER, &mut st, &mut Vec::new(), &mut out);
        assert_eq!(out, [FILL, 0x10, 0x20, 0x30]);
        let pieces = split(Rect::new(0, 0, 3000, 100));
        assert!(pieces.iter().all(|p| p.w <= MAX_WIDTH && p.w * p.h <= MAX_AREA));
        assert_eq!(pieces.iter().map(|p| p.w * p.h).sum::<u32>(), 300_000);
    }

    /// Two colours: the palette filter on stream 1, one bit per pixel (1: the second colour), rows padded
    /// to a byte, short data uncompressed.
    #[test]
    fn two_colours_go_as_a_bitmap() {
        let (bg, fg) = (0x0000_00AA, 0x00FF_FF55);
        // 10 x 2: row 0 has fg at x = 0 and 9, row 1 at x = 1..=8.
        let pixels: Vec<u32> = (0..20)
            .map(|i| {
                let (x, y) = (i % 10, i / 10);
                if (y == 0 && (x == 0 || x == 9)) || (y == 1 && (1..=8).contains(&x)) { fg } else { bg }
            })
            .collect();
        let mut st = TightState::new(6);
        let mut out = Vec::new();
        encode(&pixels, 10, 2, &PixelFormat::SERVER, &mut st, &mut Vec::new(), &mut out);
        // The first pixel's colour is palette entry 0 (bit 0).
        assert_eq!(out, [0x50, 1, 1, 0xFF, 0xFF, 0x55, 0, 0, 0xAA, 0b0111_1111, 0b1000_0000, 0b1000_0000, 0b0100_0000]);
    }

    /// A palette is used up to its limit, lower when JPEG is allowed; past it, JPEG (or full colour).
    #[test]
    fn the_palette_limit_decides_between_lossless_and_jpeg() {
        let rect = |colours: u32| -> Vec<u32> { (0..32 * 32).map(|i| (i % colours) * 0x1001).collect() };
        let kind = |pixels: &[u32], jpeg: bool| {
            let mut st = TightState::new(6);
            st.jpeg_quality = jpeg.then_some(80);
            let mut out = Vec::new();
            encode(pixels, 32, 32, &PixelFormat::SERVER, &mut st, &mut Vec::new(), &mut out);
            out[0]
        };
        assert_eq!(kind(&rect(24), true), 0x60, "24 colours with JPEG allowed: palette, stream 2");
        assert_eq!(kind(&rect(25), true), JPEG);
        assert_eq!(kind(&rect(256), false), 0x60);
        assert_eq!(kind(&rect(257), false), 0x00, "full colour, stream 0");
        // Colours seen before, in another rectangle, do not count for this one.
        let mut st = TightState::new(6);
        let mut out = Vec::new();
        for colours in [200, 3, 256] {
            out.clear();
            encode(&rect(colours), 32, 32, &PixelFormat::SERVER, &mut st, &mut Vec::new(), &mut out);
            assert_eq!((out[0], out[1], usize::from(out[2]) + 1), (0x60, 1, colours as usize));
        }
    }

    /// A JPEG rectangle: the control byte, its length, and a JPEG of the rectangle's size whose colours are
    /// those of the pixels (four nearly flat quadrants: JPEG keeps them within a few levels).
    #[test]
    fn jpeg_rectangles_decode_to_their_pixels() {
        let (w, h) = (64usize, 48usize);
        // (A little blue noise: 32 colours, too many for the palette filter.)
        let colour = |x: usize, y: usize| {
            [0x00c0_2040u32, 0x0020_c040, 0x0040_20c0, 0x00f0_f0f0][(x / 32) + 2 * (y / 24)] + (x % 8) as u32
        };
        let pixels: Vec<u32> = (0..w * h).map(|i| colour(i % w, i / w)).collect();
        for level in [0u8, 5, 9] {
            let mut st = TightState::new(6);
            st.jpeg_quality = Some(jpeg_quality(level));
            let mut out = Vec::new();
            encode(&pixels, w, h, &PixelFormat::SERVER, &mut st, &mut Vec::new(), &mut out);
            assert_eq!(out[0], JPEG, "level {level}");
            let (len, at) = match (out[1], out[2]) {
                (a, _) if a < 0x80 => (usize::from(a), 2),
                (a, b) if b < 0x80 => (usize::from(a & 0x7F) | usize::from(b) << 7, 3),
                (a, b) => (usize::from(a & 0x7F) | usize::from(b & 0x7F) << 7 | usize::from(out[3]) << 14, 4),
            };
            assert_eq!(out.len(), at + len, "level {level}");
            let image = turbojpeg::decompress(&out[at..], turbojpeg::PixelFormat::RGB).unwrap();
            assert_eq!((image.width, image.height), (w, h), "level {level}");
            for (x, y) in [(8, 6), (56, 6), (8, 42), (56, 42)] {
                let want = colour(x, y).to_be_bytes();
                let got = &image.pixels[(y * w + x) * 3..][..3];
                for c in 0..3 {
                    let diff = (i32::from(got[c]) - i32::from(want[c + 1])).abs();
                    assert!(diff <= 24, "level {level} at ({x},{y}): {got:?} vs {want:?}");
                }
            }
        }
    }
}
