//! An RFB (VNC) client: RFB 3.3/3.7/3.8, security None and VncAuth, 32-bit true colour, encodings Raw,
//! CopyRect, Hextile, Zlib, ZRLE and Tight (with JPEG), pseudo-encodings DesktopSize, ExtendedDesktopSize
//! (the client can ask for a screen size), Cursor, LastRect, QEMU extended key events and the extended
//! clipboard (UTF-8 text); key (keysym and scancode), pointer and cut-text input. Used by the GUI's console
//! and by the tests.
//!
//! The server is not trusted: every rectangle is checked against the screen, every length is bounded, and
//! decompression stops at the size the rectangle can hold, so a hostile server gets an error, never a panic
//! or an unbounded allocation. (vnc-rs was the first choice; it has no Hextile, Zlib or QEMU extended key
//! events and its encoding enum is closed, so the console would lose layout-independent keys.)

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use flate2::{Decompress, FlushDecompress};

/// Encoding numbers (RFC 6143 §7.7 and the community registry).
pub const RAW: i32 = 0;
pub const COPY_RECT: i32 = 1;
pub const HEXTILE: i32 = 5;
pub const ZLIB: i32 = 6;
pub const TIGHT: i32 = 7;
pub const ZRLE: i32 = 16;
pub const CURSOR: i32 = -239;
pub const DESKTOP_SIZE: i32 = -223;
pub const LAST_RECT: i32 = -224;
pub const QEMU_EXTENDED_KEY_EVENT: i32 = -258;
/// QEMU's LED state pseudo-encoding: the guest keyboard's lock lights, one byte (see [`crate::KeyboardLeds::from_led_state`]).
pub const LED_STATE: i32 = -261;
/// QEMU's audio pseudo-encoding: a server with sound acknowledges it, then sends the guest's sound in QEMU
/// server messages once the client enables it ([`audio_enable_message`]).
pub const QEMU_AUDIO: i32 = -259;
/// QEMU audio sample formats a client may ask for (SetFormat): signed 16-bit is the one Porthole plays.
pub const QEMU_AUDIO_S16: u8 = 3;
/// The largest audio data message accepted from a server (QEMU sends a few KiB at a time).
const MAX_AUDIO_DATA: usize = 1 << 20;

/// What a server's QEMU audio messages say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioMessage {
    /// The guest started playing.
    Begin,
    /// Samples in the format asked for (interleaved, little-endian).
    Data(Vec<u8>),
    /// The guest stopped playing.
    End,
}

/// QEMU client message: the audio format (`format` e.g. [`QEMU_AUDIO_S16`], `channels` 1 or 2, `rate` Hz).
pub fn audio_format_message(format: u8, channels: u8, rate: u32) -> Vec<u8> {
    let mut m = vec![255, 1, 0, 2, format, channels];
    m.extend_from_slice(&rate.to_be_bytes());
    m
}

/// QEMU client message: send the guest's sound (`true`) or stop sending it.
pub fn audio_enable_message(enable: bool) -> Vec<u8> {
    vec![255, 1, 0, if enable { 0 } else { 1 }]
}
/// The client may ask for another screen size (SetDesktopSize); the server reports sizes and screens.
pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
/// Clipboard in any format, UTF-8 text, compressed, fetched on demand (0xC0A1E5CE).
pub const EXTENDED_CLIPBOARD: i32 = 0xC0A1_E5CE_u32 as i32;

/// Extended clipboard flags: the text format, and the actions.
const CLIP_TEXT: u32 = 1;
const CLIP_CAPS: u32 = 1 << 24;
const CLIP_REQUEST: u32 = 1 << 25;
const CLIP_PEEK: u32 = 1 << 26;
const CLIP_NOTIFY: u32 = 1 << 27;
const CLIP_PROVIDE: u32 = 1 << 28;
/// Largest clipboard text this client takes or offers (the limit it announces).
pub const MAX_CLIPBOARD: usize = 1 << 20;

/// Where the extended clipboard stands: what the server asked for or offered that the client has not
/// answered yet (see [`RfbClient::clipboard_replies`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClipboardState {
    /// The server speaks the extended clipboard (it sent its capabilities).
    pub extended: bool,
    /// Our capabilities are still to be sent.
    caps_due: bool,
    /// The server has new text: ask for it.
    offered: bool,
    /// The server wants our text.
    requested: bool,
}

