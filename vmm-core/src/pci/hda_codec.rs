//! HD Audio codecs behind the controller in [`super::hda`]: what answers the verbs the driver sends
//! through the CORB (or the immediate command registers), and what tells the controller where a
//! stream's samples go.
//!
//! [`LineCodec`] is the one codec here: an audio function group with a stereo output converter (DAC)
//! feeding a line-out pin and a stereo input converter (ADC) fed by a line-in pin, described with the
//! parameters a generic driver (Linux's `snd_hda_codec_generic`, Windows' HD Audio class driver) needs to
//! build a playback and a capture device from it: widget capabilities, PCM sizes and rates, connection
//! lists, pin capabilities and configuration defaults, amplifiers with mute and a 64-step gain range
//! (the DAC's output amplifier is what Linux calls "Master"; the ADC's input amplifier "Capture").
//!
//! Node layout (NID: what):
//! - 0: root node (vendor/device ID, revision, one function group at NID 1)
//! - 1: audio function group (nodes 2..=5)
//! - 2: audio output converter, stereo, output amplifier (mute, -47.25..0 dB in 0.75 dB steps)
//! - 3: audio input converter, stereo, input amplifier (the same range), connected from NID 5
//! - 4: pin complex, output capable: line out, rear 1/8" jack, green; connected from NID 2
//! - 5: pin complex, input capable: line in, rear 1/8" jack, blue

use crate::snapshot::{Reader, StateError, Writer};

/// Where a stream's samples go, as the codec says: the amplifier gains to apply, left and right, as
/// fractions of 65536 (65536: unchanged, 0: muted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub gain: [u32; 2],
}

/// A codec on the HD Audio link.
pub trait HdaCodec: Send {
    /// The response to `verb` (the command's low 20 bits: a 12-bit verb and 8-bit payload, or a 4-bit
    /// verb and 16-bit payload) for node `nid`. Nodes and verbs the codec does not have answer 0.
    fn command(&mut self, nid: u8, verb: u32) -> u32;
    /// A link reset: back to the power-on state.
    fn reset(&mut self);
    /// The converter bound to stream `tag` (1..=15) of the given direction, if any: what its samples
    /// become. Tag 0 is no stream.
    fn binding(&self, output: bool, tag: u8) -> Option<Binding>;
    /// The codec's settings, for a machine-state file.
    fn save(&self, w: &mut Writer);
    /// Loads what [`save`](Self::save) wrote.
    fn restore(&mut self, r: &mut Reader) -> Result<(), StateError>;
}

// Verbs (the 12-bit ones carry an 8-bit payload).
pub const VERB_GET_PARAMETER: u32 = 0xF00;
pub const VERB_GET_CONNECTION_SELECT: u32 = 0xF01;
pub const VERB_SET_CONNECTION_SELECT: u32 = 0x701;
pub const VERB_GET_CONNECTION_LIST: u32 = 0xF02;
pub const VERB_GET_POWER_STATE: u32 = 0xF05;
pub const VERB_SET_POWER_STATE: u32 = 0x705;
pub const VERB_GET_STREAM_CHANNEL: u32 = 0xF06;
pub const VERB_SET_STREAM_CHANNEL: u32 = 0x706;
pub const VERB_GET_PIN_CONTROL: u32 = 0xF07;
pub const VERB_SET_PIN_CONTROL: u32 = 0x707;
pub const VERB_GET_UNSOLICITED: u32 = 0xF08;
pub const VERB_SET_UNSOLICITED: u32 = 0x708;
pub const VERB_GET_PIN_SENSE: u32 = 0xF09;
pub const VERB_GET_EAPD: u32 = 0xF0C;
pub const VERB_SET_EAPD: u32 = 0x70C;
pub const VERB_GET_CONFIG_DEFAULT: u32 = 0xF1C;
/// 0x71C..=0x71F set bytes 0..=3 of the configuration default.
pub const VERB_SET_CONFIG_DEFAULT_0: u32 = 0x71C;
pub const VERB_GET_SUBSYSTEM_ID: u32 = 0xF20;
pub const VERB_GET_CHANNEL_COUNT: u32 = 0xF2D;
pub const VERB_SET_CHANNEL_COUNT: u32 = 0x72D;
pub const VERB_FUNCTION_RESET: u32 = 0x7FF;
// 4-bit verbs (16-bit payload).
pub const VERB4_SET_FORMAT: u32 = 0x2;
pub const VERB4_SET_AMP: u32 = 0x3;
pub const VERB4_GET_FORMAT: u32 = 0xA;
pub const VERB4_GET_AMP: u32 = 0xB;

