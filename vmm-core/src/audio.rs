//! A VM's sound output on its way to the console's listeners.
//!
//! The sound card (virtio-sound, HD Audio) converts what the guest plays to interleaved signed 16-bit
//! samples and hands them to [`AudioOutput`]; each listener (an RFB client that enabled QEMU's audio
//! extension) reads them with its own [`AudioCursor`] and converts them to the format it asked for with an
//! [`AudioConverter`]. Nothing waits for a slow listener: the output keeps the last [`KEPT_MS`] of sound, and
//! a listener that falls further behind skips to the oldest kept sample, the skipped frames counted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How much sound the output keeps for listeners that fell behind, in milliseconds.
pub const KEPT_MS: u64 = 200;
/// The highest rate and channel count a sound card may announce (what virtio-sound's and HD Audio's
/// formats reach); more is refused by [`AudioOutput::start`].
pub const MAX_RATE: u32 = 192_000;
pub const MAX_CHANNELS: u8 = 8;

/// The sound a card plays: its rate in frames per second and its channels (samples are signed 16-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFormat {
    pub rate: u32,
    pub channels: u8,
}

impl AudioFormat {
    fn valid(&self) -> bool {
        (1..=MAX_RATE).contains(&self.rate) && (1..=MAX_CHANNELS).contains(&self.channels)
    }

    fn kept_samples(&self) -> usize {
        (u64::from(self.rate) * KEPT_MS / 1000) as usize * usize::from(self.channels)
    }
}

#[derive(Debug, Default)]
struct Stream {
    /// Counts the streams the card started: a cursor of an older one starts over.
    generation: u64,
    format: Option<AudioFormat>,
    /// The kept samples, oldest first, and the index (since the stream started) of the first.
    samples: VecDeque<i16>,
    first: u64,
}

impl Stream {
    fn end(&self) -> u64 {
        self.first + self.samples.len() as u64
    }
}

/// One VM's sound output.
#[derive(Debug, Default)]
pub struct AudioOutput {
    stream: Mutex<Stream>,
    /// Frames that listeners skipped because they fell behind, all listeners together.
    late_frames: AtomicU64,
    /// Frames the card played.
    played_frames: AtomicU64,
    /// Listeners that enabled the sound: with none, pushes wake no viewer.
    listeners: std::sync::atomic::AtomicUsize,
}

/// What a listener reads next.
#[derive(Debug, PartialEq, Eq)]
pub enum AudioEvent {
    /// A stream started with this format (after an end, or replacing a stream the listener was in).
    Begin(AudioFormat),
    /// Samples of the current stream were appended to the caller's buffer.
    Data,
    /// The stream the listener was in ended.
    End,
    /// Nothing new.
    Idle,
}

/// Where one listener is: the stream it is in, and the index of the next sample it reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct AudioCursor {
    generation: u64,
    next: u64,
    in_stream: bool,
}

impl AudioOutput {
    /// A stream begins (the guest started playing): `format` must be one [`AudioFormat`] allows, else
    /// the stream stays stopped and false is returned.
    pub fn start(&self, format: AudioFormat) -> bool {
        let mut s = lock(&self.stream);
        s.generation += 1;
        s.samples.clear();
        s.first = 0;
        s.format = format.valid().then_some(format);
        s.format.is_some()
    }

    /// The stream ends (the guest stopped playing, or the card was reset).
    pub fn stop(&self) {
        let mut s = lock(&self.stream);
        if s.format.take().is_some() {
            s.generation += 1;
            s.samples.clear();
            s.first = 0;
        }
    }

    /// The current stream's format, if one is playing.
    pub fn format(&self) -> Option<AudioFormat> {
        lock(&self.stream).format
    }

    /// Appends interleaved samples of the current stream (ignored when none plays); the oldest beyond
    /// [`KEPT_MS`] are forgotten.
    pub fn push(&self, samples: &[i16]) {
        let mut s = lock(&self.stream);
        let Some(format) = s.format else { return };
        self.played_frames.fetch_add((samples.len() / usize::from(format.channels)) as u64, Ordering::Relaxed);
        let channels = usize::from(format.channels);
        let whole = &samples[..samples.len() / channels * channels];
        let keep = format.kept_samples().max(channels);
        let kept = &whole[whole.len().saturating_sub(keep)..];
        let overflow = (s.samples.len() + kept.len()).saturating_sub(keep);
        s.samples.drain(..overflow);
        s.first += (overflow + whole.len() - kept.len()) as u64;
        s.samples.extend(kept);
    }

