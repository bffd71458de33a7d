//! The real `porthole` window under Xvfb with a real local daemon: it opens and paints; it shows a
//! daemon-run VM's screen (the `fb-pattern` guest's colour bars, found in a screenshot of the display) and
//! types into it (xdotool keys reach the `kbd-echo` guest).

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, Xvfb, run, text, wait_until};

/// `porthole` on display `x` talking to the daemon on `socket`, with its settings and data inside `dir`.
fn porthole(x: &Xvfb, dir: &Scratch, socket: &Path, args: &[&str]) -> Child {
    porthole_with(x, dir, socket, args, &[])
}

/// [`porthole`] with more environment variables.
fn porthole_with(x: &Xvfb, dir: &Scratch, socket: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Child {
    let log = std::fs::File::create(dir.path("porthole.log")).unwrap();
    porthole_tests::window_command(x, dir, socket)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
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

/// The screen (1280 x 800) as 0xRRGGBB pixels (ImageMagick reads the X root window).
fn screenshot(x: &Xvfb) -> (usize, usize, Vec<u32>) {
    (1280, 800, pixels_of(Command::new("convert").args(["x:root"]).env("DISPLAY", &x.display), 1280, 800))
}

/// The `width` x `height` picture that ImageMagick's `convert ARGS...` reads, as 0xRRGGBB pixels.
fn pixels_of(convert: &mut Command, width: usize, height: usize) -> Vec<u32> {
    // (output(), not run(): megabytes on stdout must be read while convert writes them.)
    let out = convert.args(["-depth", "8", "rgb:-"]).output().unwrap();
    let rgb = out.stdout;
    assert_eq!(rgb.len(), width * height * 3, "convert said: {}", text(&out.stderr));
    rgb.chunks_exact(3).map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])).collect()
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

/// A named accessibility node of the window's layout report (`PORTHOLE_LAYOUT_REPORT`), in physical pixels.
#[derive(Debug, Clone)]
struct Laid {
    role: String,
    name: String,
    rect: [f64; 4],
}

/// The window at one scale as the test saw it.
struct Shown {
    ppp: f64,
    /// The window's inner size in pixels, as the app reported it.
    size: [f64; 2],
    nodes: Vec<Laid>,
    /// The window's place and size on the screen (xwininfo).
    geometry: [i64; 4],
    /// The screen's pixels (0xRRGGBB) and width.
    pixels: Vec<u32>,
    screen_width: usize,
}

fn parse_report(text: &str) -> Option<(f64, [f64; 2], Vec<Laid>)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let ppp = v["pixels_per_point"].as_f64()?;
    let size = [v["window"][0].as_f64()?, v["window"][1].as_f64()?];
    let nodes = v["nodes"]
        .as_array()?
        .iter()
        .filter_map(|n| {
            let r = n["rect"].as_array()?;
            Some(Laid {
                role: n["role"].as_str()?.to_owned(),
                name: n["name"].as_str()?.to_owned(),
                rect: [r.first()?.as_f64()?, r.get(1)?.as_f64()?, r.get(2)?.as_f64()?, r.get(3)?.as_f64()?],
            })
        })
        .collect();
    Some((ppp, size, nodes))
}

/// xwininfo's "Absolute upper-left X/Y", "Width" and "Height" of the Porthole window.
fn window_geometry(x: &Xvfb) -> Option<[i64; 4]> {
    let out =
        run(Command::new("xwininfo").args(["-display", &x.display, "-name", "Porthole"]), Duration::from_secs(10));
    let info = text(&out.stdout);
    let field = |name: &str| -> Option<i64> {
        info.lines().find_map(|l| l.trim().strip_prefix(name)).and_then(|v| v.trim().parse().ok())
    };
    Some([field("Absolute upper-left X:")?, field("Absolute upper-left Y:")?, field("Width:")?, field("Height:")?])
}

