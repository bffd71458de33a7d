//! The real `porthole` window under Xvfb: it opens, has its title, and paints.

use std::process::{Command, Stdio};
use std::time::Duration;

use porthole_tests::{Scratch, Xvfb, run, text, wait_until, workspace_bin};

#[test]
fn the_window_opens_and_paints_under_xvfb() {
    let x = Xvfb::start(1280, 800);
    let dir = Scratch::new("gui");
    let mut app = Command::new(workspace_bin("porthole"))
        .env("DISPLAY", &x.display)
        .env_remove("WAYLAND_DISPLAY")
        .env("XDG_RUNTIME_DIR", dir.dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start porthole");
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
    assert!(app.try_wait().unwrap().is_none(), "porthole exited");
    let _ = app.kill();
    let _ = app.wait();
}
