//! Raw encoding (0): the pixels in the client's format, row by row.

use crate::rfb::pixel::PixelFormat;

pub fn encode(pixels: &[u32], pf: &PixelFormat, out: &mut Vec<u8>) {
    pf.put_all(pixels, out);
}
