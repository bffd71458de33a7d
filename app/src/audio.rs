//! The console's sound: what a VNC server sends with QEMU's audio extension, played on this computer's
//! default output (cpal: ALSA, which desktops route to PipeWire or PulseAudio).
//!
//! The console asks the server for signed 16-bit samples at the output's own rate and channels (up to two),
//! so nothing is resampled here. Samples wait in a ring of at most [`MAX_BUFFERED_MS`]; the output takes
//! them as it plays, starting once [`START_MS`] have gathered (after a begin or when it ran dry), so
//! network jitter does not break the sound. What arrives while the ring is full is dropped and counted:
//! sound that comes late is never kept to be played later; and when more than [`HIGH_MS`] has waited for a
//! whole second of playing (a burst after a network stall), the output skips ahead to [`START_MS`] behind.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use porthole_api::rfb::AudioMessage;

/// The most sound kept waiting for the output.
pub const MAX_BUFFERED_MS: u32 = 300;
/// How much sound gathers before the output starts (again).
pub const START_MS: u32 = 60;
/// More than this waiting for a whole [`CATCH_UP_AFTER_MS`] of playing (sound that arrived in a burst after a
/// network stall, or a server's clock running ahead of the output's) is skipped down to [`START_MS`], so that
/// the sound does not stay that much behind the picture.
pub const HIGH_MS: u32 = 150;
pub const CATCH_UP_AFTER_MS: u32 = 1000;

/// The output's format: what the server is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputFormat {
    pub rate: u32,
    /// The output's own channel count; the server sends min(channels, 2).
    pub channels: u16,
}

impl OutputFormat {
    /// The channels the server is asked for (QEMU's extension has mono and stereo).
    pub fn wire_channels(&self) -> u8 {
        if self.channels >= 2 { 2 } else { 1 }
    }
}

/// Samples waiting for the output, as f32 in the output's channel layout.
#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<f32>,
    /// The output waits until [`START_MS`] gathered.
    primed: bool,
    /// Samples played in a row while more than [`HIGH_MS`] waited.
    high_for: usize,
}

#[derive(Debug)]
struct Shared {
    ring: Mutex<Ring>,
    format: OutputFormat,
    /// Volume 0..=1 as f32 bits, and mute.
    volume: AtomicU32,
    muted: AtomicBool,
    /// Frames played (sound, not silence), frames dropped (the ring was full), times the output ran dry.
    played: AtomicU64,
    dropped: AtomicU64,
    underruns: AtomicU64,
    /// The output's last error, if it reported one.
    error: Mutex<Option<String>>,
}

impl Shared {
    fn frames(&self, ms: u32) -> usize {
        (self.format.rate as usize * ms as usize / 1000) * usize::from(self.format.channels)
    }

    /// Fills `out` (interleaved, the output's channels) from the ring, silence where there is none.
    fn fill(&self, out: &mut [f32]) {
        let gain =
            if self.muted.load(Ordering::Relaxed) { 0.0 } else { f32::from_bits(self.volume.load(Ordering::Relaxed)) };
        let mut ring = lock(&self.ring);
        if !ring.primed && ring.samples.len() >= self.frames(START_MS) {
            ring.primed = true;
        }
        if ring.primed && ring.samples.len() > self.frames(HIGH_MS) {
            ring.high_for += out.len();
            if ring.high_for >= self.frames(CATCH_UP_AFTER_MS) {
                let channels = usize::from(self.format.channels.max(1));
                let excess = (ring.samples.len() - self.frames(START_MS)) / channels * channels;
                ring.samples.drain(..excess);
                ring.high_for = 0;
                self.dropped.fetch_add((excess / channels) as u64, Ordering::Relaxed);
            }
        } else {
            ring.high_for = 0;
        }
        let mut taken = 0;
        if ring.primed {
            taken = out.len().min(ring.samples.len());
            for (o, s) in out.iter_mut().zip(ring.samples.drain(..taken)) {
                *o = s * gain;
            }
            if taken < out.len() {
                ring.primed = false;
                self.underruns.fetch_add(1, Ordering::Relaxed);
            }
        }
        out[taken..].fill(0.0);
        self.played.fetch_add((taken / usize::from(self.format.channels.max(1))) as u64, Ordering::Relaxed);
    }
}

/// Sound playing on this computer's default output.
pub struct Player {
    shared: Arc<Shared>,
    /// Dropping it ends the output's thread (which owns the stream).
    _stop: mpsc::Sender<()>,
}

