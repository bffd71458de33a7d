//! Disk benchmarks.
//!
//! - `backend`: the virtio-blk device back end alone, fed at full host speed by the host-side driver
//!   (`vmm_core::virtio::host_driver`) through the production path (BAR registers → queue thread → I/O
//!   threads → image → used ring → interrupt), against plain `pread` of the same file on one thread
//!   (the ceiling) as a ratio; and the same device on a qcow2 copy of the image (made by `qemu-img convert`,
//!   64 KiB clusters, on the `imago` crate) against the device on the raw image.
//! - `guest`: the `virtio-blk` micro-guest's own driver (sequential 1 MiB reads, random 4 KiB reads) on
//!   porthole-vmm and on QEMU's virtio-blk-pci (`-M pc`), same image and guest, same run. Guest code is
//!   instruction-emulated on nested PVM hosts, so there it mostly measures the emulator; run it where
//!   hardware virtualization exists for device numbers.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmm_core::disk::Drive;
use vmm_core::rate_limiter::DiskLimits;
use vmm_core::virtio::host_driver::{HostBlockDriver, T_IN};

/// The image both benchmarks read: 256 MiB of non-zero bytes (so that no layer can skip holes).
fn image(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("bench-disk.img");
    let size = 256usize << 20;
    if std::fs::metadata(&path).map(|m| m.len() as usize == size).unwrap_or(false) {
        return Ok(path);
    }
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut f = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    for _ in 0..size >> 20 {
        std::io::Write::write_all(&mut f, &chunk)?;
    }
    f.sync_all()?;
    Ok(path)
}

/// A qcow2 copy of the raw benchmark image, made by qemu-img (none when qemu-img is missing).
fn qcow2_image(raw: &Path) -> anyhow::Result<Option<PathBuf>> {
    let path = raw.with_extension("qcow2");
    let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if path.exists() && fresh(&path) >= fresh(raw) {
        return Ok(Some(path));
    }
    let _ = std::fs::remove_file(&path);
    let status = std::process::Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(raw).arg(&path).status();
    match status {
        Ok(s) if s.success() => Ok(Some(path)),
        Ok(s) => bail!("qemu-img convert failed ({s})"),
        Err(_) => Ok(None),
    }
}

