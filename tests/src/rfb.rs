//! A small RFB client for tests: the handshake (None or VncAuth), Raw updates into a local frame,
//! DesktopSize, key (keysym and QEMU extended) and pointer events, and raw bytes for hostile tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const RAW: i32 = 0;
pub const DESKTOP_SIZE: i32 = -223;
pub const QEMU_EXTENDED_KEY_EVENT: i32 = -258;

/// One rectangle of an update: (encoding, x, y, width, height).
pub type UpdateRect = (i32, u32, u32, u32, u32);

/// A connected client and its copy of the screen (0x00RRGGBB).
pub struct RfbClient {
    pub stream: UnixStream,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
    pub name: String,
    /// Pseudo-encodings the server has acknowledged with a rectangle.
    pub acknowledged: Vec<i32>,
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
        let mut s = UnixStream::connect(path)?;
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
            return Err(HandshakeError::Refused(
                String::from_utf8_lossy(&reason).into_owned(),
            ));
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
            return Err(HandshakeError::Refused(
                String::from_utf8_lossy(&reason).into_owned(),
            ));
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
            stream: s,
            width,
            height,
            pixels: vec![0; (width * height) as usize],
            name: String::from_utf8_lossy(&name).into_owned(),
            acknowledged: Vec::new(),
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
            self.stream.read_exact(&mut kind)?;
            match kind[0] {
                0 => break,
                150 => continue, // EndOfContinuousUpdates
                248 => {
                    let mut head = [0u8; 8];
                    self.stream.read_exact(&mut head)?;
                    let mut payload = vec![0u8; usize::from(head[7])];
                    self.stream.read_exact(&mut payload)?;
                }
                other => {
                    return Err(io::Error::other(format!(
                        "unexpected server message {other}"
                    )));
                }
            }
        }
        let mut pad = [0u8; 1];
        self.stream.read_exact(&mut pad)?;
        let n = read_u16(&mut self.stream)?;
        let mut rects = Vec::new();
        for _ in 0..n {
            let (x, y, w, h) = (
                u32::from(read_u16(&mut self.stream)?),
                u32::from(read_u16(&mut self.stream)?),
                u32::from(read_u16(&mut self.stream)?),
                u32::from(read_u16(&mut self.stream)?),
            );
            let encoding = read_u32(&mut self.stream)? as i32;
            match encoding {
                RAW => {
                    let mut data = vec![0u8; (w * h * 4) as usize];
                    self.stream.read_exact(&mut data)?;
                    for row in 0..h {
                        for col in 0..w {
                            let at = ((row * w + col) * 4) as usize;
                            let p = u32::from_le_bytes([
                                data[at],
                                data[at + 1],
                                data[at + 2],
                                data[at + 3],
                            ]);
                            self.pixels[((y + row) * self.width + x + col) as usize] =
                                p & 0xFF_FFFF;
                        }
                    }
                }
                DESKTOP_SIZE => {
                    self.width = w;
                    self.height = h;
                    self.pixels = vec![0; (w * h) as usize];
                }
                QEMU_EXTENDED_KEY_EVENT => self.acknowledged.push(encoding),
                other => return Err(io::Error::other(format!("unexpected encoding {other}"))),
            }
            rects.push((encoding, x, y, w, h));
        }
        Ok(rects)
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
                } else if encoding == RAW {
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
