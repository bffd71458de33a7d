//! `limit-cost`: what a rate limit costs when it is never reached. The disk device (4 KiB random reads, 8 in
//! flight, host-side driver, image in the page cache) and the network device (1500-byte frames each way,
//! host-side driver and a passt-protocol peer) run with limits far above what they achieve (10^12 per
//! second) and with none, in alternating rounds; the medians are compared: operations a second, and the
//! device threads' CPU time per operation (from /proc/self/task/*/schedstat; goal limited / unlimited ≤ 1.02).
//! An unlimited disk skips its limiter altogether (one atomic load per request); a limited one takes its lock
//! and reads the clock on every request. A network card's buckets live in its I/O thread (no lock), which
//! reads the clock once a batch of frames.

use vmm_core::rate_limiter::{DiskLimits, NicLimits};

use crate::{disk, net};

/// A rate no device here comes near (operations, bytes or bits a second).
const UNREACHED: u64 = 1_000_000_000_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of `rounds` alternating runs of `run(false)` (unlimited) and `run(true)` (limited), each
/// giving (operations a second, the device threads' CPU ns per operation): (unlimited, limited).
fn compare(
    rounds: usize,
    mut run: impl FnMut(bool) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let (mut free, mut limited) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for round in 0..rounds.max(1) {
        // Alternate which goes first, so that neither always runs on a warmer or busier machine.
        for first in [round % 2 == 0, round % 2 == 1] {
            let (rate, cpu) = run(first)?;
            let into = if first { &mut limited } else { &mut free };
            into.0.push(rate);
            into.1.push(cpu);
        }
    }
    Ok(((median(free.0), median(free.1)), (median(limited.0), median(limited.1))))
}

fn report(what: &str, unit: &str, (free, limited): ((f64, f64), (f64, f64))) {
    println!(
        "  {what:<38} unlimited {:>9.0} {unit}/s {:>7.0} ns CPU each   limited {:>9.0} {unit}/s {:>7.0} ns CPU each   CPU ratio {:.3}, rate ratio {:.3}",
        free.0,
        free.1,
        limited.0,
        limited.1,
        limited.1 / free.1,
        limited.0 / free.0
    );
}

pub fn cost(rounds: usize, seconds: f64) -> anyhow::Result<()> {
    println!(
        "limit cost: devices with limits of 10^12/s (never reached) vs none, {rounds} alternating rounds of {seconds} s, medians; the device threads' CPU time per operation (schedstat) is the figure that does not move with the machine's other load (goal limited/unlimited <= 1.02)"
    );
    let disk_limits = DiskLimits {
        iops: Some(UNREACHED),
        riops: Some(UNREACHED),
        bps: Some(UNREACHED),
        rbps: Some(UNREACHED),
        ..Default::default()
    };
    let disk =
        compare(rounds, |on| disk::random_read_rate(seconds, if on { disk_limits } else { DiskLimits::default() }))?;
    report("disk 4 KiB random reads, 8 in flight", "req", disk);
    let nic_limits = NicLimits { rx_bps: Some(UNREACHED), tx_bps: Some(UNREACHED) };
    let pick = |on: bool| if on { nic_limits } else { NicLimits::default() };
    report("net 1500 B frames to the guest", "frames", compare(rounds, |on| net::device_rx(1500, seconds, pick(on)))?);
    report(
        "net 1500 B frames from the guest",
        "frames",
        compare(rounds, |on| net::device_tx(1500, seconds, pick(on)))?,
    );
    Ok(())
}

/// The noisy-neighbour benchmark: VM A (the `kbd-echo` guest) answers key presses sent to its console
/// (key → interrupt → guest → screen → RFB update, timed by the client), alone; then beside three noisy
/// VMs (two `spin` guests, each a vCPU always busy, and a `virtio-blk` guest reading its disk as fast as
/// it can) on this machine's cores; then with limits on the noisy ones (`--cpu-cap`, a disk `bps` limit).
/// Prints A's p50 and p99 each time and the p99 against A alone (goal with limits: ≤ 1.5).
pub fn noisy(presses: usize, cap: f64) -> anyhow::Result<()> {
    use std::process::{Child, Command, Stdio};
    let dir = std::env::temp_dir().join(format!("porthole-bench-noisy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let vmm = std::env::current_exe()?.with_file_name("porthole-vmm");
    let image = dir.join("noise.img");
    std::fs::write(&image, vec![0x5au8; 64 << 20])?;
    println!(
        "noisy neighbour: VM A's key echo (kbd-echo, {presses} presses) alone, beside 2 spinning VMs and a disk-reading VM, and with those capped at {cap} CPU each and 8 MiB/s of disk"
    );
    struct Noise(Vec<Child>);
    impl Drop for Noise {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let noise = |limited: bool| -> anyhow::Result<Noise> {
        let mut children = Vec::new();
        let limits: Vec<String> = if limited { vec!["--cpu-cap".into(), cap.to_string()] } else { Vec::new() };
        for _ in 0..2 {
            let mut c = Command::new(&vmm);
            c.arg("--kernel").arg(porthole_guests::path("spin")).args(["--memory", "64"]).args(&limits);
            children.push(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
        }
        let disk = if limited { format!("{},bps=8388608", image.display()) } else { image.display().to_string() };
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(porthole_guests::path("virtio-blk")).args(["--memory", "64", "--disk", &disk]);
        c.args(["--cmdline", "bench-seq=100000000"]).args(&limits);
        children.push(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
        // Let them get going.
        std::thread::sleep(std::time::Duration::from_secs(2));
        Ok(Noise(children))
    };
    let probe = |label: &str| -> anyhow::Result<std::time::Duration> {
        let socket = dir.join(format!("{label}.sock"));
        let serial = dir.join(format!("{label}.log"));
        let guest = porthole_guests::path("kbd-echo");
        let mut child = crate::console::start_console_vm(0, &guest, &socket, &serial, "PORTHOLE-KBD-READY")?;
        let delays = crate::console::key_latencies(&socket, presses);
        let _ = child.kill();
        let _ = child.wait();
        let mut delays = delays?;
        delays.sort();
        let (p50, p99) = (crate::console::percentile(&delays, 50), crate::console::percentile(&delays, 99));
        println!("  {label:<42} p50 {:8.2} ms   p99 {:8.2} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
        Ok(p99)
    };
    let alone = probe("A alone")?;
    let noisy = {
        let _noise = noise(false)?;
        probe("A beside the noisy VMs, no limits")?
    };
    let limited = {
        let _noise = noise(true)?;
        probe("A beside the noisy VMs, limited")?
    };
    let ratio = |d: std::time::Duration| d.as_secs_f64() / alone.as_secs_f64();
    println!(
        "  A's p99 against alone: {:.2} without limits on the neighbours, {:.2} with them (goal with limits <= 1.5)",
        ratio(noisy),
        ratio(limited)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