pub fn scratch_dir() -> anyhow::Result<PathBuf> {
    let dir = porthole_tests::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// xorshift64: the same offsets every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One pattern: reads of `block` bytes, `depth` in flight, random or sequential, for `seconds`.
struct Pattern {
    name: &'static str,
    block: u32,
    depth: u16,
    random: bool,
}

const PATTERNS: [Pattern; 4] = [
    Pattern { name: "4 KiB random, 1 in flight", block: 4096, depth: 1, random: true },
    Pattern { name: "4 KiB random, 8 in flight", block: 4096, depth: 8, random: true },
    Pattern { name: "1 MiB sequential, 1 in flight", block: 1 << 20, depth: 1, random: false },
    Pattern { name: "1 MiB sequential, 4 in flight", block: 1 << 20, depth: 4, random: false },
];

fn offsets(p: &Pattern, size: u64) -> impl FnMut() -> u64 {
    let (block, random) = (u64::from(p.block), p.random);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut next = 0u64;
    move || {
        if random {
            rng.next() % (size / block) * block
        } else {
            let o = next;
            next = (next + block) % (size / block * block);
            o
        }
    }
}

/// Requests per second through the device back end.
fn device_rate(path: &Path, p: &Pattern, seconds: f64) -> anyhow::Result<f64> {
    Ok(device_rate_under(path, p, seconds, DiskLimits::default())?.0)
}

/// Requests per second through the device back end under `limits`, and the device's threads' CPU time per
/// request (ns).
fn device_rate_under(path: &Path, p: &Pattern, seconds: f64, limits: DiskLimits) -> anyhow::Result<(f64, f64)> {
    let media = Drive::open_media(path, true)?;
    let size = media.backend.size();
    let drive = Arc::new(Drive::new("disk0".into(), true, false, String::new(), Some(media)));
    drive.set_limits(limits);
    let mut d = HostBlockDriver::new(drive, 32, u64::from(p.block))?;
    let mut next = offsets(p, size);
    let start = Instant::now();
    let cpu0 = crate::threads_cpu_ns(&["blk-"]);
    let mut done = 0u64;
    for slot in 0..p.depth {
        d.post(slot, T_IN, next() / 512, p.block);
    }
    d.kick();
    while start.elapsed().as_secs_f64() < seconds {
        let completed = d.completions(Duration::from_secs(5));
        if completed.is_empty() {
            bail!("the device stopped completing requests");
        }
        for (head, _) in completed {
            let slot = head / 3;
            if d.request_status(slot) != 0 {
                bail!("a read failed (status {})", d.request_status(slot));
            }
            done += 1;
            d.post(slot, T_IN, next() / 512, p.block);
        }
        d.kick();
    }
    // Drain what is still in flight.
    let mut left = u64::from(p.depth);
    while left > 0 {
        let c = d.completions(Duration::from_secs(5));
        if c.is_empty() {
            break;
        }
        left = left.saturating_sub(c.len() as u64);
    }
    let cpu = crate::threads_cpu_ns(&["blk-"]).saturating_sub(cpu0) as f64 / done.max(1) as f64;
    Ok((done as f64 / start.elapsed().as_secs_f64(), cpu))
}

/// Requests per second of plain pread on one thread (the same offsets, into one buffer).
fn pread_rate(path: &Path, p: &Pattern, seconds: f64) -> anyhow::Result<f64> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; p.block as usize];
    let mut next = offsets(p, size);
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..64 {
            let offset = next();
            // SAFETY: `buf` is a live buffer of `buf.len()` bytes.
            let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset as libc::off_t) };
            if n != buf.len() as isize {
                bail!("pread returned {n}");
            }
            done += 1;
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// One thread-to-thread round trip through two eventfds (what a lone request costs at least: the
/// notification wakes the device's thread, the interrupt wakes the driver).
fn wakeup_round_trip() -> anyhow::Result<Duration> {
    use vmm_sys_util::eventfd::EventFd;
    let ping = Arc::new(EventFd::new(0)?);
    let pong = Arc::new(EventFd::new(0)?);
    let rounds = 2000;
    let (p, q) = (ping.clone(), pong.clone());
    let echo = std::thread::spawn(move || {
        for _ in 0..rounds {
            let _ = p.read();
            let _ = q.write(1);
        }
    });
    let start = Instant::now();
    for _ in 0..rounds {
        ping.write(1)?;
        pong.read()?;
    }
    let took = start.elapsed() / rounds;
    let _ = echo.join();
    Ok(took)
}

/// 4 KiB random reads, 8 in flight, per second, under `limits` (on a 256 MiB image in the page cache),
/// for [`crate::limits`].
pub fn random_read_rate(seconds: f64, limits: DiskLimits) -> anyhow::Result<(f64, f64)> {
    let path = image(&scratch_dir()?)?;
    device_rate_under(&path, &PATTERNS[1], seconds, limits)
}

pub fn backend(seconds: f64) -> anyhow::Result<()> {
    let path = image(&scratch_dir()?)?;
    // Warm the page cache so both sides read from memory.
    pread_rate(&path, &PATTERNS[2], 0.5)?;
    println!(
        "disk backend: virtio-blk device back end fed by the host-side driver vs plain pread, 256 MiB image (page cache)"
    );
    let trip = wakeup_round_trip()?;
    println!(
        "  (a wake-up round trip between two threads costs {:.1} us here: at most {:.0} lone requests/s on any design that hands a request to another thread)",
        trip.as_secs_f64() * 1e6,
        1.0 / trip.as_secs_f64()
    );
    for p in &PATTERNS {
        let dev = device_rate(&path, p, seconds)?;
        let raw = pread_rate(&path, p, seconds)?;
        let mib = |r: f64| r * f64::from(p.block) / f64::from(1u32 << 20);
        println!(
            "  {:<32} device {:>9.0} req/s {:>8.0} MiB/s   pread {:>9.0} req/s {:>8.0} MiB/s   ratio device/pread {:.2}",
            p.name,
            dev,
            mib(dev),
            raw,
            mib(raw),
            dev / raw
        );
    }
    match qcow2_image(&path)? {
        None => println!("  qcow2: skipped (qemu-img not installed: apt-get install qemu-utils)"),
        Some(q) => {
            pread_rate(&q, &PATTERNS[2], 0.5)?;
            println!("  the same device on a qcow2 copy (qemu-img convert, 64 KiB clusters) vs on the raw image:");
            for p in &PATTERNS {
                let qcow2 = device_rate(&q, p, seconds)?;
                let raw = device_rate(&path, p, seconds)?;
                let mib = |r: f64| r * f64::from(p.block) / f64::from(1u32 << 20);
                println!(
                    "  {:<32} qcow2  {:>9.0} req/s {:>8.0} MiB/s   raw   {:>9.0} req/s {:>8.0} MiB/s   ratio qcow2/raw {:.2}",
                    p.name,
                    qcow2,
                    mib(qcow2),
                    raw,
                    mib(raw),
                    qcow2 / raw
                );
            }
        }
    }
    Ok(())
}

