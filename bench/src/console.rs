//! Console benchmarks.
//!
//! `console`: a VM (the `idle` guest) whose video memory is written from the host at full speed through
//! the refresher's host-write path (so the dirty-page tracking, tile comparison, encoders and RFB server are
//! exactly the production ones), watched by a client over the Unix socket that decodes every update.
//! Lock-step: write a frame, request, receive and decode it, repeat. The refresher runs at 60 Hz, so 60
//! frames/s is the ceiling; CPU per frame shows the headroom.
//!
//! `keys`: the `kbd-echo` guest echoes each key on its text screen; the time from sending a key to the
//! update that shows it, on porthole-vmm and on QEMU's VNC server with the same guest.
//!
//! `pointer`: RFB pointer motion into a virtio tablet: from the client's PointerEvent on the console socket
//! to the tablet's events in its event queue, the interrupt seen by a host-side driver standing in for the
//! guest's (the production RFB server and tablet; a guest's own driver is instruction-emulated here).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use porthole_tests::rfb::{RfbClient, TIGHT};
use vmm_core::{SerialSink, Vm, VmConfig};

const WIDTH: u32 = 1920;
const HEIGHT: u32 = 1080;

/// CPU time (user + system) of this process's threads whose names start with one of `prefixes`.
fn threads_cpu(prefixes: &[&str]) -> Duration {
    let mut total = Duration::ZERO;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if prefixes.iter().any(|p| comm.trim().starts_with(p)) {
                total += stat_cpu(&task.path().join("stat"));
            }
        }
    }
    total
}

/// CPU time (user + system) in a `/proc/.../stat` file (a process's or a thread's; zero if unreadable).
fn stat_cpu(path: &Path) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised name: state is 3rd; utime 14th, stime 15th.
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok())).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// CPU time of the calling thread.
fn this_thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What the frame source draws.
#[derive(Debug, Clone, Copy)]
pub enum Content {
    /// A static desktop with a 400x300 window moving 8 pixels per frame.
    Desktop,
    /// A full screen of text lines scrolling up by one 16-pixel line per frame.
    ScrollingText,
    /// A 1280x720 area of blocky, changing noise (like decoded video).
    Video,
}

pub struct Source {
    pub frame: Vec<u32>,
    n: u32,
}

fn hash(mut v: u32) -> u32 {
    v ^= v >> 16;
    v = v.wrapping_mul(0x7FEB_352D);
    v ^= v >> 15;
    v = v.wrapping_mul(0x846C_A68B);
    v ^ (v >> 16)
}

impl Source {
    pub fn new() -> Self {
        let mut frame = vec![0u32; (WIDTH * HEIGHT) as usize];
        for (i, p) in frame.iter_mut().enumerate() {
            let (x, y) = (i as u32 % WIDTH, i as u32 / WIDTH);
            *p = ((x * 255 / WIDTH) << 16) | ((y * 255 / HEIGHT) << 8) | 0x60; // a desktop gradient
        }
        Source { frame, n: 0 }
    }

