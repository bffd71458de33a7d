//! Intel HD Audio (`porthole-vmm --sound hda`: PCI 8086:293E, ICH9 HDA, a line-out/line-in codec at codec
//! address 0) driven by the `hda` micro-guest (tests/guests/asm/hda.S), side by side with QEMU's own
//! `-device ich9-intel-hda -device hda-output`: the guest resets the controller, runs the CORB and RIRB,
//! walks codec 0's widgets (one `HDA node` line each), sets up the first output converter and an output pin
//! fed by it, and plays the tone of `porthole_tests::sound` through output stream descriptor 0: a BDL of 5
//! entries of 10 ms (the guest's static table of 24 whole waves), IOC on each, the ring cycled until N
//! periods have played (LPIB and its wraps; BCIS counted and cleared).
//!
//! - QEMU's WAV file holds the tone (see `porthole_tests::sound`). Debian 12's QEMU 7.2 has ich9-intel-hda
//!   and hda-output; the QEMU tests skip (with a line saying why) when no QEMU with both is at hand.
//! - An RFB client that takes QEMU's audio extension hears the tone from porthole-vmm's console, bracketed
//!   by begin and end, and from QEMU's VNC server, the reference for the client's side.
//! - Both devices play in real time: the guest's periods take at least 0.8 of their length from RUN to the
//!   N-th period (a lower bound only).
//!
//! Seen with QEMU 7.2 (Debian 12): GCAP 0x4401 (4 output, 4 input streams: output descriptor 0 at 0x100),
//! VMAJ 1 VMIN 0, STATESTS 0x0001; CORBSIZE and RIRBSIZE read 0x42 (256 entries, and writes are ignored);
//! CORBRP's reset bit and SDnCTL's SRST read back 1 at once. Codec 0: vendor 0x1af40012, revision
//! 0x00100101, root nodes 1+1, AFG node 1 with widgets 2+2:
//!   `HDA node 2 type=out caps=0x0000001d conn=[] ampout=0x80034a4a`
//!   `HDA node 3 type=pin caps=0x00400101 conn=[2] pincaps=0x00000010 cfg=0x00004010`
//! (the converter's output amp: mute capable, 0x4a+1 steps of 1 dB, 0 dB at step 0x4a, which is also its
//! gain after reset; the pin: output capable, no EAPD, no amp; line out, green). QEMU's controller starts no
//! DMA transfer while a BCIS is set, but one transfer (its codec's 1 ms timer asks for what is due, more
//! after a late guest) may cross several entries and set BCIS once (bcis 98-100 of 100). With N a
//! multiple of 5 it wraps LPIB to 0 in the transfer that completes the N-th period: lpib-wraps = N / 5.
//! RUN to the N-th period took 971-974 ms for N = 100 (the codec fetches ahead into an 8 KiB buffer), and
//! the WAV file held the tone for 966-973 ms, every sample exactly +-8000 (gain 0x4a is QEMU's full volume,
//! 255/255: no scaling), short of what was fetched by what was still in the codec's buffer when RUN went to
//! 0 (dropped). Its VNC server sent the begin 6.6-9.6 s after the client's enable (the
//! guest boots through SeaBIOS, emulated), then 1477-1482 ms of the 1500 ms tone, and an end before the
//! guest powered off in one run of four.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use porthole_tests::rfb::HeardAudio;
use porthole_tests::sound::{self, AMPLITUDE, Card, Engine, Guest, PERIOD_MS, Tone, field};

/// The hda guest and the ICH9 HDA controller with its codec on each engine. On QEMU ich9-intel-hda, so that
/// both engines show 8086:293E; SeaBIOS assigns its BAR (under -kernel too).
const CARD: Card = Card {
    guest: "hda",
    prefix: "hda",
    porthole: "hda",
    qemu: &["-device", "ich9-intel-hda", "-device", "hda-output,audiodev=snd0"],
};
/// How near 8000 the tone's amplitude must come out (a fraction).
const AMPLITUDE_WITHIN: f64 = 0.01;
/// The guest's table (and BDL ring) is 5 periods (BDL entries).
const TABLE_PERIODS: u64 = 5;
/// The most QEMU's hda-output codec holds between the controller's DMA and the audio backend (its buffer).
const QEMU_CODEC_BUFFER_MS: f64 = 8192.0 / 4.0 / 48.0;

