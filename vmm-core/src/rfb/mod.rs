//! The RFB (VNC) server of a VM (RFC 6143): versions 3.3, 3.7 and 3.8; security None and VncAuth;
//! encodings Raw, Hextile, Zlib, ZRLE and Tight (with JPEG at a client-chosen quality); pseudo-encodings
//! DesktopSize, ExtendedDesktopSize, QEMU extended key events, Fence and ContinuousUpdates. Several
//! clients at once, each with a reader thread (input, requests) and a writer thread (updates), so a slow
//! client only delays itself: its damage merges while it is busy, nothing queues up.

pub mod audio;
pub mod auth;
pub mod clipboard;
pub mod encoding;
pub mod keymap;
pub mod pixel;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::devices::bus::lock;
use crate::display::{Rect, Screen, Viewer};
use encoding::tight::TightState;
use encoding::{ZStream, tight};
use keymap::Key;
use pixel::PixelFormat;

/// Most clients served at once.
pub const MAX_CLIENTS: usize = 32;
/// Most connections in their handshake at once; more are closed straight away.
pub const MAX_HANDSHAKES: usize = 64;
/// How long a client may take for its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most encodings a SetEncodings message may list.
const MAX_ENCODINGS: usize = 1024;
/// Most bytes of cut text accepted (discarded when the guest has no clipboard agent).
const MAX_CUT_TEXT: usize = clipboard::MAX_TEXT;
const FENCE_REQUEST: u32 = 1 << 31;
/// zlib level when the client names none: level 1 deflates several times faster than 6 for a few percent
/// more bytes, which keeps full-screen changes at 1080p within a frame's time.
const DEFAULT_COMPRESS_LEVEL: u32 = 1;
const FENCE_FLAGS_SUPPORTED: u32 = 0b111; // BlockBefore, BlockAfter, SyncNext

/// The pointer shape sent to clients that take the Cursor pseudo-encoding (an arrow, hotspot at its tip):
/// `#` black, `o` white, space transparent.
const ARROW: [&str; 19] = [
    "#          ",
    "##         ",
    "#o#        ",
    "#oo#       ",
    "#ooo#      ",
    "#oooo#     ",
    "#ooooo#    ",
    "#oooooo#   ",
    "#ooooooo#  ",
    "#oooooooo# ",
    "#ooooo#####",
    "#oo#oo#    ",
    "#o# #oo#   ",
    "##  #oo#   ",
    "#    #oo#  ",
    "     #oo#  ",
    "      #oo# ",
    "      #oo# ",
    "       ##  ",
];

/// Appends the Cursor pseudo-rectangle of `image` (the guest's pointer), or of the arrow, in the client's
/// pixel format: the pixels, then a bitmask row by row (alpha ≥ 0x80 shows).
fn put_cursor(pf: &PixelFormat, image: Option<&crate::display::CursorImage>, out: &mut Vec<u8>) {
    let arrow;
    let image = match image {
        Some(image) => image,
        None => {
            let (w, h) = (ARROW[0].len() as u32, ARROW.len() as u32);
            let pixels = ARROW
                .iter()
                .flat_map(|row| row.bytes())
                .map(|c| match c {
                    b'o' => 0xFFFF_FFFF,
                    b'#' => 0xFF00_0000,
                    _ => 0,
                })
                .collect();
            arrow = crate::display::CursorImage { width: w, height: h, hot_x: 0, hot_y: 0, pixels };
            &arrow
        }
    };
    let (w, h) = (image.width as usize, image.height as usize);
    for v in [image.hot_x, image.hot_y, image.width, image.height] {
        out.extend_from_slice(&(v.min(u32::from(u16::MAX)) as u16).to_be_bytes());
    }
    out.extend_from_slice(&encoding::CURSOR.to_be_bytes());
    for &p in &image.pixels[..w * h] {
        pf.put(p & 0xFF_FFFF, out);
    }
    for row in image.pixels[..w * h].chunks_exact(w.max(1)) {
        let mut mask = vec![0u8; w.div_ceil(8)];
        for (x, p) in row.iter().enumerate() {
            if p >> 24 >= 0x80 {
                mask[x / 8] |= 0x80 >> (x % 8);
            }
        }
        out.extend_from_slice(&mask);
    }
}

/// Where key and pointer events go.
pub trait Input: Send + Sync {
    fn key(&self, key: Key, down: bool);
    /// A pointer event at (`x`, `y`) on the screen as it is now (`screen`: its width and height).
    fn pointer(&self, x: u16, y: u16, buttons: u8, screen: (u32, u32));
    /// The guest keyboard's lock lights as QEMU's LED state pseudo-encoding carries them (bit 0 Scroll
    /// Lock, bit 1 Num Lock, bit 2 Caps Lock), if this input has a keyboard.
    fn lock_lights(&self) -> Option<u8> {
        None
    }
    /// A client's SetDesktopSize: asks the guest's monitor for `width × height`; returns the size asked
    /// of the guest (clamped to what its monitor may prefer), or None when the display cannot follow.
    fn resize_screen(&self, _width: u32, _height: u32) -> Option<(u32, u32)> {
        None
    }
    /// Whether the guest shares a clipboard (a clipboard agent is set up): clients' cut text goes to it,
    /// and the guest's reaches them through [`Screen::set_clipboard`].
    fn has_clipboard(&self) -> bool {
        false
    }
    /// Text a client put on its clipboard, for the guest's.
    fn set_clipboard(&self, _text: String) {}
    /// Whether the guest has a sound card: clients that take QEMU's audio extension hear what it plays
    /// (through [`Screen::audio`]).
    fn has_audio(&self) -> bool {
        false
    }
}

/// The input of a view-only console: everything is dropped.
pub struct NoInput;

impl Input for NoInput {
    fn key(&self, _key: Key, _down: bool) {}
    fn pointer(&self, _x: u16, _y: u16, _buttons: u8, _screen: (u32, u32)) {}
}

/// Server settings.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The VncAuth DES key; None serves security type None.
    pub password: Option<[u8; 8]>,
    /// The desktop name clients show.
    pub name: String,
}

/// Where the RFB server listens: `unix:PATH` or `tcp:ADDR:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ListenAddress {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl std::str::FromStr for ListenAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(ListenAddress::Unix(path.into()))
        } else if let Some(addr) = s.strip_prefix("tcp:").filter(|a| a.contains(':')) {
            Ok(ListenAddress::Tcp(addr.to_owned()))
        } else {
            Err(format!("{s:?} is not unix:PATH or tcp:ADDR:PORT"))
        }
    }
}

impl TryFrom<String> for ListenAddress {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ListenAddress> for String {
    fn from(a: ListenAddress) -> String {
        match a {
            ListenAddress::Unix(p) => format!("unix:{}", p.display()),
            ListenAddress::Tcp(a) => format!("tcp:{a}"),
        }
    }
}

impl ListenAddress {
    /// Binds it (a Unix socket gets mode 0600; a stale socket file is replaced).
    pub fn bind(&self) -> io::Result<Listener> {
        match self {
            ListenAddress::Unix(path) => crate::control::bind(path).map(Listener::Unix),
            ListenAddress::Tcp(addr) => TcpListener::bind(addr).map(Listener::Tcp),
        }
    }
}

/// Reads a VNC password file (its first line) into the DES key VncAuth uses.
pub fn password_key(path: &std::path::Path) -> io::Result<[u8; 8]> {
    let text = std::fs::read_to_string(path)?;
    let password = text.lines().next().unwrap_or("");
    if password.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the password is empty"));
    }
    Ok(auth::key_from_password(password.as_bytes()))
}

/// A listening socket.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

#[cfg(test)]
mod listen_tests {
    use super::ListenAddress;

