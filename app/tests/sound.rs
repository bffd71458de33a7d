//! The console plays the guest's sound on this computer: the `virtio-sound` micro-guest plays a 480 Hz
//! square wave (amplitude 8000, S16 stereo at 48 kHz) on `porthole-vmm --sound virtio`; the window's console
//! takes it with QEMU's audio extension and plays it through ALSA's default device, which here is
//! PulseAudio (ALSA's pulse plugin, as on a desktop with PulseAudio or PipeWire) with a null sink that
//! plays in real time; the sink's monitor is recorded with `parec` and must hold the tone. *Mute* silences
//! it. One test in this file: the ALSA and PulseAudio settings are the process's environment.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use porthole::PortholeApp;
use porthole::backend::Backend;
use porthole_tests::{Killed, Scratch, wait_until};

mod common;
use common::*;

const TONE_HZ: f64 = 480.0;
const AMPLITUDE: f64 = 8000.0;

fn app_without_local_host() -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, || Err("no local host in this test".to_owned()), None);
    Harness::builder().with_size(egui::vec2(1200.0, 800.0)).build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

/// A PulseAudio server of this test's own: a null sink named `porthole` (48 kHz stereo), reached at `socket`.
fn pulseaudio(dir: &Scratch) -> Option<(Killed, std::path::PathBuf)> {
    if Command::new("pulseaudio").arg("--version").output().is_err() {
        println!(
            "SKIP: no pulseaudio (Debian: pulseaudio, pulseaudio-utils, libasound2-plugins; ./x test installs them)"
        );
        return None;
    }
    let socket = dir.path("pulse.sock");
    let script = dir.path("pulse.pa");
    std::fs::write(
        &script,
        format!(
            "load-module module-native-protocol-unix auth-anonymous=1 socket={}\n\
             load-module module-null-sink sink_name=porthole rate=48000 channels=2\n\
             set-default-sink porthole\n",
            socket.display()
        ),
    )
    .unwrap();
    let child = Killed(
        Command::new("pulseaudio")
            .args(["-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=no"])
            .arg("-F")
            .arg(&script)
            .env("HOME", dir.dir())
            .env("XDG_RUNTIME_DIR", dir.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("pulse.log")).unwrap())
            .spawn()
            .expect("start pulseaudio"),
    );
    wait_until(Duration::from_secs(20), || socket.exists(), || "pulseaudio never made its socket".into());
    Some((child, socket))
}

