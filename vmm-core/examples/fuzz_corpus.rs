//! Writes the seed corpora of the RFB fuzz targets (`fuzz/corpus/rfb_server`, `fuzz/corpus/rfb_client`):
//! real client sessions for the server (every handshake variant, every client message), and what the
//! server answers to them, plus clipboard and control messages, for the client.
//!
//! `cargo run -p vmm-core --features fuzzing --example fuzz_corpus -- fuzz/corpus`

use std::io::Write;
use std::path::Path;

use vmm_core::rfb::encoding::*;
use vmm_core::rfb::fuzz;

const V3: &[u8] = b"RFB 003.003\n";
const V7: &[u8] = b"RFB 003.007\n";
const V8: &[u8] = b"RFB 003.008\n";

/// 32 bpp little-endian 0x00RRGGBB (what `porthole_api::rfb` asks for), 16 bpp big-endian 5:6:5, 8 bpp
/// 3:3:2.
const PF32: [u8; 16] = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];
const PF16: [u8; 16] = [16, 16, 1, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0];
const PF8: [u8; 16] = [8, 8, 0, 1, 0, 7, 0, 7, 0, 3, 5, 2, 0, 0, 0, 0];

/// A client session: options, screen size, handshake, then `messages`.
fn session(options: u8, size: (u8, u8), version: &[u8], messages: &[Vec<u8>]) -> Vec<u8> {
    let mut d = vec![options, size.0, size.1];
    d.extend_from_slice(version);
    let auth = options & 1 != 0;
    if version != V3 {
        d.push(if auth { 2 } else { 1 });
    }
    if auth {
        d.extend_from_slice(&fuzz::response());
    }
    d.push(1); // shared
    messages.iter().for_each(|m| d.extend_from_slice(m));
    d
}

fn set_pixel_format(pf: &[u8; 16]) -> Vec<u8> {
    let mut m = vec![0, 0, 0, 0];
    m.extend_from_slice(pf);
    m
}

fn set_encodings(list: &[i32]) -> Vec<u8> {
    let mut m = vec![2, 0];
    m.extend_from_slice(&(list.len() as u16).to_be_bytes());
    list.iter().for_each(|e| m.extend_from_slice(&e.to_be_bytes()));
    m
}

fn request(incremental: bool, x: u16, y: u16, w: u16, h: u16) -> Vec<u8> {
    let mut m = vec![3, u8::from(incremental)];
    [x, y, w, h].iter().for_each(|v| m.extend_from_slice(&v.to_be_bytes()));
    m
}

fn key(down: bool, keysym: u32) -> Vec<u8> {
    let mut m = vec![4, u8::from(down), 0, 0];
    m.extend_from_slice(&keysym.to_be_bytes());
    m
}

fn pointer(buttons: u8, x: u16, y: u16) -> Vec<u8> {
    let mut m = vec![5, buttons];
    m.extend_from_slice(&x.to_be_bytes());
    m.extend_from_slice(&y.to_be_bytes());
    m
}

/// ClientCutText; a negative length marks an extended clipboard message.
fn cut_text(kind: u8, len: i32, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

fn extended_clipboard(kind: u8, flags: u32, rest: &[u8]) -> Vec<u8> {
    let mut payload = flags.to_be_bytes().to_vec();
    payload.extend_from_slice(rest);
    cut_text(kind, -(payload.len() as i32), &payload)
}

fn continuous(enable: bool, w: u16, h: u16) -> Vec<u8> {
    let mut m = vec![150, u8::from(enable), 0, 0, 0, 0];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    m
}

fn fence(flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![248, 0, 0, 0];
    m.extend_from_slice(&flags.to_be_bytes());
    m.push(payload.len() as u8);
    m.extend_from_slice(payload);
    m
}

fn set_desktop_size(w: u16, h: u16) -> Vec<u8> {
    let mut m = vec![251, 0];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    m.extend_from_slice(&[1, 0]);
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m
}

fn qemu_key(down: bool, keysym: u32, keycode: u32) -> Vec<u8> {
    let mut m = vec![255, 0, 0, u8::from(down)];
    m.extend_from_slice(&keysym.to_be_bytes());
    m.extend_from_slice(&keycode.to_be_bytes());
    m
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).and_then(|_| z.finish()).expect("in memory")
}

fn write(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), data)
}

