//! Helpers shared by Porthole's end-to-end tests: scratch folders, child processes with time limits,
//! the workspace's built binaries, QEMU and Xvfb.

pub mod daemon;
pub mod hw;
pub mod libvirt;
pub mod pulse;
pub mod rfb;
pub mod sound;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A Linux bridge for network tests, with the host address given to `create` (an isolated test subnet of
/// its own), removed when dropped. Creating one needs root or CAP_NET_ADMIN.
pub struct TestBridge(String);

impl TestBridge {
    /// A new bridge `ptbr<pid>x<n>` with `host_cidr` (e.g. "10.213.77.1/24") as its address, up; or why it
    /// could not be made.
    pub fn create(host_cidr: &str) -> Result<TestBridge, String> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ptbr{}x{}", std::process::id() % 100_000, n % 100);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() { Ok(()) } else { Err(format!("ip {}: {}", args.join(" "), text(&out.stderr))) }
        };
        ip(&["link", "add", &name, "type", "bridge"])?;
        let bridge = TestBridge(name.clone());
        ip(&["addr", "add", host_cidr, "dev", &name])?;
        ip(&["link", "set", &name, "up"])?;
        Ok(bridge)
    }

    /// `create`, or None after printing the SKIP line with the reason (for tests that need the bridge).
    pub fn create_or_skip(host_cidr: &str) -> Option<TestBridge> {
        match TestBridge::create(host_cidr) {
            Ok(bridge) => Some(bridge),
            Err(e) => {
                eprintln!("SKIP: cannot create a test bridge ({e}); needs root or CAP_NET_ADMIN");
                None
            }
        }
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

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

/// Boot images for [`xorriso_iso`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsoBoot {
    None,
    /// An El Torito entry for PC BIOS.
    Bios,
    /// Only an entry for UEFI.
    UefiOnly,
}

/// An ISO built with `xorriso -as mkisofs -V VOLUME_ID` from a scratch folder holding a small text file
/// (and the boot image for `boot`): a few hundred KB that OS detection reads like a distribution's ISO with
/// that volume id.
pub fn xorriso_iso(dir: &Scratch, file: &str, volume_id: &str, boot: IsoBoot) -> PathBuf {
    let content = dir.path(&format!("{file}.d"));
    let _ = std::fs::remove_dir_all(&content);
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("README.txt"), format!("{volume_id}\n")).unwrap();
    std::fs::write(content.join("boot.img"), [0xF4u8; 2048]).unwrap();
    let iso = dir.path(file);
    let mut cmd = Command::new("xorriso");
    cmd.args(["-as", "mkisofs", "-V", volume_id, "-r"]);
    match boot {
        IsoBoot::None => {}
        IsoBoot::Bios => {
            cmd.args(["-b", "boot.img", "-no-emul-boot"]);
        }
        IsoBoot::UefiOnly => {
            cmd.args(["-e", "boot.img", "-no-emul-boot"]);
        }
    }
    let out = cmd.arg("-o").arg(&iso).arg(&content).output().expect("xorriso (the xorriso package)");
    assert!(out.status.success(), "xorriso: {}", text(&out.stderr));
    iso
}

/// (name, `Seccomp:` mode) of every thread of process `pid`; a thread that ends between the listing and
/// the reads is left out.
pub fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(name), Ok(status)) =
            (std::fs::read_to_string(task.join("comm")), std::fs::read_to_string(task.join("status")))
        else {
            continue;
        };
        let mode = status.lines().find(|l| l.starts_with("Seccomp:")).and_then(|l| l.split_whitespace().nth(1));
        threads.push((name.trim().to_owned(), mode.unwrap_or("missing").to_owned()));
    }
    threads
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

/// Starts an X server on the first free display from `displays` with `command(":N")`, and returns it and
/// its display once the server owns the display (its pid in the lock file), `ready()` holds and the server
/// completes an X11 connection setup (`x_server_accepts`). A display whose server did not start (another
/// process took it first) is skipped. Tests in one process start servers one at a time; other processes are
/// told apart by the lock file.
///
/// Every server must run with `-noreset`: without it an X server resets whenever its last client
/// disconnects, and the reset closes every connection still in its setup. In the GUI tests the display is
/// polled with xwininfo while `porthole` starts, so each poll's exit reset the server and a `porthole`
/// connecting at that moment lost its connection ("Failed to open connection to X server") on a busy machine.
fn start_x_server(
    displays: std::ops::Range<u32>,
    command: impl Fn(&str) -> Command,
    ready: impl Fn() -> bool,
) -> (Child, String) {
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = STARTING.lock().unwrap_or_else(|p| p.into_inner());
    for n in displays.clone() {
        let lock = format!("/tmp/.X{n}-lock");
        let socket = x_socket(n);
        let owner = || std::fs::read_to_string(&lock).ok().and_then(|l| l.trim().parse::<u32>().ok());
        // A lock whose server is gone (killed without clean-up) is stale: clear it and its socket.
        if let Some(pid) = owner()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(&lock);
            let _ = std::fs::remove_file(&socket);
        }
        if socket.exists() || Path::new(&lock).exists() {
            continue;
        }
        let display = format!(":{n}");
        let mut cmd = command(&display);
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
            panic!("start {:?} (apt-get install xvfb tigervnc-standalone-server): {e}", cmd.get_program())
        });
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if owner() == Some(child.id()) && ready() && x_server_accepts(n) {
                return (child, display);
            }
            if child.try_wait().ok().flatten().is_some() {
                break; // lost a race for this display; try the next one
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start an X server on any display :{}-:{}", displays.start, displays.end - 1);
}