/// A QEMU with ich9-intel-hda and hda-output: the system's (Debian 12's 7.2 has both) or the one
/// tests/hw/fetch-l0-qemu.sh unpacked; Err says why there is none.
fn qemu_with_hda() -> Result<PathBuf, String> {
    static QEMU: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    QEMU.get_or_init(|| {
        let candidates = [PathBuf::from("qemu-system-x86_64"), sound::fetched_qemu()];
        candidates.iter().find(|q| has_hda(q)).cloned().ok_or_else(|| {
            format!(
                "neither the system's qemu-system-x86_64 nor {} has ich9-intel-hda and hda-output",
                candidates[1].display()
            )
        })
    })
    .clone()
}

/// Whether `qemu` runs and has both devices (the help of each lists its options).
fn has_hda(qemu: &Path) -> bool {
    let help = |device: &str| sound::qemu_device_help(qemu, device).is_some_and(|h| h.contains("options"));
    help("ich9-intel-hda") && help("hda-output")
}

/// The QEMU for the QEMU tests, or None after printing why they are skipped.
fn qemu_or_skip() -> Option<PathBuf> {
    sound::qemu_or_skip("Intel HDA", qemu_with_hda())
}

/// The guest's summary line: `HDA done periods=N ms=M lpib-wraps=W bcis=B posbuf=P verbs=V unsolicited=U`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    periods: u64,
    ms: u64,
    wraps: u64,
    bcis: u64,
    posbuf: u64,
    verbs: u64,
}

fn summary(engine: Engine, out: &str) -> Summary {
    let line = sound::line_of(engine, out, "HDA done ");
    let num = |name: &str| sound::number(engine, line, name);
    Summary {
        periods: num("periods"),
        ms: num("ms"),
        wraps: num("lpib-wraps"),
        bcis: num("bcis"),
        posbuf: num("posbuf"),
        verbs: num("verbs"),
    }
}

/// One `HDA node` line: the node, its type, capabilities and connections.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Widget {
    node: u32,
    kind: String,
    caps: u32,
    conn: Vec<u32>,
    line: String,
}

fn hex(engine: Engine, v: &str) -> u32 {
    u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{engine:?}: {v} is not hex"))
}

fn widgets(engine: Engine, out: &str) -> Vec<Widget> {
    out.lines()
        .filter_map(|l| l.strip_prefix("HDA node ").map(|rest| (l, rest)))
        .map(|(line, rest)| {
            let node = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            let conn = field(engine, line, "conn");
            let conn = conn.trim_start_matches('[').trim_end_matches(']');
            Widget {
                node: node.unwrap_or_else(|| panic!("{engine:?}: {line:?}")),
                kind: field(engine, line, "type"),
                caps: hex(engine, &field(engine, line, "caps")),
                conn: conn.split(',').filter(|c| !c.is_empty()).map(|c| c.parse().unwrap_or(u32::MAX)).collect(),
                line: line.to_owned(),
            }
        })
        .collect()
}

