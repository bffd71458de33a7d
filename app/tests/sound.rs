//! The console plays the guest's sound on this computer: the `virtio-sound` micro-guest plays a 480 Hz
//! square wave (amplitude 8000, S16 stereo at 48 kHz) on `porthole-vmm --sound virtio`; the window's console
//! takes it with QEMU's audio extension and plays it through ALSA's default device, which here is
//! PulseAudio (ALSA's pulse plugin, as on a desktop with PulseAudio or PipeWire) with a null sink that
//! plays in real time; the sink's monitor is recorded with `parec` and must hold the tone. *Mute* silences
//! it. One test in this file: the ALSA and PulseAudio settings are the process's environment.

use egui_kittest::Harness;
use porthole::PortholeApp;
use porthole::backend::Backend;
use porthole_tests::Scratch;
use porthole_tests::pulse::{PulseServer, heard};

mod common;
use common::*;

fn app_without_local_host() -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, || Err("no local host in this test".to_owned()), None);
    Harness::builder().with_size(egui::vec2(1200.0, 800.0)).build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

#[test]
fn the_console_plays_the_guests_sound_and_mutes_it() {
    let dir = Scratch::new("gui-sound");
    let Some(pulse) = PulseServer::start_or_skip(&dir) else { return };
    let alsa = dir.path("asound.conf");
    std::fs::write(&alsa, "pcm.!default { type pulse }\nctl.!default { type pulse }\n").unwrap();
    // SAFETY: the only test of this binary sets them before anything in it uses ALSA or PulseAudio.
    unsafe {
        std::env::set_var("PULSE_SERVER", pulse.server());
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

    // The first part may still be the silence before the console's output started.
    let recorded = pulse.record(2.0, || h.step());
    heard(&recorded).assert_is_the_tone("the window's console, recorded from PulseAudio");

    click(&mut h, "Mute");
    wait(&mut h, "the unmute button", |h| has(h, "Unmute"));
    let muted = pulse.record(0.8, || h.step());
    let loudest = muted[muted.len() / 2..].iter().map(|&s| i32::from(s).abs()).max().unwrap_or(0);
    assert!(loudest < 100, "muted, yet a sample of {loudest}");
    assert!(!serial_text().contains("SOUND FAIL"), "{}", serial_text());
}