    /// Draws the next frame; returns the rows that changed.
    pub fn next(&mut self, content: Content) -> std::ops::Range<u32> {
        self.n += 1;
        let n = self.n;
        match content {
            Content::Desktop => {
                let (w, h) = (400u32, 300u32);
                let x0 = (n * 8) % (WIDTH - w);
                let y0 = 200;
                for y in y0..y0 + h {
                    let row = &mut self.frame[(y * WIDTH) as usize..((y + 1) * WIDTH) as usize];
                    for (x, p) in row.iter_mut().enumerate() {
                        let x = x as u32;
                        let inside = x >= x0 && x < x0 + w;
                        *p = if inside {
                            if y < y0 + 24 {
                                0x3050A0
                            } else if (x + y).is_multiple_of(7) {
                                0x202020
                            } else {
                                0xF0F0F0
                            }
                        } else {
                            ((x * 255 / WIDTH) << 16) | ((y * 255 / HEIGHT) << 8) | 0x60
                        };
                    }
                }
                y0..y0 + h
            }
            Content::ScrollingText => {
                for y in 0..HEIGHT {
                    let line = y / 16 + n;
                    let row = &mut self.frame[(y * WIDTH) as usize..((y + 1) * WIDTH) as usize];
                    for (x, p) in row.iter_mut().enumerate() {
                        let x = x as u32;
                        let ch = hash(line * 251 + x / 8);
                        let ink =
                            !ch.is_multiple_of(5) && (hash(ch ^ ((y % 16) << 3) ^ (x % 8)) & 3) == 0 && y % 16 < 13;
                        *p = if ink { 0x101010 } else { 0xFFFFFF };
                    }
                }
                0..HEIGHT
            }
            Content::Video => {
                let (x0, y0) = (320u32, 180u32);
                for y in y0..y0 + 720 {
                    let row = &mut self.frame[(y * WIDTH) as usize..((y + 1) * WIDTH) as usize];
                    for x in x0..x0 + 1280 {
                        let v = hash((x / 4) ^ (y / 4) << 12 ^ n << 24);
                        let base = ((x + n * 3) & 0xFF) << 16 | ((y + n) & 0xFF) << 8 | 0x40;
                        row[x as usize] = base ^ (v & 0x0F0F0F);
                    }
                }
                y0..y0 + 720
            }
        }
    }

    pub fn rows_bytes(&self, rows: std::ops::Range<u32>) -> Vec<u8> {
        self.frame[(rows.start * WIDTH) as usize..(rows.end * WIDTH) as usize]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect()
    }
}

/// An in-process VM (the `idle` guest) whose 1920x1080 screen the host writes, served on `socket` by the
/// production RFB server.
pub fn fed_vm(
    socket: &Path,
) -> anyhow::Result<(std::sync::Arc<vmm_core::display::refresh::Refresher>, std::sync::Arc<vmm_core::VmHandle>)> {
    let mut config = VmConfig::new(porthole_guests::path("idle"));
    config.memory_mib = 64;
    config.serial = SerialSink::None;
    config.vnc.push(format!("unix:{}", socket.display()).parse().map_err(anyhow::Error::msg)?);
    let mut vm = Vm::new(config)?;
    let (screen, refresher, handle) = (vm.screen(), vm.refresher(), vm.handle());
    let listener = vmm_core::rfb::ListenAddress::Unix(socket.to_owned()).bind()?;
    let server = vmm_core::rfb::ServerConfig { password: None, name: "bench".into() };
    vmm_core::rfb::spawn(listener, screen, handle.clone(), server, true)?;
    std::thread::Builder::new().name("vm".into()).spawn(move || vm.run())?;
    let start = Instant::now();
    while !refresher.host_set_mode(WIDTH as u16, HEIGHT as u16) {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the VM did not boot");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((refresher, handle))
}

/// Puts a frame's rows into the std VGA's video memory from the host (the refresher's host-write path).
fn vga_writer(
    refresher: &vmm_core::display::refresh::Refresher,
) -> impl FnMut(&[u8], std::ops::Range<u32>) -> anyhow::Result<()> + '_ {
    move |bytes, rows| {
        if !refresher.host_write(u64::from(rows.start) * u64::from(WIDTH) * 4, bytes) {
            bail!("the VM went away");
        }
        Ok(())
    }
}