// Parameters (GET_PARAMETER's payload).
pub const PARAM_VENDOR_ID: u8 = 0x00;
pub const PARAM_REVISION_ID: u8 = 0x02;
pub const PARAM_NODE_COUNT: u8 = 0x04;
pub const PARAM_FUNCTION_TYPE: u8 = 0x05;
pub const PARAM_AUDIO_FG_CAPS: u8 = 0x08;
pub const PARAM_WIDGET_CAPS: u8 = 0x09;
pub const PARAM_PCM: u8 = 0x0A;
pub const PARAM_STREAM_FORMATS: u8 = 0x0B;
pub const PARAM_PIN_CAPS: u8 = 0x0C;
pub const PARAM_AMP_IN_CAPS: u8 = 0x0D;
pub const PARAM_CONNECTION_LIST_LEN: u8 = 0x0E;
pub const PARAM_POWER_STATES: u8 = 0x0F;
pub const PARAM_GPIO_CAPS: u8 = 0x11;
pub const PARAM_AMP_OUT_CAPS: u8 = 0x12;

/// The nodes of [`LineCodec`].
pub const NID_ROOT: u8 = 0;
pub const NID_AFG: u8 = 1;
pub const NID_DAC: u8 = 2;
pub const NID_ADC: u8 = 3;
pub const NID_LINE_OUT: u8 = 4;
pub const NID_LINE_IN: u8 = 5;

/// Vendor 0x1AF4 (as the VMM's virtio devices), device "PH".
pub const VENDOR_ID: u32 = 0x1AF4_5048;
/// Revision 1.0, vendor revision 1.
const REVISION_ID: u32 = 0x0010_0100;
/// What GET_SUBSYSTEM_ID answers on the function group.
pub const SUBSYSTEM_ID: u32 = 0x1AF4_1100;

// Audio widget capabilities: the type in bits 23..20, then flags.
const WCAP_STEREO: u32 = 1 << 0;
const WCAP_IN_AMP: u32 = 1 << 1;
const WCAP_OUT_AMP: u32 = 1 << 2;
const WCAP_AMP_OVERRIDE: u32 = 1 << 3;
const WCAP_FORMAT_OVERRIDE: u32 = 1 << 4;
const WCAP_CONN_LIST: u32 = 1 << 8;
const WTYPE_OUTPUT: u32 = 0x0 << 20;
const WTYPE_INPUT: u32 = 0x1 << 20;
const WTYPE_PIN: u32 = 0x4 << 20;
const DAC_CAPS: u32 = WTYPE_OUTPUT | WCAP_STEREO | WCAP_OUT_AMP | WCAP_AMP_OVERRIDE | WCAP_FORMAT_OVERRIDE;
const ADC_CAPS: u32 =
    WTYPE_INPUT | WCAP_STEREO | WCAP_IN_AMP | WCAP_AMP_OVERRIDE | WCAP_FORMAT_OVERRIDE | WCAP_CONN_LIST;
const LINE_OUT_CAPS: u32 = WTYPE_PIN | WCAP_STEREO | WCAP_CONN_LIST;
const LINE_IN_CAPS: u32 = WTYPE_PIN | WCAP_STEREO;