    #[test]
    fn listen_addresses_parse_and_print() {
        assert_eq!("unix:/tmp/a".parse(), Ok(ListenAddress::Unix("/tmp/a".into())));
        assert_eq!("tcp:127.0.0.1:5900".parse(), Ok(ListenAddress::Tcp("127.0.0.1:5900".into())));
        for bad in ["unix:", "tcp:5900", "udp:1:2", ""] {
            assert!(bad.parse::<ListenAddress>().is_err(), "{bad}");
        }
        assert_eq!(String::from(ListenAddress::Tcp("[::1]:1".into())), "tcp:[::1]:1");
    }
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)?;
                s.set_nodelay(true)
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves `listener` in background threads for as long as the process lives. With `filter`, every thread
/// runs under the VMM's seccomp filter.
pub fn spawn(
    listener: Listener,
    screen: Arc<Screen>,
    input: Arc<dyn Input>,
    config: ServerConfig,
    filter: bool,
) -> io::Result<()> {
    let config = Arc::new(config);
    let counts = Arc::new(Counts::default());
    std::thread::Builder::new().name("rfb-listen".into()).spawn(move || {
        if filter && let Err(e) = crate::seccomp::apply_vmm_filter() {
            log::error!("RFB server: cannot apply the seccomp filter ({e}); not serving");
            return;
        }
        loop {
            let stream = match &listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            let Ok(stream) = stream else {
                std::thread::sleep(Duration::from_millis(10)); // e.g. out of file descriptors
                continue;
            };
            if counts.handshaking.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                counts.handshaking.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: too many connections at once
            }
            let (screen, input, config, thread_counts) =
                (screen.clone(), input.clone(), config.clone(), counts.clone());
            let spawned = std::thread::Builder::new().name("rfb-client".into()).spawn(move || {
                if let Err(e) = serve(stream, &screen, input, &config, &thread_counts) {
                    log::debug!("RFB client ended: {e}");
                }
            });
            if spawned.is_err() {
                counts.handshaking.fetch_sub(1, Ordering::AcqRel);
                log::warn!("RFB server: cannot start a client thread");
            }
        }
    })?;
    Ok(())
}

/// Connections in their handshake, and established sessions.
#[derive(Debug, Default)]
struct Counts {
    handshaking: AtomicUsize,
    sessions: AtomicUsize,
}

/// Decrements a counter when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn read_u8(s: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
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

/// Reads x, y, width, height (four big-endian u16).
fn read_rect(s: &mut impl Read) -> io::Result<Rect> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    let v = |i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    Ok(Rect::new(v(0), v(2), v(4), v(6)))
}

fn skip(s: &mut impl Read, n: usize) -> io::Result<()> {
    io::copy(&mut s.take(n as u64), &mut io::sink())?;
    Ok(())
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn write_reason(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(&(reason.len() as u32).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// Protocol minor version agreed with the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Version {
    V3,
    V7,
    V8,
}

/// How long a client that failed VncAuth waits for the answer (slows down guessing).
const AUTH_FAIL_DELAY: Duration = Duration::from_millis(300);

fn handshake(stream: &mut Stream, config: &ServerConfig, refuse: bool) -> io::Result<()> {
    handshake_with(stream, config, refuse, auth::challenge(), AUTH_FAIL_DELAY)
}

/// The handshake with a given VncAuth challenge and failure delay (the fuzz target fixes both).
fn handshake_with<S: Read + Write>(
    stream: &mut S,
    config: &ServerConfig,
    refuse: bool,
    challenge: [u8; 16],
    fail_delay: Duration,
) -> io::Result<()> {
    stream.write_all(b"RFB 003.008\n")?;
    let mut v = [0u8; 12];
    stream.read_exact(&mut v)?;
    if &v[0..4] != b"RFB " || v[7] != b'.' || v[11] != b'\n' {
        return Err(protocol_error("not an RFB client"));
    }
    let number = |b: &[u8]| std::str::from_utf8(b).ok().and_then(|t| t.parse::<u32>().ok());
    let (major, minor) = (number(&v[4..7]), number(&v[8..11]));
    let version = match (major, minor) {
        (Some(3), Some(7)) => Version::V7,
        (Some(3), Some(m)) if m >= 8 => Version::V8,
        (Some(3), Some(_)) => Version::V3,
        _ => return Err(protocol_error("unsupported RFB version")),
    };
    let mut out = Vec::new();
    if refuse {
        let reason = format!("too many clients (at most {MAX_CLIENTS})");
        if version == Version::V3 {
            out.extend_from_slice(&0u32.to_be_bytes());
        } else {
            out.push(0);
        }
        write_reason(&mut out, &reason);
        stream.write_all(&out)?;
        return Err(protocol_error(reason));
    }
    let offered: u8 = if config.password.is_some() { 2 } else { 1 };
    let chosen = if version == Version::V3 {
        stream.write_all(&u32::from(offered).to_be_bytes())?;
        offered
    } else {
        stream.write_all(&[1, offered])?;
        read_u8(stream)?
    };
    let fail = |stream: &mut S, reason: &str| -> io::Result<()> {
        let mut out = 1u32.to_be_bytes().to_vec();
        if version == Version::V8 {
            write_reason(&mut out, reason);
        }
        stream.write_all(&out)?;
        Err(protocol_error(reason.to_owned()))
    };
    if chosen != offered {
        return fail(stream, "security type not offered");
    }
    if let Some(key) = &config.password {
        stream.write_all(&challenge)?;
        let mut answer = [0u8; 16];
        stream.read_exact(&mut answer)?;
        if !auth::matches(&answer, &auth::response(key, &challenge)) {
            std::thread::sleep(fail_delay);
            return fail(stream, "authentication failed");
        }
        stream.write_all(&0u32.to_be_bytes())?;
    } else if version == Version::V8 {
        stream.write_all(&0u32.to_be_bytes())?;
    }
    let _shared = read_u8(stream)?; // every client shares the screen
    Ok(())
}

/// What the reader tells the writer.
#[derive(Debug)]
struct ClientState {
    pf: PixelFormat,
    encodings: Vec<i32>,
    jpeg_quality: Option<u8>,
    compress_level: u32,
    /// A pending FramebufferUpdateRequest: (incremental, area).
    request: Option<(bool, Rect)>,
    continuous: Option<Rect>,
    send_end_of_continuous: bool,
    send_server_fence: bool,
    fence_replies: Vec<(u32, Vec<u8>)>,
    ext_key_ack: bool,
    desktop_size_reply: Option<u16>,
    /// The client has asked for an update (so it has told its encodings): clipboard text may go out.
    asked: bool,
    /// The client takes the extended clipboard (and the guest has one).
    extended_clipboard: bool,
    /// Extended clipboard messages owed: our capabilities, a request for the text the client offered,
    /// our text (the client asked), a notify (the client peeked).
    clipboard_caps_due: bool,
    clipboard_request_due: bool,
    clipboard_provide_due: bool,
    clipboard_notify_due: bool,
    /// The audio pseudo-encoding is owed its acknowledgement (a rectangle of it in an update).
    audio_ack: bool,
    /// The client enabled the sound, and the format it asked for.
    audio_enabled: bool,
    audio_format: crate::audio::ListenerFormat,
    closed: bool,
}

impl ClientState {
    fn new() -> Self {
        ClientState {
            pf: PixelFormat::SERVER,
            encodings: Vec::new(),
            jpeg_quality: None,
            compress_level: DEFAULT_COMPRESS_LEVEL,
            request: None,
            continuous: None,
            send_end_of_continuous: false,
            send_server_fence: false,
            fence_replies: Vec::new(),
            ext_key_ack: false,
            desktop_size_reply: None,
            asked: false,
            extended_clipboard: false,
            clipboard_caps_due: false,
            clipboard_request_due: false,
            clipboard_provide_due: false,
            clipboard_notify_due: false,
            audio_ack: false,
            audio_enabled: false,
            audio_format: crate::audio::ListenerFormat::default(),
            closed: false,
        }
    }

    fn supports(&self, encoding: i32) -> bool {
        self.encodings.contains(&encoding)
    }
}

struct Shared {
    state: Mutex<ClientState>,
    viewer: Arc<Viewer>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ClientState)) {
        f(&mut lock(&self.state));
        self.viewer.poke();
    }
}

