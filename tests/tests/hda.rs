//! Intel HD Audio (`porthole-vmm --sound hda`: PCI 8086:293E, ICH9 HDA, a line-out/line-in codec at codec
//! address 0) driven by the `hda` micro-guest (tests/guests/asm/hda.S), side by side with QEMU's own
//! `-device ich9-intel-hda -device hda-output`: the guest resets the controller, runs the CORB and RIRB,
//! walks codec 0's widgets (one `HDA node` line each), sets up the first output converter and an output pin
//! fed by it, and plays a 480 Hz square wave (50 frames at +8000, 50 at -8000, both channels, S16 stereo at
//! 48000 Hz) through output stream descriptor 0: a BDL of 5 entries of 10 ms (the guest's static table of
//! 24 whole waves), IOC on each, the ring cycled until N periods have played (LPIB and its wraps; BCIS
//! counted and cleared).
//!
//! - QEMU writes what the guest plays to a WAV file (`-audiodev wav`): the file holds the tone, which proves
//!   the guest independently of porthole-vmm's device. Debian 12's QEMU 7.2 has ich9-intel-hda and
//!   hda-output; the QEMU tests skip (with a line saying why) when no QEMU with both is at hand.
//! - porthole-vmm's console sends what the guest plays to an RFB client that takes QEMU's audio extension
//!   (pseudo-encoding -259): the client hears the tone, bracketed by begin and end. The same client hears
//!   it from QEMU's VNC server (`-vnc unix:PATH,audiodev=`), the reference for the client's side.
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
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use porthole_tests::rfb::{self, HeardAudio, RfbClient, ServerMessage, ServerMessages};
use porthole_tests::{Killed, Scratch, repo_root, text, wait_until, workspace_bin};

/// Generous: the guest's instructions are emulated here; a run takes seconds.
const LIMIT: Duration = Duration::from_secs(90);
/// The guest's tone: frequency, frames per second, amplitude.
const TONE_HZ: f64 = 480.0;
const RATE: u32 = 48_000;
const AMPLITUDE: f64 = 8000.0;
/// A period (one BDL entry) is 10 ms; the guest's table (and BDL ring) is 5 of them.
const PERIOD_MS: u64 = 10;
const TABLE_PERIODS: u64 = 5;
/// The most QEMU's hda-output codec holds between the controller's DMA and the audio backend (its buffer).
const QEMU_CODEC_BUFFER_MS: f64 = 8192.0 / 4.0 / 48.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Porthole,
    Qemu,
}

/// The guest running on one engine: its serial in a file, its console on a VNC Unix socket and (QEMU) its
/// sound in a WAV file.
struct Guest {
    engine: Engine,
    child: Killed,
    serial: PathBuf,
    vnc: PathBuf,
    wav: PathBuf,
    dir: Scratch,
}

