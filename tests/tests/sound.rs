//! virtio-sound (`porthole-vmm --sound virtio`, PCI 1AF4:1059) driven by the `virtio-sound` micro-guest
//! (tests/guests/asm/virtio-sound.S), side by side with QEMU's own `-device virtio-sound-pci`: the guest
//! plays the tone of `porthole_tests::sound` in periods of 10 ms, four in flight, and checks that every
//! period completes with VIRTIO_SND_S_OK.
//!
//! - QEMU's WAV file holds the tone (see `porthole_tests::sound`). Debian 12's QEMU 7.2 has no
//!   virtio-sound; the QEMU that tests/hw/fetch-l0-qemu.sh unpacks into target/hw-l0-qemu (10.0 from
//!   bookworm-backports) has. The QEMU tests run that script when no QEMU with virtio-sound-pci is at hand,
//!   and skip (with a line saying why) when it cannot get one.
//! - An RFB client that takes QEMU's audio extension hears the same tone from porthole-vmm's console,
//!   bracketed by begin and end, and from QEMU's VNC server, the reference for the client's side.
//! - gtk-vnc's `gvncviewer` plays porthole-vmm's console sound into a PulseAudio server of the test's own.
//! - porthole-vmm's device plays in real time: the guest's periods take at least 0.8 of their length from
//!   START to the last completion (a lower bound only).
//!
//! Seen with QEMU 10.0.2 (the reference): jacks=0 streams=2 chmaps=0, stream 0 output and stream 1 input,
//! formats 0xe0078 (S8 U8 S16 U16 S32 U32 FLOAT) and rates 0x3fff (5512-384000), channels 1-2; the WAV file
//! ends a few hundred frames short of the tone (what was still in QEMU's mixing buffer at STOP). QEMU's VNC
//! server acknowledges -259 with a rectangle the size of the screen, sends the begin when the guest's
//! stream starts and all of the tone, and an end only sometimes before the guest powers off (its capture
//! hears of the stop only once its mixing engine has run dry). On a loaded machine its WAV file holds less
//! of the tone (its audio timer comes late).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use porthole_tests::pulse::{PulseServer, heard};
use porthole_tests::rfb::HeardAudio;
use porthole_tests::sound::{self, Card, Engine, Guest, LIMIT, PERIOD_MS, Tone};
use porthole_tests::{Killed, Scratch, repo_root, text, workspace_bin};

/// The virtio-sound guest and device on each engine.
const CARD: Card = Card {
    guest: "virtio-sound",
    prefix: "sound",
    porthole: "virtio",
    qemu: &["-device", "virtio-sound-pci,audiodev=snd0"],
};
/// How near 8000 the tone's amplitude must come out (a fraction).
const AMPLITUDE_WITHIN: f64 = 0.02;

