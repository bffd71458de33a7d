//! Hextile encoding (5): 16×16 tiles, each either one background colour (sent only when it changes) or raw.

use crate::rfb::pixel::PixelFormat;

const RAW: u8 = 1;
const BACKGROUND_SPECIFIED: u8 = 2;

pub fn encode(pixels: &[u32], width: usize, height: usize, pf: &PixelFormat, out: &mut Vec<u8>) {
    let mut background: Option<u32> = None;
    let mut tile = Vec::with_capacity(256);
    for ty in (0..height).step_by(16) {
        for tx in (0..width).step_by(16) {
            let (tw, th) = ((width - tx).min(16), (height - ty).min(16));
            super::copy_tile(pixels, width, tx, ty, tw, th, &mut tile);
            let first = tile[0];
            if tile.iter().all(|p| *p == first) {
                if background == Some(first) {
                    out.push(0);
                } else {
                    out.push(BACKGROUND_SPECIFIED);
                    pf.put(first, out);
                    background = Some(first);
                }
            } else {
                out.push(RAW);
                pf.put_all(&tile, out);
                background = None; // decoders disagree on what a raw tile leaves behind
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solid_tiles_repeat_the_background_for_free() {
        let pf = PixelFormat::SERVER;
        let pixels = vec![0x00FF00u32; 32 * 16];
        let mut out = Vec::new();
        encode(&pixels, 32, 16, &pf, &mut out);
        assert_eq!(out, [BACKGROUND_SPECIFIED, 0x00, 0xFF, 0x00, 0x00, 0]);
    }

    #[test]
    fn mixed_tiles_are_raw_and_edges_are_partial() {
        let pf = PixelFormat::SERVER;
        let pixels: Vec<u32> = (0..20 * 3).collect();
        let mut out = Vec::new();
        encode(&pixels, 20, 3, &pf, &mut out);
        assert_eq!(out[0], RAW);
        assert_eq!(out.len(), 1 + 16 * 3 * 4 + 1 + 4 * 3 * 4);
    }
}