/// Opens the window at `scale` (`PORTHOLE_SCALE`) on the daemon at `socket`, waits until its layout has
/// settled with `expect` on it, saves a screenshot under Cargo's target/tmp (and prints its path), returns
/// what was seen.
fn show_at(x: &Xvfb, socket: &Path, scale: &str, expect: &str, screen: (usize, usize)) -> Shown {
    show_with(x, socket, &format!("scale-{scale}"), ("PORTHOLE_SCALE", scale), expect, screen)
}

/// [`show_at`] with the scale given by `scale_var` (`PORTHOLE_SCALE`, or the desktop's, as winit reads it
/// on X11: `WINIT_X11_SCALE_FACTOR`); `tag` names the run and its screenshot.
fn show_with(
    x: &Xvfb,
    socket: &Path,
    tag: &str,
    scale_var: (&str, &str),
    expect: &str,
    screen: (usize, usize),
) -> Shown {
    let dir = Scratch::new(&format!("gui-{tag}"));
    let report = dir.path("layout.json");
    let env = [(scale_var.0, std::ffi::OsStr::new(scale_var.1)), ("PORTHOLE_LAYOUT_REPORT", report.as_os_str())];
    let mut app = porthole_with(x, &dir, socket, &[], &env);
    wait_for_window(x, &mut app, &dir);
    // Settled: the report names `expect` and is the same twice in a row, 300 ms apart.
    let mut last = String::new();
    wait_until(
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_millis(300));
            let now = std::fs::read_to_string(&report).unwrap_or_default();
            let settled = now == last && parse_report(&now).is_some_and(|(_, _, n)| n.iter().any(|n| n.name == expect));
            last = now;
            settled
        },
        || {
            format!(
                "the layout report never settled with {expect:?}: {}",
                std::fs::read_to_string(&report).unwrap_or_default()
            )
        },
    );
    let (ppp, size, nodes) = parse_report(&last).unwrap();
    let geometry = window_geometry(x).expect("the window's geometry");
    // (Kept after the test, unlike its scratch dir: target/tmp/.)
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gui-window-{tag}.png"));
    let out = run(
        Command::new("import").args(["-display", &x.display, "-window", "root"]).arg(&shot),
        Duration::from_secs(30),
    );
    assert!(shot.is_file(), "import said: {}", text(&out.stderr));
    println!("the window ({tag}): {}", shot.display());
    let pixels = pixels_of(Command::new("convert").arg(&shot), screen.0, screen.1);
    finish(app);
    Shown { ppp, size, nodes, geometry, pixels, screen_width: screen.0 }
}

/// What is wrong with the window at one scale: its size and scale as asked, every named node inside it, and
/// every text button showing something (pixels of another colour than its background) in the screenshot.
fn problems_at(s: &Shown, scale: f64) -> Vec<String> {
    let mut problems = Vec::new();
    if (s.ppp - scale).abs() > 0.01 {
        problems.push(format!("{} pixels per point, not {scale}", s.ppp));
    }
    let [wx, wy, ww, wh] = s.geometry;
    let expected = [1100.0 * scale, 700.0 * scale];
    for (got, want) in
        [(s.size[0], expected[0]), (s.size[1], expected[1]), (ww as f64, expected[0]), (wh as f64, expected[1])]
    {
        if (got - want).abs() > 1.0 {
            problems.push(format!("window {:?} (X: {ww}x{wh}), not {expected:?} pixels", s.size));
            break;
        }
    }
    for n in &s.nodes {
        let [x0, y0, x1, y1] = n.rect;
        if x0 < -1.0 || y0 < -1.0 || x1 > s.size[0] + 1.0 || y1 > s.size[1] + 1.0 {
            problems.push(format!("{} {:?} at {:?} is not inside the {:?} window", n.role, n.name, n.rect, s.size));
        }
    }
    for n in s.nodes.iter().filter(|n| n.role == "Button") {
        let [x0, y0, x1, y1] = n.rect.map(|v| v.round() as i64);
        let (x0, y0, x1, y1) = (x0 + wx, y0 + wy, x1 + wx, y1 + wy);
        let height = (s.pixels.len() / s.screen_width) as i64;
        if x1 - x0 < 4 || y1 - y0 < 4 || x0 < 0 || y0 < 0 || x1 > s.screen_width as i64 || y1 > height {
            continue; // too small to judge, or off the screen (reported above)
        }
        let mut counts = std::collections::HashMap::new();
        for y in y0..y1 {
            for x in x0..x1 {
                *counts.entry(s.pixels[y as usize * s.screen_width + x as usize]).or_insert(0usize) += 1;
            }
        }
        let total = ((x1 - x0) * (y1 - y0)) as usize;
        let background = counts.values().copied().max().unwrap_or(0);
        // Text: at least 2% of the button (and 10 pixels) in other colours than its most common one.
        if (total - background) * 50 < total || total - background < 10 {
            problems.push(format!(
                "button {:?} at {:?} shows no text ({} of {total} pixels differ)",
                n.name,
                n.rect,
                total - background
            ));
        }
    }
    problems.into_iter().map(|p| format!("[scale {scale}] {p}")).collect()
}

