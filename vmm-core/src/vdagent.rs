//! The host's end of the SPICE guest agent protocol (spice-protocol's `vd_agent.h`), spoken with the
//! `spice-vdagent` that desktop distributions install, over the virtio-serial port
//! [`PORT_NAME`] ([`crate::virtio::console`]). It carries the clipboard both ways as UTF-8 text and asks the
//! guest's desktop for a monitor size:
//!
//! - the stream is chunks (`port`, `size`, then `size` bytes; port 1 is the client's) whose payloads form
//!   messages (`protocol` 1, `type`, `opaque`, `size`, then `size` bytes), a message spanning chunks when it
//!   is longer than [`MAX_CHUNK_DATA`];
//! - both ends announce their capabilities; the clipboard is "by demand": an owner *grabs* it with the
//!   types it has, the other end *requests* a type when someone pastes, the owner answers with the data;
//! - a monitors-config message asks the guest's session (xrandr) for a resolution.
//!
//! The guest is untrusted: a message longer than [`MAX_MESSAGE`] is skipped (counted), one with another
//! protocol number too, and everything waiting for the guest is bounded by [`MAX_OUTBOX`] (more is dropped,
//! counted). Text the console puts on the clipboard is offered to the agent whenever it (re)connects.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::snapshot::{Reader, StateError, Writer};

/// The virtio-serial port name `spice-vdagentd` opens (`/dev/virtio-ports/com.redhat.spice.0`).
pub const PORT_NAME: &str = "com.redhat.spice.0";
/// The port of chunks for the client (the other, 2, is a SPICE server's own).
const CLIENT_PORT: u32 = 1;
const CHUNK_HEADER: usize = 8;
const MESSAGE_HEADER: usize = 20;
/// Most payload bytes in one chunk (VD_AGENT_MAX_DATA_SIZE).
pub const MAX_CHUNK_DATA: usize = 2048;
const PROTOCOL: u32 = 1;

// Message types.
const MONITORS_CONFIG: u32 = 2;
const REPLY: u32 = 3;
const CLIPBOARD: u32 = 4;
const ANNOUNCE_CAPABILITIES: u32 = 6;
const CLIPBOARD_GRAB: u32 = 7;
const CLIPBOARD_REQUEST: u32 = 8;
const CLIPBOARD_RELEASE: u32 = 9;

// Capability bits.
const CAP_MONITORS_CONFIG: u32 = 1;
const CAP_REPLY: u32 = 2;
const CAP_CLIPBOARD_BY_DEMAND: u32 = 5;
const CAP_GUEST_LINEEND_CRLF: u32 = 9;
/// The capability words kept from an announcement.
const MAX_CAP_WORDS: usize = 8;

/// The clipboard type of UTF-8 text.
const UTF8_TEXT: u32 = 1;
/// Most bytes of clipboard text taken or offered (the RFB server's limit too).
pub const MAX_TEXT: usize = 1 << 20;
/// Longest message taken from the guest: clipboard text and its type.
pub const MAX_MESSAGE: usize = MAX_TEXT + 64;
/// Most bytes waiting for the guest.
pub const MAX_OUTBOX: usize = 4 << 20;

/// Counters of the agent channel.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Messages the guest's agent sent (whole ones).
    pub messages_in: AtomicU64,
    /// Messages sent to the agent.
    pub messages_out: AtomicU64,
    /// Messages not sent because the guest left too much unread, or skipped because too long.
    pub dropped: AtomicU64,
    /// Messages of an unknown protocol, or too short for their type.
    pub malformed: AtomicU64,
}

/// Splits the guest's byte stream into the client port's messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct StreamReader {
    /// A chunk header being collected.
    chunk_header: Vec<u8>,
    /// Payload bytes left in the current chunk, and whether they are the client port's.
    chunk_left: usize,
    chunk_ours: bool,
    /// A message header being collected.
    message_header: Vec<u8>,
    /// The current message: its type, its body so far and the bytes still to come (skipped when `skip`).
    kind: u32,
    body: Vec<u8>,
    body_left: usize,
    skip: bool,
}

