//! An Intel High Definition Audio controller (HD Audio spec 1.0a, §3) as a PCI function: 8086:293e (ICH9
//! HD Audio), class 0x0403, one 16 KiB memory BAR, INTA#. Four input and four output stream descriptors,
//! the CORB/RIRB command rings and the immediate command registers, the DMA position buffer, and one codec
//! at address 0 (see [`super::hda_codec`]), so that guests without virtio-sound (Linux's `snd_hda_intel`
//! with `snd_hda_codec_generic`, Windows' inbox driver) have a sound card.
//!
//! Streams run in real time: RUN starts a clock, and a stream's position (LPIB, and its entry in the
//! position buffer) advances as its frames' time passes, wrapping at CBL; the BDL is read when the stream
//! starts. Crossing the end of a buffer descriptor with IOC sets BCIS. The output stream whose stream tag
//! the codec's DAC is bound to is heard: its frames are converted to interleaved i16 (the DAC's amplifier
//! applied) and handed to the console ([`Screen::audio_push`]) as their time comes, in pieces of about
//! [`PUSH_MS`]. Input streams record silence at the same pace. A thread per device does the pacing,
//! waking when the next piece or the next IOC is due; register accesses (on vCPU threads) take the same
//! lock and bring the streams up to date first where it matters (LPIB reads, stream register writes).
//!
//! The interrupt is a [`VirtioInterrupt`] used as a plain INTx line: raised while INTSTS has an enabled
//! bit set and GIE is on, cleared (its ISR byte) when that ends; at the guest's EOI the event loop's
//! `resample` raises it again while still pending.
//!
//! The guest is not trusted: BDLs are at most 256 entries, read once at RUN and checked (entry lengths,
//! their sum against CBL, the memory they name); a bad one sets DESE and stops the stream, a format that
//! does not exist sets FIFOE and stops it. A CORB in unmapped memory sets CMEI and stops the CORB. Work
//! per wake-up is bounded (at most [`MAX_CATCH_UP_MS`] of frames; the thread sleeps at least 1 ms).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::PciDevice;
use super::config::{COMMAND_INTX_DISABLE, COMMAND_MEMORY, PciConfig, PciId};
use super::hda_codec::{HdaCodec, LineCodec};
use crate::audio::AudioFormat;
use crate::devices::bus::lock;
use crate::display::Screen;
use crate::snapshot::{Reader, StateError, Writer};
use crate::virtio::VirtioInterrupt;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x4000;
pub const INPUT_STREAMS: usize = 4;
pub const OUTPUT_STREAMS: usize = 4;
pub const STREAMS: usize = INPUT_STREAMS + OUTPUT_STREAMS;
/// Sound reaches the console in pieces of this many milliseconds.
pub const PUSH_MS: u64 = 10;
/// The most a stream catches up at once after its thread was held up; the rest of the delay is dropped.
pub const MAX_CATCH_UP_MS: u64 = 100;
/// The thread sleeps at least this long between wake-ups (bounds the work a guest's tiny buffers cause).
const MIN_SLEEP: Duration = Duration::from_millis(1);

// Global registers (offsets in BAR 0).
pub const GCAP: u64 = 0x00;
pub const VMIN: u64 = 0x02;
pub const VMAJ: u64 = 0x03;
pub const OUTPAY: u64 = 0x04;
pub const INPAY: u64 = 0x06;
pub const GCTL: u64 = 0x08;
pub const WAKEEN: u64 = 0x0C;
pub const STATESTS: u64 = 0x0E;
pub const GSTS: u64 = 0x10;
pub const INTCTL: u64 = 0x20;
pub const INTSTS: u64 = 0x24;
pub const WALCLK: u64 = 0x30;
/// SSYNC, where ICH-era controllers have it (Linux uses this one for 8086:293e), and where the spec has it.
pub const OLD_SSYNC: u64 = 0x34;
pub const SSYNC: u64 = 0x38;
pub const CORBLBASE: u64 = 0x40;
pub const CORBUBASE: u64 = 0x44;
pub const CORBWP: u64 = 0x48;
pub const CORBRP: u64 = 0x4A;
pub const CORBCTL: u64 = 0x4C;
pub const CORBSTS: u64 = 0x4D;
pub const CORBSIZE: u64 = 0x4E;
pub const RIRBLBASE: u64 = 0x50;
pub const RIRBUBASE: u64 = 0x54;
pub const RIRBWP: u64 = 0x58;
pub const RINTCNT: u64 = 0x5A;
pub const RIRBCTL: u64 = 0x5C;
pub const RIRBSTS: u64 = 0x5D;
pub const RIRBSIZE: u64 = 0x5E;
pub const ICOI: u64 = 0x60;
pub const ICII: u64 = 0x64;
pub const ICIS: u64 = 0x68;
pub const DPLBASE: u64 = 0x70;
pub const DPUBASE: u64 = 0x74;
/// Stream descriptor n's registers start at SD_BASE + n * SD_STRIDE (inputs first, then outputs).
pub const SD_BASE: u64 = 0x80;
pub const SD_STRIDE: u64 = 0x20;
pub const SD_CTL: u64 = 0x00;
pub const SD_STS: u64 = 0x03;
pub const SD_LPIB: u64 = 0x04;
pub const SD_CBL: u64 = 0x08;
pub const SD_LVI: u64 = 0x0C;
pub const SD_FIFOW: u64 = 0x0E;
pub const SD_FIFOS: u64 = 0x10;
pub const SD_FMT: u64 = 0x12;
pub const SD_BDPL: u64 = 0x18;
pub const SD_BDPU: u64 = 0x1C;
/// Aliases of WALCLK and of each stream's LPIB.
pub const ALIAS_BASE: u64 = 0x2000;

// Register bits.
pub const GCTL_CRST: u32 = 1 << 0;
pub const GCTL_FCNTRL: u32 = 1 << 1;
pub const GCTL_UNSOL: u32 = 1 << 8;
pub const GSTS_FSTS: u32 = 1 << 1;
pub const INT_CIE: u32 = 1 << 30;
pub const INT_GIE: u32 = 1 << 31;
pub const INTSTS_CIS: u32 = 1 << 30;
pub const INTSTS_GIS: u32 = 1 << 31;
const STREAM_BITS: u32 = (1 << STREAMS) - 1;
pub const CORBRP_RST: u32 = 1 << 15;
pub const CORBCTL_CMEIE: u8 = 1 << 0;
pub const CORBCTL_RUN: u8 = 1 << 1;
pub const CORBSTS_CMEI: u8 = 1 << 0;
/// 256 entries, the only size offered (capability bits 7..4, size bits 1..0).
const RING_SIZE_REG: u32 = 0x42;
pub const RIRBWP_RST: u32 = 1 << 15;
pub const RIRBCTL_RINTCTL: u8 = 1 << 0;
pub const RIRBCTL_DMAEN: u8 = 1 << 1;
pub const RIRBCTL_OIC: u8 = 1 << 2;
pub const RIRBSTS_RINTFL: u8 = 1 << 0;
pub const RIRBSTS_RIRBOIS: u8 = 1 << 2;
pub const ICIS_ICB: u32 = 1 << 0;
pub const ICIS_IRV: u32 = 1 << 1;
pub const DPLBASE_ENABLE: u32 = 1 << 0;
pub const SD_CTL_SRST: u32 = 1 << 0;
pub const SD_CTL_RUN: u32 = 1 << 1;
pub const SD_CTL_IOCE: u32 = 1 << 2;
pub const SD_CTL_FEIE: u32 = 1 << 3;
pub const SD_CTL_DEIE: u32 = 1 << 4;
/// Interrupt enables, stripe, traffic priority, direction and stream number (bits 23..20).
const SD_CTL_WRITABLE: u32 = 0x00FF_001F;
pub const SD_STS_BCIS: u8 = 1 << 2;
pub const SD_STS_FIFOE: u8 = 1 << 3;
pub const SD_STS_DESE: u8 = 1 << 4;
pub const SD_STS_FIFORDY: u8 = 1 << 5;
/// The most buffer descriptors a list has (LVI is 8 bits).
pub const MAX_BDL_ENTRIES: usize = 256;
const BDL_ENTRY: usize = 16;
/// What FIFOS reads (the FIFO size minus one, in bytes).
const FIFO_SIZE_REG: u32 = 0xFF;

/// The registers of BAR 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Gcap,
    Vmin,
    Vmaj,
    Outpay,
    Inpay,
    Gctl,
    Wakeen,
    Statests,
    Gsts,
    Intctl,
    Intsts,
    Walclk,
    Ssync,
    CorbLbase,
    CorbUbase,
    CorbWp,
    CorbRp,
    CorbCtl,
    CorbSts,
    CorbSize,
    RirbLbase,
    RirbUbase,
    RirbWp,
    RintCnt,
    RirbCtl,
    RirbSts,
    RirbSize,
    Icoi,
    Icii,
    Icis,
    DplBase,
    DpuBase,
    Sd(usize, SdReg),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SdReg {
    Ctl,
    Sts,
    Lpib,
    Cbl,
    Lvi,
    Fifow,
    Fifos,
    Fmt,
    Bdpl,
    Bdpu,
}

const GLOBAL_REGS: [(u64, u64, Reg); 34] = [
    (GCAP, 2, Reg::Gcap),
    (VMIN, 1, Reg::Vmin),
    (VMAJ, 1, Reg::Vmaj),
    (OUTPAY, 2, Reg::Outpay),
    (INPAY, 2, Reg::Inpay),
    (GCTL, 4, Reg::Gctl),
    (WAKEEN, 2, Reg::Wakeen),
    (STATESTS, 2, Reg::Statests),
    (GSTS, 2, Reg::Gsts),
    (INTCTL, 4, Reg::Intctl),
    (INTSTS, 4, Reg::Intsts),
    (WALCLK, 4, Reg::Walclk),
    (OLD_SSYNC, 4, Reg::Ssync),
    (SSYNC, 4, Reg::Ssync),
    (CORBLBASE, 4, Reg::CorbLbase),
    (CORBUBASE, 4, Reg::CorbUbase),
    (CORBWP, 2, Reg::CorbWp),
    (CORBRP, 2, Reg::CorbRp),
    (CORBCTL, 1, Reg::CorbCtl),
    (CORBSTS, 1, Reg::CorbSts),
    (CORBSIZE, 1, Reg::CorbSize),
    (RIRBLBASE, 4, Reg::RirbLbase),
    (RIRBUBASE, 4, Reg::RirbUbase),
    (RIRBWP, 2, Reg::RirbWp),
    (RINTCNT, 2, Reg::RintCnt),
    (RIRBCTL, 1, Reg::RirbCtl),
    (RIRBSTS, 1, Reg::RirbSts),
    (RIRBSIZE, 1, Reg::RirbSize),
    (ICOI, 4, Reg::Icoi),
    (ICII, 4, Reg::Icii),
    (ICIS, 2, Reg::Icis),
    (DPLBASE, 4, Reg::DplBase),
    (DPUBASE, 4, Reg::DpuBase),
    (ALIAS_BASE + WALCLK, 4, Reg::Walclk),
];

const SD_REGS: [(u64, u64, SdReg); 10] = [
    (SD_CTL, 3, SdReg::Ctl),
    (SD_STS, 1, SdReg::Sts),
    (SD_LPIB, 4, SdReg::Lpib),
    (SD_CBL, 4, SdReg::Cbl),
    (SD_LVI, 2, SdReg::Lvi),
    (SD_FIFOW, 2, SdReg::Fifow),
    (SD_FIFOS, 2, SdReg::Fifos),
    (SD_FMT, 2, SdReg::Fmt),
    (SD_BDPL, 4, SdReg::Bdpl),
    (SD_BDPU, 4, SdReg::Bdpu),
];