pub fn run(seconds: f64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("porthole-bench-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("vnc.sock");
    let (refresher, handle) = fed_vm(&socket)?;
    // Idle: a client watching an unchanging screen, an incremental request always pending.
    {
        let mut client = RfbClient::connect(&socket, None).map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
        client.set_encodings(&[TIGHT, -223])?;
        client.full_frame()?;
        client.request(true)?;
        std::thread::sleep(Duration::from_millis(300));
        let (cpu0, t0) = (threads_cpu(&[""]), Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let cpu = threads_cpu(&[""]) - cpu0;
        println!(
            "idle: a watched, unchanging {WIDTH}x{HEIGHT} screen costs {:.2}% of one core (whole VMM, 3 s)",
            cpu.as_secs_f64() * 100.0 / t0.elapsed().as_secs_f64()
        );
    }
    println!(
        "console: {WIDTH}x{HEIGHT}, host-side frame source -> dirty tracking -> encoder -> RFB (Unix socket) -> decoding client"
    );
    println!(
        "  {:<15} {:<10} {:>8} {:>12} {:>14} {:>14}",
        "content", "encoding", "frames/s", "KiB/frame", "server ms/frm", "client ms/frm"
    );
    let encodings: [(&str, Vec<i32>); 6] = [
        ("raw", vec![0]),
        ("zlib", vec![6]),
        ("hextile", vec![5]),
        ("zrle", vec![16]),
        ("tight", vec![TIGHT]),
        ("tight+jpeg6", vec![TIGHT, -26]),
    ];
    let mut source = Source::new();
    let mut ours = Vec::new();
    for content in [Content::Desktop, Content::ScrollingText, Content::Video] {
        for (name, encoding) in &encodings {
            let mut write = vga_writer(&refresher);
            let row = measure(&socket, &mut source, content, name, encoding, seconds, &mut write, &|| {
                threads_cpu(&["display", "rfb-"])
            })?;
            row.print(content, name, None);
            ours.push(((format!("{content:?}"), *name), row));
        }
    }
    handle.power_off();
    let _ = std::fs::remove_dir_all(&dir);
    // The peer: TigerVNC's Xvnc serving the same frames (drawn on its root window) to the same client.
    if let Err(e) = xvnc_peer(&mut source, &encodings, seconds, &ours) {
        println!("  Xvnc (the peer): skipped: {e:#}");
    }
    Ok(())
}

/// One content and encoding's result.
struct Row {
    frames_per_s: f64,
    kib_per_frame: f64,
    server_ms: f64,
    client_ms: f64,
}

impl Row {
    fn print(&self, content: Content, name: &str, vs: Option<&Row>) {
        let ratio = vs.map(|o| format!("   ours/Xvnc frames/s {:.2}", o.frames_per_s / self.frames_per_s));
        println!(
            "  {:<15} {:<10} {:>8.1} {:>12.1} {:>14.2} {:>14.2}{}",
            format!("{content:?}"),
            name,
            self.frames_per_s,
            self.kib_per_frame,
            self.server_ms,
            self.client_ms,
            ratio.unwrap_or_default()
        );
    }
}

/// Puts a frame's rows (their bytes, which rows) on the serving side's screen.
type FrameWriter<'a> = dyn FnMut(&[u8], std::ops::Range<u32>) -> anyhow::Result<()> + 'a;

/// Lock-step for `seconds`: the next frame of `content` handed to `write` (its bytes and rows), an
/// incremental request, its update decoded; `server_cpu` is the serving side's CPU time so far.
#[allow(clippy::too_many_arguments)]
fn measure(
    socket: &Path,
    source: &mut Source,
    content: Content,
    name: &str,
    encoding: &[i32],
    seconds: f64,
    write: &mut FrameWriter,
    server_cpu: &dyn Fn() -> Duration,
) -> anyhow::Result<Row> {
    let mut client = RfbClient::connect(socket, None).map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
    let mut list = encoding.to_vec();
    list.extend_from_slice(&[1, -223]); // CopyRect, DesktopSize
    client.set_encodings(&list)?;
    // Start from the current picture.
    write(&source.rows_bytes(0..HEIGHT), 0..HEIGHT)?;
    client.full_frame()?;
    let (server0, client0, bytes0) = (server_cpu(), this_thread_cpu(), client.bytes_received);
    let lossy = name.contains("jpeg");
    // A frame counts once all of it has arrived (a server may send one in several updates): lossless, once
    // the client's changed rows equal the source's; with JPEG, once the updates since it was written
    // covered every pixel that changed. The bookkeeping's own CPU time is left out of the client's column.
    let mut bookkeeping = Duration::ZERO;
    let mut previous = source.frame.clone();
    let mut covered = vec![false; source.frame.len()];
    let t0 = Instant::now();
    let mut frames = 0u32;
    while t0.elapsed().as_secs_f64() < seconds {
        let rows = source.next(content);
        write(&source.rows_bytes(rows.clone()), rows.clone())?;
        let span = (rows.start * WIDTH) as usize..(rows.end * WIDTH) as usize;
        loop {
            client.request(true)?;
            let rects = client.read_update()?;
            let b0 = this_thread_cpu();
            let done = if lossy {
                for &(_, x, y, w, h) in &rects {
                    for row in y..(y + h).min(HEIGHT) {
                        let at = (row * WIDTH + x) as usize;
                        covered[at..at + (w.min(WIDTH - x)) as usize].fill(true);
                    }
                }
                span.clone().all(|i| covered[i] || previous[i] == source.frame[i])
            } else {
                client.pixels[span.clone()] == source.frame[span.clone()]
            };
            bookkeeping += this_thread_cpu() - b0;
            if done {
                break;
            }
        }
        let b0 = this_thread_cpu();
        previous[span.clone()].copy_from_slice(&source.frame[span.clone()]);
        covered[span].fill(false);
        bookkeeping += this_thread_cpu() - b0;
        frames += 1;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let server = server_cpu() - server0;
    let client_cpu = this_thread_cpu() - client0 - bookkeeping;
    // The last frame must have arrived intact (lossless encodings).
    if !name.contains("jpeg") {
        std::thread::sleep(Duration::from_millis(50));
        client.full_frame()?;
        let wrong = client.pixels.iter().zip(&source.frame).filter(|(a, b)| a != b).count();
        if wrong != 0 {
            bail!("{name}: {wrong} pixels differ from the source");
        }
    }
    Ok(Row {
        frames_per_s: f64::from(frames) / elapsed,
        kib_per_frame: (client.bytes_received - bytes0) as f64 / f64::from(frames) / 1024.0,
        server_ms: server.as_secs_f64() * 1000.0 / f64::from(frames),
        client_ms: client_cpu.as_secs_f64() * 1000.0 / f64::from(frames),
    })
}

/// TigerVNC's Xvnc at the same size serving the same frames, put on its root window with PutImage (in bands
/// under the core protocol's request size) and synchronised before each request; its server column is the
/// whole Xvnc process (X and VNC). Zlib is not among Xvnc's encodings.
fn xvnc_peer(
    source: &mut Source,
    encodings: &[(&str, Vec<i32>)],
    seconds: f64,
    ours: &[((String, &str), Row)],
) -> anyhow::Result<()> {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{ConnectionExt, CreateGCAux, ImageFormat};
    let dir = std::env::temp_dir().join(format!("porthole-bench-xvnc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("xvnc.sock");
    let (xvnc, display) = porthole_tests::xvnc_sized(&socket, 170, (WIDTH, HEIGHT), &["-SecurityTypes", "None"]);
    let pid = xvnc.pid();
    let (conn, screen_num) = x11rb::connect(Some(&display)).context("connect to Xvnc's X display")?;
    let root = conn.setup().roots[screen_num].root;
    let gc = conn.generate_id()?;
    conn.create_gc(gc, root, &CreateGCAux::new())?;
    // Rows per PutImage: the core protocol's requests stop at 256 KiB.
    let band = (200 * 1024 / (WIDTH * 4)).max(1);
    let mut write = |bytes: &[u8], rows: std::ops::Range<u32>| -> anyhow::Result<()> {
        let stride = (WIDTH * 4) as usize;
        for (i, chunk) in bytes.chunks(stride * band as usize).enumerate() {
            let y = rows.start + i as u32 * band;
            let h = (chunk.len() / stride) as u16;
            conn.put_image(ImageFormat::Z_PIXMAP, root, gc, WIDTH as u16, h, 0, y as i16, 0, 24, chunk)?;
        }
        conn.get_input_focus()?.reply()?; // Xvnc has drawn it
        Ok(())
    };
    println!("  the peer: TigerVNC's Xvnc, same frames (PutImage on its root window), same client:");
    for content in [Content::Desktop, Content::ScrollingText, Content::Video] {
        for (name, encoding) in encodings.iter().filter(|(n, _)| *n != "zlib") {
            let row = measure(&socket, source, content, name, encoding, seconds, &mut write, &|| {
                stat_cpu(Path::new(&format!("/proc/{pid}/stat")))
            })?;
            let mine = ours.iter().find(|((c, n), _)| *c == format!("{content:?}") && n == name).map(|(_, r)| r);
            row.print(content, &format!("{name} (Xvnc)"), mine);
        }
    }
    drop(xvnc);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Sends `presses` keys to a kbd-echo console and returns the delay until the echo arrived, each.
pub(crate) fn key_latencies(socket: &Path, presses: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = RfbClient::connect(socket, None).map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
    client.set_encodings(&[0, -223])?;
    client.full_frame()?;
    let mut delays = Vec::new();
    for i in 0..presses {
        let keysym = u32::from(b'a' + (i % 26) as u8);
        let before = client.pixels.clone();
        let t0 = Instant::now();
        client.key(keysym, true)?;
        client.key(keysym, false)?;
        // Wait for the update that shows the echo.
        loop {
            client.request(true)?;
            client.read_update()?;
            if client.pixels != before {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("no echo within 10 s");
            }
        }
        delays.push(t0.elapsed());
        // Let the release's echo land too, then resynchronise with a full (always answered) update.
        std::thread::sleep(Duration::from_millis(50));
        client.full_frame()?;
    }
    Ok(delays)
}

fn wait_for_socket(path: &Path, child: &mut Child) -> anyhow::Result<()> {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if child.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(60) {
            bail!("{} never listened", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The two console servers compared: porthole-vmm and QEMU (`-M pc -vga std`, its VNC server).
const CONSOLE_ENGINES: [&str; 2] = ["porthole-vmm", "qemu-system-x86_64 -M pc -vga std"];

/// Starts `guest` on engine `index` of [`CONSOLE_ENGINES`] with its console on `socket` and its serial in
/// `serial`, and waits until the guest printed `marker`.
pub(crate) fn start_console_vm(
    index: usize,
    guest: &Path,
    socket: &Path,
    serial: &Path,
    marker: &str,
) -> anyhow::Result<Child> {
    let engine = CONSOLE_ENGINES[index];
    let mut cmd = if index == 0 {
        let mut c = Command::new(std::env::current_exe()?.with_file_name("porthole-vmm"));
        c.arg("--kernel").arg(guest).args(["--memory", "64", "--vnc"]).arg(format!("unix:{}", socket.display()));
        c.arg("--serial").arg(format!("file:{}", serial.display()));
        c
    } else {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64", "-vga", "std"])
            .args(["-display", "none", "-nodefaults", "-no-reboot", "-vnc"])
            .arg(format!("unix:{}", socket.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(guest);
        c
    };
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context(engine)?;
    wait_for_socket(socket, &mut child)?;
    let start = Instant::now();
    while !std::fs::read_to_string(serial).unwrap_or_default().contains(marker) {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{engine}: the guest never printed {marker}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

pub(crate) fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

pub fn keys(presses: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("porthole-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = porthole_guests::path("kbd-echo");
    println!("keys: key press -> echoed glyph in the client (kbd-echo guest, {presses} presses, Raw)");
    let mut results = Vec::new();
    for (i, engine) in CONSOLE_ENGINES.into_iter().enumerate() {
        let socket = dir.join(format!("{i}.sock"));
        let serial = dir.join(format!("{i}.log"));
        let mut child = start_console_vm(i, &guest, &socket, &serial, "PORTHOLE-KBD-READY")?;
        let mut delays = key_latencies(&socket, presses);
        let _ = child.kill();
        let _ = child.wait();
        let delays = delays.as_mut().map_err(|e| anyhow::anyhow!("{engine}: {e}"))?;
        delays.sort();
        let (p50, p99) = (percentile(delays, 50), percentile(delays, 99));
        println!("  {engine:<34} p50 {:8.2} ms   p99 {:8.2} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
        results.push(p50);
    }
    println!(
        "  ratio porthole/qemu (p50): {:.3} (goal p99 <= 10 ms; guest code is emulated here)",
        results[0].as_secs_f64() / results[1].as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The guest-driven console benchmark: `fb-anim` repaints its whole 1280x800 screen every frame; count the
/// frames the guest drew (its serial counter) and the updates a client received, per second, on
/// porthole-vmm and on QEMU's VNC server. On a nested KVM that emulates guest code this crawls; on
/// hardware virtualization it is the real-guest-speed figure.
pub fn anim(seconds: f64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("porthole-bench-anim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = porthole_guests::path("fb-anim");
    println!("anim: fb-anim (full-screen repaint per frame), {seconds} s, Raw over a Unix socket");
    for (i, engine) in CONSOLE_ENGINES.into_iter().enumerate() {
        let socket = dir.join(format!("{i}.sock"));
        let serial = dir.join(format!("{i}.log"));
        let mut child = start_console_vm(i, &guest, &socket, &serial, "PORTHOLE-FB-ANIM-START")?;
        let frames_drawn = || -> u64 {
            std::fs::read_to_string(&serial)
                .unwrap_or_default()
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("PORTHOLE-FB-FRAME ")?.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut client = RfbClient::connect(&socket, None).map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
        client.set_encodings(&[0, -223])?;
        client.full_frame()?;
        let (drawn0, t0) = (frames_drawn(), Instant::now());
        let mut updates = 0u32;
        while t0.elapsed().as_secs_f64() < seconds {
            client.request(true)?;
            if !client.read_update()?.is_empty() {
                updates += 1;
            }
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let drawn = frames_drawn().saturating_sub(drawn0);
        let _ = child.kill();
        let _ = child.wait();
        println!(
            "  {engine:<34} guest frames/s {:6.2} (counted every 16 frames)   client updates/s {:6.2}",
            drawn as f64 / elapsed,
            f64::from(updates) / elapsed
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The RFB server's input for the pointer benchmark: pointer events to the tablet (as `VmHandle` routes them
/// once the guest's tablet driver is up).
struct TabletInput(std::sync::Arc<vmm_core::virtio::input::InputHandle>);

impl vmm_core::rfb::Input for TabletInput {
    fn key(&self, _key: vmm_core::rfb::keymap::Key, _down: bool) {}
    fn pointer(&self, x: u16, y: u16, buttons: u8, screen: (u32, u32)) {
        self.0.pointer(x, y, buttons, screen);
    }
}

/// Pointer motion -> tablet events latency over `moves` moves: p50, p99 and the slowest.
/// The same frames through the two display paths of a VM, one after the other in the same run, each served
/// by the production RFB server to the same lock-step client: the std VGA (frames written into the video
/// memory, found by dirty tracking and tile comparison; the display and RFB threads serve) and a virtio-gpu
/// scanout (frames written into the resource's backing in guest memory, then TRANSFER_TO_HOST_2D and
/// RESOURCE_FLUSH of the rows that changed, as a guest's driver presents them, by the host-side driver; the
/// virtio-gpu and RFB threads serve). The ratio is scanout / std VGA: goal >= 1.0 for frames/s.
pub fn scanout(seconds: f64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("porthole-bench-scanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let encodings: [(&str, Vec<i32>); 3] = [("raw", vec![0]), ("zrle", vec![16]), ("tight", vec![TIGHT])];
    let contents = [Content::Desktop, Content::ScrollingText];
    println!(
        "scanout: {WIDTH}x{HEIGHT}, the same frames through the std VGA (dirty tracking) and a virtio-gpu scanout \
         (transfer + flush), same RFB server and client"
    );
    println!(
        "  {:<15} {:<10} {:>8} {:>12} {:>14} {:>14}",
        "content", "encoding", "frames/s", "KiB/frame", "server ms/frm", "client ms/frm"
    );
    let mut source = Source::new();
    let mut vga_rows = Vec::new();
    {
        let socket = dir.join("vga.sock");
        let (refresher, handle) = fed_vm(&socket)?;
        for content in contents {
            for (name, encoding) in &encodings {
                let mut write = vga_writer(&refresher);
                let row = measure(&socket, &mut source, content, name, encoding, seconds, &mut write, &|| {
                    threads_cpu(&["display", "rfb-"])
                })?;
                println!("  std VGA");
                row.print(content, name, None);
                vga_rows.push(row);
            }
        }
        handle.power_off();
    }
    let socket = dir.join("gpu.sock");
    let screen = vmm_core::display::Screen::new();
    let mut gpu = vmm_core::virtio::host_driver::HostGpuDriver::new(screen.clone(), WIDTH, HEIGHT)?;
    let listener = vmm_core::rfb::ListenAddress::Unix(socket.clone()).bind()?;
    let config = vmm_core::rfb::ServerConfig { password: None, name: "bench".into() };
    vmm_core::rfb::spawn(listener, screen, std::sync::Arc::new(vmm_core::rfb::NoInput), config, false)?;
    let mut vga = vga_rows.iter();
    for content in contents {
        for (name, encoding) in &encodings {
            let mut write =
                |bytes: &[u8], rows: std::ops::Range<u32>| -> anyhow::Result<()> { Ok(gpu.present(bytes, rows)?) };
            let row = measure(&socket, &mut source, content, name, encoding, seconds, &mut write, &|| {
                threads_cpu(&["virtio-gpu", "rfb-"])
            })?;
            let base = vga.next().expect("a std VGA row for each");
            println!("  virtio-gpu scanout");
            row.print(content, name, None);
            println!(
                "    scanout / std VGA: frames/s {:.2}, server CPU per frame {:.2}",
                row.frames_per_s / base.frames_per_s,
                row.server_ms / base.server_ms
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

pub fn pointer(moves: usize) -> anyhow::Result<()> {
    use vmm_core::virtio::host_driver::HostInputDriver;
    use vmm_core::virtio::input::{Profile, QUEUE_SIZE};
    let dir = std::env::temp_dir().join(format!("porthole-bench-pointer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("vnc.sock");
    let mut tablet = HostInputDriver::new(Profile::Tablet)?;
    tablet.post(QUEUE_SIZE);
    let screen = vmm_core::display::Screen::new();
    screen.resize(WIDTH, HEIGHT);
    let listener = vmm_core::rfb::ListenAddress::Unix(socket.clone()).bind()?;
    let input = std::sync::Arc::new(TabletInput(tablet.input().clone()));
    let config = vmm_core::rfb::ServerConfig { password: None, name: "bench".into() };
    vmm_core::rfb::spawn(listener, screen, input, config, false)?;
    let mut client = RfbClient::connect(&socket, None).map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
    let mut times = Vec::with_capacity(moves);
    for i in 0..moves + 20 {
        let (x, y) = ((i as u32 * 37) % WIDTH, (i as u32 * 23) % HEIGHT);
        let t0 = Instant::now();
        client.pointer(x as u16, y as u16, 0)?;
        // ABS_X, ABS_Y, SYN_REPORT.
        let mut events = Vec::new();
        while events.len() < 3 {
            let got = tablet.events(Duration::from_secs(5));
            if got.is_empty() {
                bail!("move {i}: the tablet sent {} of 3 events in 5 s", events.len());
            }
            events.extend(got);
        }
        let elapsed = t0.elapsed();
        let want_x = (x * 32767 / (WIDTH - 1)) as i32;
        if events[0] != (3, 0, want_x) || events.len() != 3 {
            bail!("move {i} to ({x}, {y}): events {events:?}");
        }
        tablet.post(3);
        if i >= 20 {
            times.push(elapsed); // the first 20 warm up
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "pointer: RFB PointerEvent -> virtio tablet events in the event queue (interrupt seen), {} moves: \
         p50 {:.3} ms, p99 {:.3} ms, slowest {:.3} ms (goal: p99 <= 5 ms); no peer: QEMU's tablet cannot be \
         fed and watched from the host side",
        times.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
