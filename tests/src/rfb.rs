//! A small RFB client for tests: the handshake (None or VncAuth), Raw updates into a local frame,
//! DesktopSize, key (keysym and QEMU extended) and pointer events, and raw bytes for hostile tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use flate2::{Decompress, FlushDecompress};

pub use vmm_core::rfb::encoding::{
    COPY_RECT, CURSOR, DESKTOP_SIZE, HEXTILE, QEMU_EXTENDED_KEY_EVENT, RAW, TIGHT, ZLIB, ZRLE,
};

/// One rectangle of an update: (encoding, x, y, width, height).
pub type UpdateRect = (i32, u32, u32, u32, u32);

/// A connected client and its copy of the screen (0x00RRGGBB).
pub struct RfbClient {
    pub stream: UnixStream,
    reader: io::BufReader<UnixStream>,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
    pub name: String,
    /// Pseudo-encodings the server has acknowledged with a rectangle.
    pub acknowledged: Vec<i32>,
    /// Bytes received in framebuffer updates.
    pub bytes_received: u64,
    /// The last cursor shape received: (width, height, pixels then mask).
    pub cursor: Option<(u32, u32, Vec<u8>)>,
    zlib: Decompress,
    zrle: Decompress,
    tight: [Decompress; 4],
}

/// Inflates exactly one sync-flushed chunk of a persistent zlib stream.
fn inflate(d: &mut Decompress, data: &[u8], expected: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(expected);
    let mut at = 0;
    while out.len() < expected {
        out.reserve(expected - out.len() + 1);
        let (before_in, before_out) = (d.total_in(), d.total_out());
        d.decompress_vec(&data[at..], &mut out, FlushDecompress::Sync).map_err(io::Error::other)?;
        at += (d.total_in() - before_in) as usize;
        if d.total_in() == before_in && d.total_out() == before_out {
            break;
        }
    }
    if out.len() != expected {
        return Err(io::Error::other(format!("zlib data inflated to {} bytes, expected {expected}", out.len())));
    }
    Ok(out)
}

