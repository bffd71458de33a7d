//! Zlib encoding (6): Raw pixels through the connection's zlib stream, prefixed by the compressed length.

use super::ZStream;
use crate::rfb::pixel::PixelFormat;

pub fn encode(pixels: &[u32], pf: &PixelFormat, stream: &mut ZStream, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    scratch.clear();
    pf.put_all(pixels, scratch);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    stream.deflate(scratch, out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}