/// Whether the X server on display `:n` accepts a client: connects to its Unix socket and completes the
/// X11 connection setup (`x_setup`). The socket and the lock file exist before the server serves; this is
/// the server answering.
pub fn x_server_accepts(n: u32) -> bool {
    std::os::unix::net::UnixStream::connect(x_socket(n)).is_ok_and(|mut s| x_setup(&mut s))
}

/// The Unix socket of X display `:n`.
pub fn x_socket(n: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/.X11-unix/X{n}"))
}

/// Whether the X server on display `display` (":N") keeps a client that is still in its connection setup
/// when another client completes its setup and leaves. A server without `-noreset` resets when its last
/// client leaves and drops the connections still in setup: a program connecting then fails to open the
/// display (winit: "Failed to open connection to X server").
pub fn x_server_keeps_a_connecting_client(display: &str) -> bool {
    let n: u32 = display.trim_start_matches(':').parse().expect("a display :N");
    let mut connecting = std::os::unix::net::UnixStream::connect(x_socket(n)).expect("connect to the X server");
    // The server accepts connections in order: once the later client is served, the first one is accepted.
    assert!(x_server_accepts(n), "the X server on {display} does not serve clients");
    x_setup(&mut connecting)
}

/// Completes the X11 connection setup on `s`, a connection to an X server: true when the server accepts
/// the client (the test servers let local clients in without authorization).
pub fn x_setup(s: &mut std::os::unix::net::UnixStream) -> bool {
    use std::io::{Read, Write};
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    // Setup request: little-endian byte order, protocol 11.0, no authorization name or data.
    let request = [b'l', 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut head = [0u8; 8];
    if s.write_all(&request).is_err() || s.read_exact(&mut head).is_err() || head[0] != 1 {
        return false;
    }
    // The rest of the reply: its length in 4-byte units (at most 256 KiB).
    let mut rest = vec![0u8; usize::from(u16::from_le_bytes([head[6], head[7]])) * 4];
    s.read_exact(&mut rest).is_ok()
}

/// An X server, stopped when dropped: SIGTERM first, so that it removes its lock file and socket on the way
/// out (a killed one leaves them for the next start to clear).
pub struct XServer(Child);

impl XServer {
    /// The X server's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for XServer {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An Xvfb server (with `-noreset`) on a free display from :90 on, serving clients; stopped when dropped.
pub struct Xvfb {
    _server: XServer,
    pub display: String,
}

impl Xvfb {
    pub fn start(width: u32, height: u32) -> Xvfb {
        let screen = format!("{width}x{height}x24");
        let (child, display) = start_x_server(
            90..140,
            |display| {
                let mut c = Command::new("Xvfb");
                c.args([display, "-screen", "0", &screen, "-nolisten", "tcp", "-noreset"]);
                c
            },
            || true,
        );
        Xvfb { _server: XServer(child), display }
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

/// The window (`porthole`) to start on the X display of `x`, its XDG folders (`config`, `gui-data`, runtime)
/// in `dir`, showing the daemon on `socket` as its local host; its standard error appended to `window.log` there.
pub fn window_command(x: &Xvfb, dir: &Scratch, socket: &Path) -> Command {
    let mut command = Command::new(workspace_bin("porthole"));
    command
        .env("DISPLAY", &x.display)
        .env_remove("WAYLAND_DISPLAY")
        .env("XDG_RUNTIME_DIR", dir.dir())
        .env("XDG_CONFIG_HOME", dir.path("config"))
        .env("XDG_DATA_HOME", dir.path("gui-data"))
        .env("PORTHOLE_SOCKET", socket)
        .stdout(Stdio::null());
    // Its log (warnings, and a panic's message and backtrace) goes to window.log in the scratch folder.
    match std::fs::OpenOptions::new().create(true).append(true).open(dir.path("window.log")) {
        Ok(log) => command.stderr(log),
        Err(_) => command.stderr(Stdio::null()),
    };
    command
}

/// The window of [`window_command`], started.
pub fn start_window(x: &Xvfb, dir: &Scratch, socket: &Path) -> Child {
    window_command(x, dir, socket).spawn().expect("start porthole")
}

/// A child process, killed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TigerVNC's Xvnc (640x480, 24 bits, `-noreset`) on a free display from `from` on, serving RFB on the Unix
/// socket `socket` with the security arguments `security` (e.g. `["-SecurityTypes", "None"]`); returns once
/// the socket exists and the X server serves clients, with the server and its display.
pub fn xvnc(socket: &Path, from: u32, security: &[&str]) -> (XServer, String) {
    xvnc_sized(socket, from, (640, 480), security)
}

/// [`xvnc`] with a screen of `size` (width, height).
pub fn xvnc_sized(socket: &Path, from: u32, size: (u32, u32), security: &[&str]) -> (XServer, String) {
    let geometry = format!("{}x{}", size.0, size.1);
    let (child, display) = start_x_server(
        from..from + 100,
        |display| {
            // A socket left by an attempt on a display that was taken would read as this server's.
            let _ = std::fs::remove_file(socket);
            let mut c = Command::new("Xvnc");
            c.arg(display)
                .args(["-geometry", &geometry, "-depth", "24", "-rfbport", "-1", "-nolisten", "tcp", "-noreset"])
                .arg("-rfbunixpath")
                .arg(socket)
                .args(security);
            c
        },
        || socket.exists(),
    );
    (XServer(child), display)
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
