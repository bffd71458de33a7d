//! virtio-sound (virtio 1.2 §5.14): a sound card with one output stream (id 0), whose sound goes to the
//! console's listeners through [`Screen::audio_push`], and one input stream (id 1), which records
//! silence (there is no capture source yet). No jacks, one stereo channel map per stream.
//!
//! The driver configures a stream on the control queue (SET_PARAMS, PREPARE, START, STOP, RELEASE) and
//! moves PCM frames in buffers on the tx and rx queues: each chain is a `virtio_snd_pcm_xfer` header
//! (the stream id), the frames (device-readable on tx, device-writable on rx) and a device-writable
//! `virtio_snd_pcm_status`. The device plays them as a real card would: a buffer is completed once its
//! frames have had time to play at the stream's rate, by a clock started at START, so the guest's
//! playback position advances at the real rate and a guest that submits faster is held back by the ring
//! (at most its buffers are in flight). The frames themselves reach the listeners in [`PUSH_MS`] pieces,
//! each as its first frame's time comes (so a long buffer is not pushed at once, and a piece waits for
//! nothing: the console's listeners buffer against jitter themselves).
//!
//! Chains the driver had no right to make (no header, no room for the status, readable after writable
//! parts, outside guest memory, more buffers in flight than the ring holds) set NEEDS_RESET of this
//! device only; a well-formed chain for a wrong stream is answered BAD_MSG. Nothing is allocated by a
//! guest-given length beyond [`MAX_BUFFER_BYTES`].

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt, avail_within_queue};
use crate::audio::AudioFormat;
use crate::devices::bus::lock;
use crate::display::Screen;

/// virtio-sound's device ID.
pub const DEVICE_TYPE: u16 = 25;
pub const QUEUE_SIZE: u16 = 64;
const QUEUES: usize = 4;
/// Queue 0 carries control requests; queue 1, the event queue, is never served: there is nothing to
/// announce (no jacks), so the driver's buffers stay there.
const CONTROLQ: usize = 0;
const TXQ: usize = 2;
const RXQ: usize = 3;

const JACKS: u32 = 0;
const STREAMS: usize = 2;
const CHMAPS: u32 = 2;
/// The output stream, played on the tx queue, and the input stream, recorded on the rx queue.
pub const OUTPUT: usize = 0;
pub const INPUT: usize = 1;

// Control request codes (§5.14.6).
const R_JACK_INFO: u32 = 1;
const R_PCM_INFO: u32 = 0x0100;
const R_PCM_SET_PARAMS: u32 = 0x0101;
const R_PCM_PREPARE: u32 = 0x0102;
const R_PCM_RELEASE: u32 = 0x0103;
const R_PCM_START: u32 = 0x0104;
const R_PCM_STOP: u32 = 0x0105;
const R_CHMAP_INFO: u32 = 0x0200;
// Status codes.
const S_OK: u32 = 0x8000;
const S_BAD_MSG: u32 = 0x8001;
const S_NOT_SUPP: u32 = 0x8002;
const S_IO_ERR: u32 = 0x8003;
// Directions.
const D_OUTPUT: u8 = 0;
const D_INPUT: u8 = 1;

// Sample formats offered (VIRTIO_SND_PCM_FMT_*).
const FMT_U8: u8 = 4;
const FMT_S16: u8 = 5;
const FMT_S32: u8 = 17;
const FMT_FLOAT: u8 = 19;
const FORMATS: [u8; 4] = [FMT_U8, FMT_S16, FMT_S32, FMT_FLOAT];
/// Frame rates offered: (VIRTIO_SND_PCM_RATE_* index, frames per second).
const RATES: [(u8, u32); 7] = [(1, 8000), (2, 11_025), (3, 16_000), (4, 22_050), (5, 32_000), (6, 44_100), (7, 48_000)];
const CHANNELS_MIN: u8 = 1;
const CHANNELS_MAX: u8 = 2;
// Channel positions (VIRTIO_SND_CHMAP_*).
const CHMAP_FL: u8 = 3;
const CHMAP_FR: u8 = 4;

/// Sizes of the information structures (`virtio_snd_pcm_info`, `virtio_snd_chmap_info`,
/// `virtio_snd_jack_info`) and the largest `size` a query may ask for (newer drivers may ask for more
/// than the structure: the rest is zeros).
const PCM_INFO_SIZE: usize = 32;
const CHMAP_INFO_SIZE: usize = 24;
const JACK_INFO_SIZE: usize = 24;
const MAX_INFO_SIZE: u32 = 4096;
/// Bytes of a control request read (the longest this device knows, SET_PARAMS, has 24).
const MAX_REQUEST: usize = 64;
const SET_PARAMS_SIZE: usize = 24;
/// The largest hardware buffer a stream may have, and the most PCM bytes of one transfer.
pub const MAX_BUFFER_BYTES: u32 = 4 << 20;
/// The most descriptors of one chain (Linux uses one per page of a period, plus two).
const MAX_SEGMENTS: usize = 4096;
/// The length of a transfer header and of its status.
const XFER_HEADER: u64 = 4;
const XFER_STATUS: u64 = 8;
/// Sound reaches the listeners in pieces of this many milliseconds while a long buffer plays.
pub const PUSH_MS: u64 = 20;

/// The frames of a transfer (`frames` long, ending at clock frame `end`) handed to the listeners by clock
/// position `position`: every piece whose first frame's time has come, whole.
fn pushed_by(frames: u64, end: u64, position: u64, hz: u32) -> u64 {
    let start = end.saturating_sub(frames);
    if position < start {
        return 0;
    }
    let piece = (u64::from(hz) * PUSH_MS / 1000).max(1);
    ((position - start) / piece + 1).saturating_mul(piece).min(frames)
}

/// Counters of the device.
#[derive(Debug, Default)]
pub struct SoundStats {
    /// Control requests from the driver.
    pub control_requests: AtomicU64,
    /// Frames of the output stream played (handed to the listeners), and of silence recorded.
    pub played_frames: AtomicU64,
    pub recorded_frames: AtomicU64,
    /// Transfers completed without playing or recording (IO_ERR, BAD_MSG).
    pub refused_transfers: AtomicU64,
    /// Malformed chains (each breaks the device until the driver resets it).
    pub malformed: AtomicU64,
}

/// Why a chain was refused.
#[derive(Debug)]
enum Malformed {
    /// The avail index ran more than a queue's worth ahead.
    AvailJump,
    /// More buffers in flight than the ring has entries (the driver published a buffer twice).
    TooManyBuffers,
    /// More than [`MAX_SEGMENTS`] descriptors.
    TooManySegments,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// A transfer without its header, or a control request without room for the status.
    NoHeader,
    NoStatus,
    /// A descriptor outside guest memory, or the used ring.
    OutsideMemory,
}

/// Guest memory ranges (address, length) that make one buffer.
type Segments = Vec<(u64, u32)>;

/// A chain's device-readable and device-writable parts.
struct Chain {
    head: u16,
    readable: Segments,
    readable_len: u64,
    writable: Segments,
    writable_len: u64,
}

fn parse_chain<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<Chain, Malformed> {
    let mut c = Chain {
        head: chain.head_index(),
        readable: Vec::new(),
        readable_len: 0,
        writable: Vec::new(),
        writable_len: 0,
    };
    for d in chain {
        if d.len() == 0 {
            continue;
        }
        if c.readable.len() + c.writable.len() >= MAX_SEGMENTS {
            return Err(Malformed::TooManySegments);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(Malformed::OutsideMemory);
        }
        if d.is_write_only() {
            c.writable.push((d.addr().0, d.len()));
            c.writable_len += u64::from(d.len());
        } else if c.writable.is_empty() {
            c.readable.push((d.addr().0, d.len()));
            c.readable_len += u64::from(d.len());
        } else {
            return Err(Malformed::ReadableAfterWritable);
        }
    }
    Ok(c)
}

/// The ranges of `len` bytes from `offset` of the buffer `segs` make (fewer where it ends first).
fn slice_segments(segs: &[(u64, u32)], mut offset: u64, mut len: u64) -> Segments {
    let mut out = Vec::new();
    for &(addr, seg) in segs {
        if len == 0 {
            break;
        }
        let seg = u64::from(seg);
        if offset >= seg {
            offset -= seg;
            continue;
        }
        let n = (seg - offset).min(len);
        out.push((addr + offset, n as u32));
        len -= n;
        offset = 0;
    }
    out
}

/// Calls `f(address, range within the caller's buffer)` for the guest ranges of `len` bytes from
/// `offset` of the buffer `segs` make; returns how many bytes they held.
fn for_segments(
    segs: &[(u64, u32)],
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), Malformed>,
) -> Result<usize, Malformed> {
    let mut done = 0;
    for (addr, n) in slice_segments(segs, offset, len as u64) {
        f(GuestAddress(addr), done..done + n as usize)?;
        done += n as usize;
    }
    Ok(done)
}

fn read_segments(mem: &GuestMemoryMmap, segs: &[(u64, u32)], offset: u64, out: &mut [u8]) -> Result<usize, Malformed> {
    let len = out.len();
    for_segments(segs, offset, len, |a, r| mem.read_slice(&mut out[r], a).map_err(|_| Malformed::OutsideMemory))
}

fn write_segments(mem: &GuestMemoryMmap, segs: &[(u64, u32)], data: &[u8]) -> Result<usize, Malformed> {
    for_segments(segs, 0, data.len(), |a, r| mem.write_slice(&data[r], a).map_err(|_| Malformed::OutsideMemory))
}