/// The guest walked the codec, found its path and played `periods` periods; the summary and the widgets.
/// Asserted: what any HDA controller with an output converter feeding an output pin must show (QEMU's and
/// porthole-vmm's differ in their figures, which are printed, not compared).
fn assert_played(engine: Engine, out: &str, periods: u64) -> (Summary, Vec<Widget>) {
    sound::assert_lines_in_order(
        engine,
        out,
        &[
            "HDA periods=",
            "HDA pci slot=",
            " id=8086:293e ",
            "HDA gcap=",
            "HDA corbsize=",
            "HDA codec vendor=",
            "HDA afg node=",
            "HDA node ",
            "HDA path dac=",
            "HDA dac fmt=0x0011 conv=0x10 ",
            "HDA pin ctl=0x40 ",
            "HDA stream sd=",
            "HDA running\n",
            "HDA done ",
        ],
    );
    let statests = out.lines().find(|l| l.starts_with("HDA gcap=")).map(|l| hex(engine, &field(engine, l, "statests")));
    assert_eq!(statests.map(|s| s & 1), Some(1), "{engine:?}: codec 0 present; serial:\n{out}");

    // The path: an audio output converter, and an output-capable pin whose connection list has it.
    let w = widgets(engine, out);
    let path = out.lines().find(|l| l.starts_with("HDA path ")).unwrap();
    let dac: u32 = field(engine, path, "dac").parse().unwrap();
    let pin: u32 = field(engine, path, "pin").parse().unwrap();
    let node = |n: u32| w.iter().find(|x| x.node == n).unwrap_or_else(|| panic!("{engine:?}: no node {n}:\n{out}"));
    assert_eq!(node(dac).kind, "out", "{engine:?}: the converter {dac}:\n{out}");
    assert_eq!(node(dac).caps >> 20 & 15, 0, "{engine:?}: converter type in its caps");
    assert_eq!(node(pin).kind, "pin", "{engine:?}: the pin {pin}:\n{out}");
    assert!(node(pin).conn.contains(&dac), "{engine:?}: pin {pin} connected to {dac}:\n{out}");
    let pincaps = field(engine, &node(pin).line, "pincaps");
    assert_ne!(hex(engine, &pincaps) & 0x10, 0, "{engine:?}: pin {pin} output capable:\n{out}");

    let s = summary(engine, out);
    assert_eq!(s.periods, periods, "{engine:?}: every period played; serial:\n{out}");
    // LPIB wraps once per 5 periods; the N-th may or may not show its wrap before the guest stops.
    let full = periods / TABLE_PERIODS;
    assert!(
        s.wraps == full || s.wraps + 1 == full,
        "{engine:?}: {} LPIB wraps for {periods} periods of a {TABLE_PERIODS}-period ring; serial:\n{out}",
        s.wraps
    );
    // BCIS is set for every BDL entry with IOC, IOCE or not (spec 1.0a, 3.3.35): the guest, polling, sees
    // most of them (QEMU merges a few when one of its transfers crosses entries).
    assert!(
        s.bcis >= periods / 2 && s.bcis <= periods,
        "{engine:?}: BCIS seen {} times for {periods} periods with IOC; serial:\n{out}",
        s.bcis
    );
    (s, w)
}

/// The device plays in real time: RUN to the N-th period takes at least 0.8 of the periods' length.
fn assert_paced(engine: Engine, s: &Summary) {
    sound::assert_paced(engine, s.periods, s.ms, "RUN to the last period");
}

/// QEMU plays the guest's tone into its WAV file: the guest's driver works on a controller and codec that
/// are not ours.
#[test]
fn the_guest_plays_a_tone_on_qemus_hda() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 100;
    let mut guest = Guest::start(&CARD, Engine::Qemu, periods, Some(&qemu));
    let out = guest.finish();
    eprintln!("QEMU ({}):\n{out}", qemu.display());
    let (s, _) = assert_played(Engine::Qemu, &out, periods);
    // QEMU's controller wraps LPIB to 0 in the transfer that completes the ring, which also sets BCIS, and
    // starts no transfer while BCIS is set: the guest sees the N-th period's wrap before it stops.
    assert_eq!(s.wraps, periods / TABLE_PERIODS, "QEMU's LPIB wraps:\n{out}");
    assert_paced(Engine::Qemu, &s);

    let (bytes, left) = sound::played_into_wav(&guest.wav);
    let tone = Tone::of(left.iter().copied());
    eprintln!("QEMU: WAV {bytes} bytes, tone {tone}; the guest's RUN to period {periods}: {} ms", s.ms);
    tone.assert_is_the_tone("QEMU's WAV file", AMPLITUDE_WITHIN);
    // At 0 dB (the guest sets the converter's amp to its offset step, 0x4a, which QEMU maps to full
    // volume, 255/255) QEMU's mixing engine passes S16 through unscaled: every sample is +-8000 or silence.
    assert!(left.iter().all(|&v| v == 0 || f64::from(v.unsigned_abs()) == AMPLITUDE), "QEMU scaled the samples");
    // The file holds what QEMU's codec handed to the backend: at most all that was fetched (N periods and the
    // few bytes fetched before RUN went to 0, up to one 10 ms timer period of the backend), and on an idle
    // machine all of it but what was still in the codec's 8 KiB buffer, dropped at RUN = 0; on a loaded one
    // QEMU's audio timer comes late and drops more (the peer's timing, not the guest's): at least half.
    let expected_ms = (periods * PERIOD_MS) as f64;
    assert!(
        tone.ms() <= expected_ms + 10.0 && tone.ms() >= (expected_ms - QEMU_CODEC_BUFFER_MS - 10.0) * 0.5,
        "QEMU's WAV file holds {:.1} ms of the tone, not about {expected_ms} ms",
        tone.ms()
    );
}

