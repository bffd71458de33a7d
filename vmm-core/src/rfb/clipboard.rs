//! The clipboard between RFB clients and the guest: plain cut text (RFC 6143 §7.5.6 and §7.6.4: Latin-1,
//! LF line ends) and the extended clipboard (the 0xC0A1E5CE pseudo-encoding that TigerVNC, noVNC and
//! Porthole's console speak: UTF-8 text, CRLF line ends and a NUL, zlib-compressed, offered with *notify*
//! and fetched with *request*, so a large clipboard crosses only when someone pastes).

use std::io::Read;

/// The extended clipboard pseudo-encoding.
pub const EXTENDED_CLIPBOARD: i32 = 0xC0A1_E5CE_u32 as i32;
/// Formats and actions of an extended clipboard message's flags.
pub const TEXT: u32 = 1;
pub const CAPS: u32 = 1 << 24;
pub const REQUEST: u32 = 1 << 25;
pub const PEEK: u32 = 1 << 26;
pub const NOTIFY: u32 = 1 << 27;
pub const PROVIDE: u32 = 1 << 28;
/// Most bytes of clipboard text taken from or offered to a client.
pub const MAX_TEXT: usize = crate::vdagent::MAX_TEXT;

/// An extended ServerCutText message: the flags, then `payload`.
pub fn server_message(flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 0, 0, 0];
    m.extend_from_slice(&(-((payload.len() + 4) as i32)).to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// The server's capabilities: text up to [`MAX_TEXT`], every action.
pub fn caps_message() -> Vec<u8> {
    server_message(CAPS | REQUEST | PEEK | NOTIFY | PROVIDE | TEXT, &(MAX_TEXT as u32).to_be_bytes())
}

/// A plain ServerCutText of `text` (characters beyond Latin-1 become '?').
pub fn plain_message(text: &str) -> Vec<u8> {
    let latin1: Vec<u8> = text.chars().take(MAX_TEXT).map(|c| if (c as u32) < 256 { c as u8 } else { b'?' }).collect();
    let mut m = vec![3, 0, 0, 0];
    m.extend_from_slice(&(latin1.len() as u32).to_be_bytes());
    m.extend_from_slice(&latin1);
    m
}

/// The text of a plain ClientCutText (Latin-1).
pub fn latin1_text(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect::<String>().replace("\r\n", "\n")
}

/// A provide message with `text` (CRLF line ends, a NUL at its end, compressed).
pub fn provide_message(text: &str) -> Vec<u8> {
    let mut raw = text.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes();
    raw.truncate(MAX_TEXT - 1);
    raw.push(0);
    let mut plain = (raw.len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(&raw);
    let mut z = flate2::Compress::new(flate2::Compression::fast(), true);
    let mut out = Vec::with_capacity(plain.len() / 2 + 64);
    loop {
        out.reserve(plain.len() / 2 + 64);
        let before = z.total_in() as usize;
        match z.compress_vec(&plain[before..], &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => break,
            Ok(_) => continue,
            Err(_) => return server_message(PROVIDE | TEXT, &[]),
        }
    }
    server_message(PROVIDE | TEXT, &out)
}

/// The text in a client's provide message payload (after the flags), if it carries text; inflates at
/// most [`MAX_TEXT`] bytes of it.
pub fn provided_text(flags: u32, payload: &[u8]) -> Option<String> {
    if flags & TEXT == 0 {
        return None;
    }
    let mut z = flate2::read::ZlibDecoder::new(payload).take(4 + MAX_TEXT as u64);
    let mut size = [0u8; 4];
    z.read_exact(&mut size).ok()?;
    let size = (u32::from_be_bytes(size) as usize).min(MAX_TEXT);
    let mut text = Vec::with_capacity(size.min(64 * 1024));
    z.take(size as u64).read_to_end(&mut text).ok()?;
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    Some(String::from_utf8_lossy(&text[..end]).replace("\r\n", "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provided_text_round_trips_and_is_bounded() {
        let m = provide_message("ünï\ncode");
        assert_eq!(i32::from_be_bytes([m[4], m[5], m[6], m[7]]), -((m.len() - 8) as i32));
        let flags = u32::from_be_bytes([m[8], m[9], m[10], m[11]]);
        assert_eq!(provided_text(flags, &m[12..]).as_deref(), Some("ünï\ncode"));
        assert_eq!(provided_text(PROVIDE, &m[12..]), None, "no text format");
        assert_eq!(provided_text(PROVIDE | TEXT, b"not zlib"), None);
        // A bomb: 64 MiB of zeros announced as text inflates no further than the limit.
        let mut plain = (u32::MAX).to_be_bytes().to_vec();
        plain.extend(std::iter::repeat_n(b'a', 64 << 20));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, &plain).unwrap();
        let bomb = z.finish().unwrap();
        assert_eq!(provided_text(PROVIDE | TEXT, &bomb).unwrap().len(), MAX_TEXT);
    }

    #[test]
    fn plain_cut_text_is_latin1() {
        let m = plain_message("café ✓");
        assert_eq!(&m[8..], b"caf\xe9 ?");
        assert_eq!(latin1_text(b"caf\xe9\r\nx"), "café\nx");
    }
}