/// Runs the `virtio-blk` guest with `cmdline` on one engine; returns the time between each
/// `BLK bench-start KIND` and `BLK bench-end KIND ... errors=0` pair, by kind.
fn guest_run(qemu: bool, image: &Path, cmdline: &str) -> anyhow::Result<Vec<(String, Duration)>> {
    use std::io::BufRead;
    let kernel = porthole_guests::path("virtio-blk");
    let mut cmd = if qemu {
        let mut c = std::process::Command::new("qemu-system-x86_64");
        c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
            .args(["-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel"])
            .arg(&kernel)
            .args(["-append", cmdline, "-drive"])
            .arg(format!("if=none,id=d0,file={},format=raw,readonly=on", image.display()))
            .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]);
        c
    } else {
        let mut c = std::process::Command::new(crate::sibling("porthole-vmm")?);
        c.arg("--kernel").arg(&kernel).args(["--memory", "64", "--serial", "stdio", "--cmdline", cmdline]);
        c.arg("--disk").arg(format!("{},readonly", image.display()));
        c
    };
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut starts = Vec::new();
    let mut results = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let now = Instant::now();
        if let Some(rest) = line.strip_prefix("BLK bench-start ") {
            starts.push((rest.split_whitespace().next().unwrap_or_default().to_owned(), now));
        } else if let Some(rest) = line.strip_prefix("BLK bench-end ") {
            if !line.ends_with("errors=0") {
                bail!("{line}");
            }
            let kind = rest.split_whitespace().next().unwrap_or_default();
            let (_, start) = starts.iter().rev().find(|(k, _)| k == kind).context("bench-end without start")?;
            results.push((kind.to_owned(), now - *start));
        } else if line.starts_with("BLK done") || line.starts_with("BLK timeout") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(results)
}

pub fn guest(seq: u32, rand: u32) -> anyhow::Result<()> {
    let path = image(&scratch_dir()?)?;
    let cmdline = format!("bench-seq={seq} bench-rand={rand}");
    println!(
        "disk guest: the virtio-blk micro-guest's polling driver, {seq} x 1 MiB sequential and {rand} x 4 KiB random reads, \
         256 MiB raw image, porthole-vmm vs QEMU virtio-blk-pci (-M pc), same run, median of 3"
    );
    // Warm the page cache, then alternate the engines and keep each one's median of three runs.
    pread_rate(&path, &PATTERNS[2], 0.5)?;
    let (mut porthole_runs, mut qemu_runs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        porthole_runs.push(guest_run(false, &path, &cmdline)?);
        qemu_runs.push(guest_run(true, &path, &cmdline)?);
    }
    let median = |runs: &[Vec<(String, Duration)>]| -> Vec<(String, Duration)> {
        (0..runs[0].len())
            .map(|i| {
                let mut times: Vec<Duration> = runs.iter().map(|r| r[i].1).collect();
                times.sort();
                (runs[0][i].0.clone(), times[times.len() / 2])
            })
            .collect()
    };
    let (porthole, qemu) = (median(&porthole_runs), median(&qemu_runs));
    for ((kind, ours), (_, theirs)) in porthole.iter().zip(&qemu) {
        let (count, unit, bytes) = if kind == "seq" { (seq, "MiB/s", 1u64 << 20) } else { (rand, "IOPS", 4096) };
        let rate = |d: &Duration| f64::from(count) / d.as_secs_f64();
        let shown = |d: &Duration| if kind == "seq" { rate(d) * bytes as f64 / f64::from(1u32 << 20) } else { rate(d) };
        println!(
            "  {:<6} porthole {:>9.0} {unit} ({:>7.1} ms)   qemu {:>9.0} {unit} ({:>7.1} ms)   ratio porthole/qemu {:.2} (goal >= 0.9)",
            kind,
            shown(ours),
            ours.as_secs_f64() * 1e3,
            shown(theirs),
            theirs.as_secs_f64() * 1e3,
            shown(ours) / shown(theirs)
        );
    }
    Ok(())
}
