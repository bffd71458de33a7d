//! The RFB client the tests use is the product's own (`porthole_api::rfb`, also behind the GUI's console).
//!
//! Added here for the tests only: QEMU's RFB audio extension, client side (its client messages, and
//! [`ServerMessages`], a reader of server messages that knows its server messages next to updates).

pub use porthole_api::rfb::*;

use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;

/// QEMU's audio pseudo-encoding: a client that lists it gets it acknowledged by a rectangle of it.
pub const QEMU_AUDIO: i32 = -259;
/// The QEMU message type (both ways) and its audio sub-type.
pub const QEMU_MESSAGE: u8 = 255;
pub const QEMU_AUDIO_SUBTYPE: u8 = 1;
/// QEMU audio sample formats (SetFormat): U8 0, S8 1, U16 2, S16 3, U32 4, S32 5.
pub const QEMU_AUDIO_S16: u8 = 3;
/// The most audio data one message may carry here (QEMU sends a few kilobytes at a time).
const MAX_AUDIO_DATA: usize = 16 << 20;
const MAX_CUT_TEXT: usize = 1 << 20;

/// QEMU client message: audio, SetFormat (`format`: [`QEMU_AUDIO_S16`] etc., `channels` 1 or 2, `freq` Hz).
pub fn qemu_audio_set_format_message(format: u8, channels: u8, freq: u32) -> Vec<u8> {
    let mut m = vec![QEMU_MESSAGE, QEMU_AUDIO_SUBTYPE];
    m.extend_from_slice(&2u16.to_be_bytes());
    m.push(format);
    m.push(channels);
    m.extend_from_slice(&freq.to_be_bytes());
    m
}

/// QEMU client message: audio, enable (the server sends what the guest plays from then on).
pub fn qemu_audio_enable_message() -> Vec<u8> {
    vec![QEMU_MESSAGE, QEMU_AUDIO_SUBTYPE, 0, 0]
}

/// QEMU client message: audio, disable.
pub fn qemu_audio_disable_message() -> Vec<u8> {
    vec![QEMU_MESSAGE, QEMU_AUDIO_SUBTYPE, 0, 1]
}

/// One server message, as [`ServerMessages::read_message`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// A framebuffer update: its rectangles (pixel data skipped).
    Update(Vec<UpdateRect>),
    Bell,
    /// ServerCutText (plain; an extended clipboard message has a negative length, kept as is).
    CutText(i32),
    /// A colour map, an EndOfContinuousUpdates or a ServerFence: skipped.
    Skipped(u8),
    /// QEMU audio, operation 1: the guest's playing begins.
    AudioBegin,
    /// QEMU audio, operation 2: samples in the format the client set (interleaved, little-endian).
    AudioData(Vec<u8>),
    /// QEMU audio, operation 0: the playing ends.
    AudioEnd,
}

/// Server messages read straight off a connection that an [`RfbClient`] set up (its handshake done, its
/// pixel format 32 bits per pixel). Use this *instead of* the client's own [`RfbClient::read_update`], which
/// does not know QEMU's server messages: the two must not both read one connection (each buffers).
pub struct ServerMessages {
    reader: BufReader<UnixStream>,
}

impl ServerMessages {
    /// A reader of `client`'s connection. Nothing may have been read through `client` since its handshake.
    pub fn of(client: &RfbClient) -> io::Result<ServerMessages> {
        Ok(ServerMessages { reader: BufReader::with_capacity(1 << 16, client.stream.try_clone()?) })
    }

    /// The next whole message. Rectangles are understood for the encodings raw (32 bits per pixel, the
    /// client's format), DesktopSize, ExtendedDesktopSize, LastRect and [`QEMU_AUDIO`]; others are an error,
    /// as are QEMU messages other than audio.
    pub fn read_message(&mut self) -> io::Result<ServerMessage> {
        let r = &mut self.reader;
        let kind = read_u8(r)?;
        Ok(match kind {
            0 => {
                read_u8(r)?;
                let n = read_u16(r)?;
                let mut rects = Vec::new();
                for _ in 0..n {
                    let (x, y, w, h) = (read_u16(r)?, read_u16(r)?, read_u16(r)?, read_u16(r)?);
                    let (x, y, w, h) = (u32::from(x), u32::from(y), u32::from(w), u32::from(h));
                    let encoding = read_u32(r)? as i32;
                    rects.push((encoding, x, y, w, h));
                    match encoding {
                        RAW => skip(r, w as usize * h as usize * 4)?,
                        DESKTOP_SIZE | QEMU_AUDIO => {}
                        EXTENDED_DESKTOP_SIZE => {
                            let screens = read_u8(r)?;
                            skip(r, 3 + usize::from(screens) * 16)?;
                        }
                        LAST_RECT => break,
                        other => return Err(io::Error::other(format!("unexpected encoding {other}"))),
                    }
                }
                ServerMessage::Update(rects)
            }
            1 => {
                skip(r, 3)?;
                let n = read_u16(r)?;
                skip(r, usize::from(n) * 6)?;
                ServerMessage::Skipped(1)
            }
            2 => ServerMessage::Bell,
            3 => {
                skip(r, 3)?;
                let len = read_u32(r)? as i32;
                if len.unsigned_abs() as usize > MAX_CUT_TEXT {
                    return Err(io::Error::other(format!("{len} bytes of cut text")));
                }
                skip(r, len.unsigned_abs() as usize)?;
                ServerMessage::CutText(len)
            }
            150 => ServerMessage::Skipped(150),
            248 => {
                let mut head = [0u8; 8];
                r.read_exact(&mut head)?;
                skip(r, usize::from(head[7]))?;
                ServerMessage::Skipped(248)
            }
            QEMU_MESSAGE => {
                let sub = read_u8(r)?;
                if sub != QEMU_AUDIO_SUBTYPE {
                    return Err(io::Error::other(format!("unexpected QEMU server message sub-type {sub}")));
                }
                match read_u16(r)? {
                    0 => ServerMessage::AudioEnd,
                    1 => ServerMessage::AudioBegin,
                    2 => {
                        let len = read_u32(r)? as usize;
                        if len > MAX_AUDIO_DATA {
                            return Err(io::Error::other(format!("{len} bytes of audio in one message")));
                        }
                        let mut data = vec![0u8; len];
                        r.read_exact(&mut data)?;
                        ServerMessage::AudioData(data)
                    }
                    op => return Err(io::Error::other(format!("unexpected QEMU audio operation {op}"))),
                }
            }
            other => return Err(io::Error::other(format!("unexpected server message {other}"))),
        })
    }
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn skip(r: &mut impl Read, n: usize) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n as u64), &mut io::sink())?;
    if copied as usize == n { Ok(()) } else { Err(io::ErrorKind::UnexpectedEof.into()) }
}

