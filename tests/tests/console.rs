//! The console of `porthole-vmm`: the framebuffer and VGA text mode over RFB, with our test client and
//! with real peers (vncsnapshot), keyboard and mouse input into the guest, VncAuth, and hostile clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use porthole_tests::rfb::{self, HandshakeError, RfbClient};
use porthole_tests::{Scratch, run, text, wait_until, workspace_bin};

const LIMIT: Duration = Duration::from_secs(60);

/// A VM with its console on a Unix socket and its serial in a file.
struct ConsoleVm {
    dir: Scratch,
    child: Child,
    serial: PathBuf,
    vnc: PathBuf,
}

impl ConsoleVm {
    fn start(guest: &str, extra: &[&str], marker: &str) -> ConsoleVm {
        let dir = Scratch::new(guest);
        let serial = dir.path("serial.log");
        let vnc = dir.path("vnc.sock");
        let child = Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(porthole_guests::path(guest))
            .args(["--memory", "64"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--vnc")
            .arg(format!("unix:{}", vnc.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let vm = ConsoleVm { dir, child, serial, vnc };
        vm.wait_for(marker);
        vm
    }

    fn output(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    /// Waits for the whole line that holds `what` (the guest prints slowly: a line read as it is being
    /// written would be cut short).
    fn wait_for(&self, what: &str) {
        wait_until(
            LIMIT,
            || {
                let out = self.output();
                out.find(what).is_some_and(|at| out[at..].contains('\n'))
            },
            || format!("waiting for {what:?}; serial:\n{}", self.output()),
        );
    }

    fn client(&self) -> RfbClient {
        RfbClient::connect(&self.vnc, None).unwrap_or_else(|e| panic!("cannot connect: {e:?}"))
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for ConsoleVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fb-pattern's picture (see tests/guests/asm/fb-pattern.S).
fn pattern(x: u32, y: u32) -> u32 {
    const BARS: [u32; 8] = [0xFFFFFF, 0xFFFF00, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF, 0x000000];
    if y < 400 {
        BARS[(x / 160) as usize]
    } else {
        let (r, g, b) = (((7 * x) ^ (3 * y)) & 0xFF, ((3 * x) ^ (7 * y)) & 0xFF, (x ^ y) & 0xFF);
        (r << 16) | (g << 8) | b
    }
}

#[test]
fn fb_pattern_arrives_pixel_exact_in_every_lossless_encoding() {
    let vm = ConsoleVm::start("fb-pattern", &[], "PORTHOLE-FB-PATTERN-READY 1280x800");
    for encoding in [0, 5, 6, 16, 7] {
        let mut c = vm.client();
        c.set_encodings(&[encoding, -223]).unwrap();
        c.full_frame().unwrap();
        assert_eq!((c.width, c.height), (1280, 800));
        let mut wrong = 0;
        for y in 0..800 {
            for x in 0..1280 {
                if c.pixel(x, y) != pattern(x, y) {
                    wrong += 1;
                }
            }
        }
        assert_eq!(
            wrong,
            0,
            "encoding {encoding}: pixels differ, e.g. (700,500): {:06x} vs {:06x}",
            c.pixel(700, 500),
            pattern(700, 500)
        );
        assert!(c.name.contains("vm"), "desktop name {:?}", c.name);
    }
}

#[test]
fn tight_jpeg_is_close_to_the_pattern() {
    let vm = ConsoleVm::start("fb-pattern", &[], "PORTHOLE-FB-PATTERN-READY 1280x800");
    let mut c = vm.client();
    c.set_encodings(&[7, -27 /* quality level 5 */, -223]).unwrap();
    c.full_frame().unwrap();
    // The colour bars are flat: JPEG keeps them within a few levels away from the edges.
    for (x, y) in [(80, 100), (240, 200), (400, 300), (560, 50), (720, 350), (880, 10), (1040, 390), (1200, 200)] {
        let (got, want) = (c.pixel(x, y), pattern(x, y));
        for shift in [16, 8, 0] {
            let (a, b) = (((got >> shift) & 0xFF) as i32, ((want >> shift) & 0xFF) as i32);
            assert!((a - b).abs() <= 24, "({x},{y}): {got:06x} vs {want:06x}");
        }
    }
    let raw_size = 1280 * 800 * 4;
    assert!(c.bytes_received < raw_size / 2, "JPEG sent {} bytes for a {raw_size}-byte frame", c.bytes_received);
}

#[test]
fn vncsnapshot_decodes_every_encoding() {
    let vm = ConsoleVm::start("fb-pattern", &["--vnc", "tcp:127.0.0.1:0"], "PORTHOLE-FB-PATTERN-READY");
    // vncsnapshot speaks TCP only: find the port porthole-vmm bound.
    let port = tcp_port_of(vm.child.id());
    for encoding in ["raw", "hextile", "zlib", "zrle", "tight"] {
        let jpg = vm.dir.path(&format!("{encoding}.jpg"));
        let out = run(
            Command::new("vncsnapshot")
                .args(["-quality", "100", "-encodings", encoding, &format!("127.0.0.1::{port}")])
                .arg(&jpg),
            LIMIT,
        );
        assert!(out.status.success(), "{encoding}: {}", text(&out.stderr));
        // The snapshot is a JPEG: compare with a tolerance, at points away from colour edges.
        let ppm = vm.dir.path(&format!("{encoding}.ppm"));
        let convert = run(Command::new("convert").arg(&jpg).arg(&ppm), LIMIT);
        assert!(convert.status.success(), "{}", text(&convert.stderr));
        let image = read_ppm(&ppm);
        assert_eq!((image.0, image.1), (1280, 800), "{encoding}");
        for (x, y) in [(80, 100), (240, 200), (400, 300), (560, 50), (720, 350), (880, 10), (1040, 390), (1200, 200)] {
            let got = image.2[(y * 1280 + x) as usize];
            let want = pattern(x, y);
            for shift in [16, 8, 0] {
                let (a, b) = (((got >> shift) & 0xFF) as i32, ((want >> shift) & 0xFF) as i32);
                assert!((a - b).abs() <= 24, "{encoding} at ({x},{y}): {got:06x} vs {want:06x}");
            }
        }
    }
}

#[test]
fn gvncviewer_shows_the_pattern() {
    let vm = ConsoleVm::start("fb-pattern", &["--vnc", "tcp:127.0.0.1:0"], "PORTHOLE-FB-PATTERN-READY");
    // gvncviewer addresses servers by display number: port - 5900 (the kernel's ports are above 32768).
    let port = tcp_port_of(vm.child.id());
    let x = porthole_tests::Xvfb::start(1600, 1000);
    let mut viewer = Command::new("gvncviewer")
        .arg(format!("127.0.0.1:{}", port - 5900))
        .env("DISPLAY", &x.display)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gvncviewer (apt-get install gvncviewer)");
    // Count the pure yellow pixels of the second colour bar (160x400 = 64000 in the guest) on the X screen.
    let yellow = || {
        let shot = vm.dir.path("screen.ppm");
        run(Command::new("import").args(["-window", "root"]).arg(&shot).env("DISPLAY", &x.display), LIMIT);
        let (_, _, pixels) = read_ppm(&shot);
        pixels.iter().filter(|p| **p == 0xFFFF00).count()
    };
    wait_until(LIMIT, || yellow() >= 60_000, || format!("gvncviewer shows {} yellow pixels", yellow()));
    let _ = viewer.kill();
    let _ = viewer.wait();
}

#[test]
fn vncdotool_types_keys_that_the_guest_receives() {
    let vncdotool = porthole_tests::repo_root().join("target/venv/bin/vncdotool");
    assert!(vncdotool.exists(), "{} missing: ./x test installs it", vncdotool.display());
    let vm = ConsoleVm::start("kbd-echo", &["--vnc", "tcp:127.0.0.1:0"], "PORTHOLE-KBD-READY");
    let port = tcp_port_of(vm.child.id());
    let out = run(Command::new(&vncdotool).args(["-s", &format!("127.0.0.1::{port}"), "type", "abc"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    vm.wait_for("PORTHOLE-KEY ae");
    let keys: Vec<String> =
        vm.output().lines().filter_map(|l| l.strip_prefix("PORTHOLE-KEY ").map(str::to_owned)).collect();
    assert_eq!(keys, ["1e", "9e", "30", "b0", "2e", "ae"]);
}

fn tcp_port_of(pid: u32) -> u16 {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            return u16::from_str_radix(f[1].split(':').nth(1).unwrap(), 16).unwrap();
        }
    }
    panic!("porthole-vmm {pid} listens on no TCP port");
}

/// (width, height, pixels) of a binary PPM.
fn read_ppm(path: &std::path::Path) -> (u32, u32, Vec<u32>) {
    let data = std::fs::read(path).unwrap();
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while data[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while !data[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&data[start..at]).into_owned());
    }
    at += 1;
    let (w, h): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let pixels =
        data[at..].chunks_exact(3).map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])).collect();
    (w, h, pixels)
}

#[test]
fn text_mode_shows_glyphs_in_their_cells() {
    use vmm_core::display::{font, text};
    let vm = ConsoleVm::start("text-mode", &[], "PORTHOLE-TEXT-READY");
    let mut c = vm.client();
    c.set_encodings(&[0, -223]).unwrap();
    c.full_frame().unwrap();
    assert_eq!((c.width, c.height), (text::WIDTH, text::HEIGHT));
    let check_cell = |c: &RfbClient, col: u32, row: u32, ch: u8, attr: u8| {
        let glyph = font::glyphs()[usize::from(ch)];
        let (fg, bg) = (text::PALETTE[usize::from(attr & 15)], text::PALETTE[usize::from(attr >> 4)]);
        for (line, bits) in glyph.iter().enumerate() {
            for x in 0..8 {
                let want = if bits & (1 << x) != 0 { fg } else { bg };
                let got = c.pixel(col * 8 + x, row * 16 + line as u32);
                assert_eq!(got, want, "cell ({col},{row}) {:?} line {line} x {x}", ch as char);
            }
        }
    };
    for (i, ch) in b"PORTHOLE TEXT MODE".iter().enumerate() {
        check_cell(&c, i as u32, 0, *ch, 0x1F);
    }
    for k in [b'A', b'z', b'0', 0xB0, 0xDB, 0xE1] {
        let cell = 80 + u32::from(k);
        check_cell(&c, cell % 80, cell / 80, k, 0x07);
    }
    for (i, ch) in b"bottom line".iter().enumerate() {
        check_cell(&c, i as u32, 24, *ch, 0x4E);
    }
    // Text in Tight goes through its palette filter (two colours: one bit per pixel; more: one byte),
    // lossless even when the client allows JPEG: the same screen as in Raw.
    for encodings in [vec![rfb::TIGHT, -223], vec![rfb::TIGHT, -23 /* JPEG quality 9 */, -223]] {
        let mut t = vm.client();
        t.set_encodings(&encodings).unwrap();
        t.full_frame().unwrap();
        let differing = t.pixels.iter().zip(&c.pixels).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{encodings:?}: pixels differ from Raw's");
    }
}

#[test]
fn keys_and_mouse_reach_the_guest() {
    let vm = ConsoleVm::start("kbd-echo", &[], "PORTHOLE-KBD-READY");
    let mut c = vm.client();
    c.set_encodings(&[0, -258]).unwrap();
    // A keysym ('a') and a QEMU extended key event (keypad Enter, XT 0x9C).
    c.key(u32::from(b'a'), true).unwrap();
    c.key(u32::from(b'a'), false).unwrap();
    vm.wait_for("PORTHOLE-KEY 9e");
    c.qemu_key(0xFF8D, 0x9C, true).unwrap();
    c.qemu_key(0xFF8D, 0x9C, false).unwrap();
    vm.wait_for("PORTHOLE-KEY 9c");
    let keys: Vec<String> =
        vm.output().lines().filter_map(|l| l.strip_prefix("PORTHOLE-KEY ").map(str::to_owned)).collect();
    assert_eq!(keys, ["1e", "9e", "e0", "1c", "e0", "9c"]);
    // The server acknowledged QEMU extended key events.
    c.request(false).unwrap();
    c.read_update().unwrap();
    assert!(c.acknowledged.contains(&-258));
    // A client that takes the Cursor pseudo-encoding gets the pointer shape: an 11x19 arrow, tip opaque.
    c.set_encodings(&[0, -258, -239]).unwrap();
    c.request(false).unwrap();
    c.read_update().unwrap();
    let (w, h, shape) = c.cursor.clone().expect("a cursor shape");
    assert_eq!((w, h), (11, 19));
    let mask = &shape[(w * h * 4) as usize..];
    assert_eq!(mask[0] & 0x80, 0x80, "the tip is opaque");
    assert_eq!(mask[0] & 0x40, 0, "right of the tip is transparent");
    // Pointer: move 10 right and 5 down, then press the left button.
    c.pointer(100, 100, 0).unwrap();
    c.pointer(110, 105, 0).unwrap();
    c.pointer(110, 105, 1).unwrap();
    vm.wait_for("PORTHOLE-MOUSE b=1");
    let mouse: Vec<String> =
        vm.output().lines().filter(|l| l.starts_with("PORTHOLE-MOUSE")).map(str::to_owned).collect();
    assert_eq!(mouse, ["PORTHOLE-MOUSE b=0 dx=10 dy=-5", "PORTHOLE-MOUSE b=1 dx=0 dy=0"]);
}

/// The guest's lock lights reach clients that take QEMU's LED state pseudo-encoding: all off at first,
/// then Caps Lock on and off again as the guest (kbd-echo, like an OS) sets its PS/2 keyboard's LEDs when
/// Caps Lock is pressed on the console. A client that did not ask for them never gets them.
#[test]
fn the_guests_lock_lights_reach_clients_that_take_led_state() {
    const CAPS_LOCK: u32 = 0xFFE5;
    let vm = ConsoleVm::start("kbd-echo", &[], "PORTHOLE-KBD-READY");
    let mut c = vm.client();
    c.set_encodings(&[rfb::RAW, rfb::LED_STATE]).unwrap();
    c.full_frame().unwrap();
    let off = porthole_api::KeyboardLeds::default();
    assert_eq!(c.lock_lights, Some(off), "the lights as they are, with the first update");
    let mut plain = vm.client();
    plain.set_encodings(&[rfb::RAW]).unwrap();
    plain.full_frame().unwrap();
    let caps = porthole_api::KeyboardLeds { caps_lock: true, ..off };
    for (press, want, line) in [(1, caps, "PORTHOLE-LEDS 4"), (2, off, "PORTHOLE-LEDS 0")] {
        c.key(CAPS_LOCK, true).unwrap();
        c.key(CAPS_LOCK, false).unwrap();
        wait_until(
            LIMIT,
            || vm.output().matches("PORTHOLE-LEDS").count() == press,
            || format!("press {press} of Caps Lock; serial:\n{}", vm.output()),
        );
        assert!(vm.output().contains(line), "{}", vm.output());
        // An update with nothing new on the screen but the lights.
        let mut updates = 0;
        while c.lock_lights != Some(want) {
            updates += 1;
            assert!(updates < 50, "the client's lights {:?}, the guest's {want:?}", c.lock_lights);
            c.request(true).unwrap();
            c.read_update().unwrap();
        }
    }
    plain.full_frame().unwrap();
    assert_eq!(plain.lock_lights, None, "sent to a client that did not ask");
}

/// With `--input virtio` the guest has a virtio tablet and keyboard, but this one never loads their driver
/// (as firmware and boot loaders): keys and the pointer still reach its PS/2 keyboard and mouse.
#[test]
fn with_virtio_input_keys_and_the_pointer_stay_on_ps2_until_the_guest_takes_them() {
    let vm = ConsoleVm::start("kbd-echo", &["--input", "virtio"], "PORTHOLE-KBD-READY");
    let mut c = vm.client();
    c.key(u32::from(b'a'), true).unwrap();
    c.key(u32::from(b'a'), false).unwrap();
    vm.wait_for("PORTHOLE-KEY 9e");
    let keys: Vec<String> =
        vm.output().lines().filter_map(|l| l.strip_prefix("PORTHOLE-KEY ").map(str::to_owned)).collect();
    assert_eq!(keys, ["1e", "9e"]);
    c.pointer(100, 100, 0).unwrap();
    c.pointer(110, 105, 1).unwrap();
    vm.wait_for("PORTHOLE-MOUSE b=1");
}

#[test]
fn vnc_auth_accepts_the_password_and_refuses_others() {
    let dir = Scratch::new("vncauth");
    let password = dir.path("password");
    std::fs::write(&password, "s3cret!\n").unwrap();
    let vm = ConsoleVm::start("text-mode", &["--vnc-password", password.to_str().unwrap()], "PORTHOLE-TEXT-READY");
    let mut good = RfbClient::connect(&vm.vnc, Some("s3cret!")).expect("right password");
    good.set_encodings(&[0]).unwrap();
    good.full_frame().unwrap();
    match RfbClient::connect(&vm.vnc, Some("guess")) {
        Err(HandshakeError::Refused(reason)) => {
            assert!(reason.contains("authentication failed"), "{reason}")
        }
        other => panic!("a wrong password was not refused: {:?}", other.map(|_| ())),
    }
}

#[test]
fn hostile_clients_do_not_hurt_the_vm_or_other_clients() {
    let mut vm = ConsoleVm::start("kbd-echo", &[], "PORTHOLE-KBD-READY");
    let mut good = vm.client();
    good.set_encodings(&[0]).unwrap();
    good.full_frame().unwrap();
    let send = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&vm.vnc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut version = [0u8; 12];
        s.read_exact(&mut version).unwrap();
        let _ = s.write_all(bytes);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // the server closes it (or we time out)
    };
    let handshake: &[u8] = b"RFB 003.008\n\x01\x01";
    let after = |tail: &[u8]| [handshake, tail].concat();
    send(b"HTTP/1.1 GET /\r\n\r\n"); // not RFB at all
    send(b"RFB 003.008\n\x07"); // a security type never offered
    send(&after(&[0x42])); // unknown message type
    send(&after(&[2, 0, 0xFF, 0xFF])); // 65535 encodings announced
    send(&after(&[6, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF])); // 2 GiB of cut text announced
    send(&after(&[248, 0, 0, 0, 0x80, 0, 0, 0, 200])); // fence payload over 64 bytes
    send(&after(&[0, 0, 0, 0, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])); // colour-map pixel format
    send(&after(&[3, 0, 0xFF, 0xF0, 0xFF, 0xF0, 0xFF, 0xFF, 0xFF, 0xFF])); // an absurd update request
    send(&after(&[4, 1])); // a truncated key event
    // A slow client: asks for full screens and never reads them. Its writer blocks on its own socket only.
    let mut slow = UnixStream::connect(&vm.vnc).unwrap();
    let mut version = [0u8; 12];
    slow.read_exact(&mut version).unwrap();
    slow.write_all(handshake).unwrap();
    for _ in 0..200 {
        slow.write_all(&[3, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0x90]).unwrap();
    }
    for _ in 0..1000 {
        drop(UnixStream::connect(&vm.vnc).unwrap()); // connect and vanish
    }
    assert!(vm.running(), "the VM died");
    // The well-behaved client still works, and input still reaches the guest.
    good.key(u32::from(b'q'), true).unwrap();
    good.key(u32::from(b'q'), false).unwrap();
    vm.wait_for("PORTHOLE-KEY 90");
    std::thread::sleep(Duration::from_millis(200)); // the echo reaches the screen within a refresh
    good.full_frame().unwrap();
    let rss = vm.rss_kib();
    assert!(rss < 200 * 1024, "porthole-vmm grew to {rss} KiB");
    drop(slow);
    // And new clients are still welcome (once the storm's connections are gone).
    let mut fresh = None;
    wait_until(
        LIMIT,
        || {
            fresh = RfbClient::connect(&vm.vnc, None).ok();
            fresh.is_some()
        },
        || "the server kept refusing".into(),
    );
    let mut fresh = fresh.unwrap();
    fresh.set_encodings(&[0]).unwrap();
    fresh.full_frame().unwrap();
    let differing = fresh.pixels.iter().zip(&good.pixels).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "two clients see different screens");
}

/// Reads exactly `n` bytes.
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Handshakes at an older protocol version by hand; returns the stream after ServerInit.
fn old_handshake(vm: &ConsoleVm, version: &[u8; 12]) -> UnixStream {
    let mut s = UnixStream::connect(&vm.vnc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_n(&mut s, 12), b"RFB 003.008\n");
    s.write_all(version).unwrap();
    if version == b"RFB 003.003\n" {
        assert_eq!(read_n(&mut s, 4), [0, 0, 0, 1], "3.3: the server picks None");
    } else {
        assert_eq!(read_n(&mut s, 2), [1, 1], "3.7: one type offered, None");
        s.write_all(&[1]).unwrap(); // no SecurityResult follows None in 3.7
    }
    s.write_all(&[1]).unwrap(); // ClientInit: shared
    let init = read_n(&mut s, 24);
    assert_eq!(u16::from_be_bytes([init[0], init[1]]), 640, "text mode width");
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    read_n(&mut s, name_len);
    s
}

#[test]
fn rfb_3_3_and_3_7_clients_are_served() {
    let vm = ConsoleVm::start("text-mode", &[], "PORTHOLE-TEXT-READY");
    for version in [b"RFB 003.003\n", b"RFB 003.007\n"] {
        let mut s = old_handshake(&vm, version);
        s.write_all(&[3, 0, 0, 0, 0, 0, 0, 8, 0, 16]).unwrap(); // 8x16 top-left cell, non-incremental
        let head = read_n(&mut s, 4 + 12);
        assert_eq!(head[0], 0, "a framebuffer update");
        assert_eq!(&head[12..16], &0i32.to_be_bytes(), "Raw by default");
        let pixels = read_n(&mut s, 8 * 16 * 4);
        assert!(pixels.chunks_exact(4).any(|p| p[..3] == [0xFF, 0xFF, 0xFF]), "the 'P' of row 0 in white");
    }
}

#[test]
fn fence_and_continuous_updates() {
    let vm = ConsoleVm::start("kbd-echo", &[], "PORTHOLE-KBD-READY");
    let mut c = vm.client();
    let mut s = c.stream.try_clone().unwrap();
    c.set_encodings(&[0, -312, -313]).unwrap();
    // The server announces Fence with a ServerFence and ContinuousUpdates with EndOfContinuousUpdates.
    let fence = read_n(&mut s, 9);
    assert_eq!(fence[0], 248);
    assert_ne!(u32::from_be_bytes([fence[4], fence[5], fence[6], fence[7]]) & (1 << 31), 0, "a fence request");
    assert_eq!(read_n(&mut s, 1), [150], "EndOfContinuousUpdates");
    // A client fence with the request bit comes back with the same payload and the request bit cleared.
    s.write_all(&[248, 0, 0, 0, 0x80, 0, 0, 0x01, 3, b'a', b'b', b'c']).unwrap();
    let reply = read_n(&mut s, 12);
    assert_eq!(reply, [248, 0, 0, 0, 0, 0, 0, 0x01, 3, b'a', b'b', b'c']);
    // Continuous updates for the whole text screen: a key's echo arrives with no update request.
    s.write_all(&[150, 1, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0x90]).unwrap();
    c.read_update().unwrap(); // the initial damage (the whole screen)
    c.key(u32::from(b'z'), true).unwrap();
    vm.wait_for("PORTHOLE-KEY 2c");
    let rects = c.read_update().unwrap();
    assert!(!rects.is_empty(), "an update without asking for one");
    // Disabling them is acknowledged with another EndOfContinuousUpdates.
    s.write_all(&[150, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut seen_end = false;
    let mut byte = [0u8; 1];
    while !seen_end && s.read_exact(&mut byte).is_ok() {
        if byte[0] == 150 {
            seen_end = true;
        } else if byte[0] == 0 {
            // Another update may have been in flight: skip it through the client.
            let mut rest = [0u8; 3];
            s.read_exact(&mut rest).unwrap();
            for _ in 0..u16::from_be_bytes([rest[1], rest[2]]) {
                let h = read_n(&mut s, 12);
                let (w, hh) = (u16::from_be_bytes([h[4], h[5]]) as usize, u16::from_be_bytes([h[6], h[7]]) as usize);
                read_n(&mut s, w * hh * 4);
            }
        }
    }
    assert!(seen_end, "no EndOfContinuousUpdates after disabling");
}

#[test]
fn extended_desktop_size_announces_mode_changes_and_refuses_client_resizes() {
    let vm = ConsoleVm::start("fb-pattern", &[], "PORTHOLE-FB-PATTERN-READY");
    let mut c = vm.client();
    let mut s = c.stream.try_clone().unwrap();
    assert_eq!((c.width, c.height), (1280, 800));
    c.set_encodings(&[0, -308]).unwrap();
    // SetDesktopSize 800x600, one screen: refused (the guest decides its mode), reported as status 1.
    let mut m = vec![251, 0, 0x03, 0x20, 0x02, 0x58, 1, 0];
    m.extend_from_slice(&[0; 16]);
    s.write_all(&m).unwrap();
    s.write_all(&[3, 1, 0, 0, 0, 0, 0x05, 0x00, 0x03, 0x20]).unwrap(); // incremental request
    let head = read_n(&mut s, 4);
    assert_eq!(head[0], 0);
    let mut found = false;
    for _ in 0..u16::from_be_bytes([head[2], head[3]]) {
        let r = read_n(&mut s, 12);
        let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
        if encoding == -308 {
            // The layout (reason 0: the server's own, status 0) comes with the client's first update; the
            // answer to its request is reason 1 (the client's), status 1 (prohibited).
            let (reason, status) = (u16::from_be_bytes([r[0], r[1]]), u16::from_be_bytes([r[2], r[3]]));
            match reason {
                0 => assert_eq!(status, 0, "the layout announced"),
                _ => {
                    assert_eq!((reason, status), (1, 1), "client-requested change, prohibited");
                    found = true;
                }
            }
            assert_eq!(read_n(&mut s, 4)[0], 1, "one screen");
            read_n(&mut s, 16);
        } else {
            let (w, h) = (u16::from_be_bytes([r[4], r[5]]) as usize, u16::from_be_bytes([r[6], r[7]]) as usize);
            read_n(&mut s, w * h * 4);
        }
    }
    assert!(found, "no ExtendedDesktopSize reply");
}

/// `--vnc-view-only`: the client sees the screen, its keys and pointer never reach the guest; a full
/// console on the same VM still types.
#[test]
fn a_view_only_console_drops_input() {
    let dir = Scratch::new("view-only");
    let view = dir.path("view.sock");
    let vm =
        ConsoleVm::start("kbd-echo", &["--vnc-view-only", &format!("unix:{}", view.display())], "PORTHOLE-KBD-READY");
    let mut viewer = RfbClient::connect(&view, None).unwrap();
    viewer.set_encodings(&[0]).unwrap();
    viewer.request(false).unwrap();
    viewer.read_update().unwrap();
    viewer.key(u32::from(b'a'), true).unwrap();
    viewer.key(u32::from(b'a'), false).unwrap();
    viewer.pointer(10, 10, 1).unwrap();
    viewer.pointer(20, 20, 0).unwrap();
    // The same key from the full console arrives; the viewer's never did (input is handled in order per
    // client, and the viewer's was sent first).
    let mut full = vm.client();
    full.key(u32::from(b'b'), true).unwrap();
    full.key(u32::from(b'b'), false).unwrap();
    vm.wait_for("PORTHOLE-KEY b0");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = vm.output();
    assert!(
        !out.contains("PORTHOLE-KEY 1e") && !out.contains("PORTHOLE-MOUSE"),
        "viewer input reached the guest:\n{out}"
    );
    drop(dir);
}

/// A guest that crashes keeps its last screen, as under QEMU: after the triple fault the console still
/// serves the picture the guest drew (a client that connects only now gets it pixel-exact), the control
/// socket says `crashed` with the reason, and `stop` ends the process with exit status 2 and the crash as
/// the exit record's reason.
#[test]
fn a_crashed_guest_keeps_its_last_screen_until_stopped() {
    use vmm_core::control::{ControlClient, Request};
    const BANDS: [u32; 8] = [0xFFFFFF, 0xFFFF00, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF, 0x000000];
    let dir = Scratch::new("crash-screen-ctl");
    let control = dir.path("control.sock");
    let exit = dir.path("exit.json");
    let control_arg = format!("unix:{}", control.display());
    let mut vm = ConsoleVm::start(
        "crash-screen",
        &["--control", &control_arg, "--exit-file", exit.to_str().unwrap()],
        "PORTHOLE-GUEST-EXCEPTION vector=0x06",
    );
    let status = || ControlClient::connect(&control).unwrap().request(&Request::Status).unwrap().status.unwrap();
    wait_until(
        LIMIT,
        || status().state == vmm_core::vm::RunState::Crashed,
        || format!("never reported crashed: {:?}", status()),
    );
    let report = status().crash.unwrap_or_default();
    assert!(report.contains("triple fault") && report.contains("instruction bytes: 0f 0b"), "{report}");
    assert!(vm.running());
    for encoding in [0, 16] {
        let mut c = vm.client();
        c.set_encodings(&[encoding]).unwrap();
        c.full_frame().unwrap();
        assert_eq!((c.width, c.height), (640, 480));
        let wrong = (0..480)
            .flat_map(|y| (0..640).map(move |x| (x, y)))
            .filter(|&(x, y)| c.pixel(x, y) != BANDS[(y / 60) as usize]);
        assert_eq!(wrong.count(), 0, "encoding {encoding}: (320,130) is {:06x}", c.pixel(320, 130));
    }
    ControlClient::connect(&control).unwrap().request(&Request::Stop).unwrap();
    wait_until(LIMIT, || !vm.running(), || "still running after stop".into());
    assert_eq!(vm.child.wait().unwrap().code(), Some(2));
    let record: vmm_core::vm::ExitRecord = serde_json::from_str(&std::fs::read_to_string(&exit).unwrap()).unwrap();
    assert_eq!(record.exit_code, 2);
    assert!(record.reason.starts_with("the guest crashed: triple fault"), "{record:?}");
}