/// What a client of the engine's VNC server heard while the guest played `periods` periods
/// (`sound::listen`), and the guest's summary.
fn listen(engine: Engine, periods: u64, qemu: Option<&Path>) -> (Summary, Vec<HeardAudio>) {
    let guest = Guest::start(&CARD, engine, periods, qemu);
    // The end comes when the guest stops its stream (RUN <- 0); it prints its summary once RUN reads back 0.
    let stopped = |serial: &str| serial.contains("HDA done ") || serial.contains("HDA FAIL");
    let (out, heard) = sound::listen(guest, stopped, stopped);
    (assert_played(engine, &out, periods).0, heard)
}

/// The audio messages a client heard are one begin, data and (`end`, see `sound::assert_heard_the_tone`) an
/// end or none, and the data is the guest's tone.
fn assert_heard_the_tone(engine: Engine, heard: &[HeardAudio], s: &Summary, end: Option<bool>) -> Tone {
    let played = format!(
        "the guest's RUN to period {}: {} ms (lpib-wraps {}, bcis {}, posbuf {}, verbs {})",
        s.periods, s.ms, s.wraps, s.bcis, s.posbuf, s.verbs
    );
    sound::assert_heard_the_tone(engine, heard, end, AMPLITUDE_WITHIN, &played)
}

/// The same client and the same guest with QEMU's VNC server (`-vnc ...,audiodev=`): the reference for
/// the client's side of the audio extension.
#[test]
fn qemus_vnc_server_plays_the_hda_guests_tone_to_an_rfb_client() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 150;
    let (s, heard) = listen(Engine::Qemu, periods, Some(&qemu));
    // Whether QEMU's capture hears of the stop (its end) before the guest powers off depends on when its
    // mixing engine next runs dry: either is right here.
    assert_heard_the_tone(Engine::Qemu, &heard, &s, None);
    assert_paced(Engine::Qemu, &s);
}

/// porthole-vmm's console: a client that takes QEMU's audio extension hears the guest's tone, between a
/// begin and an end that comes once the guest stopped its stream; the device played it in real time.
/// Until porthole-vmm has `--sound hda` this fails at once: clap's "invalid value 'hda'".
#[test]
fn porthole_vmm_plays_the_hda_guests_tone_to_an_rfb_client() {
    // 1.5 s: the client enables the sound while the guest boots, and hears at least a second of it.
    let periods = 150;
    let (s, heard) = listen(Engine::Porthole, periods, None);
    assert_heard_the_tone(Engine::Porthole, &heard, &s, Some(true));
    assert_paced(Engine::Porthole, &s);
}

/// The same guest on both engines, QEMU first (so that its lines show even while porthole-vmm lacks the
/// device): each engine's codec widgets printed as soon as it ran, and what both must share asserted (an
/// output converter feeding an output pin, every period played, real-time pacing); the figures each device
/// chooses are printed, not compared.
#[test]
fn both_engines_show_their_widgets_and_play_every_period() {
    let periods = 50;
    let show = |engine: Engine, out: &str| {
        let (s, w) = assert_played(engine, out, periods);
        let setup = ["HDA pci", "HDA gcap", "HDA corbsize", "HDA codec", "HDA afg", "HDA path", "HDA dac", "HDA pin"];
        let lines: Vec<&str> = out.lines().filter(|l| setup.iter().any(|p| l.starts_with(p))).collect();
        let nodes: Vec<&str> = w.iter().map(|x| x.line.as_str()).collect();
        eprintln!("{engine:?}:\n  {}\n  {}\n  {s:?}", lines.join("\n  "), nodes.join("\n  "));
        assert_paced(engine, &s);
    };
    if let Some(qemu) = qemu_or_skip() {
        let out = Guest::start(&CARD, Engine::Qemu, periods, Some(&qemu)).finish();
        show(Engine::Qemu, &out);
    }
    let out = Guest::start(&CARD, Engine::Porthole, periods, None).finish();
    show(Engine::Porthole, &out);
}
