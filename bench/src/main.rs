//! `porthole-bench`: runs Porthole and a peer (QEMU from Debian's qemu-system-x86) on the same input in the
//! same run and prints ratios (Porthole / QEMU; below 1.0 means Porthole is faster or smaller).
//!
//! Benchmarks:
//! - `boot`: process start → first serial byte of the `hello` micro-guest (QEMU: `-M microvm`, same PVH file).
//! - `memory`: resident memory of an idle VM with 256 MiB of guest RAM (the `idle` guest), after its marker.
//! - `concurrent`: N VMs of 64 MiB started at once; time until every one printed its marker.
//! - `disk-backend`, `disk-guest`: see `disk.rs`.
//! - `net-backend`: see `net.rs`.
//! - `limit-cost`: what a rate limit that is never hit costs the disk and network devices (same run, no
//!   peer: limited / unlimited); see `limits.rs`.
//! - `noisy`: a VM's key-echo latency alone, beside noisy VMs, and with limits on them; see `limits.rs`.
//! - `snapshot`: saving a running VM's state to a file and starting from it; see `snapshot.rs`.
//! - `libvirt`: a libvirt host with 200 domains: the window's refresh against virt-manager's tick, and the
//!   console through SSH against direct; see `libvirt.rs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod audio;
mod console;
mod daemon;
mod disk;
mod firmware;
mod gui;
mod libvirt;
mod limits;
mod net;
mod snapshot;
use clap::{Parser, Subcommand};