impl Guest {
    /// The guest playing `periods` periods; `qemu`: the QEMU for [`Engine::Qemu`].
    fn start(engine: Engine, periods: u64, qemu: Option<&Path>) -> Guest {
        let dir = Scratch::new(&format!("hda-{engine:?}").to_lowercase());
        let (serial, vnc, wav) = (dir.path("serial.log"), dir.path("vnc.sock"), dir.path("sound.wav"));
        let guest = porthole_guests::path("hda");
        let cmdline = format!("hda.periods={periods}");
        let mut cmd = match engine {
            Engine::Porthole => {
                let mut c = Command::new(workspace_bin("porthole-vmm"));
                c.arg("--kernel")
                    .arg(&guest)
                    .args(["--memory", "64", "--vga", "std", "--sound", "hda", "--cmdline", &cmdline])
                    .arg("--serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("--vnc")
                    .arg(format!("unix:{}", vnc.display()));
                c
            }
            Engine::Qemu => {
                let mut c = Command::new(qemu.expect("a QEMU with ich9-intel-hda"));
                // -cpu host as sound.rs has it (without arch-capabilities: MSR 0x10a kills QEMU on this
                // KVM). ich9-intel-hda, so that both engines show 8086:293E; SeaBIOS assigns its BAR (under
                // -kernel too). The WAV backend at the guest's rate, so that QEMU does not resample.
                c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
                    .args(["-nodefaults", "-no-reboot", "-display", "none", "-vga", "std", "-audiodev"])
                    .arg(format!(
                        "wav,id=snd0,path={},out.frequency={RATE},out.channels=2,out.format=s16",
                        wav.display()
                    ))
                    .args(["-device", "ich9-intel-hda", "-device", "hda-output,audiodev=snd0"])
                    // Its VNC server hears the same audiodev (QEMU's audio extension, as porthole-vmm's).
                    .arg("-vnc")
                    .arg(format!("unix:{},audiodev=snd0", vnc.display()))
                    .arg("-serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("-kernel")
                    .arg(&guest)
                    .args(["-append", &cmdline]);
                c
            }
        };
        let stderr = std::fs::File::create(dir.path("stderr.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {engine:?}: {e}"));
        Guest { engine, child: Killed(child), serial, vnc, wav, dir }
    }

    fn output(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    fn stderr(&self) -> String {
        text(&std::fs::read(self.dir.path("stderr.log")).unwrap_or_default())
    }

    /// Waits for the guest to power off (the engine exits with status 0); its serial output.
    fn finish(&mut self) -> String {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{:?} exited with {status}: {}\n{}",
                    self.engine,
                    self.stderr(),
                    self.output()
                );
                return self.output();
            }
            assert!(start.elapsed() < LIMIT, "{:?} still running; serial:\n{}", self.engine, self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A QEMU with ich9-intel-hda and hda-output: the system's (Debian 12's 7.2 has both) or the one
/// tests/hw/fetch-l0-qemu.sh unpacked; Err says why there is none.
fn qemu_with_hda() -> Result<PathBuf, String> {
    static QEMU: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    QEMU.get_or_init(|| {
        let dir = std::env::var_os("PORTHOLE_HW_L0_QEMU_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/hw-l0-qemu"));
        let candidates = [PathBuf::from("qemu-system-x86_64"), dir.join("usr/bin/qemu-system-x86_64")];
        candidates.iter().find(|q| has_hda(q)).cloned().ok_or_else(|| {
            format!(
                "neither the system's qemu-system-x86_64 nor {} has ich9-intel-hda and hda-output",
                candidates[1].display()
            )
        })
    })
    .clone()
}

/// Whether `qemu` runs and has both devices (`-device NAME,help` for each; `-device help` would load every
/// module, and the system's modules abort a QEMU of another build).
fn has_hda(qemu: &Path) -> bool {
    let help = |device: &str| {
        Command::new(qemu)
            .args(["-device", &format!("{device},help")])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success() && text(&o.stdout).contains("options"))
    };
    help("ich9-intel-hda") && help("hda-output")
}

/// The QEMU for the QEMU tests, or None after printing why they are skipped.
fn qemu_or_skip() -> Option<PathBuf> {
    match qemu_with_hda() {
        Ok(q) => Some(q),
        Err(why) => {
            eprintln!("SKIP: no QEMU with Intel HDA: {why}");
            None
        }
    }
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

fn field(engine: Engine, line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{engine:?}: no {name}= in {line:?}"))
        .to_owned()
}

fn summary(engine: Engine, out: &str) -> Summary {
    let line = out
        .lines()
        .find(|l| l.starts_with("HDA done "))
        .unwrap_or_else(|| panic!("{engine:?}: no `HDA done` line; serial:\n{out}"));
    let num = |name: &str| -> u64 {
        let v = field(engine, line, name);
        v.parse().unwrap_or_else(|_| panic!("{engine:?}: {name}={v} in {line:?}"))
    };
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
    let mut rest = out;
    for line in [
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
    ] {
        match rest.find(line) {
            Some(at) => rest = &rest[at + line.len()..],
            None => panic!("{engine:?}: {line:?} missing (in this order); serial:\n{out}"),
        }
    }
    assert!(!out.contains("FAIL") && !out.contains("bad-word"), "{engine:?}:\n{out}");
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

/// The device plays in real time: RUN to the N-th period takes at least 0.8 of the periods' length (no
/// upper bound: a slow machine only makes it longer).
fn assert_paced(engine: Engine, s: &Summary) {
    let floor = s.periods * PERIOD_MS * 8 / 10;
    assert!(
        s.ms >= floor,
        "{engine:?} played {} periods of {PERIOD_MS} ms in {} ms, under {floor} ms: not paced in real time",
        s.periods,
        s.ms
    );
}

/// What a channel of S16 samples holds: the loud samples (|s| >= half the amplitude; silence and the
/// edges of the sound left out), how often their sign changes, and their mean magnitude.
#[derive(Debug, Clone, Copy)]
struct Tone {
    /// Loud frames.
    frames: usize,
    sign_changes: usize,
    mean_magnitude: f64,
    /// Frequency from the sign changes over the loud frames' duration.
    hz: f64,
}

impl Tone {
    fn of(samples: impl Iterator<Item = i16>) -> Tone {
        let loud: Vec<i16> = samples.filter(|s| f64::from(s.unsigned_abs()) >= AMPLITUDE / 2.0).collect();
        let sign_changes = loud.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        let frames = loud.len();
        let mean_magnitude = loud.iter().map(|s| f64::from(s.unsigned_abs())).sum::<f64>() / (frames.max(1) as f64);
        let seconds = frames as f64 / f64::from(RATE);
        let hz = if frames == 0 { 0.0 } else { sign_changes as f64 / 2.0 / seconds };
        Tone { frames, sign_changes, mean_magnitude, hz }
    }

    /// The frames as milliseconds.
    fn ms(&self) -> f64 {
        self.frames as f64 * 1000.0 / f64::from(RATE)
    }

    /// A 480 Hz square wave (within 2%) of amplitude 8000 (within 1%).
    fn assert_is_the_tone(&self, what: &str) {
        assert!((self.hz - TONE_HZ).abs() <= TONE_HZ * 0.02, "{what}: {:.1} Hz, not {TONE_HZ} ({self:?})", self.hz);
        assert!(
            (self.mean_magnitude - AMPLITUDE).abs() <= AMPLITUDE * 0.01,
            "{what}: amplitude {:.0}, not {AMPLITUDE} ({self:?})",
            self.mean_magnitude
        );
    }
}

/// A WAV file's (channels, rate, bits per sample) and its data (the "data" chunk; to the end of the file
/// when its size was left unwritten).
fn read_wav(path: &Path) -> ((u16, u32, u16), Vec<u8>) {
    let file = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        file.len() >= 12 && &file[0..4] == b"RIFF" && &file[8..12] == b"WAVE",
        "{}: not a WAV file",
        path.display()
    );
    let (mut format, mut at) = (None, 12);
    while at + 8 <= file.len() {
        let id = &file[at..at + 4];
        let size = u32::from_le_bytes(file[at + 4..at + 8].try_into().unwrap()) as usize;
        let body = at + 8;
        if id == b"fmt " {
            let f = &file[body..body + 16];
            let tag = u16::from_le_bytes([f[0], f[1]]);
            assert_eq!(tag, 1, "{}: PCM", path.display());
            format = Some((
                u16::from_le_bytes([f[2], f[3]]),
                u32::from_le_bytes(f[4..8].try_into().unwrap()),
                u16::from_le_bytes([f[14], f[15]]),
            ));
        } else if id == b"data" {
            let end = if size == 0 || body + size > file.len() { file.len() } else { body + size };
            return (format.expect("fmt before data"), file[body..end].to_vec());
        }
        at = body + size + (size & 1);
    }
    panic!("{}: no data chunk", path.display());
}

/// QEMU plays the guest's tone into its WAV file: the guest's driver works on a controller and codec that
/// are not ours.
#[test]
fn the_guest_plays_a_tone_on_qemus_hda() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 100;
    let mut guest = Guest::start(Engine::Qemu, periods, Some(&qemu));
    let out = guest.finish();
    eprintln!("QEMU ({}):\n{out}", qemu.display());
    let (s, _) = assert_played(Engine::Qemu, &out, periods);
    // QEMU's controller wraps LPIB to 0 in the transfer that completes the ring, which also sets BCIS, and
    // starts no transfer while BCIS is set: the guest sees the N-th period's wrap before it stops.
    assert_eq!(s.wraps, periods / TABLE_PERIODS, "QEMU's LPIB wraps:\n{out}");
    assert_paced(Engine::Qemu, &s);

    let ((nchannels, rate, bits), data) = read_wav(&guest.wav);
    assert_eq!((nchannels, rate, bits), (2, RATE, 16), "the WAV file's format");
    let (left, right) = rfb::s16le_stereo(&data);
    assert_eq!(left, right, "both channels the same");
    let tone = Tone::of(left.iter().copied());
    eprintln!(
        "QEMU: WAV {} bytes, tone {:.1} Hz over {:.1} ms ({} frames, {} sign changes, amplitude {:.0}); the guest's \
         RUN to period {periods}: {} ms",
        data.len(),
        tone.hz,
        tone.ms(),
        tone.frames,
        tone.sign_changes,
        tone.mean_magnitude,
        s.ms
    );
    tone.assert_is_the_tone("QEMU's WAV file");
    // At 0 dB (the guest sets the converter's amp to its offset step, 0x4a, which QEMU maps to full
    // volume, 255/255) QEMU's mixing engine passes S16 through unscaled: every sample is +-8000 or silence.
    assert!(left.iter().all(|&v| v == 0 || f64::from(v.unsigned_abs()) == AMPLITUDE), "QEMU scaled the samples");
    // The file holds what QEMU's codec handed to the backend: all that was fetched (N periods and the few
    // bytes fetched before RUN went to 0) but for what was still in the codec's 8 KiB buffer, dropped at
    // RUN = 0, and up to one 10 ms timer period of the backend.
    let expected_ms = (periods * PERIOD_MS) as f64;
    assert!(
        tone.ms() <= expected_ms + 10.0 && tone.ms() >= expected_ms - QEMU_CODEC_BUFFER_MS - 10.0,
        "QEMU's WAV file holds {:.1} ms of the tone, not about {expected_ms} ms",
        tone.ms()
    );
}

/// What a client of the engine's VNC server heard while the guest played `periods` periods: the guest's
/// serial output and summary, and the audio messages. The client connects at once, lists raw and the audio
/// pseudo-encoding, asks for a whole frame, starts the audio (rfb::start_audio: S16 stereo at 48000 Hz);
/// then reads until the VM ends (the connection closes) or an end has come after the guest's summary line.
fn listen(engine: Engine, periods: u64, qemu: Option<&Path>) -> (String, Summary, Vec<HeardAudio>) {
    let mut guest = Guest::start(engine, periods, qemu);
    let start = Instant::now();
    while !guest.vnc.exists() {
        if let Some(status) = guest.child.0.try_wait().unwrap() {
            panic!("{engine:?} exited ({status}) before its VNC socket came; stderr:\n{}", guest.stderr());
        }
        assert!(start.elapsed() < LIMIT, "{engine:?}: no VNC socket; stderr:\n{}", guest.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let serial = || text(&std::fs::read(&guest.serial).unwrap_or_default());
    let mut c = RfbClient::connect(&guest.vnc, None).unwrap_or_else(|e| panic!("{engine:?}: connect: {e:?}"));
    let mut messages = ServerMessages::of(&c).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.set_encodings(&[rfb::RAW, rfb::QEMU_AUDIO]).unwrap();
    c.request(false).unwrap();
    let deadline = Instant::now() + LIMIT;
    let enabled = rfb::start_audio(&mut c, &mut messages, (rfb::QEMU_AUDIO_S16, 2, RATE), deadline)
        .unwrap_or_else(|e| panic!("{engine:?}: starting the audio: {e}; serial:\n{}", serial()));

    let mut heard = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "{engine:?}: gave up listening; heard {} messages; serial:\n{}",
            heard.len(),
            serial()
        );
        match messages.read_message() {
            Ok(ServerMessage::AudioBegin) => heard.push(HeardAudio::Begin(enabled.elapsed())),
            Ok(ServerMessage::AudioData(d)) => heard.push(HeardAudio::Data(enabled.elapsed(), d)),
            Ok(ServerMessage::AudioEnd) => {
                heard.push(HeardAudio::End(enabled.elapsed()));
                // The end comes when the guest stops its stream (RUN <- 0); it prints its summary once RUN
                // reads back 0.
                wait_until(
                    LIMIT,
                    || serial().contains("HDA done ") || serial().contains("HDA FAIL"),
                    || format!("{engine:?}: an audio end, but the guest did not stop; serial:\n{}", serial()),
                );
                break;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                break;
            }
            Err(e) => panic!("{engine:?}: listening: {e}; heard {} messages; serial:\n{}", heard.len(), serial()),
        }
    }
    let out = guest.finish();
    drop(c);
    eprintln!("{engine:?}:\n{out}");
    let (s, _) = assert_played(engine, &out, periods);
    (out, s, heard)
}

/// The audio messages a client heard are one begin, data and (`end`: Some(true) one end, Some(false) none,
/// None either) at most one end, nothing before the begin and no data after the end, and the data is at
/// least half a second of the guest's tone; returns the tone.
fn assert_heard_the_tone(engine: Engine, heard: &[HeardAudio], s: &Summary, end: Option<bool>) -> Tone {
    let kinds: Vec<&str> = heard.iter().map(HeardAudio::kind).collect();
    let begin = kinds.iter().position(|k| *k == "begin").unwrap_or_else(|| panic!("{engine:?}: no begin: {kinds:?}"));
    assert_eq!(begin, 0, "{engine:?}: the first audio message is the begin: {kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "begin").count(), 1, "{engine:?}: one begin: {kinds:?}");
    let ends = kinds.iter().filter(|k| **k == "end").count();
    match end {
        Some(true) => assert_eq!(ends, 1, "{engine:?}: one end: {kinds:?}"),
        Some(false) => assert_eq!(ends, 0, "{engine:?}: no end: {kinds:?}"),
        None => assert!(ends <= 1, "{engine:?}: at most one end: {kinds:?}"),
    }
    let last = match kinds.iter().position(|k| *k == "end") {
        Some(at) => {
            assert!(kinds[at + 1..].iter().all(|k| *k != "data"), "{engine:?}: no data after the end: {kinds:?}");
            at
        }
        None => heard.len() - 1,
    };
    let data = HeardAudio::data_of(&heard[begin..=last]);
    assert_eq!(data.len() % 4, 0, "{engine:?}: whole S16 stereo frames");
    let (left, right) = rfb::s16le_stereo(&data);
    assert_eq!(left, right, "{engine:?}: both channels the same");
    let tone = Tone::of(left.into_iter());
    eprintln!(
        "{engine:?}: the client heard {} messages ({ends} end; begin {} ms, last {} ms after enabling), {} bytes: \
         tone {:.1} Hz over {:.1} ms ({} frames, {} sign changes, amplitude {:.0}); the guest's RUN to period {}: \
         {} ms (lpib-wraps {}, bcis {}, posbuf {}, verbs {})",
        heard.len(),
        heard[begin].at().as_millis(),
        heard[last].at().as_millis(),
        data.len(),
        tone.hz,
        tone.ms(),
        tone.frames,
        tone.sign_changes,
        tone.mean_magnitude,
        s.periods,
        s.ms,
        s.wraps,
        s.bcis,
        s.posbuf,
        s.verbs
    );
    tone.assert_is_the_tone(&format!("what the client of {engine:?} heard"));
    assert!(tone.ms() >= 500.0, "{engine:?}: the client heard only {:.1} ms of the tone", tone.ms());
    tone
}

/// The same client and the same guest with QEMU's VNC server (`-vnc ...,audiodev=`): the reference for
/// the client's side of the audio extension.
#[test]
fn qemus_vnc_server_plays_the_hda_guests_tone_to_an_rfb_client() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 150;
    let (_, s, heard) = listen(Engine::Qemu, periods, Some(&qemu));
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
    let (_, s, heard) = listen(Engine::Porthole, periods, None);
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
        let out = Guest::start(Engine::Qemu, periods, Some(&qemu)).finish();
        show(Engine::Qemu, &out);
    }
    let out = Guest::start(Engine::Porthole, periods, None).finish();
    show(Engine::Porthole, &out);
}