/// The register holding byte `offset` of the BAR, with where it starts and its size.
fn decode(offset: u64) -> Option<(Reg, u64, u64)> {
    let sd_end = SD_BASE + STREAMS as u64 * SD_STRIDE;
    if (SD_BASE..sd_end).contains(&offset) {
        let (n, local) = ((offset - SD_BASE) / SD_STRIDE, (offset - SD_BASE) % SD_STRIDE);
        let (start, size, r) = SD_REGS.iter().find(|(s, len, _)| (*s..s + len).contains(&local))?;
        return Some((Reg::Sd(n as usize, *r), SD_BASE + n * SD_STRIDE + start, *size));
    }
    let lpib_aliases = ALIAS_BASE + SD_BASE..ALIAS_BASE + sd_end;
    if lpib_aliases.contains(&offset) {
        let (n, local) = ((offset - ALIAS_BASE - SD_BASE) / SD_STRIDE, (offset - ALIAS_BASE - SD_BASE) % SD_STRIDE);
        return (SD_LPIB..SD_LPIB + 4)
            .contains(&local)
            .then(|| (Reg::Sd(n as usize, SdReg::Lpib), ALIAS_BASE + SD_BASE + n * SD_STRIDE + SD_LPIB, 4));
    }
    GLOBAL_REGS.iter().find(|(s, len, _)| (*s..s + len).contains(&offset)).map(|&(s, len, r)| (r, s, len))
}

/// A stream's sample format, from SDnFMT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Format {
    /// Frames per second: `num / den` (the base rate times the multiple, over the divisor).
    num: u32,
    den: u32,
    /// Bytes a sample takes: 1 (8 bits), 2 (16) or 4 (20, 24 and 32 bits, MSB-aligned).
    container: u8,
    channels: u8,
}

impl Format {
    /// None for what SDnFMT cannot say: non-PCM, a reserved multiple or sample size.
    fn decode(fmt: u16) -> Option<Format> {
        if fmt & 0x8000 != 0 {
            return None;
        }
        let base = if fmt & 0x4000 != 0 { 44_100 } else { 48_000 };
        let mult = u32::from((fmt >> 11) & 0x7);
        let div = u32::from((fmt >> 8) & 0x7) + 1;
        let container = match (fmt >> 4) & 0x7 {
            0 => 1,
            1 => 2,
            2..=4 => 4,
            _ => return None,
        };
        (mult <= 3).then_some(Format { num: base * (mult + 1), den: div, container, channels: (fmt & 0xF) as u8 + 1 })
    }

    fn frame_bytes(&self) -> u64 {
        u64::from(self.container) * u64::from(self.channels)
    }

    /// Frames whose time has passed `elapsed` after frame 0.
    fn frames_in(&self, elapsed: Duration) -> u64 {
        let frames = elapsed.as_nanos() * u128::from(self.num) / (u128::from(self.den) * 1_000_000_000);
        u64::try_from(frames).unwrap_or(u64::MAX)
    }

    /// When frame `frames` is due, after frame 0.
    fn time_of(&self, frames: u64) -> Duration {
        let nanos = (u128::from(frames) * u128::from(self.den) * 1_000_000_000).div_ceil(u128::from(self.num));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX / 2))
    }

    /// What the console gets: the rate, and at most the channels it takes (the first ones).
    fn audio(&self) -> AudioFormat {
        AudioFormat {
            rate: (self.num + self.den / 2) / self.den,
            channels: self.channels.min(crate::audio::MAX_CHANNELS),
        }
    }

    /// Appends the console's samples for whole `frames` (interleaved i16 of [`audio`](Self::audio)'s
    /// channels), each scaled by the gain of its side (even channels left, odd right; 65536: unchanged).
    fn convert(&self, bytes: &[u8], gain: [u32; 2], out: &mut Vec<i16>) {
        let container = usize::from(self.container);
        let kept = usize::from(self.audio().channels);
        for frame in bytes.chunks_exact(self.frame_bytes() as usize) {
            for (c, s) in frame.chunks_exact(container).take(kept).enumerate() {
                let v: i64 = match s {
                    [b] => i64::from((b ^ 0x80) as i8) << 8,
                    [a, b] => i64::from(i16::from_le_bytes([*a, *b])),
                    [a, b, c, d] => i64::from(i32::from_le_bytes([*a, *b, *c, *d]) >> 16),
                    _ => 0,
                };
                let scaled = (v * i64::from(gain[c % 2])) >> 16;
                out.push(scaled.clamp(i16::MIN.into(), i16::MAX.into()) as i16);
            }
        }
    }
}

/// A buffer descriptor list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bde {
    addr: u64,
    len: u32,
    ioc: bool,
}

/// A running stream's clock: when frame 0 (of this clock) was due, and the frames moved since.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base: Instant,
    frames: u64,
}

/// A stream that RUNs: its BDL as read at RUN, where its DMA stands, its format and clock.
#[derive(Debug, Clone)]
struct Run {
    entries: Vec<Bde>,
    entry: usize,
    /// Bytes of the current entry done.
    offset: u32,
    /// Bytes of the buffer done (LPIB).
    pos: u32,
    format: Format,
    /// None while SSYNC holds the stream.
    clock: Option<Clock>,
}

impl Run {
    /// Bytes from the position to the end of the next entry with IOC, if one has it.
    fn bytes_to_ioc(&self) -> Option<u64> {
        let mut bytes = 0u64;
        for k in 0..self.entries.len() {
            let i = (self.entry + k) % self.entries.len();
            let e = self.entries[i];
            bytes += u64::from(e.len) - if k == 0 { u64::from(self.offset) } else { 0 };
            if e.ioc {
                return Some(bytes);
            }
        }
        None
    }

    /// When something is next due: the next piece for the console or the next IOC.
    fn deadline(&self) -> Option<Instant> {
        let clock = self.clock?;
        let fb = self.format.frame_bytes();
        let piece = self.format.frames_in(Duration::from_millis(PUSH_MS)).max(1);
        let mut frames = piece;
        if let Some(bytes) = self.bytes_to_ioc() {
            frames = frames.min(bytes.div_ceil(fb).max(1));
        }
        Some(clock.base + self.format.time_of(clock.frames + frames))
    }
}

/// What a stream's bytes do as its position moves.
enum Transfer<'a> {
    /// Read them (the heard output stream).
    Play(&'a mut Vec<u8>),
    /// Write this byte over them (input streams record silence).
    Record(u8),
    /// Nothing (an output stream no one hears).
    Skip,
}

/// Moves `run` on by `bytes`, wrapping at the end of the list; whether an entry with IOC was finished.
/// Err: guest memory the descriptors name could not be read or written.
fn walk(run: &mut Run, mem: &GuestMemoryMmap, mut bytes: u64, mut transfer: Transfer) -> Result<bool, ()> {
    let mut ioc = false;
    let fill = [match transfer {
        Transfer::Record(b) => b,
        _ => 0,
    }; 4096];
    while bytes > 0 {
        let e = run.entries[run.entry];
        let take = (u64::from(e.len - run.offset)).min(bytes) as u32;
        let addr = e.addr.checked_add(u64::from(run.offset)).ok_or(())?;
        match &mut transfer {
            Transfer::Play(buf) => {
                let start = buf.len();
                buf.resize(start + take as usize, 0);
                mem.read_slice(&mut buf[start..], GuestAddress(addr)).map_err(|_| ())?;
            }
            Transfer::Record(_) => {
                let mut done = 0u64;
                while done < u64::from(take) {
                    let n = (u64::from(take) - done).min(fill.len() as u64);
                    mem.write_slice(&fill[..n as usize], GuestAddress(addr + done)).map_err(|_| ())?;
                    done += n;
                }
            }
            Transfer::Skip => {}
        }
        run.offset += take;
        run.pos += take;
        bytes -= u64::from(take);
        if run.offset == e.len {
            ioc |= e.ioc;
            run.offset = 0;
            run.entry += 1;
            if run.entry == run.entries.len() {
                run.entry = 0;
                run.pos = 0;
            }
        }
    }
    Ok(ioc)
}

/// One stream descriptor.
#[derive(Debug, Clone, Default)]
struct Stream {
    ctl: u32,
    sts: u8,
    lpib: u32,
    cbl: u32,
    lvi: u16,
    fifow: u16,
    fmt: u16,
    bdpl: u32,
    bdpu: u32,
    run: Option<Run>,
}

impl Stream {
    fn tag(&self) -> u8 {
        ((self.ctl >> 20) & 0xF) as u8
    }

    fn bdl_address(&self) -> u64 {
        (u64::from(self.bdpu) << 32) | u64::from(self.bdpl & !0x7F)
    }

    /// Whether the stream asks for an interrupt (its SIS bit).
    fn interrupting(&self) -> bool {
        (self.sts & SD_STS_BCIS != 0 && self.ctl & SD_CTL_IOCE != 0)
            || (self.sts & SD_STS_FIFOE != 0 && self.ctl & SD_CTL_FEIE != 0)
            || (self.sts & SD_STS_DESE != 0 && self.ctl & SD_CTL_DEIE != 0)
    }

    /// Reads and checks the BDL for RUN. Err: the status bit that says why not (DESE, FIFOE).
    fn prepare(&self, mem: &GuestMemoryMmap) -> Result<(Vec<Bde>, Format), u8> {
        let format = Format::decode(self.fmt).ok_or(SD_STS_FIFOE)?;
        if self.cbl == 0 {
            return Err(SD_STS_DESE);
        }
        let count = usize::from(self.lvi) + 1;
        let mut raw = vec![0u8; count * BDL_ENTRY];
        mem.read_slice(&mut raw, GuestAddress(self.bdl_address())).map_err(|_| SD_STS_DESE)?;
        let mut entries = Vec::with_capacity(count);
        let mut total = 0u64;
        for e in raw.chunks_exact(BDL_ENTRY) {
            let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            let bde =
                Bde { addr: (u64::from(word(4)) << 32) | u64::from(word(0)), len: word(8), ioc: word(12) & 1 != 0 };
            if bde.len == 0 || !GuestMemoryBackend::check_range(mem, GuestAddress(bde.addr), bde.len as usize) {
                return Err(SD_STS_DESE);
            }
            total += u64::from(bde.len);
            entries.push(bde);
        }
        if total != u64::from(self.cbl) {
            return Err(SD_STS_DESE);
        }
        Ok((entries, format))
    }

