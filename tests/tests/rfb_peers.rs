//! Porthole's RFB client (`porthole_api::rfb`, the GUI's console) against real VNC servers: QEMU's (a
//! micro-guest's framebuffer, compared with QEMU's own `screendump`; keys typed into `kbd-echo`), TigerVNC's
//! Xvnc (a picture on the root window, compared with ImageMagick's capture of the same display; VncAuth with
//! the right and a wrong password), and x11vnc sharing an Xvfb display (the same comparison, every encoding,
//! VncAuth).

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use porthole_tests::rfb::{self, HandshakeError, RfbClient};
use porthole_tests::{Killed, Scratch, Xvfb, wait_until, xvnc};

const LIMIT: Duration = Duration::from_secs(60);

fn lossless(c: &mut RfbClient) {
    c.set_encodings(&[rfb::ZRLE, rfb::HEXTILE, rfb::ZLIB, rfb::RAW, rfb::COPY_RECT, rfb::DESKTOP_SIZE]).unwrap();
    c.full_frame().unwrap();
}

/// Reads a binary PPM (P6, maxval 255) into 0xRRGGBB pixels.
fn read_ppm(path: &Path) -> (u32, u32, Vec<u32>) {
    let bytes = std::fs::read(path).unwrap();
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if bytes[at] == b'#' {
            while bytes[at] != b'\n' {
                at += 1;
            }
            continue;
        }
        let start = at;
        while !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..at]).into_owned());
    }
    assert_eq!(fields[0], "P6");
    let (w, h): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let data = &bytes[at + 1..];
    (w, h, data.chunks_exact(3).map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])).collect())
}

fn differing(a: &[u32], b: &[u32]) -> usize {
    let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
    if n > 0 {
        let first: Vec<(usize, String, String)> = a
            .iter()
            .zip(b)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .take(4)
            .map(|(i, (x, y))| (i, format!("{x:06x}"), format!("{y:06x}")))
            .collect();
        eprintln!("first differences (index, client, expected): {first:?}");
    }
    n
}

