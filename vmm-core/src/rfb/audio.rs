//! QEMU's RFB audio extension, server side (what gtk-vnc, virt-viewer and Porthole's console play): a
//! client that lists the [`AUDIO`] pseudo-encoding gets it acknowledged in an update, then sends QEMU
//! client messages (255, sub-type 1) to choose a sample format and to enable or disable the sound; the
//! server sends QEMU server messages (255, sub-type 1) marking where the guest's playing begins and ends,
//! and the samples in between in the client's format (little-endian, interleaved).

use crate::audio::{AudioConverter, AudioCursor, AudioEvent, AudioOutput, ListenerFormat, SampleFormat};

/// The pseudo-encoding a client lists to say it takes audio.
pub const AUDIO: i32 = -259;
/// The QEMU message sub-type of audio, both ways.
pub const SUBTYPE: u8 = 1;
/// Client operations.
pub const ENABLE: u16 = 0;
pub const DISABLE: u16 = 1;
pub const SET_FORMAT: u16 = 2;
/// Server operations.
pub const END: u16 = 0;
pub const BEGIN: u16 = 1;
pub const DATA: u16 = 2;
/// The rates a client may ask for.
pub const RATES: std::ops::RangeInclusive<u32> = 1..=crate::audio::MAX_RATE;
/// Samples read from the output per data message (about 50 ms of 48 kHz stereo).
const SAMPLES_PER_MESSAGE: usize = 4800;

/// A client's SetFormat: sample format code, channels, rate; None when the client asked for something
/// the extension does not have (the connection is then closed, as QEMU does).
pub fn listener_format(code: u8, channels: u8, rate: u32) -> Option<ListenerFormat> {
    let sample = SampleFormat::from_code(code)?;
    ((channels == 1 || channels == 2) && RATES.contains(&rate)).then_some(ListenerFormat { sample, channels, rate })
}

fn server_message(op: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[255, SUBTYPE]);
    out.extend_from_slice(&op.to_be_bytes());
}

/// One client's listening: where it is in the guest's sound and what it was last told.
#[derive(Debug, Default)]
pub struct Listener {
    cursor: AudioCursor,
    converter: Option<AudioConverter>,
    /// The client's format when the converter was made.
    format: Option<ListenerFormat>,
    /// A begin went out without its end yet.
    began: bool,
    enabled: bool,
    samples: Vec<i16>,
    bytes: Vec<u8>,
}

impl Listener {
    /// Appends the audio messages owed to a client that has `enabled` the sound in `format`: an end when it
    /// disabled it, else begins, ends and data for what the guest played since the last call.
    pub fn messages(&mut self, output: &AudioOutput, enabled: bool, format: ListenerFormat, out: &mut Vec<u8>) {
        if !enabled {
            if std::mem::take(&mut self.began) {
                server_message(END, out);
            }
            self.stop(output);
            return;
        }
        if !self.enabled {
            // Enabled now: from what plays now on, not from the sound kept for late listeners.
            self.enabled = true;
            output.set_listening(true);
            self.cursor = output.cursor_now();
        }
        if self.format != Some(format)
            && let Some(c) = &mut self.converter
        {
            *c = AudioConverter::new(c.source(), format);
        }
        self.format = Some(format);
        loop {
            self.samples.clear();
            match output.read(&mut self.cursor, &mut self.samples, SAMPLES_PER_MESSAGE) {
                AudioEvent::Begin(source) => {
                    self.converter = Some(AudioConverter::new(source, format));
                    if !std::mem::replace(&mut self.began, true) {
                        server_message(BEGIN, out);
                    }
                }
                AudioEvent::End => {
                    self.converter = None;
                    if std::mem::take(&mut self.began) {
                        server_message(END, out);
                    }
                }
                AudioEvent::Data => {
                    let Some(converter) = &mut self.converter else { continue };
                    self.bytes.clear();
                    converter.convert(&self.samples, &mut self.bytes);
                    if !self.bytes.is_empty() {
                        server_message(DATA, out);
                        out.extend_from_slice(&(self.bytes.len() as u32).to_be_bytes());
                        out.extend_from_slice(&self.bytes);
                    }
                }
                AudioEvent::Idle => return,
            }
        }
    }
}

impl Listener {
    /// The client no longer listens (it disabled the sound, or it is gone).
    pub fn stop(&mut self, output: &AudioOutput) {
        if std::mem::take(&mut self.enabled) {
            output.set_listening(false);
        }
        self.converter = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::AudioFormat;

    #[test]
    fn formats_outside_the_extension_are_refused() {
        assert!(listener_format(3, 2, 44_100).is_some());
        assert!(listener_format(6, 2, 44_100).is_none());
        assert!(listener_format(3, 3, 44_100).is_none());
        assert!(listener_format(3, 0, 44_100).is_none());
        assert!(listener_format(3, 2, 0).is_none());
        assert!(listener_format(3, 2, u32::MAX).is_none());
    }

    #[test]
    fn a_listener_hears_from_when_it_enabled_and_gets_begin_data_end() {
        let output = AudioOutput::default();
        let stereo = AudioFormat { rate: 8000, channels: 2 };
        output.start(stereo);
        output.push(&[1, 1, 2, 2]); // before the client listens: not sent
        let mut l = Listener::default();
        let f = ListenerFormat { sample: SampleFormat::S16, channels: 2, rate: 8000 };
        let mut out = Vec::new();
        l.messages(&output, true, f, &mut out);
        assert_eq!(out, [255, 1, 0, 1], "begin only");
        out.clear();
        output.push(&[3, 3, 4, 4, 5, 5]);
        l.messages(&output, true, f, &mut out);
        // At the guest's own rate every frame goes at once.
        assert_eq!(out, [255, 1, 0, 2, 0, 0, 0, 12, 3, 0, 3, 0, 4, 0, 4, 0, 5, 0, 5, 0]);
        out.clear();
        output.stop();
        l.messages(&output, true, f, &mut out);
        assert_eq!(out, [255, 1, 0, 0], "end");
        out.clear();
        output.start(stereo);
        l.messages(&output, false, f, &mut out);
        assert!(out.is_empty(), "disabled before anything began: nothing");
        l.messages(&output, true, f, &mut out);
        assert_eq!(out, [255, 1, 0, 1]);
        assert!(output.has_listeners());
        out.clear();
        l.messages(&output, false, f, &mut out);
        assert_eq!(out, [255, 1, 0, 0], "disabled while playing: an end");
        assert!(!output.has_listeners());
    }
}