fn serve(
    mut stream: Stream,
    screen: &Arc<Screen>,
    input: Arc<dyn Input>,
    config: &ServerConfig,
    counts: &Counts,
) -> io::Result<()> {
    let handshaking = Slot(&counts.handshaking);
    let refuse = counts.sessions.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS;
    let _session = Slot(&counts.sessions);
    stream.set_timeouts(Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT))?;
    handshake(&mut stream, config, refuse)?;
    drop(handshaking);
    let viewer = screen.subscribe();
    // Start from the guest's current mode, not from what the screen showed when nobody watched.
    screen.wait_for_refresh(Duration::from_millis(250));
    // ServerInit carries the current size, so a resize that happened before it is no news to this client.
    let (width, height) = {
        let mut damage = lock(&viewer.damage);
        let bounds = screen.read().bounds();
        damage.resized = false;
        damage.add(bounds);
        (bounds.w, bounds.h)
    };
    stream.write_all(&server_init(width, height, &config.name))?;
    // After the handshake, a client may stay silent for as long as it likes.
    stream.set_timeouts(None, Some(Duration::from_secs(30)))?;

    let shared = Arc::new(Shared { state: Mutex::new(ClientState::new()), viewer });
    let writer_stream = stream.try_clone()?;
    let writer_shared = shared.clone();
    let (writer_screen, writer_input) = (screen.clone(), input.clone());
    let writer = std::thread::Builder::new().name("rfb-writer".into()).spawn(move || {
        let mut w = Writer::new(writer_stream, writer_shared.clone(), writer_screen, writer_input, (width, height));
        if let Err(e) = w.run() {
            log::debug!("RFB writer ended: {e}");
        }
        w.audio.stop(w.screen.audio());
        writer_shared.update(|s| s.closed = true);
        w.stream.shutdown();
    })?;
    let result = read_messages(&mut stream, &shared, input.as_ref(), screen);
    shared.update(|s| s.closed = true);
    stream.shutdown();
    let _ = writer.join();
    result
}

/// ServerInit: the screen size, the server's pixel format and the desktop name.
fn server_init(width: u32, height: u32, name: &str) -> Vec<u8> {
    let mut init = Vec::new();
    init.extend_from_slice(&(width as u16).to_be_bytes());
    init.extend_from_slice(&(height as u16).to_be_bytes());
    init.extend_from_slice(&PixelFormat::SERVER.to_bytes());
    write_reason(&mut init, name);
    init
}

fn read_messages(stream: &mut Stream, shared: &Shared, input: &dyn Input, screen: &Screen) -> io::Result<()> {
    while read_message(stream, shared, input, screen)? {}
    Ok(())
}

/// Reads and handles one client message; false at the end of the stream or once the writer closed.
fn read_message(stream: &mut impl Read, shared: &Shared, input: &dyn Input, screen: &Screen) -> io::Result<bool> {
    let kind = match read_u8(stream) {
        Ok(k) => k,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    };
    if lock(&shared.state).closed {
        return Ok(false);
    }
    match kind {
        0 => {
            skip(stream, 3)?;
            let mut b = [0u8; 16];
            stream.read_exact(&mut b)?;
            let pf = PixelFormat::from_bytes(&b).ok_or_else(|| protocol_error("unsupported pixel format"))?;
            shared.update(|s| s.pf = pf);
        }
        2 => {
            skip(stream, 1)?;
            let n = usize::from(read_u16(stream)?);
            if n > MAX_ENCODINGS {
                return Err(protocol_error("too many encodings"));
            }
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(read_u32(stream)? as i32);
            }
            shared.update(|s| {
                let had = |e: i32| s.encodings.contains(&e);
                if list.contains(&encoding::FENCE) && !had(encoding::FENCE) {
                    s.send_server_fence = true;
                }
                if list.contains(&encoding::CONTINUOUS_UPDATES) && !had(encoding::CONTINUOUS_UPDATES) {
                    s.send_end_of_continuous = true;
                }
                if list.contains(&encoding::QEMU_EXTENDED_KEY_EVENT) && !had(encoding::QEMU_EXTENDED_KEY_EVENT) {
                    s.ext_key_ack = true;
                }
                if list.contains(&audio::AUDIO) && !had(audio::AUDIO) && input.has_audio() {
                    s.audio_ack = true;
                }
                let extended_clipboard = list.contains(&clipboard::EXTENDED_CLIPBOARD) && input.has_clipboard();
                if extended_clipboard && !s.extended_clipboard {
                    s.clipboard_caps_due = true;
                }
                s.extended_clipboard = extended_clipboard;
                s.jpeg_quality = list
                    .iter()
                    .find(|e| (encoding::TIGHT_QUALITY_0..=encoding::TIGHT_QUALITY_9).contains(e))
                    .map(|e| tight::jpeg_quality((e - encoding::TIGHT_QUALITY_0) as u8));
                if let Some(level) =
                    list.iter().find(|e| (encoding::COMPRESS_LEVEL_0..=encoding::COMPRESS_LEVEL_9).contains(e))
                {
                    s.compress_level = (level - encoding::COMPRESS_LEVEL_0) as u32;
                }
                s.encodings = list;
            });
        }
        3 => {
            let incremental = read_u8(stream)? != 0;
            let r = read_rect(stream)?;
            shared.update(|s| {
                s.asked = true;
                s.request = Some(match s.request {
                    Some((inc, old)) => (inc && incremental, old.union(&r)),
                    None => (incremental, r),
                });
            });
        }
        4 => {
            let down = read_u8(stream)? != 0;
            skip(stream, 2)?;
            let keysym = read_u32(stream)?;
            if let Some(key) = keymap::keysym_to_key(keysym) {
                input.key(key, down);
            }
        }
        5 => {
            let mask = read_u8(stream)?;
            let (x, y) = (read_u16(stream)?, read_u16(stream)?);
            let bounds = screen.read().bounds();
            input.pointer(x, y, mask, (bounds.w, bounds.h));
        }
        6 => {
            skip(stream, 3)?;
            let raw_len = read_u32(stream)? as i32;
            let len = raw_len.unsigned_abs() as usize;
            if len > MAX_CUT_TEXT + 4 {
                return Err(protocol_error("cut text too long"));
            }
            if !input.has_clipboard() {
                skip(stream, len)?;
                return Ok(true);
            }
            let mut data = vec![0u8; len];
            stream.read_exact(&mut data)?;
            if raw_len >= 0 {
                input.set_clipboard(clipboard::latin1_text(&data));
                return Ok(true);
            }
            // The extended clipboard: flags, then what the action carries.
            if len < 4 {
                return Err(protocol_error("an extended clipboard message without flags"));
            }
            let flags = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            if flags & clipboard::CAPS != 0 {
                // The client's capabilities: it takes what we announced.
            } else if flags & clipboard::PROVIDE != 0 {
                if let Some(text) = clipboard::provided_text(flags, &data[4..]) {
                    input.set_clipboard(text);
                }
            } else if flags & clipboard::REQUEST != 0 && flags & clipboard::TEXT != 0 {
                shared.update(|s| s.clipboard_provide_due = true);
            } else if flags & clipboard::PEEK != 0 {
                shared.update(|s| s.clipboard_notify_due = true);
            } else if flags & clipboard::NOTIFY != 0 && flags & clipboard::TEXT != 0 {
                // The client copied text: fetch it now, so the guest can paste it whenever it likes.
                shared.update(|s| s.clipboard_request_due = true);
            }
        }
        150 => {
            let enable = read_u8(stream)? != 0;
            let r = read_rect(stream)?;
            shared.update(|s| {
                if enable {
                    s.continuous = Some(r);
                } else {
                    s.continuous = None;
                    s.send_end_of_continuous = true;
                }
            });
        }
        248 => {
            skip(stream, 3)?;
            let flags = read_u32(stream)?;
            let len = usize::from(read_u8(stream)?);
            if len > 64 {
                return Err(protocol_error("fence payload too long"));
            }
            let mut payload = vec![0u8; len];
            stream.read_exact(&mut payload)?;
            if flags & FENCE_REQUEST != 0 {
                shared.update(|s| s.fence_replies.push((flags & FENCE_FLAGS_SUPPORTED, payload)));
            }
        }
        251 => {
            skip(stream, 1)?;
            let (width, height) = (read_u16(stream)?, read_u16(stream)?);
            let screens = usize::from(read_u8(stream)?);
            skip(stream, 1 + screens * 16)?;
            // A display that follows the console (virtio-gpu) takes the size to its guest, which switches
            // when its driver sees the new monitor: success now, the new size in a later update. Otherwise
            // the guest decides its resolution: refused ("administratively prohibited").
            let status = match input.resize_screen(u32::from(width), u32::from(height)) {
                Some(_) => 0,
                None => 1,
            };
            shared.update(|s| s.desktop_size_reply = Some(status));
        }
        255 => {
            let sub = read_u8(stream)?;
            if sub == audio::SUBTYPE {
                match read_u16(stream)? {
                    audio::ENABLE => shared.update(|s| s.audio_enabled = input.has_audio()),
                    audio::DISABLE => shared.update(|s| s.audio_enabled = false),
                    audio::SET_FORMAT => {
                        let (code, channels, rate) = (read_u8(stream)?, read_u8(stream)?, read_u32(stream)?);
                        let Some(format) = audio::listener_format(code, channels, rate) else {
                            return Err(protocol_error(format!(
                                "an audio format QEMU's extension does not have ({code}, {channels} channels, {rate} Hz)"
                            )));
                        };
                        shared.update(|s| s.audio_format = format);
                    }
                    op => return Err(protocol_error(format!("unknown audio operation {op}"))),
                }
                return Ok(true);
            }
            if sub != 0 {
                return Err(protocol_error(format!("unknown QEMU client message {sub}")));
            }
            let down = read_u16(stream)? != 0;
            let keysym = read_u32(stream)?;
            let keycode = read_u32(stream)?;
            if let Some(key) = keymap::qemu_keycode_to_key(keycode).or_else(|| keymap::keysym_to_key(keysym)) {
                input.key(key, down);
            }
        }
        other => {
            return Err(protocol_error(format!("unknown client message type {other}")));
        }
    }
    Ok(true)
}