/// A QEMU with virtio-sound-pci: the one tests/hw/fetch-l0-qemu.sh unpacks (or the system's), fetched
/// once per test process if need be; Err says why there is none.
fn qemu_with_virtio_sound() -> Result<PathBuf, String> {
    static QEMU: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    QEMU.get_or_init(|| {
        let candidates = [sound::fetched_qemu(), PathBuf::from("qemu-system-x86_64")];
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

/// Whether `qemu` runs and has the device (its help lists the audiodev property).
fn has_virtio_sound(qemu: &Path) -> bool {
    sound::qemu_device_help(qemu, "virtio-sound-pci").is_some_and(|h| h.contains("audiodev="))
}

/// The QEMU for the QEMU tests, or None after printing why they are skipped.
fn qemu_or_skip() -> Option<PathBuf> {
    sound::qemu_or_skip("virtio-sound", qemu_with_virtio_sound())
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
    let line = sound::line_of(engine, out, "SOUND done ");
    let num = |name: &str| sound::number(engine, line, name);
    Summary { periods: num("periods"), ok: num("ok"), stream: num("stream"), ms: num("ms") }
}

/// The guest played `periods` periods and every one completed with VIRTIO_SND_S_OK; its summary.
fn assert_played(engine: Engine, out: &str, periods: u64) -> Summary {
    sound::assert_lines_in_order(
        engine,
        out,
        &[
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
        ],
    );
    let s = summary(engine, out);
    assert_eq!((s.periods, s.ok), (periods, periods), "{engine:?}: every period completed OK; serial:\n{out}");
    s
}

/// QEMU plays the guest's tone into its WAV file: the guest's driver works on a device that is not ours.
#[test]
fn the_guest_plays_a_tone_on_qemus_virtio_sound() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 100;
    let mut guest = Guest::start(&CARD, Engine::Qemu, periods, Some(&qemu));
    let out = guest.finish();
    eprintln!("QEMU ({}):\n{out}", qemu.display());
    let s = assert_played(Engine::Qemu, &out, periods);

    let (bytes, left) = sound::played_into_wav(&guest.wav);
    let tone = Tone::of(left.into_iter());
    eprintln!("QEMU: WAV {bytes} bytes, tone {tone}; the guest's START to last completion {} ms", s.ms);
    tone.assert_is_the_tone("QEMU's WAV file", AMPLITUDE_WITHIN);
    // At most the periods played; at least half of them: on a loaded machine QEMU's audio timer comes late
    // and its mixing engine drops what it did not take in time (the peer's timing, not the guest's).
    let expected_ms = (periods * PERIOD_MS) as f64;
    assert!(
        tone.ms() <= expected_ms * 1.05 && tone.ms() >= expected_ms * 0.5,
        "QEMU's WAV file holds {:.1} ms of the tone, not about {expected_ms} ms",
        tone.ms()
    );
}

/// What a client of the engine's VNC server heard while the guest played `periods` periods
/// (`sound::listen`), and the guest's summary.
fn listen(engine: Engine, periods: u64, qemu: Option<&Path>) -> (Summary, Vec<HeardAudio>) {
    let guest = Guest::start(&CARD, engine, periods, qemu);
    // The end comes when the guest stops its stream: its STOP is answered (and printed) then.
    let (out, heard) =
        sound::listen(guest, |serial| serial.contains("SOUND stop status="), |serial| serial.contains("SOUND done "));
    (assert_played(engine, &out, periods), heard)
}

/// The audio messages a client heard are one begin, data and (`end`) one end or none, and the data is the
/// guest's tone (`sound::assert_heard_the_tone`).
fn assert_heard_the_tone(engine: Engine, heard: &[HeardAudio], s: &Summary, end: Option<bool>) -> Tone {
    let played =
        format!("the guest's START to last completion {} ms for {} periods of {PERIOD_MS} ms", s.ms, s.periods);
    sound::assert_heard_the_tone(engine, heard, end, AMPLITUDE_WITHIN, &played)
}

/// porthole-vmm's console: a client that takes QEMU's audio extension hears the guest's tone, between a
/// begin and an end; the device played it in real time.
#[test]
fn porthole_vmm_plays_the_guests_tone_to_an_rfb_client() {
    // 1.5 s: the client enables the sound while the guest boots, and hears at least a second of it.
    let periods = 150;
    let (s, heard) = listen(Engine::Porthole, periods, None);
    assert_heard_the_tone(Engine::Porthole, &heard, &s, Some(true));
    assert_paced(&s);
}

/// The same client and the same guest with QEMU's VNC server (`-vnc ...,audiodev=`): the reference for
/// the client's side of the audio extension.
#[test]
fn qemus_vnc_server_plays_the_guests_tone_to_the_same_rfb_client() {
    let Some(qemu) = qemu_or_skip() else { return };
    let periods = 150;
    let (s, heard) = listen(Engine::Qemu, periods, Some(&qemu));
    // QEMU 10 sends an end only when its capture heard of the stop before the guest powered off (it is told
    // once its mixing engine has run dry): sometimes. At most one, then.
    assert_heard_the_tone(Engine::Qemu, &heard, &s, None);
}

/// porthole-vmm's device plays in real time: START to the last completion takes at least 0.8 of the
/// periods' length.
fn assert_paced(s: &Summary) {
    sound::assert_paced(Engine::Porthole, s.periods, s.ms, "START to the last completion");
}

/// The same guest on both engines: every period completes OK on each, with the same lines but for the
/// figures each device chooses; porthole-vmm's pacing is real time. Prints both engines' timings.
#[test]
fn both_engines_complete_every_period_and_porthole_vmm_plays_in_real_time() {
    let periods = 100;
    let mut vmm = Guest::start(&CARD, Engine::Porthole, periods, None);
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
    let mut on_qemu_guest = Guest::start(&CARD, Engine::Qemu, periods, Some(&qemu));
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

/// gtk-vnc (the widget of virt-viewer and GNOME Boxes) as the client: `gvncviewer` asks porthole-vmm's console
/// for the sound as S32 stereo at 44.1 kHz and plays it into PulseAudio (a server of the test's own, under
/// Xvfb); the null sink's monitor holds the guest's tone.
#[test]
fn gvncviewer_plays_the_guests_tone_from_porthole_vmms_console() {
    if Command::new("gvncviewer").arg("--help").output().is_err() {
        println!("SKIP: no gvncviewer (apt-get install gvncviewer; ./x test installs it)");
        return;
    }
    let dir = Scratch::new("sound-gvncviewer");
    let Some(pulse) = PulseServer::start_or_skip(&dir) else { return };
    let x = porthole_tests::Xvfb::start(800, 600);
    // 10 s of sound: the viewer connects and starts its stream while the guest plays.
    let guest = Guest::start(&CARD, Engine::Porthole, 1000, None);
    porthole_tests::wait_until(
        LIMIT,
        || guest.vnc.exists() && guest.output().contains("SOUND playing"),
        || format!("the guest never played; serial:\n{}\n{}", guest.output(), guest.stderr()),
    );
    let log = dir.path("gvncviewer.log");
    let _viewer = Killed(
        Command::new("gvncviewer")
            .arg(&guest.vnc)
            .env("DISPLAY", &x.display)
            .env("PULSE_SERVER", pulse.server())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path("gvncviewer.err")).unwrap())
            .spawn()
            .expect("start gvncviewer"),
    );
    // The first part may be the silence before the viewer connected.
    let recorded = pulse.record(3.0, || {});
    assert!(!guest.output().contains("SOUND FAIL"), "{}", guest.output());
    heard(&recorded).assert_is_the_tone("gvncviewer, recorded from PulseAudio");
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
