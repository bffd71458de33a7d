//! virtio-sound (`porthole-vmm --sound virtio`, PCI 1AF4:1059) driven by the `virtio-sound` micro-guest
//! (tests/guests/asm/virtio-sound.S), side by side with QEMU's own `-device virtio-sound-pci`: the guest
//! plays a 480 Hz square wave (50 frames at +8000, 50 at -8000, both channels, S16 stereo at 48000 Hz) in
//! periods of 10 ms, four in flight, and checks that every period completes with VIRTIO_SND_S_OK.
//!
//! - QEMU writes what the guest plays to a WAV file (`-audiodev wav`): the file holds the tone, which proves
//!   the guest independently of porthole-vmm's device. Debian 12's QEMU 7.2 has no virtio-sound; the QEMU
//!   that tests/hw/fetch-l0-qemu.sh unpacks into target/hw-l0-qemu (10.0 from bookworm-backports) has. The
//!   QEMU tests run that script when no QEMU with virtio-sound-pci is at hand, and skip (with a line saying
//!   why) when it cannot get one.
//! - porthole-vmm's console sends what the guest plays to an RFB client that takes QEMU's audio extension
//!   (pseudo-encoding -259): the client hears the same tone, bracketed by begin and end. The same client
//!   hears it from QEMU's VNC server (`-vnc unix:PATH,audiodev=`), the reference for the client's side.
//! - porthole-vmm's device plays in real time: the guest's periods take at least 0.8 of their length from
//!   START to the last completion (a lower bound only).
//!
//! Seen with QEMU 10.0.2 (the reference): jacks=0 streams=2 chmaps=0, stream 0 output and stream 1 input,
//! formats 0xe0078 (S8 U8 S16 U16 S32 U32 FLOAT) and rates 0x3fff (5512-384000), channels 1-2; the WAV file
//! ends a few hundred frames short of the tone (what was still in QEMU's mixing buffer at STOP). QEMU's VNC
//! server acknowledges -259 with a rectangle the size of the screen, sends the begin when the guest's
//! stream starts and all of the tone, but no end before the guest powers off (its capture hears of the stop
//! only once its mixing engine has run dry).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use porthole_tests::rfb::{self, RfbClient, ServerMessage, ServerMessages};
use porthole_tests::{Killed, Scratch, repo_root, text, wait_until, workspace_bin};

/// Generous: the guest's instructions are emulated here; a run takes seconds.
const LIMIT: Duration = Duration::from_secs(90);
/// The guest's tone: frequency, frames per second, amplitude.
const TONE_HZ: f64 = 480.0;
const RATE: u32 = 48_000;
const AMPLITUDE: f64 = 8000.0;
/// A period is 10 ms.
const PERIOD_MS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Porthole,
    Qemu,
}