/// Appends the clipboard messages a client is owed: the extended clipboard's, then the guest's new text
/// (offered with a notify to extended clients, sent whole as plain cut text to the others); `sent` is the
/// screen's clipboard version the client last got. Called for every update: only a version is compared
/// unless something is due.
fn clipboard_messages(screen: &Screen, input: &dyn Input, sent: &mut u64, s: &mut ClientState, out: &mut Vec<u8>) {
    if std::mem::take(&mut s.clipboard_caps_due) {
        out.extend_from_slice(&clipboard::caps_message());
    }
    if std::mem::take(&mut s.clipboard_request_due) {
        out.extend_from_slice(&clipboard::server_message(clipboard::REQUEST | clipboard::TEXT, &[]));
    }
    let provide = std::mem::take(&mut s.clipboard_provide_due);
    let notify = std::mem::take(&mut s.clipboard_notify_due);
    if !s.asked || !(provide || notify || screen.clipboard_version() != *sent) || !input.has_clipboard() {
        return;
    }
    let (version, text) = screen.clipboard();
    if provide && let Some(text) = &text {
        out.extend_from_slice(&clipboard::provide_message(text));
    }
    if notify || version != *sent {
        *sent = version;
        match (&text, s.extended_clipboard) {
            (Some(_), true) => {
                out.extend_from_slice(&clipboard::server_message(clipboard::NOTIFY | clipboard::TEXT, &[]))
            }
            (None, true) => out.extend_from_slice(&clipboard::server_message(clipboard::NOTIFY, &[])),
            (Some(text), false) => out.extend_from_slice(&clipboard::plain_message(text)),
            (None, false) => {}
        }
    }
}

/// Per-connection encoder state and the update loop.
struct Writer<W = Stream> {
    stream: W,
    shared: Arc<Shared>,
    screen: Arc<Screen>,
    /// The size the client believes the screen has.
    client_size: (u32, u32),
    zlib: ZStream,
    zrle: ZStream,
    tight: TightState,
    pixels: Vec<u32>,
    scratch: Vec<u8>,
    /// Once compressed data went out, the zlib streams (and their level) must continue as they are.
    streams_started: bool,
    /// The screen's cursor version the client last got (None: none sent yet).
    cursor_sent: Option<u64>,
    /// Whether the client, since it took ExtendedDesktopSize, got a rectangle of it: the first update after
    /// it asks carries the screen's layout (so it knows it may send SetDesktopSize), changed or not.
    layout_announced: bool,
    /// Where the lock lights come from, and the state last sent (LED state pseudo-encoding).
    input: Arc<dyn Input>,
    lights_sent: Option<u8>,
    /// The screen's clipboard version the client last got (0: none yet).
    clipboard_sent: u64,
    /// Where the client is in the guest's sound.
    audio: audio::Listener,
}

/// Settings copied out of the shared state for one update.
struct UpdatePlan {
    pf: PixelFormat,
    encoding: i32,
    request: Option<(bool, Rect)>,
    continuous: Option<Rect>,
    resize_encoding: Option<i32>,
    copy_rect: bool,
    cursor: bool,
    /// The lock lights now, for a client that takes the LED state pseudo-encoding.
    lights: Option<u8>,
    last_rect: bool,
    ext_key_ack: bool,
    audio_ack: bool,
    desktop_size_reply: Option<u16>,
}

impl UpdatePlan {
    /// The area of a pending non-incremental request (sent whether it changed or not).
    fn full_request(&self) -> Option<Rect> {
        self.request.filter(|(incremental, _)| !incremental).map(|(_, r)| r)
    }
}