/// The real window at scale 1 and 2 (`PORTHOLE_SCALE`, and the desktop's 2 as winit reads it on X11) on a
/// large Xvfb screen: the app's layout report
/// (its accessibility tree, in pixels) puts every named widget inside the window, the window and its
/// widgets at 2 are twice their size at 1, and every text button shows its text in a screenshot (saved in
/// target/tmp, its path printed).
#[test]
fn the_window_at_scale_1_and_2_under_xvfb() {
    let screen = (2400, 1500);
    let x = Xvfb::start(screen.0 as u32, screen.1 as u32);
    let dir = Scratch::new("gui-scales");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let req =
        porthole_api::CreateVm { disk_gib: 0, tags: vec!["web".into()], ..porthole_api::CreateVm::new("web-1", 1, 64) };
    rt.block_on(d.local().create_vm(&req)).unwrap();

    let one = show_at(&x, &d.socket(), "1", "Local — 1 VMs", screen);
    let two = show_at(&x, &d.socket(), "2", "Local — 1 VMs", screen);
    // The desktop's scale (winit's on X11) instead of Porthole's own: the same window.
    let desktop = show_with(&x, &d.socket(), "desktop-2", ("WINIT_X11_SCALE_FACTOR", "2"), "Local — 1 VMs", screen);
    let mut problems = problems_at(&one, 1.0);
    problems.extend(problems_at(&two, 2.0));
    problems.extend(problems_at(&desktop, 2.0).into_iter().map(|p| format!("(desktop) {p}")));
    assert!(one.nodes.iter().filter(|n| n.role == "Button").count() >= 5, "too few buttons: {:?}", one.nodes);

    // Every widget found once at each scale: twice as large, twice as far from the window's corner.
    let unique = |s: &Shown, n: &Laid| s.nodes.iter().filter(|m| m.role == n.role && m.name == n.name).count() == 1;
    let mut compared = 0;
    for a in one.nodes.iter().filter(|n| unique(&one, n)) {
        let Some(b) = two.nodes.iter().find(|m| m.role == a.role && m.name == a.name) else {
            problems.push(format!("{} {:?} is at scale 1 only", a.role, a.name));
            continue;
        };
        if !unique(&two, b) {
            continue;
        }
        let (wa, ha) = (a.rect[2] - a.rect[0], a.rect[3] - a.rect[1]);
        let (wb, hb) = (b.rect[2] - b.rect[0], b.rect[3] - b.rect[1]);
        let ratio_ok = |small: f64, large: f64| small < 8.0 || (large / small - 2.0).abs() <= 0.15;
        let place_ok = (0..2).all(|i| (b.rect[i] - 2.0 * a.rect[i]).abs() <= 4.0);
        if !ratio_ok(wa, wb) || !ratio_ok(ha, hb) || !place_ok {
            problems.push(format!("{} {:?}: {:?} at scale 1, {:?} at scale 2", a.role, a.name, a.rect, b.rect));
        }
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} widgets to compare");
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}
