//! RFB encodings, one file each. Every encoder takes the rectangle's pixels (0x00RRGGBB, row by row)
//! and appends the rectangle's payload (everything after the rectangle header).

pub mod hextile;
pub mod raw;
pub mod tight;
pub mod zlib;
pub mod zrle;

use flate2::{Compress, Compression, FlushCompress};

pub const RAW: i32 = 0;
pub const COPY_RECT: i32 = 1;
pub const HEXTILE: i32 = 5;
pub const ZLIB: i32 = 6;
pub const TIGHT: i32 = 7;
pub const ZRLE: i32 = 16;
// Pseudo-encodings.
pub const DESKTOP_SIZE: i32 = -223;
pub const LAST_RECT: i32 = -224;
pub const CURSOR: i32 = -239;
pub const QEMU_EXTENDED_KEY_EVENT: i32 = -258;
/// QEMU's LED state pseudo-encoding: one byte, bit 0 Scroll Lock, bit 1 Num Lock, bit 2 Caps Lock.
pub const LED_STATE: i32 = -261;
pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
pub const FENCE: i32 = -312;
pub const CONTINUOUS_UPDATES: i32 = -313;
pub const TIGHT_QUALITY_0: i32 = -32;
pub const TIGHT_QUALITY_9: i32 = -23;
pub const COMPRESS_LEVEL_0: i32 = -256;
pub const COMPRESS_LEVEL_9: i32 = -247;

/// Copies the `tw × th` tile at (`tx`, `ty`) of a `width`-pixel-wide rectangle into `tile`.
pub fn copy_tile(pixels: &[u32], width: usize, tx: usize, ty: usize, tw: usize, th: usize, tile: &mut Vec<u32>) {
    tile.clear();
    for y in ty..ty + th {
        tile.extend_from_slice(&pixels[y * width + tx..y * width + tx + tw]);
    }
}

/// A persistent zlib stream, flushed with Z_SYNC_FLUSH after every rectangle as RFB requires.
pub struct ZStream {
    compress: Compress,
}

impl ZStream {
    pub fn new(level: u32) -> Self {
        ZStream { compress: Compress::new(Compression::new(level.min(9)), true) }
    }

    /// Compresses `input` and appends the compressed bytes to `out`.
    pub fn deflate(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut consumed = 0usize;
        loop {
            out.reserve(input.len() - consumed + 64 + input.len() / 1000);
            let before_in = self.compress.total_in();
            // Only fails on a corrupted stream state, which our use cannot produce; stop if it does.
            if self.compress.compress_vec(&input[consumed..], out, FlushCompress::Sync).is_err() {
                return;
            }
            consumed += (self.compress.total_in() - before_in) as usize;
            // A sync flush is complete once all input is in and zlib left output space unused.
            if consumed == input.len() && out.len() < out.capacity() {
                return;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// Inflates what a ZStream produced (a decoder keeps one stream per connection too).
    pub fn inflate(d: &mut Decompress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() * 8 + 1024);
        let mut at = 0;
        loop {
            out.reserve(64 * 1024);
            let before = d.total_in();
            d.decompress_vec(&data[at..], &mut out, FlushDecompress::Sync).unwrap();
            at += (d.total_in() - before) as usize;
            if at == data.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }

    #[test]
    fn zstream_round_trips_across_rectangles() {
        let mut z = ZStream::new(6);
        let mut d = Decompress::new(true);
        for n in [0usize, 10, 100_000, 3] {
            let input: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let mut out = Vec::new();
            z.deflate(&input, &mut out);
            assert_eq!(inflate(&mut d, &out), input);
        }
    }
}