impl<W: Write> Writer<W> {
    fn new(
        stream: W,
        shared: Arc<Shared>,
        screen: Arc<Screen>,
        input: Arc<dyn Input>,
        client_size: (u32, u32),
    ) -> Self {
        Writer {
            input,
            lights_sent: None,
            stream,
            shared,
            screen,
            client_size,
            zlib: ZStream::new(DEFAULT_COMPRESS_LEVEL),
            zrle: ZStream::new(DEFAULT_COMPRESS_LEVEL),
            tight: TightState::new(DEFAULT_COMPRESS_LEVEL),
            streams_started: false,
            cursor_sent: None,
            clipboard_sent: 0,
            audio: audio::Listener::default(),
            layout_announced: false,
            pixels: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Sends control messages; returns the plan for an update if one may be sent now.
    fn next_plan(&mut self) -> io::Result<Option<UpdatePlan>> {
        let mut out = Vec::new();
        let plan = {
            let mut s = lock(&self.shared.state);
            if s.closed {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed"));
            }
            if std::mem::take(&mut s.send_server_fence) {
                out.extend_from_slice(&[248, 0, 0, 0]);
                out.extend_from_slice(&(FENCE_REQUEST | FENCE_FLAGS_SUPPORTED).to_be_bytes());
                out.push(0);
            }
            for (flags, payload) in s.fence_replies.drain(..) {
                out.extend_from_slice(&[248, 0, 0, 0]);
                out.extend_from_slice(&flags.to_be_bytes());
                out.push(payload.len() as u8);
                out.extend_from_slice(&payload);
            }
            if std::mem::take(&mut s.send_end_of_continuous) {
                out.push(150);
            }
            clipboard_messages(&self.screen, self.input.as_ref(), &mut self.clipboard_sent, &mut s, &mut out);
            self.audio.messages(self.screen.audio(), s.audio_enabled, s.audio_format, &mut out);
            if s.request.is_none() && s.continuous.is_none() {
                None
            } else {
                let encoding = s
                    .encodings
                    .iter()
                    .copied()
                    .find(|e| {
                        [encoding::TIGHT, encoding::ZRLE, encoding::HEXTILE, encoding::ZLIB, encoding::RAW].contains(e)
                    })
                    .unwrap_or(encoding::RAW);
                let resize_encoding = if s.supports(encoding::EXTENDED_DESKTOP_SIZE) {
                    Some(encoding::EXTENDED_DESKTOP_SIZE)
                } else if s.supports(encoding::DESKTOP_SIZE) {
                    Some(encoding::DESKTOP_SIZE)
                } else {
                    None
                };
                if !self.streams_started {
                    self.zlib = ZStream::new(s.compress_level);
                    self.zrle = ZStream::new(s.compress_level);
                    self.tight = TightState::new(s.compress_level);
                }
                self.tight.jpeg_quality = s.jpeg_quality;
                Some(UpdatePlan {
                    pf: s.pf,
                    encoding,
                    request: s.request,
                    continuous: s.continuous,
                    resize_encoding,
                    copy_rect: s.supports(encoding::COPY_RECT),
                    cursor: s.supports(encoding::CURSOR),
                    lights: if s.supports(encoding::LED_STATE) { self.input.lock_lights() } else { None },
                    last_rect: s.supports(encoding::LAST_RECT),
                    ext_key_ack: std::mem::take(&mut s.ext_key_ack),
                    audio_ack: std::mem::take(&mut s.audio_ack),
                    desktop_size_reply: s.desktop_size_reply.take(),
                })
            }
        };
        if !out.is_empty() {
            self.stream.write_all(&out)?;
        }
        Ok(plan)
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            // Every change a writer answers pokes its viewer (the client's messages, the guest's clipboard
            // and sound): read before looking, so none is missed between the look and the wait.
            let pokes = self.shared.viewer.pokes();
            let Some(plan) = self.next_plan()? else {
                self.shared.viewer.wait_for_poke(pokes, Duration::from_millis(500));
                continue;
            };
            let waits = plan.full_request().is_none() && !self.pseudo_due(&plan);
            let damage = {
                let mut d = if waits {
                    self.shared.viewer.wait(Duration::from_millis(200))
                } else {
                    lock(&self.shared.viewer.damage)
                };
                d.take()
            };
            if damage.closed {
                return Ok(());
            }
            self.answer(&plan, damage)?;
        }
    }

    /// Pseudo-rectangles that must go out even with no damage.
    fn pseudo_due(&self, plan: &UpdatePlan) -> bool {
        plan.ext_key_ack
            || plan.audio_ack
            || plan.desktop_size_reply.is_some()
            || (plan.cursor && self.cursor_sent != Some(self.screen.cursor_version()))
            || (plan.resize_encoding == Some(encoding::EXTENDED_DESKTOP_SIZE) && !self.layout_announced)
            || (plan.lights.is_some() && plan.lights != self.lights_sent)
    }

    /// Sends the update `plan` calls for with `damage` (the viewer's, already taken), if there is anything
    /// to send.
    fn answer(&mut self, plan: &UpdatePlan, damage: crate::display::Damage) -> io::Result<()> {
        let full_request = plan.full_request();
        let pseudo = self.pseudo_due(plan);
        let mut merged = crate::display::Damage { rects: damage.rects, ..Default::default() };
        if let Some(r) = full_request {
            merged.add(r);
        }
        let rects = merged.rects;
        if rects.is_empty() && damage.scroll.is_none() && !damage.resized && !pseudo {
            return Ok(());
        }
        self.send_update(plan, damage.scroll, rects, damage.resized)
    }

    fn send_update(
        &mut self,
        plan: &UpdatePlan,
        scroll: Option<i32>,
        mut rects: Vec<Rect>,
        resized: bool,
    ) -> io::Result<()> {
        let frame = self.screen.read();
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(&[0, 0, 0, 0]); // type, padding, rectangle count (patched below)
        let mut count: u16 = 0;
        let header = |out: &mut Vec<u8>, r: &Rect, encoding: i32| {
            for v in [r.x, r.y, r.w, r.h] {
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            out.extend_from_slice(&encoding.to_be_bytes());
        };
        let size_now = (frame.width, frame.height);
        let announce = plan.resize_encoding == Some(encoding::EXTENDED_DESKTOP_SIZE) && !self.layout_announced;
        if (resized || size_now != self.client_size || announce)
            && let Some(enc) = plan.resize_encoding
        {
            self.layout_announced |= enc == encoding::EXTENDED_DESKTOP_SIZE;
            self.client_size = size_now;
            let r = Rect::new(0, 0, size_now.0, size_now.1);
            Self::resize_rect(&mut out, &r, enc, 0, 0);
            count += 1;
        }
        if let Some(status) = plan.desktop_size_reply
            && plan.resize_encoding == Some(encoding::EXTENDED_DESKTOP_SIZE)
        {
            let r = Rect::new(1, u32::from(status), self.client_size.0, self.client_size.1);
            Self::resize_rect(&mut out, &r, encoding::EXTENDED_DESKTOP_SIZE, 1, status);
            count += 1;
        }
        if plan.ext_key_ack {
            header(&mut out, &Rect::new(0, 0, 0, 0), encoding::QEMU_EXTENDED_KEY_EVENT);
            count += 1;
        }
        if plan.audio_ack {
            header(&mut out, &Rect::new(0, 0, 0, 0), audio::AUDIO);
            count += 1;
        }
        if plan.cursor && self.cursor_sent != Some(self.screen.cursor_version()) {
            // The image is taken (an Arc) only when it is sent, not on every update.
            let (cursor_version, cursor) = self.screen.cursor();
            put_cursor(&plan.pf, cursor.as_deref(), &mut out);
            self.cursor_sent = Some(cursor_version);
            count += 1;
        }
        if let Some(lights) = plan.lights.filter(|l| Some(*l) != self.lights_sent) {
            header(&mut out, &Rect::new(0, 0, 0, 0), encoding::LED_STATE);
            out.push(lights);
            self.lights_sent = Some(lights);
            count += 1;
        }
        // Only what the client can see, and only inside what it asked for (or its continuous region).
        let visible = Rect::new(0, 0, self.client_size.0.min(frame.width), self.client_size.1.min(frame.height));
        if let Some(dy) = scroll {
            let same_size = (frame.width, frame.height) == self.client_size;
            if plan.copy_rect && same_size && (dy.unsigned_abs()) < visible.h {
                let d = dy.unsigned_abs();
                let (dst_y, src_y) = if dy > 0 { (0, d) } else { (d, 0) };
                header(&mut out, &Rect::new(0, dst_y, visible.w, visible.h - d), encoding::COPY_RECT);
                out.extend_from_slice(&0u16.to_be_bytes());
                out.extend_from_slice(&(src_y as u16).to_be_bytes());
                count += 1;
            } else {
                rects.push(visible);
            }
        }
        let area = match (plan.request.map(|(_, r)| r), plan.continuous) {
            (Some(a), Some(b)) => a.union(&b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => visible,
        };
        let mut pieces = Vec::new();
        for r in rects.iter().filter_map(|r| r.intersect(&visible)).filter_map(|r| r.intersect(&area)) {
            if plan.encoding == encoding::TIGHT {
                pieces.extend(tight::split(r));
            } else {
                pieces.push(r);
            }
        }
        // With LastRect the count need not fit 16 bits: 0xFFFF, then a LastRect rectangle ends the update.
        let open_count = plan.last_rect && usize::from(count) + pieces.len() >= usize::from(u16::MAX);
        let mut sent: usize = usize::from(count);
        for r in &pieces {
            if !open_count && sent >= usize::from(u16::MAX - 1) {
                break;
            }
            sent += 1;
            frame.copy_rect(r, &mut self.pixels);
            header(&mut out, r, plan.encoding);
            let (w, h) = (r.w as usize, r.h as usize);
            match plan.encoding {
                encoding::TIGHT => {
                    tight::encode(&self.pixels, w, h, &plan.pf, &mut self.tight, &mut self.scratch, &mut out)
                }
                encoding::ZRLE => {
                    encoding::zrle::encode(&self.pixels, w, h, &plan.pf, &mut self.zrle, &mut self.scratch, &mut out)
                }
                encoding::HEXTILE => encoding::hextile::encode(&self.pixels, w, h, &plan.pf, &mut out),
                encoding::ZLIB => {
                    encoding::zlib::encode(&self.pixels, &plan.pf, &mut self.zlib, &mut self.scratch, &mut out)
                }
                _ => encoding::raw::encode(&self.pixels, &plan.pf, &mut out),
            }
        }
        drop(frame);
        if sent == 0 {
            return Ok(());
        }
        let count = if open_count {
            header(&mut out, &Rect::new(0, 0, 0, 0), encoding::LAST_RECT);
            u16::MAX
        } else {
            sent as u16
        };
        out[2..4].copy_from_slice(&count.to_be_bytes());
        self.streams_started = true;
        {
            let mut s = lock(&self.shared.state);
            // The request is answered; a newer one may have arrived meanwhile and is kept.
            if s.request == plan.request {
                s.request = None;
            }
        }
        self.stream.write_all(&out)
    }

    fn resize_rect(out: &mut Vec<u8>, r: &Rect, encoding: i32, reason: u16, status: u16) {
        if encoding == encoding::EXTENDED_DESKTOP_SIZE {
            for v in [u32::from(reason), u32::from(status), r.w, r.h] {
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            out.extend_from_slice(&encoding.to_be_bytes());
            out.extend_from_slice(&[1, 0, 0, 0]); // one screen
            out.extend_from_slice(&0u32.to_be_bytes()); // id
            out.extend_from_slice(&[0, 0, 0, 0]); // x, y
            out.extend_from_slice(&(r.w as u16).to_be_bytes());
            out.extend_from_slice(&(r.h as u16).to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes()); // flags
        } else {
            for v in [0, 0, r.w, r.h] {
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            out.extend_from_slice(&encoding.to_be_bytes());
        }
    }
}

/// Entry points for the coverage-guided fuzz targets (`fuzz/`): one client connection driven by bytes.
#[cfg(feature = "fuzzing")]
pub mod fuzz {
    use super::*;

    /// The VncAuth challenge the fuzzed server sends (a real server draws a random one).
    pub const CHALLENGE: [u8; 16] = *b"porthole-fuzzing";
    /// The password of a fuzzed server that asks for one.
    pub const PASSWORD: &[u8] = b"fuzz";

    /// The answer to [`CHALLENGE`] that [`PASSWORD`] gives.
    pub fn response() -> [u8; 16] {
        auth::response(&auth::key_from_password(PASSWORD), &CHALLENGE)
    }

    /// The client's bytes in; the server's answers go to `output`.
    struct Client<'a, W> {
        input: &'a [u8],
        output: W,
    }

    impl<W> Read for Client<'_, W> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl<W: Write> Write for Client<'_, W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// One connection: `data[0]` holds options (bit 0: VncAuth with [`PASSWORD`]; bit 1: the screen
    /// changes size after every 8th message; bit 2: it scrolls after every 4th; bit 3: the guest's pointer
    /// shape changes after every 5th, its size from the message count; bit 4: the guest shares its
    /// clipboard, whose text changes after every 6th), `data[1..3]` the screen
    /// size, the rest is what the client sends from its first byte (ProtocolVersion) on. The reader and
    /// the writer of a real connection run in two threads; here the writer sends what is due after each
    /// message, so a run is deterministic. Returns how many messages the server read after the handshake.
    pub fn server_session(data: &[u8]) -> u32 {
        session(data, io::sink(), io::sink()).0
    }

    /// Everything the server sends for `data` (see [`server_session`]): seeds for the client's target.
    pub fn server_transcript(data: &[u8]) -> Vec<u8> {
        let (_, mut handshake, updates) = session(data, Vec::new(), Vec::new());
        handshake.extend_from_slice(&updates);
        handshake
    }

    fn session<H: Write, U: Write>(data: &[u8], handshake: H, updates: U) -> (u32, H, U) {
        let [options, w, h, ref client @ ..] = *data else { return (0, handshake, updates) };
        let (width, height) = (1 + u32::from(w) % 160, 1 + u32::from(h) % 100);
        let screen = Screen::new();
        screen.resize(width, height);
        paint(&screen, options);
        let password = (options & 1 != 0).then(|| auth::key_from_password(PASSWORD));
        let config = ServerConfig { password, name: "fuzz".into() };
        let mut stream = Client { input: client, output: handshake };
        if handshake_with(&mut stream, &config, false, CHALLENGE, Duration::ZERO).is_err()
            || stream.write_all(&server_init(width, height, &config.name)).is_err()
        {
            return (0, stream.output, updates);
        }
        let shared = Arc::new(Shared { state: Mutex::new(ClientState::new()), viewer: screen.subscribe() });
        // The guest's lock lights change with every 3rd message (LED state for clients that take it).
        let input = Arc::new(Lights(AtomicUsize::new(0), options & 16 != 0));
        let mut writer = Writer::new(updates, shared.clone(), screen.clone(), input.clone(), (width, height));
        let mut messages = 0u32;
        while let Ok(true) = read_message(&mut stream, &shared, input.as_ref(), &screen) {
            messages += 1;
            input.0.store(messages as usize / 3, Ordering::Relaxed);
            if options & 2 != 0 && messages.is_multiple_of(8) {
                let now = screen.read().bounds();
                screen.resize(now.h, now.w);
                paint(&screen, options);
            }
            if options & 4 != 0 && messages.is_multiple_of(4) {
                screen.scroll(if messages.is_multiple_of(8) { 3 } else { -5 });
            }
            if options & 8 != 0 && messages.is_multiple_of(5) {
                let side = messages % 70;
                let pixels = (0..side * side).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
                let image =
                    crate::display::CursorImage { width: side, height: side, hot_x: side / 2, hot_y: 0, pixels };
                screen.set_cursor((side > 0).then(|| Arc::new(image)));
            }
            if options & 16 != 0 && messages.is_multiple_of(6) {
                screen.set_clipboard(&"guest text ✓\n".repeat(messages as usize % 50));
            }
            let Ok(Some(plan)) = writer.next_plan() else { continue };
            let damage = lock(&shared.viewer.damage).take();
            if damage.closed || writer.answer(&plan, damage).is_err() {
                break;
            }
        }
        (messages, stream.output, writer.stream)
    }

    /// Input whose keyboard's lock lights are the low 3 bits of a counter, with a guest clipboard or not.
    struct Lights(AtomicUsize, bool);

    impl Input for Lights {
        fn key(&self, _key: Key, _down: bool) {}
        fn pointer(&self, _x: u16, _y: u16, _buttons: u8, _screen: (u32, u32)) {}
        fn lock_lights(&self) -> Option<u8> {
            Some(self.0.load(Ordering::Relaxed) as u8 & 7)
        }
        fn has_clipboard(&self) -> bool {
            self.1
        }
        fn set_clipboard(&self, text: String) {
            std::hint::black_box(text);
        }
    }

    /// A picture with flat areas, gradients and noise, so every encoder takes its several paths.
    fn paint(screen: &Screen, seed: u8) {
        let mut frame = screen.write();
        let width = frame.width;
        let mut noise = u32::from(seed) | 1;
        for (i, p) in frame.pixels.iter_mut().enumerate() {
            let (x, y) = (i as u32 % width, i as u32 / width);
            noise ^= noise << 13;
            noise ^= noise >> 17;
            noise ^= noise << 5;
            *p = match (x / 16 + y / 16) % 4 {
                0 => 0x0020_4080,
                1 => (x * 4) << 16 | (y * 4) << 8 | 0x40,
                2 => noise & 0x00ff_ffff,
                _ if (x + y) % 3 == 0 => 0x00ff_ffff,
                _ => 0,
            };
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn connection(version: &[u8], security: u8, answer: Option<[u8; 16]>) -> Vec<u8> {
            let mut d = vec![u8::from(answer.is_some()), 63, 47];
            d.extend_from_slice(version);
            if version != b"RFB 003.003\n" {
                d.push(security);
            }
            d.extend(answer.iter().flatten());
            d.push(1); // shared
            d.extend_from_slice(&[2, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 0]); // SetEncodings ZRLE, Raw
            d.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 64, 0, 48]); // a full update request
            d
        }

        #[test]
        fn every_handshake_reaches_the_messages() {
            for v in [&b"RFB 003.003\n"[..], b"RFB 003.007\n", b"RFB 003.008\n"] {
                assert_eq!(server_session(&connection(v, 1, None)), 2);
                assert_eq!(server_session(&connection(v, 2, Some(response()))), 2);
                assert_eq!(server_session(&connection(v, 2, Some([0; 16]))), 0, "a wrong answer");
            }
            // The update comes after the ServerInit: a 64x48 ZRLE rectangle.
            let out = server_transcript(&connection(b"RFB 003.008\n", 1, None));
            let update = [0, 0, 0, 1, 0, 0, 0, 0, 0, 64, 0, 48, 0, 0, 0, 16];
            assert!(out.windows(update.len()).any(|w| w == update));
        }
    }
}

#[cfg(test)]
mod update_tests {
    use super::*;
    use crate::display::CursorImage;

    /// An input whose display follows SetDesktopSize (as a VM with virtio-gpu).
    struct Follows(Mutex<Option<(u32, u32)>>);

    impl Input for Follows {
        fn key(&self, _key: Key, _down: bool) {}
        fn pointer(&self, _x: u16, _y: u16, _buttons: u8, _screen: (u32, u32)) {}
        fn resize_screen(&self, width: u32, height: u32) -> Option<(u32, u32)> {
            *lock(&self.0) = Some((width, height));
            Some((width, height))
        }
    }

    /// A server side of one client over `screen`: feeds it `messages`, returns what the writer sends.
    struct Session {
        shared: Arc<Shared>,
        screen: Arc<Screen>,
        writer: Writer<Vec<u8>>,
    }

    impl Session {
        fn new(screen: &Arc<Screen>, input: Arc<dyn Input>) -> Session {
            let shared = Arc::new(Shared { state: Mutex::new(ClientState::new()), viewer: screen.subscribe() });
            let size = (screen.read().width, screen.read().height);
            let writer = Writer::new(Vec::new(), shared.clone(), screen.clone(), input, size);
            Session { shared, screen: screen.clone(), writer }
        }

        /// Reads `bytes` as client messages with `input`, then lets the writer answer; returns its bytes.
        fn exchange(&mut self, bytes: &[u8], input: &dyn Input) -> Vec<u8> {
            let mut stream = bytes;
            while !stream.is_empty() {
                assert!(read_message(&mut stream, &self.shared, input, &self.screen).unwrap());
            }
            if let Some(plan) = self.writer.next_plan().unwrap() {
                let damage = lock(&self.shared.viewer.damage).take();
                self.writer.answer(&plan, damage).unwrap();
            }
            std::mem::take(&mut self.writer.stream)
        }
    }

    fn set_encodings(list: &[i32]) -> Vec<u8> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(list.len() as u16).to_be_bytes());
        m.extend(list.iter().flat_map(|e| e.to_be_bytes()));
        m
    }

    const INCREMENTAL_REQUEST: [u8; 10] = [3, 1, 0, 0, 0, 0, 0, 64, 0, 48];

    /// Where the Cursor pseudo-rectangle with hotspot `hot` and size `size` starts in `out`, if it is there.
    fn cursor_rect(out: &[u8], hot: (u16, u16), size: (u16, u16)) -> Option<usize> {
        let mut header = Vec::new();
        for v in [hot.0, hot.1, size.0, size.1] {
            header.extend_from_slice(&v.to_be_bytes());
        }
        header.extend_from_slice(&encoding::CURSOR.to_be_bytes());
        out.windows(header.len()).position(|w| w == header).map(|at| at + header.len())
    }

    /// An input with a clipboard agent: keeps the text clients put on the clipboard.
    #[derive(Default)]
    struct Shares(Mutex<Vec<String>>);

    impl Input for Shares {
        fn key(&self, _key: Key, _down: bool) {}
        fn pointer(&self, _x: u16, _y: u16, _buttons: u8, _screen: (u32, u32)) {}
        fn has_clipboard(&self) -> bool {
            true
        }
        fn set_clipboard(&self, text: String) {
            lock(&self.0).push(text);
        }
    }

    fn contains(out: &[u8], part: &[u8]) -> bool {
        out.windows(part.len()).any(|w| w == part)
    }

    /// A client's extended clipboard message (a server's with the client's message type).
    fn client_clipboard(server_message: Vec<u8>) -> Vec<u8> {
        let mut m = server_message;
        m[0] = 6;
        m
    }

    const FULL_REQUEST: [u8; 10] = [3, 0, 0, 0, 0, 0, 0, 64, 0, 48];

    /// An input of a VM with a sound card.
    struct Sounds;

    impl Input for Sounds {
        fn key(&self, _key: Key, _down: bool) {}
        fn pointer(&self, _x: u16, _y: u16, _buttons: u8, _screen: (u32, u32)) {}
        fn has_audio(&self) -> bool {
            true
        }
    }

    #[test]
    fn clients_that_take_qemu_audio_hear_the_guest_in_their_format() {
        use crate::audio::AudioFormat;
        let screen = Screen::new();
        screen.resize(64, 48);
        let mut s = Session::new(&screen, Arc::new(Sounds));
        let ack = [0u8, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xfe, 0xfd]; // a 0×0 rectangle of -259
        let out = s.exchange(&[set_encodings(&[0, audio::AUDIO]), INCREMENTAL_REQUEST.to_vec()].concat(), &Sounds);
        assert!(contains(&out, &ack), "the extension is acknowledged in an update");
        // Mono unsigned 8-bit at the guest's rate, then enable.
        let format = [255, 1, 0, 2, 0, 1, 0, 0, 0x1f, 0x40];
        let out = s.exchange(&[format.to_vec(), vec![255, 1, 0, 0]].concat(), &Sounds);
        assert!(!contains(&out, &[255, 1, 0, 1]), "nothing plays yet");
        screen.audio_start(AudioFormat { rate: 8000, channels: 2 });
        screen.audio_push(&[0, 0, 0x4000, 0x4000, -0x4000, -0x4000, 0, 0]);
        let out = s.exchange(&[], &Sounds);
        assert!(contains(&out, &[255, 1, 0, 1]), "begin: {out:?}");
        // All four frames at once, in the client's format.
        assert!(contains(&out, &[255, 1, 0, 2, 0, 0, 0, 4, 0x80, 0xc0, 0x40, 0x80]), "data: {out:?}");
        screen.audio_stop();
        let out = s.exchange(&[], &Sounds);
        assert!(contains(&out, &[255, 1, 0, 0]), "end: {out:?}");
        // A format the extension does not have closes the connection.
        let mut stream: &[u8] = &[255, 1, 0, 2, 9, 2, 0, 0, 0x1f, 0x40];
        assert!(read_message(&mut stream, &s.shared, &Sounds, &screen).is_err());

        // A VM without a sound card acknowledges nothing and ignores an enable.
        let mut quiet = Session::new(&screen, Arc::new(NoInput));
        let out = quiet.exchange(
            &[set_encodings(&[0, audio::AUDIO]), FULL_REQUEST.to_vec(), vec![255, 1, 0, 0]].concat(),
            &NoInput,
        );
        assert!(!contains(&out, &ack));
        screen.audio_start(AudioFormat { rate: 8000, channels: 2 });
        screen.audio_push(&[1, 1, 2, 2]);
        let out = quiet.exchange(&[], &NoInput);
        assert!(!contains(&out, &[255, 1, 0, 1]));
    }

    #[test]
    fn plain_cut_text_goes_both_ways_when_the_guest_shares_its_clipboard() {
        let screen = Screen::new();
        screen.resize(64, 48);
        let shares = Arc::new(Shares::default());
        let mut s = Session::new(&screen, shares.clone());
        screen.set_clipboard("früh ✓");
        // Not before the client asked for an update (it has said what it takes by then).
        let out = s.exchange(&set_encodings(&[0]), shares.as_ref());
        assert!(!contains(&out, &clipboard::plain_message("früh ✓")));
        let out = s.exchange(&FULL_REQUEST, shares.as_ref());
        assert!(contains(&out, &clipboard::plain_message("früh ✓")), "the guest's text, in Latin-1");
        assert!(contains(&out, b"fr\xfch ?"));
        let out = s.exchange(&INCREMENTAL_REQUEST, shares.as_ref());
        assert!(!contains(&out, b"fr\xfch ?"), "sent once");
        // The client's cut text reaches the guest.
        let out = s.exchange(&[6, 0, 0, 0, 0, 0, 0, 6, b'c', b'a', b'f', 0xE9, b'\r', b'\n'], shares.as_ref());
        assert!(out.is_empty() || out[0] == 0);
        assert_eq!(*lock(&shares.0), ["café\n"]);

        // Without an agent: cut text is read and dropped, the guest's never announced.
        let mut plain = Session::new(&screen, Arc::new(NoInput));
        let out = plain
            .exchange(&[set_encodings(&[0, clipboard::EXTENDED_CLIPBOARD]), FULL_REQUEST.to_vec()].concat(), &NoInput);
        assert!(!contains(&out, b"fr\xfch ?"));
        assert!(!contains(&out, &clipboard::caps_message()));
        plain.exchange(&[6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i'], &NoInput);
    }

    #[test]
    fn the_extended_clipboard_offers_fetches_and_provides_utf8() {
        let screen = Screen::new();
        screen.resize(64, 48);
        let shares = Arc::new(Shares::default());
        let mut s = Session::new(&screen, shares.clone());
        screen.set_clipboard("ünï\ncode");
        let hello = [set_encodings(&[0, clipboard::EXTENDED_CLIPBOARD]), FULL_REQUEST.to_vec()].concat();
        let out = s.exchange(&hello, shares.as_ref());
        assert!(out.starts_with(&clipboard::caps_message()), "the server's capabilities first");
        let notify = clipboard::server_message(clipboard::NOTIFY | clipboard::TEXT, &[]);
        assert!(contains(&out, &notify), "then an offer of the guest's text, not the text");
        assert!(!contains(&out, b"code"));
        // The client pastes: it asks, the text comes compressed, in UTF-8.
        let ask = client_clipboard(clipboard::server_message(clipboard::REQUEST | clipboard::TEXT, &[]));
        let out = s.exchange(&ask, shares.as_ref());
        let provide = clipboard::provide_message("ünï\ncode");
        assert!(out.starts_with(&provide));
        assert_eq!(
            clipboard::provided_text(clipboard::PROVIDE | clipboard::TEXT, &provide[12..]).unwrap(),
            "ünï\ncode"
        );
        // The client copies: the server fetches the text at once and hands it to the guest.
        let offer = client_clipboard(clipboard::server_message(clipboard::NOTIFY | clipboard::TEXT, &[]));
        let out = s.exchange(&offer, shares.as_ref());
        assert!(out.starts_with(&clipboard::server_message(clipboard::REQUEST | clipboard::TEXT, &[])));
        s.exchange(&client_clipboard(clipboard::provide_message("ça\r\nva ✓")), shares.as_ref());
        assert_eq!(*lock(&shares.0), ["ça\nva ✓"]);
        // A peek is answered with a notify.
        let peek = client_clipboard(clipboard::server_message(clipboard::PEEK, &[]));
        assert!(s.exchange(&peek, shares.as_ref()).starts_with(&notify));
        // An extended message without its flags is a protocol error.
        let mut stream = &[6u8, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFE, 0, 0][..];
        assert!(read_message(&mut stream, &s.shared, shares.as_ref(), &screen).is_err());
    }

    #[test]
    fn the_guests_pointer_shape_reaches_clients_that_take_the_cursor_encoding() {
        let screen = Screen::new();
        screen.resize(64, 48);
        let input: Arc<dyn Input> = Arc::new(NoInput);
        let mut s = Session::new(&screen, input.clone());
        let mut first = set_encodings(&[0, encoding::CURSOR]);
        first.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 64, 0, 48]);
        let out = s.exchange(&first, &NoInput);
        assert!(cursor_rect(&out, (0, 0), (11, 19)).is_some(), "the server's arrow first");
        // The guest sets a 2x2 pointer, hotspot (1, 1): opaque red, transparent, transparent, opaque blue.
        let image =
            CursorImage { width: 2, height: 2, hot_x: 1, hot_y: 1, pixels: vec![0xFFFF_0000, 0, 0, 0xFF00_00FF] };
        screen.set_cursor(Some(Arc::new(image)));
        let out = s.exchange(&INCREMENTAL_REQUEST, &NoInput);
        let at = cursor_rect(&out, (1, 1), (2, 2)).expect("the guest's pointer");
        // Raw 32-bit pixels (little-endian 0x00RRGGBB), then one mask byte per row.
        assert_eq!(&out[at..at + 16], [0, 0, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 0, 0]);
        assert_eq!(&out[at + 16..at + 18], [0x80, 0x40]);
        // Nothing new: not sent again.
        let out = s.exchange(&INCREMENTAL_REQUEST, &NoInput);
        assert!(cursor_rect(&out, (1, 1), (2, 2)).is_none());
        // Back to the arrow (the guest's driver let go).
        screen.set_cursor(None);
        let out = s.exchange(&INCREMENTAL_REQUEST, &NoInput);
        assert!(cursor_rect(&out, (0, 0), (11, 19)).is_some());
        // A client that did not take the encoding never gets a shape.
        let mut plain = Session::new(&screen, input);
        let mut first = set_encodings(&[0]);
        first.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 64, 0, 48]);
        let out = plain.exchange(&first, &NoInput);
        assert!(!out.windows(4).any(|w| w == encoding::CURSOR.to_be_bytes()));
    }

    /// A client that takes ExtendedDesktopSize gets the screen's layout with its first update, the size
    /// unchanged (so it knows it may send SetDesktopSize), and once only.
    #[test]
    fn the_layout_is_announced_once_to_clients_that_take_extended_desktop_size() {
        let screen = Screen::new();
        screen.resize(64, 48);
        let mut s = Session::new(&screen, Arc::new(NoInput));
        let layout = {
            let mut r = Vec::new();
            for v in [0u16, 0, 64, 48] {
                r.extend_from_slice(&v.to_be_bytes());
            }
            r.extend_from_slice(&encoding::EXTENDED_DESKTOP_SIZE.to_be_bytes());
            r
        };
        let count = |out: &[u8]| out.windows(layout.len()).filter(|w| *w == &layout[..]).count();
        let mut first = set_encodings(&[0, encoding::EXTENDED_DESKTOP_SIZE]);
        first.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 64, 0, 48]);
        assert_eq!(count(&s.exchange(&first, &NoInput)), 1, "announced with the first update");
        let again = [3, 0, 0, 0, 0, 0, 0, 64, 0, 48];
        assert_eq!(count(&s.exchange(&again, &NoInput)), 0, "once");
        // Without the encoding, nothing.
        let mut plain = Session::new(&screen, Arc::new(NoInput));
        let mut first = set_encodings(&[0]);
        first.extend_from_slice(&again);
        assert_eq!(count(&plain.exchange(&first, &NoInput)), 0);
    }

    #[test]
    fn set_desktop_size_goes_to_a_display_that_follows_and_is_refused_otherwise() {
        let screen = Screen::new();
        screen.resize(64, 48);
        let mut message = vec![251, 0];
        message.extend_from_slice(&1024u16.to_be_bytes());
        message.extend_from_slice(&768u16.to_be_bytes());
        message.extend_from_slice(&[1, 0]);
        message.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
        // The reply: an ExtendedDesktopSize rectangle at x = 1 (the client asked), y = the status.
        let reply = |status: u16| {
            let mut r = 1u16.to_be_bytes().to_vec();
            r.extend_from_slice(&status.to_be_bytes());
            r.extend_from_slice(&64u16.to_be_bytes());
            r.extend_from_slice(&48u16.to_be_bytes());
            r.extend_from_slice(&encoding::EXTENDED_DESKTOP_SIZE.to_be_bytes());
            r
        };
        let contains = |out: &[u8], r: &[u8]| out.windows(r.len()).any(|w| w == r);
        for (follows, status) in [(true, 0), (false, 1)] {
            let input: Arc<dyn Input> = if follows { Arc::new(Follows(Mutex::new(None))) } else { Arc::new(NoInput) };
            let mut s = Session::new(&screen, input.clone());
            let mut first = set_encodings(&[0, encoding::EXTENDED_DESKTOP_SIZE]);
            first.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 64, 0, 48]);
            s.exchange(&first, &*input);
            // The reply goes out with the next update (the client keeps one requested).
            let out = s.exchange(&[&message[..], &INCREMENTAL_REQUEST].concat(), &*input);
            assert!(contains(&out, &reply(status)), "follows={follows}: {out:?}");
        }
        let follows = Follows(Mutex::new(None));
        let mut s = Session::new(&screen, Arc::new(NoInput));
        s.exchange(&set_encodings(&[0, encoding::EXTENDED_DESKTOP_SIZE]), &follows);
        s.exchange(&message, &follows);
        assert_eq!(*lock(&follows.0), Some((1024, 768)), "the size the client asked for");
    }
}