/// CPU time (ns) this process's threads whose names start with one of `prefixes` have run, from
/// /proc/self/task/*/schedstat: what a device's own threads cost, whatever else the machine does.
pub fn threads_cpu_ns(prefixes: &[&str]) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            prefixes.iter().any(|p| comm.starts_with(p))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[derive(Debug, Parser)]
#[command(name = "porthole-bench", about = "Porthole benchmarks against QEMU, as ratios")]
struct Cli {
    #[command(subcommand)]
    bench: Option<Bench>,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Process start to first serial byte (median of RUNS runs each).
    Boot {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Resident memory of an idle 256 MiB VM.
    Memory,
    /// VMS VMs of 64 MiB started concurrently: time until all printed their marker.
    Concurrent {
        #[arg(long, default_value_t = 20)]
        vms: usize,
    },
    /// Control-socket pause: time until every vCPU stopped, over ROUNDS pause/resume rounds.
    Pause {
        #[arg(long, default_value_t = 50)]
        rounds: usize,
    },
    /// The console pipeline at 1920x1080 fed from the host side (dirty tracking -> encoder -> RFB -> client).
    Console {
        /// Seconds per content and encoding.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Key press -> echoed glyph on the console (kbd-echo guest), Porthole vs QEMU's VNC server.
    Keys {
        #[arg(long, default_value_t = 40)]
        presses: usize,
    },
    /// The console pipeline fed through a virtio-gpu scanout (transfer + flush) against the std VGA's
    /// video memory (dirty tracking), same frames, same client: frames/s and server CPU per frame.
    Scanout {
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Sound latency: the console's leg (host-side pushes -> an RFB client) and guest -> client on
    /// porthole-vmm and QEMU.
    Audio {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// RFB pointer motion -> virtio tablet events (host-side driver): latency p50/p99.
    Pointer {
        #[arg(long, default_value_t = 2000)]
        moves: usize,
    },
    /// The guest-driven animation (fb-anim) on porthole-vmm and QEMU: guest frames/s and client updates/s.
    Anim {
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// The virtio-blk device back end fed from the host side, against plain pread.
    DiskBackend {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// The virtio-net device and its passt back end fed from the host side, against a socket-pair pump.
    NetBackend {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// A VM's key-echo latency alone, beside CPU- and disk-hungry VMs, and with those limited.
    Noisy {
        #[arg(long, default_value_t = 40)]
        presses: usize,
        /// The noisy VMs' CPU cap when limited (CPUs each).
        #[arg(long, default_value_t = 0.25)]
        cap: f64,
    },
    /// The disk and network devices with rate limits far above what they reach, against none.
    LimitCost {
        /// Rounds of each (limited and unlimited alternate; medians are compared).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// The virtio-blk micro-guest's reads on porthole-vmm and QEMU (same guest, image and run).
    DiskGuest {
        #[arg(long, default_value_t = 400)]
        seq: u32,
        #[arg(long, default_value_t = 4000)]
        rand: u32,
    },
    /// portholed: GET /vms with 200 VMs under 100 concurrent clients (HTTPS with wrk, and the Unix socket).
    DaemonApi {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// A VM console through portholed's WebSocket proxy vs the VM's RFB socket directly.
    ConsoleProxy {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// The GUI under Xvfb: launch → first frame, idle CPU with an open console.
    Gui {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The machine grid with many VMs over several hosts, scrolled: the UI's CPU time per frame.
    GuiGrid {
        #[arg(long, default_value_t = 5)]
        hosts: usize,
        #[arg(long, default_value_t = 100)]
        per_host: usize,
        #[arg(long, default_value_t = 600)]
        frames: usize,
    },
    /// Firmware boot: start → SeaBIOS boots the CD, → GRUB's guest runs; Porthole vs QEMU -M pc.
    Firmware {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Machine state of a running 256 MiB / 1 GiB guest (idle, and with 200 MiB written): file size, save and
    /// restore time, against QEMU's migration to a file.
    Snapshot,
    /// A libvirt host with DOMAINS domains (RUNNING of them running): the window's refresh (time, libvirt
    /// calls) against virt-manager 4.1's tick, and the console over qemu+ssh against direct (frames/s).
    Libvirt {
        #[arg(long, default_value_t = 200)]
        domains: usize,
        #[arg(long, default_value_t = 4)]
        running: usize,
        #[arg(long, default_value_t = 20)]
        refreshes: usize,
        /// Seconds of console frames per path.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Every benchmark with its defaults.
    All,
}

/// The two programs compared.
#[derive(Debug, Clone, Copy)]
enum Engine {
    Porthole,
    Qemu,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Porthole => "porthole-vmm",
            Engine::Qemu => "qemu-system-x86_64 -M microvm",
        }
    }

    fn command(self, kernel: &Path, memory_mib: u32) -> anyhow::Result<Command> {
        let mut cmd = match self {
            Engine::Porthole => {
                let vmm = sibling("porthole-vmm")?;
                let mut c = Command::new(vmm);
                c.arg("--kernel").arg(kernel).args(["--memory", &memory_mib.to_string(), "--serial", "stdio"]);
                c
            }
            Engine::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
                    .args(["-m", &memory_mib.to_string(), "-display", "none", "-nodefaults", "-no-reboot"])
                    .args(["-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel"])
                    .arg(kernel);
                c
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        Ok(cmd)
    }
}

/// A binary next to this one (the same cargo profile folder).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!("{} is not built (cargo build --release -p vmm-core)", path.display());
    }
    Ok(path)
}

/// Starts `cmd` and reports when its standard output first contains `marker`.
fn start_and_wait_for(mut cmd: Command, marker: &'static str, limit: Duration) -> anyhow::Result<(Child, Duration)> {
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if marker.is_empty() || seen.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                let _ = tx.send(start.elapsed());
                // Keep draining so the guest never blocks on a full pipe.
                while matches!(stdout.read(&mut buf), Ok(n) if n > 0) {}
                return;
            }
        }
    });
    match rx.recv_timeout(limit) {
        Ok(t) => Ok((child, t)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?}: no {marker:?} within {limit:?}")
        }
    }
}

fn finish(mut child: Child) {
    if child.wait_timeout_or_kill(Duration::from_secs(10)).is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, limit: Duration) -> std::io::Result<()>;
}

impl WaitTimeout for Child {
    fn wait_timeout_or_kill(&mut self, limit: Duration) -> std::io::Result<()> {
        let start = Instant::now();
        while self.try_wait()?.is_none() {
            if start.elapsed() > limit {
                self.kill()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn bench_boot(runs: usize) -> anyhow::Result<()> {
    let kernel = porthole_guests::path("hello");
    println!("boot: process start -> first serial byte of `hello` (median of {runs} runs)");
    let mut medians = Vec::new();
    for engine in [Engine::Porthole, Engine::Qemu] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let (child, t) = start_and_wait_for(engine.command(&kernel, 64)?, "", Duration::from_secs(60))?;
            finish(child);
            times.push(t);
        }
        let m = median(times.clone());
        let (min, max) = (times.iter().min().unwrap(), times.iter().max().unwrap());
        println!("  {:<32} median {:8.2} ms   min {:8.2}   max {:8.2}", engine.name(), ms(m), ms(*min), ms(*max));
        medians.push(m);
    }
    println!("  ratio porthole/qemu: {:.3} (goal <= 0.3)", medians[0].as_secs_f64() / medians[1].as_secs_f64());
    Ok(())
}

/// Resident and proportional set size of a process, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let rss = field(&status, "VmRSS:").context("no VmRSS")?;
    Ok((rss, field(&rollup, "Pss:").unwrap_or(rss)))
}

fn bench_memory() -> anyhow::Result<()> {
    let kernel = porthole_guests::path("idle");
    println!("memory: idle VM with 256 MiB guest RAM (`idle` guest), 500 ms after its marker");
    let mut rss = Vec::new();
    for engine in [Engine::Porthole, Engine::Qemu] {
        let (mut child, _) =
            start_and_wait_for(engine.command(&kernel, 256)?, "PORTHOLE-IDLE", Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_millis(500));
        let (r, p) = memory_kib(child.id())?;
        let _ = child.kill();
        let _ = child.wait();
        println!("  {:<32} RSS {:8.2} MiB   PSS {:8.2} MiB", engine.name(), r as f64 / 1024.0, p as f64 / 1024.0);
        rss.push(r);
    }
    println!("  ratio porthole/qemu (RSS): {:.3} (goal <= 0.2; overhead goal <= 5 MiB)", rss[0] as f64 / rss[1] as f64);
    Ok(())
}

fn bench_concurrent(vms: usize) -> anyhow::Result<()> {
    let kernel = porthole_guests::path("hello");
    println!("concurrent: {vms} VMs of 64 MiB started at once, until every one printed PORTHOLE-GUEST-OK");
    let mut totals = Vec::new();
    for engine in [Engine::Porthole, Engine::Qemu] {
        let start = Instant::now();
        let handles: Vec<_> = (0..vms)
            .map(|_| {
                let cmd = engine.command(&kernel, 64);
                std::thread::spawn(move || start_and_wait_for(cmd?, "PORTHOLE-GUEST-OK", Duration::from_secs(120)))
            })
            .collect();
        let mut children = Vec::new();
        for h in handles {
            let (child, _) = h.join().map_err(|_| anyhow::anyhow!("a starter thread panicked"))??;
            children.push(child);
        }
        let total = start.elapsed();
        for c in children {
            finish(c);
        }
        println!("  {:<32} all {vms} markers after {:8.2} ms", engine.name(), ms(total));
        totals.push(total);
    }
    println!("  ratio porthole/qemu: {:.3}", totals[0].as_secs_f64() / totals[1].as_secs_f64());
    Ok(())
}

fn bench_pause(rounds: usize) -> anyhow::Result<()> {
    use vmm_core::control::{ControlClient, Request};
    let dir = std::env::temp_dir().join(format!("porthole-bench-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("control.sock");
    let mut cmd = Engine::Porthole.command(&porthole_guests::path("ticker"), 64)?;
    cmd.args(["--cpus", "2", "--control"]).arg(format!("unix:{}", socket.display()));
    let (mut child, _) = start_and_wait_for(cmd, "PORTHOLE-TICK 1", Duration::from_secs(60))?;
    let mut client = ControlClient::connect(&socket)?;
    let mut took = Vec::new();
    for _ in 0..rounds {
        let reply = client.request(&Request::Pause)?;
        took.push(Duration::from_micros(reply.paused_after_us.unwrap_or_default()));
        client.request(&Request::Resume)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    took.sort();
    println!("pause: control-socket pause of 2 running vCPUs (`ticker`), {rounds} rounds");
    println!(
        "  porthole-vmm                     p50 {:8.3} ms   p99 {:8.3} ms   max {:8.3} ms (goal <= 50 ms)",
        ms(took[took.len() / 2]),
        ms(took[(took.len() * 99 / 100).min(took.len() - 1)]),
        ms(*took.last().unwrap())
    );
    println!("  (QEMU's pause goes through QMP and is not compared here)");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bench = cli.bench.unwrap_or(Bench::All);
    println!("porthole-bench {} on {} CPUs", env!("CARGO_PKG_VERSION"), std::thread::available_parallelism()?);
    match bench {
        Bench::Boot { runs } => bench_boot(runs),
        Bench::Memory => bench_memory(),
        Bench::Concurrent { vms } => bench_concurrent(vms),
        Bench::Pause { rounds } => bench_pause(rounds),
        Bench::Console { seconds } => console::run(seconds),
        Bench::Keys { presses } => console::keys(presses),
        Bench::Pointer { moves } => console::pointer(moves),
        Bench::Audio { seconds, runs } => audio::run(seconds, runs),
        Bench::Scanout { seconds } => console::scanout(seconds),
        Bench::Anim { seconds } => console::anim(seconds),
        Bench::DiskBackend { seconds } => disk::backend(seconds),
        Bench::DiskGuest { seq, rand } => disk::guest(seq, rand),
        Bench::NetBackend { seconds } => net::backend(seconds),
        Bench::LimitCost { rounds, seconds } => limits::cost(rounds, seconds),
        Bench::Noisy { presses, cap } => limits::noisy(presses, cap),
        Bench::DaemonApi { seconds } => daemon::api(seconds),
        Bench::ConsoleProxy { seconds } => daemon::console_proxy(seconds),
        Bench::Gui { runs } => gui::run(runs),
        Bench::GuiGrid { hosts, per_host, frames } => gui::grid(hosts, per_host, frames),
        Bench::Firmware { runs } => firmware::run(runs),
        Bench::Snapshot => snapshot::run(),
        Bench::Libvirt { domains, running, refreshes, seconds } => libvirt::run(domains, running, refreshes, seconds),
        Bench::All => {
            bench_boot(20)?;
            bench_memory()?;
            bench_concurrent(20)?;
            bench_pause(50)?;
            console::run(2.0)?;
            console::keys(40)?;
            audio::run(5.0, 5)?;
            console::scanout(2.0)?;
            console::anim(20.0)?;
            disk::backend(2.0)?;
            disk::guest(400, 4000)?;
            net::backend(2.0)?;
            limits::cost(5, 1.0)?;
            limits::noisy(40, 0.25)?;
            daemon::api(10)?;
            daemon::console_proxy(5.0)?;
            gui::run(5)?;
            gui::grid(5, 100, 600)?;
            snapshot::run()?;
            libvirt::run(200, 4, 20, 5.0)?;
            firmware::run(3)
        }
    }
}