fn main() -> std::io::Result<()> {
    let root = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    let (server_dir, client_dir) = (root.join("rfb_server"), root.join("rfb_client"));
    let full = |w: u16, h: u16| request(false, 0, 0, w, h);
    let all_pseudo = [CURSOR, DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE, LAST_RECT, QEMU_EXTENDED_KEY_EVENT, LED_STATE];
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();

    // Every handshake variant with one update.
    for (vname, version) in [("33", V3), ("37", V7), ("38", V8)] {
        for options in [0u8, 1] {
            let msgs = [set_pixel_format(&PF32), set_encodings(&[RAW]), full(40, 30)];
            seeds.push((
                format!("handshake-{vname}-{}", ["none", "vncauth"][options as usize]),
                session(options, (39, 29), version, &msgs),
            ));
        }
    }
    // Every encoding in three pixel formats (updates, with the pseudo-encodings and a later incremental).
    let encodings = [("raw", RAW), ("hextile", HEXTILE), ("zlib", ZLIB), ("zrle", ZRLE), ("tight", TIGHT)];
    for (ename, enc) in encodings {
        for (pname, pf) in [("32", PF32), ("16", PF16), ("8", PF8)] {
            let mut list = vec![enc, COPY_RECT, COMPRESS_LEVEL_0 + 6];
            list.extend_from_slice(&all_pseudo);
            let msgs = [set_pixel_format(&pf), set_encodings(&list), full(100, 60), request(true, 0, 0, 100, 60)];
            seeds.push((format!("update-{ename}-{pname}"), session(4, (99, 59), V8, &msgs)));
        }
    }
    let jpeg =
        [set_pixel_format(&PF32), set_encodings(&[TIGHT, TIGHT_QUALITY_0 + 5, COMPRESS_LEVEL_0 + 9]), full(160, 100)];
    seeds.push(("update-tight-jpeg".into(), session(0, (159, 99), V8, &jpeg)));
    // Resizes and scrolls while updates continue (options bits 1 and 2).
    let mut busy = vec![set_encodings(&[ZRLE, COPY_RECT, EXTENDED_DESKTOP_SIZE]), full(64, 48)];
    busy.extend((0..16).map(|i| request(true, 0, 0, 64 + i, 48)));
    seeds.push(("resize-scroll".into(), session(6, (63, 47), V8, &busy)));
    // Every other client message.
    let messages = [
        set_encodings(&[RAW, FENCE, CONTINUOUS_UPDATES, QEMU_EXTENDED_KEY_EVENT, EXTENDED_DESKTOP_SIZE]),
        key(true, 0x61),
        key(false, 0x61),
        key(true, 0xffe1),
        pointer(1, 10, 10),
        pointer(0, 500, 500),
        cut_text(6, 5, b"hello"),
        extended_clipboard(6, 1 << 24 | 1, &[0, 0, 0x10, 0]),
        extended_clipboard(6, 1 << 28 | 1, &zlib(b"\0\0\0\x06hello\0")),
        extended_clipboard(6, 1 << 25 | 1, &[]),
        qemu_key(true, 0x61, 0x1e),
        qemu_key(false, 0x61, 0x1e),
        fence(1 << 31 | 3, b"abcd"),
        continuous(true, 32, 32),
        continuous(false, 32, 32),
        set_desktop_size(800, 600),
        full(32, 32),
    ];
    seeds.push(("messages".into(), session(1, (31, 31), V8, &messages)));
    // A guest that shares its clipboard (options bit 4): both kinds of cut text, every extended action,
    // and updates while the guest's text changes.
    let mut clipboard = vec![
        set_encodings(&[RAW, vmm_core::rfb::clipboard::EXTENDED_CLIPBOARD]),
        full(32, 24),
        cut_text(6, 5, b"caf\xe9!"),
        extended_clipboard(6, 1 << 24 | 1, &[0, 0, 0x10, 0]),
        extended_clipboard(6, 1 << 27 | 1, &[]),
        extended_clipboard(6, 1 << 28 | 1, &zlib(b"\0\0\0\x0ahi\r\nthere\0")),
        extended_clipboard(6, 1 << 25 | 1, &[]),
        extended_clipboard(6, 1 << 26, &[]),
    ];
    clipboard.extend((0..12).map(|i| request(true, 0, 0, 32, 24 - i)));
    seeds.push(("clipboard-agent".into(), session(16, (31, 23), V8, &clipboard)));
    for (i, m) in messages.iter().enumerate() {
        seeds.push((format!("message-{i:02}"), session(0, (15, 15), V8, std::slice::from_ref(m))));
    }

    for (name, data) in &seeds {
        write(&server_dir, name, data)?;
    }

    // The client's seeds: what the server answers to sessions in the client's pixel format (the client
    // answers VncAuth with "fuzz" when the first byte's bit 0 is set), then messages the server never
    // sends.
    for (name, data) in
        seeds.iter().filter(|(n, _)| !n.ends_with("-16") && !n.ends_with("-8") && !n.starts_with("message-"))
    {
        let mut seed = vec![data[0] & 1];
        seed.extend_from_slice(&fuzz::server_transcript(data));
        // The server offers 3.8 and speaks the version the client chose: offer that one.
        seed[1..13].copy_from_slice(&data[3..15]);
        write(&client_dir, name, &seed)?;
    }
    let mut tail = Vec::new();
    tail.extend_from_slice(&[1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 2, 0, 3]); // SetColourMapEntries
    tail.push(2); // Bell
    tail.extend_from_slice(&cut_text(3, 5, b"hello"));
    tail.extend_from_slice(&extended_clipboard(3, 1 << 24 | 1, &[0, 0, 0x10, 0]));
    tail.extend_from_slice(&extended_clipboard(3, 1 << 25 | 1, &[]));
    tail.extend_from_slice(&extended_clipboard(3, 1 << 27 | 1, &[]));
    tail.extend_from_slice(&extended_clipboard(3, 1 << 28 | 1, &zlib(b"\0\0\0\x08hi\r\nyo\0")));
    tail.extend_from_slice(&fence(1 << 31 | 3, b"xy"));
    tail.push(150); // EndOfContinuousUpdates
    let hello = session(0, (31, 23), V8, &[set_encodings(&[RAW]), full(32, 24)]);
    let mut seed = vec![0];
    seed.extend_from_slice(&fuzz::server_transcript(&hello));
    seed.extend_from_slice(&tail);
    write(&client_dir, "messages", &seed)
}