/// Fills the buffer `segs` make with `byte`.
fn fill_segments(mem: &GuestMemoryMmap, segs: &[(u64, u32)], byte: u8) -> Result<(), Malformed> {
    let block = [byte; 4096];
    for &(addr, len) in segs {
        let mut at = 0u64;
        while at < u64::from(len) {
            let n = (u64::from(len) - at).min(block.len() as u64) as usize;
            mem.write_slice(&block[..n], GuestAddress(addr + at)).map_err(|_| Malformed::OutsideMemory)?;
            at += n as u64;
        }
    }
    Ok(())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The frames per second of a VIRTIO_SND_PCM_RATE_* index this device offers.
fn rate_hz(rate: u8) -> Option<u32> {
    RATES.iter().find(|r| r.0 == rate).map(|r| r.1)
}

fn sample_bytes(format: u8) -> u32 {
    match format {
        FMT_U8 => 1,
        FMT_S16 => 2,
        _ => 4,
    }
}

/// Appends `bytes` (whole samples of `format`) as signed 16-bit samples.
fn convert(format: u8, bytes: &[u8], out: &mut Vec<i16>) {
    match format {
        FMT_U8 => out.extend(bytes.iter().map(|&b| (i16::from(b) - 128) << 8)),
        FMT_S16 => out.extend(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]))),
        FMT_S32 => {
            out.extend(bytes.chunks_exact(4).map(|b| (i32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 16) as i16))
        }
        // NaN becomes 0 (`as` saturates and maps NaN to zero).
        _ => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]).clamp(-1.0, 1.0) * 32767.0) as i16),
        ),
    }
}

/// What a stream was set to by SET_PARAMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    buffer_bytes: u32,
    period_bytes: u32,
    channels: u8,
    format: u8,
    /// A VIRTIO_SND_PCM_RATE_* index (one of [`RATES`]).
    rate: u8,
}

impl Params {
    /// Checks a SET_PARAMS request's fields against what the streams offer: the status to answer.
    fn check(&self, features: u32) -> u32 {
        if features != 0
            || !(CHANNELS_MIN..=CHANNELS_MAX).contains(&self.channels)
            || !FORMATS.contains(&self.format)
            || rate_hz(self.rate).is_none()
        {
            return S_NOT_SUPP;
        }
        if self.buffer_bytes == 0
            || self.buffer_bytes > MAX_BUFFER_BYTES
            || self.period_bytes == 0
            || self.period_bytes > self.buffer_bytes
        {
            return S_BAD_MSG;
        }
        S_OK
    }

    fn hz(&self) -> u32 {
        rate_hz(self.rate).unwrap_or(48_000)
    }

    fn frame_bytes(&self) -> u32 {
        u32::from(self.channels) * sample_bytes(self.format)
    }
}

/// The stream's place in its command lifecycle (§5.14.6.6.1); RELEASE returns to `Set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PcmState {
    Idle = 0,
    Set = 1,
    Prepared = 2,
    Running = 3,
    Stopped = 4,
}

impl PcmState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => PcmState::Idle,
            1 => PcmState::Set,
            2 => PcmState::Prepared,
            3 => PcmState::Running,
            4 => PcmState::Stopped,
            _ => return None,
        })
    }

    /// Whether transfers are taken (held until START after PREPARE or STOP: pre-buffering).
    fn takes_transfers(self) -> bool {
        matches!(self, PcmState::Prepared | PcmState::Running | PcmState::Stopped)
    }
}

/// A running stream's clock: where its frames stand against the wall clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// When frame 0 played.
    base: Instant,
    /// Where the scheduled frames end, in frames since `base`.
    frames: u64,
}

impl Clock {
    /// The frames played by `now`.
    fn position(&self, now: Instant, hz: u32) -> u64 {
        let nanos = now.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX)
    }

    /// When frame `frame` has played.
    fn time_of(&self, frame: u64, hz: u32) -> Instant {
        let nanos = (u128::from(frame) * 1_000_000_000).div_ceil(u128::from(hz.max(1)));
        self.base + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX / 2))
    }
}

/// A transfer the device holds until its time comes.
#[derive(Debug, Clone)]
struct Pending {
    head: u16,
    /// The PCM bytes (tx: to play; rx: to fill) and the status.
    data: Segments,
    status: Segments,
    bytes: u32,
    frames: u64,
    /// Frames of it already handed to the listeners (output).
    played: u64,
    /// Where it ends on the stream's clock; None while the stream is not running.
    end: Option<u64>,
    /// The used length on completion with OK.
    used_len: u32,
}

#[derive(Debug)]
struct Stream {
    params: Option<Params>,
    state: PcmState,
    pending: VecDeque<Pending>,
    /// Some while running.
    clock: Option<Clock>,
}

impl Stream {
    fn new() -> Self {
        Stream { params: None, state: PcmState::Idle, pending: VecDeque::new(), clock: None }
    }

    /// Bytes held and not completed yet (what the status reports as latency).
    fn held_bytes(&self) -> u32 {
        self.pending.iter().fold(0u32, |sum, p| sum.saturating_add(p.bytes))
    }

    /// Starts the clock now and schedules the held transfers (what was left of them) from it.
    fn start_clock(&mut self, now: Instant) {
        let mut clock = Clock { base: now, frames: 0 };
        for p in &mut self.pending {
            clock.frames += p.frames - p.played;
            p.end = Some(clock.frames);
        }
        self.clock = Some(clock);
    }

    fn stop_clock(&mut self) {
        self.clock = None;
        for p in &mut self.pending {
            p.end = None;
        }
    }

    /// When something is next due: the front transfer's end, or its next piece for the listeners (when its
    /// first frame's time comes).
    fn deadline(&self, output: bool) -> Option<Instant> {
        let (clock, params, p) = (self.clock.as_ref()?, self.params?, self.pending.front()?);
        let hz = params.hz();
        let end = p.end?;
        let mut due = clock.time_of(end, hz);
        if output && p.played < p.frames {
            due = due.min(clock.time_of(end - (p.frames - p.played), hz));
        }
        Some(due)
    }
}

/// The queues while the driver is up.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Queues with new used buffers to tell the driver about.
    used: [bool; QUEUES],
}

struct State {
    active: Option<Active>,
    streams: [Stream; STREAMS],
    /// Serving stopped while a machine state is saved.
    quiesced: bool,
    /// Since when the VM is paused, if it is: the streams' clocks stand still (the guest's transfers are
    /// neither played nor completed) and go on from there when it resumes.
    held_since: Option<Instant>,
    /// When the thread has something to do next without a notification.
    deadline: Option<Instant>,
}

/// The device's side shared with its thread.
struct Shared {
    screen: Arc<Screen>,
    interrupt: Arc<VirtioInterrupt>,
    state: Mutex<State>,
    stats: Arc<SoundStats>,
    kicks: [EventFd; QUEUES],
    /// Wakes the thread: activation, reset, shutdown.
    wake: EventFd,
    shutdown: AtomicBool,
}

/// The next chain the driver made available on `queue`, if any. A queue the driver left disabled has no
/// rings to read: None. An avail index run more than a queue ahead is malformed.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>>, Malformed> {
    if !queue.ready() {
        return Ok(None);
    }
    if !avail_within_queue(queue, mem) {
        return Err(Malformed::AvailJump);
    }
    Ok(queue.pop_descriptor_chain(mem))
}

/// Writes a transfer's status and returns it to the driver.
fn complete(
    a: &mut Active,
    queue: usize,
    p: &Pending,
    status: u32,
    latency: u32,
    used_len: u32,
) -> Result<(), Malformed> {
    let mut s = [0u8; 8];
    s[..4].copy_from_slice(&status.to_le_bytes());
    s[4..].copy_from_slice(&latency.to_le_bytes());
    write_segments(&a.mem, &p.status, &s)?;
    a.queues[queue].add_used(&a.mem, p.head, used_len).map_err(|_| Malformed::OutsideMemory)?;
    a.used[queue] = true;
    Ok(())
}

fn stream_queue(id: usize) -> usize {
    if id == OUTPUT { TXQ } else { RXQ }
}

/// The information structures the queries answer with.
fn pcm_info(id: usize) -> Vec<u8> {
    let mut b = vec![0u8; PCM_INFO_SIZE];
    let formats: u64 = FORMATS.iter().fold(0, |m, &f| m | 1 << f);
    let rates: u64 = RATES.iter().fold(0, |m, &(r, _)| m | 1 << r);
    b[8..16].copy_from_slice(&formats.to_le_bytes());
    b[16..24].copy_from_slice(&rates.to_le_bytes());
    b[24] = if id == OUTPUT { D_OUTPUT } else { D_INPUT };
    b[25] = CHANNELS_MIN;
    b[26] = CHANNELS_MAX;
    b
}

fn chmap_info(id: usize) -> Vec<u8> {
    let mut b = vec![0u8; CHMAP_INFO_SIZE];
    b[4] = if id == OUTPUT { D_OUTPUT } else { D_INPUT };
    b[5] = 2;
    b[6] = CHMAP_FL;
    b[7] = CHMAP_FR;
    b
}

impl crate::vcpu::HoldsWhilePaused for Shared {
    /// The VM paused (`true`) or went on: what is due is done, then the streams' clocks stand still; on
    /// resuming they are moved on by the pause, so every transfer keeps its place.
    fn hold(&self, paused: bool) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        match (paused, state.held_since) {
            (true, None) => {
                self.service(&mut state);
                state.held_since = Some(now);
                state.deadline = None;
            }
            (false, Some(since)) => {
                let pause = now.saturating_duration_since(since);
                for s in &mut state.streams {
                    if let Some(clock) = s.clock.as_mut() {
                        clock.base += pause;
                    }
                }
                state.held_since = None;
            }
            _ => return,
        }
        drop(state);
        let _ = self.wake.write(1);
    }
}