    /// A run of `entries` from byte `pos` of the buffer (0 when not inside it).
    fn run_from(entries: Vec<Bde>, format: Format, pos: u32, clock: Option<Clock>) -> Run {
        let mut run = Run { entries, entry: 0, offset: 0, pos: 0, format, clock };
        let mut left = pos;
        for (i, e) in run.entries.iter().enumerate() {
            if left < e.len {
                (run.entry, run.offset, run.pos) = (i, left, pos);
                break;
            }
            left -= e.len;
        }
        run
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Corb {
    lbase: u32,
    ubase: u32,
    wp: u8,
    rp: u8,
    /// CORBRP's reset bit, as the driver's handshake reads it.
    rp_reset: bool,
    ctl: u8,
    sts: u8,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rirb {
    lbase: u32,
    ubase: u32,
    wp: u8,
    rintcnt: u16,
    ctl: u8,
    sts: u8,
    /// Responses written since RINTFL was last set.
    count: u16,
}

fn ring_address(upper: u32, lower: u32) -> u64 {
    (u64::from(upper) << 32) | u64::from(lower & !0x7F)
}

/// The controller's state, shared by the vCPU threads (register accesses) and the device's thread.
struct State {
    screen: Arc<Screen>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemoryMmap,
    codec: Box<dyn HdaCodec>,
    gctl: u32,
    wakeen: u16,
    statests: u16,
    gsts: u16,
    intctl: u32,
    ssync: u32,
    corb: Corb,
    rirb: Rirb,
    icoi: u32,
    icii: u32,
    icis: u16,
    dplbase: u32,
    dpubase: u32,
    streams: [Stream; STREAMS],
    /// WALCLK: `wall_offset` plus 24 MHz ticks since `wall_base`.
    wall_base: Instant,
    wall_offset: u32,
    /// The output stream the console hears now, and the format it was started with.
    audible: Option<(usize, AudioFormat)>,
    /// Whether the interrupt is raised now (mirrors the ISR byte of `interrupt`).
    irq_level: bool,
    /// The PCI command register's INTx disable.
    intx_disabled: bool,
    /// Between a machine-state save and the VM going on: the streams stand still (nothing touches guest
    /// memory or the console).
    quiesced: bool,
    /// While the VM is paused the streams and the wall clock stand still, as the guest does (a cyclic
    /// buffer played on would repeat its last second for as long as the pause lasts).
    held: bool,
}

impl State {
    fn running(&self) -> bool {
        self.gctl & GCTL_CRST != 0
    }

    fn walclk(&self, now: Instant) -> u32 {
        if self.held {
            return self.wall_offset;
        }
        let ticks = now.saturating_duration_since(self.wall_base).as_nanos() * 24 / 1000;
        self.wall_offset.wrapping_add(ticks as u32)
    }

    /// Everything but WAKEEN and STATESTS (which a controller reset leaves alone) back to reset values;
    /// the streams stop, the codec is reset.
    fn controller_reset(&mut self) {
        self.gctl = 0;
        self.gsts = 0;
        self.intctl = 0;
        self.ssync = 0;
        self.corb = Corb::default();
        self.rirb = Rirb::default();
        self.icoi = 0;
        self.icii = 0;
        self.icis = 0;
        self.dplbase = 0;
        self.dpubase = 0;
        self.streams = Default::default();
        self.codec.reset();
    }

    /// INTSTS: a bit per stream asking for an interrupt, CIS, and GIS when an enabled one is set.
    fn intsts(&self) -> u32 {
        let mut v = 0;
        for (i, s) in self.streams.iter().enumerate() {
            if s.interrupting() {
                v |= 1 << i;
            }
        }
        let cis = (self.rirb.sts & RIRBSTS_RINTFL != 0 && self.rirb.ctl & RIRBCTL_RINTCTL != 0)
            || (self.rirb.sts & RIRBSTS_RIRBOIS != 0 && self.rirb.ctl & RIRBCTL_OIC != 0)
            || (self.corb.sts & CORBSTS_CMEI != 0 && self.corb.ctl & CORBCTL_CMEIE != 0)
            || self.statests & self.wakeen & 0x7FFF != 0;
        if cis {
            v |= INTSTS_CIS;
        }
        if v & self.intctl & (STREAM_BITS | INT_CIE) != 0 {
            v |= INTSTS_GIS;
        }
        v
    }

    /// Raises or clears the interrupt to match INTSTS and GIE.
    fn update_irq(&mut self) {
        let level = !self.intx_disabled && self.intctl & INT_GIE != 0 && self.intsts() & INTSTS_GIS != 0;
        if level && !self.irq_level {
            self.interrupt.signal_queue(0);
        } else if !level && self.irq_level {
            self.interrupt.read_isr();
        }
        self.irq_level = level;
    }

    /// Starts or stops the console's stream to follow which output stream the codec's DAC hears.
    fn sync_audio(&mut self) {
        let desired = (INPUT_STREAMS..STREAMS).find_map(|i| {
            let s = &self.streams[i];
            let run = s.run.as_ref()?;
            run.clock?;
            self.codec.binding(true, s.tag())?;
            Some((i, run.format.audio()))
        });
        if desired == self.audible {
            return;
        }
        match desired {
            Some((_, format)) => {
                self.screen.audio_start(format);
            }
            None => self.screen.audio_stop(),
        }
        self.audible = desired;
    }

    /// After any change: the console's stream and the interrupt follow.
    fn finish(&mut self) {
        self.sync_audio();
        self.update_irq();
    }

    fn write_position(&self, i: usize) {
        if self.dplbase & DPLBASE_ENABLE == 0 {
            return;
        }
        let base = ring_address(self.dpubase, self.dplbase);
        if let Some(addr) = base.checked_add(i as u64 * 8) {
            // A position buffer outside guest memory is not written.
            let _ = self.mem.write_slice(&self.streams[i].lpib.to_le_bytes(), GuestAddress(addr));
        }
    }

    /// Moves every running stream to `now`: positions, IOC, the console's samples, silence recorded.
    fn advance(&mut self, now: Instant) {
        if !self.running() || self.quiesced || self.held {
            return;
        }
        for i in 0..STREAMS {
            let heard = self.audible.is_some_and(|(a, _)| a == i);
            let gain = if heard { self.codec.binding(true, self.streams[i].tag()).map(|b| b.gain) } else { None };
            let s = &mut self.streams[i];
            let Some(run) = s.run.as_mut() else { continue };
            let Some(clock) = run.clock.as_mut() else { continue };
            let format = run.format;
            let mut due = format.frames_in(now.saturating_duration_since(clock.base));
            let most = format.frames_in(Duration::from_millis(MAX_CATCH_UP_MS)).max(1);
            if due > clock.frames + most {
                // Held up (the host was busy): the delay beyond the catch-up is dropped.
                clock.frames = due - most;
            }
            due = due.max(clock.frames);
            let frames = due - clock.frames;
            if frames == 0 {
                continue;
            }
            clock.frames = due;
            let bytes = frames * format.frame_bytes();
            let mut data = Vec::new();
            let transfer = if i < INPUT_STREAMS {
                Transfer::Record(if format.container == 1 { 0x80 } else { 0 })
            } else if gain.is_some() {
                data.reserve(bytes as usize);
                Transfer::Play(&mut data)
            } else {
                Transfer::Skip
            };
            match walk(run, &self.mem, bytes, transfer) {
                Ok(ioc) => {
                    s.lpib = run.pos;
                    if ioc {
                        s.sts |= SD_STS_BCIS;
                    }
                }
                Err(()) => {
                    s.sts |= SD_STS_DESE;
                    s.ctl &= !SD_CTL_RUN;
                    s.run = None;
                    continue;
                }
            }
            self.write_position(i);
            if let Some(gain) = gain {
                let mut samples = Vec::with_capacity(data.len() / usize::from(format.container));
                format.convert(&data, gain, &mut samples);
                self.screen.audio_push(&samples);
            }
        }
    }

    /// The running streams' clocks start over at `now`: they go on from where they stood.
    fn restart_clocks(&mut self, now: Instant) {
        for s in &mut self.streams {
            if let Some(clock) = s.run.as_mut().and_then(|r| r.clock.as_mut()) {
                *clock = Clock { base: now, frames: 0 };
            }
        }
    }

    /// When the thread has something to do next.
    fn deadline(&self) -> Option<Instant> {
        if !self.running() || self.quiesced || self.held {
            return None;
        }
        self.streams.iter().filter_map(|s| s.run.as_ref()?.deadline()).min()
    }

    /// A codec command (codec address 0 only); its response, if one comes.
    fn command(&mut self, cmd: u32) -> Option<u32> {
        (cmd >> 28 == 0).then(|| self.codec.command(((cmd >> 20) & 0xFF) as u8, cmd & 0xF_FFFF))
    }

    /// Sends the commands the driver put in the CORB to the codec and their responses to the RIRB.
    fn process_corb(&mut self) {
        if self.corb.ctl & CORBCTL_RUN == 0 || self.corb.rp_reset || self.rirb.ctl & RIRBCTL_DMAEN == 0 {
            return;
        }
        let corb = ring_address(self.corb.ubase, self.corb.lbase);
        let mut written = false;
        while self.corb.rp != self.corb.wp {
            let next = self.corb.rp.wrapping_add(1);
            let mut word = [0u8; 4];
            let read = corb
                .checked_add(u64::from(next) * 4)
                .is_some_and(|a| self.mem.read_slice(&mut word, GuestAddress(a)).is_ok());
            if !read {
                self.corb.sts |= CORBSTS_CMEI;
                self.corb.ctl &= !CORBCTL_RUN;
                break;
            }
            self.corb.rp = next;
            if let Some(response) = self.command(u32::from_le_bytes(word)) {
                self.rirb.wp = self.rirb.wp.wrapping_add(1);
                let rirb = ring_address(self.rirb.ubase, self.rirb.lbase);
                let mut entry = [0u8; 8];
                entry[..4].copy_from_slice(&response.to_le_bytes());
                // The extended response: codec address 0, solicited.
                if let Some(a) = rirb.checked_add(u64::from(self.rirb.wp) * 8) {
                    let _ = self.mem.write_slice(&entry, GuestAddress(a));
                }
                written = true;
                self.rirb.count += 1;
                let n = if self.rirb.rintcnt & 0xFF == 0 { 256 } else { self.rirb.rintcnt & 0xFF };
                if self.rirb.count >= n {
                    self.rirb.sts |= RIRBSTS_RINTFL;
                    self.rirb.count = 0;
                }
            }
        }
        // No more commands: the responses written so far are announced.
        if written && self.rirb.count > 0 {
            self.rirb.sts |= RIRBSTS_RINTFL;
            self.rirb.count = 0;
        }
    }

    /// SSYNC holds the streams whose bits are set; a running stream released starts its clock now.
    fn set_ssync(&mut self, ssync: u32, now: Instant) {
        self.ssync = ssync & STREAM_BITS;
        for (i, s) in self.streams.iter_mut().enumerate() {
            let held = self.ssync & (1 << i) != 0;
            if let Some(run) = s.run.as_mut() {
                match (held, run.clock.is_some()) {
                    (true, true) => run.clock = None,
                    (false, false) => run.clock = Some(Clock { base: now, frames: 0 }),
                    _ => {}
                }
            }
        }
    }

    fn start_stream(&mut self, i: usize, now: Instant) {
        let held = self.ssync & (1 << i) != 0;
        let s = &mut self.streams[i];
        match s.prepare(&self.mem) {
            Ok((entries, format)) => {
                let pos = if s.lpib < s.cbl { s.lpib } else { 0 };
                let clock = (!held).then_some(Clock { base: now, frames: 0 });
                let run = Stream::run_from(entries, format, pos, clock);
                s.lpib = run.pos;
                s.run = Some(run);
                self.write_position(i);
            }
            Err(bit) => {
                s.sts |= bit;
                s.ctl &= !SD_CTL_RUN;
            }
        }
    }

    fn read(&self, reg: Reg, now: Instant) -> u32 {
        let c = &self.corb;
        let r = &self.rirb;
        match reg {
            Reg::Gcap => ((OUTPUT_STREAMS as u32) << 12) | ((INPUT_STREAMS as u32) << 8) | 1,
            Reg::Vmin => 0,
            Reg::Vmaj => 1,
            Reg::Outpay => 0x3C,
            Reg::Inpay => 0x1D,
            Reg::Gctl => self.gctl,
            Reg::Wakeen => u32::from(self.wakeen),
            Reg::Statests => u32::from(self.statests),
            Reg::Gsts => u32::from(self.gsts),
            Reg::Intctl => self.intctl,
            Reg::Intsts => self.intsts(),
            Reg::Walclk => self.walclk(now),
            Reg::Ssync => self.ssync,
            Reg::CorbLbase => c.lbase,
            Reg::CorbUbase => c.ubase,
            Reg::CorbWp => u32::from(c.wp),
            Reg::CorbRp => u32::from(c.rp) | if c.rp_reset { CORBRP_RST } else { 0 },
            Reg::CorbCtl => u32::from(c.ctl),
            Reg::CorbSts => u32::from(c.sts),
            Reg::CorbSize | Reg::RirbSize => RING_SIZE_REG,
            Reg::RirbLbase => r.lbase,
            Reg::RirbUbase => r.ubase,
            Reg::RirbWp => u32::from(r.wp),
            Reg::RintCnt => u32::from(r.rintcnt),
            Reg::RirbCtl => u32::from(r.ctl),
            Reg::RirbSts => u32::from(r.sts),
            Reg::Icoi => self.icoi,
            Reg::Icii => self.icii,
            Reg::Icis => u32::from(self.icis),
            Reg::DplBase => self.dplbase,
            Reg::DpuBase => self.dpubase,
            Reg::Sd(n, sd) => {
                let s = &self.streams[n];
                match sd {
                    SdReg::Ctl => s.ctl,
                    SdReg::Sts => {
                        let ready = if s.ctl & SD_CTL_SRST == 0 && self.running() { SD_STS_FIFORDY } else { 0 };
                        u32::from(s.sts | ready)
                    }
                    SdReg::Lpib => s.lpib,
                    SdReg::Cbl => s.cbl,
                    SdReg::Lvi => u32::from(s.lvi),
                    SdReg::Fifow => u32::from(s.fifow),
                    SdReg::Fifos => FIFO_SIZE_REG,
                    SdReg::Fmt => u32::from(s.fmt),
                    SdReg::Bdpl => s.bdpl,
                    SdReg::Bdpu => s.bdpu,
                }
            }
        }
    }

    /// A write of the `mask` bits of `value` (both in the register's own bit positions).
    fn write(&mut self, reg: Reg, value: u32, mask: u32, now: Instant) {
        let merge = |old: u32| (old & !mask) | (value & mask);
        let ones = value & mask;
        if !self.running() && !matches!(reg, Reg::Gctl | Reg::Wakeen | Reg::Statests) {
            return; // in reset, only GCTL (and the resume-well registers) take writes
        }
        match reg {
            Reg::Gctl => {
                let new = merge(self.gctl);
                if new & GCTL_CRST == 0 {
                    if self.running() {
                        self.controller_reset();
                    }
                    return;
                }
                if !self.running() {
                    // Leaving reset: codec 0 asks for its state change to be seen.
                    self.statests |= 1;
                }
                if new & GCTL_FCNTRL != 0 {
                    self.gsts |= GSTS_FSTS as u16; // nothing to flush: done at once
                }
                self.gctl = new & (GCTL_CRST | GCTL_UNSOL);
            }
            Reg::Wakeen => self.wakeen = (merge(u32::from(self.wakeen)) & 0x7FFF) as u16,
            Reg::Statests => self.statests &= !(ones as u16),
            Reg::Gsts => self.gsts &= !((ones & GSTS_FSTS) as u16),
            Reg::Intctl => self.intctl = merge(self.intctl) & (INT_GIE | INT_CIE | STREAM_BITS),
            Reg::Ssync => self.set_ssync(merge(self.ssync), now),
            Reg::CorbLbase => self.corb.lbase = merge(self.corb.lbase) & !0x7F,
            Reg::CorbUbase => self.corb.ubase = merge(self.corb.ubase),
            Reg::CorbWp => {
                self.corb.wp = merge(u32::from(self.corb.wp)) as u8;
                self.process_corb();
            }
            Reg::CorbRp => {
                if mask & CORBRP_RST != 0 {
                    self.corb.rp_reset = value & CORBRP_RST != 0;
                    if self.corb.rp_reset {
                        self.corb.rp = 0;
                    }
                    self.process_corb();
                }
            }
            Reg::CorbCtl => {
                self.corb.ctl = (merge(u32::from(self.corb.ctl)) & 0x3) as u8;
                self.process_corb();
            }
            Reg::CorbSts => self.corb.sts &= !((ones as u8) & CORBSTS_CMEI),
            Reg::RirbLbase => self.rirb.lbase = merge(self.rirb.lbase) & !0x7F,
            Reg::RirbUbase => self.rirb.ubase = merge(self.rirb.ubase),
            Reg::RirbWp => {
                if ones & RIRBWP_RST != 0 {
                    self.rirb.wp = 0;
                    self.rirb.count = 0;
                }
            }
            Reg::RintCnt => self.rirb.rintcnt = (merge(u32::from(self.rirb.rintcnt)) & 0xFF) as u16,
            Reg::RirbCtl => {
                self.rirb.ctl = (merge(u32::from(self.rirb.ctl)) & 0x7) as u8;
                self.process_corb();
            }
            Reg::RirbSts => self.rirb.sts &= !((ones as u8) & (RIRBSTS_RINTFL | RIRBSTS_RIRBOIS)),
            Reg::Icoi => self.icoi = merge(self.icoi),
            Reg::Icis => {
                if ones & ICIS_IRV != 0 {
                    self.icis &= !(ICIS_IRV as u16);
                }
                if ones & ICIS_ICB != 0 {
                    // The command goes out and its response (if any) is back at once; IRRADD is 0.
                    if let Some(response) = self.command(self.icoi) {
                        self.icii = response;
                        self.icis = (self.icis | ICIS_IRV as u16) & !0xF0;
                    }
                }
            }
            Reg::DplBase => {
                self.dplbase = merge(self.dplbase) & !0x7E;
                for i in 0..STREAMS {
                    self.write_position(i);
                }
            }
            Reg::DpuBase => self.dpubase = merge(self.dpubase),
            Reg::Sd(n, sd) => self.write_stream(n, sd, value, mask, now),
            Reg::Gcap
            | Reg::Vmin
            | Reg::Vmaj
            | Reg::Outpay
            | Reg::Inpay
            | Reg::Intsts
            | Reg::Walclk
            | Reg::CorbSize
            | Reg::RirbSize
            | Reg::Icii => {}
        }
    }

    fn write_stream(&mut self, n: usize, sd: SdReg, value: u32, mask: u32, now: Instant) {
        let merge = |old: u32| (old & !mask) | (value & mask);
        let s = &mut self.streams[n];
        match sd {
            SdReg::Ctl => {
                let old = s.ctl;
                let new = merge(old) & SD_CTL_WRITABLE;
                if new & SD_CTL_SRST != 0 {
                    // In reset: every register back to its default, the stream stopped.
                    *s = Stream { ctl: SD_CTL_SRST, ..Stream::default() };
                    self.write_position(n);
                    return;
                }
                s.ctl = new;
                if new & SD_CTL_RUN != 0 && old & SD_CTL_RUN == 0 {
                    self.start_stream(n, now);
                } else if new & SD_CTL_RUN == 0 {
                    s.run = None;
                }
            }
            SdReg::Sts => s.sts &= !((value & mask) as u8 & (SD_STS_BCIS | SD_STS_FIFOE | SD_STS_DESE)),
            SdReg::Cbl => s.cbl = merge(s.cbl),
            SdReg::Lvi => s.lvi = (merge(u32::from(s.lvi)) & 0xFF) as u16,
            SdReg::Fifow => s.fifow = (merge(u32::from(s.fifow)) & 0x7) as u16,
            SdReg::Fmt => {
                s.fmt = (merge(u32::from(s.fmt)) & 0xFF7F) as u16;
                // A format changed under a running stream (the spec forbids it): it goes on in the new
                // format from where it is, or stops if there is no such format.
                let format = Format::decode(s.fmt);
                if let Some(run) = s.run.as_mut()
                    && Some(run.format) != format
                {
                    match format {
                        Some(f) => {
                            run.format = f;
                            run.clock = run.clock.map(|_| Clock { base: now, frames: 0 });
                        }
                        None => {
                            s.sts |= SD_STS_FIFOE;
                            s.ctl &= !SD_CTL_RUN;
                            s.run = None;
                        }
                    }
                }
            }
            SdReg::Bdpl => s.bdpl = merge(s.bdpl) & !0x7F,
            SdReg::Bdpu => s.bdpu = merge(s.bdpu),
            SdReg::Lpib | SdReg::Fifos => {}
        }
    }
}

/// The device's side shared with its thread.
struct Shared {
    state: Mutex<State>,
    /// Wakes the thread: a stream started, stopped or changed; shutdown.
    wake: Condvar,
    shutdown: AtomicBool,
}

impl crate::vcpu::HoldsWhilePaused for Shared {
    /// The VM paused (`true`) or went on: the streams and the wall clock stop where they are, or go on.
    fn hold(&self, paused: bool) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if state.held == paused {
            return;
        }
        if paused {
            state.advance(now);
            state.finish();
            state.wall_offset = state.walclk(now);
            state.held = true;
        } else {
            state.held = false;
            state.wall_base = now;
            state.restart_clocks(now);
        }
        drop(state);
        self.wake.notify_one();
    }
}

impl Shared {
    fn thread(&self) {
        let mut state = lock(&self.state);
        while !self.shutdown.load(Ordering::Acquire) {
            let now = Instant::now();
            state.advance(now);
            state.finish();
            let deadline = state.deadline().map(|d| d.max(now + MIN_SLEEP));
            state = match deadline {
                None => self.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    self.wake.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }
}

/// One access split at register boundaries: the register (None: no register there), the first byte of
/// it accessed, where in the access it starts and how many bytes.
fn split(offset: u64, len: usize, mut each: impl FnMut(Option<Reg>, usize, usize, usize)) {
    let mut i = 0;
    while i < len {
        let at = offset.saturating_add(i as u64);
        match decode(at) {
            Some((reg, start, size)) => {
                let first = (at - start) as usize;
                let n = (size as usize - first).min(len - i);
                each(Some(reg), first, i, n);
                i += n;
            }
            None => {
                each(None, 0, i, 1);
                i += 1;
            }
        }
    }
}

/// The HD Audio controller with its codec.
pub struct Hda {
    config: PciConfig,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Hda {
    /// A controller with [`LineCodec`] at codec address 0, BAR 0 at `bar`, INTA# on `gsi` raised through
    /// `interrupt` (register its `line()` and `resample_fd()` as an irqfd with resample on `gsi`, and have
    /// the event loop call its `resample()`); its sound goes to `screen`'s listeners. Starts the device's
    /// (idle) thread, which inherits the caller's seccomp filter.
    pub fn new(
        screen: Arc<Screen>,
        mem: GuestMemoryMmap,
        bar: u64,
        gsi: u8,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        Self::with_codec(screen, mem, bar, gsi, interrupt, Box::new(LineCodec::new()))
    }

    /// The same with another codec.
    pub fn with_codec(
        screen: Arc<Screen>,
        mem: GuestMemoryMmap,
        bar: u64,
        gsi: u8,
        interrupt: Arc<VirtioInterrupt>,
        codec: Box<dyn HdaCodec>,
    ) -> std::io::Result<Self> {
        let mut config = PciConfig::new(PciId {
            vendor: 0x8086,
            device: 0x293E,
            revision: 3,
            class: 0x04_03_00,
            subsystem_vendor: 0x1AF4,
            subsystem: 0x1100,
        });
        config.add_memory_bar(0, BAR_SIZE, bar);
        // Memory decoding on, as firmware leaves a device whose BAR it placed.
        config.write(1, 0, &[COMMAND_MEMORY as u8]);
        config.set_interrupt(gsi);
        let state = State {
            screen,
            interrupt,
            mem,
            codec,
            gctl: 0,
            wakeen: 0,
            statests: 0,
            gsts: 0,
            intctl: 0,
            ssync: 0,
            corb: Corb::default(),
            rirb: Rirb::default(),
            icoi: 0,
            icii: 0,
            icis: 0,
            dplbase: 0,
            dpubase: 0,
            streams: Default::default(),
            wall_base: Instant::now(),
            wall_offset: 0,
            audible: None,
            irq_level: false,
            intx_disabled: false,
            quiesced: false,
            held: false,
        };
        let shared =
            Arc::new(Shared { state: Mutex::new(state), wake: Condvar::new(), shutdown: AtomicBool::new(false) });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("hda".into()).spawn(move || s.thread())?;
        Ok(Hda { config, shared, thread: Some(thread) })
    }

    /// Holds the streams and the wall clock while `run`'s VM is paused.
    pub fn follow_pauses(&self, run: &crate::vcpu::RunControl) {
        run.hold_while_paused(&self.shared);
    }
}

const SAVE_VERSION: u8 = 1;

impl PciDevice for Hda {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        let disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
        let mut state = lock(&self.shared.state);
        state.intx_disabled = disabled;
        state.update_irq();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        let mut advanced = false;
        split(offset, data.len(), |reg, first, at, n| {
            let Some(reg) = reg else { return };
            if matches!(reg, Reg::Sd(_, SdReg::Lpib)) && !advanced {
                // The position the driver reads is the one of this moment.
                state.advance(now);
                advanced = true;
            }
            let bytes = state.read(reg, now).to_le_bytes();
            data[at..at + n].copy_from_slice(&bytes[first..first + n]);
        });
        if advanced {
            state.finish();
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        let mut wake = false;
        split(offset, data.len(), |reg, first, at, n| {
            let Some(reg) = reg else { return };
            if matches!(reg, Reg::Sd(..) | Reg::Ssync | Reg::Gctl) {
                // Streams are brought up to this moment before they change.
                state.advance(now);
                wake = true;
            }
            let mut value = 0u32;
            let mut mask = 0u32;
            for (k, b) in data[at..at + n].iter().enumerate() {
                let shift = 8 * (first + k);
                value |= u32::from(*b) << shift;
                mask |= 0xFF << shift;
            }
            state.write(reg, value, mask, now);
        });
        state.finish();
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// The configuration space, the registers, the rings' pointers, the streams (a running one with its
    /// BDL and place in it) and the codec's settings. The streams then stand still until
    /// [`resume_after_save`](PciDevice::resume_after_save).
    fn save_state(&mut self, w: &mut Writer) -> Result<(), StateError> {
        self.config.save(w);
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        state.advance(now);
        state.finish();
        state.quiesced = true;
        let s = &*state;
        w.u8(SAVE_VERSION);
        w.u32(s.gctl);
        w.u16(s.wakeen);
        w.u16(s.statests);
        w.u16(s.gsts);
        w.u32(s.intctl);
        w.u32(s.ssync);
        let c = &s.corb;
        w.u32(c.lbase);
        w.u32(c.ubase);
        w.u8(c.wp);
        w.u8(c.rp);
        w.bool(c.rp_reset);
        w.u8(c.ctl);
        w.u8(c.sts);
        let r = &s.rirb;
        w.u32(r.lbase);
        w.u32(r.ubase);
        w.u8(r.wp);
        w.u16(r.rintcnt);
        w.u8(r.ctl);
        w.u8(r.sts);
        w.u16(r.count);
        w.u32(s.icoi);
        w.u32(s.icii);
        w.u16(s.icis);
        w.u32(s.dplbase);
        w.u32(s.dpubase);
        w.u32(s.walclk(now));
        s.codec.save(w);
        for st in &s.streams {
            w.u32(st.ctl);
            w.u8(st.sts);
            w.u32(st.lpib);
            w.u32(st.cbl);
            w.u16(st.lvi);
            w.u16(st.fifow);
            w.u16(st.fmt);
            w.u32(st.bdpl);
            w.u32(st.bdpu);
            w.bool(st.run.is_some());
            if let Some(run) = &st.run {
                w.bool(run.clock.is_none()); // held by SSYNC
                w.u32(run.pos);
                w.u16(run.entries.len() as u16);
                for e in &run.entries {
                    w.u64(e.addr);
                    w.u32(e.len);
                    w.bool(e.ioc);
                }
            }
        }
        Ok(())
    }

    /// The streams go on from where they stood (their clocks start over now).
    fn resume_after_save(&mut self) {
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        if !std::mem::take(&mut state.quiesced) {
            return;
        }
        state.restart_clocks(now);
        drop(state);
        self.shared.wake.notify_one();
    }

    fn restore_state(&mut self, r: &mut Reader) -> Result<(), StateError> {
        let damaged = |what: &str| StateError::Damaged(format!("an HD Audio controller with {what}"));
        self.config.restore(r)?;
        let version = r.u8()?;
        if version != SAVE_VERSION {
            return Err(damaged(&format!("state version {version}")));
        }
        let now = Instant::now();
        let (gctl, wakeen, statests, gsts, intctl, ssync) =
            (r.u32()?, r.u16()?, r.u16()?, r.u16()?, r.u32()?, r.u32()?);
        let corb = Corb {
            lbase: r.u32()? & !0x7F,
            ubase: r.u32()?,
            wp: r.u8()?,
            rp: r.u8()?,
            rp_reset: r.bool()?,
            ctl: r.u8()? & 0x3,
            sts: r.u8()? & CORBSTS_CMEI,
        };
        let rirb = Rirb {
            lbase: r.u32()? & !0x7F,
            ubase: r.u32()?,
            wp: r.u8()?,
            rintcnt: r.u16()? & 0xFF,
            ctl: r.u8()? & 0x7,
            sts: r.u8()? & (RIRBSTS_RINTFL | RIRBSTS_RIRBOIS),
            count: r.u16()?.min(256),
        };
        let (icoi, icii, icis, dplbase, dpubase, walclk) = (r.u32()?, r.u32()?, r.u16()?, r.u32()?, r.u32()?, r.u32()?);
        let mut codec_state = Writer::new();
        // The codec reads its own part; it is loaded into the device only once everything checked out.
        let mut state = lock(&self.shared.state);
        state.codec.save(&mut codec_state);
        if let Err(e) = state.codec.restore(r) {
            let mut back = Reader::new("hda", &codec_state.buf);
            let _ = state.codec.restore(&mut back);
            return Err(e);
        }
        let mut streams: [Stream; STREAMS] = Default::default();
        let result = (|| {
            for (i, st) in streams.iter_mut().enumerate() {
                st.ctl = r.u32()? & SD_CTL_WRITABLE;
                st.sts = r.u8()? & (SD_STS_BCIS | SD_STS_FIFOE | SD_STS_DESE);
                st.lpib = r.u32()?;
                st.cbl = r.u32()?;
                st.lvi = r.u16()? & 0xFF;
                st.fifow = r.u16()? & 0x7;
                st.fmt = r.u16()? & 0xFF7F;
                st.bdpl = r.u32()? & !0x7F;
                st.bdpu = r.u32()?;
                if r.bool()? {
                    let held = r.bool()?;
                    let pos = r.u32()?;
                    let count = usize::from(r.u16()?);
                    if count == 0 || count > MAX_BDL_ENTRIES {
                        return Err(damaged(&format!("a BDL of {count} entries")));
                    }
                    let mut entries = Vec::with_capacity(count);
                    let mut total = 0u64;
                    for _ in 0..count {
                        let e = Bde { addr: r.u64()?, len: r.u32()?, ioc: r.bool()? };
                        if e.len == 0 {
                            return Err(damaged("an empty buffer descriptor"));
                        }
                        total += u64::from(e.len);
                        entries.push(e);
                    }
                    let format =
                        Format::decode(st.fmt).ok_or_else(|| damaged("a stream format that does not exist"))?;
                    if total != u64::from(st.cbl) || pos >= st.cbl || st.ctl & SD_CTL_RUN == 0 {
                        return Err(damaged(&format!("stream {i} running in a damaged buffer")));
                    }
                    let clock = (!held).then_some(Clock { base: now, frames: 0 });
                    let run = Stream::run_from(entries, format, pos, clock);
                    st.lpib = run.pos;
                    st.run = Some(run);
                } else if st.ctl & SD_CTL_RUN != 0 && gctl & GCTL_CRST != 0 {
                    return Err(damaged(&format!("stream {i} RUN without its buffer")));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let mut back = Reader::new("hda", &codec_state.buf);
            let _ = state.codec.restore(&mut back);
            return Err(e);
        }
        let s = &mut *state;
        s.gctl = gctl & (GCTL_CRST | GCTL_UNSOL);
        s.wakeen = wakeen & 0x7FFF;
        s.statests = statests & 0x7FFF;
        s.gsts = gsts & GSTS_FSTS as u16;
        s.intctl = intctl & (INT_GIE | INT_CIE | STREAM_BITS);
        s.ssync = ssync & STREAM_BITS;
        s.corb = corb;
        s.rirb = rirb;
        s.icoi = icoi;
        s.icii = icii;
        s.icis = icis & (ICIS_IRV as u16);
        s.dplbase = dplbase & !0x7E;
        s.dpubase = dpubase;
        s.wall_base = now;
        s.wall_offset = walclk;
        s.streams = streams;
        s.intx_disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
        s.quiesced = false;
        // The console's stream starts over in the restored stream's format; the line follows INTSTS.
        if s.audible.take().is_some() {
            s.screen.audio_stop();
        }
        s.interrupt.read_isr();
        s.irq_level = false;
        s.finish();
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Drop for Hda {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.shared.state);
            if state.audible.take().is_some() {
                state.screen.audio_stop();
            }
            state.streams = Default::default();
            self.shared.shutdown.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::hda_codec::*;
    use super::*;
    use crate::audio::{AudioCursor, AudioEvent};

    const RAM: usize = 0x40_0000;
    const BAR: u64 = 0xC000_0000;
    /// Where the test's driver keeps its rings, position buffer, BDLs and sound.
    const CORB: u64 = 0x1000;
    const RIRB: u64 = 0x2000;
    const POSBUF: u64 = 0x3000;
    const BDL: u64 = 0x4000;
    const BUF: u64 = 0x1_0000;
    const WAIT: Duration = Duration::from_secs(5);
    /// 48 kHz, 16 bits, 2 channels.
    const S16_STEREO_48K: u16 = 0x0011;
    const OUT0: usize = INPUT_STREAMS;
    /// 25 ms of 48 kHz stereo S16.
    const ENTRY: u32 = 1200 * 4;

    struct Guest {
        hda: Hda,
        mem: GuestMemoryMmap,
        screen: Arc<Screen>,
        irq: Arc<VirtioInterrupt>,
    }

    fn sd(n: usize) -> u64 {
        SD_BASE + n as u64 * SD_STRIDE
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

    fn bytes(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    impl Guest {
        fn new() -> Guest {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            Guest::with(Screen::new(), mem)
        }

        fn with(screen: Arc<Screen>, mem: GuestMemoryMmap) -> Guest {
            let irq = Arc::new(VirtioInterrupt::new().unwrap());
            let hda = Hda::new(screen.clone(), mem.clone(), BAR, 20, irq.clone()).unwrap();
            Guest { hda, mem, screen, irq }
        }

        fn r(&mut self, offset: u64, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.hda.bar_read(0, offset, &mut b[..len]);
            u32::from_le_bytes(b)
        }
        fn r8(&mut self, offset: u64) -> u8 {
            self.r(offset, 1) as u8
        }
        fn r16(&mut self, offset: u64) -> u16 {
            self.r(offset, 2) as u16
        }
        fn r32(&mut self, offset: u64) -> u32 {
            self.r(offset, 4)
        }
        fn w(&mut self, offset: u64, len: usize, v: u32) {
            self.hda.bar_write(0, offset, &v.to_le_bytes()[..len]);
        }
        fn w8(&mut self, offset: u64, v: u8) {
            self.w(offset, 1, v.into());
        }
        fn w16(&mut self, offset: u64, v: u16) {
            self.w(offset, 2, v.into());
        }
        fn w32(&mut self, offset: u64, v: u32) {
            self.w(offset, 4, v);
        }

        /// A link reset and back, as a driver probes: codec 0 shows up in STATESTS.
        fn bring_up(&mut self) {
            self.w32(GCTL, 0);
            assert_eq!(self.r32(GCTL) & GCTL_CRST, 0);
            self.w32(GCTL, GCTL_CRST);
            assert_eq!(self.r32(GCTL) & GCTL_CRST, GCTL_CRST);
            assert_eq!(self.r16(STATESTS) & 1, 1, "codec 0 is present");
            self.w16(STATESTS, 0x7FFF);
        }

        /// The CORB and RIRB as Linux sets them up (with the CORBRP reset handshake).
        fn rings(&mut self) {
            self.w32(CORBLBASE, CORB as u32);
            self.w32(CORBUBASE, 0);
            self.w8(CORBSIZE, 2);
            assert_eq!(self.r8(CORBSIZE), 0x42, "256 entries, the only size");
            self.w16(CORBWP, 0);
            self.w16(CORBRP, CORBRP_RST as u16);
            assert_eq!(u32::from(self.r16(CORBRP)), CORBRP_RST);
            self.w16(CORBRP, 0);
            assert_eq!(self.r16(CORBRP), 0);
            self.w8(CORBCTL, CORBCTL_RUN);
            self.w32(RIRBLBASE, RIRB as u32);
            self.w32(RIRBUBASE, 0);
            self.w8(RIRBSIZE, 2);
            self.w16(RIRBWP, RIRBWP_RST as u16);
            self.w16(RINTCNT, 1);
            self.w8(RIRBCTL, RIRBCTL_DMAEN | RIRBCTL_RINTCTL);
        }

        fn rings_and<T>(&mut self, f: impl FnOnce(&mut Guest) -> T) -> T {
            self.rings();
            f(self)
        }

        /// Sends `cmd` through the CORB; the response from the RIRB, if one came.
        fn send(&mut self, cmd: u32) -> Option<u32> {
            let wp = (self.r16(CORBWP) as u8).wrapping_add(1);
            self.mem.write_obj(cmd, GuestAddress(CORB + u64::from(wp) * 4)).unwrap();
            let before = self.r16(RIRBWP) as u8;
            self.w16(CORBWP, wp.into());
            assert_eq!(self.r16(CORBRP) as u8, wp, "the command was taken");
            let after = self.r16(RIRBWP) as u8;
            if after == before {
                return None;
            }
            assert_eq!(after, before.wrapping_add(1));
            assert_ne!(self.r8(RIRBSTS) & RIRBSTS_RINTFL, 0);
            self.w8(RIRBSTS, RIRBSTS_RINTFL);
            let at = RIRB + u64::from(after) * 8;
            let extended: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            assert_eq!(extended, 0, "codec 0, solicited");
            Some(self.mem.read_obj(GuestAddress(at)).unwrap())
        }

        fn cmd(&mut self, nid: u8, verb: u32) -> u32 {
            self.send((u32::from(nid) << 20) | verb).expect("codec 0 answers")
        }
        fn verb(&mut self, nid: u8, verb: u32, payload: u8) -> u32 {
            self.cmd(nid, (verb << 8) | u32::from(payload))
        }
        fn verb4(&mut self, nid: u8, verb: u32, payload: u16) -> u32 {
            self.cmd(nid, (verb << 16) | u32::from(payload))
        }
        fn param(&mut self, nid: u8, param: u8) -> u32 {
            self.verb(nid, VERB_GET_PARAMETER, param)
        }

        /// Resets stream `n` (the SRST handshake) and sets it up: tag, format, a BDL at `bdl` of
        /// `entries` (address, length, IOC), CBL their sum.
        fn stream(&mut self, n: usize, tag: u8, fmt: u16, bdl: u64, entries: &[(u64, u32, bool)]) {
            for (i, &(addr, len, ioc)) in entries.iter().enumerate() {
                let at = bdl + i as u64 * 16;
                self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                self.mem.write_obj(u32::from(ioc), GuestAddress(at + 12)).unwrap();
            }
            let base = sd(n);
            self.w8(base + SD_CTL, SD_CTL_SRST as u8);
            assert_eq!(u32::from(self.r8(base + SD_CTL)) & SD_CTL_SRST, SD_CTL_SRST);
            self.w8(base + SD_CTL, 0);
            assert_eq!(u32::from(self.r8(base + SD_CTL)) & SD_CTL_SRST, 0);
            self.w32(base + SD_CTL, u32::from(tag) << 20);
            self.w32(base + SD_CBL, entries.iter().map(|e| e.1).sum());
            self.w16(base + SD_FMT, fmt);
            self.w16(base + SD_LVI, entries.len() as u16 - 1);
            self.w32(base + SD_BDPL, bdl as u32);
            self.w32(base + SD_BDPU, (bdl >> 32) as u32);
        }

        /// Sets RUN (and `bits`) on stream `n`, keeping its tag.
        fn run(&mut self, n: usize, bits: u32) {
            let ctl = self.r32(sd(n) + SD_CTL) & 0x00FF_FFFF;
            self.w32(sd(n) + SD_CTL, ctl | SD_CTL_RUN | bits);
        }

        fn stop(&mut self, n: usize) {
            let ctl = self.r32(sd(n) + SD_CTL) & 0x00FF_FFFF;
            self.w32(sd(n) + SD_CTL, ctl & !SD_CTL_RUN);
        }

        /// The first output stream on tag 1, bound to the DAC, playing `samples` (S16 stereo 48 kHz) from
        /// BUF in three entries of [`ENTRY`] bytes, IOC on the first one.
        fn tone_stream(&mut self, samples: &[i16]) {
            self.bring_up();
            self.rings();
            self.verb(NID_DAC, VERB_SET_STREAM_CHANNEL, 0x10);
            self.verb4(NID_DAC, VERB4_SET_FORMAT, S16_STEREO_48K);
            self.mem.write_slice(&bytes(samples), GuestAddress(BUF)).unwrap();
            let e = u64::from(ENTRY);
            self.stream(
                OUT0,
                1,
                S16_STEREO_48K,
                BDL,
                &[(BUF, ENTRY, true), (BUF + e, ENTRY, false), (BUF + 2 * e, ENTRY, false)],
            );
        }

        /// What a listener reads now: the events other than Data, and the samples.
        fn listen(&self, cursor: &mut AudioCursor) -> (Vec<AudioEvent>, Vec<i16>) {
            let (mut events, mut samples) = (Vec::new(), Vec::new());
            loop {
                match self.screen.audio().read(cursor, &mut samples, 1 << 20) {
                    AudioEvent::Idle => return (events, samples),
                    AudioEvent::Data => {}
                    e => events.push(e),
                }
            }
        }

        /// Listens until `frames` stereo frames came (or fails after WAIT).
        fn listen_for(&self, cursor: &mut AudioCursor, frames: usize) -> (Vec<AudioEvent>, Vec<i16>) {
            let deadline = Instant::now() + WAIT;
            let (mut events, mut samples) = (Vec::new(), Vec::new());
            while samples.len() < frames * 2 {
                assert!(Instant::now() < deadline, "{} of {frames} frames", samples.len() / 2);
                let (e, s) = self.listen(cursor);
                events.extend(e);
                samples.extend(s);
                std::thread::sleep(Duration::from_millis(2));
            }
            (events, samples)
        }

        fn line_raised(&self) -> bool {
            self.irq.line().read().is_ok()
        }

        /// The guest's EOI: KVM signals the resample fd and the event loop calls `resample`.
        fn eoi(&self) {
            self.irq.resample_fd().write(1).unwrap();
            self.irq.resample();
        }
    }

    #[test]
    fn identity_reset_handshake_and_statests() {
        let mut g = Guest::new();
        let c = g.hda.config();
        assert_eq!(c.read(0), 0x293E_8086);
        assert_eq!(c.read(2) >> 8, 0x04_03_00);
        assert_eq!(c.read(4), BAR as u32);
        assert_eq!(c.read(15) & 0xFFFF, 0x0114, "INTA# on the line given");
        assert_eq!(c.memory_bar(0), Some((BAR, BAR_SIZE)));
        // In reset: nothing but GCTL takes writes, and no codec has spoken.
        assert_eq!(g.r32(GCTL), 0);
        assert_eq!(g.r16(STATESTS), 0);
        g.w32(CORBLBASE, 0x1000);
        assert_eq!(g.r32(CORBLBASE), 0);
        assert_eq!(g.r16(GCAP), 0x4401, "4 output, 4 input streams, 64-bit addresses");
        assert_eq!((g.r8(VMAJ), g.r8(VMIN)), (1, 0));
        assert_eq!((g.r16(OUTPAY), g.r16(INPAY)), (0x3C, 0x1D));
        g.bring_up();
        assert_eq!(g.r16(STATESTS), 0, "cleared by writing ones");
        g.w32(CORBLBASE, 0x1234);
        assert_eq!(g.r32(CORBLBASE), 0x1200, "128-byte aligned");
        // Reset again: registers back to their defaults, the codec announces itself again.
        g.w32(INTCTL, INT_GIE | INT_CIE);
        g.bring_up();
        assert_eq!((g.r32(CORBLBASE), g.r32(INTCTL)), (0, 0));
        // The wall clock runs at 24 MHz.
        let t = Instant::now();
        let a = g.r32(WALCLK);
        std::thread::sleep(Duration::from_millis(5));
        let b = g.r32(ALIAS_BASE + WALCLK);
        assert!(b.wrapping_sub(a) >= 5 * 24_000, "{} ticks", b.wrapping_sub(a));
        assert!(u128::from(b.wrapping_sub(a)) <= (t.elapsed().as_nanos() * 24 / 1000) + 24, "not faster than 24 MHz");
        // Flush: done at once.
        g.w32(GCTL, GCTL_CRST | GCTL_FCNTRL);
        assert_eq!(u32::from(g.r16(GSTS)), GSTS_FSTS);
        g.w16(GSTS, GSTS_FSTS as u16);
        assert_eq!(g.r16(GSTS), 0);
    }

    #[test]
    fn corb_commands_reach_the_codec_and_responses_the_rirb() {
        let mut g = Guest::new();
        g.bring_up();
        g.rings();
        g.w32(INTCTL, INT_GIE | INT_CIE);
        assert_eq!(g.param(NID_ROOT, PARAM_VENDOR_ID), VENDOR_ID);
        // The response raised the interrupt (CIS); clearing RINTFL in `send` lowered it again.
        assert!(g.line_raised());
        assert_eq!(g.r32(INTSTS), 0);
        g.eoi();
        assert!(!g.line_raised());
        assert_eq!(g.param(NID_ROOT, PARAM_NODE_COUNT), 0x0001_0001);
        assert_eq!(g.param(NID_AFG, PARAM_NODE_COUNT), 0x0002_0004);
        assert_eq!(g.param(NID_AFG, PARAM_FUNCTION_TYPE) & 0xFF, 1);
        let caps: Vec<u32> = (2..=5).map(|n| g.param(n, PARAM_WIDGET_CAPS)).collect();
        assert_eq!(caps.iter().map(|c| (c >> 20) & 0xF).collect::<Vec<_>>(), [0, 1, 4, 4]);
        assert_ne!(caps[0] & (1 << 2), 0, "the DAC has an output amplifier");
        // Round trips: format, stream/channel, amplifier, pin control.
        g.verb4(NID_DAC, VERB4_SET_FORMAT, S16_STEREO_48K);
        assert_eq!(g.verb4(NID_DAC, VERB4_GET_FORMAT, 0), u32::from(S16_STEREO_48K));
        g.verb(NID_DAC, VERB_SET_STREAM_CHANNEL, 0x30);
        assert_eq!(g.verb(NID_DAC, VERB_GET_STREAM_CHANNEL, 0), 0x30);
        g.verb4(NID_DAC, VERB4_SET_AMP, 0xB000 | 0x80 | 40); // output, both sides: muted, step 40
        assert_eq!(g.verb4(NID_DAC, VERB4_GET_AMP, 0xA000), 0x80 | 40, "left");
        assert_eq!(g.verb4(NID_DAC, VERB4_GET_AMP, 0x8000), 0x80 | 40, "right");
        g.verb(NID_LINE_OUT, VERB_SET_PIN_CONTROL, 0x40);
        assert_eq!(g.verb(NID_LINE_OUT, VERB_GET_PIN_CONTROL, 0), 0x40);
        assert_eq!(g.verb(NID_LINE_OUT, VERB_GET_CONFIG_DEFAULT, 0), LINE_OUT_CONFIG);
        // Another codec address: taken, not answered.
        assert_eq!(g.send((1 << 28) | (VERB_GET_PARAMETER << 8)), None);
        // Several commands at once: all answered in order, one RINTFL.
        let wp = g.r16(CORBWP) as u8;
        for k in 1..=3u8 {
            let cmd = (u32::from(NID_ROOT) << 20) | (VERB_GET_PARAMETER << 8) | u32::from(PARAM_VENDOR_ID);
            g.mem.write_obj(cmd, GuestAddress(CORB + u64::from(wp.wrapping_add(k)) * 4)).unwrap();
        }
        let rp = g.r16(RIRBWP) as u8;
        g.w16(CORBWP, wp.wrapping_add(3).into());
        assert_eq!(g.r16(RIRBWP) as u8, rp.wrapping_add(3));
        for k in 1..=3u8 {
            let v: u32 = g.mem.read_obj(GuestAddress(RIRB + u64::from(rp.wrapping_add(k)) * 8)).unwrap();
            assert_eq!(v, VENDOR_ID);
        }
        // The immediate command interface.
        g.w32(ICOI, (u32::from(NID_AFG) << 20) | (VERB_GET_SUBSYSTEM_ID << 8));
        g.w16(ICIS, ICIS_ICB as u16);
        assert_eq!(u32::from(g.r16(ICIS)), ICIS_IRV, "not busy, result valid");
        assert_eq!(g.r32(ICII), SUBSYSTEM_ID);
        g.w16(ICIS, ICIS_IRV as u16);
        assert_eq!(g.r16(ICIS), 0);
        // A CORB in memory that is not there: CMEI, the CORB stops.
        g.w8(CORBCTL, 0);
        g.w32(CORBLBASE, 0xF000_0000);
        g.w8(CORBCTL, CORBCTL_RUN | CORBCTL_CMEIE);
        let wp = g.r16(CORBWP) as u8;
        g.w16(CORBWP, wp.wrapping_add(1).into());
        assert_eq!(g.r8(CORBSTS), CORBSTS_CMEI);
        assert_eq!(g.r8(CORBCTL) & CORBCTL_RUN, 0);
        assert_ne!(g.r32(INTSTS) & INTSTS_CIS, 0);
    }

    #[test]
    fn a_tone_plays_in_real_time_and_the_position_wraps() {
        let mut g = Guest::new();
        let samples = tone(0, 3 * 1200);
        g.tone_stream(&samples);
        g.w32(DPLBASE, POSBUF as u32 | DPLBASE_ENABLE);
        g.w32(INTCTL, INT_GIE | (1 << OUT0));
        let cbl = 3 * ENTRY;
        let mut cursor = AudioCursor::default();
        let t0 = Instant::now();
        g.run(OUT0, SD_CTL_IOCE);
        let (mut events, mut got) = (Vec::new(), Vec::new());
        let (mut total, mut last) = (0u64, 0u32);
        let mut first_bcis = None;
        let deadline = t0 + WAIT;
        while got.len() < 2 * 4200 {
            assert!(Instant::now() < deadline, "{} frames", got.len() / 2);
            let (e, s) = g.listen(&mut cursor);
            events.extend(e);
            got.extend(s);
            let lpib = g.r32(sd(OUT0) + SD_LPIB);
            let sts = g.r8(sd(OUT0) + SD_STS);
            let elapsed = t0.elapsed();
            let frames_due = elapsed.as_secs_f64() * 48_000.0;
            assert!((got.len() / 2) as f64 <= frames_due + 1.0, "{} frames after {elapsed:?}", got.len() / 2);
            // The position buffer has the position of the last step (the thread may have made one since).
            let posbuf: u32 = g.mem.read_obj(GuestAddress(POSBUF + OUT0 as u64 * 8)).unwrap();
            assert!((posbuf + cbl - lpib) % cbl < 48 * 4 * 50, "position buffer {posbuf}, LPIB {lpib}");
            assert!(lpib < cbl);
            if lpib < last {
                total += u64::from(cbl);
            }
            last = lpib;
            assert!((total + u64::from(lpib)) as f64 <= frames_due * 4.0 + 4.0, "position ahead of time");
            if sts & SD_STS_BCIS != 0 && first_bcis.is_none() {
                first_bcis = Some(elapsed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(events, [AudioEvent::Begin(AudioFormat { rate: 48_000, channels: 2 })]);
        assert_eq!(got[..samples.len()], samples[..], "the samples as the guest wrote them");
        assert_eq!(got[samples.len()..2 * 4200], samples[..2 * 600], "and again after the wrap");
        assert!(total >= u64::from(cbl), "LPIB wrapped at CBL");
        let first_bcis = first_bcis.expect("IOC of entry 0 set BCIS");
        assert!(first_bcis >= Duration::from_millis(25), "BCIS after {first_bcis:?}");
        // The interrupt: raised, raised again at EOI while pending, gone once BCIS is cleared.
        assert_eq!(g.r32(INTSTS), INTSTS_GIS | (1 << OUT0));
        assert!(g.line_raised());
        g.eoi();
        assert!(g.line_raised(), "still pending at EOI");
        g.stop(OUT0);
        let (events, _) = g.listen(&mut cursor);
        assert_eq!(events, [AudioEvent::End]);
        g.w8(sd(OUT0) + SD_STS, SD_STS_BCIS);
        assert_eq!(g.r8(sd(OUT0) + SD_STS) & SD_STS_BCIS, 0);
        assert_eq!(g.r32(INTSTS), 0);
        g.eoi();
        assert!(!g.line_raised(), "lowered");
        // Stopped, the position stays.
        let lpib = g.r32(sd(OUT0) + SD_LPIB);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.r32(sd(OUT0) + SD_LPIB), lpib);
    }

    #[test]
    fn the_amplifier_mutes_and_attenuates_and_only_the_dac_stream_is_heard() {
        let mut g = Guest::new();
        let samples = tone(0, 3 * 1200);
        g.tone_stream(&samples);
        // Muted through the mixer: silence, at the same pace.
        g.verb4(NID_DAC, VERB4_SET_AMP, 0xB000 | u16::from(AMP_MUTE) | u16::from(AMP_OFFSET));
        let mut cursor = AudioCursor::default();
        g.run(OUT0, 0);
        let (events, got) = g.listen_for(&mut cursor, 1200);
        assert_eq!(events.len(), 1);
        assert!(got.iter().all(|&s| s == 0), "muted");
        // 8 steps of 0.75 dB down: 6 dB, half the amplitude.
        g.verb4(NID_DAC, VERB4_SET_AMP, 0xB000 | u16::from(AMP_OFFSET - 8));
        let (_, _) = g.listen(&mut cursor);
        let (_, got) = g.listen_for(&mut cursor, 1200);
        let peak = got.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!((5_800..6_200).contains(&peak), "peak {peak}");
        // Another stream number on the DAC: the stream plays on, no one hears it.
        g.verb(NID_DAC, VERB_SET_STREAM_CHANNEL, 0x20);
        let (events, _) = g.listen(&mut cursor);
        assert_eq!(events, [AudioEvent::End]);
        let lpib = g.r32(sd(OUT0) + SD_LPIB);
        std::thread::sleep(Duration::from_millis(30));
        assert_ne!(g.r32(sd(OUT0) + SD_LPIB), lpib, "the position moves");
        assert_eq!(g.listen(&mut cursor), (vec![], vec![]));
        // Bound again: heard again.
        g.verb(NID_DAC, VERB_SET_STREAM_CHANNEL, 0x10);
        let (events, _) = g.listen_for(&mut cursor, 100);
        assert_eq!(events, [AudioEvent::Begin(AudioFormat { rate: 48_000, channels: 2 })]);
    }

    #[test]
    fn ssync_holds_a_started_stream_and_a_controller_reset_stops_it() {
        let mut g = Guest::new();
        g.tone_stream(&tone(0, 3600));
        let mut cursor = AudioCursor::default();
        // As Linux starts a stream: SSYNC set (at the ICH place), RUN, FIFORDY awaited, SSYNC cleared.
        g.w32(OLD_SSYNC, 1 << OUT0);
        assert_eq!(g.r32(SSYNC), 1 << OUT0, "one register, two places");
        g.run(OUT0, 0);
        assert_ne!(g.r8(sd(OUT0) + SD_STS) & SD_STS_FIFORDY, 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.r32(sd(OUT0) + SD_LPIB), 0, "held");
        assert_eq!(g.listen(&mut cursor), (vec![], vec![]));
        g.w32(OLD_SSYNC, 0);
        let (events, _) = g.listen_for(&mut cursor, 240);
        assert_eq!(events, [AudioEvent::Begin(AudioFormat { rate: 48_000, channels: 2 })]);
        assert_ne!(g.r32(sd(OUT0) + SD_LPIB), 0);
        // A controller reset stops everything: the console hears the end, the stream is idle.
        g.w32(GCTL, 0);
        let (events, _) = g.listen(&mut cursor);
        assert_eq!(events, [AudioEvent::End]);
        g.w32(GCTL, GCTL_CRST);
        assert_eq!(g.r32(sd(OUT0) + SD_CTL), u32::from(SD_STS_FIFORDY) << 24, "CTL 0; STS just FIFORDY");
        assert_eq!(g.r32(sd(OUT0) + SD_LPIB), 0);
        assert_eq!(g.rings_and(|g| g.verb(NID_DAC, VERB_GET_STREAM_CHANNEL, 0)), 0, "the codec was reset too");
    }

    #[test]
    fn an_input_stream_records_silence_in_real_time() {
        let mut g = Guest::new();
        g.bring_up();
        g.rings();
        g.verb(NID_ADC, VERB_SET_STREAM_CHANNEL, 0x20);
        let len = 960u32; // 5 ms
        g.mem.write_slice(&[0x55; 4 * 960], GuestAddress(BUF)).unwrap();
        g.stream(0, 2, S16_STEREO_48K, BDL, &[(BUF, len, true), (BUF + u64::from(len), len, true)]);
        let t0 = Instant::now();
        g.run(0, SD_CTL_IOCE);
        let deadline = t0 + WAIT;
        let (mut total, mut last) = (0u64, 0u32);
        while total < u64::from(2 * len) {
            assert!(Instant::now() < deadline);
            let lpib = g.r32(sd(0) + SD_LPIB);
            if lpib < last {
                total += u64::from(2 * len);
            }
            last = lpib;
            let bound = t0.elapsed().as_secs_f64() * 48_000.0 * 4.0 + 4.0;
            assert!((total + u64::from(lpib)) as f64 <= bound);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(t0.elapsed() >= Duration::from_millis(10));
        g.stop(0);
        let mut buf = [0xFFu8; 4 * 960];
        g.mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
        assert!(buf[..2 * len as usize].iter().all(|&b| b == 0), "the whole buffer was recorded over");
        assert!(buf[2 * len as usize..].iter().all(|&b| b == 0x55), "and nothing past it");
        assert_ne!(g.r8(sd(0) + SD_STS) & SD_STS_BCIS, 0);
        assert_eq!(g.listen(&mut AudioCursor::default()).0, [], "nothing to hear");
    }

    #[test]
    fn hostile_registers_and_dma_stop_the_stream_without_harm() {
        let mut g = Guest::new();
        g.tone_stream(&tone(0, 3600));
        let base = sd(OUT0);
        let start_fails = |g: &mut Guest, why: u8| {
            g.w32(INTCTL, INT_GIE | (1 << OUT0));
            g.run(OUT0, SD_CTL_DEIE | SD_CTL_FEIE);
            assert_eq!(u32::from(g.r8(base + SD_CTL)) & SD_CTL_RUN, 0, "RUN cleared");
            assert_eq!(g.r8(base + SD_STS) & why, why);
            assert_ne!(g.r32(INTSTS) & INTSTS_GIS, 0);
            g.w8(base + SD_STS, 0x1C);
            assert_eq!(g.r32(INTSTS), 0);
        };
        // LVI beyond 255 is 255, and the list then reaches past what the driver wrote: CBL differs.
        g.w16(base + SD_LVI, 0xFFFF);
        assert_eq!(g.r16(base + SD_LVI), 255);
        start_fails(&mut g, SD_STS_DESE);
        g.w16(base + SD_LVI, 2);
        // A BDL where there is no memory.
        g.w32(base + SD_BDPU, 0x10);
        start_fails(&mut g, SD_STS_DESE);
        g.w32(base + SD_BDPU, 0);
        // CBL 0, and a CBL that is not the entries' sum.
        g.w32(base + SD_CBL, 0);
        start_fails(&mut g, SD_STS_DESE);
        g.w32(base + SD_CBL, 3 * ENTRY + 4);
        start_fails(&mut g, SD_STS_DESE);
        g.w32(base + SD_CBL, 3 * ENTRY);
        // An entry pointing outside memory, and an empty entry.
        g.mem.write_obj(0xFFFF_FFFF_0000u64, GuestAddress(BDL + 16)).unwrap();
        start_fails(&mut g, SD_STS_DESE);
        g.mem.write_obj(BUF + u64::from(ENTRY), GuestAddress(BDL + 16)).unwrap();
        g.mem.write_obj(0u32, GuestAddress(BDL + 16 + 8)).unwrap();
        start_fails(&mut g, SD_STS_DESE);
        g.mem.write_obj(ENTRY, GuestAddress(BDL + 16 + 8)).unwrap();
        // Formats that do not exist: a reserved multiple, a reserved sample size, non-PCM.
        g.w16(base + SD_FMT, 0x8011);
        start_fails(&mut g, SD_STS_FIFOE);
        for fmt in [0xFFFF, 0x3811, 0x0051, 0x0071] {
            g.w16(base + SD_FMT, fmt);
            start_fails(&mut g, SD_STS_FIFOE);
        }
        // Every format that exists plays, whatever its rate and channels (16 channels: the console gets 8).
        g.w32(DPLBASE, 0xFFFF_FF80 | DPLBASE_ENABLE); // a position buffer outside memory: not written
        g.w32(DPUBASE, 0xFFFF_FFFF);
        for fmt in [0x0000u16, 0x4000 | (3 << 11) | 0x4F, 0x0700 | 0x2F, 0x0011] {
            g.w16(base + SD_FMT, fmt);
            g.run(OUT0, 0);
            assert_ne!(u32::from(g.r8(base + SD_CTL)) & SD_CTL_RUN, 0, "{fmt:#x} runs");
            std::thread::sleep(Duration::from_millis(3));
            let _ = g.r32(base + SD_LPIB);
            g.stop(OUT0);
        }
        // Anything anywhere in the BAR, in every size, running or not: no panic, no hang.
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        g.run(OUT0, 0);
        for _ in 0..20_000 {
            let offset = u64::from(next()) % (BAR_SIZE + 16);
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            let value = [0u32, u32::MAX, next()][(next() % 3) as usize];
            let mut data = [0u8; 8];
            data[..4].copy_from_slice(&value.to_le_bytes());
            data[4..].copy_from_slice(&next().to_le_bytes());
            if next() % 2 == 0 {
                g.hda.bar_write(0, offset, &data[..len]);
            } else {
                g.hda.bar_read(0, offset, &mut data[..len]);
            }
        }
        g.hda.bar_write(1, 0, &[0xFF]);
        let mut b = [0u8; 4];
        g.hda.bar_read(1, 0, &mut b);
        assert_eq!(b, [0; 4]);
        std::thread::sleep(Duration::from_millis(20));
        // And the device still works.
        g.bring_up();
        g.rings();
        assert_eq!(g.param(NID_ROOT, PARAM_VENDOR_ID), VENDOR_ID);
    }

    #[test]
    fn a_paused_vm_holds_the_streams_and_the_wall_clock() {
        let mut g = Guest::new();
        let run = crate::vcpu::RunControl::default();
        g.hda.follow_pauses(&run);
        // A ramp, so each sample says which frame it is.
        let ramp: Vec<i16> = (0..3600).flat_map(|i| [i as i16, -(i as i16)]).collect();
        g.tone_stream(&ramp);
        let mut cursor = AudioCursor::default();
        g.run(OUT0, 0);
        let (_, mut heard) = g.listen_for(&mut cursor, 600);
        run.pause(Duration::from_secs(1)).unwrap();
        let (lpib, walclk) = (g.r32(sd(OUT0) + SD_LPIB), g.r32(WALCLK));
        heard.extend(g.listen(&mut cursor).1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(g.r32(sd(OUT0) + SD_LPIB), lpib, "the position stands still while paused");
        assert_eq!(g.r32(WALCLK), walclk, "so does the wall clock");
        assert!(g.listen(&mut cursor).1.is_empty(), "nothing is played while paused");
        let resumed = Instant::now();
        run.resume();
        let (_, after) = g.listen_for(&mut cursor, 600);
        let ticks = g.r32(WALCLK).wrapping_sub(walclk);
        assert!(
            u128::from(ticks) <= resumed.elapsed().as_nanos() * 24 / 1000 + 24_000,
            "the wall clock went on from where it stood: {ticks} ticks"
        );
        assert_ne!(g.r32(sd(OUT0) + SD_LPIB), lpib, "going on after the pause");
        // What was heard goes on frame after frame, across the pause: nothing repeated, nothing skipped.
        heard.extend(after);
        for (k, pair) in heard.chunks(2).enumerate() {
            let frame = (k % 3600) as i16;
            assert_eq!(pair, [frame, -frame], "frame {k}");
        }
        // A device gone (the VM rebooted) is no longer told.
        drop(g);
        run.pause(Duration::from_secs(1)).unwrap();
        run.resume();
    }

    #[test]
    fn a_running_stream_survives_save_and_restore() {
        let mut g = Guest::new();
        // A ramp, so each sample says which frame it is.
        let ramp: Vec<i16> = (0..3600).flat_map(|i| [i as i16, -(i as i16)]).collect();
        g.tone_stream(&ramp);
        g.w32(DPLBASE, POSBUF as u32 | DPLBASE_ENABLE);
        g.w32(INTCTL, INT_GIE | INT_CIE | (1 << OUT0));
        g.run(OUT0, SD_CTL_IOCE);
        std::thread::sleep(Duration::from_millis(30));
        let before = g.r32(sd(OUT0) + SD_LPIB);
        let rirb_wp = g.r16(RIRBWP);
        let mut w = Writer::new();
        g.hda.save_state(&mut w).unwrap();
        // Saved, the device stands still until the VM goes on.
        let saved = g.r32(sd(OUT0) + SD_LPIB);
        assert!(saved >= before);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.r32(sd(OUT0) + SD_LPIB), saved);
        g.hda.resume_after_save();
        std::thread::sleep(Duration::from_millis(20));
        assert_ne!(g.r32(sd(OUT0) + SD_LPIB), saved, "going on after the save");
        let mem = g.mem.clone();
        drop(g);
        // A new device (and a new console) takes the state.
        let screen = Screen::new();
        let mut cursor = screen.audio().cursor_now();
        let mut g = Guest::with(screen, mem);
        let mut r = Reader::new("pci", &w.buf);
        g.hda.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(g.r32(GCTL) & GCTL_CRST, GCTL_CRST);
        assert_eq!(g.r16(RIRBWP), rirb_wp);
        assert_eq!(g.r32(INTCTL), INT_GIE | INT_CIE | (1 << OUT0));
        assert_ne!(u32::from(g.r8(sd(OUT0) + SD_CTL)) & SD_CTL_RUN, 0, "still running");
        assert_eq!(g.verb(NID_DAC, VERB_GET_STREAM_CHANNEL, 0), 0x10, "the codec's settings came along");
        let (events, got) = g.listen_for(&mut cursor, 600);
        assert_eq!(events, [AudioEvent::Begin(AudioFormat { rate: 48_000, channels: 2 })]);
        let first = got[0] as u32;
        assert_eq!(first * 4, saved, "resumed where it was saved");
        for (k, pair) in got.chunks(2).take(600).enumerate() {
            let frame = ((first as usize + k) % 3600) as i16;
            assert_eq!(pair, [frame, -frame], "frame {k} after the restore");
        }
        // A damaged state is refused and leaves the device as it was.
        let mut bad = w.buf.clone();
        let at = bad.len() - 1;
        bad.truncate(at);
        assert!(g.hda.restore_state(&mut Reader::new("pci", &bad)).is_err());
        assert_ne!(u32::from(g.r8(sd(OUT0) + SD_CTL)) & SD_CTL_RUN, 0);
        // Restored where the buffer is not in memory: the stream stops with DESE at its first step.
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BUF as usize + 64)]).unwrap();
        let mut h = Guest::with(Screen::new(), small);
        h.hda.restore_state(&mut Reader::new("pci", &w.buf)).unwrap();
        let deadline = Instant::now() + WAIT;
        while u32::from(h.r8(sd(OUT0) + SD_CTL)) & SD_CTL_RUN != 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_ne!(h.r8(sd(OUT0) + SD_STS) & SD_STS_DESE, 0);
    }
}
