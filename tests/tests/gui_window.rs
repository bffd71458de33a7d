//! The real `porthole` window under Xvfb with a real local daemon: it opens and paints; it shows a
//! daemon-run VM's screen (the `fb-pattern` guest's colour bars, found in a screenshot of the display) and
//! types into it (xdotool keys reach the `kbd-echo` guest).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, Xvfb, run, text, wait_until, workspace_bin};

/// `porthole` on display `x` talking to the daemon on `socket`, with its settings and data inside `dir`.
fn porthole(x: &Xvfb, dir: &Scratch, socket: &Path, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.path("porthole.log")).unwrap();
    Command::new(workspace_bin("porthole"))
        .args(args)
        .env("DISPLAY", &x.display)
        .env_remove("WAYLAND_DISPLAY")
        .env("XDG_RUNTIME_DIR", dir.dir())
        .env("XDG_CONFIG_HOME", dir.path("config"))
        .env("XDG_DATA_HOME", dir.path("data"))
        .env("PORTHOLE_SOCKET", socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start porthole")
}

fn finish(mut app: Child) {
    assert!(app.try_wait().unwrap().is_none(), "porthole exited");
    let _ = app.kill();
    let _ = app.wait();
}

/// Waits for the app's window; if it never comes, says whether the app is still running and what it printed.
fn wait_for_window(x: &Xvfb, app: &mut Child, dir: &Scratch) {
    let tree = || {
        let out =
            run(Command::new("xwininfo").args(["-root", "-tree", "-display", &x.display]), Duration::from_secs(10));
        text(&out.stdout)
    };
    wait_until(
        Duration::from_secs(90),
        || tree().contains("\"Porthole\""),
        || {
            format!(
                "no Porthole window ({}); its log:\n{}\nwindows:\n{}",
                match app.try_wait() {
                    Ok(Some(status)) => format!("porthole exited: {status}"),
                    _ => "porthole still running".to_owned(),
                },
                std::fs::read_to_string(dir.path("porthole.log")).unwrap_or_default(),
                tree()
            )
        },
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

fn serial_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The shared Xvfb does not reset when a client leaves: `porthole` connecting while the test's xwininfo
/// (or xdotool, convert) exits keeps its connection.
#[test]
fn xvfb_keeps_a_connecting_client_when_another_leaves() {
    let x = Xvfb::start(640, 480);
    assert!(
        porthole_tests::x_server_keeps_a_connecting_client(&x.display),
        "Xvfb dropped a connection in its setup when another client left (it reset)"
    );
}

#[test]
fn the_window_opens_and_paints_under_xvfb() {
    let x = Xvfb::start(1280, 800);
    let dir = Scratch::new("gui");
    let d = Daemon::start(&dir, false, &[]);
    let mut app = porthole(&x, &dir, &d.socket(), &[]);
    wait_for_window(&x, &mut app, &dir);
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
    finish(app);
}

/// The window against a real local daemon: `porthole --console NAME` opens a daemon-run VM's console the
/// way the GUI does (ticket, the VM's RFB socket); the fb-pattern guest's colour bars appear in a
/// screenshot of the display, and keys and a click typed with xdotool reach the kbd-echo guest.
#[test]
fn the_window_shows_a_vm_screen_and_types_into_it() {
    let x = Xvfb::start(1280, 800);
    let dir = Scratch::new("gui-console");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    let start_vm = |name: &str, guest: &str, marker: &str| {
        let req = porthole_api::CreateVm {
            boot: Some(porthole_api::BootSpec {
                kernel: porthole_guests::path(guest).display().to_string(),
                initrd: None,
                cmdline: String::new(),
            }),
            disk_gib: 0,
            ..porthole_api::CreateVm::new(name, 1, 64)
        };
        let vm = rt.block_on(c.create_vm(&req)).unwrap();
        rt.block_on(c.action(&vm.id, porthole_api::client::Action::Start)).unwrap();
        let serial = d.run.join("vms").join(&vm.id).join("serial.log");
        wait_until(Duration::from_secs(30), || serial_text(&serial).contains(marker), || serial_text(&serial));
        serial
    };
    // fb-pattern: eight colour bars over the top half of its screen.
    start_vm("pattern", "fb-pattern", "PORTHOLE-FB-PATTERN-READY");
    let mut app = porthole(&x, &dir, &d.socket(), &["--console", "pattern"]);
    wait_for_window(&x, &mut app, &dir);
    let bars = [0xFFFF00u32, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF];
    wait_until(
        Duration::from_secs(60),
        || {
            let (_, _, pixels) = screenshot(&x);
            bars.iter().all(|c| pixels.iter().filter(|p| *p == c).count() > 2000)
        },
        || "the colour bars never appeared in the window".into(),
    );
    finish(app);

    // kbd-echo: click the console to give it the keyboard, type; the guest reports the scan codes.
    let serial = start_vm("echo", "kbd-echo", "PORTHOLE-KBD-READY");
    let mut app = porthole(&x, &dir, &d.socket(), &["--console", "echo"]);
    wait_for_window(&x, &mut app, &dir);
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
    finish(app);
    for vm in rt.block_on(c.list_vms()).unwrap() {
        let _ = rt.block_on(c.action(&vm.id, porthole_api::client::Action::Poweroff));
    }
}
