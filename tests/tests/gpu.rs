//! virtio-gpu (`porthole-vmm --vga virtio`, a virtio-vga PCI function) driven by the `virtio-gpu`
//! micro-guest (tests/guests/asm/virtio-gpu.S), side by side with QEMU's own `-device virtio-vga`: the same
//! driver gets the same answers for the display information, the EDID's preferred mode and a 2D draw (a
//! resource with a two-piece backing, transferred, set as the scanout and flushed), and the picture it draws
//! reaches each engine's VNC server pixel for pixel. A SetDesktopSize from the RFB client reaches the guest
//! as a display-change event with the new size on both. Requests a device must refuse get error responses
//! on porthole-vmm and leave the device working.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use porthole_tests::rfb::{self, RfbClient};
use porthole_tests::{Killed, Scratch, text, wait_until, workspace_bin};

/// Generous: the guest's instructions are emulated here; a run takes seconds.
const LIMIT: Duration = Duration::from_secs(60);
/// The monitor both engines start with (QEMU's virtio-vga default, given explicitly on both).
const DISPLAY: (u32, u32) = (1280, 800);
/// What `draw=` draws, and what the RFB client asks for.
const DRAW: (u32, u32) = (128, 64);
const RESIZE: (u16, u16) = (1024, 768);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Porthole,
    Qemu,
}

/// The guest running on one engine, its serial in a file and its screen on a VNC Unix socket.
struct Guest {
    engine: Engine,
    child: Killed,
    serial: PathBuf,
    vnc: PathBuf,
    dir: Scratch,
}