/// The guest running on one engine: its serial in a file, and (porthole-vmm) its console on a VNC Unix
/// socket or (QEMU) its sound in a WAV file.
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
        let dir = Scratch::new(&format!("sound-{engine:?}").to_lowercase());
        let (serial, vnc, wav) = (dir.path("serial.log"), dir.path("vnc.sock"), dir.path("sound.wav"));
        let guest = porthole_guests::path("virtio-sound");
        let cmdline = format!("sound.periods={periods}");
        let mut cmd = match engine {
            Engine::Porthole => {
                let mut c = Command::new(workspace_bin("porthole-vmm"));
                c.arg("--kernel")
                    .arg(&guest)
                    .args(["--memory", "64", "--vga", "std", "--sound", "virtio", "--cmdline", &cmdline])
                    .arg("--serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("--vnc")
                    .arg(format!("unix:{}", vnc.display()));
                c
            }
            Engine::Qemu => {
                let mut c = Command::new(qemu.expect("a QEMU with virtio-sound-pci"));
                // -cpu host as agent.rs and gpu.rs have it (without arch-capabilities: MSR 0x10a kills QEMU
                // on this KVM). The WAV backend at the guest's rate, so that QEMU does not resample.
                c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
                    .args(["-nodefaults", "-no-reboot", "-display", "none", "-vga", "std", "-audiodev"])
                    .arg(format!(
                        "wav,id=snd0,path={},out.frequency={RATE},out.channels=2,out.format=s16",
                        wav.display()
                    ))
                    .args(["-device", "virtio-sound-pci,audiodev=snd0"])
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

/// A QEMU with virtio-sound-pci: the one tests/hw/fetch-l0-qemu.sh unpacks (or the system's), fetched
/// once per test process if need be; Err says why there is none.
fn qemu_with_virtio_sound() -> Result<PathBuf, String> {
    static QEMU: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    QEMU.get_or_init(|| {
        let dir = std::env::var_os("PORTHOLE_HW_L0_QEMU_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/hw-l0-qemu"));
        let candidates = [dir.join("usr/bin/qemu-system-x86_64"), PathBuf::from("qemu-system-x86_64")];
        let find = || candidates.iter().find(|q| has_virtio_sound(q)).cloned();
        if let Some(q) = find() {
            return Ok(q);
        }
        let script = repo_root().join("tests/hw/fetch-l0-qemu.sh");
        eprintln!("no QEMU with virtio-sound-pci at hand: running {}", script.display());
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let said = format!("{}{}", text(&out.stdout).trim(), text(&out.stderr).trim());
        find().ok_or_else(|| {
            format!(
                "neither {} nor the system's qemu-system-x86_64 has virtio-sound-pci, and {} did not get one \
                 ({}): {said}",
                candidates[0].display(),
                script.display(),
                out.status
            )
        })
    })
    .clone()
}

/// Whether `qemu` runs and has the device (`-device virtio-sound-pci,help` lists its audiodev property;
/// `-device help` would load every module, and the system's modules abort a QEMU of another build).
fn has_virtio_sound(qemu: &Path) -> bool {
    Command::new(qemu)
        .args(["-device", "virtio-sound-pci,help"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && text(&o.stdout).contains("audiodev="))
}

/// The QEMU for the QEMU tests, or None after printing why they are skipped.
fn qemu_or_skip() -> Option<PathBuf> {
    match qemu_with_virtio_sound() {
        Ok(q) => Some(q),
        Err(why) => {
            eprintln!("SKIP: no QEMU with virtio-sound: {why}");
            None
        }
    }
}

/// The guest's summary line: `SOUND done periods=N ok=K stream=S ms=M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    periods: u64,
    ok: u64,
    stream: u64,
    ms: u64,
}

fn summary(engine: Engine, out: &str) -> Summary {
    let line = out
        .lines()
        .find(|l| l.starts_with("SOUND done "))
        .unwrap_or_else(|| panic!("{engine:?}: no `SOUND done` line; serial:\n{out}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{engine:?}: no {name}= in {line:?}"))
    };
    Summary { periods: field("periods"), ok: field("ok"), stream: field("stream"), ms: field("ms") }
}

/// The guest played `periods` periods and every one completed with VIRTIO_SND_S_OK; its summary.
fn assert_played(engine: Engine, out: &str, periods: u64) -> Summary {
    let mut rest = out;
    for line in [
        "SOUND pci slot=",
        "SOUND config jacks=",
        "SOUND stream id=0 ",
        "SOUND set-params status=0x8000\n",
        "SOUND prepare status=0x8000\n",
        "SOUND start status=0x8000\n",
        "SOUND playing stream=",
        "SOUND stop status=0x8000\n",
        "SOUND release status=0x8000\n",
        "SOUND done ",
    ] {
        match rest.find(line) {
            Some(at) => rest = &rest[at + line.len()..],
            None => panic!("{engine:?}: {line:?} missing (in this order); serial:\n{out}"),
        }
    }
    assert!(!out.contains("FAIL") && !out.contains("bad-word"), "{engine:?}:\n{out}");
    let s = summary(engine, out);
    assert_eq!((s.periods, s.ok), (periods, periods), "{engine:?}: every period completed OK; serial:\n{out}");
    s
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

    /// A 480 Hz square wave of amplitude 8000 (both within 2%).
    fn assert_is_the_tone(&self, what: &str) {
        assert!((self.hz - TONE_HZ).abs() <= TONE_HZ * 0.02, "{what}: {:.1} Hz, not {TONE_HZ} ({self:?})", self.hz);
        assert!(
            (self.mean_magnitude - AMPLITUDE).abs() <= AMPLITUDE * 0.02,
            "{what}: amplitude {:.0}, not {AMPLITUDE} ({self:?})",
            self.mean_magnitude
        );
    }
}

/// Interleaved little-endian S16 stereo: the left channel, the right channel.
fn channels(bytes: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let samples: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    let left = samples.iter().step_by(2).copied().collect();
    let right = samples.iter().skip(1).step_by(2).copied().collect();
    (left, right)
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

/// QEMU plays the guest's tone into its WAV file: the guest's driver works on a device that is not ours.
#[test]
fn the_guest_plays_a_tone_on_qemus_virtio_sound() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 100;
    let mut guest = Guest::start(Engine::Qemu, periods, Some(&qemu));
    let out = guest.finish();
    eprintln!("QEMU ({}):\n{out}", qemu.display());
    let s = assert_played(Engine::Qemu, &out, periods);

    let ((nchannels, rate, bits), data) = read_wav(&guest.wav);
    assert_eq!((nchannels, rate, bits), (2, RATE, 16), "the WAV file's format");
    let (left, right) = channels(&data);
    assert_eq!(left, right, "both channels the same");
    let tone = Tone::of(left.into_iter());
    eprintln!(
        "QEMU: WAV {} bytes, tone {:.1} Hz over {:.1} ms ({} frames, {} sign changes, amplitude {:.0}); \
         the guest's START to last completion {} ms",
        data.len(),
        tone.hz,
        tone.ms(),
        tone.frames,
        tone.sign_changes,
        tone.mean_magnitude,
        s.ms
    );
    tone.assert_is_the_tone("QEMU's WAV file");
    let expected_ms = (periods * PERIOD_MS) as f64;
    assert!(
        (tone.ms() - expected_ms).abs() <= expected_ms * 0.05,
        "QEMU's WAV file holds {:.1} ms of the tone, not about {expected_ms} ms",
        tone.ms()
    );
}

/// What an RFB client heard, in order, with when it came (from the client's enable).
#[derive(Debug)]
enum Heard {
    Begin(Duration),
    Data(Duration, Vec<u8>),
    End(Duration),
}

impl Heard {
    fn kind(&self) -> &'static str {
        match self {
            Heard::Begin(_) => "begin",
            Heard::Data(..) => "data",
            Heard::End(_) => "end",
        }
    }

    fn at(&self) -> Duration {
        match self {
            Heard::Begin(t) | Heard::Data(t, _) | Heard::End(t) => *t,
        }
    }
}