fn compact_len(s: &mut impl Read) -> io::Result<usize> {
    let mut len = 0usize;
    for i in 0..3 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        if i == 2 {
            return Ok(len | usize::from(b[0]) << 14);
        }
        len |= usize::from(b[0] & 0x7F) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    Ok(len)
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    /// The server refused, with its reason.
    Refused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl RfbClient {
    /// Connects with RFB 3.8; `password` answers VncAuth (with the DES key VNC derives from it).
    pub fn connect(path: &Path, password: Option<&str>) -> Result<RfbClient, HandshakeError> {
        Self::over(UnixStream::connect(path)?, password)
    }

    /// The same handshake over a stream that is already connected (e.g. one end of a socket pair bridged
    /// to a WebSocket console).
    pub fn over(mut s: UnixStream, password: Option<&str>) -> Result<RfbClient, HandshakeError> {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut version = [0u8; 12];
        s.read_exact(&mut version)?;
        assert_eq!(&version, b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n")?;
        let mut count = [0u8; 1];
        s.read_exact(&mut count)?;
        if count[0] == 0 {
            let len = read_u32(&mut s)? as usize;
            let mut reason = vec![0u8; len.min(4096)];
            s.read_exact(&mut reason)?;
            return Err(HandshakeError::Refused(String::from_utf8_lossy(&reason).into_owned()));
        }
        let mut types = vec![0u8; usize::from(count[0])];
        s.read_exact(&mut types)?;
        let chosen = if types.contains(&2) { 2 } else { 1 };
        s.write_all(&[chosen])?;
        if chosen == 2 {
            let mut challenge = [0u8; 16];
            s.read_exact(&mut challenge)?;
            let key = vmm_core::rfb::auth::key_from_password(password.unwrap_or("").as_bytes());
            s.write_all(&vmm_core::rfb::auth::response(&key, &challenge))?;
        }
        if read_u32(&mut s)? != 0 {
            let len = read_u32(&mut s)? as usize;
            let mut reason = vec![0u8; len.min(4096)];
            s.read_exact(&mut reason)?;
            return Err(HandshakeError::Refused(String::from_utf8_lossy(&reason).into_owned()));
        }
        s.write_all(&[1])?; // shared
        let (width, height) = (u32::from(read_u16(&mut s)?), u32::from(read_u16(&mut s)?));
        let mut pf = [0u8; 16];
        s.read_exact(&mut pf)?;
        assert_eq!(pf[0], 32, "the server offers 32 bits per pixel");
        let len = read_u32(&mut s)? as usize;
        let mut name = vec![0u8; len];
        s.read_exact(&mut name)?;
        Ok(RfbClient {
            reader: io::BufReader::with_capacity(1 << 20, s.try_clone()?),
            stream: s,
            width,
            height,
            pixels: vec![0; (width * height) as usize],
            name: String::from_utf8_lossy(&name).into_owned(),
            acknowledged: Vec::new(),
            bytes_received: 0,
            cursor: None,
            zlib: Decompress::new(true),
            zrle: Decompress::new(true),
            tight: [Decompress::new(true), Decompress::new(true), Decompress::new(true), Decompress::new(true)],
        })
    }

    pub fn set_encodings(&mut self, encodings: &[i32]) -> io::Result<()> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
        for e in encodings {
            m.extend_from_slice(&e.to_be_bytes());
        }
        self.stream.write_all(&m)
    }

    pub fn request(&mut self, incremental: bool) -> io::Result<()> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&(self.width as u16).to_be_bytes());
        m.extend_from_slice(&(self.height as u16).to_be_bytes());
        self.stream.write_all(&m)
    }

    pub fn key(&mut self, keysym: u32, down: bool) -> io::Result<()> {
        let mut m = vec![4, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        self.stream.write_all(&m)
    }

    pub fn qemu_key(&mut self, keysym: u32, keycode: u32, down: bool) -> io::Result<()> {
        let mut m = vec![255, 0];
        m.extend_from_slice(&u16::from(down).to_be_bytes());
        m.extend_from_slice(&keysym.to_be_bytes());
        m.extend_from_slice(&keycode.to_be_bytes());
        self.stream.write_all(&m)
    }

    pub fn pointer(&mut self, x: u16, y: u16, buttons: u8) -> io::Result<()> {
        let mut m = vec![5, buttons];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        self.stream.write_all(&m)
    }

    /// Reads server messages until one framebuffer update has been applied; returns its rectangles as
    /// (encoding, x, y, w, h). Only Raw pixel data is understood.
    pub fn read_update(&mut self) -> io::Result<Vec<UpdateRect>> {
        loop {
            let mut kind = [0u8; 1];
            self.reader.read_exact(&mut kind)?;
            match kind[0] {
                0 => break,
                150 => continue, // EndOfContinuousUpdates
                248 => {
                    let mut head = [0u8; 8];
                    self.reader.read_exact(&mut head)?;
                    let mut payload = vec![0u8; usize::from(head[7])];
                    self.reader.read_exact(&mut payload)?;
                }
                other => {
                    return Err(io::Error::other(format!("unexpected server message {other}")));
                }
            }
        }
        let mut pad = [0u8; 1];
        self.reader.read_exact(&mut pad)?;
        let n = read_u16(&mut self.reader)?;
        let mut rects = Vec::new();
        for _ in 0..n {
            let (x, y, w, h) = (
                u32::from(read_u16(&mut self.reader)?),
                u32::from(read_u16(&mut self.reader)?),
                u32::from(read_u16(&mut self.reader)?),
                u32::from(read_u16(&mut self.reader)?),
            );
            let encoding = read_u32(&mut self.reader)? as i32;
            match encoding {
                RAW => {
                    let mut data = vec![0u8; (w * h * 4) as usize];
                    self.reader.read_exact(&mut data)?;
                    self.bytes_received += data.len() as u64;
                    for row in 0..h {
                        for col in 0..w {
                            let at = ((row * w + col) * 4) as usize;
                            let p = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
                            self.pixels[((y + row) * self.width + x + col) as usize] = p & 0xFF_FFFF;
                        }
                    }
                }
                COPY_RECT => {
                    let (sx, sy) = (u32::from(read_u16(&mut self.reader)?), u32::from(read_u16(&mut self.reader)?));
                    self.bytes_received += 4;
                    let mut moved = Vec::with_capacity((w * h) as usize);
                    for row in 0..h {
                        let at = ((sy + row) * self.width + sx) as usize;
                        moved.extend_from_slice(&self.pixels[at..at + w as usize]);
                    }
                    self.put_pixels(x, y, w, &moved);
                }
                HEXTILE => self.hextile(x, y, w, h)?,
                ZLIB => {
                    let len = read_u32(&mut self.reader)? as usize;
                    let mut data = vec![0u8; len];
                    self.reader.read_exact(&mut data)?;
                    self.bytes_received += len as u64 + 4;
                    let raw = inflate(&mut self.zlib, &data, (w * h * 4) as usize)?;
                    self.put_pixels(
                        x,
                        y,
                        w,
                        &raw.chunks_exact(4).map(|p| u32::from_le_bytes([p[0], p[1], p[2], 0])).collect::<Vec<_>>(),
                    );
                }
                ZRLE => self.zrle(x, y, w, h)?,
                TIGHT => self.tight(x, y, w, h)?,
                DESKTOP_SIZE => {
                    self.width = w;
                    self.height = h;
                    self.pixels = vec![0; (w * h) as usize];
                }
                QEMU_EXTENDED_KEY_EVENT => self.acknowledged.push(encoding),
                CURSOR => {
                    let mut shape = vec![0u8; (w * h * 4 + w.div_ceil(8) * h) as usize];
                    self.reader.read_exact(&mut shape)?;
                    self.cursor = Some((w, h, shape));
                }
                other => return Err(io::Error::other(format!("unexpected encoding {other}"))),
            }
            rects.push((encoding, x, y, w, h));
        }
        Ok(rects)
    }

    fn put_pixels(&mut self, x: u32, y: u32, w: u32, pixels: &[u32]) {
        for (i, p) in pixels.iter().enumerate() {
            let (col, row) = (i as u32 % w, i as u32 / w);
            self.pixels[((y + row) * self.width + x + col) as usize] = p & 0xFF_FFFF;
        }
    }

    fn pixel32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.reader.read_exact(&mut b)?;
        self.bytes_received += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }

    fn hextile(&mut self, x: u32, y: u32, w: u32, h: u32) -> io::Result<()> {
        let (mut bg, mut fg) = (0u32, 0u32);
        for ty in (y..y + h).step_by(16) {
            for tx in (x..x + w).step_by(16) {
                let (tw, th) = ((x + w - tx).min(16), (y + h - ty).min(16));
                let mut sub = [0u8; 1];
                self.reader.read_exact(&mut sub)?;
                self.bytes_received += 1;
                let sub = sub[0];
                if sub & 1 != 0 {
                    let mut tile = Vec::with_capacity((tw * th) as usize);
                    for _ in 0..tw * th {
                        tile.push(self.pixel32()?);
                    }
                    self.put_pixels(tx, ty, tw, &tile);
                    continue;
                }
                if sub & 2 != 0 {
                    bg = self.pixel32()?;
                }
                self.put_pixels(tx, ty, tw, &vec![bg; (tw * th) as usize]);
                if sub & 4 != 0 {
                    fg = self.pixel32()?;
                }
                if sub & 8 != 0 {
                    let mut n = [0u8; 1];
                    self.reader.read_exact(&mut n)?;
                    for _ in 0..n[0] {
                        let colour = if sub & 16 != 0 { self.pixel32()? } else { fg };
                        let mut xy = [0u8; 2];
                        self.reader.read_exact(&mut xy)?;
                        let (sx, sy, sw, sh) = (
                            u32::from(xy[0] >> 4),
                            u32::from(xy[0] & 15),
                            u32::from(xy[1] >> 4) + 1,
                            u32::from(xy[1] & 15) + 1,
                        );
                        for r in 0..sh {
                            for c in 0..sw {
                                self.pixels[((ty + sy + r) * self.width + tx + sx + c) as usize] = colour;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn zrle(&mut self, x: u32, y: u32, w: u32, h: u32) -> io::Result<()> {
        let len = read_u32(&mut self.reader)? as usize;
        let mut data = vec![0u8; len];
        self.reader.read_exact(&mut data)?;
        self.bytes_received += len as u64 + 4;
        // The inflated size is not known up front: inflate what this chunk holds.
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            out.reserve(256 * 1024);
            let before = (self.zrle.total_in(), self.zrle.total_out());
            self.zrle.decompress_vec(&data[at..], &mut out, FlushDecompress::Sync).map_err(io::Error::other)?;
            at += (self.zrle.total_in() - before.0) as usize;
            if at == data.len() && out.len() < out.capacity() {
                break;
            }
            if (self.zrle.total_in(), self.zrle.total_out()) == before {
                break;
            }
        }
        let mut r = &out[..];
        let cpixel = |r: &mut &[u8]| -> io::Result<u32> {
            let mut b = [0u8; 3];
            r.read_exact(&mut b)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
        };
        for ty in (y..y + h).step_by(64) {
            for tx in (x..x + w).step_by(64) {
                let (tw, th) = ((x + w - tx).min(64), (y + h - ty).min(64));
                let n = (tw * th) as usize;
                let mut sub = [0u8; 1];
                r.read_exact(&mut sub)?;
                let sub = sub[0];
                let mut tile = Vec::with_capacity(n);
                match sub {
                    0 => {
                        for _ in 0..n {
                            tile.push(cpixel(&mut r)?);
                        }
                    }
                    1 => tile = vec![cpixel(&mut r)?; n],
                    2..=16 => {
                        let palette: Vec<u32> = (0..sub).map(|_| cpixel(&mut r)).collect::<io::Result<_>>()?;
                        let bits = match sub {
                            2 => 1,
                            3..=4 => 2,
                            _ => 4,
                        };
                        for _ in 0..th {
                            let (mut byte, mut left) = (0u8, 0);
                            for _ in 0..tw {
                                if left == 0 {
                                    let mut b = [0u8; 1];
                                    r.read_exact(&mut b)?;
                                    (byte, left) = (b[0], 8);
                                }
                                let index = byte >> (8 - bits);
                                byte <<= bits;
                                left -= bits;
                                tile.push(
                                    *palette
                                        .get(usize::from(index))
                                        .ok_or_else(|| io::Error::other("palette index"))?,
                                );
                            }
                        }
                    }
                    128 | 130..=255 => {
                        let palette: Vec<u32> = if sub == 128 {
                            Vec::new()
                        } else {
                            (0..sub - 128).map(|_| cpixel(&mut r)).collect::<io::Result<_>>()?
                        };
                        while tile.len() < n {
                            let (colour, run) = if sub == 128 {
                                (cpixel(&mut r)?, true)
                            } else {
                                let mut b = [0u8; 1];
                                r.read_exact(&mut b)?;
                                (
                                    *palette
                                        .get(usize::from(b[0] & 0x7F))
                                        .ok_or_else(|| io::Error::other("palette index"))?,
                                    b[0] & 0x80 != 0,
                                )
                            };
                            let mut count = 1;
                            if run {
                                loop {
                                    let mut b = [0u8; 1];
                                    r.read_exact(&mut b)?;
                                    count += usize::from(b[0]);
                                    if b[0] != 255 {
                                        break;
                                    }
                                }
                            }
                            tile.extend(std::iter::repeat_n(colour, count.min(n - tile.len())));
                        }
                    }
                    other => return Err(io::Error::other(format!("ZRLE subencoding {other}"))),
                }
                self.put_pixels(tx, ty, tw, &tile);
            }
        }
        Ok(())
    }

    fn tight(&mut self, x: u32, y: u32, w: u32, h: u32) -> io::Result<()> {
        let mut c = [0u8; 1];
        self.reader.read_exact(&mut c)?;
        let control = c[0];
        for i in 0..4 {
            if control & (1 << i) != 0 {
                self.tight[i] = Decompress::new(true);
            }
        }
        let rgb = |b: &[u8]| u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        match control >> 4 {
            8 => {
                let mut b = [0u8; 3];
                self.reader.read_exact(&mut b)?;
                self.bytes_received += 4;
                self.put_pixels(x, y, w, &vec![rgb(&b); (w * h) as usize]);
            }
            9 => {
                let len = compact_len(&mut self.reader)?;
                let mut data = vec![0u8; len];
                self.reader.read_exact(&mut data)?;
                self.bytes_received += len as u64 + 4;
                let mut decoder = jpeg_decoder::Decoder::new(&data[..]);
                let decoded = decoder.decode().map_err(io::Error::other)?;
                self.put_pixels(x, y, w, &decoded.chunks_exact(3).map(rgb).collect::<Vec<_>>());
            }
            basic if basic < 8 => {
                if control & 0x40 != 0 {
                    let mut filter = [0u8; 1];
                    self.reader.read_exact(&mut filter)?;
                    if filter[0] != 0 {
                        return Err(io::Error::other(format!(
                            "Tight filter {} not supported by the test client",
                            filter[0]
                        )));
                    }
                }
                let size = (w * h * 3) as usize;
                let raw = if size < 12 {
                    let mut data = vec![0u8; size];
                    self.reader.read_exact(&mut data)?;
                    data
                } else {
                    let len = compact_len(&mut self.reader)?;
                    let mut data = vec![0u8; len];
                    self.reader.read_exact(&mut data)?;
                    self.bytes_received += len as u64;
                    inflate(&mut self.tight[usize::from(basic & 3)], &data, size)?
                };
                self.put_pixels(x, y, w, &raw.chunks_exact(3).map(rgb).collect::<Vec<_>>());
            }
            other => return Err(io::Error::other(format!("Tight compression {other:#x}"))),
        }
        Ok(())
    }

    /// Asks for the whole screen and reads updates until every pixel has arrived.
    pub fn full_frame(&mut self) -> io::Result<()> {
        self.request(false)?;
        let mut covered = 0u64;
        let total = u64::from(self.width) * u64::from(self.height);
        while covered < total {
            for (encoding, _, _, w, h) in self.read_update()? {
                if encoding == DESKTOP_SIZE {
                    covered = 0;
                    self.request(false)?;
                } else if [RAW, HEXTILE, ZLIB, ZRLE, TIGHT].contains(&encoding) {
                    covered += u64::from(w) * u64::from(h);
                }
            }
            if covered < total {
                self.request(true)?;
            }
        }
        Ok(())
    }

    pub fn pixel(&self, x: u32, y: u32) -> u32 {
        self.pixels[(y * self.width + x) as usize]
    }
}