/// What the reader found in the stream.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Message(u32, Vec<u8>),
    TooLong,
    BadProtocol,
}

impl StreamReader {
    fn feed(&mut self, mut bytes: &[u8], found: &mut Vec<Found>) {
        while !bytes.is_empty() {
            if self.chunk_left == 0 {
                let take = (CHUNK_HEADER - self.chunk_header.len()).min(bytes.len());
                self.chunk_header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.chunk_header.len() == CHUNK_HEADER {
                    let h = std::mem::take(&mut self.chunk_header);
                    self.chunk_ours = u32_at(&h, 0) == CLIENT_PORT;
                    self.chunk_left = u32_at(&h, 4) as usize;
                }
                continue;
            }
            let take = self.chunk_left.min(bytes.len());
            let (payload, rest) = bytes.split_at(take);
            self.chunk_left -= take;
            bytes = rest;
            if self.chunk_ours {
                self.message_bytes(payload, found);
            }
        }
    }

    fn message_bytes(&mut self, mut bytes: &[u8], found: &mut Vec<Found>) {
        while !bytes.is_empty() {
            if self.message_header.len() < MESSAGE_HEADER {
                let take = (MESSAGE_HEADER - self.message_header.len()).min(bytes.len());
                self.message_header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.message_header.len() == MESSAGE_HEADER {
                    let h = &self.message_header;
                    let (protocol, size) = (u32_at(h, 0), u32_at(h, 16) as usize);
                    self.kind = u32_at(h, 4);
                    self.body_left = size;
                    self.skip = protocol != PROTOCOL || size > MAX_MESSAGE;
                    if self.skip {
                        found.push(if protocol != PROTOCOL { Found::BadProtocol } else { Found::TooLong });
                    } else {
                        self.body = Vec::with_capacity(size.min(64 * 1024));
                    }
                    self.finish_if_whole(found);
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            if !self.skip {
                self.body.extend_from_slice(&bytes[..take]);
            }
            self.body_left -= take;
            bytes = &bytes[take..];
            self.finish_if_whole(found);
        }
    }

    fn finish_if_whole(&mut self, found: &mut Vec<Found>) {
        if self.message_header.len() == MESSAGE_HEADER && self.body_left == 0 {
            self.message_header.clear();
            let body = std::mem::take(&mut self.body);
            if !std::mem::take(&mut self.skip) {
                found.push(Found::Message(self.kind, body));
            }
        }
    }

    fn save(&self, w: &mut Writer) {
        w.bytes(&self.chunk_header);
        w.u64(self.chunk_left as u64);
        w.bool(self.chunk_ours);
        w.bytes(&self.message_header);
        w.u32(self.kind);
        w.bytes(&self.body);
        w.u64(self.body_left as u64);
        w.bool(self.skip);
    }

    fn restore(r: &mut Reader) -> Result<Self, StateError> {
        let reader = StreamReader {
            chunk_header: r.bytes(CHUNK_HEADER - 1)?.to_vec(),
            chunk_left: r.u64()? as usize,
            chunk_ours: r.bool()?,
            message_header: r.bytes(MESSAGE_HEADER)?.to_vec(),
            kind: r.u32()?,
            body: r.bytes(MAX_MESSAGE)?.to_vec(),
            body_left: r.u64()? as usize,
            skip: r.bool()?,
        };
        if reader.chunk_left > u32::MAX as usize || reader.body.len() + reader.body_left > u32::MAX as usize {
            return Err(StateError::Damaged("an agent message longer than its protocol allows".into()));
        }
        Ok(reader)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

fn words(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

/// The agent channel's state (one lock).
#[derive(Debug, Default)]
struct State {
    /// The guest holds the port open (its agent runs).
    guest_open: bool,
    /// The agent's capabilities, once it announced them.
    guest_caps: Option<Vec<u32>>,
    /// Text the console put on the clipboard, offered to the guest.
    host_text: Option<String>,
    /// The monitor size last asked for.
    monitor: Option<(u32, u32)>,
    reader: StreamReader,
    outbox: VecDeque<u8>,
}

impl State {
    fn guest_has(&self, cap: u32) -> bool {
        self.guest_caps
            .as_ref()
            .is_some_and(|caps| caps.get(cap as usize / 32).is_some_and(|w| w & (1 << (cap % 32)) != 0))
    }
}

/// The host's end of the agent channel: what the virtio-serial port exchanges with the guest, what the
/// console sets and gets. One per VM.
pub struct Agent {
    state: Mutex<State>,
    /// Readable while bytes wait for the guest (the port's thread watches it).
    wake: EventFd,
    /// Takes the text the guest's clipboard got.
    guest_clipboard: Box<dyn Fn(String) + Send + Sync>,
    pub stats: AgentStats,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("state", &self.state).finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent channel that hands the guest's clipboard text to `guest_clipboard`.
    pub fn new(guest_clipboard: Box<dyn Fn(String) + Send + Sync>) -> std::io::Result<Self> {
        Ok(Agent {
            state: Mutex::new(State::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            guest_clipboard,
            stats: AgentStats::default(),
        })
    }

    /// Whether the guest's agent runs and announced itself.
    pub fn connected(&self) -> bool {
        lock(&self.state).guest_caps.is_some()
    }

    /// The console's clipboard text, for the guest: the agent is told the clipboard is the host's (a
    /// grab), and gets the text when a guest program pastes. Longer text is cut at [`MAX_TEXT`] bytes.
    pub fn set_clipboard(&self, mut text: String) {
        if text.len() > MAX_TEXT {
            let mut end = MAX_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let mut state = lock(&self.state);
        state.host_text = Some(text);
        if state.guest_caps.is_some() {
            self.send(&mut state, CLIPBOARD_GRAB, &UTF8_TEXT.to_le_bytes());
        }
    }

    /// Asks the guest's desktop for one monitor of `width` x `height` (a monitors-config message); also
    /// sent when an agent connects later. Returns whether an agent that takes it is connected now.
    pub fn request_monitor(&self, width: u32, height: u32) -> bool {
        let mut state = lock(&self.state);
        state.monitor = Some((width, height));
        self.send_monitor(&mut state)
    }

    fn send_monitor(&self, state: &mut State) -> bool {
        let Some((width, height)) = state.monitor else { return false };
        if !state.guest_has(CAP_MONITORS_CONFIG) {
            return false;
        }
        // One monitor: count, flags, then height, width, depth, x, y.
        let mut m = Vec::with_capacity(28);
        for v in [1, 0, height, width, 32, 0, 0] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        self.send(state, MONITORS_CONFIG, &m)
    }

    /// Queues a message for the guest in chunks; false when it was dropped (no agent, or the guest left
    /// [`MAX_OUTBOX`] bytes unread).
    fn send(&self, state: &mut State, kind: u32, data: &[u8]) -> bool {
        if !state.guest_open {
            return false;
        }
        let mut message = Vec::with_capacity(MESSAGE_HEADER + data.len());
        for v in [PROTOCOL, kind] {
            message.extend_from_slice(&v.to_le_bytes());
        }
        message.extend_from_slice(&0u64.to_le_bytes());
        message.extend_from_slice(&(data.len() as u32).to_le_bytes());
        message.extend_from_slice(data);
        let chunks = message.len().div_ceil(MAX_CHUNK_DATA);
        if state.outbox.len() + message.len() + chunks * CHUNK_HEADER > MAX_OUTBOX {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        for chunk in message.chunks(MAX_CHUNK_DATA) {
            state.outbox.extend(CLIENT_PORT.to_le_bytes());
            state.outbox.extend((chunk.len() as u32).to_le_bytes());
            state.outbox.extend(chunk);
        }
        self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        let _ = self.wake.write(1);
        true
    }

    fn announce(&self, state: &mut State, request: bool) {
        let caps = (1u32 << CAP_MONITORS_CONFIG) | (1 << CAP_REPLY) | (1 << CAP_CLIPBOARD_BY_DEMAND);
        let mut m = Vec::with_capacity(8);
        m.extend_from_slice(&u32::from(request).to_le_bytes());
        m.extend_from_slice(&caps.to_le_bytes());
        self.send(state, ANNOUNCE_CAPABILITIES, &m);
    }

    /// The guest opened (its agent started) or closed the port.
    pub fn guest_open(&self, open: bool) {
        let mut state = lock(&self.state);
        state.guest_open = open;
        state.guest_caps = None;
        state.reader = StreamReader::default();
        state.outbox.clear();
        if open {
            // Ours, and a request for the agent's.
            self.announce(&mut state, true);
        }
    }

    /// Bytes the guest's agent wrote.
    pub fn received(&self, bytes: &[u8]) {
        let mut found = Vec::new();
        let mut state = lock(&self.state);
        state.reader.feed(bytes, &mut found);
        for f in found {
            match f {
                Found::Message(kind, body) => {
                    self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                    self.message(&mut state, kind, &body);
                }
                Found::TooLong => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    log::debug!("agent: a message longer than {MAX_MESSAGE} bytes skipped");
                }
                Found::BadProtocol => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    log::debug!("agent: a message of an unknown protocol skipped");
                }
            }
        }
    }

    fn message(&self, state: &mut State, kind: u32, body: &[u8]) {
        let short = |need: usize| {
            let short = body.len() < need;
            if short {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                log::debug!("agent: message {kind} of {} bytes is too short", body.len());
            }
            short
        };
        match kind {
            ANNOUNCE_CAPABILITIES => {
                if short(8) {
                    return;
                }
                let request = u32_at(body, 0) != 0;
                let first = state.guest_caps.is_none();
                state.guest_caps = Some(words(&body[4..]).take(MAX_CAP_WORDS).collect());
                if request {
                    self.announce(state, false);
                }
                if first {
                    log::info!("agent: the guest's agent is connected");
                    if state.host_text.is_some() {
                        self.send(state, CLIPBOARD_GRAB, &UTF8_TEXT.to_le_bytes());
                    }
                    self.send_monitor(state);
                }
            }
            CLIPBOARD_GRAB => {
                // The guest copied: its text is newer than ours; ask for it if it is text.
                state.host_text = None;
                if words(body).any(|t| t == UTF8_TEXT) {
                    self.send(state, CLIPBOARD_REQUEST, &UTF8_TEXT.to_le_bytes());
                }
            }
            CLIPBOARD => {
                if short(4) || u32_at(body, 0) != UTF8_TEXT {
                    return;
                }
                let data = &body[4..];
                let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                let text = String::from_utf8_lossy(&data[..end]).replace("\r\n", "\n");
                (self.guest_clipboard)(text);
            }
            CLIPBOARD_REQUEST => {
                if short(4) {
                    return;
                }
                let kind = u32_at(body, 0);
                let mut m = kind.to_le_bytes().to_vec();
                if kind == UTF8_TEXT
                    && let Some(text) = &state.host_text
                {
                    if state.guest_has(CAP_GUEST_LINEEND_CRLF) {
                        m.extend_from_slice(text.replace("\r\n", "\n").replace('\n', "\r\n").as_bytes());
                    } else {
                        m.extend_from_slice(text.as_bytes());
                    }
                }
                // Nothing of that type: empty data, so the pasting program does not wait.
                self.send(state, CLIPBOARD, &m);
            }
            CLIPBOARD_RELEASE | REPLY => {}
            other => log::debug!("agent: message type {other} ignored"),
        }
    }

    /// Whether bytes wait for the guest.
    pub fn has_output(&self) -> bool {
        !lock(&self.state).outbox.is_empty()
    }

    /// Takes up to `max` of the bytes waiting for the guest.
    pub fn take_output(&self, max: usize) -> Vec<u8> {
        let mut state = lock(&self.state);
        let n = max.min(state.outbox.len());
        let out: Vec<u8> = state.outbox.drain(..n).collect();
        if state.outbox.is_empty() {
            let _ = self.wake.read();
        }
        out
    }

    /// Readable while bytes wait for the guest.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The channel's state for a machine-state file.
    pub fn save(&self, w: &mut Writer) {
        let state = lock(&self.state);
        w.bool(state.guest_open);
        w.bool(state.guest_caps.is_some());
        let caps = state.guest_caps.clone().unwrap_or_default();
        w.u32(caps.len() as u32);
        for c in caps {
            w.u32(c);
        }
        w.bool(state.host_text.is_some());
        w.bytes(state.host_text.as_deref().unwrap_or("").as_bytes());
        let (width, height) = state.monitor.unwrap_or((0, 0));
        w.u32(width);
        w.u32(height);
        state.reader.save(w);
        w.bytes(&state.outbox.iter().copied().collect::<Vec<_>>());
    }

    /// Loads what [`save`](Self::save) wrote.
    pub fn restore(&self, r: &mut Reader) -> Result<(), StateError> {
        let guest_open = r.bool()?;
        let has_caps = r.bool()?;
        let count = r.u32()? as usize;
        if count > MAX_CAP_WORDS {
            return Err(StateError::Damaged(format!("an agent with {count} capability words")));
        }
        let mut caps = Vec::with_capacity(count);
        for _ in 0..count {
            caps.push(r.u32()?);
        }
        let has_text = r.bool()?;
        let text = std::str::from_utf8(r.bytes(MAX_TEXT)?)
            .map_err(|_| StateError::Damaged("agent clipboard text that is not UTF-8".into()))?;
        let (width, height) = (r.u32()?, r.u32()?);
        let reader = StreamReader::restore(r)?;
        let outbox = r.bytes(MAX_OUTBOX)?;
        let mut state = lock(&self.state);
        *state = State {
            guest_open,
            guest_caps: has_caps.then_some(caps),
            host_text: has_text.then(|| text.to_string()),
            monitor: (width > 0 && height > 0).then_some((width, height)),
            reader,
            outbox: outbox.iter().copied().collect(),
        };
        if !state.outbox.is_empty() {
            let _ = self.wake.write(1);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// The guest's agent side of the protocol, for tests: builds messages and chunks, parses what the host
    /// sends.
    pub(crate) fn message(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [PROTOCOL, kind] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(&0u64.to_le_bytes());
        m.extend_from_slice(&(data.len() as u32).to_le_bytes());
        m.extend_from_slice(data);
        let mut out = Vec::new();
        for chunk in m.chunks(MAX_CHUNK_DATA) {
            out.extend_from_slice(&CLIENT_PORT.to_le_bytes());
            out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// What spice-vdagent announces (clipboard by demand, monitors config, LF line ends), asking for ours.
    pub(crate) fn agent_announce() -> Vec<u8> {
        let caps = (1u32 << CAP_MONITORS_CONFIG) | (1 << CAP_CLIPBOARD_BY_DEMAND) | (1 << 8);
        message(ANNOUNCE_CAPABILITIES, &[1u32.to_le_bytes(), caps.to_le_bytes()].concat())
    }

    pub(crate) fn grab_text() -> Vec<u8> {
        message(CLIPBOARD_GRAB, &UTF8_TEXT.to_le_bytes())
    }

    pub(crate) fn request_text() -> Vec<u8> {
        message(CLIPBOARD_REQUEST, &UTF8_TEXT.to_le_bytes())
    }

    pub(crate) fn clipboard_text(text: &str) -> Vec<u8> {
        message(CLIPBOARD, &[&UTF8_TEXT.to_le_bytes()[..], text.as_bytes()].concat())
    }

    /// The messages (type, data) in bytes the host sent.
    pub(crate) fn parse(bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut reader = StreamReader::default();
        let mut found = Vec::new();
        reader.feed(bytes, &mut found);
        found
            .into_iter()
            .map(|f| match f {
                Found::Message(kind, data) => (kind, data),
                other => panic!("the host sent {other:?}"),
            })
            .collect()
    }

    pub(crate) const TYPE_CLIPBOARD: u32 = CLIPBOARD;
    pub(crate) const TYPE_GRAB: u32 = CLIPBOARD_GRAB;
    pub(crate) const TYPE_REQUEST: u32 = CLIPBOARD_REQUEST;
    pub(crate) const TYPE_MONITORS: u32 = MONITORS_CONFIG;
    pub(crate) const TYPE_CAPS: u32 = ANNOUNCE_CAPABILITIES;

    fn agent() -> (Agent, Arc<Mutex<Vec<String>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        (Agent::new(Box::new(move |t| lock(&sink).push(t))).unwrap(), got)
    }

    fn drain(agent: &Agent) -> Vec<(u32, Vec<u8>)> {
        parse(&agent.take_output(usize::MAX))
    }

    #[test]
    fn the_handshake_and_the_clipboard_both_ways() {
        let (agent, got) = agent();
        agent.set_clipboard("before the agent".into());
        assert!(!agent.has_output(), "nothing is sent while the port is closed");
        agent.guest_open(true);
        let first = drain(&agent);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, TYPE_CAPS);
        assert_eq!(u32_at(&first[0].1, 0), 1, "the host asks for the agent's capabilities");
        assert_ne!(u32_at(&first[0].1, 4) & (1 << CAP_CLIPBOARD_BY_DEMAND), 0);

        agent.received(&agent_announce());
        assert!(agent.connected());
        let answer = drain(&agent);
        let kinds: Vec<u32> = answer.iter().map(|m| m.0).collect();
        assert_eq!(kinds, [TYPE_CAPS, TYPE_GRAB], "our capabilities, then the text waiting is offered");
        assert_eq!(u32_at(&answer[0].1, 0), 0, "an answer, not a request");

        // A guest program pastes: the host's text, as it was set.
        agent.received(&request_text());
        let data = drain(&agent);
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].0, TYPE_CLIPBOARD);
        assert_eq!(&data[0].1[4..], b"before the agent");

        // The guest copies: the host asks for the text and hands it on, line ends as LF.
        agent.received(&grab_text());
        assert_eq!(drain(&agent), [(TYPE_REQUEST, UTF8_TEXT.to_le_bytes().to_vec())]);
        agent.received(&clipboard_text("ünïcode\r\nline two\0"));
        assert_eq!(*lock(&got), ["ünïcode\nline two"]);
        // The guest's text is newer: a request now gets nothing of the host's old text.
        agent.received(&request_text());
        assert_eq!(drain(&agent), [(TYPE_CLIPBOARD, UTF8_TEXT.to_le_bytes().to_vec())]);
        assert_eq!(agent.stats.malformed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn monitor_requests_wait_for_an_agent_that_takes_them() {
        let (agent, _) = agent();
        assert!(!agent.request_monitor(1280, 800));
        agent.guest_open(true);
        drain(&agent);
        agent.received(&agent_announce());
        let sent = drain(&agent);
        let monitors: Vec<_> = sent.iter().filter(|m| m.0 == TYPE_MONITORS).collect();
        assert_eq!(monitors.len(), 1, "the size asked before is sent when the agent connects");
        let m = &monitors[0].1;
        assert_eq!((u32_at(m, 0), u32_at(m, 8), u32_at(m, 12), u32_at(m, 16)), (1, 800, 1280, 32));
        assert!(agent.request_monitor(1920, 1080));
        let m = &drain(&agent)[0].1;
        assert_eq!((u32_at(m, 8), u32_at(m, 12)), (1080, 1920));
        // The agent goes away: nothing more is sent.
        agent.guest_open(false);
        assert!(!agent.request_monitor(800, 600));
        assert!(!agent.has_output());
    }

    #[test]
    fn messages_span_chunks_and_split_reads() {
        let (agent, got) = agent();
        agent.guest_open(true);
        agent.received(&agent_announce());
        let long: String = "0123456789abcdef".repeat(700); // 11,200 bytes: six chunks
        let bytes = clipboard_text(&long);
        for piece in bytes.chunks(333) {
            agent.received(piece);
        }
        assert_eq!(*lock(&got), [long]);
        // A chunk for the other port is skipped whole.
        let mut other = 2u32.to_le_bytes().to_vec();
        other.extend_from_slice(&5u32.to_le_bytes());
        other.extend_from_slice(b"xxxxx");
        agent.received(&other);
        agent.received(&clipboard_text("after"));
        assert_eq!(lock(&got).last().unwrap(), "after");
    }

    #[test]
    fn hostile_streams_cost_bounded_memory_and_keep_the_channel() {
        let (agent, got) = agent();
        agent.guest_open(true);
        agent.received(&agent_announce());
        // A message announcing 4 GiB: skipped as it streams in, never buffered.
        let mut huge = Vec::new();
        for v in [PROTOCOL, CLIPBOARD] {
            huge.extend_from_slice(&v.to_le_bytes());
        }
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut chunk = CLIENT_PORT.to_le_bytes().to_vec();
        chunk.extend_from_slice(&((huge.len() + 100_000) as u32).to_le_bytes());
        chunk.extend_from_slice(&huge);
        chunk.extend(std::iter::repeat_n(0x41u8, 100_000));
        agent.received(&chunk);
        assert_eq!(agent.stats.dropped.load(Ordering::Relaxed), 1);
        assert!(lock(&agent.state).reader.body.capacity() <= 64 * 1024);
        // The rest of it is skipped as it streams in, however long (an honest agent's long message
        // spans chunks, so the stream cannot resynchronise earlier); the agent reconnecting starts afresh.
        agent.received(&clipboard_text("swallowed by the long message"));
        assert!(lock(&got).is_empty());
        agent.guest_open(false);
        agent.guest_open(true);
        agent.received(&agent_announce());
        // Another protocol number, and messages too short for their type: counted, skipped.
        let mut bad = message(CLIPBOARD, b"abcd");
        bad[8] = 7;
        agent.received(&bad);
        agent.received(&message(CLIPBOARD_REQUEST, b"ab"));
        agent.received(&message(ANNOUNCE_CAPABILITIES, b""));
        assert_eq!(agent.stats.malformed.load(Ordering::Relaxed), 3);
        assert!(lock(&got).is_empty());

        // A guest that never reads: the outbox stops at its bound.
        agent.take_output(usize::MAX);
        agent.set_clipboard("x".repeat(MAX_TEXT + 10));
        assert_eq!(lock(&agent.state).host_text.as_ref().unwrap().len(), MAX_TEXT);
        for _ in 0..10 {
            agent.received(&request_text());
        }
        assert!(lock(&agent.state).outbox.len() <= MAX_OUTBOX);
        assert!(agent.stats.dropped.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn the_state_survives_a_save_and_restore_mid_message() {
        let (agent, got) = agent();
        agent.guest_open(true);
        agent.received(&agent_announce());
        agent.set_clipboard("host text".into());
        let bytes = clipboard_text("from the guest");
        agent.received(&bytes[..15]);
        let mut w = Writer::new();
        agent.save(&mut w);
        let saved = w.buf;

        let (restored, got2) = self::agent();
        restored.restore(&mut Reader::new("agent", &saved)).unwrap();
        restored.received(&bytes[15..]);
        assert_eq!(*lock(&got2), ["from the guest"]);
        assert!(lock(&got).is_empty());
        assert!(restored.connected());
        assert_eq!(restored.take_output(usize::MAX), agent.take_output(usize::MAX));
        // Damaged: cut short anywhere.
        for cut in [0, 3, saved.len() / 2, saved.len() - 1] {
            let (fresh, _) = self::agent();
            let result = fresh.restore(&mut Reader::new("agent", &saved[..cut]));
            assert!(result.is_err() || cut == saved.len(), "cut at {cut}");
        }
    }
}