impl Shared {
    /// Answers the control requests.
    fn drain_control(&self, state: &mut State) -> Result<(), Malformed> {
        loop {
            let Some(a) = state.active.as_mut() else { return Ok(()) };
            let Some(chain) = next_chain(&mut a.queues[CONTROLQ], &a.mem)? else { return Ok(()) };
            let c = parse_chain(&a.mem, chain)?;
            if c.writable_len < 4 {
                return Err(Malformed::NoStatus);
            }
            let mut request = [0u8; MAX_REQUEST];
            let n = read_segments(&a.mem, &c.readable, 0, &mut request)?;
            self.stats.control_requests.fetch_add(1, Ordering::Relaxed);
            let response = self.request(state, &request[..n], c.writable_len)?;
            let Some(a) = state.active.as_mut() else { return Ok(()) };
            let written = write_segments(&a.mem, &c.writable, &response)?;
            a.queues[CONTROLQ].add_used(&a.mem, c.head, written as u32).map_err(|_| Malformed::OutsideMemory)?;
            a.used[CONTROLQ] = true;
        }
    }

    /// One control request (`request`: its first bytes): the response (status, then any payload), which
    /// fits `room` bytes.
    fn request(&self, state: &mut State, request: &[u8], room: u64) -> Result<Vec<u8>, Malformed> {
        if request.len() < 4 {
            return Ok(S_BAD_MSG.to_le_bytes().to_vec());
        }
        let code = le32(request, 0);
        let status = match code {
            R_JACK_INFO => return Ok(query(request, room, JACKS, JACK_INFO_SIZE, |_| Vec::new())),
            R_PCM_INFO => return Ok(query(request, room, STREAMS as u32, PCM_INFO_SIZE, pcm_info)),
            R_CHMAP_INFO => return Ok(query(request, room, CHMAPS, CHMAP_INFO_SIZE, chmap_info)),
            R_PCM_SET_PARAMS | R_PCM_PREPARE | R_PCM_RELEASE | R_PCM_START | R_PCM_STOP => {
                self.pcm_request(state, code, request)?
            }
            _ => {
                log::debug!("sound: control request {code:#x} not supported");
                S_NOT_SUPP
            }
        };
        Ok(status.to_le_bytes().to_vec())
    }

    fn pcm_request(&self, state: &mut State, code: u32, request: &[u8]) -> Result<u32, Malformed> {
        if request.len() < 8 {
            return Ok(S_BAD_MSG);
        }
        let id = le32(request, 4) as usize;
        if id >= STREAMS {
            return Ok(S_BAD_MSG);
        }
        let State { active, streams, .. } = state;
        let s = &mut streams[id];
        match code {
            R_PCM_SET_PARAMS => {
                if request.len() < SET_PARAMS_SIZE {
                    return Ok(S_BAD_MSG);
                }
                let params = Params {
                    buffer_bytes: le32(request, 8),
                    period_bytes: le32(request, 12),
                    channels: request[20],
                    format: request[21],
                    rate: request[22],
                };
                let status = params.check(le32(request, 16));
                if status != S_OK {
                    return Ok(status);
                }
                if s.state == PcmState::Running {
                    return Ok(S_BAD_MSG);
                }
                // Transfers held for the old parameters are returned unplayed.
                self.flush(active.as_mut(), id, s)?;
                s.params = Some(params);
                s.state = PcmState::Set;
            }
            R_PCM_PREPARE => {
                if s.params.is_none() || s.state == PcmState::Running {
                    return Ok(S_BAD_MSG);
                }
                s.state = PcmState::Prepared;
            }
            R_PCM_START => {
                let Some(params) = s.params else { return Ok(S_BAD_MSG) };
                if !matches!(s.state, PcmState::Prepared | PcmState::Stopped) {
                    return Ok(S_BAD_MSG);
                }
                s.state = PcmState::Running;
                s.start_clock(Instant::now());
                if id == OUTPUT {
                    let format = AudioFormat { rate: params.hz(), channels: params.channels };
                    if !self.screen.audio_start(format) {
                        log::warn!("sound: the listeners cannot take {format:?}; the guest plays to nobody");
                    }
                }
            }
            R_PCM_STOP => {
                if s.state != PcmState::Running {
                    return Ok(S_BAD_MSG);
                }
                s.state = PcmState::Stopped;
                s.stop_clock();
                if id == OUTPUT {
                    self.screen.audio_stop();
                }
            }
            _ => {
                // RELEASE: from any state (a running stream is stopped first); held transfers are
                // completed before the request is (§5.14.6.6.4).
                if s.state == PcmState::Running {
                    s.stop_clock();
                    if id == OUTPUT {
                        self.screen.audio_stop();
                    }
                }
                self.flush(active.as_mut(), id, s)?;
                s.state = if s.params.is_some() { PcmState::Set } else { PcmState::Idle };
            }
        }
        Ok(S_OK)
    }

    /// Returns the stream's held transfers unplayed, with IO_ERR.
    fn flush(&self, active: Option<&mut Active>, id: usize, s: &mut Stream) -> Result<(), Malformed> {
        let pending = std::mem::take(&mut s.pending);
        let Some(a) = active else { return Ok(()) };
        for p in &pending {
            self.stats.refused_transfers.fetch_add(1, Ordering::Relaxed);
            complete(a, stream_queue(id), p, S_IO_ERR, 0, XFER_STATUS as u32)?;
        }
        Ok(())
    }

    /// Plays and completes what the running streams' clocks say is due by `now`.
    fn advance(&self, state: &mut State, now: Instant) -> Result<(), Malformed> {
        let State { active, streams, .. } = state;
        let Some(a) = active.as_mut() else { return Ok(()) };
        for (id, s) in streams.iter_mut().enumerate() {
            let (Some(clock), Some(params)) = (s.clock, s.params) else { continue };
            let hz = params.hz();
            let position = clock.position(now, hz);
            while let Some(p) = s.pending.front_mut() {
                let Some(end) = p.end else { break };
                let due = pushed_by(p.frames, end, position, hz);
                if id == OUTPUT && due > p.played {
                    self.play(&a.mem, params, p, due)?;
                }
                if position < end {
                    break;
                }
                let Some(p) = s.pending.pop_front() else { break };
                if id == INPUT {
                    let silence = if params.format == FMT_U8 { 0x80 } else { 0 };
                    fill_segments(&a.mem, &p.data, silence)?;
                    self.stats.recorded_frames.fetch_add(p.frames, Ordering::Relaxed);
                }
                complete(a, stream_queue(id), &p, S_OK, s.held_bytes(), p.used_len)?;
            }
        }
        Ok(())
    }

    /// Hands frames `p.played..upto` of an output transfer to the listeners.
    fn play(&self, mem: &GuestMemoryMmap, params: Params, p: &mut Pending, upto: u64) -> Result<(), Malformed> {
        let frame = u64::from(params.frame_bytes());
        let mut bytes = vec![0u8; ((upto - p.played) * frame) as usize];
        let n = read_segments(mem, &p.data, p.played * frame, &mut bytes)?;
        let mut samples = Vec::with_capacity(n / sample_bytes(params.format) as usize);
        convert(params.format, &bytes[..n], &mut samples);
        self.screen.audio_push(&samples);
        self.stats.played_frames.fetch_add(upto - p.played, Ordering::Relaxed);
        p.played = upto;
        Ok(())
    }

    /// Takes the transfers the driver made available on `queue` (TXQ or RXQ).
    fn accept(&self, state: &mut State, queue: usize, now: Instant) -> Result<(), Malformed> {
        let id = if queue == TXQ { OUTPUT } else { INPUT };
        loop {
            let State { active, streams, .. } = &mut *state;
            let Some(a) = active.as_mut() else { return Ok(()) };
            let Some(chain) = next_chain(&mut a.queues[queue], &a.mem)? else { return Ok(()) };
            let c = parse_chain(&a.mem, chain)?;
            if c.readable_len < XFER_HEADER {
                return Err(Malformed::NoHeader);
            }
            if c.writable_len < XFER_STATUS {
                return Err(Malformed::NoStatus);
            }
            // One more in flight than the ring has entries: a buffer was published twice.
            if streams[id].pending.len() >= usize::from(a.queues[queue].size()) {
                return Err(Malformed::TooManyBuffers);
            }
            let mut header = [0u8; 4];
            read_segments(&a.mem, &c.readable, 0, &mut header)?;
            let stream_id = u32::from_le_bytes(header);
            let status = slice_segments(&c.writable, c.writable_len - XFER_STATUS, XFER_STATUS);
            let (data, len) = if queue == TXQ {
                (slice_segments(&c.readable, XFER_HEADER, c.readable_len), c.readable_len - XFER_HEADER)
            } else {
                (slice_segments(&c.writable, 0, c.writable_len - XFER_STATUS), c.writable_len - XFER_STATUS)
            };
            let s = &mut streams[id];
            let refusal = if stream_id as usize != id || len > u64::from(MAX_BUFFER_BYTES) {
                Some(S_BAD_MSG)
            } else if !s.state.takes_transfers() {
                // A stream that was not prepared has nothing to play with: the transfer is returned at
                // once, unplayed, with IO_ERR.
                Some(S_IO_ERR)
            } else {
                None
            };
            let bytes = len.min(u64::from(MAX_BUFFER_BYTES)) as u32;
            let used_len = if queue == TXQ { XFER_STATUS as u32 } else { bytes + XFER_STATUS as u32 };
            let mut p = Pending { head: c.head, data, status, bytes, frames: 0, played: 0, end: None, used_len };
            let (Some(params), None) = (s.params, refusal) else {
                self.stats.refused_transfers.fetch_add(1, Ordering::Relaxed);
                complete(a, queue, &p, refusal.unwrap_or(S_IO_ERR), 0, XFER_STATUS as u32)?;
                continue;
            };
            p.frames = u64::from(bytes / params.frame_bytes());
            if let Some(clock) = s.clock.as_mut() {
                // The stream ran dry (the guest was late): its clock starts over now, as a card's
                // position stops at an underrun.
                if s.pending.is_empty() && clock.position(now, params.hz()) >= clock.frames {
                    *clock = Clock { base: now, frames: 0 };
                }
                clock.frames += p.frames;
                p.end = Some(clock.frames);
            }
            s.pending.push_back(p);
        }
    }

