//! Sound latency, in two parts (`porthole-bench audio`):
//!
//! - **The console's leg**, host-side at full speed through the production path: 10 ms periods pushed into
//!   a display's sound output in real time, as a card pushes what its guest plays; the RFB server (QEMU's
//!   audio extension) sends them to a client on the Unix socket, which notes when each period's last byte
//!   arrived. Latency per period: push → at the client; p50, p99, slowest. No peer: QEMU's audio cannot be
//!   fed from the host side.
//! - **Guest to client, both engines, the same run**: the sound micro-guests (HD Audio; virtio-sound where
//!   a QEMU with it is at hand) on porthole-vmm and on QEMU: from the guest's line saying it started its
//!   stream (`HDA running`, `SOUND playing`) to the first sound at a client of the engine's VNC server
//!   that enabled the audio beforehand. Medians over the runs; ratio porthole-vmm / QEMU.
//!
//! The window's player adds its start-up buffer to either (`START_MS` in app/src/audio.rs, 60 ms) before
//! the sound reaches the computer's output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use porthole_tests::rfb::{self, ServerMessage};
use porthole_tests::sound::{Card, Engine, Guest};

const RATE: u32 = 48_000;
/// A period: 10 ms of stereo frames.
const PERIOD_FRAMES: usize = RATE as usize / 100;
const PERIOD_BYTES: usize = PERIOD_FRAMES * 4;

/// The RFB server's input for this benchmark: a VM with a sound card, nothing else.
struct SoundOnly;

impl vmm_core::rfb::Input for SoundOnly {
    fn key(&self, _key: vmm_core::rfb::keymap::Key, _down: bool) {}
    fn pointer(&self, _x: u16, _y: u16, _buttons: u8, _screen: (u32, u32)) {}
    fn has_audio(&self) -> bool {
        true
    }
}

