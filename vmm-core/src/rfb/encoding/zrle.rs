//! ZRLE encoding (16): 64×64 tiles of CPIXELs through the connection's zlib stream. Tiles are solid,
//! packed-palette (2–16 colours) or raw, whichever applies first.

use super::ZStream;
use crate::rfb::pixel::PixelFormat;

const TILE: usize = 64;

fn encode_tile(tile: &[u32], tw: usize, pf: &PixelFormat, out: &mut Vec<u8>) {
    let side = pf.compact_pixel();
    let mut palette: Vec<u32> = Vec::with_capacity(16);
    for &p in tile {
        if !palette.contains(&p) {
            if palette.len() == 16 {
                palette.clear();
                break;
            }
            palette.push(p);
        }
    }
    match palette.len() {
        1 => {
            out.push(1);
            pf.put_compact(palette[0], side, out);
        }
        n @ 2..=16 => {
            out.push(n as u8);
            for &c in &palette {
                pf.put_compact(c, side, out);
            }
            let bits = match n {
                2 => 1,
                3..=4 => 2,
                _ => 4,
            };
            for row in tile.chunks(tw) {
                let (mut byte, mut used) = (0u8, 0);
                for p in row {
                    let index = palette.iter().position(|c| c == p).unwrap_or(0) as u8;
                    byte = (byte << bits) | index;
                    used += bits;
                    if used == 8 {
                        out.push(byte);
                        (byte, used) = (0, 0);
                    }
                }
                if used > 0 {
                    out.push(byte << (8 - used));
                }
            }
        }
        _ => {
            out.push(0);
            pf.put_all_compact(tile, side, out);
        }
    }
}

pub fn encode(
    pixels: &[u32],
    width: usize,
    height: usize,
    pf: &PixelFormat,
    stream: &mut ZStream,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    scratch.clear();
    let mut tile = Vec::with_capacity(TILE * TILE);
    for ty in (0..height).step_by(TILE) {
        for tx in (0..width).step_by(TILE) {
            let (tw, th) = ((width - tx).min(TILE), (height - ty).min(TILE));
            super::copy_tile(pixels, width, tx, ty, tw, th, &mut tile);
            encode_tile(&tile, tw, pf, scratch);
        }
    }
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    stream.deflate(scratch, out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_pick_solid_palette_or_raw() {
        let pf = PixelFormat::SERVER;
        let mut out = Vec::new();
        encode_tile(&[0x010203; 4], 2, &pf, &mut out);
        assert_eq!(out, [1, 0x03, 0x02, 0x01]);
        out.clear();
        // Two colours, 3 pixels per row, 1 bit each: rows 0b010 and 0b101, padded to a byte.
        encode_tile(&[0, 0xFFFFFF, 0, 0xFFFFFF, 0, 0xFFFFFF], 3, &pf, &mut out);
        assert_eq!(out, [2, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0b0100_0000, 0b1010_0000]);
        out.clear();
        let many: Vec<u32> = (0..17).collect();
        encode_tile(&many, 17, &pf, &mut out);
        assert_eq!(out[0], 0);
        assert_eq!(out.len(), 1 + 17 * 3);
    }
}
