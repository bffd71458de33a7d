//! `limit-cost`: what a rate limit costs when it is never reached. The disk device (4 KiB random reads, 8 in
//! flight, host-side driver, image in the page cache) and the network device (1500-byte frames each way,
//! host-side driver and a passt-protocol peer) run with limits far above what they achieve (10^12 per
//! second) and with none, in alternating rounds; the medians are compared (goal: limited / unlimited ≥ 0.98).
//! An unlimited device skips its limiter altogether (one atomic load per request or frame); a limited one
//! takes its lock and reads the clock on every request or frame.

use vmm_core::rate_limiter::{DiskLimits, NicLimits};

use crate::{disk, net};

/// A rate no device here comes near (operations, bytes or bits a second).
const UNREACHED: u64 = 1_000_000_000_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of `rounds` alternating runs of `run(false)` (unlimited) and `run(true)` (limited).
fn compare(rounds: usize, mut run: impl FnMut(bool) -> anyhow::Result<f64>) -> anyhow::Result<(f64, f64)> {
    let (mut free, mut limited) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        // Alternate which goes first, so that neither always runs on a warmer or busier machine.
        for first in [round % 2 == 0, round % 2 == 1] {
            let rate = run(first)?;
            if first { limited.push(rate) } else { free.push(rate) }
        }
    }
    Ok((median(free), median(limited)))
}

pub fn cost(rounds: usize, seconds: f64) -> anyhow::Result<()> {
    println!(
        "limit cost: devices with limits of 10^12/s (never reached) vs none, {rounds} alternating rounds of {seconds} s, medians (goal limited/unlimited >= 0.98)"
    );
    let disk_limits = DiskLimits {
        iops: Some(UNREACHED),
        riops: Some(UNREACHED),
        bps: Some(UNREACHED),
        rbps: Some(UNREACHED),
        ..Default::default()
    };
    let (free, limited) =
        compare(rounds, |on| disk::random_read_rate(seconds, if on { disk_limits } else { DiskLimits::default() }))?;
    println!(
        "  disk 4 KiB random reads, 8 in flight   unlimited {free:>9.0} req/s   limited {limited:>9.0} req/s   ratio {:.3}",
        limited / free
    );
    let nic_limits = NicLimits { rx_bps: Some(UNREACHED), tx_bps: Some(UNREACHED) };
    let pick = |on: bool| if on { nic_limits } else { NicLimits::default() };
    let (free, limited) = compare(rounds, |on| net::device_rx(1500, seconds, pick(on)))?;
    println!(
        "  net 1500 B frames to the guest         unlimited {free:>9.0} frames/s  limited {limited:>9.0} frames/s  ratio {:.3}",
        limited / free
    );
    let (free, limited) = compare(rounds, |on| net::device_tx(1500, seconds, pick(on)))?;
    println!(
        "  net 1500 B frames from the guest       unlimited {free:>9.0} frames/s  limited {limited:>9.0} frames/s  ratio {:.3}",
        limited / free
    );
    Ok(())
}