pub fn run(seconds: f64, runs: usize) -> anyhow::Result<()> {
    console_leg(seconds)?;
    guest_to_client(runs)
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn console_leg(seconds: f64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("porthole-bench-audio-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("vnc.sock");
    let screen = vmm_core::display::Screen::new();
    screen.resize(640, 480);
    let listener = vmm_core::rfb::ListenAddress::Unix(socket.clone()).bind()?;
    let config = vmm_core::rfb::ServerConfig { password: None, name: "bench".into() };
    vmm_core::rfb::spawn(listener, screen.clone(), Arc::new(SoundOnly), config, false)?;

    let (client, mut messages, _) = rfb::audio_client(&socket, RATE, Instant::now() + Duration::from_secs(5))?;
    // The server takes the enable before the first push: a moment for it to arrive.
    std::thread::sleep(Duration::from_millis(50));

    // The client: when each byte count was reached.
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Instant)>();
    let reader = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut total = 0;
        loop {
            match messages.read_message() {
                Ok(ServerMessage::AudioData(d)) => {
                    total += d.len();
                    if tx.send((total, Instant::now())).is_err() {
                        return Ok(());
                    }
                }
                Ok(ServerMessage::AudioEnd) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("the client's connection: {e}"),
            }
        }
    });

    let periods = ((seconds * 100.0) as usize).max(100);
    let format = vmm_core::audio::AudioFormat { rate: RATE, channels: 2 };
    if !screen.audio_start(format) {
        bail!("the sound output refused S16 stereo at {RATE} Hz");
    }
    let mut pushed = Vec::with_capacity(periods);
    let start = Instant::now();
    // A period of the micro-guests' square wave (480 Hz: 100 frames a wave, 4.8 waves a period).
    let samples: Vec<i16> = (0..PERIOD_FRAMES * 2).map(|i| if (i / 2) % 100 < 50 { 8000 } else { -8000 }).collect();
    for k in 0..periods {
        let due = start + Duration::from_millis(10 * k as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        pushed.push(Instant::now());
        screen.audio_push(&samples);
    }
    std::thread::sleep(Duration::from_millis(100));
    screen.audio_stop();
    let mut arrivals: Vec<(usize, Instant)> = Vec::new();
    while let Ok(a) = rx.recv_timeout(Duration::from_secs(2)) {
        arrivals.push(a);
        if a.0 >= periods * PERIOD_BYTES {
            break;
        }
    }
    drop(rx);
    drop(client);
    let _ = reader.join();
    let late = screen.audio().late_frames();
    let got = arrivals.last().map_or(0, |a| a.0);
    if got < periods * PERIOD_BYTES || late > 0 {
        bail!("the client got {got} of {} bytes ({late} frames dropped as late)", periods * PERIOD_BYTES);
    }
    let mut times: Vec<Duration> = (0..periods)
        .map(|k| {
            let end = (k + 1) * PERIOD_BYTES;
            let at = arrivals.iter().find(|a| a.0 >= end).expect("every byte arrived").1;
            at.duration_since(pushed[k])
        })
        .collect();
    times.sort();
    println!(
        "audio, the console's leg: 10 ms periods pushed into the sound output in real time -> their last byte at \
         an RFB client (QEMU audio extension, S16 stereo 48 kHz, Unix socket), {periods} periods: p50 {:.3} ms, \
         p99 {:.3} ms, slowest {:.3} ms; no peer (QEMU's audio cannot be fed from the host side)",
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        quantile(&times, 1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A sound micro-guest, the line it prints as its stream starts, and the QEMU that has its card.
struct GuestCard {
    card: Card,
    started: &'static str,
    qemu: Option<PathBuf>,
}

fn guest_to_client(runs: usize) -> anyhow::Result<()> {
    let vmm = std::env::current_exe()?.with_file_name("porthole-vmm");
    if !vmm.exists() {
        bail!("{} is not built (cargo build --release -p vmm-core)", vmm.display());
    }
    let system_qemu = PathBuf::from("qemu-system-x86_64");
    let fetched = porthole_tests::sound::fetched_qemu();
    let cards = [
        GuestCard {
            card: Card {
                guest: "hda",
                prefix: "hda",
                porthole: "hda",
                qemu: &["-device", "ich9-intel-hda", "-device", "hda-output,audiodev=snd0"],
            },
            started: "HDA running",
            qemu: Some(system_qemu),
        },
        GuestCard {
            card: Card {
                guest: "virtio-sound",
                prefix: "sound",
                porthole: "virtio",
                qemu: &["-device", "virtio-sound-pci,audiodev=snd0"],
            },
            started: "SOUND playing",
            qemu: porthole_tests::sound::qemu_device_help(&fetched, "virtio-sound-pci").map(|_| fetched),
        },
    ];
    println!(
        "audio, guest -> client: from the guest's line that its stream started to the first sound at a client of \
         the engine's VNC server, {runs} runs each (medians)"
    );
    for c in &cards {
        let mut vmm_ms = Vec::new();
        let mut qemu_ms = Vec::new();
        for _ in 0..runs {
            vmm_ms.push(first_sound(&c.card, c.started, Engine::Porthole, None, &vmm)?);
            if let Some(q) = &c.qemu {
                qemu_ms.push(first_sound(&c.card, c.started, Engine::Qemu, Some(q), &vmm)?);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ours = median(&mut vmm_ms);
        match c.qemu {
            // The HD Audio guest prints its line after setting RUN: the sound may come first (0 ms here).
            Some(_) if ours < 0.5 => println!(
                "  {:<13} porthole-vmm  <= 0.5 ms (before the line)   QEMU {:7.1} ms",
                c.card.guest,
                median(&mut qemu_ms)
            ),
            Some(_) => {
                let theirs = median(&mut qemu_ms);
                println!(
                    "  {:<13} porthole-vmm {ours:7.1} ms   QEMU {theirs:7.1} ms   ratio {:.2}",
                    c.card.guest,
                    ours / theirs
                );
            }
            None => println!(
                "  {:<13} porthole-vmm {ours:7.1} ms   QEMU: none with virtio-sound-pci here \
                 (tests/hw/fetch-l0-qemu.sh unpacks one)",
                c.card.guest
            ),
        }
    }
    Ok(())
}

/// One run: the guest plays one second; ms from its `started` line to the first sound at the client.
fn first_sound(card: &Card, started: &str, engine: Engine, qemu: Option<&Path>, vmm: &Path) -> anyhow::Result<f64> {
    let mut guest = Guest::start_with(card, engine, 100, qemu, vmm);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !guest.vnc.exists() {
        if Instant::now() > deadline {
            bail!("{engine:?}: no VNC socket; {}", guest.stderr());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (client, mut messages, _) =
        rfb::audio_client(&guest.vnc, RATE, deadline).with_context(|| format!("{engine:?}: starting the audio"))?;
    // The first sound, on a thread of its own while this one watches the serial file.
    let heard = std::thread::spawn(move || -> anyhow::Result<Instant> {
        loop {
            match messages.read_message()? {
                ServerMessage::AudioData(d) if d.chunks_exact(2).any(|s| s != [0, 0]) => return Ok(Instant::now()),
                _ => {}
            }
        }
    });
    let line_at = loop {
        if guest.output().contains(started) {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!("{engine:?}: the guest never said {started:?}; serial:\n{}", guest.output());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let sound_at = heard.join().map_err(|_| anyhow::anyhow!("the client's thread panicked"))??;
    let out = guest.finish();
    drop(client);
    if out.contains("FAIL") {
        bail!("{engine:?}: the guest failed:\n{out}");
    }
    // The sound may come before the line is seen (the serial file is polled every millisecond): 0 then.
    Ok(sound_at.saturating_duration_since(line_at).as_secs_f64() * 1000.0)
}