/// A QEMU monitor command over its Unix socket.
fn monitor(path: &Path, command: &str) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let _ = r.read_line(&mut line); // banner
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    // The monitor echoes the command and prints a new prompt when done.
    let mut seen = String::new();
    while seen.matches("(qemu)").count() < 2 {
        let mut buf = [0u8; 256];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

fn qemu_with_vnc(dir: &Scratch, guest: &str) -> (Killed, PathBuf, PathBuf, PathBuf) {
    let (vnc, mon, serial) = (dir.path("qemu-vnc.sock"), dir.path("qemu-mon.sock"), dir.path("qemu-serial.log"));
    let mut cmd = Command::new("qemu-system-x86_64");
    // QEMU's std VGA is the Bochs display the guests know.
    cmd.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-kernel"])
        .arg(porthole_guests::path(guest))
        .args(["-vga", "std", "-vnc"])
        .arg(format!("unix:{}", vnc.display()))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", mon.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
    let child =
        Killed(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start QEMU"));
    (child, vnc, mon, serial)
}

#[test]
fn qemus_vnc_server_frames_match_its_screendump_and_keys_arrive() {
    let dir = Scratch::new("peer-qemu");
    let (_qemu, vnc, mon, serial) = qemu_with_vnc(&dir, "fb-pattern");
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until(LIMIT, || text().contains("PORTHOLE-FB-PATTERN-READY"), text);
    let mut c = RfbClient::connect(&vnc, None).unwrap();
    lossless(&mut c);
    let dump = dir.path("screen.ppm");
    monitor(&mon, &format!("screendump {}", dump.display()));
    wait_until(
        LIMIT,
        || dump.exists() && std::fs::metadata(&dump).map(|m| m.len() > 0).unwrap_or(false),
        || "no screendump".into(),
    );
    let (w, h, pixels) = read_ppm(&dump);
    assert_eq!((c.width, c.height), (w, h));
    assert_eq!(differing(&c.pixels, &pixels), 0, "the client's frame differs from QEMU's screendump");
    drop(c);
    drop(_qemu);

    // Keys: QEMU acknowledges QEMU extended key events; kbd-echo prints what its keyboard sends.
    let dir = Scratch::new("peer-qemu-keys");
    let (_qemu, vnc, _mon, serial) = qemu_with_vnc(&dir, "kbd-echo");
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until(LIMIT, || text().contains("PORTHOLE-KBD-READY"), text);
    let mut c = RfbClient::connect(&vnc, None).unwrap();
    c.set_encodings(&[rfb::RAW, rfb::QEMU_EXTENDED_KEY_EVENT]).unwrap();
    c.request(false).unwrap();
    c.read_update().unwrap();
    assert!(c.acknowledged.contains(&rfb::QEMU_EXTENDED_KEY_EVENT));
    c.qemu_key(u32::from(b'a'), 0x1E, true).unwrap();
    c.qemu_key(u32::from(b'a'), 0x1E, false).unwrap();
    c.key(u32::from(b'b'), true).unwrap();
    c.key(u32::from(b'b'), false).unwrap();
    wait_until(LIMIT, || text().contains("PORTHOLE-KEY b0"), text);
    assert!(text().contains("PORTHOLE-KEY 1e") && text().contains("PORTHOLE-KEY 9e"), "{}", text());

    // Lock lights: Caps Lock pressed on the console, the guest sets its keyboard's Caps Lock LED, QEMU
    // sends the LED state pseudo-encoding (the reference for what Porthole's server sends, see console.rs).
    c.set_encodings(&[rfb::RAW, rfb::QEMU_EXTENDED_KEY_EVENT, rfb::LED_STATE]).unwrap();
    c.qemu_key(0xFFE5, 0x3A, true).unwrap();
    c.qemu_key(0xFFE5, 0x3A, false).unwrap();
    wait_until(LIMIT, || text().contains("PORTHOLE-LEDS 4"), text);
    let caps = porthole_api::KeyboardLeds { caps_lock: true, ..Default::default() };
    let mut updates = 0;
    while c.lock_lights != Some(caps) {
        updates += 1;
        assert!(updates < 50, "QEMU's lights {:?}; the guest set Caps Lock", c.lock_lights);
        c.request(true).unwrap();
        c.read_update().unwrap();
    }
}

/// Puts a test picture on display `display`'s root window and returns what ImageMagick captures of it.
fn paint_root(display: &str, dir: &Scratch) -> (u32, u32, Vec<u32>) {
    let picture = dir.path("picture.png");
    let made = Command::new("convert")
        .args([
            "-size",
            "320x200",
            "gradient:#ff3300-#0033ff",
            "(",
            "-size",
            "320x200",
            "plasma:fractal",
            ")",
            "-append",
        ])
        .arg(&picture)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // (display exits with status 1 after setting the root window's background; the capture below is the check.)
    Command::new("display").args(["-window", "root"]).arg(&picture).env("DISPLAY", display).output().unwrap();
    let dump = dir.path("root.ppm");
    let out =
        Command::new("convert").args(["x:root", "-depth", "8"]).arg(&dump).env("DISPLAY", display).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (w, h, pixels) = read_ppm(&dump);
    let colours: std::collections::HashSet<u32> = pixels.iter().copied().collect();
    assert!(colours.len() > 1000, "the picture is not on the root window ({} colours)", colours.len());
    (w, h, pixels)
}

#[test]
fn tigervnc_xvnc_frames_match_and_vnc_auth_works() {
    let dir = Scratch::new("peer-xvnc");
    let socket = dir.path("xvnc.sock");
    let password = dir.path("passwd");
    let out =
        Command::new("vncpasswd").arg("-f").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"s3cret\n")?;
            c.wait_with_output()
        });
    std::fs::write(&password, out.unwrap().stdout).unwrap();
    let (_xvnc, display) =
        xvnc(&socket, 150, &["-SecurityTypes", "VncAuth", "-PasswordFile", &password.display().to_string()]);
    let (w, h, expected) = paint_root(&display, &dir);
    match RfbClient::connect(&socket, Some("wrong")) {
        Err(HandshakeError::Refused(why)) => assert!(!why.is_empty()),
        other => panic!("a wrong password must be refused, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(RfbClient::connect(&socket, None), Err(HandshakeError::PasswordNeeded)));
    let mut c = RfbClient::connect(&socket, Some("s3cret")).unwrap();
    lossless(&mut c);
    assert_eq!((c.width, c.height), (w, h));
    assert_eq!(differing(&c.pixels, &expected), 0, "the client's frame differs from the X server's root window");
}

/// Reads updates until `done` holds (a read that times out just asks again), answering the extended
/// clipboard on the way with `ours`.
fn pump(c: &mut RfbClient, ours: Option<&str>, what: &str, mut done: impl FnMut(&mut RfbClient) -> bool) {
    let deadline = std::time::Instant::now() + LIMIT;
    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    loop {
        c.answer_clipboard(ours).unwrap();
        if done(c) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "waiting for {what}");
        c.request(true).unwrap();
        match c.read_update() {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// The screen size follows the client (ExtendedDesktopSize + SetDesktopSize, what the console's "Resize
/// guest" uses), and UTF-8 text crosses the extended clipboard both ways (X's clipboard read and written
/// with xclip).
#[test]
fn tigervnc_xvnc_resizes_to_the_client_and_shares_the_clipboard() {
    let dir = Scratch::new("peer-xvnc-extended");
    let socket = dir.path("xvnc.sock");
    let (_xvnc, display) = xvnc(&socket, 190, &["-SecurityTypes", "None"]);
    let mut c = RfbClient::connect(&socket, None).unwrap();
    c.set_encodings(&[
        rfb::ZRLE,
        rfb::RAW,
        rfb::COPY_RECT,
        rfb::DESKTOP_SIZE,
        rfb::EXTENDED_DESKTOP_SIZE,
        rfb::EXTENDED_CLIPBOARD,
    ])
    .unwrap();
    c.full_frame().unwrap();
    assert!(c.acknowledged.contains(&rfb::EXTENDED_DESKTOP_SIZE), "{:?}", c.acknowledged);

    // Resize: the X screen follows.
    c.set_desktop_size(800, 600).unwrap();
    pump(&mut c, None, "the new size", |c| (c.width, c.height) == (800, 600));
    assert_eq!(c.resize_status, Some(0), "the server accepted the size");
    let info = Command::new("xdpyinfo").args(["-display", &display]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("800x600 pixels"), "xdpyinfo: the X screen is 800x600");
    c.full_frame().unwrap();

    // X → client: text copied on the X side arrives whole (not Latin-1).
    let from_x = "grüße ✓ 日本 from X\nline two";
    let _owner = porthole_tests::set_x_clipboard(&display, from_x);
    pump(&mut c, None, "X's clipboard", |c| c.cut_text.as_deref() == Some(from_x));
    assert!(c.clipboard.extended, "the server offered the extended clipboard");

    // Client → X: announce new text; X's paste asks for it, and gets it.
    let ours = "from porthole ✓ ünïcode\nsecond line";
    c.set_read_timeout(None).unwrap();
    c.stream.write_all(&rfb::clipboard_notify_message()).unwrap();
    let reader = porthole_tests::read_x_clipboard_until(&display, ours);
    pump(&mut c, Some(ours), "X's paste", |_| reader.is_finished());
    assert_eq!(reader.join().unwrap(), ours);
}

/// x11vnc sharing an Xvfb display: frames match the display's own capture (every encoding the console
/// uses); VncAuth with the right password works and a wrong one is refused. (The shared Xvfb runs with
/// -noreset: without it the X server resets when the capture program disconnects, before x11vnc connects,
/// and the root window goes black: that, not the client, was the "black screen" seen earlier.)
#[test]
fn x11vnc_frames_match_the_display_and_vnc_auth_works() {
    let dir = Scratch::new("peer-x11vnc");
    let socket = dir.path("x11vnc.sock");
    let xvfb = Xvfb::start(640, 480);
    let display = xvfb.display.clone();
    let (w, h, expected) = paint_root(&display, &dir);
    let password = dir.path("passwd");
    let stored = Command::new("x11vnc").args(["-storepasswd", "s3cret"]).arg(&password).output().unwrap();
    assert!(stored.status.success(), "{}", String::from_utf8_lossy(&stored.stderr));
    let log = dir.path("x11vnc.log");
    let _x11vnc = Killed(
        Command::new("x11vnc")
            .args(["-display", &display, "-rfbport", "0", "-unixsock"])
            .arg(&socket)
            .args(["-forever", "-shared", "-nocursor", "-rfbauth"])
            .arg(&password)
            .arg("-o")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("x11vnc (apt-get install x11vnc)"),
    );
    wait_until(
        LIMIT,
        || socket.exists(),
        || format!("no x11vnc socket: {}", std::fs::read_to_string(&log).unwrap_or_default()),
    );
    // x11vnc binds its socket before it listens on it: a connection refused in that gap is not an answer.
    let deadline = std::time::Instant::now() + LIMIT;
    let first = loop {
        match RfbClient::connect(&socket, None) {
            Err(HandshakeError::Io(e)) if std::time::Instant::now() < deadline => {
                eprintln!("x11vnc not listening yet ({e}); retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            other => break other.map(|_| ()),
        }
    };
    assert!(matches!(first, Err(HandshakeError::PasswordNeeded)), "without a password: {first:?}");
    match RfbClient::connect(&socket, Some("wrong")) {
        Err(HandshakeError::Refused(why)) => assert!(!why.is_empty()),
        other => panic!("a wrong password must be refused, got {:?}", other.map(|_| ())),
    }
    for encodings in [
        vec![rfb::RAW],
        vec![rfb::HEXTILE],
        vec![rfb::ZLIB],
        vec![rfb::ZRLE],
        vec![rfb::ZRLE, rfb::HEXTILE, rfb::ZLIB, rfb::RAW, rfb::COPY_RECT, rfb::DESKTOP_SIZE],
    ] {
        // x11vnc delays a client after a failed password: retry for a while.
        let deadline = std::time::Instant::now() + LIMIT;
        let mut c = loop {
            match RfbClient::connect(&socket, Some("s3cret")) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "x11vnc refused the right password: {e:?}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        c.set_encodings(&encodings).unwrap();
        c.full_frame().unwrap();
        assert_eq!((c.width, c.height), (w, h));
        assert_eq!(differing(&c.pixels, &expected), 0, "x11vnc's frame ({encodings:?}) differs from the display");
    }
}