    /// Reads what `cursor` has not seen yet: a begin or an end first, then at most `max_samples` samples
    /// appended to `out` (whole frames). A cursor behind the kept sound skips to it, counted as late.
    pub fn read(&self, cursor: &mut AudioCursor, out: &mut Vec<i16>, max_samples: usize) -> AudioEvent {
        let s = lock(&self.stream);
        if cursor.generation != s.generation {
            if cursor.in_stream {
                cursor.in_stream = false;
                return AudioEvent::End;
            }
            cursor.generation = s.generation;
            cursor.next = 0;
            if let Some(format) = s.format {
                cursor.in_stream = true;
                return AudioEvent::Begin(format);
            }
            return AudioEvent::Idle;
        }
        let Some(format) = s.format else { return AudioEvent::Idle };
        if !cursor.in_stream {
            cursor.in_stream = true;
            return AudioEvent::Begin(format);
        }
        if cursor.next < s.first {
            let late = (s.first - cursor.next) / u64::from(format.channels);
            self.late_frames.fetch_add(late, Ordering::Relaxed);
            cursor.next = s.first;
        }
        let available = (s.end() - cursor.next) as usize;
        let channels = usize::from(format.channels);
        let n = available.min(max_samples / channels * channels);
        if n == 0 {
            return AudioEvent::Idle;
        }
        let start = (cursor.next - s.first) as usize;
        out.extend(s.samples.range(start..start + n));
        cursor.next += n as u64;
        AudioEvent::Data
    }

    /// A listener starts (true) or stops (false) hearing the sound.
    pub fn set_listening(&self, on: bool) {
        if on {
            self.listeners.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self.listeners.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Whether any listener hears the sound (viewers need waking for it).
    pub fn has_listeners(&self) -> bool {
        self.listeners.load(Ordering::Relaxed) > 0
    }

    /// A cursor at what plays now: it reads the current stream's begin, then only sound pushed after it.
    pub fn cursor_now(&self) -> AudioCursor {
        let s = lock(&self.stream);
        AudioCursor { generation: s.generation, next: s.end(), in_stream: false }
    }

    /// Frames listeners skipped because they fell behind.
    pub fn late_frames(&self) -> u64 {
        self.late_frames.load(Ordering::Relaxed)
    }

    /// Frames the card played since the VM started.
    pub fn played_frames(&self) -> u64 {
        self.played_frames.load(Ordering::Relaxed)
    }
}

/// Sample formats a listener may ask for (QEMU's RFB audio extension numbers them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    U8 = 0,
    S8 = 1,
    U16 = 2,
    S16 = 3,
    U32 = 4,
    S32 = 5,
}

impl SampleFormat {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => SampleFormat::U8,
            1 => SampleFormat::S8,
            2 => SampleFormat::U16,
            3 => SampleFormat::S16,
            4 => SampleFormat::U32,
            5 => SampleFormat::S32,
            _ => return None,
        })
    }

    pub fn bytes(self) -> usize {
        match self {
            SampleFormat::U8 | SampleFormat::S8 => 1,
            SampleFormat::U16 | SampleFormat::S16 => 2,
            SampleFormat::U32 | SampleFormat::S32 => 4,
        }
    }

    /// Appends `sample` in this format, little-endian.
    fn put(self, sample: i16, out: &mut Vec<u8>) {
        match self {
            SampleFormat::U8 => out.push(((sample >> 8) as u8) ^ 0x80),
            SampleFormat::S8 => out.push((sample >> 8) as u8),
            SampleFormat::U16 => out.extend_from_slice(&((sample as u16) ^ 0x8000).to_le_bytes()),
            SampleFormat::S16 => out.extend_from_slice(&sample.to_le_bytes()),
            SampleFormat::U32 => out.extend_from_slice(&(((sample as i32) << 16) as u32 ^ 0x8000_0000).to_le_bytes()),
            SampleFormat::S32 => out.extend_from_slice(&((sample as i32) << 16).to_le_bytes()),
        }
    }
}

/// What a listener asked for: its sample format, channels and rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerFormat {
    pub sample: SampleFormat,
    pub channels: u8,
    pub rate: u32,
}

impl Default for ListenerFormat {
    /// What QEMU's server assumes until a client says otherwise.
    fn default() -> Self {
        ListenerFormat { sample: SampleFormat::S16, channels: 2, rate: 44_100 }
    }
}

/// Converts one stream's samples to a listener's format: channels mixed down or copied, the rate changed
/// by linear interpolation between neighbouring frames (its state carries over between calls).
#[derive(Debug)]
pub struct AudioConverter {
    from: AudioFormat,
    to: ListenerFormat,
    /// The last frame of the previous call (mixed to the listener's channels), as i32 per channel.
    previous: Vec<i32>,
    /// Where the next output frame lies, in input frames after `previous` (0: at `previous`).
    position: f64,
    frame: Vec<i32>,
}