impl Player {
    /// Opens the default output (on a thread of its own, which keeps the stream); an error says why there
    /// is no sound (no output device, or it refused).
    pub fn open() -> Result<Player, String> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<Shared>, String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("audio".into())
            .spawn(move || {
                let stream = match start_output() {
                    Ok((stream, shared)) => {
                        let _ = ready_tx.send(Ok(shared));
                        stream
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Keeps the stream until the player goes.
                let _ = stop_rx.recv();
                drop(stream);
            })
            .map_err(|e| format!("cannot start the sound thread: {e}"))?;
        let shared = ready_rx.recv().map_err(|_| "the sound thread ended".to_owned())??;
        Ok(Player { shared, _stop: stop_tx })
    }

    pub fn format(&self) -> OutputFormat {
        self.shared.format
    }

    /// Takes a server's audio message: samples are queued (signed 16-bit, `wire_channels()` per frame).
    pub fn take(&self, message: AudioMessage) {
        match message {
            AudioMessage::Begin => lock(&self.shared.ring).primed = false,
            AudioMessage::End => {}
            AudioMessage::Data(bytes) => self.queue(&bytes),
        }
    }

    fn queue(&self, bytes: &[u8]) {
        let s = &self.shared;
        let (wire, out) = (usize::from(s.format.wire_channels()), usize::from(s.format.channels.max(1)));
        let max = s.frames(MAX_BUFFERED_MS);
        let mut ring = lock(&s.ring);
        for frame in bytes.chunks_exact(2 * wire) {
            if ring.samples.len() + out > max {
                s.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for c in 0..out {
                // Mono goes to every channel; stereo to the first two, silence to the others.
                let at = if wire == 1 { 0 } else { c };
                let v = if at < wire { i16::from_le_bytes([frame[2 * at], frame[2 * at + 1]]) } else { 0 };
                ring.samples.push_back(f32::from(v) / 32768.0);
            }
        }
    }

    pub fn set_volume(&self, volume: f32) {
        self.shared.volume.store(volume.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    pub fn volume(&self) -> f32 {
        f32::from_bits(self.shared.volume.load(Ordering::Relaxed))
    }

    pub fn set_muted(&self, muted: bool) {
        self.shared.muted.store(muted, Ordering::Relaxed);
    }

    pub fn muted(&self) -> bool {
        self.shared.muted.load(Ordering::Relaxed)
    }

    /// Frames played, frames dropped because they came too late, and times the output ran dry.
    pub fn counts(&self) -> (u64, u64, u64) {
        let s = &self.shared;
        (s.played.load(Ordering::Relaxed), s.dropped.load(Ordering::Relaxed), s.underruns.load(Ordering::Relaxed))
    }

    /// The output's last error, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }
}

/// Opens the default output device with its default configuration and starts a stream on it.
fn start_output() -> Result<(cpal::Stream, Arc<Shared>), String> {
    let host = cpal::default_host();
    let device = host.default_output_device().ok_or("this computer has no sound output")?;
    let supported = device.default_output_config().map_err(|e| format!("the sound output has no format: {e}"))?;
    let sample_format = supported.sample_format();
    let config: cpal::StreamConfig = supported.into();
    let shared = Arc::new(Shared {
        ring: Mutex::default(),
        format: OutputFormat { rate: config.sample_rate.0, channels: config.channels },
        volume: AtomicU32::new(1.0f32.to_bits()),
        muted: AtomicBool::new(false),
        played: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        underruns: AtomicU64::new(0),
        error: Mutex::new(None),
    });
    let errors = shared.clone();
    let on_error = move |e: cpal::StreamError| *lock(&errors.error) = Some(e.to_string());
    let stream = match sample_format {
        cpal::SampleFormat::F32 => {
            let s = shared.clone();
            device.build_output_stream(&config, move |out: &mut [f32], _: &_| s.fill(out), on_error, None)
        }
        cpal::SampleFormat::I16 => converting_stream(&device, &config, &shared, on_error, |v| (v * 32767.0) as i16),
        cpal::SampleFormat::I32 => {
            converting_stream(&device, &config, &shared, on_error, |v| (f64::from(v) * f64::from(i32::MAX)) as i32)
        }
        other => return Err(format!("the sound output's sample format {other} is not supported")),
    }
    .map_err(|e| format!("the sound output refused a stream: {e}"))?;
    stream.play().map_err(|e| format!("the sound output does not play: {e}"))?;
    Ok((stream, shared))
}

/// A stream of an integer sample format: filled as f32, then converted with `to`.
fn converting_stream<T: cpal::SizedSample + Send + 'static>(
    device: &cpal::Device,
    config: &cpal::StreamConfig,
    shared: &Arc<Shared>,
    on_error: impl FnMut(cpal::StreamError) + Send + 'static,
    to: fn(f32) -> T,
) -> Result<cpal::Stream, cpal::BuildStreamError> {
    let (s, mut buf) = (shared.clone(), Vec::new());
    device.build_output_stream(
        config,
        move |out: &mut [T], _: &_| {
            buf.resize(out.len(), 0.0);
            s.fill(&mut buf);
            for (o, &v) in out.iter_mut().zip(&buf) {
                *o = to(v);
            }
        },
        on_error,
        None,
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(rate: u32, channels: u16) -> Arc<Shared> {
        Arc::new(Shared {
            ring: Mutex::default(),
            format: OutputFormat { rate, channels },
            volume: AtomicU32::new(1.0f32.to_bits()),
            muted: AtomicBool::new(false),
            played: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            underruns: AtomicU64::new(0),
            error: Mutex::new(None),
        })
    }

    fn player(rate: u32, channels: u16) -> Player {
        Player { shared: shared(rate, channels), _stop: mpsc::channel().0 }
    }

    fn s16(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    #[test]
    fn output_waits_for_enough_sound_then_plays_it_in_order() {
        let p = player(1000, 2); // 60 ms = 60 frames
        p.take(AudioMessage::Begin);
        p.take(AudioMessage::Data(s16(&[16384, -16384].repeat(59))));
        let mut out = vec![1.0f32; 10];
        p.shared.fill(&mut out);
        assert!(out.iter().all(|&v| v == 0.0), "silence until 60 ms gathered");
        p.take(AudioMessage::Data(s16(&[16384, -16384])));
        p.shared.fill(&mut out);
        assert_eq!(out[..2], [0.5, -0.5]);
        p.set_volume(0.5);
        p.shared.fill(&mut out);
        assert_eq!(out[..2], [0.25, -0.25]);
        p.set_muted(true);
        p.shared.fill(&mut out);
        assert!(out.iter().all(|&v| v == 0.0));
        assert_eq!(p.counts().0, 15);
    }

    #[test]
    fn sound_beyond_the_bound_is_dropped_and_counted() {
        let p = player(1000, 1);
        p.take(AudioMessage::Data(s16(&[100; 1000])));
        assert_eq!(lock(&p.shared.ring).samples.len(), 300, "300 ms kept");
        assert_eq!(p.counts().1, 700);
    }

    #[test]
    fn sound_that_stays_far_behind_is_skipped_down_to_the_start_level() {
        let p = player(1000, 2); // frames(ms) = 2 * ms samples
        p.take(AudioMessage::Data(s16(&[100; 2 * 280])));
        let mut out = vec![0.0f32; 2 * 100];
        // A steady stream with 280 ms waiting (a burst after a stall): played as is for a second...
        for _ in 0..9 {
            p.shared.fill(&mut out);
            p.take(AudioMessage::Data(s16(&[100; 2 * 100])));
            assert_eq!(lock(&p.shared.ring).samples.len(), 2 * 280);
        }
        assert_eq!(p.counts().1, 0);
        // ...then what is beyond 60 ms goes.
        p.shared.fill(&mut out);
        assert_eq!(lock(&p.shared.ring).samples.len(), 2 * 60 - out.len().min(2 * 60));
        assert_eq!(p.counts().1, 220, "frames skipped, counted as dropped");
        // Below the high mark nothing more is skipped.
        for _ in 0..20 {
            p.take(AudioMessage::Data(s16(&[100; 2 * 100])));
            p.shared.fill(&mut out);
        }
        assert_eq!(p.counts().1, 220);
    }

    #[test]
    fn mono_goes_to_every_channel_and_stereo_to_the_first_two() {
        let p = player(1000, 4);
        assert_eq!(p.format().wire_channels(), 2);
        p.take(AudioMessage::Data(s16(&[16384, -16384])));
        assert_eq!(Vec::from(lock(&p.shared.ring).samples.clone()), [0.5, -0.5, 0.0, 0.0]);
        let p = player(1000, 1);
        assert_eq!(p.format().wire_channels(), 1);
        p.take(AudioMessage::Data(s16(&[16384])));
        assert_eq!(Vec::from(lock(&p.shared.ring).samples.clone()), [0.5]);
    }

    #[test]
    fn running_dry_counts_and_waits_to_gather_again() {
        let p = player(1000, 1);
        p.take(AudioMessage::Data(s16(&[1000; 70])));
        let mut out = vec![0.0f32; 100];
        p.shared.fill(&mut out);
        assert_eq!(p.counts(), (70, 0, 1));
        p.take(AudioMessage::Data(s16(&[1000; 10])));
        p.shared.fill(&mut out);
        assert!(out.iter().all(|&v| v == 0.0), "waits for 60 ms again");
    }
}
