//! The EDID (VESA E-EDID 1.4, one 128-byte base block) of the virtual monitor a virtio-gpu scanout shows:
//! its preferred mode is the console's size, so a guest that follows its monitor (GNOME, KDE, a
//! framebuffer console) picks exactly that resolution.
//!
//! The block holds: the header, a vendor id (`PTH`), the version (1.4), a digital input, the physical size
//! for 96 dots per inch, sRGB chromaticity, the established modes 640×480, 800×600 and 1024×768 at 60 Hz,
//! and four descriptors: the preferred mode's detailed timing (reduced blanking at 60 Hz), the range
//! limits, the monitor's name and an unused one. Checked against Debian's `edid-decode` in the tests.

/// The smallest and largest preferred modes an EDID describes: below 640×480 the pixel clock falls under
/// 10 MHz and the screen under 10 cm, which `edid-decode` rejects; a detailed timing holds 12-bit sizes
/// and a pixel clock below 655.36 MHz (3840×2160 at 60 Hz with reduced blanking needs 533 MHz).
pub const MIN_SIZE: (u32, u32) = (640, 480);
pub const MAX_SIZE: (u32, u32) = (3840, 2160);

/// The monitor's name as the guest shows it (at most 13 characters).
pub const MONITOR_NAME: &str = "Porthole";

const HBLANK: u32 = 160;
const HFRONT: u32 = 48;
const HSYNC: u32 = 32;
const VFRONT: u32 = 3;
const VSYNC: u32 = 5;
/// Vertical blanking of at least this many lines, and at least 460 µs (as CVT reduced blanking asks).
const VBLANK_MIN_LINES: u32 = 23;
const REFRESH_HZ: u64 = 60;
const DOTS_PER_INCH: u32 = 96;

/// The vertical blanking of a mode `height` lines high at 60 Hz: ≥ 460 µs of lines, ≥ 23 lines.
fn vblank(height: u32) -> u32 {
    // A frame is 1/60 s = 16 667 µs; lines of blanking b satisfy b / (height + b) × 16 667 ≥ 460.
    let lines = (u64::from(height) * 460).div_ceil(16_667 - 460) as u32;
    lines.max(VBLANK_MIN_LINES)
}

/// The size in millimetres of `pixels` at [`DOTS_PER_INCH`].
fn millimetres(pixels: u32) -> u32 {
    pixels * 254 / (DOTS_PER_INCH * 10)
}

/// The 18-byte detailed timing descriptor of `width × height` at 60 Hz.
fn detailed_timing(width: u32, height: u32) -> [u8; 18] {
    let vb = vblank(height);
    let clock_10khz = (u64::from(width + HBLANK) * u64::from(height + vb) * REFRESH_HZ).div_ceil(10_000);
    let (wmm, hmm) = (millimetres(width), millimetres(height));
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&(clock_10khz.min(0xFFFF) as u16).to_le_bytes());
    d[2] = width as u8;
    d[3] = HBLANK as u8;
    d[4] = ((width >> 8) << 4 | (HBLANK >> 8)) as u8;
    d[5] = height as u8;
    d[6] = vb as u8;
    d[7] = ((height >> 8) << 4 | (vb >> 8)) as u8;
    d[8] = HFRONT as u8;
    d[9] = HSYNC as u8;
    d[10] = ((VFRONT & 0xF) << 4 | (VSYNC & 0xF)) as u8;
    d[11] = ((HFRONT >> 8) << 6 | (HSYNC >> 8) << 4 | (VFRONT >> 4) << 2 | (VSYNC >> 4)) as u8;
    d[12] = wmm as u8;
    d[13] = hmm as u8;
    d[14] = ((wmm >> 8) << 4 | (hmm >> 8)) as u8;
    // Not interlaced, no stereo, digital separate sync, +hsync -vsync (as reduced blanking has it).
    d[17] = 0x18 | 0x02;
    d
}

/// A display descriptor (tag `tag`) holding `text`: ASCII, ended by a line feed, padded with spaces.
fn text_descriptor(tag: u8, text: &str) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let mut body = [b' '; 13];
    let bytes: Vec<u8> = text.bytes().filter(u8::is_ascii_graphic).take(12).collect();
    body[..bytes.len()].copy_from_slice(&bytes);
    body[bytes.len()] = b'\n';
    d[5..].copy_from_slice(&body);
    d
}

/// The range limits: 50–75 Hz vertical, 10–160 kHz horizontal, up to 600 MHz.
fn range_limits() -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = 0xFD;
    d[5..10].copy_from_slice(&[50, 75, 10, 160, 60]);
    // Range limits only (no secondary timing formula), then padding.
    d[10] = 0x01;
    d[11] = b'\n';
    d[12..].fill(b' ');
    d
}