impl Guest {
    fn start(engine: Engine, cmdline: &str) -> Guest {
        let dir = Scratch::new(&format!("gpu-{engine:?}").to_lowercase());
        let (serial, vnc) = (dir.path("serial.log"), dir.path("vnc.sock"));
        let guest = porthole_guests::path("virtio-gpu");
        let mut cmd = match engine {
            Engine::Porthole => {
                let mut c = Command::new(workspace_bin("porthole-vmm"));
                c.arg("--kernel")
                    .arg(&guest)
                    .args(["--memory", "64", "--vga", "virtio", "--display", &format!("{}x{}", DISPLAY.0, DISPLAY.1)])
                    .args(["--cmdline", cmdline])
                    .arg("--serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("--vnc")
                    .arg(format!("unix:{}", vnc.display()));
                c
            }
            Engine::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
                    .args(["-nodefaults", "-no-reboot", "-display", "none", "-vga", "none", "-device"])
                    .arg(format!("virtio-vga,xres={},yres={}", DISPLAY.0, DISPLAY.1))
                    .arg("-vnc")
                    .arg(format!("unix:{}", vnc.display()))
                    .arg("-serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("-kernel")
                    .arg(&guest)
                    .args(["-append", cmdline]);
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
        Guest { engine, child: Killed(child), serial, vnc, dir }
    }

    fn output(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    fn wait_for(&self, what: &str) {
        wait_until(
            LIMIT,
            || self.output().contains(what),
            || format!("{:?}: waiting for {what:?}; serial:\n{}", self.engine, self.output()),
        );
    }

    /// Waits for the guest to power off (the engine exits with status 0); its serial output.
    fn finish(mut self) -> String {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                let stderr = text(&std::fs::read(self.dir.path("stderr.log")).unwrap_or_default());
                assert!(status.success(), "{:?} exited with {status}: {stderr}\n{}", self.engine, self.output());
                return self.output();
            }
            assert!(start.elapsed() < LIMIT, "{:?} still running; serial:\n{}", self.engine, self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> RfbClient {
        let mut c = RfbClient::connect(&self.vnc, None).unwrap_or_else(|e| panic!("{:?}: connect: {e:?}", self.engine));
        c.set_encodings(&[rfb::RAW, rfb::DESKTOP_SIZE, rfb::EXTENDED_DESKTOP_SIZE]).unwrap();
        c
    }
}

/// The guest's `draw=` pattern (see virtio-gpu.S): 0x00RRGGBB, R = 4x, G = 4y (mod 256), B = 0x80.
fn pattern(x: u32, y: u32) -> u32 {
    ((x * 4) & 0xFF) << 16 | ((y * 4) & 0xFF) << 8 | 0x80
}

/// Pixels of the client's screen that differ from the pattern (the first few, for the message).
fn wrong_pixels(c: &RfbClient) -> Vec<(u32, u32, String, String)> {
    let mut wrong = Vec::new();
    for y in 0..c.height {
        for x in 0..c.width {
            if c.pixel(x, y) != pattern(x, y) && wrong.len() < 8 {
                wrong.push((x, y, format!("{:06x}", c.pixel(x, y)), format!("{:06x}", pattern(x, y))));
            }
        }
    }
    wrong
}

/// Whole frames, asked for again until `done` holds (a VNC server may copy the guest's picture a little
/// after the guest's flush). Each whole-frame request is answered, so nothing waits on a still screen.
fn frames_until(c: &mut RfbClient, what: &str, mut done: impl FnMut(&RfbClient) -> bool) {
    let deadline = Instant::now() + LIMIT;
    loop {
        c.full_frame().unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        if done(c) {
            return;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the guest prints on either engine for `info edid draw=W,H wait-display info edid wait-display`, the
/// client asking for [`RESIZE`], then for [`DISPLAY`] again. `edid_size`: the EDID length the device reports.
fn expected_lines(edid_size: u32) -> Vec<String> {
    let ((w, h), (rw, rh)) = (DISPLAY, RESIZE);
    vec![
        "GPU pci slot=".into(),
        " class=030000\n".into(),
        "GPU found scanouts=1 capsets=0 edid=1\n".into(),
        format!("GPU info enabled=1 width={w} height={h}\n"),
        format!("GPU edid size={edid_size} width={w} height={h} sum=1\n"),
        "GPU draw create=0x1100 attach=0x1100 transfer=0x1100 scanout=0x1100 flush=0x1100\n".into(),
        format!("GPU display-changed width={rw} height={rh} enabled=1 events-after-clear=0 config-irq=1\n"),
        format!("GPU info enabled=1 width={rw} height={rh}\n"),
        format!("GPU edid size={edid_size} width={rw} height={rh} sum=1\n"),
        format!("GPU display-changed width={w} height={h} enabled=1 events-after-clear=0 config-irq=1\n"),
        "GPU done\n".into(),
    ]
}

fn assert_in_order(engine: Engine, out: &str, lines: &[String]) {
    let mut rest = out;
    for line in lines {
        match rest.find(line.as_str()) {
            Some(at) => rest = &rest[at + line.len()..],
            None => panic!("{engine:?}: {line:?} missing (in this order); serial:\n{out}"),
        }
    }
    assert!(!out.contains("bad-word") && !out.contains("timeout"), "{engine:?}:\n{out}");
}

/// Runs the whole scenario on one engine; returns the serial output and the status of the server's answer
/// to the client's first SetDesktopSize.
fn draw_and_resize(engine: Engine) -> (String, Option<u32>) {
    let cmdline = format!("info edid draw={},{} wait-display info edid wait-display", DRAW.0, DRAW.1);
    let guest = Guest::start(engine, &cmdline);
    guest.wait_for("GPU draw ");

    // The scanout is the guest's resource: the VNC screen is DRAW big and shows the pattern.
    let mut c = guest.client();
    frames_until(&mut c, "the guest's picture", |c| (c.width, c.height) == DRAW && wrong_pixels(c).is_empty());
    assert_eq!((c.width, c.height), DRAW, "{engine:?}");
    assert_eq!(wrong_pixels(&c), [], "{engine:?}: (x, y, client, pattern)");
    // Both pieces of the backing: the last pixel of the first (the split is pixel W*H/2 + W/2: mid-row 32)
    // and the first of the second.
    assert_eq!((c.pixel(63, 32), c.pixel(64, 32)), (0xFC_80_80, 0x00_80_80), "{engine:?}");
    assert_eq!((c.pixel(0, 0), c.pixel(127, 63)), (0x00_00_80, 0xFC_FC_80), "{engine:?}");

    // The client asks for another size: the guest, waiting in wait-display, sees its monitor change. The
    // server's answer comes with an update (ours: the next one it sends); the guest then waits for the
    // second change, so the VM is still there to answer.
    // Both servers announce ExtendedDesktopSize with the client's first update, the size unchanged, so the
    // client knows it may ask.
    assert!(c.acknowledged.contains(&rfb::EXTENDED_DESKTOP_SIZE), "{engine:?}: {:?}", c.acknowledged);
    c.set_desktop_size(RESIZE.0, RESIZE.1).unwrap();
    frames_until(&mut c, "the answer to SetDesktopSize", |c| c.resize_status.is_some());
    let status = c.resize_status;
    guest.wait_for(&format!(" width={} height={} sum=", RESIZE.0, RESIZE.1));
    // Back to the first size: a second event, after the guest cleared the first.
    c.set_desktop_size(DISPLAY.0 as u16, DISPLAY.1 as u16).unwrap();
    let out = guest.finish();
    drop(c);
    (out, status)
}

/// The same guest, the same answers from porthole-vmm's virtio-vga and QEMU's: display information,
/// EDID, a 2D draw that reaches the VNC screen pixel-exact, and SetDesktopSize reaching the guest.
#[test]
fn the_virtio_gpu_guest_gets_the_same_answers_from_qemu_and_porthole_vmm() {
    let (on_vmm, vmm_status) = draw_and_resize(Engine::Porthole);
    eprintln!("porthole-vmm:\n{on_vmm}");
    // porthole-vmm's EDID is one 128-byte base block.
    assert_in_order(Engine::Porthole, &on_vmm, &expected_lines(128));
    assert_eq!(vmm_status, Some(0), "porthole-vmm accepts the size (the guest's monitor follows)");

    let (on_qemu, qemu_status) = draw_and_resize(Engine::Qemu);
    eprintln!("QEMU:\n{on_qemu}");
    // QEMU 7.2 reports its whole 1024-byte EDID buffer as the size (each 128-byte block sums to 0).
    assert_in_order(Engine::Qemu, &on_qemu, &expected_lines(1024));
    // QEMU forwards SetDesktopSize to the display (virtio-gpu's ui_info) and answers 4, "request forwarded".
    assert_eq!(qemu_status, Some(4), "QEMU's answer to SetDesktopSize");

    // Line for line the same, but for where each engine puts the device and its EDID's length.
    let comparable = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("GPU ") && !l.starts_with("GPU pci ") && !l.starts_with("GPU edid "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(comparable(&on_vmm), comparable(&on_qemu), "porthole-vmm:\n{on_vmm}\nQEMU:\n{on_qemu}");
}

/// Requests the device must refuse get the error the specification names, the device stays up (no
/// NEEDS_RESET), and a draw afterwards works and reaches the screen.
#[test]
fn hostile_requests_get_errors_and_leave_porthole_vmms_display_working() {
    let guest = Guest::start(Engine::Porthole, "hostile draw=64,48 info wait-display");
    guest.wait_for("GPU draw ");
    let mut c = guest.client();
    frames_until(&mut c, "the picture after the hostile requests", |c| {
        (c.width, c.height) == (64, 48) && wrong_pixels(c).is_empty()
    });
    // The monitor still follows the console.
    c.set_desktop_size(800, 600).unwrap();
    let out = guest.finish();
    drop(c);
    eprintln!("porthole-vmm:\n{out}");
    let lines: Vec<String> = [
        ("unknown", 0x1200),
        ("id0", 0x1203),
        ("format", 0x1205),
        ("scanout-rect", 0x1205),
        ("scanout-id", 0x1202),
        ("flush-rect", 0x1205),
        ("transfer-rect", 0x1205),
        ("transfer-backing", 0x1205),
        ("no-resource", 0x1203),
        ("short", 0x1200),
    ]
    .iter()
    .map(|(case, resp)| format!("GPU hostile case={case} resp=0x{resp:04x}\n"))
    .chain([
        "GPU hostile-done unref=0x1100 info=0x1101 devstatus=0f\n".into(),
        "GPU draw create=0x1100 attach=0x1100 transfer=0x1100 scanout=0x1100 flush=0x1100\n".into(),
        format!("GPU info enabled=1 width={} height={}\n", DISPLAY.0, DISPLAY.1),
        "GPU display-changed width=800 height=600 enabled=1 events-after-clear=0 config-irq=1\n".into(),
        "GPU done\n".into(),
    ])
    .collect();
    assert_in_order(Engine::Porthole, &out, &lines);
}