/// Rates 8, 11.025, 16, 22.05, 32, 44.1, 48, 88.2 and 96 kHz (bits 0..=8); sample sizes 8, 16, 20, 24
/// and 32 bits (bits 16..=20).
pub const PCM_CAPS: u32 = 0x001F_01FF;
/// PCM only.
const STREAM_FORMATS: u32 = 1;
/// Pin capabilities: output capable (bit 4), input capable (bit 5); no presence detect.
const PIN_CAPS_OUT: u32 = 1 << 4;
const PIN_CAPS_IN: u32 = 1 << 5;
/// Amplifier: mute capable (bit 31), step size (0.25 dB units minus one, bits 22..16), steps minus one
/// (bits 14..8), the step that is 0 dB (bits 6..0): 64 steps of 0.75 dB, the top one 0 dB.
pub const AMP_STEPS: u8 = 63;
pub const AMP_OFFSET: u8 = 63;
const AMP_STEP_QUARTER_DB: u32 = 3;
pub const AMP_CAPS: u32 = (1 << 31) | ((AMP_STEP_QUARTER_DB - 1) << 16) | ((AMP_STEPS as u32) << 8) | AMP_OFFSET as u32;
/// D0 and D3.
const POWER_STATES: u32 = (1 << 0) | (1 << 3);
/// Configuration defaults: a jack (connectivity 0) at the rear (location 0x01), 1/8" (connection 1),
/// no presence detect (misc bit 0); line out (default device 0) green in association 1, line in (device 8)
/// blue in association 2.
pub const LINE_OUT_CONFIG: u32 = (0x01 << 24) | (0x1 << 16) | (0x4 << 12) | (0x1 << 8) | (1 << 4);
pub const LINE_IN_CONFIG: u32 = (0x01 << 24) | (0x8 << 20) | (0x1 << 16) | (0x3 << 12) | (0x1 << 8) | (2 << 4);

/// Amplifier payload bits (SET and GET AMPLIFIER GAIN/MUTE).
const AMP_SET_OUTPUT: u32 = 1 << 15;
const AMP_SET_INPUT: u32 = 1 << 14;
const AMP_SET_LEFT: u32 = 1 << 13;
const AMP_SET_RIGHT: u32 = 1 << 12;
const AMP_GET_OUTPUT: u32 = 1 << 15;
const AMP_GET_LEFT: u32 = 1 << 13;
pub const AMP_MUTE: u8 = 1 << 7;

/// A stereo amplifier: mute (bit 7) and gain (bits 6..0) of the left and the right channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Amp([u8; 2]);

impl Amp {
    /// The power-on setting: 0 dB, not muted.
    const DEFAULT: Amp = Amp([AMP_OFFSET, AMP_OFFSET]);

    /// The gain of each side as a fraction of 65536.
    fn gain(&self) -> [u32; 2] {
        self.0.map(|v| if v & AMP_MUTE != 0 { 0 } else { gain_factor(v & 0x7F) })
    }
}

/// 10^(dB/20) in 1/65536ths for `step` (above the top step: the top step).
fn gain_factor(step: u8) -> u32 {
    let below = f64::from(AMP_OFFSET.saturating_sub(step.min(AMP_STEPS)));
    let db = -below * f64::from(AMP_STEP_QUARTER_DB) * 0.25;
    (65536.0 * 10f64.powf(db / 20.0)).round() as u32
}

/// A converter: its format, its stream tag and first channel, its channel count and amplifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Converter {
    format: u16,
    /// Stream tag in bits 7..4, lowest channel in bits 3..0.
    stream_channel: u8,
    channel_count: u8,
    amp: Amp,
    power: u8,
}

impl Converter {
    const DEFAULT: Converter =
        Converter { format: 0, stream_channel: 0, channel_count: 1, amp: Amp::DEFAULT, power: 0 };

    fn tag(&self) -> u8 {
        self.stream_channel >> 4
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pin {
    control: u8,
    config: u32,
    unsolicited: u8,
    eapd: u8,
    power: u8,
}

/// The settings the driver makes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    afg_power: u8,
    afg_unsolicited: u8,
    dac: Converter,
    adc: Converter,
    /// The ADC's connection select (its list has one entry).
    adc_select: u8,
    line_out: Pin,
    line_in: Pin,
}

impl Settings {
    fn power_on() -> Self {
        Settings {
            afg_power: 0,
            afg_unsolicited: 0,
            dac: Converter::DEFAULT,
            adc: Converter::DEFAULT,
            adc_select: 0,
            line_out: Pin { control: 0, config: LINE_OUT_CONFIG, unsolicited: 0, eapd: 0, power: 0 },
            line_in: Pin { control: 0, config: LINE_IN_CONFIG, unsolicited: 0, eapd: 0, power: 0 },
        }
    }
}

/// An output + input codec: DAC → line out, ADC ← line in (see the module documentation).
#[derive(Debug, Clone)]
pub struct LineCodec {
    s: Settings,
}

impl Default for LineCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl LineCodec {
    pub fn new() -> Self {
        LineCodec { s: Settings::power_on() }
    }