/// What a client of the engine's VNC server heard while the guest played `periods` periods: the guest's
/// serial output and summary, and the audio messages. The client connects at once, lists raw and the audio
/// pseudo-encoding, asks for a whole frame, waits for the acknowledgement (a rectangle of -259 in an
/// update), sets S16 stereo at 48000 Hz and enables the sound; then reads until the VM ends (the connection
/// closes) or an end has come after the guest's summary line.
fn listen(engine: Engine, periods: u64, qemu: Option<&Path>) -> (String, Summary, Vec<Heard>) {
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

    // The acknowledgement: a rectangle of the audio pseudo-encoding in an update.
    let deadline = Instant::now() + LIMIT;
    loop {
        match messages.read_message() {
            Ok(ServerMessage::Update(rects)) if rects.iter().any(|r| r.0 == rfb::QEMU_AUDIO) => break,
            Ok(ServerMessage::Update(_) | ServerMessage::Skipped(_) | ServerMessage::Bell) => {}
            Ok(other) => panic!("{engine:?}: before the audio acknowledgement: {other:?}"),
            Err(e) => panic!("{engine:?}: waiting for the audio acknowledgement: {e}; serial:\n{}", serial()),
        }
        assert!(Instant::now() < deadline, "{engine:?}: no audio acknowledgement; serial:\n{}", serial());
    }
    c.stream.write_all(&rfb::qemu_audio_set_format_message(rfb::QEMU_AUDIO_S16, 2, RATE)).unwrap();
    c.stream.write_all(&rfb::qemu_audio_enable_message()).unwrap();
    let enabled = Instant::now();

    let mut heard = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "{engine:?}: gave up listening; heard {} messages; serial:\n{}",
            heard.len(),
            serial()
        );
        match messages.read_message() {
            Ok(ServerMessage::AudioBegin) => heard.push(Heard::Begin(enabled.elapsed())),
            Ok(ServerMessage::AudioData(d)) => heard.push(Heard::Data(enabled.elapsed(), d)),
            Ok(ServerMessage::AudioEnd) => {
                heard.push(Heard::End(enabled.elapsed()));
                // The end comes when the guest stops its stream: its STOP is answered (and printed) then.
                wait_until(
                    LIMIT,
                    || serial().contains("SOUND stop status="),
                    || format!("{engine:?}: an audio end, but the guest did not stop; serial:\n{}", serial()),
                );
                if serial().contains("SOUND done ") {
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
    let s = assert_played(engine, &out, periods);
    (out, s, heard)
}

/// The audio messages a client heard are one begin, data and (`end`) one end, nothing before the begin and
/// no data after the end, and the data is at least half a second of the guest's tone; returns the tone.
fn assert_heard_the_tone(engine: Engine, heard: &[Heard], s: &Summary, end: bool) -> Tone {
    let kinds: Vec<&str> = heard.iter().map(Heard::kind).collect();
    let begin = kinds.iter().position(|k| *k == "begin").unwrap_or_else(|| panic!("{engine:?}: no begin: {kinds:?}"));
    assert_eq!(begin, 0, "{engine:?}: the first audio message is the begin: {kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "begin").count(), 1, "{engine:?}: one begin: {kinds:?}");
    let ends = kinds.iter().filter(|k| **k == "end").count();
    let last = if end {
        assert_eq!(ends, 1, "{engine:?}: one end: {kinds:?}");
        let at = kinds.iter().position(|k| *k == "end").unwrap();
        assert!(kinds[at + 1..].iter().all(|k| *k != "data"), "{engine:?}: no data after the end: {kinds:?}");
        at
    } else {
        assert_eq!(ends, 0, "{engine:?}: no end: {kinds:?}");
        heard.len() - 1
    };
    let data: Vec<u8> = heard[begin..=last]
        .iter()
        .filter_map(|h| if let Heard::Data(_, d) = h { Some(d.as_slice()) } else { None })
        .flatten()
        .copied()
        .collect();
    assert_eq!(data.len() % 4, 0, "{engine:?}: whole S16 stereo frames");
    let (left, right) = channels(&data);
    assert_eq!(left, right, "{engine:?}: both channels the same");
    let tone = Tone::of(left.into_iter());
    eprintln!(
        "{engine:?}: the client heard {} messages (begin {} ms, last {} ms after enabling), {} bytes: tone {:.1} Hz \
         over {:.1} ms ({} frames, {} sign changes, amplitude {:.0}); the guest's START to last completion {} ms \
         for {} periods of {PERIOD_MS} ms",
        heard.len(),
        heard[begin].at().as_millis(),
        heard[last].at().as_millis(),
        data.len(),
        tone.hz,
        tone.ms(),
        tone.frames,
        tone.sign_changes,
        tone.mean_magnitude,
        s.ms,
        s.periods
    );
    tone.assert_is_the_tone(&format!("what the client of {engine:?} heard"));
    assert!(tone.ms() >= 500.0, "{engine:?}: the client heard only {:.1} ms of the tone", tone.ms());
    tone
}

/// porthole-vmm's console: a client that takes QEMU's audio extension hears the guest's tone, between a
/// begin and an end; the device played it in real time.
#[test]
fn porthole_vmm_plays_the_guests_tone_to_an_rfb_client() {
    // 1.5 s: the client enables the sound while the guest boots, and hears at least a second of it.
    let periods = 150;
    let (_, s, heard) = listen(Engine::Porthole, periods, None);
    assert_heard_the_tone(Engine::Porthole, &heard, &s, true);
    assert_paced(&s);
}

/// The same client and the same guest with QEMU's VNC server (`-vnc ...,audiodev=`): the reference for
/// the client's side of the audio extension.
#[test]
fn qemus_vnc_server_plays_the_guests_tone_to_the_same_rfb_client() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 150;
    let (_, s, heard) = listen(Engine::Qemu, periods, Some(&qemu));
    // QEMU 10 sends no end: its capture is told the voice stopped only once its mixing engine has run dry,
    // and the guest powers off first.
    assert_heard_the_tone(Engine::Qemu, &heard, &s, false);
}

/// porthole-vmm's device plays in real time: START to the last completion takes at least 0.8 of the
/// periods' length (no upper bound: a slow machine only makes it longer).
fn assert_paced(s: &Summary) {
    let floor = s.periods * PERIOD_MS * 8 / 10;
    assert!(
        s.ms >= floor,
        "porthole-vmm completed {} periods of {PERIOD_MS} ms in {} ms, under {floor} ms: not paced in real time",
        s.periods,
        s.ms
    );
}

/// The same guest on both engines: every period completes OK on each, with the same lines but for the
/// figures each device chooses; porthole-vmm's pacing is real time. Prints both engines' timings.
#[test]
fn both_engines_complete_every_period_and_porthole_vmm_plays_in_real_time() {
    let periods = 100;
    let mut vmm = Guest::start(Engine::Porthole, periods, None);
    let on_vmm = vmm.finish();
    eprintln!("porthole-vmm:\n{on_vmm}");
    let s_vmm = assert_played(Engine::Porthole, &on_vmm, periods);
    eprintln!(
        "porthole-vmm: {periods} periods of {PERIOD_MS} ms ({} ms of sound): START to last completion {} ms",
        periods * PERIOD_MS,
        s_vmm.ms
    );
    assert_paced(&s_vmm);

    let Some(qemu) = qemu_or_skip() else { return };
    let mut on_qemu_guest = Guest::start(Engine::Qemu, periods, Some(&qemu));
    let on_qemu = on_qemu_guest.finish();
    eprintln!("QEMU:\n{on_qemu}");
    let s_qemu = assert_played(Engine::Qemu, &on_qemu, periods);
    eprintln!(
        "QEMU: {periods} periods of {PERIOD_MS} ms ({} ms of sound): START to last completion {} ms",
        periods * PERIOD_MS,
        s_qemu.ms
    );
    assert_eq!((s_vmm.periods, s_vmm.ok, s_vmm.stream), (s_qemu.periods, s_qemu.ok, s_qemu.stream));
    // The control answers, in order, line for line.
    let controls = |out: &str| -> Vec<String> {
        out.lines().filter(|l| l.contains(" status=") || l.starts_with("SOUND playing ")).map(str::to_owned).collect()
    };
    assert_eq!(controls(&on_vmm), controls(&on_qemu), "porthole-vmm:\n{on_vmm}\nQEMU:\n{on_qemu}");
}

/// Without `--sound virtio` porthole-vmm has no sound card: the guest finds none.
#[test]
fn without_the_sound_option_there_is_no_sound_card() {
    let dir = Scratch::new("sound-none");
    let serial = dir.path("serial.log");
    let out = porthole_tests::run(
        Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(porthole_guests::path("virtio-sound"))
            .args(["--memory", "64", "--cmdline", "sound.periods=1"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display())),
        LIMIT,
    );
    let serial = text(&std::fs::read(&serial).unwrap_or_default());
    assert!(out.status.success(), "{out:?}\n{serial}");
    assert_eq!(serial, "SOUND periods=1\nSOUND FAIL none\n");
}
