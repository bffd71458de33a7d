//! RFB encodings, one file each. Every encoder takes the rectangle's pixels (0x00RRGGBB, row by row)
//! and appends the rectangle's payload (everything after the rectangle header).

pub mod hextile;
pub mod raw;
pub mod tight;
pub mod zlib;
pub mod zrle;

use std::time::{Duration, Instant};

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
///
/// Data that does not compress (video-like content, noise) is not worth zlib's time: at level 1 it costs
/// ~12 ms per MiB and saves next to nothing. So a stream that finds a large rectangle saving less than
/// 1/[`STORE_BELOW_SAVING`] of its bytes switches to stored blocks (level 0: zlib's framing around the
/// bytes as they are, a copy and a checksum) and tries the client's level again [`STORED_FOR`] later. The
/// stream stays one stream: a decoder sees ordinary deflate blocks and needs nothing new.
pub struct ZStream {
    compress: Compress,
    level: u32,
    /// Since when it has been sending stored blocks, if it is.
    storing_since: Option<Instant>,
    /// Bytes sent as stored blocks since the stream began (for tests and statistics).
    stored_bytes: u64,
}

/// A rectangle's bytes are judged only from this size on (small ones say little and cost little).
pub const JUDGED_FROM: usize = 16 * 1024;
/// A judged rectangle that saves less than 1/8 of its size switches the stream to stored blocks. Level 1
/// costs ~12 ms per MiB here; 1/8 of a MiB takes about as long on a 100 Mbit/s link, so on any faster
/// one sending the bytes as they are is quicker (a slower link is better served by JPEG, which a client
/// asks for with Tight's quality level).
pub const STORE_BELOW_SAVING: usize = 8;
/// How long a stream stores before compressing at the client's level again (and judging afresh).
pub const STORED_FOR: Duration = Duration::from_secs(1);

impl ZStream {
    pub fn new(level: u32) -> Self {
        let level = level.min(9);
        ZStream { compress: Compress::new(Compression::new(level), true), level, storing_since: None, stored_bytes: 0 }
    }

    /// Compresses `input` and appends the compressed bytes to `out`.
    pub fn deflate(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.deflate_at(input, out, Instant::now());
    }

    /// [`ZStream::deflate`] at the time `now`.
    pub fn deflate_at(&mut self, input: &[u8], out: &mut Vec<u8>, now: Instant) {
        if self.storing_since.is_some_and(|since| now.saturating_duration_since(since) >= STORED_FOR) {
            self.set_storing(None);
        }
        let start = out.len();
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
                break;
            }
        }
        if self.storing_since.is_some() {
            self.stored_bytes += input.len() as u64;
        } else if self.level > 0
            && input.len() >= JUDGED_FROM
            && (input.len() - (out.len() - start).min(input.len())) * STORE_BELOW_SAVING < input.len()
        {
            self.set_storing(Some(now));
        }
    }

    /// Switches between stored blocks and the client's level. The stream was just flushed, so zlib
    /// changes its parameters without emitting anything.
    fn set_storing(&mut self, since: Option<Instant>) {
        let level = if since.is_some() { Compression::none() } else { Compression::new(self.level) };
        if self.compress.set_level(level).is_ok() {
            self.storing_since = since;
        }
    }

    /// Whether it is sending stored blocks now.
    pub fn storing(&self) -> bool {
        self.storing_since.is_some()
    }

    /// Bytes sent as stored blocks since the stream began.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
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

    /// Bytes no compressor can shrink (a xorshift generator's).
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn zstream_stores_what_does_not_compress_and_tries_again_later() {
        let text: Vec<u8> = (0..64 * 1024).map(|i| b"the quick brown fox "[i % 20]).collect();
        let mut z = ZStream::new(1);
        let mut d = Decompress::new(true);
        let t0 = Instant::now();
        let mut send = |z: &mut ZStream, input: &[u8], at: Duration| {
            let mut out = Vec::new();
            z.deflate_at(input, &mut out, t0 + at);
            assert_eq!(inflate(&mut d, &out), input, "the stream decodes across every switch");
            out.len()
        };
        // Text compresses: the stream keeps compressing.
        assert!(send(&mut z, &text, Duration::ZERO) < text.len() / 10);
        assert!(!z.storing());
        // A small incompressible rectangle is not judged.
        send(&mut z, &noise(JUDGED_FROM - 1, 1), Duration::ZERO);
        assert!(!z.storing());
        // A large one switches to stored blocks; what follows is sent as it is, text too, for STORED_FOR.
        send(&mut z, &noise(256 * 1024, 2), Duration::ZERO);
        assert!(z.storing());
        let stored = send(&mut z, &noise(256 * 1024, 3), Duration::from_millis(10));
        assert!((256 * 1024..256 * 1024 + 256).contains(&stored), "stored blocks: {stored} bytes");
        assert!(send(&mut z, &text, STORED_FOR / 2) >= text.len());
        assert_eq!(z.stored_bytes(), 256 * 1024 + text.len() as u64);
        // Then it compresses again, and keeps doing so for what compresses.
        assert!(send(&mut z, &text, STORED_FOR + Duration::from_millis(10)) < text.len() / 10);
        assert!(!z.storing());
        // A client that asked for level 0 gets stored blocks without any judging.
        let mut z0 = ZStream::new(0);
        let mut out = Vec::new();
        z0.deflate_at(&text, &mut out, t0);
        assert!(out.len() >= text.len() && !z0.storing());
    }
}