    /// Does everything there is to do; a malformed chain breaks the device until the driver resets it.
    fn service(&self, state: &mut State) {
        if state.quiesced || state.held_since.is_some() || state.active.is_none() {
            state.deadline = None;
            return;
        }
        let now = Instant::now();
        let result = self
            .drain_control(state)
            .and_then(|()| self.advance(state, now))
            .and_then(|()| self.accept(state, TXQ, now))
            .and_then(|()| self.accept(state, RXQ, now))
            .and_then(|()| self.advance(state, now));
        if let Some(a) = state.active.as_mut() {
            for q in 0..QUEUES {
                if std::mem::take(&mut a.used[q]) && a.queues[q].needs_notification(&a.mem).unwrap_or(true) {
                    self.interrupt.signal_queue(q);
                }
            }
        }
        if let Err(what) = result {
            let first = self.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0;
            let level = if first { log::Level::Warn } else { log::Level::Debug };
            log::log!(level, "sound: malformed descriptor chain ({what:?}); the device needs a reset");
            self.stop_streams(state);
            state.active = None;
            self.interrupt.mark_needs_reset();
        }
        state.deadline = state.streams.iter().enumerate().filter_map(|(id, s)| s.deadline(id == OUTPUT)).min();
    }

    /// Forgets the streams (reset, malformed chain, activation); the listeners hear the output end.
    fn stop_streams(&self, state: &mut State) {
        if state.streams[OUTPUT].state == PcmState::Running {
            self.screen.audio_stop();
        }
        state.streams = [Stream::new(), Stream::new()];
        state.deadline = None;
    }

    fn thread(&self) {
        const WAKE: u64 = QUEUES as u64;
        let Ok(epoll) = Epoll::new() else {
            log::error!("sound: cannot create its thread's epoll; the device stays idle");
            return;
        };
        let mut fds: Vec<(i32, u64)> = self.kicks.iter().enumerate().map(|(i, k)| (k.as_raw_fd(), i as u64)).collect();
        fds.push((self.wake.as_raw_fd(), WAKE));
        for (fd, token) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
                log::error!("sound: cannot watch a descriptor ({e}); the device stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); QUEUES + 1];
        let mut deadline: Option<Instant> = None;
        while !self.shutdown.load(Ordering::Acquire) {
            let timeout = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("sound: its thread cannot wait ({e}); the device stays idle");
                    return;
                }
            };
            for e in &events[..n] {
                match e.data() {
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    i => {
                        let _ = self.kicks[i as usize].read();
                    }
                }
            }
            let mut state = lock(&self.state);
            self.service(&mut state);
            deadline = state.deadline;
        }
    }
}

/// Answers an information query (`virtio_snd_query_info`) about `total` items whose structures of
/// `item_size` bytes `item` makes; the response must fit `room`.
fn query(request: &[u8], room: u64, total: u32, item_size: usize, item: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let bad = S_BAD_MSG.to_le_bytes().to_vec();
    if request.len() < 16 {
        return bad;
    }
    let (start, count, size) = (le32(request, 4), le32(request, 8), le32(request, 12));
    if u64::from(start) + u64::from(count) > u64::from(total)
        || (size as usize) < item_size
        || size > MAX_INFO_SIZE
        || 4 + u64::from(count) * u64::from(size) > room
    {
        return bad;
    }
    let mut response = S_OK.to_le_bytes().to_vec();
    for id in start..start + count {
        let at = response.len();
        response.extend_from_slice(&item(id as usize));
        response.resize(at + size as usize, 0);
    }
    response
}

/// A virtio-sound device on the PCI transport, playing to a screen's listeners.
pub struct VirtioSound {
    shared: Arc<Shared>,
    max_sizes: [u16; QUEUES],
    thread: Option<JoinHandle<()>>,
}

impl VirtioSound {
    /// A device whose output goes to `screen`'s listeners, raising `interrupt`; starts its (idle)
    /// thread, which inherits the caller's seccomp filter.
    pub fn new(screen: Arc<Screen>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let kick = || EventFd::new(libc::EFD_NONBLOCK);
        let shared = Arc::new(Shared {
            screen,
            interrupt,
            state: Mutex::new(State {
                active: None,
                streams: [Stream::new(), Stream::new()],
                quiesced: false,
                held_since: None,
                deadline: None,
            }),
            stats: Arc::new(SoundStats::default()),
            kicks: [kick()?, kick()?, kick()?, kick()?],
            wake: kick()?,
            shutdown: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("sound".into()).spawn(move || s.thread())?;
        Ok(VirtioSound { shared, max_sizes: [QUEUE_SIZE; QUEUES], thread: Some(thread) })
    }

    /// Holds the streams while `run`'s VM is paused.
    pub fn follow_pauses(&self, run: &crate::vcpu::RunControl) {
        run.hold_while_paused(&self.shared);
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<SoundStats> {
        self.shared.stats.clone()
    }
}

impl VirtioDevice for VirtioSound {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    /// No control elements (VIRTIO_SND_F_CTLS).
    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        &self.shared.kicks[index.min(QUEUES - 1)]
    }

    /// jacks, streams, chmaps, controls (le32 each).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&JACKS.to_le_bytes());
        config[4..8].copy_from_slice(&(STREAMS as u32).to_le_bytes());
        config[8..12].copy_from_slice(&CHMAPS.to_le_bytes());
        let start = offset as usize;
        match config.get(start..start.saturating_add(data.len())) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) {
        if activation.queues.len() != QUEUES {
            log::warn!(
                "sound: the driver set up {} queues of {QUEUES}; the device stays idle",
                activation.queues.len()
            );
            return;
        }
        {
            let mut state = lock(&self.shared.state);
            self.shared.stop_streams(&mut state);
            state.active = Some(Active { mem: activation.mem, queues: activation.queues, used: [false; QUEUES] });
            state.quiesced = false;
        }
        let _ = self.shared.wake.write(1);
    }

    fn reset(&mut self) {
        let mut state = lock(&self.shared.state);
        self.shared.stop_streams(&mut state);
        state.active = None;
        state.quiesced = false;
    }

    /// Chains are handled holding the state lock, so taking it waits for one in progress. Transfers the
    /// device holds stay held (they are saved with the device's state).
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.shared.state);
        state.quiesced = true;
        let Some(a) = state.active.as_ref() else { return Ok(Vec::new()) };
        Ok(a.queues.iter().map(|q| q.state()).collect())
    }

    fn resume_requests(&mut self) {
        lock(&self.shared.state).quiesced = false;
        let _ = self.shared.wake.write(1);
    }

    /// Each stream's parameters and state, and the transfers it holds with their place on its clock
    /// (counted from the moment of the save).
    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.shared.state);
        // A paused VM's clocks stood still at its pause.
        let now = state.held_since.unwrap_or_else(Instant::now);
        for s in &state.streams {
            w.bool(s.params.is_some());
            let p = s.params.unwrap_or(Params { buffer_bytes: 0, period_bytes: 0, channels: 0, format: 0, rate: 0 });
            w.u32(p.buffer_bytes);
            w.u32(p.period_bytes);
            w.u8(p.channels);
            w.u8(p.format);
            w.u8(p.rate);
            w.u8(s.state as u8);
            let position = match (s.clock, s.params) {
                (Some(c), Some(p)) => c.position(now, p.hz()),
                _ => 0,
            };
            w.bool(s.clock.is_some());
            w.u64(s.clock.map_or(0, |c| c.frames.saturating_sub(position)));
            w.u32(s.pending.len() as u32);
            for p in &s.pending {
                w.u16(p.head);
                w.u32(p.bytes);
                w.u64(p.frames);
                w.u64(p.played);
                w.u32(p.used_len);
                w.bool(p.end.is_some());
                w.u64(p.end.map_or(0, |e| e.saturating_sub(position)));
                for segs in [&p.data, &p.status] {
                    w.u32(segs.len() as u32);
                    for &(addr, len) in segs.iter() {
                        w.u64(addr);
                        w.u32(len);
                    }
                }
            }
        }
    }

    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        use crate::snapshot::StateError;
        let damaged = |what: &str| StateError::Damaged(format!("a sound card with {what}"));
        let now = lock(&self.shared.state).held_since.unwrap_or_else(Instant::now);
        let mut streams = [Stream::new(), Stream::new()];
        for s in &mut streams {
            let has_params = r.bool()?;
            let params = Params {
                buffer_bytes: r.u32()?,
                period_bytes: r.u32()?,
                channels: r.u8()?,
                format: r.u8()?,
                rate: r.u8()?,
            };
            if has_params && params.check(0) != S_OK {
                return Err(damaged("stream parameters it does not offer"));
            }
            s.params = has_params.then_some(params);
            s.state = PcmState::from_u8(r.u8()?).ok_or_else(|| damaged("an unknown stream state"))?;
            if (s.state != PcmState::Idle) != has_params {
                return Err(damaged("a stream state that does not match its parameters"));
            }
            let running = r.bool()?;
            let clock_frames = r.u64()?;
            if running != (s.state == PcmState::Running) {
                return Err(damaged("a clock on a stream that does not run"));
            }
            s.clock = running.then_some(Clock { base: now, frames: clock_frames });
            let count = r.u32()? as usize;
            if count > usize::from(QUEUE_SIZE) || (count > 0 && !s.state.takes_transfers()) {
                return Err(damaged(&format!("{count} transfers held")));
            }
            for _ in 0..count {
                let (head, bytes, frames, played, used_len) = (r.u16()?, r.u32()?, r.u64()?, r.u64()?, r.u32()?);
                let (scheduled, end) = (r.bool()?, r.u64()?);
                let mut segments = [Vec::new(), Vec::new()];
                for (i, segs) in segments.iter_mut().enumerate() {
                    let n = r.u32()? as usize;
                    if n > if i == 0 { MAX_SEGMENTS } else { XFER_STATUS as usize } {
                        return Err(damaged(&format!("a transfer of {n} pieces")));
                    }
                    for _ in 0..n {
                        segs.push((r.u64()?, r.u32()?));
                    }
                }
                let [data, status] = segments;
                let total = |segs: &Segments| segs.iter().map(|&(_, l)| u64::from(l)).sum::<u64>();
                let frame = u64::from(params.frame_bytes().max(1));
                if bytes > MAX_BUFFER_BYTES
                    || total(&data) != u64::from(bytes)
                    || total(&status) != XFER_STATUS
                    || frames != u64::from(bytes) / frame
                    || played > frames
                    || scheduled != running
                    || end > clock_frames
                {
                    return Err(damaged("a damaged transfer"));
                }
                let end = scheduled.then_some(end);
                s.pending.push_back(Pending { head, data, status, bytes, frames, played, end, used_len });
            }
        }
        let mut state = lock(&self.shared.state);
        if state.streams[OUTPUT].state == PcmState::Running {
            self.shared.screen.audio_stop();
        }
        if let (PcmState::Running, Some(p)) = (streams[OUTPUT].state, streams[OUTPUT].params) {
            self.shared.screen.audio_start(AudioFormat { rate: p.hz(), channels: p.channels });
        }
        state.streams = streams;
        drop(state);
        let _ = self.shared.wake.write(1);
        Ok(())
    }
}

