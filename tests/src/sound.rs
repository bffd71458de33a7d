//! What the sound tests (tests/tests/sound.rs: virtio-sound; tests/tests/hda.rs: Intel HD Audio) share: a
//! sound micro-guest that plays a 480 Hz square wave (50 frames at +8000, 50 at -8000, both channels, S16
//! stereo at 48000 Hz) in periods of 10 ms, run side by side on porthole-vmm and on QEMU with its own
//! device, and three ways to check what it played:
//!
//! - QEMU writes what the guest plays to a WAV file (`-audiodev wav`, at the guest's rate so that QEMU does
//!   not resample): the file holds the tone ([`played_into_wav`], [`Tone`]), which proves the guest
//!   independently of porthole-vmm's device.
//! - porthole-vmm's console sends what the guest plays to an RFB client that takes QEMU's audio extension
//!   (pseudo-encoding -259): the client hears the tone, bracketed by begin and end ([`listen`],
//!   [`assert_heard_the_tone`]). The same client hears it from QEMU's VNC server (`-vnc
//!   unix:PATH,audiodev=`), the reference for the client's side.
//! - The device plays in real time: the guest's periods take at least 0.8 of their length ([`assert_paced`],
//!   a lower bound only).
//!
//! Each test file keeps what is its device's own: the guest's lines and summary, the device's options on
//! each engine ([`Card`]), which QEMU has the device, and the assertions that differ.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::rfb::{self, HeardAudio, ServerMessage};
use crate::{Killed, Scratch, repo_root, text, wait_until, workspace_bin};

/// Generous: the guest's instructions are emulated here; a run takes seconds.
pub const LIMIT: Duration = Duration::from_secs(90);
/// The guest's tone: frequency, frames per second, amplitude.
pub const TONE_HZ: f64 = 480.0;
pub const RATE: u32 = 48_000;
pub const AMPLITUDE: f64 = 8000.0;
/// A period is 10 ms.
pub const PERIOD_MS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Porthole,
    Qemu,
}

/// A sound micro-guest and the device it drives on each engine.
pub struct Card {
    /// The micro-guest (`porthole_guests::path`).
    pub guest: &'static str,
    /// Its kernel parameters' prefix (`PREFIX.periods=N`), also the scratch folders' tag.
    pub prefix: &'static str,
    /// porthole-vmm's `--sound` value.
    pub porthole: &'static str,
    /// QEMU's arguments for the device, playing to the audiodev `snd0`.
    pub qemu: &'static [&'static str],
}

/// The guest running on one engine: its serial in a file, its console on a VNC Unix socket and (QEMU) its
/// sound in a WAV file.
pub struct Guest {
    pub engine: Engine,
    pub child: Killed,
    pub serial: PathBuf,
    pub vnc: PathBuf,
    pub wav: PathBuf,
    dir: Scratch,
}

impl Guest {
    /// `card`'s guest playing `periods` periods; `qemu`: the QEMU for [`Engine::Qemu`].
    pub fn start(card: &Card, engine: Engine, periods: u64, qemu: Option<&Path>) -> Guest {
        let vmm = if engine == Engine::Porthole { workspace_bin("porthole-vmm") } else { PathBuf::new() };
        Guest::start_with(card, engine, periods, qemu, &vmm)
    }