/// SetDesktopSize: one screen (`id`, as the server named it) covering `width` x `height`.
pub fn set_desktop_size_message(screen_id: u32, width: u16, height: u16) -> Vec<u8> {
    let mut m = vec![251, 0];
    m.extend_from_slice(&width.to_be_bytes());
    m.extend_from_slice(&height.to_be_bytes());
    m.extend_from_slice(&[1, 0]);
    m.extend_from_slice(&screen_id.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&width.to_be_bytes());
    m.extend_from_slice(&height.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m
}

/// An extended ClientCutText message: the flags and the payload after them.
fn clipboard_message(flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![6, 0, 0, 0];
    m.extend_from_slice(&(-((payload.len() + 4) as i32)).to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// "This client has new text on its clipboard" (the server asks for it when someone pastes).
pub fn clipboard_notify_message() -> Vec<u8> {
    clipboard_message(CLIP_NOTIFY | CLIP_TEXT, &[])
}

/// The clipboard's text, compressed, in answer to a request.
pub fn clipboard_provide_message(text: &str) -> Vec<u8> {
    let mut raw = text.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes();
    raw.truncate(MAX_CLIPBOARD - 1);
    raw.push(0);
    let mut plain = (raw.len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(&raw);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = z.write_all(&plain);
    clipboard_message(CLIP_PROVIDE | CLIP_TEXT, &z.finish().unwrap_or_default())
}
/// Tight JPEG quality levels -32 (lowest) .. -23 (highest).
pub const JPEG_QUALITY_6: i32 = -26;
pub const JPEG_QUALITY_8: i32 = -24;

/// How the console asks for pixels, chosen by the throughput the server's updates arrive at, as TigerVNC's
/// viewer chooses ("automatic selection"): lossless on a fast link (a local socket, a LAN), Tight with JPEG
/// for the parts of the screen with many colours on a slower one — quality 8 below 50 Mbit/s, quality 6
/// below 16 Mbit/s (TigerVNC's threshold between the two) — and back up once the link measures twice the
/// threshold it went down at (so a link near one does not flip at every update).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PictureQuality {
    /// ZRLE first: every pixel exact.
    Lossless,
    /// Tight, JPEG at quality 8 for tiles of many colours (few-colour tiles stay exact).
    Jpeg8,
    /// Tight, JPEG at quality 6.
    Jpeg6,
}

impl PictureQuality {
    /// The encodings to announce, best first, followed by `pseudo` (the client's pseudo-encodings).
    pub fn encodings(self, pseudo: &[i32]) -> Vec<i32> {
        let mut list = match self {
            PictureQuality::Lossless => vec![ZRLE, HEXTILE, ZLIB, TIGHT, RAW, COPY_RECT],
            PictureQuality::Jpeg8 => vec![TIGHT, ZRLE, HEXTILE, ZLIB, RAW, COPY_RECT, JPEG_QUALITY_8],
            PictureQuality::Jpeg6 => vec![TIGHT, ZRLE, HEXTILE, ZLIB, RAW, COPY_RECT, JPEG_QUALITY_6],
        };
        list.extend_from_slice(pseudo);
        list
    }
}

/// The link's throughput, estimated from updates' transfers, and the [`PictureQuality`] it calls for.
#[derive(Debug, Clone)]
pub struct QualityChooser {
    /// Bytes and seconds of recent transfers, each halved at every new one (recent ones weigh more).
    bytes: f64,
    seconds: f64,
    quality: PictureQuality,
}

impl Default for QualityChooser {
    fn default() -> Self {
        QualityChooser { bytes: 0.0, seconds: 0.0, quality: PictureQuality::Lossless }
    }
}

impl QualityChooser {
    /// Transfers smaller than this say more about latency than throughput and are not counted.
    pub const MIN_TRANSFER: u64 = 64 * 1024;
    /// Going down below these (bits per second); coming back up above twice them.
    pub const JPEG8_BELOW: f64 = 50e6;
    pub const JPEG6_BELOW: f64 = 16e6;

    pub fn quality(&self) -> PictureQuality {
        self.quality
    }

    /// The estimate in bits per second, once a transfer counted.
    pub fn bits_per_second(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.bytes * 8.0 / self.seconds)
    }

    /// Counts one update's transfer (see [`RfbClient::last_transfer`]); returns the new quality when it changes.
    pub fn observe(&mut self, bytes: u64, took: Duration) -> Option<PictureQuality> {
        if bytes < Self::MIN_TRANSFER {
            return None;
        }
        self.bytes = self.bytes / 2.0 + bytes as f64;
        self.seconds = self.seconds / 2.0 + took.as_secs_f64().max(1e-6);
        let bps = self.bits_per_second()?;
        let next = match self.quality {
            PictureQuality::Lossless if bps < Self::JPEG6_BELOW => PictureQuality::Jpeg6,
            PictureQuality::Lossless if bps < Self::JPEG8_BELOW => PictureQuality::Jpeg8,
            PictureQuality::Jpeg8 if bps < Self::JPEG6_BELOW => PictureQuality::Jpeg6,
            PictureQuality::Jpeg8 | PictureQuality::Jpeg6 if bps > 2.0 * Self::JPEG8_BELOW => PictureQuality::Lossless,
            PictureQuality::Jpeg6 if bps > 2.0 * Self::JPEG6_BELOW => PictureQuality::Jpeg8,
            same => same,
        };
        (next != self.quality).then(|| {
            self.quality = next;
            next
        })
    }
}

/// The client's side of the stream, counting the bytes read and the time spent in those reads (waiting for
/// the network included, decoding not): what an update's transfer took.
struct TimedReads {
    stream: UnixStream,
    bytes: u64,
    busy: Duration,
}

impl Read for TimedReads {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        let n = self.stream.read(buf)?;
        self.busy += started.elapsed();
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Largest screen accepted from a server.
pub const MAX_SIDE: u32 = 8192;
/// Largest compressed block, cut text or name accepted from a server.
const MAX_BLOCK: usize = 64 << 20;
const MAX_CUT_TEXT: usize = 1 << 20;

/// One rectangle of an update: (encoding, x, y, width, height).
pub type UpdateRect = (i32, u32, u32, u32, u32);

/// A connected client and its copy of the screen (0x00RRGGBB).
pub struct RfbClient {
    /// The last text the server put on the clipboard.
    pub cut_text: Option<String>,
    pub stream: UnixStream,
    reader: io::BufReader<TimedReads>,
    /// The last update's transfer: bytes and time read after its first byte (see [`RfbClient::last_transfer`]).
    transfer: Option<(u64, Duration)>,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
    pub name: String,
    /// Pseudo-encodings the server has acknowledged with a rectangle.
    pub acknowledged: Vec<i32>,
    /// The id of the server's first screen (ExtendedDesktopSize), for SetDesktopSize.
    pub screen_id: u32,
    /// The status of the server's answer to our last SetDesktopSize (0: done), if one came.
    pub resize_status: Option<u32>,
    pub clipboard: ClipboardState,
    /// Bytes received in framebuffer updates.
    pub bytes_received: u64,
    /// The last cursor shape received: (width, height, pixels then mask).
    pub cursor: Option<(u32, u32, Vec<u8>)>,
    /// The guest keyboard's lock lights, once the server sent them (LED state pseudo-encoding).
    pub lock_lights: Option<crate::KeyboardLeds>,
    /// Where the server's audio messages go as they are read (QEMU audio; dropped without a sink).
    pub audio_sink: Option<Box<dyn FnMut(AudioMessage) + Send>>,
    zlib: Decompress,
    zrle: Decompress,
    tight: [Decompress; 4],
    /// libjpeg-turbo's decompressor, made at the first Tight JPEG rectangle.
    jpeg: Option<turbojpeg::Decompressor>,
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

/// Undoes Tight's gradient filter: each byte is the difference from left + up - up-left (clamped).
fn gradient(diffs: &[u8], w: usize, h: usize) -> Vec<u32> {
    let mut out = vec![[0u8; 3]; w * h];
    for row in 0..h {
        for col in 0..w {
            let mut px = [0u8; 3];
            for c in 0..3 {
                let left = if col > 0 { i32::from(out[row * w + col - 1][c]) } else { 0 };
                let up = if row > 0 { i32::from(out[(row - 1) * w + col][c]) } else { 0 };
                let up_left = if row > 0 && col > 0 { i32::from(out[(row - 1) * w + col - 1][c]) } else { 0 };
                let predicted = (left + up - up_left).clamp(0, 255) as u8;
                px[c] = predicted.wrapping_add(diffs[(row * w + col) * 3 + c]);
            }
            out[row * w + col] = px;
        }
    }
    out.iter().map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])).collect()
}

/// Reads and drops `n` bytes.
fn skip(s: &mut impl Read, n: usize) -> io::Result<()> {
    let copied = io::copy(&mut s.take(n as u64), &mut io::sink())?;
    if copied as usize == n { Ok(()) } else { Err(io::ErrorKind::UnexpectedEof.into()) }
}

/// Reads a length-prefixed block of at most MAX_BLOCK bytes.
fn read_block(s: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    if len > MAX_BLOCK {
        return Err(io::Error::other(format!("a {len}-byte block from the server is too large")));
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok(data)
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
    /// The server wants VncAuth and no password was given.
    PasswordNeeded,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "{e}"),
            HandshakeError::Refused(why) => write!(f, "the server refused: {why}"),
            HandshakeError::PasswordNeeded => write!(f, "the server needs a password"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// The VncAuth response: the challenge encrypted with DES, keyed by the first 8 bytes of the password with
/// each byte's bits mirrored (RFC 6143 §7.2.2 and the VNC tradition it documents).
pub fn vnc_auth_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    use des::cipher::{BlockEncrypt, KeyInit};
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(block.into());
    }
    out
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
    /// to a WebSocket console). Speaks RFB 3.8, 3.7 or 3.3, whichever the server offers, and asks for
    /// 32-bit little-endian true colour.
    pub fn over(mut s: UnixStream, password: Option<&str>) -> Result<RfbClient, HandshakeError> {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut version = [0u8; 12];
        s.read_exact(&mut version)?;
        let minor = match &version {
            b"RFB 003.003\n" => 3,
            b"RFB 003.007\n" => 7,
            v if v.starts_with(b"RFB 003.") || v.starts_with(b"RFB 004.") || v.starts_with(b"RFB 005.") => 8,
            _ => {
                return Err(HandshakeError::Refused(format!(
                    "not an RFB server: {:?}",
                    String::from_utf8_lossy(&version)
                )));
            }
        };
        s.write_all(format!("RFB 003.00{minor}\n").as_bytes())?;
        let refused = |s: &mut UnixStream| -> Result<RfbClient, HandshakeError> {
            let len = (read_u32(s)? as usize).min(4096);
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason)?;
            Err(HandshakeError::Refused(String::from_utf8_lossy(&reason).into_owned()))
        };
        let chosen = if minor == 3 {
            match read_u32(&mut s)? {
                0 => return refused(&mut s),
                t @ (1 | 2) => t as u8,
                other => return Err(HandshakeError::Refused(format!("unsupported security type {other}"))),
            }
        } else {
            let mut count = [0u8; 1];
            s.read_exact(&mut count)?;
            if count[0] == 0 {
                return refused(&mut s);
            }
            let mut types = vec![0u8; usize::from(count[0])];
            s.read_exact(&mut types)?;
            let chosen = if types.contains(&1) && password.is_none() {
                1
            } else if types.contains(&2) {
                2
            } else if types.contains(&1) {
                1
            } else {
                return Err(HandshakeError::Refused(format!(
                    "no security type this client speaks (offered {types:?})"
                )));
            };
            s.write_all(&[chosen])?;
            chosen
        };
        if chosen == 2 {
            let Some(password) = password else { return Err(HandshakeError::PasswordNeeded) };
            let mut challenge = [0u8; 16];
            s.read_exact(&mut challenge)?;
            s.write_all(&vnc_auth_response(password.as_bytes(), &challenge))?;
        }
        if (chosen == 2 || minor == 8) && read_u32(&mut s)? != 0 {
            if minor == 8 {
                return refused(&mut s);
            }
            return Err(HandshakeError::Refused("authentication failed".into()));
        }
        s.write_all(&[1])?; // shared
        let (width, height) = (u32::from(read_u16(&mut s)?), u32::from(read_u16(&mut s)?));
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(HandshakeError::Refused(format!("screen size {width}x{height} is not supported")));
        }
        let mut pf = [0u8; 16];
        s.read_exact(&mut pf)?;
        let len = (read_u32(&mut s)? as usize).min(4096);
        let mut name = vec![0u8; len];
        s.read_exact(&mut name)?;
        // 32 bpp, depth 24, little-endian, true colour, 8 bits per channel at 16/8/0: 0x00RRGGBB words.
        s.write_all(&[0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])?;
        Ok(RfbClient {
            reader: io::BufReader::with_capacity(
                1 << 20,
                TimedReads { stream: s.try_clone()?, bytes: 0, busy: Duration::ZERO },
            ),
            transfer: None,
            stream: s,
            width,
            height,
            pixels: vec![0; (width * height) as usize],
            name: String::from_utf8_lossy(&name).into_owned(),
            cut_text: None,
            acknowledged: Vec::new(),
            screen_id: 0,
            resize_status: None,
            clipboard: ClipboardState::default(),
            bytes_received: 0,
            cursor: None,
            lock_lights: None,
            audio_sink: None,
            zlib: Decompress::new(true),
            zrle: Decompress::new(true),
            tight: [Decompress::new(true), Decompress::new(true), Decompress::new(true), Decompress::new(true)],
            jpeg: None,
        })
    }

    /// How long a read may wait (the handshake uses 30 s). A viewer of a still screen waits indefinitely:
    /// `None`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// A second handle on the connection for sending input from another thread (each message is one
    /// write of a few bytes).
    pub fn input(&self) -> io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends text to the server's clipboard (ClientCutText, Latin-1; other characters become '?').
    pub fn cut_text(&mut self, text: &str) -> io::Result<()> {
        let latin1: Vec<u8> = text.chars().map(|c| if (c as u32) < 256 { c as u8 } else { b'?' }).collect();
        let mut m = vec![6, 0, 0, 0];
        m.extend_from_slice(&(latin1.len() as u32).to_be_bytes());
        m.extend_from_slice(&latin1);
        self.stream.write_all(&m)
    }

    /// Asks the server for a screen of `width` x `height` (needs [`EXTENDED_DESKTOP_SIZE`] acknowledged).
    pub fn set_desktop_size(&mut self, width: u16, height: u16) -> io::Result<()> {
        self.stream.write_all(&set_desktop_size_message(self.screen_id, width, height))
    }

    /// Whether the client owes the server an extended-clipboard message (see
    /// [`clipboard_replies`](Self::clipboard_replies)); cheap enough to ask after every update.
    pub fn clipboard_owed(&self) -> bool {
        let c = &self.clipboard;
        c.caps_due || c.offered || c.requested
    }

    /// The extended-clipboard messages the client owes the server now: its capabilities (once), a request
    /// for text the server offered, and `ours` if the server asked for it. Clears what they answer.
    pub fn clipboard_replies(&mut self, ours: Option<&str>) -> Vec<Vec<u8>> {
        let c = &mut self.clipboard;
        let mut out = Vec::new();
        if c.caps_due {
            c.caps_due = false;
            // One size per format announced: text only.
            out.push(clipboard_message(
                CLIP_CAPS | CLIP_REQUEST | CLIP_PEEK | CLIP_NOTIFY | CLIP_PROVIDE | CLIP_TEXT,
                &(MAX_CLIPBOARD as u32).to_be_bytes(),
            ));
        }
        if c.offered {
            c.offered = false;
            out.push(clipboard_message(CLIP_REQUEST | CLIP_TEXT, &[]));
        }
        if c.requested {
            c.requested = false;
            if let Some(text) = ours {
                out.push(clipboard_provide_message(text));
            }
        }
        out
    }

    /// Sends [`RfbClient::clipboard_replies`] on this client's own stream.
    pub fn answer_clipboard(&mut self, ours: Option<&str>) -> io::Result<()> {
        for m in self.clipboard_replies(ours) {
            self.stream.write_all(&m)?;
        }
        Ok(())
    }

    /// Reads an extended ServerCutText payload of `len` bytes.
    fn extended_clipboard(&mut self, len: usize) -> io::Result<()> {
        if len < 4 {
            return Err(io::Error::other("an extended clipboard message without flags"));
        }
        let data = read_block(&mut self.reader, len)?;
        let flags = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        let c = &mut self.clipboard;
        if flags & CLIP_CAPS != 0 {
            c.extended = true;
            c.caps_due = true;
        } else if flags & CLIP_PROVIDE != 0 {
            if flags & CLIP_TEXT == 0 {
                return Ok(());
            }
            // A zlib stream of (u32 length, data) per format, text first; text is UTF-8, CRLF, NUL-ended.
            let mut z = flate2::read::ZlibDecoder::new(&data[4..]).take(MAX_CLIPBOARD as u64 + 4);
            let size = read_u32(&mut z)? as usize;
            if size > MAX_CLIPBOARD {
                return Err(io::Error::other(format!("{size} bytes of clipboard text is too much")));
            }
            let mut text = vec![0u8; size];
            z.read_exact(&mut text)?;
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            self.cut_text = Some(String::from_utf8_lossy(&text[..end]).replace("\r\n", "\n"));
        } else if flags & CLIP_REQUEST != 0 && flags & CLIP_TEXT != 0 {
            c.requested = true;
        } else if flags & CLIP_NOTIFY != 0 && flags & CLIP_TEXT != 0 {
            c.offered = true;
        } else if flags & CLIP_PEEK != 0 {
            // "What do you have?": nothing new to announce until the user copies something.
        }
        Ok(())
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
    /// (encoding, x, y, w, h). Bells, colour maps and fences on the way are consumed. Clipboard text (kept in
    /// `cut_text`) and extended clipboard messages (see [`RfbClient::clipboard_replies`]) return at once with
    /// no rectangles.
    pub fn read_update(&mut self) -> io::Result<Vec<UpdateRect>> {
        loop {
            let mut kind = [0u8; 1];
            self.reader.read_exact(&mut kind)?;
            match kind[0] {
                0 => break,
                1 => {
                    let mut head = [0u8; 5];
                    self.reader.read_exact(&mut head)?;
                    let n = u16::from_be_bytes([head[3], head[4]]);
                    skip(&mut self.reader, usize::from(n) * 6)?;
                }
                2 => {}
                3 => {
                    let mut pad = [0u8; 3];
                    self.reader.read_exact(&mut pad)?;
                    let len = read_u32(&mut self.reader)? as i32;
                    if len < 0 {
                        self.extended_clipboard(len.unsigned_abs() as usize)?;
                        // The caller may owe an answer (the server waits for it): return before the next
                        // update, which on a still screen may never come.
                        return Ok(Vec::new());
                    }
                    let len = len as usize;
                    let keep = len.min(MAX_CUT_TEXT);
                    let mut text = vec![0u8; keep];
                    self.reader.read_exact(&mut text)?;
                    skip(&mut self.reader, len - keep)?;
                    self.cut_text = Some(text.iter().map(|&b| char::from(b)).collect());
                    return Ok(Vec::new());
                }
                150 => {}
                255 => self.qemu_server_message()?,
                248 => {
                    let mut head = [0u8; 8];
                    self.reader.read_exact(&mut head)?;
                    skip(&mut self.reader, usize::from(head[7]))?;
                }
                other => {
                    return Err(io::Error::other(format!("unexpected server message {other}")));
                }
            }
        }
        // The read that brought the update's first byte waited for the screen to change as well: the
        // transfer is what the reads after it moved, and how long they took.
        let (bytes_before, busy_before) = (self.reader.get_ref().bytes, self.reader.get_ref().busy);
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
            let pixel_data = [RAW, COPY_RECT, HEXTILE, ZLIB, ZRLE, TIGHT].contains(&encoding);
            if pixel_data && (x + w > self.width || y + h > self.height) {
                return Err(io::Error::other(format!(
                    "the server sent a {w}x{h} rectangle at {x},{y}, outside its {}x{} screen",
                    self.width, self.height
                )));
            }
            match encoding {
                RAW => {
                    let mut data = vec![0u8; (w * h * 4) as usize];
                    self.reader.read_exact(&mut data)?;
                    self.bytes_received += data.len() as u64;
                    for row in 0..h {
                        let start = ((y + row) * self.width + x) as usize;
                        let line = &data[(row * w * 4) as usize..((row + 1) * w * 4) as usize];
                        for (dst, p) in self.pixels[start..start + w as usize].iter_mut().zip(line.chunks_exact(4)) {
                            *dst = u32::from_le_bytes([p[0], p[1], p[2], 0]);
                        }
                    }
                }
                COPY_RECT => {
                    let (sx, sy) = (u32::from(read_u16(&mut self.reader)?), u32::from(read_u16(&mut self.reader)?));
                    self.bytes_received += 4;
                    if sx + w > self.width || sy + h > self.height {
                        return Err(io::Error::other("CopyRect source outside the screen"));
                    }
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
                    let data = read_block(&mut self.reader, len)?;
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
                EXTENDED_DESKTOP_SIZE => {
                    // x: why (0 server, 1 this client's request, 2 another client's), y: status for a request.
                    let mut head = [0u8; 4];
                    self.reader.read_exact(&mut head)?;
                    for i in 0..head[0] {
                        let mut screen = [0u8; 16];
                        self.reader.read_exact(&mut screen)?;
                        if i == 0 {
                            self.screen_id = u32::from_be_bytes([screen[0], screen[1], screen[2], screen[3]]);
                        }
                    }
                    if !self.acknowledged.contains(&encoding) {
                        self.acknowledged.push(encoding);
                    }
                    if x == 1 {
                        self.resize_status = Some(y);
                    }
                    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
                        return Err(io::Error::other(format!("screen size {w}x{h} is not supported")));
                    }
                    if (w, h) != (self.width, self.height) {
                        self.width = w;
                        self.height = h;
                        self.pixels = vec![0; (w * h) as usize];
                    }
                }
                DESKTOP_SIZE => {
                    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
                        return Err(io::Error::other(format!("screen size {w}x{h} is not supported")));
                    }
                    self.width = w;
                    self.height = h;
                    self.pixels = vec![0; (w * h) as usize];
                }
                LAST_RECT => {
                    rects.push((encoding, x, y, w, h));
                    break;
                }
                QEMU_EXTENDED_KEY_EVENT | QEMU_AUDIO => {
                    if !self.acknowledged.contains(&encoding) {
                        self.acknowledged.push(encoding);
                    }
                }
                LED_STATE => {
                    let mut state = [0u8; 1];
                    self.reader.read_exact(&mut state)?;
                    self.lock_lights = Some(crate::KeyboardLeds::from_led_state(state[0]));
                }
                CURSOR => {
                    if w > 256 || h > 256 {
                        return Err(io::Error::other(format!("a {w}x{h} cursor is too large")));
                    }
                    let mut shape = vec![0u8; (w * h * 4 + w.div_ceil(8) * h) as usize];
                    self.reader.read_exact(&mut shape)?;
                    self.cursor = Some((w, h, shape));
                }
                other => return Err(io::Error::other(format!("unexpected encoding {other}"))),
            }
            rects.push((encoding, x, y, w, h));
        }
        let timed = self.reader.get_ref();
        self.transfer = Some((timed.bytes - bytes_before, timed.busy.saturating_sub(busy_before)));
        Ok(rects)
    }

    /// A QEMU server message (type 255, read): its audio ones go to [`RfbClient::audio_sink`].
    fn qemu_server_message(&mut self) -> io::Result<()> {
        let mut sub = [0u8; 1];
        self.reader.read_exact(&mut sub)?;
        if sub[0] != 1 {
            return Err(io::Error::other(format!("unexpected QEMU server message {}", sub[0])));
        }
        let message = match read_u16(&mut self.reader)? {
            0 => AudioMessage::End,
            1 => AudioMessage::Begin,
            2 => {
                let len = read_u32(&mut self.reader)? as usize;
                if len > MAX_AUDIO_DATA {
                    return Err(io::Error::other(format!("a {len}-byte audio message from the server is too large")));
                }
                let mut data = vec![0u8; len];
                self.reader.read_exact(&mut data)?;
                AudioMessage::Data(data)
            }
            op => return Err(io::Error::other(format!("unexpected QEMU audio operation {op}"))),
        };
        if let Some(sink) = self.audio_sink.as_mut() {
            sink(message);
        }
        Ok(())
    }

    /// The last update's transfer, once: the bytes read from the socket after the one that brought its first
    /// byte, and the time those reads took (waiting for the network included, decoding not). For
    /// [`QualityChooser::observe`].
    pub fn last_transfer(&mut self) -> Option<(u64, Duration)> {
        self.transfer.take()
    }

    /// Puts a rectangle `w` pixels wide (rows of `pixels`, already checked to lie on the screen) at (x, y),
    /// row by row.
    fn put_pixels(&mut self, x: u32, y: u32, w: u32, pixels: &[u32]) {
        if w == 0 {
            return;
        }
        let (x, y, w, width) = (x as usize, y as usize, w as usize, self.width as usize);
        for (row, src) in pixels.chunks(w).enumerate() {
            let at = (y + row) * width + x;
            for (d, s) in self.pixels[at..at + src.len()].iter_mut().zip(src) {
                *d = s & 0xFF_FFFF;
            }
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
                        if sx + sw > tw || sy + sh > th {
                            return Err(io::Error::other("a Hextile subrectangle outside its tile"));
                        }
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
        let data = read_block(&mut self.reader, len)?;
        self.bytes_received += len as u64 + 4;
        // The inflated size is not known up front: inflate what this chunk holds, but never more than the
        // largest encoding of the rectangle (raw CPIXELs plus a subencoding byte per 64x64 tile).
        let cap = (w * h * 3) as usize + ((w.div_ceil(64) * h.div_ceil(64)) as usize) + 4096;
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            if out.len() > cap {
                return Err(io::Error::other("ZRLE data inflates beyond its rectangle"));
            }
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

    /// A Tight JPEG rectangle (libjpeg-turbo), decoded straight into the screen at (x, y) (the rectangle
    /// was checked to lie on it). The JPEG's own header must give the rectangle's size before anything is
    /// decoded: the output is the rectangle, never what the JPEG claims (a 65535x65535 JPEG in a small
    /// rectangle once asked for 4 GiB; found by fuzzing).
    fn decode_jpeg(&mut self, data: &[u8], x: u32, y: u32, w: u32, h: u32) -> io::Result<()> {
        let decompressor = match &mut self.jpeg {
            Some(d) => d,
            None => self.jpeg.insert(turbojpeg::Decompressor::new().map_err(io::Error::other)?),
        };
        let header = decompressor.read_header(data).map_err(io::Error::other)?;
        if (header.width, header.height) != (w as usize, h as usize) || w == 0 || h == 0 {
            return Err(io::Error::other(format!(
                "a Tight JPEG of {}x{} in a {w}x{h} rectangle",
                header.width, header.height
            )));
        }
        let (x, y, w, h, width) = (x as usize, y as usize, w as usize, h as usize, self.width as usize);
        let start = y * width + x;
        let area = &mut self.pixels[start..start + (h - 1) * width + w];
        let image = turbojpeg::Image {
            pixels: zerocopy::IntoBytes::as_mut_bytes(&mut *area),
            width: w,
            pitch: width * 4,
            height: h,
            format: if cfg!(target_endian = "little") {
                turbojpeg::PixelFormat::BGRX
            } else {
                turbojpeg::PixelFormat::XRGB
            },
        };
        decompressor.decompress(data, image).map_err(io::Error::other)?;
        // libjpeg-turbo fills the X byte (0xFF); our pixels are 0x00RRGGBB.
        for row in area.chunks_mut(width) {
            for p in &mut row[..w] {
                *p &= 0x00FF_FFFF;
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
                let data = read_block(&mut self.reader, len)?;
                self.bytes_received += len as u64 + 4;
                self.decode_jpeg(&data, x, y, w, h)?;
            }
            basic if basic < 8 => {
                let filter = if control & 0x40 != 0 {
                    let mut f = [0u8; 1];
                    self.reader.read_exact(&mut f)?;
                    f[0]
                } else {
                    0
                };
                let mut palette = Vec::new();
                if filter == 1 {
                    let mut n = [0u8; 1];
                    self.reader.read_exact(&mut n)?;
                    let mut colours = vec![0u8; (usize::from(n[0]) + 1) * 3];
                    self.reader.read_exact(&mut colours)?;
                    palette = colours.chunks_exact(3).map(rgb).collect();
                } else if filter > 2 {
                    return Err(io::Error::other(format!("Tight filter {filter}")));
                }
                let size = match (filter, palette.len()) {
                    (1, 2) => (w.div_ceil(8) * h) as usize,
                    (1, _) => (w * h) as usize,
                    _ => (w * h * 3) as usize,
                };
                let raw = if size < 12 {
                    let mut data = vec![0u8; size];
                    self.reader.read_exact(&mut data)?;
                    data
                } else {
                    let len = compact_len(&mut self.reader)?;
                    let data = read_block(&mut self.reader, len)?;
                    self.bytes_received += len as u64;
                    inflate(&mut self.tight[usize::from(basic & 3)], &data, size)?
                };
                let colour = |i: usize| palette.get(i).copied().ok_or_else(|| io::Error::other("Tight palette index"));
                let pixels: Vec<u32> = match (filter, palette.len()) {
                    (1, 2) => {
                        let stride = w.div_ceil(8) as usize;
                        (0..(w * h) as usize)
                            .map(|i| {
                                let (row, col) = (i / w as usize, i % w as usize);
                                colour(usize::from(raw[row * stride + col / 8] >> (7 - col % 8) & 1))
                            })
                            .collect::<io::Result<_>>()?
                    }
                    (1, _) => raw.iter().map(|&b| colour(usize::from(b))).collect::<io::Result<_>>()?,
                    (2, _) => gradient(&raw, w as usize, h as usize),
                    _ => raw.chunks_exact(3).map(rgb).collect(),
                };
                self.put_pixels(x, y, w, &pixels);
            }
            other => return Err(io::Error::other(format!("Tight compression {other:#x}"))),
        }
        Ok(())
    }

    /// Asks for the whole screen and reads updates until every pixel has arrived.
    pub fn full_frame(&mut self) -> io::Result<()> {
        self.request(false)?;
        let mut covered = 0u64;
        // The screen's area as it is now: a resize on the way (a guest setting its first mode while the
        // console connects) changes what a whole frame is.
        let total = |c: &Self| u64::from(c.width) * u64::from(c.height);
        while covered < total(self) {
            for (encoding, _, _, w, h) in self.read_update()? {
                if encoding == DESKTOP_SIZE || encoding == EXTENDED_DESKTOP_SIZE {
                    covered = 0;
                    self.request(false)?;
                } else if [RAW, HEXTILE, ZLIB, ZRLE, TIGHT].contains(&encoding) {
                    covered += u64::from(w) * u64::from(h);
                }
            }
            if covered < total(self) {
                self.request(true)?;
            }
        }
        Ok(())
    }

    pub fn pixel(&self, x: u32, y: u32) -> u32 {
        self.pixels[(y * self.width + x) as usize]
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::RfbClient;

    /// Everything `server` sends, then the end of the stream: the client's last error.
    fn last_error(server: &[u8]) -> String {
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        server_end.write_all(server).unwrap();
        server_end.shutdown(std::net::Shutdown::Write).unwrap();
        let mut client = RfbClient::over(client_end, Some("fuzz")).unwrap();
        loop {
            if let Err(e) = client.read_update() {
                return e.to_string();
            }
        }
    }

    #[test]
    fn a_full_frame_is_the_screen_as_resized_on_the_way() {
        // QEMU's screen is 640x480 until the guest sets its first mode (text mode: 720x400, smaller): a
        // console connecting meanwhile gets a desktop-size change, then the new, smaller screen whole.
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut b = b"RFB 003.008\n\x01\x01\0\0\0\0".to_vec();
            b.extend([0, 64, 0, 48, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
            b.extend([0, 0, 0, 1, b'q']);
            // An update with a desktop-size rectangle: the screen is 32x16 now.
            b.extend([0, 0, 0, 1, 0, 0, 0, 0, 0, 32, 0, 16]);
            b.extend((-223i32).to_be_bytes());
            // Then the whole new screen, raw.
            b.extend([0, 0, 0, 1, 0, 0, 0, 0, 0, 32, 0, 16, 0, 0, 0, 0]);
            b.extend(std::iter::repeat_n(0x7fu8, 32 * 16 * 4));
            server_end.write_all(&b).unwrap();
            server_end
        });
        let mut client = RfbClient::over(client_end, None).unwrap();
        client.set_encodings(&[super::RAW, super::DESKTOP_SIZE]).unwrap();
        client.full_frame().unwrap();
        assert_eq!((client.width, client.height), (32, 16));
        drop(server.join().unwrap());
    }

    #[test]
    fn an_update_on_a_slow_link_measures_the_link_and_lowers_the_picture_quality() {
        use super::{PictureQuality, QualityChooser};
        use std::time::Duration;
        // A 256x256 raw update (256 KiB) sent in 16 KiB pieces 20 ms apart: about 6.5 Mbit/s.
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut b = b"RFB 003.008\n\x01\x01\0\0\0\0".to_vec();
            b.extend([1, 0, 1, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
            b.extend([0, 0, 0, 1, b'q']);
            server_end.write_all(&b).unwrap();
            // The screen changes a while after the request: that wait is not the link's.
            std::thread::sleep(Duration::from_millis(300));
            let mut update = vec![0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0];
            update.extend(std::iter::repeat_n(0x5au8, 256 * 256 * 4));
            for piece in update.chunks(16 * 1024) {
                server_end.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            server_end
        });
        let mut client = RfbClient::over(client_end, None).unwrap();
        client.request(false).unwrap();
        client.read_update().unwrap();
        let (bytes, took) = client.last_transfer().expect("an update's transfer");
        assert!(client.last_transfer().is_none(), "taken once");
        let bps = bytes as f64 * 8.0 / took.as_secs_f64();
        // Everything after the first piece, at the pace of the pieces (not the 300 ms before the first).
        assert!((200 * 1024..=256 * 1024 + 16).contains(&bytes), "{bytes} bytes");
        assert!((2e6..12e6).contains(&bps), "{bps} bit/s in {took:?}");
        let mut chooser = QualityChooser::default();
        assert_eq!(chooser.observe(bytes, took), Some(PictureQuality::Jpeg6));
        drop(server.join().unwrap());
    }

    #[test]
    fn the_picture_quality_follows_the_link_with_a_margin() {
        use super::{JPEG_QUALITY_8, PictureQuality, QualityChooser, TIGHT, ZRLE};
        use std::time::Duration;
        let mb = 1 << 20;
        let mut c = QualityChooser::default();
        // A local socket: gigabits; lossless stays.
        assert_eq!(c.observe(4 * mb, Duration::from_millis(4)), None);
        assert_eq!(c.quality(), PictureQuality::Lossless);
        // Small transfers say nothing about the link.
        assert_eq!(c.observe(1000, Duration::from_secs(1)), None);
        // 1 MiB in 0.3 s (28 Mbit/s) again and again: JPEG at quality 8 once the estimate is below 50.
        let mut changes = Vec::new();
        for _ in 0..6 {
            changes.extend(c.observe(mb, Duration::from_millis(300)));
        }
        assert_eq!(changes, [PictureQuality::Jpeg8]);
        // 8 Mbit/s: quality 6.
        let mut changes = Vec::new();
        for _ in 0..6 {
            changes.extend(c.observe(mb, Duration::from_secs(1)));
        }
        assert_eq!(changes, [PictureQuality::Jpeg6]);
        // 24 Mbit/s is above 16 but not twice it: quality 6 stays.
        for _ in 0..8 {
            assert_eq!(c.observe(3 * mb, Duration::from_secs(1)), None);
        }
        // 40 Mbit/s: back to 8; a gigabit link: lossless.
        let mut changes = Vec::new();
        for _ in 0..8 {
            changes.extend(c.observe(5 * mb, Duration::from_secs(1)));
        }
        for _ in 0..8 {
            changes.extend(c.observe(4 * mb, Duration::from_millis(30)));
        }
        assert_eq!(changes, [PictureQuality::Jpeg8, PictureQuality::Lossless]);
        let jpeg = PictureQuality::Jpeg8.encodings(&[-223]);
        assert_eq!((jpeg[0], jpeg.contains(&JPEG_QUALITY_8), jpeg.last()), (TIGHT, true, Some(&-223)));
        assert_eq!(PictureQuality::Lossless.encodings(&[])[0], ZRLE);
        assert!(!PictureQuality::Lossless.encodings(&[]).iter().any(|e| (-32..=-23).contains(e)));
    }

    #[test]
    fn a_tight_jpeg_larger_than_its_rectangle_is_refused_before_decoding() {
        // Found by fuzzing (fuzz/corpus/rfb_client; the first byte is the fuzz target's options): a JPEG
        // whose header claims far more pixels than its rectangle made the decoder allocate 4 GiB.
        let input = include_bytes!("../../fuzz/corpus/rfb_client/regression-jpeg-larger-than-its-rectangle");
        let err = last_error(&input[1..]);
        assert!(err.starts_with("a Tight JPEG of "), "{err}");
    }
}