/// sRGB primaries and white point (x, y), as the ten 10-bit chromaticity values EDID wants.
fn chromaticity() -> [u8; 10] {
    let v = |f: f64| (f * 1024.0).round() as u16;
    let [rx, ry, gx, gy, bx, by, wx, wy] = [0.640, 0.330, 0.300, 0.600, 0.150, 0.060, 0.3127, 0.3290].map(v);
    let lo = |a: u16, b: u16, c: u16, d: u16| ((a & 3) << 6 | (b & 3) << 4 | (c & 3) << 2 | (d & 3)) as u8;
    let mut c = [0u8; 10];
    c[0] = lo(rx, ry, gx, gy);
    c[1] = lo(bx, by, wx, wy);
    for (slot, value) in c[2..].iter_mut().zip([rx, ry, gx, gy, bx, by, wx, wy]) {
        *slot = (value >> 2) as u8;
    }
    c
}

/// Clamps a requested size into what an EDID can describe.
pub fn clamp_size(width: u32, height: u32) -> (u32, u32) {
    (width.clamp(MIN_SIZE.0, MAX_SIZE.0), height.clamp(MIN_SIZE.1, MAX_SIZE.1))
}

/// The EDID of a monitor whose preferred mode is `width × height` (clamped by [`clamp_size`]), with
/// `serial` as its serial number (one per scanout).
pub fn edid(width: u32, height: u32, serial: u32) -> [u8; 128] {
    let (width, height) = clamp_size(width, height);
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00]);
    // Vendor "PTH": three 5-bit letters ('A' = 1), big-endian.
    let letter = |c: u8| u16::from(c - b'A' + 1);
    let vendor = letter(b'P') << 10 | letter(b'T') << 5 | letter(b'H');
    e[8..10].copy_from_slice(&vendor.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    e[12..16].copy_from_slice(&serial.to_le_bytes());
    e[16] = 1; // week of manufacture
    e[17] = (2026 - 1990) as u8;
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0x80 | 0x20 | 0x05; // digital, 8 bits per colour, DisplayPort
    e[21] = millimetres(width).div_ceil(10).min(255) as u8; // size in cm
    e[22] = millimetres(height).div_ceil(10).min(255) as u8;
    e[23] = 120; // gamma 2.2: (2.2 × 100) − 100
    // RGB 4:4:4, sRGB the default colour space, the preferred mode native, continuous frequency.
    e[24] = 0x04 | 0x02 | 0x01;
    e[25..35].copy_from_slice(&chromaticity());
    e[35] = 0x21; // 640×480@60, 800×600@60
    e[36] = 0x08; // 1024×768@60
    e[38..54].fill(0x01); // no standard timings
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    e[72..90].copy_from_slice(&range_limits());
    e[90..108].copy_from_slice(&text_descriptor(0xFC, MONITOR_NAME));
    e[108..126].copy_from_slice(&text_descriptor(0xFF, &format!("{serial:08}")));
    e[126] = 0; // no extension blocks
    e[127] = 0u8.wrapping_sub(e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    e
}

/// The preferred mode's size in an EDID [`edid`] wrote (from its first detailed timing).
pub fn preferred_size(e: &[u8; 128]) -> (u32, u32) {
    let d = &e[54..72];
    let width = u32::from(d[2]) | u32::from(d[4] >> 4) << 8;
    let height = u32::from(d[5]) | u32::from(d[7] >> 4) << 8;
    (width, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_sums_to_zero_and_names_the_preferred_mode() {
        for (w, h) in [(1280, 800), (1920, 1080), (1366, 768), (3840, 2160), (640, 480), (1000, 701)] {
            let e = edid(w, h, 7);
            assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "{w}x{h}");
            assert_eq!(preferred_size(&e), (w, h));
            let clock = u32::from(u16::from_le_bytes([e[54], e[55]])) * 10_000;
            let (htotal, vtotal) = (w + HBLANK, h + vblank(h));
            let hz = f64::from(clock) / f64::from(htotal) / f64::from(vtotal);
            assert!((59.9..60.1).contains(&hz), "{w}x{h}: {hz} Hz");
            assert!(f64::from(vblank(h)) / f64::from(vtotal) * 16_667.0 >= 460.0);
        }
        assert_eq!(preferred_size(&edid(10, 10_000, 0)), (640, 2160), "clamped");
        assert_eq!(&edid(800, 600, 0)[95..104], b"Porthole\n");
    }

    /// Debian's `edid-decode` (the outside peer) parses each block and finds no conformance failure or
    /// warning (`--check`).
    #[test]
    fn edid_decode_finds_the_blocks_conformant() {
        if std::process::Command::new("edid-decode").arg("--help").output().is_err() {
            eprintln!("SKIP: edid-decode is not installed (./x test installs it)");
            return;
        }
        use std::io::Write;
        use std::process::{Command, Stdio};
        for (w, h) in [(1280, 800), (1920, 1080), (3840, 2160), (640, 480), (1366, 768), (1001, 599)] {
            let mut child = Command::new("edid-decode")
                .args(["--check", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&edid(w, h, 1)).unwrap();
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{w}x{h}: edid-decode failed:\n{text}");
            assert!(text.contains("EDID conformity: PASS"), "{w}x{h}:\n{text}");
            assert!(!text.contains("Warnings:"), "{w}x{h}:\n{text}");
            assert!(text.contains(&format!("{w}x{h}")) && text.contains("Porthole"), "{w}x{h}:\n{text}");
        }
    }
}