    fn parameter(&self, nid: u8, param: u8) -> u32 {
        match (nid, param) {
            (NID_ROOT, PARAM_VENDOR_ID) => VENDOR_ID,
            (NID_ROOT, PARAM_REVISION_ID) => REVISION_ID,
            (NID_ROOT, PARAM_NODE_COUNT) => (u32::from(NID_AFG) << 16) | 1,
            (NID_AFG, PARAM_NODE_COUNT) => (u32::from(NID_DAC) << 16) | 4,
            (NID_AFG, PARAM_FUNCTION_TYPE) => 0x01, // audio, no unsolicited responses
            (NID_AFG, PARAM_AUDIO_FG_CAPS) => 0,
            (NID_AFG, PARAM_POWER_STATES) => POWER_STATES,
            (NID_AFG, PARAM_GPIO_CAPS) => 0,
            (NID_AFG | NID_DAC | NID_ADC, PARAM_PCM) => PCM_CAPS,
            (NID_AFG | NID_DAC | NID_ADC, PARAM_STREAM_FORMATS) => STREAM_FORMATS,
            (NID_DAC, PARAM_WIDGET_CAPS) => DAC_CAPS,
            (NID_ADC, PARAM_WIDGET_CAPS) => ADC_CAPS,
            (NID_LINE_OUT, PARAM_WIDGET_CAPS) => LINE_OUT_CAPS,
            (NID_LINE_IN, PARAM_WIDGET_CAPS) => LINE_IN_CAPS,
            (NID_LINE_OUT, PARAM_PIN_CAPS) => PIN_CAPS_OUT,
            (NID_LINE_IN, PARAM_PIN_CAPS) => PIN_CAPS_IN,
            (NID_DAC, PARAM_AMP_OUT_CAPS) | (NID_ADC, PARAM_AMP_IN_CAPS) => AMP_CAPS,
            (NID_ADC | NID_LINE_OUT, PARAM_CONNECTION_LIST_LEN) => 1,
            _ => 0,
        }
    }

    /// The single entry of a node's connection list.
    fn connection(nid: u8) -> Option<u8> {
        match nid {
            NID_ADC => Some(NID_LINE_IN),
            NID_LINE_OUT => Some(NID_DAC),
            _ => None,
        }
    }

    fn converter(&mut self, nid: u8) -> Option<&mut Converter> {
        match nid {
            NID_DAC => Some(&mut self.s.dac),
            NID_ADC => Some(&mut self.s.adc),
            _ => None,
        }
    }

    fn pin(&mut self, nid: u8) -> Option<&mut Pin> {
        match nid {
            NID_LINE_OUT => Some(&mut self.s.line_out),
            NID_LINE_IN => Some(&mut self.s.line_in),
            _ => None,
        }
    }

    fn power(&mut self, nid: u8) -> Option<&mut u8> {
        match nid {
            NID_AFG => Some(&mut self.s.afg_power),
            NID_DAC => Some(&mut self.s.dac.power),
            NID_ADC => Some(&mut self.s.adc.power),
            NID_LINE_OUT => Some(&mut self.s.line_out.power),
            NID_LINE_IN => Some(&mut self.s.line_in.power),
            _ => None,
        }
    }

    /// The amplifier of `nid` in the given direction (each node has at most one, at index 0).
    fn amp(&mut self, nid: u8, output: bool) -> Option<&mut Amp> {
        match (nid, output) {
            (NID_DAC, true) => Some(&mut self.s.dac.amp),
            (NID_ADC, false) => Some(&mut self.s.adc.amp),
            _ => None,
        }
    }