impl Drop for VirtioSound {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.shared.state);
            self.shared.stop_streams(&mut state);
            state.active = None;
        }
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::audio::{AudioCursor, AudioEvent};
    use crate::virtio::host_driver::{DESC_F_NEXT, DESC_F_WRITE, Desc, HostDriver};

    const WAIT: Duration = Duration::from_secs(5);
    /// A control request at REQUEST, its response at RESPONSE; transfer i in slot SLOTS + (i % 64) *
    /// SLOT: its header at the start, its PCM bytes 16 bytes on, its status in the last 8 bytes.
    const REQUEST: u64 = 0x2_0000;
    const RESPONSE: u64 = 0x2_8000;
    const SLOTS: u64 = 0x10_0000;
    const SLOT: u64 = 0x1_0000;
    const RAM: usize = 0x60_0000;

    const S16_STEREO_48K: AudioFormat = AudioFormat { rate: 48_000, channels: 2 };
    const RATE_8000: u8 = 1;
    const RATE_44100: u8 = 6;
    const RATE_48000: u8 = 7;

    /// A guest's virtio-sound driver.
    struct Guest {
        d: HostDriver<VirtioSound>,
        screen: Arc<Screen>,
        stats: Arc<SoundStats>,
        /// Descriptor ids used next on each queue, and the next transfer slot.
        next: [u16; QUEUES],
        slot: u64,
    }

    /// A transfer the guest made: its chain's head and where its status and PCM bytes are.
    #[derive(Debug, Clone, Copy)]
    struct Xfer {
        head: u16,
        data: u64,
        status: u64,
    }

    impl Guest {
        /// Counts transfer completions into `done` until `n` came back (failing WAIT after `since`).
        fn wait_tx(&mut self, done: &mut usize, n: usize, since: Instant) {
            while *done < n {
                assert!(since.elapsed() < WAIT, "{done} of {n} periods back");
                *done += self.d.completions(TXQ, Duration::from_millis(50)).len();
            }
        }

        fn new() -> Guest {
            Guest::with_queues(&[QUEUE_SIZE; QUEUES])
        }

        fn with_queues(sizes: &[u16]) -> Guest {
            let screen = Screen::new();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
            let device = VirtioSound::new(screen.clone(), interrupt.clone()).unwrap();
            let stats = device.stats();
            // What sits where a disabled queue's rings would be (address 0) is no avail index to follow.
            mem.write_slice(&[0x34, 0x12, 0x34, 0x12], GuestAddress(0)).unwrap();
            let d = HostDriver::new(device, interrupt, mem, sizes);
            Guest { d, screen, stats, next: [0; QUEUES], slot: 0 }
        }

        /// Resets the device and brings it up again.
        fn reinit(&mut self) {
            self.d.init();
            self.next = [0; QUEUES];
        }

        /// Writes a chain of `parts` (address, length, device-writable) on `queue` and makes it
        /// available (not notified); returns its head.
        fn chain(&mut self, queue: usize, parts: &[(u64, u32, bool)]) -> u16 {
            let head = self.next[queue] % QUEUE_SIZE;
            for (k, &(addr, len, write)) in parts.iter().enumerate() {
                let i = (self.next[queue] + k as u16) % QUEUE_SIZE;
                let mut flags = if write { DESC_F_WRITE } else { 0 };
                if k + 1 < parts.len() {
                    flags |= DESC_F_NEXT;
                }
                self.d.write_desc(queue, i, Desc { addr, len, flags, next: (i + 1) % QUEUE_SIZE });
            }
            self.next[queue] = self.next[queue].wrapping_add(parts.len() as u16);
            self.d.push_avail(queue, head);
            head
        }

        /// Sends a control request; returns the status and the payload after it.
        fn control_with_room(&mut self, request: &[u8], room: u32) -> (u32, Vec<u8>) {
            self.d.mem.write_slice(request, GuestAddress(REQUEST)).unwrap();
            self.d.mem.write_slice(&vec![0xAA; room as usize], GuestAddress(RESPONSE)).unwrap();
            self.chain(CONTROLQ, &[(REQUEST, request.len() as u32, false), (RESPONSE, room, true)]);
            self.d.kick(CONTROLQ);
            let done = self.d.completions(CONTROLQ, WAIT);
            assert_eq!(done.len(), 1, "the device answers the request");
            let mut b = vec![0u8; done[0].1 as usize];
            self.d.mem.read_slice(&mut b, GuestAddress(RESPONSE)).unwrap();
            assert!(b.len() >= 4, "a status at least");
            (le32(&b, 0), b[4..].to_vec())
        }

        fn control(&mut self, request: &[u8]) -> u32 {
            self.control_with_room(request, 64).0
        }

        fn pcm(&mut self, code: u32, stream: u32) -> u32 {
            self.control(&words(&[code, stream]))
        }

        fn query(&mut self, code: u32, start: u32, count: u32, size: u32, room: u32) -> (u32, Vec<u8>) {
            self.control_with_room(&words(&[code, start, count, size]), room)
        }

        #[allow(clippy::too_many_arguments)]
        fn set_params_full(
            &mut self,
            stream: u32,
            buffer: u32,
            period: u32,
            features: u32,
            channels: u8,
            format: u8,
            rate: u8,
        ) -> u32 {
            let mut r = words(&[R_PCM_SET_PARAMS, stream, buffer, period, features]);
            r.extend_from_slice(&[channels, format, rate, 0]);
            self.control(&r)
        }

        fn set_params(&mut self, stream: u32, period: u32, channels: u8, format: u8, rate: u8) -> u32 {
            self.set_params_full(stream, period * 8, period, 0, channels, format, rate)
        }

        /// SET_PARAMS, PREPARE (and START when `start`), all answered OK.
        fn open(&mut self, stream: u32, period: u32, channels: u8, format: u8, rate: u8, start: bool) {
            assert_eq!(self.set_params(stream, period, channels, format, rate), S_OK);
            assert_eq!(self.pcm(R_PCM_PREPARE, stream), S_OK);
            if start {
                assert_eq!(self.pcm(R_PCM_START, stream), S_OK);
            }
        }

        fn next_slot(&mut self) -> u64 {
            let at = SLOTS + (self.slot % 64) * SLOT;
            self.slot += 1;
            at
        }

        /// Makes a transfer of `pcm` for `stream` available on the tx queue (not notified).
        fn post_tx(&mut self, stream: u32, pcm: &[u8]) -> Xfer {
            let at = self.next_slot();
            let (data, status) = (at + 16, at + SLOT - 8);
            self.d.mem.write_slice(&stream.to_le_bytes(), GuestAddress(at)).unwrap();
            self.d.mem.write_slice(pcm, GuestAddress(data)).unwrap();
            self.d.mem.write_slice(&[0xEE; 8], GuestAddress(status)).unwrap();
            let head = self.chain(TXQ, &[(at, 4, false), (data, pcm.len() as u32, false), (status, 8, true)]);
            Xfer { head, data, status }
        }

        /// Makes an input transfer of `len` bytes for `stream` available on the rx queue (not notified).
        fn post_rx(&mut self, stream: u32, len: u32) -> Xfer {
            let at = self.next_slot();
            let (data, status) = (at + 16, at + 16 + u64::from(len));
            self.d.mem.write_slice(&stream.to_le_bytes(), GuestAddress(at)).unwrap();
            self.d.mem.write_slice(&vec![0x55; len as usize + 8], GuestAddress(data)).unwrap();
            let head = self.chain(RXQ, &[(at, 4, false), (data, len, true), (status, 8, true)]);
            Xfer { head, data, status }
        }

        /// The (status, latency) the device wrote for `x`.
        fn status(&self, x: Xfer) -> (u32, u32) {
            let mut b = [0u8; 8];
            self.d.mem.read_slice(&mut b, GuestAddress(x.status)).unwrap();
            (le32(&b, 0), le32(&b, 4))
        }

        /// Waits until `count` completions came on `queue`; returns (head, used length) of each.
        fn wait_completions(&mut self, queue: usize, count: usize) -> Vec<(u16, u32)> {
            let deadline = Instant::now() + WAIT;
            let mut done = Vec::new();
            while done.len() < count && Instant::now() < deadline {
                done.extend(self.d.completions(queue, Duration::from_millis(50)));
            }
            assert_eq!(done.len(), count, "completions on queue {queue}");
            done
        }

        fn needs_reset(&mut self) -> bool {
            self.d.status() & 0x40 != 0
        }
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// What a listener reads now: the events other than Data, and the samples.
    fn listen(screen: &Screen, cursor: &mut AudioCursor) -> (Vec<AudioEvent>, Vec<i16>) {
        let (mut events, mut samples) = (Vec::new(), Vec::new());
        loop {
            match screen.audio().read(cursor, &mut samples, 1 << 20) {
                AudioEvent::Idle => return (events, samples),
                AudioEvent::Data => {}
                e => events.push(e),
            }
        }
    }

    /// `frames` stereo frames of a 440 Hz tone at 48 kHz (the right channel inverted), from frame `from`.
    fn tone(from: usize, frames: usize) -> Vec<i16> {
        (from..from + frames)
            .flat_map(|i| {
                let v = (12_000.0 * (2.0 * std::f64::consts::PI * 440.0 * i as f64 / 48_000.0).sin()) as i16;
                [v, -v]
            })
            .collect()
    }

    fn s16_bytes(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    /// 10 ms of 48 kHz stereo S16.
    const PERIOD_48K: u32 = 480 * 4;

    #[test]
    fn the_configuration_and_the_info_queries_describe_two_streams() {
        // A driver that leaves the event queue disabled is served all the same.
        let mut g = Guest::with_queues(&[QUEUE_SIZE, 0, QUEUE_SIZE, QUEUE_SIZE]);
        let mut config = [0u8; 16];
        g.d.read_config(0, &mut config);
        assert_eq!((le32(&config, 0), le32(&config, 4), le32(&config, 8), le32(&config, 12)), (0, 2, 2, 0));

        let (status, info) = g.query(R_PCM_INFO, 0, 2, PCM_INFO_SIZE as u32, 4 + 64);
        assert_eq!(status, S_OK);
        assert_eq!(info.len(), 64);
        for (id, item) in info.chunks(32).enumerate() {
            let formats = u64::from_le_bytes(item[8..16].try_into().unwrap());
            let rates = u64::from_le_bytes(item[16..24].try_into().unwrap());
            assert_eq!(le32(item, 0), 0, "hda_fn_nid");
            assert_eq!(le32(item, 4), 0, "no features");
            assert_eq!(formats, 1 << 4 | 1 << 5 | 1 << 17 | 1 << 19, "U8, S16, S32, FLOAT");
            assert_eq!(rates, 0b1111_1110, "8000 to 48000 Hz");
            assert_eq!((item[24], item[25], item[26]), (id as u8, 1, 2), "direction, channels");
            assert_eq!(&item[27..], &[0; 5], "padding");
        }

        // A newer driver's larger structures: ours, then zeros.
        let (status, info) = g.query(R_PCM_INFO, 1, 1, 48, 4 + 48);
        assert_eq!(status, S_OK);
        assert_eq!((info.len(), info[24]), (48, D_INPUT));
        assert!(info[32..].iter().all(|&b| b == 0));

        let (status, maps) = g.query(R_CHMAP_INFO, 0, 2, CHMAP_INFO_SIZE as u32, 4 + 48);
        assert_eq!(status, S_OK);
        for (id, item) in maps.chunks(24).enumerate() {
            assert_eq!(&item[4..8], &[id as u8, 2, CHMAP_FL, CHMAP_FR]);
        }
        // No jacks: an empty query is answered, any jack is not.
        assert_eq!(g.query(R_JACK_INFO, 0, 0, JACK_INFO_SIZE as u32, 64), (S_OK, vec![]));
        assert_eq!(g.query(R_JACK_INFO, 0, 1, JACK_INFO_SIZE as u32, 64).0, S_BAD_MSG);

        // Hostile queries.
        for (start, count, size, room) in [
            (1, 2, 32, 256),        // past the streams
            (u32::MAX, 2, 32, 256), // a start that wraps
            (0, u32::MAX, 32, 256), // a count that wraps
            (0, 2, 8, 256),         // smaller than the structure
            (0, 2, u32::MAX, 256),  // a size to allocate
            (0, 2, 32, 40),         // no room for the answer
        ] {
            assert_eq!(g.query(R_PCM_INFO, start, count, size, room).0, S_BAD_MSG, "{start} {count} {size}");
        }
        assert_eq!(g.control(&words(&[R_PCM_INFO, 0])), S_BAD_MSG, "a short query");
        assert_eq!(g.control(&[1, 0]), S_BAD_MSG, "no header");
        assert_eq!(g.control(&words(&[0x0300, 0, 1, 64])), S_NOT_SUPP, "control elements");
        assert_eq!(g.control(&words(&[2, 0, 0, 0])), S_NOT_SUPP, "jack remap");
        assert!(!g.needs_reset());
        assert_eq!(g.stats.control_requests.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn set_params_takes_only_what_was_offered_and_the_lifecycle_is_checked() {
        let mut g = Guest::new();
        let period = PERIOD_48K;
        for (stream, buffer, period, features, channels, format, rate, want) in [
            (0, 8 * period, period, 0, 2, FMT_S16, 13, S_NOT_SUPP), // 384 kHz
            (0, 8 * period, period, 0, 2, FMT_S16, 0, S_NOT_SUPP),  // 5512 Hz
            (0, 8 * period, period, 0, 2, FMT_S16, 200, S_NOT_SUPP),
            (0, 8 * period, period, 0, 2, 15, RATE_48000, S_NOT_SUPP), // S24
            (0, 8 * period, period, 0, 2, 0xFF, RATE_48000, S_NOT_SUPP),
            (0, 8 * period, period, 0, 0, FMT_S16, RATE_48000, S_NOT_SUPP),
            (0, 8 * period, period, 0, 3, FMT_S16, RATE_48000, S_NOT_SUPP),
            (0, 8 * period, period, 1 << 2, 2, FMT_S16, RATE_48000, S_NOT_SUPP), // polling
            (0, 0, period, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (0, u32::MAX, period, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (0, MAX_BUFFER_BYTES + 1, period, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (0, 8 * period, 0, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (0, 8 * period, 9 * period, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (2, 8 * period, period, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (u32::MAX, 8 * period, period, 0, 2, FMT_S16, RATE_48000, S_BAD_MSG),
            (0, MAX_BUFFER_BYTES, period, 0, 2, FMT_S16, RATE_48000, S_OK),
            (1, 8 * period, period, 0, 1, FMT_U8, RATE_8000, S_OK),
        ] {
            assert_eq!(
                g.set_params_full(stream, buffer, period, features, channels, format, rate),
                want,
                "stream {stream} buffer {buffer} period {period} {features:#x} {channels} {format} {rate}"
            );
        }
        assert_eq!(g.control(&words(&[R_PCM_SET_PARAMS, 0, 64, 16])), S_BAD_MSG, "a short request");
        assert_eq!(g.pcm(R_PCM_PREPARE, 9), S_BAD_MSG);

        // The lifecycle, with requests out of order refused and nothing broken.
        assert_eq!(g.pcm(R_PCM_START, 0), S_BAD_MSG, "not prepared");
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_BAD_MSG, "not started");
        assert_eq!(g.pcm(R_PCM_PREPARE, 0), S_OK);
        assert_eq!(g.pcm(R_PCM_PREPARE, 0), S_OK);
        assert_eq!(g.pcm(R_PCM_START, 0), S_OK);
        assert_eq!(g.pcm(R_PCM_START, 0), S_BAD_MSG);
        assert_eq!(g.set_params(0, period, 2, FMT_S16, RATE_48000), S_BAD_MSG, "running");
        assert_eq!(g.pcm(R_PCM_PREPARE, 0), S_BAD_MSG, "running");
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_OK);
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_BAD_MSG);
        assert_eq!(g.pcm(R_PCM_START, 0), S_OK, "started again");
        assert_eq!(g.pcm(R_PCM_RELEASE, 0), S_OK, "released while running: stopped first");
        assert_eq!(g.pcm(R_PCM_START, 0), S_BAD_MSG, "released");
        assert_eq!(g.pcm(R_PCM_PREPARE, 0), S_OK, "the parameters stay");
        assert_eq!(g.pcm(R_PCM_RELEASE, 1), S_OK);
        assert_eq!(g.pcm(R_PCM_RELEASE, 1), S_OK);
        // A stream never configured cannot be prepared.
        g.reinit();
        assert_eq!(g.pcm(R_PCM_PREPARE, 0), S_BAD_MSG);
        assert!(!g.needs_reset());
        assert_eq!(g.stats.malformed.load(Ordering::Relaxed), 0);
    }

    /// While the VM is paused nothing plays and no transfer comes back; afterwards the rest plays on, every
    /// sample in its place, the last period its time after the pause.
    #[test]
    fn a_paused_vm_holds_its_streams() {
        let mut g = Guest::new();
        let run = crate::vcpu::RunControl::default();
        g.d.device.device().follow_pauses(&run);
        let mut cursor = AudioCursor::default();
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, false);
        let started = Instant::now();
        assert_eq!(g.pcm(R_PCM_START, 0), S_OK);
        let xfers: Vec<Xfer> = (0..10).map(|i| g.post_tx(0, &s16_bytes(&tone(i * 480, 480)))).collect();
        g.d.kick(TXQ);
        let mut done = 0;
        g.wait_tx(&mut done, 3, started);
        run.pause(Duration::from_secs(1)).unwrap();
        let paused = Instant::now();
        let before = listen(&g.screen, &mut cursor).1;
        done += g.d.completions(TXQ, Duration::from_millis(100)).len();
        let held = done;
        assert!(listen(&g.screen, &mut cursor).1.is_empty(), "nothing is played while paused");
        assert_eq!(g.d.completions(TXQ, Duration::from_millis(50)).len(), 0, "nothing comes back while paused");
        let pause = paused.elapsed();
        run.resume();
        g.wait_tx(&mut done, 10, started);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= pause + Duration::from_millis(90),
            "100 ms of sound and a pause of {pause:?} took {elapsed:?} ({held} periods back at the pause)"
        );
        for x in &xfers {
            assert_eq!(g.status(*x).0, S_OK);
        }
        let mut samples = before;
        samples.extend(listen(&g.screen, &mut cursor).1);
        assert!(samples == tone(0, 4800), "the tone as the guest played it, across the pause");
        assert!(!g.needs_reset());
    }

    /// A 440 Hz tone played in 10 ms periods reaches the listeners sample for sample, and the buffers
    /// come back at the pace they play: not all at once, and the last no sooner than their length.
    #[test]
    fn a_tone_plays_through_at_the_real_rate() {
        let mut g = Guest::new();
        let mut cursor = AudioCursor::default();
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, false);
        // The stream's clock cannot start before this.
        let started = Instant::now();
        assert_eq!(g.pcm(R_PCM_START, 0), S_OK);
        let xfers: Vec<Xfer> = (0..10).map(|i| g.post_tx(0, &s16_bytes(&tone(i * 480, 480)))).collect();
        g.d.kick(TXQ);
        let deadline = started + WAIT;
        let mut done = 0;
        while done < 10 {
            assert!(Instant::now() < deadline, "{done} of 10 periods back");
            done += g.d.completions(TXQ, Duration::from_millis(50)).len();
            // Never ahead of the time the periods take to play (10 ms each).
            let elapsed = started.elapsed();
            assert!(done as u128 <= elapsed.as_millis() / 10, "{done} periods back after {elapsed:?}");
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(90), "100 ms of sound played in {elapsed:?}");
        for x in &xfers {
            assert_eq!(g.status(*x).0, S_OK);
        }
        assert_eq!(g.status(xfers[9]).1, 0, "nothing left to play");

        let (events, samples) = listen(&g.screen, &mut cursor);
        assert_eq!(events, [AudioEvent::Begin(S16_STEREO_48K)]);
        assert_eq!(samples.len(), tone(0, 4800).len());
        assert!(samples == tone(0, 4800), "the listeners hear the tone as the guest played it");
        assert_eq!(g.screen.audio().played_frames(), 4800);
        assert_eq!(g.stats.played_frames.load(Ordering::Relaxed), 4800);

        assert_eq!(g.pcm(R_PCM_STOP, 0), S_OK);
        assert_eq!(listen(&g.screen, &mut cursor).0, [AudioEvent::End]);
        assert_eq!(g.pcm(R_PCM_RELEASE, 0), S_OK);
        assert!(!g.needs_reset());
    }

    /// Buffers sent after PREPARE are held until START (pre-buffering), and a long buffer reaches the
    /// listeners in pieces while it plays.
    #[test]
    fn buffers_wait_for_start_and_long_ones_play_in_pieces() {
        let mut g = Guest::new();
        let mut cursor = AudioCursor::default();
        g.open(0, 4800 * 4, 2, FMT_S16, RATE_48000, false);
        // 100 ms in one buffer.
        let x = g.post_tx(0, &s16_bytes(&tone(0, 4800)));
        g.d.kick(TXQ);
        assert!(g.d.completions(TXQ, Duration::from_millis(30)).is_empty(), "held until START");
        assert_eq!(g.screen.audio().played_frames(), 0);
        let started = Instant::now();
        assert_eq!(g.pcm(R_PCM_START, 0), S_OK);
        // Part of it is heard before it is all played.
        let deadline = started + WAIT;
        while g.screen.audio().played_frames() == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(2));
        }
        let (first, at) = (g.screen.audio().played_frames(), started.elapsed());
        if at < Duration::from_millis(80) {
            assert!(first < 4800, "{first} frames heard after {at:?}");
        }
        assert_eq!(g.wait_completions(TXQ, 1), [(x.head, 8)]);
        assert!(started.elapsed() >= Duration::from_millis(90));
        let (events, samples) = listen(&g.screen, &mut cursor);
        assert_eq!(events, [AudioEvent::Begin(S16_STEREO_48K)]);
        assert!(samples == tone(0, 4800));
        assert_eq!(g.status(x), (S_OK, 0));
    }

    /// A guest that comes late (the stream ran dry) does not get its next buffers back at once: the
    /// clock starts over from the late buffer, as a card's position stops at an underrun.
    #[test]
    fn after_an_underrun_the_clock_starts_over() {
        let mut g = Guest::new();
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        g.post_tx(0, &s16_bytes(&tone(0, 480)));
        g.d.kick(TXQ);
        g.wait_completions(TXQ, 1);
        std::thread::sleep(Duration::from_millis(50));
        let late = Instant::now();
        for i in 1..4 {
            g.post_tx(0, &s16_bytes(&tone(i * 480, 480)));
        }
        g.d.kick(TXQ);
        g.wait_completions(TXQ, 3);
        assert!(late.elapsed() >= Duration::from_millis(28), "30 ms played in {:?}", late.elapsed());
    }

    #[test]
    fn u8_s32_and_float_are_converted() {
        let mut g = Guest::new();
        let mut cursor = AudioCursor::default();
        // U8 mono at 8 kHz.
        g.open(0, 80, 1, FMT_U8, RATE_8000, true);
        let x = g.post_tx(0, &[0x80, 0xFF, 0x00, 0x81, 0x7F, 0x80, 0x80, 0x80]);
        g.d.kick(TXQ);
        g.wait_completions(TXQ, 1);
        assert_eq!(g.status(x).0, S_OK);
        let (events, samples) = listen(&g.screen, &mut cursor);
        assert_eq!(events, [AudioEvent::Begin(AudioFormat { rate: 8000, channels: 1 })]);
        assert_eq!(samples, [0, 32_512, -32_768, 256, -256, 0, 0, 0]);
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_OK);

        // S32 stereo at 44.1 kHz (a trailing partial frame is not played).
        g.open(0, 64, 2, FMT_S32, RATE_44100, true);
        let pcm: Vec<u8> =
            [i32::MAX, i32::MIN, 0x1234_5678, -0x1234_5678, 0x7FFF].iter().flat_map(|v| v.to_le_bytes()).collect();
        g.post_tx(0, &pcm);
        g.d.kick(TXQ);
        g.wait_completions(TXQ, 1);
        let (events, samples) = listen(&g.screen, &mut cursor);
        assert_eq!(events, [AudioEvent::End, AudioEvent::Begin(AudioFormat { rate: 44_100, channels: 2 })]);
        assert_eq!(samples, [i16::MAX, i16::MIN, 0x1234, -0x1235]);
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_OK);

        // FLOAT mono, clipped.
        g.open(0, 64, 1, FMT_FLOAT, RATE_48000, true);
        let pcm: Vec<u8> = [0.0f32, 0.5, -1.0, 2.0, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        g.post_tx(0, &pcm);
        g.d.kick(TXQ);
        g.wait_completions(TXQ, 1);
        let (_, samples) = listen(&g.screen, &mut cursor);
        assert_eq!(samples, [0, 16_383, -32_767, 32_767, 0]);
        assert!(!g.needs_reset());
    }

    #[test]
    fn the_input_records_silence_at_the_real_rate() {
        let mut g = Guest::new();
        // U8 mono at 8 kHz: 10 ms periods of 80 bytes, silence is 0x80.
        g.open(1, 80, 1, FMT_U8, RATE_8000, false);
        let xfers: Vec<Xfer> = (0..3).map(|_| g.post_rx(1, 80)).collect();
        g.d.kick(RXQ);
        assert!(g.d.completions(RXQ, Duration::from_millis(20)).is_empty(), "nothing recorded before START");
        let started = Instant::now();
        assert_eq!(g.pcm(R_PCM_START, 1), S_OK);
        let done = g.wait_completions(RXQ, 3);
        assert!(started.elapsed() >= Duration::from_millis(28), "30 ms recorded in {:?}", started.elapsed());
        assert_eq!(done, xfers.iter().map(|x| (x.head, 88)).collect::<Vec<_>>(), "in order, full");
        for x in &xfers {
            let mut b = [0u8; 80];
            g.d.mem.read_slice(&mut b, GuestAddress(x.data)).unwrap();
            assert!(b.iter().all(|&v| v == 0x80));
            assert_eq!(g.status(*x).0, S_OK);
        }
        assert_eq!(g.stats.recorded_frames.load(Ordering::Relaxed), 240);
        assert_eq!(g.screen.audio().format(), None, "the input plays nothing");

        // S16: silence is zeros.
        assert_eq!(g.pcm(R_PCM_STOP, 1), S_OK);
        assert_eq!(g.pcm(R_PCM_RELEASE, 1), S_OK);
        g.open(1, 64, 2, FMT_S16, RATE_48000, true);
        let x = g.post_rx(1, 64);
        g.d.kick(RXQ);
        assert_eq!(g.wait_completions(RXQ, 1), [(x.head, 72)]);
        let mut b = [0xFFu8; 64];
        g.d.mem.read_slice(&mut b, GuestAddress(x.data)).unwrap();
        assert_eq!(b, [0; 64]);
        assert!(!g.needs_reset());
    }

    #[test]
    fn transfers_for_wrong_or_idle_streams_are_refused() {
        let mut g = Guest::new();
        // Not configured: IO_ERR at once.
        let x = g.post_tx(0, &[0; 64]);
        g.d.kick(TXQ);
        assert_eq!(g.wait_completions(TXQ, 1), [(x.head, 8)]);
        assert_eq!(g.status(x).0, S_IO_ERR);
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        // A stream that does not exist, the input stream on the tx queue, the output on the rx queue.
        let bad = [g.post_tx(7, &[0; 64]), g.post_tx(1, &[0; 64])];
        g.d.kick(TXQ);
        let rx = g.post_rx(0, 64);
        g.d.kick(RXQ);
        g.wait_completions(TXQ, 2);
        g.wait_completions(RXQ, 1);
        for x in bad.iter().chain([&rx]) {
            assert_eq!(g.status(*x).0, S_BAD_MSG);
        }
        assert_eq!(g.screen.audio().played_frames(), 0);
        assert_eq!(g.stats.refused_transfers.load(Ordering::Relaxed), 4);

        // Buffers held when the stream is released come back unplayed.
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_OK);
        let held = [g.post_tx(0, &[0; 64]), g.post_tx(0, &[0; 64])];
        g.d.kick(TXQ);
        assert!(g.d.completions(TXQ, Duration::from_millis(20)).is_empty());
        assert_eq!(g.pcm(R_PCM_RELEASE, 0), S_OK);
        assert_eq!(g.d.completions(TXQ, Duration::ZERO).len(), 2, "completed before the RELEASE was");
        for x in held {
            assert_eq!(g.status(x).0, S_IO_ERR);
        }
        assert!(!g.needs_reset());
        assert_eq!(g.stats.malformed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn malformed_chains_break_only_this_device_until_it_is_reset() {
        let mut g = Guest::new();
        let mut malformed = 0;
        let mut expect_reset = |g: &mut Guest, what: &str| {
            malformed += 1;
            let deadline = Instant::now() + WAIT;
            while g.stats.malformed.load(Ordering::Relaxed) < malformed {
                assert!(Instant::now() < deadline, "{what} is malformed");
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(g.needs_reset(), "{what}: NEEDS_RESET");
            g.reinit();
            assert!(!g.needs_reset());
        };
        let header = SLOTS;
        g.d.mem.write_slice(&0u32.to_le_bytes(), GuestAddress(header)).unwrap();
        // A transfer without its status.
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        g.chain(TXQ, &[(header, 4, false), (header + 16, 64, false)]);
        g.d.kick(TXQ);
        expect_reset(&mut g, "a transfer without status");
        assert_eq!(g.screen.audio().format(), None, "the stream stopped");
        // A header cut short.
        g.chain(TXQ, &[(header, 2, false), (header + 16, 8, true)]);
        g.d.kick(TXQ);
        expect_reset(&mut g, "a short header");
        // Readable PCM after the status.
        g.chain(TXQ, &[(header, 4, false), (header + 16, 8, true), (header + 32, 64, false)]);
        g.d.kick(TXQ);
        expect_reset(&mut g, "readable after writable");
        // An input buffer with room for 4 bytes of status.
        g.chain(RXQ, &[(header, 4, false), (header + 16, 4, true)]);
        g.d.kick(RXQ);
        expect_reset(&mut g, "a short input status");
        // A control request without room for its status.
        g.chain(CONTROLQ, &[(REQUEST, 8, false)]);
        g.d.kick(CONTROLQ);
        expect_reset(&mut g, "a control request without response");
        // PCM outside guest memory.
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        g.chain(TXQ, &[(header, 4, false), (RAM as u64 - 16, 64, false), (header + 16, 8, true)]);
        g.d.kick(TXQ);
        expect_reset(&mut g, "PCM outside memory");
        // One buffer published more times than the ring has entries, to a stream that holds them.
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, false);
        let head = g.chain(TXQ, &[(header, 4, false), (header + 16, 64, false), (header + 0x100, 8, true)]);
        for _ in 1..QUEUE_SIZE {
            g.d.push_avail(TXQ, head);
        }
        g.d.kick(TXQ);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!g.needs_reset(), "a ring's worth is held");
        g.d.push_avail(TXQ, head);
        g.d.kick(TXQ);
        expect_reset(&mut g, "a buffer held twice");

        // And after a reset the device works again.
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        let x = g.post_tx(0, &s16_bytes(&tone(0, 480)));
        g.d.kick(TXQ);
        g.wait_completions(TXQ, 1);
        assert_eq!(g.status(x).0, S_OK);
    }

    #[test]
    fn stop_ends_the_sound_and_a_reset_stops_the_stream() {
        let mut g = Guest::new();
        let mut cursor = AudioCursor::default();
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        assert_eq!(listen(&g.screen, &mut cursor).0, [AudioEvent::Begin(S16_STEREO_48K)]);
        assert_eq!(g.pcm(R_PCM_STOP, 0), S_OK);
        assert_eq!(listen(&g.screen, &mut cursor).0, [AudioEvent::End]);
        assert_eq!(g.pcm(R_PCM_START, 0), S_OK);
        assert_eq!(listen(&g.screen, &mut cursor).0, [AudioEvent::Begin(S16_STEREO_48K)]);
        // A buffer in flight when the driver resets the device is forgotten with it.
        g.post_tx(0, &s16_bytes(&tone(0, 4800)));
        g.d.kick(TXQ);
        std::thread::sleep(Duration::from_millis(10));
        g.reinit();
        assert_eq!(listen(&g.screen, &mut cursor).0, [AudioEvent::End]);
        assert_eq!(g.screen.audio().format(), None);
        assert_eq!(g.pcm(R_PCM_START, 0), S_BAD_MSG, "the reset forgot the stream");
        std::thread::sleep(Duration::from_millis(100));
        assert!(g.d.completions(TXQ, Duration::ZERO).is_empty());
        assert_eq!(g.screen.audio().format(), None);
    }

    /// A saved device, loaded into a new one on the same memory and a new screen, goes on where it was:
    /// the stream plays on and the buffers it held come back.
    #[test]
    fn the_streams_and_their_buffers_survive_a_machine_state() {
        use crate::pci::PciDevice;
        let mut g = Guest::new();
        g.open(0, PERIOD_48K, 2, FMT_S16, RATE_48000, true);
        g.open(1, 64, 1, FMT_U8, RATE_8000, false);
        let xfers: Vec<Xfer> = (0..10).map(|i| g.post_tx(0, &s16_bytes(&tone(i * 480, 480)))).collect();
        g.d.kick(TXQ);
        let mut done = g.wait_completions(TXQ, 2);
        let mut w = crate::snapshot::Writer::new();
        // Saved quiesced: the old device completes nothing more.
        g.d.device.save_state(&mut w).unwrap();

        let screen = Screen::new();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let device = VirtioSound::new(screen.clone(), interrupt.clone()).unwrap();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(device, 0xC000_0000, 16, interrupt, g.d.mem.clone(), None, None)
                .unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        fresh.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        g.d.device = fresh;
        assert_eq!(screen.audio().format(), Some(S16_STEREO_48K), "the stream plays on");
        let left = 10 - done.len();
        done.extend(g.wait_completions(TXQ, left));
        let heads: Vec<u16> = done.iter().map(|d| d.0).collect();
        assert_eq!(heads, xfers.iter().map(|x| x.head).collect::<Vec<_>>());
        assert!(xfers.iter().all(|x| g.status(*x).0 == S_OK));
        assert!(screen.audio().played_frames() > 0);
        // The input stream was restored prepared.
        assert_eq!(g.pcm(R_PCM_START, 1), S_OK);

        // A damaged state is refused.
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let device = VirtioSound::new(Screen::new(), interrupt.clone()).unwrap();
        let mut other =
            crate::virtio::pci::VirtioPci::new(device, 0xC000_0000, 16, interrupt, g.d.mem.clone(), None, None)
                .unwrap();
        assert!(other.restore_state(&mut crate::snapshot::Reader::new("pci", &w.buf[..w.buf.len() - 3])).is_err());
    }
}