    /// As [`Guest::start`], with the porthole-vmm binary `vmm` (a benchmark's release build).
    pub fn start_with(card: &Card, engine: Engine, periods: u64, qemu: Option<&Path>, vmm: &Path) -> Guest {
        let dir = Scratch::new(&format!("{}-{engine:?}", card.prefix).to_lowercase());
        let (serial, vnc, wav) = (dir.path("serial.log"), dir.path("vnc.sock"), dir.path("sound.wav"));
        let guest = porthole_guests::path(card.guest);
        let cmdline = format!("{}.periods={periods}", card.prefix);
        let mut cmd = match engine {
            Engine::Porthole => {
                let mut c = Command::new(vmm);
                c.arg("--kernel")
                    .arg(&guest)
                    .args(["--memory", "64", "--vga", "std", "--sound", card.porthole, "--cmdline", &cmdline])
                    .arg("--serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("--vnc")
                    .arg(format!("unix:{}", vnc.display()));
                c
            }
            Engine::Qemu => {
                let mut c = Command::new(qemu.unwrap_or_else(|| panic!("a QEMU with {:?}", card.qemu)));
                // -cpu host as agent.rs and gpu.rs have it (without arch-capabilities: MSR 0x10a kills QEMU
                // on this KVM). The WAV backend at the guest's rate, so that QEMU does not resample.
                c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
                    .args(["-nodefaults", "-no-reboot", "-display", "none", "-vga", "std", "-audiodev"])
                    .arg(format!(
                        "wav,id=snd0,path={},out.frequency={RATE},out.channels=2,out.format=s16",
                        wav.display()
                    ))
                    .args(card.qemu)
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

    /// Its serial output so far.
    pub fn output(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    /// The engine's standard error so far.
    pub fn stderr(&self) -> String {
        text(&std::fs::read(self.dir.path("stderr.log")).unwrap_or_default())
    }

    /// Waits for the guest to power off (the engine exits with status 0); its serial output.
    pub fn finish(&mut self) -> String {
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

/// Where tests/hw/fetch-l0-qemu.sh unpacks its QEMU (`PORTHOLE_HW_L0_QEMU_DIR`, else target/hw-l0-qemu),
/// whether it is there or not.
pub fn fetched_qemu() -> PathBuf {
    let dir = std::env::var_os("PORTHOLE_HW_L0_QEMU_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/hw-l0-qemu"));
    dir.join("usr/bin/qemu-system-x86_64")
}

/// What `qemu -device DEVICE,help` prints, when `qemu` runs and has the device (`-device help` would load
/// every module, and the system's modules abort a QEMU of another build).
pub fn qemu_device_help(qemu: &Path, device: &str) -> Option<String> {
    let out = Command::new(qemu).args(["-device", &format!("{device},help")]).stdin(Stdio::null()).output().ok()?;
    out.status.success().then(|| text(&out.stdout))
}

/// `found`'s QEMU for the QEMU tests, or None after printing why they are skipped (`no QEMU with WHAT`).
pub fn qemu_or_skip(what: &str, found: Result<PathBuf, String>) -> Option<PathBuf> {
    match found {
        Ok(q) => Some(q),
        Err(why) => {
            eprintln!("SKIP: no QEMU with {what}: {why}");
            None
        }
    }
}

/// The value of `name=` among the words of `line` (a guest's summary or report line).
pub fn field(engine: Engine, line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{engine:?}: no {name}= in {line:?}"))
        .to_owned()
}

/// The decimal value of `name=` in `line`.
pub fn number(engine: Engine, line: &str, name: &str) -> u64 {
    let v = field(engine, line, name);
    v.parse().unwrap_or_else(|_| panic!("{engine:?}: {name}={v} in {line:?}"))
}

/// The first line of `out` that starts with `start` (the guest's summary line).
pub fn line_of<'a>(engine: Engine, out: &'a str, start: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("{engine:?}: no `{}` line; serial:\n{out}", start.trim_end()))
}

/// `lines` are in `out` in this order (each found after the one before); and no FAIL or bad-word.
pub fn assert_lines_in_order(engine: Engine, out: &str, lines: &[&str]) {
    let mut rest = out;
    for line in lines {
        match rest.find(line) {
            Some(at) => rest = &rest[at + line.len()..],
            None => panic!("{engine:?}: {line:?} missing (in this order); serial:\n{out}"),
        }
    }
    assert!(!out.contains("FAIL") && !out.contains("bad-word"), "{engine:?}:\n{out}");
}

/// The device played in real time: `periods` periods took `ms` ms (`what`: from when to when, for the
/// message), at least 0.8 of their length (no upper bound: a slow machine only makes it longer).
pub fn assert_paced(engine: Engine, periods: u64, ms: u64, what: &str) {
    let floor = periods * PERIOD_MS * 8 / 10;
    assert!(
        ms >= floor,
        "{engine:?} played {periods} periods of {PERIOD_MS} ms in {ms} ms ({what}), under {floor} ms: not paced in \
         real time"
    );
}

/// What a channel of S16 samples holds: the loud samples (|s| >= half the amplitude; silence and the
/// edges of the sound left out), how often their sign changes, and their mean magnitude.
#[derive(Debug, Clone, Copy)]
pub struct Tone {
    /// Loud frames.
    pub frames: usize,
    pub sign_changes: usize,
    pub mean_magnitude: f64,
    /// Frequency from the sign changes over the loud frames' duration.
    pub hz: f64,
}

impl Tone {
    pub fn of(samples: impl Iterator<Item = i16>) -> Tone {
        let loud: Vec<i16> = samples.filter(|s| f64::from(s.unsigned_abs()) >= AMPLITUDE / 2.0).collect();
        let sign_changes = loud.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        let frames = loud.len();
        let mean_magnitude = loud.iter().map(|s| f64::from(s.unsigned_abs())).sum::<f64>() / (frames.max(1) as f64);
        let seconds = frames as f64 / f64::from(RATE);
        let hz = if frames == 0 { 0.0 } else { sign_changes as f64 / 2.0 / seconds };
        Tone { frames, sign_changes, mean_magnitude, hz }
    }

    /// The frames as milliseconds.
    pub fn ms(&self) -> f64 {
        self.frames as f64 * 1000.0 / f64::from(RATE)
    }

    /// A 480 Hz square wave (within 2%) of amplitude 8000 (within `amplitude_within`, a fraction).
    pub fn assert_is_the_tone(&self, what: &str, amplitude_within: f64) {
        assert!((self.hz - TONE_HZ).abs() <= TONE_HZ * 0.02, "{what}: {:.1} Hz, not {TONE_HZ} ({self:?})", self.hz);
        assert!(
            (self.mean_magnitude - AMPLITUDE).abs() <= AMPLITUDE * amplitude_within,
            "{what}: amplitude {:.0}, not {AMPLITUDE} ({self:?})",
            self.mean_magnitude
        );
    }
}

impl std::fmt::Display for Tone {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{:.1} Hz over {:.1} ms ({} frames, {} sign changes, amplitude {:.0})",
            self.hz,
            self.ms(),
            self.frames,
            self.sign_changes,
            self.mean_magnitude
        )
    }
}

/// A WAV file's (channels, rate, bits per sample) and its data (the "data" chunk; to the end of the file
/// when its size was left unwritten).
pub fn read_wav(path: &Path) -> ((u16, u32, u16), Vec<u8>) {
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

/// What QEMU wrote to the WAV file at `path`: S16 stereo at the guest's rate, both channels the same; its
/// data's size in bytes and the left channel.
pub fn played_into_wav(path: &Path) -> (usize, Vec<i16>) {
    let ((nchannels, rate, bits), data) = read_wav(path);
    assert_eq!((nchannels, rate, bits), (2, RATE, 16), "the WAV file's format");
    let (left, right) = rfb::s16le_stereo(&data);
    assert_eq!(left, right, "both channels the same");
    (data.len(), left)
}

/// What a client of `guest`'s VNC server heard while the guest played, and the guest's serial output once
/// it powered off. The client connects at once, lists raw and the audio pseudo-encoding, asks for a whole
/// frame and starts the audio ([`rfb::start_audio`]: S16 stereo at 48000 Hz); then reads until the VM ends
/// (the connection closes) or an end has come and, once the serial shows that the guest `stopped` its
/// stream (waited for), it shows the guest `done`.
pub fn listen(
    mut guest: Guest,
    stopped: impl Fn(&str) -> bool,
    done: impl Fn(&str) -> bool,
) -> (String, Vec<HeardAudio>) {
    let engine = guest.engine;
    let start = Instant::now();
    while !guest.vnc.exists() {
        if let Some(status) = guest.child.0.try_wait().unwrap() {
            panic!("{engine:?} exited ({status}) before its VNC socket came; stderr:\n{}", guest.stderr());
        }
        assert!(start.elapsed() < LIMIT, "{engine:?}: no VNC socket; stderr:\n{}", guest.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let serial = || guest.output();
    let deadline = Instant::now() + LIMIT;
    let (c, mut messages, enabled) = rfb::audio_client(&guest.vnc, RATE, deadline)
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
                wait_until(
                    LIMIT,
                    || stopped(&serial()),
                    || format!("{engine:?}: an audio end, but the guest did not stop; serial:\n{}", serial()),
                );
                if done(&serial()) {
                    break;
                }
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
    (out, heard)
}

/// The audio messages a client heard are one begin, data and (`end`: Some(true) one end, Some(false) none,
/// None either) at most one end, nothing before the begin and no data after the end, and the data is at
/// least half a second of the guest's tone, its amplitude within `amplitude_within` (a fraction); returns
/// the tone. `played`: the guest's own account, printed with what was heard.
pub fn assert_heard_the_tone(
    engine: Engine,
    heard: &[HeardAudio],
    end: Option<bool>,
    amplitude_within: f64,
    played: &str,
) -> Tone {
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
         tone {tone}; {played}",
        heard.len(),
        heard[begin].at().as_millis(),
        heard[last].at().as_millis(),
        data.len(),
    );
    tone.assert_is_the_tone(&format!("what the client of {engine:?} heard"), amplitude_within);
    assert!(tone.ms() >= 500.0, "{engine:?}: the client heard only {:.1} ms of the tone", tone.ms());
    tone
}
