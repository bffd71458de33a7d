//! Helpers shared by Porthole's end-to-end tests: scratch folders, child processes with time limits,
//! the workspace's built binaries, QEMU and Xvfb.

pub mod daemon;
pub mod hw;
pub mod rfb;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A scratch folder, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("porthole-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch folder");
        Scratch(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for `child` at most `limit`; past that kills it and panics with what it printed.
pub fn wait(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("poll child").is_some() {
            return child.wait_with_output().expect("collect child output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect child output");
            panic!(
                "process still running after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` (stdin closed, output captured) with a time limit.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    wait(child, limit)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `condition` every 20 ms until it holds; panics with `what()` after `limit`.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool, what: impl FnOnce() -> String) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() >= limit {
            panic!("gave up after {limit:?}: {}", what());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The workspace's target profile folder (target/debug when tests run from target/debug/deps).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps folder");
    deps.parent().expect("profile folder").to_owned()
}

/// A binary of the workspace, built by `cargo build --workspace --bins` (./x test does that first).
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins` (./x test does)", path.display());
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_owned()
}

/// A QEMU command line for a micro-guest with KVM: `machine` is "pc" (powers off through ACPI S5 only) or
/// "microvm" (through the debug-exit device).
pub fn qemu(machine: &str, kernel: &Path, cpus: u32) -> Command {
    qemu_with(&["-enable-kvm", "-cpu", "host,-arch-capabilities"], machine, kernel, cpus)
}

/// The same command line as [`qemu`] with QEMU's software emulation (TCG, `-cpu max`) instead of KVM: for
/// the micro-guests this machine's KVM cannot run (ring 3, XSAVE/XRSTOR).
pub fn qemu_tcg(machine: &str, kernel: &Path, cpus: u32) -> Command {
    qemu_with(&["-accel", "tcg", "-cpu", "max"], machine, kernel, cpus)
}

fn qemu_with(accel: &[&str], machine: &str, kernel: &Path, cpus: u32) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", machine]).args(accel).args(["-m", "64"]).args([
        "-smp",
        &cpus.to_string(),
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ]);
    if machine == "microvm" {
        // microvm has no ACPI PM block: the guests' fallback, QEMU's debug-exit port, ends it.
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    }
    cmd.arg("-kernel").arg(kernel);
    cmd
}

/// An Xvfb server on a free display, stopped when dropped.
pub struct Xvfb {
    child: Child,
    pub display: String,
}

impl Xvfb {
    pub fn start(width: u32, height: u32) -> Xvfb {
        // Tests in one process start servers one at a time; other processes are told apart by the lock file,
        // which holds the pid of the server that owns the display.
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        for n in 90..140 {
            let lock = format!("/tmp/.X{n}-lock");
            // A lock whose server is gone (killed without clean-up) is stale: clear it and its socket.
            if let Some(pid) = std::fs::read_to_string(&lock).ok().and_then(|l| l.trim().parse::<u32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_file(&lock);
                let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{n}"));
            }
            if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() || Path::new(&lock).exists() {
                continue;
            }
            let display = format!(":{n}");
            let mut child = Command::new("Xvfb")
                .args([&display, "-screen", "0", &format!("{width}x{height}x24"), "-nolisten", "tcp"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start Xvfb (apt-get install xvfb)");
            let socket = format!("/tmp/.X11-unix/X{n}");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                let owner =
                    std::fs::read_to_string(format!("/tmp/.X{n}-lock")).ok().and_then(|l| l.trim().parse::<u32>().ok());
                if Path::new(&socket).exists() && owner == Some(child.id()) {
                    return Xvfb { child, display };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // lost a race for this display; try the next one
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start Xvfb on any display :90-:139");
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        // SIGTERM first: the server removes its lock file and socket on the way out.
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text on a VGA text-mode screen as an RFB client sees it (0x00RRGGBB pixels, 8x16 cells): each cell is
/// matched against the console's own code page 437 glyphs (foreground = pixels that differ from the cell's
/// top-left background pixel), so "the banner is on the screen" is checked glyph by glyph, not by OCR.
/// Cells that match no glyph read as '?'. Returns one string per row, trailing blanks trimmed.
pub fn screen_text(pixels: &[u32], width: u32, height: u32) -> Vec<String> {
    use vmm_core::display::font::{GLYPH_HEIGHT, GLYPH_WIDTH, glyphs};
    const CP437_PRINTABLE: std::ops::Range<usize> = 0x20..0x7F;
    let (cols, rows) = (width as usize / GLYPH_WIDTH, height as usize / GLYPH_HEIGHT);
    let font = glyphs();
    let mut out = Vec::new();
    for row in 0..rows {
        let mut line = String::new();
        for col in 0..cols {
            let px = |x: usize, y: usize| pixels[(row * GLYPH_HEIGHT + y) * width as usize + col * GLYPH_WIDTH + x];
            // Two colours at most: try each as the background; a blank cell has one.
            let mut colours: Vec<u32> = Vec::new();
            for y in 0..GLYPH_HEIGHT {
                for x in 0..GLYPH_WIDTH {
                    if !colours.contains(&px(x, y)) {
                        colours.push(px(x, y));
                    }
                }
            }
            let found = if colours.len() == 1 {
                Some(' ')
            } else if colours.len() == 2 {
                colours.iter().find_map(|&background| {
                    let mut cell = [0u8; GLYPH_HEIGHT];
                    for (y, bits) in cell.iter_mut().enumerate() {
                        for x in 0..GLYPH_WIDTH {
                            if px(x, y) != background {
                                *bits |= 1 << x;
                            }
                        }
                    }
                    CP437_PRINTABLE.clone().find(|&c| font[c] == cell).map(|c| c as u8 as char)
                })
            } else {
                None
            };
            line.push(found.unwrap_or('?'));
        }
        out.push(line.trim_end().to_owned());
    }
    out
}

/// A child process, killed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An X display number (":N", N from `from` on) that no server holds.
pub fn free_display(from: u32) -> String {
    (from..from + 100)
        .find(|n| {
            !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
        })
        .map(|n| format!(":{n}"))
        .expect("a free X display number")
}

/// TigerVNC's Xvnc (640x480, 24 bits) on a free display from `from` on, serving RFB on the Unix socket
/// `socket` with the security arguments `security` (e.g. `["-SecurityTypes", "None"]`); returns once the
/// socket exists, with the server and its display.
pub fn xvnc(socket: &Path, from: u32, security: &[&str]) -> (Killed, String) {
    let display = free_display(from);
    let server = Killed(
        Command::new("Xvnc")
            .arg(&display)
            .args(["-geometry", "640x480", "-depth", "24", "-rfbport", "-1", "-nolisten", "tcp"])
            .arg("-rfbunixpath")
            .arg(socket)
            .args(security)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Xvnc (apt-get install tigervnc-standalone-server)"),
    );
    wait_until(Duration::from_secs(60), || socket.exists(), || "no Xvnc socket".into());
    (server, display)
}

/// Puts `text` on display `display`'s CLIPBOARD selection (xclip owns it until the returned guard drops).
pub fn set_x_clipboard(display: &str, text: &str) -> Killed {
    use std::io::Write;
    let mut owner = Command::new("xclip")
        .args(["-quiet", "-selection", "clipboard", "-display", display])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("xclip (apt-get install xclip)");
    owner.stdin.take().expect("xclip's stdin").write_all(text.as_bytes()).expect("write to xclip");
    Killed(owner)
}

/// Reads display `display`'s CLIPBOARD with xclip until it is `expected` (or a minute passed) in a thread:
/// a paste from a VNC server's display may wait for the VNC client to hand the text over.
pub fn read_x_clipboard_until(display: &str, expected: &str) -> std::thread::JoinHandle<String> {
    let (display, expected) = (display.to_owned(), expected.to_owned());
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new("timeout")
                .args(["10", "xclip", "-o", "-selection", "clipboard", "-display", &display])
                .output()
                .expect("xclip");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text == expected || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// porthole-vmm running micro-guest `guest` (64 MiB) with its console on the Unix socket `socket`, its serial
/// in `serial` and `extra` arguments; returns once the guest printed `marker`.
pub fn vnc_vm(guest: &str, socket: &Path, serial: &Path, extra: &[&std::ffi::OsStr], marker: &str) -> Killed {
    let vm = Killed(
        Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(porthole_guests::path(guest))
            .args(["--memory", "64"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--vnc")
            .arg(format!("unix:{}", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start porthole-vmm"),
    );
    wait_until(
        Duration::from_secs(30),
        || std::fs::read_to_string(serial).unwrap_or_default().contains(marker),
        || format!("{guest} never printed {marker}: {}", std::fs::read_to_string(serial).unwrap_or_default()),
    );
    vm
}
