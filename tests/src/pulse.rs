//! A PulseAudio server of a test's own, for the clients that play sound on this computer (the window's
//! console through ALSA's pulse plugin, gtk-vnc's `gvncviewer` through libpulse): a null sink named
//! `porthole` at 48 kHz stereo that plays in real time, whose monitor `parec` records; and what a recording
//! holds ([`heard`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Killed, Scratch, wait_until};

/// The server: ended when dropped.
pub struct PulseServer {
    _child: Killed,
    socket: PathBuf,
}

impl PulseServer {
    /// Starts one in `dir`, or says why not (`SKIP`) when PulseAudio is not installed.
    pub fn start_or_skip(dir: &Scratch) -> Option<PulseServer> {
        if Command::new("pulseaudio").arg("--version").output().is_err() {
            println!(
                "SKIP: no pulseaudio (Debian: pulseaudio, pulseaudio-utils, libasound2-plugins; ./x test installs \
                 them)"
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
        Some(PulseServer { _child: child, socket })
    }

    /// Its address for `PULSE_SERVER`.
    pub fn server(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Records `seconds` of the null sink's monitor (interleaved S16 stereo at 48 kHz), calling `tick` every
    /// 10 ms meanwhile (a window under test steps its frames there).
    pub fn record(&self, seconds: f64, mut tick: impl FnMut()) -> Vec<i16> {
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
                .env("PULSE_SERVER", self.server())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start parec (apt-get install pulseaudio-utils)"),
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
            tick();
            while let Ok(chunk) = rx.try_recv() {
                bytes.extend_from_slice(&chunk);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(rec);
        bytes.truncate(want);
        bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
    }
}

/// What a recording of the sink (interleaved S16 stereo at 48 kHz) holds of a tone.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    /// The left channel's frequency (rising zero crossings).
    pub hz: f64,
    /// The median magnitude of its samples.
    pub magnitude: f64,
    /// Seconds of sound.
    pub seconds: f64,
}

/// The tone in `samples`, measured within its runs of sound: a player runs dry now and then on a loaded
/// machine (its gaps are silence), so only runs of 50 ms or more without a silent stretch (2 ms) count.
pub fn heard(samples: &[i16]) -> Heard {
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
    // Whole waves are 100 samples, but a client's rate (often 44.1 kHz) and PulseAudio's resampling make
    // single waves 99-101: the mean of the middle half.
    let middle = &waves[waves.len() / 4..waves.len() * 3 / 4];
    let hz = if middle.is_empty() { 0.0 } else { 48_000.0 * middle.len() as f64 / middle.iter().sum::<usize>() as f64 };
    let magnitude = mags.get(mags.len() / 2).copied().map(f64::from).unwrap_or(0.0);
    Heard { hz, magnitude, seconds: mags.len() as f64 / 48_000.0 }
}

impl Heard {
    /// At least half a second of the sound micro-guests' tone (480 Hz ± 2 %, amplitude 8000 ± 10 %).
    pub fn assert_is_the_tone(&self, what: &str) {
        let (hz, amplitude) = (crate::sound::TONE_HZ, crate::sound::AMPLITUDE);
        println!("{what}: {:.2} s of sound, {:.1} Hz at amplitude {}", self.seconds, self.hz, self.magnitude);
        assert!(self.seconds >= 0.5, "{what}: {:.2} s of sound heard", self.seconds);
        assert!((self.hz - hz).abs() < hz * 0.02, "{what}: {:.1} Hz heard, {hz} played", self.hz);
        assert!(
            (self.magnitude - amplitude).abs() < amplitude * 0.1,
            "{what}: amplitude {}, {amplitude} played",
            self.magnitude
        );
    }
}