/// Records `seconds` of the null sink's monitor (interleaved S16 stereo at 48 kHz), stepping the window
/// meanwhile.
fn record(socket: &Path, seconds: f64, h: &mut Harness<'static, PortholeApp>) -> Vec<i16> {
    let mut rec = Killed(
        Command::new("parec")
            .args([
                "--raw",
                "--format=s16le",
                "--rate=48000",
                "--channels=2",
                "--latency-msec=20",
                "-d",
                "porthole.monitor",
            ])
            .env("PULSE_SERVER", format!("unix:{}", socket.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start parec"),
    );
    let mut out = rec.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let want = (seconds * 48_000.0) as usize * 4;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut bytes = Vec::new();
    while bytes.len() < want {
        assert!(Instant::now() < deadline, "parec recorded {} of {want} bytes", bytes.len());
        h.step();
        while let Ok(chunk) = rx.try_recv() {
            bytes.extend_from_slice(&chunk);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(rec);
    bytes.truncate(want);
    bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
}

/// The left channel's frequency (rising zero crossings) and median magnitude over its runs of sound, and
/// how many seconds of sound there are: the output runs dry now and then on a loaded machine (its gaps are
/// silence), so the tone is measured within each run of 50 ms or more without a silent stretch (2 ms).
fn tone(samples: &[i16]) -> (f64, f64, f64) {
    let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
    let quiet = |s: i16| i32::from(s).abs() < 100;
    // Runs: [start, end) with no 96 quiet samples (2 ms) in a row.
    let mut runs = Vec::new();
    let (mut start, mut quiet_since) = (None, None);
    for (i, &s) in left.iter().enumerate() {
        if quiet(s) {
            let since = *quiet_since.get_or_insert(i);
            if i + 1 - since >= 96
                && let Some(st) = start.take()
            {
                runs.push((st, since));
            }
        } else {
            quiet_since = None;
            start.get_or_insert(i);
        }
    }
    if let Some(st) = start {
        runs.push((st, left.len()));
    }
    // Each wave's length between rising zero crossings; the median, so that a wave cut by sound dropped
    // as late (a jump in phase, no silence) does not count.
    let (mut waves, mut mags) = (Vec::new(), Vec::new());
    for &(a, b) in runs.iter().filter(|(a, b)| b - a >= 2400) {
        let run = &left[a..b];
        let ups: Vec<usize> = (1..run.len()).filter(|&i| run[i - 1] < 0 && run[i] >= 0).collect();
        waves.extend(ups.windows(2).map(|w| w[1] - w[0]));
        mags.extend(run.iter().map(|&s| i32::from(s).abs()));
    }
    mags.sort_unstable();
    waves.sort_unstable();
    // Whole waves are 100 samples, but the console's rate (the output's, often 44.1 kHz) and PulseAudio's
    // resampling make single waves 99-101: the mean of the middle half.
    let middle = &waves[waves.len() / 4..waves.len() * 3 / 4];
    let hz = if middle.is_empty() { 0.0 } else { 48_000.0 * middle.len() as f64 / middle.iter().sum::<usize>() as f64 };
    let magnitude = mags.get(mags.len() / 2).copied().map(f64::from).unwrap_or(0.0);
    (hz, magnitude, mags.len() as f64 / 48_000.0)
}

#[test]
fn the_console_plays_the_guests_sound_and_mutes_it() {
    let dir = Scratch::new("gui-sound");
    let Some((_pulse, pulse_socket)) = pulseaudio(&dir) else { return };
    let alsa = dir.path("asound.conf");
    std::fs::write(&alsa, "pcm.!default { type pulse }\nctl.!default { type pulse }\n").unwrap();
    // SAFETY: the only test of this binary sets them before anything in it uses ALSA or PulseAudio.
    unsafe {
        std::env::set_var("PULSE_SERVER", format!("unix:{}", pulse_socket.display()));
        std::env::set_var("ALSA_CONFIG_PATH", format!("/usr/share/alsa/alsa.conf:{}", alsa.display()));
    }
    let (socket, serial) = (dir.path("vnc.sock"), dir.path("serial.log"));
    let args = ["--sound", "virtio", "--cmdline", "sound.periods=2000"].map(std::ffi::OsStr::new);
    let _vm = porthole_tests::vnc_vm("virtio-sound", &socket, &serial, &args, "SOUND config");
    let mut h = app_without_local_host();
    let target: porthole::app::VncTarget = format!("vnc+unix://{}", socket.display()).parse().unwrap();
    h.state_mut().open_vnc(target, None);
    wait(&mut h, "the console's sound controls", |h| has(h, "Mute"));
    let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait(&mut h, "the guest to play", |_| serial_text().contains("SOUND playing"));

    let heard = record(&pulse_socket, 2.0, &mut h);
    // The first part may still be the silence before the console's output started.
    let (hz, magnitude, seconds) = tone(&heard);
    println!(
        "heard {seconds:.2} s of sound in {:.2} s recorded: {hz:.1} Hz at amplitude {magnitude}",
        heard.len() as f64 / 96_000.0
    );
    assert!(seconds >= 0.5, "{seconds:.2} s of sound heard");
    assert!((hz - TONE_HZ).abs() < TONE_HZ * 0.02, "{hz:.1} Hz heard, {TONE_HZ} played");
    assert!((magnitude - AMPLITUDE).abs() < AMPLITUDE * 0.1, "amplitude {magnitude}, {AMPLITUDE} played");

    click(&mut h, "Mute");
    wait(&mut h, "the unmute button", |h| has(h, "Unmute"));
    let muted = record(&pulse_socket, 0.8, &mut h);
    let loudest = muted[muted.len() / 2..].iter().map(|&s| i32::from(s).abs()).max().unwrap_or(0);
    assert!(loudest < 100, "muted, yet a sample of {loudest}");
    assert!(!serial_text().contains("SOUND FAIL"), "{}", serial_text());
}