    fn verb12(&mut self, nid: u8, verb: u32, payload: u8) -> u32 {
        match verb {
            VERB_GET_PARAMETER => self.parameter(nid, payload),
            VERB_GET_CONNECTION_SELECT if nid == NID_ADC => u32::from(self.s.adc_select),
            VERB_SET_CONNECTION_SELECT if nid == NID_ADC => {
                if payload == 0 {
                    self.s.adc_select = 0;
                }
                0
            }
            VERB_GET_CONNECTION_LIST => match Self::connection(nid) {
                Some(n) if payload == 0 => u32::from(n),
                _ => 0,
            },
            VERB_GET_POWER_STATE => self.power(nid).map_or(0, |p| (u32::from(*p) << 4) | u32::from(*p)),
            VERB_SET_POWER_STATE => {
                // D0..D3; the actual state follows at once.
                if let Some(p) = self.power(nid) {
                    *p = payload & 0x3;
                }
                0
            }
            VERB_GET_STREAM_CHANNEL => self.converter(nid).map_or(0, |c| u32::from(c.stream_channel)),
            VERB_SET_STREAM_CHANNEL => {
                if let Some(c) = self.converter(nid) {
                    c.stream_channel = payload;
                }
                0
            }
            VERB_GET_CHANNEL_COUNT => self.converter(nid).map_or(0, |c| u32::from(c.channel_count)),
            VERB_SET_CHANNEL_COUNT => {
                if let Some(c) = self.converter(nid) {
                    c.channel_count = payload & 0xF;
                }
                0
            }
            VERB_GET_PIN_CONTROL => self.pin(nid).map_or(0, |p| u32::from(p.control)),
            VERB_SET_PIN_CONTROL => {
                // Headphone drive, out enable, in enable, VRef: what a pin control has.
                if let Some(p) = self.pin(nid) {
                    p.control = payload & 0xE7;
                }
                0
            }
            VERB_GET_UNSOLICITED => match nid {
                NID_AFG => u32::from(self.s.afg_unsolicited),
                _ => self.pin(nid).map_or(0, |p| u32::from(p.unsolicited)),
            },
            VERB_SET_UNSOLICITED => {
                match nid {
                    NID_AFG => self.s.afg_unsolicited = payload & 0xBF,
                    _ => {
                        if let Some(p) = self.pin(nid) {
                            p.unsolicited = payload & 0xBF;
                        }
                    }
                }
                0
            }
            // Something is always plugged in (presence detect is not offered anyway).
            VERB_GET_PIN_SENSE => self.pin(nid).map_or(0, |_| 1 << 31),
            VERB_GET_EAPD => self.pin(nid).map_or(0, |p| u32::from(p.eapd)),
            VERB_SET_EAPD => {
                if let Some(p) = self.pin(nid) {
                    p.eapd = payload & 0x7;
                }
                0
            }
            VERB_GET_CONFIG_DEFAULT => self.pin(nid).map_or(0, |p| p.config),
            v @ VERB_SET_CONFIG_DEFAULT_0..=0x71F => {
                if let Some(p) = self.pin(nid) {
                    let shift = (v - VERB_SET_CONFIG_DEFAULT_0) * 8;
                    p.config = (p.config & !(0xFF << shift)) | (u32::from(payload) << shift);
                }
                0
            }
            VERB_GET_SUBSYSTEM_ID if nid == NID_AFG => SUBSYSTEM_ID,
            VERB_FUNCTION_RESET if nid == NID_AFG => {
                self.reset();
                0
            }
            _ => 0,
        }
    }

    fn verb4(&mut self, nid: u8, verb: u32, payload: u32) -> u32 {
        match verb {
            VERB4_SET_FORMAT => {
                if let Some(c) = self.converter(nid) {
                    c.format = payload as u16;
                }
                0
            }
            VERB4_GET_FORMAT => self.converter(nid).map_or(0, |c| u32::from(c.format)),
            VERB4_SET_AMP => {
                let value = (payload & 0xFF) as u8;
                let index = (payload >> 8) & 0xF;
                for (dir, output) in [(AMP_SET_OUTPUT, true), (AMP_SET_INPUT, false)] {
                    if payload & dir == 0 || index != 0 {
                        continue;
                    }
                    if let Some(amp) = self.amp(nid, output) {
                        for (side, bit) in [AMP_SET_LEFT, AMP_SET_RIGHT].into_iter().enumerate() {
                            if payload & bit != 0 {
                                amp.0[side] = value;
                            }
                        }
                    }
                }
                0
            }
            VERB4_GET_AMP => {
                let output = payload & AMP_GET_OUTPUT != 0;
                let side = if payload & AMP_GET_LEFT != 0 { 0 } else { 1 };
                match self.amp(nid, output) {
                    Some(amp) if payload & 0xF == 0 => u32::from(amp.0[side]),
                    _ => 0,
                }
            }
            _ => 0,
        }
    }
}

impl HdaCodec for LineCodec {
    fn command(&mut self, nid: u8, verb: u32) -> u32 {
        let verb = verb & 0xF_FFFF;
        match verb >> 16 {
            v @ (VERB4_SET_FORMAT | VERB4_SET_AMP | VERB4_GET_FORMAT | VERB4_GET_AMP | 0x4 | 0x5 | 0xC | 0xD) => {
                self.verb4(nid, v, verb & 0xFFFF)
            }
            _ => self.verb12(nid, verb >> 8, (verb & 0xFF) as u8),
        }
    }