/// One audio message an RFB client heard, with when it came (from the client's enable, see [`start_audio`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeardAudio {
    Begin(std::time::Duration),
    Data(std::time::Duration, Vec<u8>),
    End(std::time::Duration),
}

impl HeardAudio {
    /// "begin", "data" or "end".
    pub fn kind(&self) -> &'static str {
        match self {
            HeardAudio::Begin(_) => "begin",
            HeardAudio::Data(..) => "data",
            HeardAudio::End(_) => "end",
        }
    }

    /// When it came.
    pub fn at(&self) -> std::time::Duration {
        match self {
            HeardAudio::Begin(t) | HeardAudio::Data(t, _) | HeardAudio::End(t) => *t,
        }
    }

    /// The samples of the data messages among `heard`, in order, one buffer.
    pub fn data_of(heard: &[HeardAudio]) -> Vec<u8> {
        heard
            .iter()
            .filter_map(|h| if let HeardAudio::Data(_, d) = h { Some(d.as_slice()) } else { None })
            .flatten()
            .copied()
            .collect()
    }
}

/// The client side of QEMU's audio extension after the client listed [`QEMU_AUDIO`] among its encodings and
/// asked for an update: waits until `deadline` for the acknowledgement (a rectangle of [`QEMU_AUDIO`] in an
/// update; updates without it, bells and skipped messages are passed over), then sends SetFormat (`format`,
/// `channels`, `freq`) and enable. Returns when the enable was sent (the time base of [`HeardAudio`]).
/// Any other message before the acknowledgement, or none by the deadline, is an error.
pub fn start_audio(
    client: &mut RfbClient,
    messages: &mut ServerMessages,
    (format, channels, freq): (u8, u8, u32),
    deadline: std::time::Instant,
) -> io::Result<std::time::Instant> {
    use std::io::Write;
    loop {
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement of the audio pseudo-encoding"));
        }
        match messages.read_message()? {
            ServerMessage::Update(rects) if rects.iter().any(|r| r.0 == QEMU_AUDIO) => break,
            ServerMessage::Update(_) | ServerMessage::Skipped(_) | ServerMessage::Bell => {}
            other => return Err(io::Error::other(format!("before the audio acknowledgement: {other:?}"))),
        }
    }
    client.stream.write_all(&qemu_audio_set_format_message(format, channels, freq))?;
    client.stream.write_all(&qemu_audio_enable_message())?;
    Ok(std::time::Instant::now())
}

/// A client of the VNC server on Unix socket `path` that hears its sound: it lists raw and [`QEMU_AUDIO`],
/// asks for a whole frame and starts the audio in S16 stereo at `rate` ([`start_audio`], until `deadline`);
/// reads time out after 30 s. The client, the reader of its server messages, and when the enable was sent.
pub fn audio_client(
    path: &std::path::Path,
    rate: u32,
    deadline: std::time::Instant,
) -> io::Result<(RfbClient, ServerMessages, std::time::Instant)> {
    let mut c = RfbClient::connect(path, None).map_err(|e| io::Error::other(format!("connect: {e:?}")))?;
    let mut messages = ServerMessages::of(&c)?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    c.set_encodings(&[RAW, QEMU_AUDIO])?;
    c.request(false)?;
    let enabled = start_audio(&mut c, &mut messages, (QEMU_AUDIO_S16, 2, rate), deadline)?;
    Ok((c, messages, enabled))
}

/// Interleaved little-endian S16 stereo frames (QEMU audio data in [`QEMU_AUDIO_S16`] with 2 channels, or a
/// WAV file's data): the left channel and the right channel. A trailing partial frame is left out.
pub fn s16le_stereo(bytes: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let frames = bytes.chunks_exact(4);
    frames.map(|f| (i16::from_le_bytes([f[0], f[1]]), i16::from_le_bytes([f[2], f[3]]))).unzip()
}
