//! Screenshots of a running VM for thumbnails: the daemon connects to the VM's view-only RFB socket like
//! any viewer, reads one whole frame, scales it down with a box filter and encodes it as PNG.

use std::path::Path;
use std::time::Duration;

use porthole_api::rfb::RfbClient;

/// Widest screenshot served (thumbnails are far smaller; this bounds the work a request can cause).
pub const MAX_WIDTH: u32 = 1920;

/// Why there is no screenshot.
#[derive(Debug, thiserror::Error)]
pub enum ScreenshotError {
    #[error("cannot connect to the VM's display: {0}")]
    Connect(String),
    #[error("the VM's display did not send a frame: {0}")]
    Frame(std::io::Error),
    #[error("cannot encode the PNG: {0}")]
    Encode(#[from] png::EncodingError),
}

/// A PNG of the VM's screen behind `socket`, at most `max_width` pixels wide (the aspect ratio kept;
/// never enlarged).
pub fn capture(socket: &Path, max_width: u32) -> Result<Vec<u8>, ScreenshotError> {
    let mut rfb = RfbClient::connect(socket, None).map_err(|e| ScreenshotError::Connect(e.to_string()))?;
    rfb.set_read_timeout(Some(Duration::from_secs(5))).map_err(ScreenshotError::Frame)?;
    rfb.full_frame().map_err(ScreenshotError::Frame)?;
    let (w, h, rgb) = shrink(&rfb.pixels, rfb.width, rfb.height, max_width.clamp(1, MAX_WIDTH));
    encode(w, h, &rgb)
}

/// Scales 0x00RRGGBB pixels down to at most `max_width` wide by averaging each output pixel's source box;
/// returns the size and RGB bytes.
pub fn shrink(pixels: &[u32], width: u32, height: u32, max_width: u32) -> (u32, u32, Vec<u8>) {
    let (out_w, out_h) = if width <= max_width {
        (width, height)
    } else {
        (max_width, ((u64::from(height) * u64::from(max_width) / u64::from(width)) as u32).max(1))
    };
    let mut rgb = Vec::with_capacity((out_w * out_h * 3) as usize);
    for oy in 0..out_h {
        let (y0, y1) = span(oy, out_h, height);
        for ox in 0..out_w {
            let (x0, x1) = span(ox, out_w, width);
            let mut sum = [0u64; 3];
            for y in y0..y1 {
                for &p in &pixels[(y * width + x0) as usize..(y * width + x1) as usize] {
                    sum[0] += u64::from(p >> 16 & 0xFF);
                    sum[1] += u64::from(p >> 8 & 0xFF);
                    sum[2] += u64::from(p & 0xFF);
                }
            }
            let n = u64::from((y1 - y0) * (x1 - x0));
            rgb.extend(sum.iter().map(|s| (s / n) as u8));
        }
    }
    (out_w, out_h, rgb)
}

/// The source rows (or columns) `[start, end)` that output row `i` of `out` covers out of `len`.
fn span(i: u32, out: u32, len: u32) -> (u32, u32) {
    let start = (u64::from(i) * u64::from(len) / u64::from(out)) as u32;
    let end = ((u64::from(i) + 1) * u64::from(len) / u64::from(out)) as u32;
    (start, end.max(start + 1).min(len))
}

fn encode(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, ScreenshotError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    encoder.write_header()?.write_image_data(rgb)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_averages_boxes_and_keeps_the_aspect_ratio() {
        // 4x2: left half red, right half blue → 2x1: one red, one blue pixel.
        let px = [0xFF0000, 0xFF0000, 0x0000FF, 0x0000FF, 0xFF0000, 0xFF0000, 0x0000FF, 0x0000FF];
        assert_eq!(shrink(&px, 4, 2, 2), (2, 1, vec![255, 0, 0, 0, 0, 255]));
        // A black/white checkerboard averages to grey.
        let px = [0, 0xFFFFFF, 0xFFFFFF, 0];
        assert_eq!(shrink(&px, 2, 2, 1), (1, 1, vec![127, 127, 127]));
        // Never enlarged.
        assert_eq!(shrink(&[0x123456], 1, 1, 100), (1, 1, vec![0x12, 0x34, 0x56]));
        // Odd sizes cover every source pixel exactly once.
        let (w, h, rgb) = shrink(&vec![0x808080; 641 * 481], 641, 481, 160);
        assert_eq!((w, h), (160, 120));
        assert!(rgb.iter().all(|&c| c == 0x80));
    }
}