impl AudioConverter {
    pub fn new(from: AudioFormat, to: ListenerFormat) -> Self {
        AudioConverter {
            from,
            to,
            previous: Vec::new(),
            position: 0.0,
            frame: vec![0; usize::from(to.channels.max(1))],
        }
    }

    /// The format converted from.
    pub fn source(&self) -> AudioFormat {
        self.from
    }

    /// The bytes `samples` (whole frames of the input format) make in the listener's format.
    pub fn convert(&mut self, samples: &[i16], out: &mut Vec<u8>) {
        let in_ch = usize::from(self.from.channels.max(1));
        let out_ch = usize::from(self.to.channels.max(1));
        let step = f64::from(self.from.rate) / f64::from(self.to.rate.max(1));
        let frames = samples.len() / in_ch;
        let mix = |frame: &[i16], into: &mut [i32]| {
            if out_ch == 1 {
                into[0] = frame.iter().map(|&s| i32::from(s)).sum::<i32>() / frame.len() as i32;
            } else {
                for (c, slot) in into.iter_mut().enumerate() {
                    *slot = i32::from(frame[c % frame.len()]);
                }
            }
        };
        let mut current = vec![0i32; out_ch];
        if self.from.rate == self.to.rate {
            // The same rate: each frame as it comes (interpolating would hold the last one back until the
            // next call, a period later).
            for frame in samples.chunks_exact(in_ch) {
                mix(frame, &mut current);
                for &v in &current {
                    self.to.sample.put(v.clamp(i16::MIN.into(), i16::MAX.into()) as i16, out);
                }
            }
            return;
        }
        for i in 0..frames {
            mix(&samples[i * in_ch..(i + 1) * in_ch], &mut current);
            if self.previous.is_empty() {
                self.previous = current.clone();
                continue;
            }
            // Output frames between `previous` (position 0) and `current` (position 1).
            while self.position < 1.0 {
                let t = self.position;
                for ((slot, &a), &b) in self.frame.iter_mut().zip(&self.previous).zip(&current) {
                    *slot = (f64::from(a) * (1.0 - t) + f64::from(b) * t).round() as i32;
                }
                for &v in &self.frame {
                    self.to.sample.put(v.clamp(i16::MIN.into(), i16::MAX.into()) as i16, out);
                }
                self.position += step;
            }
            self.position -= 1.0;
            std::mem::swap(&mut self.previous, &mut current);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEREO_48K: AudioFormat = AudioFormat { rate: 48_000, channels: 2 };

    #[test]
    fn a_listener_gets_begin_data_and_end() {
        let out = AudioOutput::default();
        let mut cursor = AudioCursor::default();
        let mut buf = Vec::new();
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::Idle);
        assert!(out.start(STEREO_48K));
        out.push(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::Begin(STEREO_48K));
        assert_eq!(out.read(&mut cursor, &mut buf, 5), AudioEvent::Data);
        assert_eq!(buf, [1, 2, 3, 4], "whole frames only");
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::Data);
        assert_eq!(buf, [1, 2, 3, 4, 5, 6]);
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::Idle);
        out.stop();
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::End);
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::Idle);
        // A new stream with another format.
        let mono = AudioFormat { rate: 22_050, channels: 1 };
        out.start(mono);
        assert_eq!(out.read(&mut cursor, &mut buf, 1024), AudioEvent::Begin(mono));
        assert_eq!(out.played_frames(), 3);
    }

    #[test]
    fn a_restarted_stream_ends_the_old_one_first() {
        let out = AudioOutput::default();
        let mut cursor = AudioCursor::default();
        let mut buf = Vec::new();
        out.start(STEREO_48K);
        assert_eq!(out.read(&mut cursor, &mut buf, 8), AudioEvent::Begin(STEREO_48K));
        out.start(STEREO_48K);
        out.push(&[9, 9]);
        assert_eq!(out.read(&mut cursor, &mut buf, 8), AudioEvent::End);
        assert_eq!(out.read(&mut cursor, &mut buf, 8), AudioEvent::Begin(STEREO_48K));
        assert_eq!(out.read(&mut cursor, &mut buf, 8), AudioEvent::Data);
        assert_eq!(buf, [9, 9]);
    }

    #[test]
    fn a_late_listener_skips_ahead_and_is_counted() {
        let out = AudioOutput::default();
        let mut cursor = AudioCursor::default();
        let mut buf = Vec::new();
        out.start(STEREO_48K);
        assert_eq!(out.read(&mut cursor, &mut buf, 8), AudioEvent::Begin(STEREO_48K));
        // One second of sound: only KEPT_MS of it stays.
        let second: Vec<i16> = (0..96_000).map(|i| i as i16).collect();
        out.push(&second);
        let kept = STEREO_48K.kept_samples();
        assert_eq!(out.read(&mut cursor, &mut buf, usize::MAX), AudioEvent::Data);
        assert_eq!(buf.len(), kept);
        assert_eq!(buf[0], second[96_000 - kept]);
        assert_eq!(out.late_frames(), ((96_000 - kept) / 2) as u64);
        // Pushed in pieces, the same bound holds.
        for chunk in second.chunks(960) {
            out.push(chunk);
        }
        buf.clear();
        out.read(&mut cursor, &mut buf, usize::MAX);
        assert_eq!(buf.len(), kept);
        assert_eq!(*buf.last().unwrap(), *second.last().unwrap());
    }

    #[test]
    fn formats_a_card_cannot_have_are_refused() {
        let out = AudioOutput::default();
        assert!(!out.start(AudioFormat { rate: 0, channels: 2 }));
        assert!(!out.start(AudioFormat { rate: 48_000, channels: 0 }));
        assert!(!out.start(AudioFormat { rate: 10_000_000, channels: 2 }));
        out.push(&[1, 2]);
        assert_eq!(out.format(), None);
        assert_eq!(out.played_frames(), 0);
    }

    /// The frequency of a mono signal from its rising zero crossings.
    fn frequency(samples: &[i16], rate: u32) -> f64 {
        let ups: Vec<usize> = (1..samples.len()).filter(|&i| samples[i - 1] < 0 && samples[i] >= 0).collect();
        (ups.len() - 1) as f64 * f64::from(rate) / (ups[ups.len() - 1] - ups[0]) as f64
    }

    fn tone(freq: f64, rate: u32, channels: usize, frames: usize) -> Vec<i16> {
        (0..frames)
            .flat_map(|i| {
                let v = (10_000.0 * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()) as i16;
                std::iter::repeat_n(v, channels)
            })
            .collect()
    }

    #[test]
    fn conversion_keeps_the_pitch_across_rates_and_calls() {
        let input = tone(440.0, 48_000, 2, 48_000);
        let to = ListenerFormat { sample: SampleFormat::S16, channels: 1, rate: 44_100 };
        let mut conv = AudioConverter::new(STEREO_48K, to);
        let mut bytes = Vec::new();
        for chunk in input.chunks(2 * 441) {
            conv.convert(chunk, &mut bytes);
        }
        let out: Vec<i16> = bytes.chunks(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert!((out.len() as i64 - 44_100).abs() <= 2, "{} frames", out.len());
        let f = frequency(&out, 44_100);
        assert!((f - 440.0).abs() < 1.0, "{f} Hz");
    }

    #[test]
    fn sample_formats_and_channels() {
        let mut bytes = Vec::new();
        let mono = AudioFormat { rate: 8000, channels: 1 };
        for (sample, want) in [
            (SampleFormat::U8, vec![0x80u8, 0xff, 0x00, 0x80]),
            (SampleFormat::S8, vec![0x00, 0x7f, 0x80, 0x00]),
            (SampleFormat::U16, vec![0x00, 0x80, 0xff, 0xff, 0x00, 0x00, 0x00, 0x80]),
            (SampleFormat::S32, vec![0, 0, 0, 0, 0, 0, 0xff, 0x7f, 0, 0, 0, 0x80, 0, 0, 0, 0]),
        ] {
            bytes.clear();
            let mut conv = AudioConverter::new(mono, ListenerFormat { sample, channels: 1, rate: 8000 });
            conv.convert(&[0, i16::MAX, i16::MIN, 0], &mut bytes);
            assert_eq!(bytes, want, "{sample:?}");
        }
        // Mono to stereo copies; stereo to mono averages. At the same rate every frame comes out at once (the
        // last one is not held back for the next call).
        bytes.clear();
        let mut conv = AudioConverter::new(mono, ListenerFormat { channels: 2, rate: 8000, ..Default::default() });
        conv.convert(&[100, 200], &mut bytes);
        assert_eq!(bytes, [100, 0, 100, 0, 200, 0, 200, 0]);
        bytes.clear();
        let stereo = AudioFormat { rate: 8000, channels: 2 };
        let mut conv = AudioConverter::new(stereo, ListenerFormat { channels: 1, rate: 8000, ..Default::default() });
        conv.convert(&[100, 300, 0, 0], &mut bytes);
        assert_eq!(bytes, [200, 0, 0, 0]);
    }
}