    fn reset(&mut self) {
        self.s = Settings::power_on();
    }

    fn binding(&self, output: bool, tag: u8) -> Option<Binding> {
        let c = if output { &self.s.dac } else { &self.s.adc };
        (tag != 0 && c.tag() == tag).then(|| Binding { gain: c.amp.gain() })
    }

    fn save(&self, w: &mut Writer) {
        let s = &self.s;
        w.u8(s.afg_power);
        w.u8(s.afg_unsolicited);
        for c in [&s.dac, &s.adc] {
            w.u16(c.format);
            w.u8(c.stream_channel);
            w.u8(c.channel_count);
            w.u8(c.amp.0[0]);
            w.u8(c.amp.0[1]);
            w.u8(c.power);
        }
        w.u8(s.adc_select);
        for p in [&s.line_out, &s.line_in] {
            w.u8(p.control);
            w.u32(p.config);
            w.u8(p.unsolicited);
            w.u8(p.eapd);
            w.u8(p.power);
        }
    }

    fn restore(&mut self, r: &mut Reader) -> Result<(), StateError> {
        let mut s = Settings::power_on();
        s.afg_power = r.u8()? & 0x3;
        s.afg_unsolicited = r.u8()?;
        for c in [&mut s.dac, &mut s.adc] {
            c.format = r.u16()?;
            c.stream_channel = r.u8()?;
            c.channel_count = r.u8()? & 0xF;
            c.amp = Amp([r.u8()?, r.u8()?]);
            c.power = r.u8()? & 0x3;
        }
        s.adc_select = r.u8()?;
        if s.adc_select != 0 {
            return Err(StateError::Damaged(format!("an HD Audio codec with input {} selected", s.adc_select)));
        }
        for p in [&mut s.line_out, &mut s.line_in] {
            p.control = r.u8()? & 0xE7;
            p.config = r.u32()?;
            p.unsolicited = r.u8()?;
            p.eapd = r.u8()? & 0x7;
            p.power = r.u8()? & 0x3;
        }
        self.s = s;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(c: &mut LineCodec, nid: u8, p: u8) -> u32 {
        c.command(nid, (VERB_GET_PARAMETER << 8) | u32::from(p))
    }

    #[test]
    fn the_tree_is_what_a_generic_parser_walks() {
        let mut c = LineCodec::new();
        assert_eq!(param(&mut c, NID_ROOT, PARAM_VENDOR_ID), VENDOR_ID);
        assert_eq!(param(&mut c, NID_ROOT, PARAM_NODE_COUNT), 0x0001_0001);
        assert_eq!(param(&mut c, NID_AFG, PARAM_FUNCTION_TYPE) & 0xFF, 1, "audio function group");
        assert_eq!(param(&mut c, NID_AFG, PARAM_NODE_COUNT), 0x0002_0004);
        assert_eq!(c.command(NID_AFG, VERB_GET_SUBSYSTEM_ID << 8), SUBSYSTEM_ID);
        // Widget types: output, input, pin, pin.
        let types: Vec<u32> = (2..=5).map(|n| (param(&mut c, n, PARAM_WIDGET_CAPS) >> 20) & 0xF).collect();
        assert_eq!(types, [0, 1, 4, 4]);
        for nid in [NID_AFG, NID_DAC, NID_ADC] {
            let pcm = param(&mut c, nid, PARAM_PCM);
            assert_ne!(pcm & (1 << 17), 0, "16-bit");
            assert_eq!(pcm & 0x60, 0x60, "44.1 and 48 kHz");
            assert_eq!(param(&mut c, nid, PARAM_STREAM_FORMATS), 1);
        }
        assert_eq!(param(&mut c, NID_DAC, PARAM_AMP_OUT_CAPS), AMP_CAPS);
        assert_eq!(AMP_CAPS, 0x8002_3F3F);
        assert_eq!(param(&mut c, NID_ADC, PARAM_AMP_IN_CAPS), AMP_CAPS);
        // Connections: ADC <- line in, line out <- DAC.
        assert_eq!(param(&mut c, NID_ADC, PARAM_CONNECTION_LIST_LEN), 1);
        assert_eq!(c.command(NID_ADC, VERB_GET_CONNECTION_LIST << 8), u32::from(NID_LINE_IN));
        assert_eq!(c.command(NID_LINE_OUT, VERB_GET_CONNECTION_LIST << 8), u32::from(NID_DAC));
        assert_eq!(param(&mut c, NID_LINE_OUT, PARAM_PIN_CAPS), PIN_CAPS_OUT);
        assert_eq!(param(&mut c, NID_LINE_IN, PARAM_PIN_CAPS), PIN_CAPS_IN);
        // Line out (device 0) and line in (device 8), jacks at the rear.
        let out = c.command(NID_LINE_OUT, VERB_GET_CONFIG_DEFAULT << 8);
        let inp = c.command(NID_LINE_IN, VERB_GET_CONFIG_DEFAULT << 8);
        assert_eq!((out >> 30, (out >> 24) & 0x3F, (out >> 20) & 0xF), (0, 1, 0x0));
        assert_eq!((inp >> 30, (inp >> 24) & 0x3F, (inp >> 20) & 0xF), (0, 1, 0x8));
        // Unknown nodes and verbs answer 0.
        assert_eq!(param(&mut c, 9, PARAM_WIDGET_CAPS), 0);
        assert_eq!(c.command(NID_DAC, 0xF7A00), 0);
    }

    #[test]
    fn settings_round_trip_and_bind_streams() {
        let mut c = LineCodec::new();
        assert_eq!(c.binding(true, 0), None);
        c.command(NID_DAC, (VERB_SET_STREAM_CHANNEL << 8) | 0x50);
        assert_eq!(c.command(NID_DAC, VERB_GET_STREAM_CHANNEL << 8), 0x50);
        assert_eq!(c.binding(true, 5), Some(Binding { gain: [65536, 65536] }));
        assert_eq!(c.binding(false, 5), None);
        c.command(NID_DAC, (VERB4_SET_FORMAT << 16) | 0x0011);
        assert_eq!(c.command(NID_DAC, VERB4_GET_FORMAT << 16), 0x0011);
        // Mute the left output, -6 dB on the right.
        c.command(NID_DAC, (VERB4_SET_AMP << 16) | AMP_SET_OUTPUT | AMP_SET_LEFT | 0x80 | 63);
        c.command(NID_DAC, (VERB4_SET_AMP << 16) | AMP_SET_OUTPUT | AMP_SET_RIGHT | 55);
        assert_eq!(c.command(NID_DAC, (VERB4_GET_AMP << 16) | AMP_GET_OUTPUT | AMP_GET_LEFT), 0xBF);
        assert_eq!(c.command(NID_DAC, (VERB4_GET_AMP << 16) | AMP_GET_OUTPUT), 55);
        assert_eq!(c.command(NID_DAC, VERB4_GET_AMP << 16), 0, "the DAC has no input amplifier");
        let gain = c.binding(true, 5).unwrap().gain;
        assert_eq!(gain[0], 0);
        assert!((32_000..33_500).contains(&gain[1]), "{}", gain[1]);
        c.command(NID_LINE_OUT, (VERB_SET_PIN_CONTROL << 8) | 0x40);
        assert_eq!(c.command(NID_LINE_OUT, VERB_GET_PIN_CONTROL << 8), 0x40);
        c.command(NID_AFG, (VERB_SET_POWER_STATE << 8) | 3);
        assert_eq!(c.command(NID_AFG, VERB_GET_POWER_STATE << 8), 0x33);
        // Saved and restored, then reset.
        let mut w = Writer::new();
        c.save(&mut w);
        let mut d = LineCodec::new();
        let mut r = Reader::new("hda", &w.buf);
        d.restore(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(d.s, c.s);
        d.command(NID_AFG, VERB_FUNCTION_RESET << 8);
        assert_eq!(d.s, Settings::power_on());
    }
}
