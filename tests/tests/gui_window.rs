//! The real `porthole` window under Xvfb: it opens and paints; as a VNC client it shows a VM's screen (the
//! `fb-pattern` guest's colour bars, found in a screenshot of the display) and types into it (xdotool keys
//! reach the `kbd-echo` guest).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use porthole_tests::{Scratch, Xvfb, run, text, wait_until, workspace_bin};

/// `porthole` on display `x`, with its settings, data and daemon kept inside `dir`.
fn porthole(x: &Xvfb, dir: &Scratch, args: &[&str]) -> Child {
    Command::new(workspace_bin("porthole"))
        .args(args)
        .env("DISPLAY", &x.display)
        .env_remove("WAYLAND_DISPLAY")
        .env("XDG_RUNTIME_DIR", dir.dir())
        .env("XDG_CONFIG_HOME", dir.path("config"))
        .env("XDG_DATA_HOME", dir.path("data"))
        .env("PORTHOLE_SOCKET", dir.path("run/portholed.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start porthole")
}

/// Ends the app and the local daemon it started (found by its runtime dir, inside `dir`).
fn finish(mut app: Child, dir: &Scratch) {
    assert!(app.try_wait().unwrap().is_none(), "porthole exited");
    let _ = app.kill();
    let _ = app.wait();
    let marker = dir.path("run").display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("portholed") && cmdline.contains(&marker) {
            // SAFETY: kill(2) of the daemon this test's app started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn wait_for_window(x: &Xvfb) {
    let tree = || {
        let out =
            run(Command::new("xwininfo").args(["-root", "-tree", "-display", &x.display]), Duration::from_secs(10));
        text(&out.stdout)
    };
    wait_until(
        Duration::from_secs(60),
        || tree().contains("\"Porthole\""),
        || format!("no Porthole window:\n{}", tree()),
    );
}

/// The screen as 0xRRGGBB pixels (ImageMagick reads the X root window).
fn screenshot(x: &Xvfb) -> (usize, usize, Vec<u32>) {
    // (output(), not run(): three megabytes on stdout must be read while convert writes them.)
    let out =
        Command::new("convert").args(["x:root", "-depth", "8", "rgb:-"]).env("DISPLAY", &x.display).output().unwrap();
    let rgb = out.stdout;
    let (w, h) = (1280, 800);
    assert_eq!(rgb.len(), w * h * 3, "convert said: {}", text(&out.stderr));
    (w, h, rgb.chunks_exact(3).map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])).collect())
}

fn vm(guest: &str, dir: &Scratch) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let (socket, serial) = (dir.path(&format!("{guest}.sock")), dir.path(&format!("{guest}.log")));
    let child = Command::new(workspace_bin("porthole-vmm"))
        .arg("--kernel")
        .arg(porthole_guests::path(guest))
        .args(["--memory", "64"])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--vnc")
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), || socket.exists(), || "no VNC socket".into());
    (child, socket, serial)
}

fn serial_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn the_window_opens_and_paints_under_xvfb() {
    let x = Xvfb::start(1280, 800);
    let dir = Scratch::new("gui");
    let app = porthole(&x, &dir, &[]);
    wait_for_window(&x);
    // Give it a few frames, then look at the screen: the window's panels are not the black root window.
    std::thread::sleep(Duration::from_millis(1500));
    let out = run(
        Command::new("convert")
            .args(["x:root", "-crop", "1100x700+0+0", "-format", "%[fx:mean]\n", "info:"])
            .env("DISPLAY", &x.display),
        Duration::from_secs(30),
    );
    let mean: f64 = text(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("convert said: {}", text(&out.stderr)));
    assert!(mean > 0.05, "the window area is black (mean {mean}): nothing was painted");
    finish(app, &dir);
}

#[test]
fn the_window_shows_a_vm_screen_and_types_into_it() {
    let x = Xvfb::start(1280, 800);
    let dir = Scratch::new("gui-console");
    // fb-pattern: eight colour bars over the top half of a 1280x800 screen.
    let (mut pattern_vm, socket, serial) = vm("fb-pattern", &dir);
    wait_until(
        Duration::from_secs(30),
        || serial_text(&serial).contains("PORTHOLE-FB-PATTERN-READY"),
        || serial_text(&serial),
    );
    let app = porthole(&x, &dir, &[&format!("vnc+unix://{}", socket.display())]);
    wait_for_window(&x);
    let bars = [0xFFFF00u32, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF];
    wait_until(
        Duration::from_secs(60),
        || {
            let (_, _, pixels) = screenshot(&x);
            bars.iter().all(|c| pixels.iter().filter(|p| *p == c).count() > 2000)
        },
        || "the colour bars never appeared in the window".into(),
    );
    finish(app, &dir);
    let _ = pattern_vm.kill();
    let _ = pattern_vm.wait();

    // kbd-echo: click the console to give it the keyboard, type; the guest reports the scan codes.
    let (mut echo_vm, socket, serial) = vm("kbd-echo", &dir);
    wait_until(
        Duration::from_secs(30),
        || serial_text(&serial).contains("PORTHOLE-KBD-READY"),
        || serial_text(&serial),
    );
    let app = porthole(&x, &dir, &[&format!("vnc+unix://{}", socket.display())]);
    wait_for_window(&x);
    std::thread::sleep(Duration::from_millis(1500));
    let xdo =
        |args: &[&str]| run(Command::new("xdotool").args(args).env("DISPLAY", &x.display), Duration::from_secs(30));
    // No window manager runs here: give the window the keyboard focus as one would.
    let window = text(&xdo(&["search", "--name", "^Porthole$"]).stdout).lines().next().unwrap_or_default().to_owned();
    xdo(&["windowfocus", "--sync", &window]);
    xdo(&["mousemove", "550", "400", "click", "1"]);
    std::thread::sleep(Duration::from_millis(300));
    xdo(&["type", "--delay", "150", "ab"]);
    wait_until(
        Duration::from_secs(30),
        || {
            let s = serial_text(&serial);
            s.contains("PORTHOLE-KEY 1e") && s.contains("PORTHOLE-KEY 30") && s.contains("PORTHOLE-MOUSE b=1")
        },
        || format!("typed keys never reached the guest:\n{}", serial_text(&serial)),
    );
    finish(app, &dir);
    let _ = echo_vm.kill();
    let _ = echo_vm.wait();
}
