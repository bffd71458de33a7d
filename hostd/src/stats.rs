//! Resource samples of running VMs and of the host: once a second, CPU time and resident memory of each VM process (from
//! /proc) and its disk and network counters (from its control socket), kept for an hour at 1 s and for a day at 1 min;
//! its state too, so a guest that crashed shows as `crashed` within a second (see `Host::observe`).
//! The sampler also keeps serial logs bounded: past 1 MiB a log is truncated (the VMM appends, so it just
//! goes on at the start).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use porthole_api::StatSample;
use vmm_core::control::{ControlClient, Request};

use crate::host::Host;

/// A sample's time: the wall clock when the daemon started plus the monotonic time since, so samples stay in
/// order and one period apart when the wall clock jumps (NTP, an administrator): clients ask for the samples
/// after the last one they have, which a clock set back would otherwise hold back for as long as it went back.
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = START.get_or_init(|| (crate::store::now_ms(), std::time::Instant::now()));
    wall + at.elapsed().as_millis() as u64
}

/// The key of the host's own samples (VM ids are hex, so never this).
pub const HOST: &str = "@host";
const SECONDS_KEPT: usize = 3600;
const MINUTES_KEPT: usize = 1440;
/// A serial log longer than this is truncated.
pub const SERIAL_LOG_LIMIT: u64 = 1 << 20;

/// The latest samples of one VM (or the host), oldest first, in storage taken whole when its first sample
/// comes: a history costs the daemon the same from its first second to its last — an hour of 1 s samples is
/// 197 KiB, a day of minutes 79 KiB — instead of growing for a day.
struct Ring {
    slots: Box<[StatSample]>,
    /// Where the oldest sample is, and how many there are.
    start: usize,
    len: usize,
}

impl Ring {
    fn new(capacity: usize) -> Ring {
        let empty = StatSample {
            t_ms: 0,
            cpu_percent: 0.0,
            memory_bytes: 0,
            disk_read_bps: 0.0,
            disk_write_bps: 0.0,
            net_rx_bps: 0.0,
            net_tx_bps: 0.0,
        };
        Ring { slots: vec![empty; capacity].into_boxed_slice(), start: 0, len: 0 }
    }

    /// Adds `sample`, dropping the oldest when full.
    fn push(&mut self, sample: StatSample) {
        let capacity = self.slots.len();
        if self.len < capacity {
            self.slots[(self.start + self.len) % capacity] = sample;
            self.len += 1;
        } else {
            self.slots[self.start] = sample;
            self.start = (self.start + 1) % capacity;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &StatSample> {
        (0..self.len).map(move |i| &self.slots[(self.start + i) % self.slots.len()])
    }
}

struct History {
    seconds: Ring,
    minutes: Ring,
    /// Samples of the minute being filled.
    minute: Vec<StatSample>,
}

impl Default for History {
    fn default() -> Self {
        History { seconds: Ring::new(SECONDS_KEPT), minutes: Ring::new(MINUTES_KEPT), minute: Vec::with_capacity(60) }
    }
}

/// Previous raw readings of one VM process.
struct Last {
    pid: u32,
    t_ms: u64,
    cpu_ticks: u64,
    disk_read: u64,
    disk_written: u64,
    net_rx: u64,
    net_tx: u64,
}

#[derive(Default)]
pub struct Stats {
    histories: Mutex<HashMap<String, History>>,
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is 0; utime is 11, stime 12.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The host's CPU time from /proc/stat's `cpu` line: (busy, total) in ticks of every CPU together.
fn host_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// A field of /proc/meminfo in KiB.
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

/// What the host page shows besides the samples.
#[derive(Debug, Default)]
pub struct HostFacts {
    pub memory_mib: u64,
    pub memory_available_mib: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub uptime_s: u64,
}

/// Reads [`HostFacts`] from /proc (the CPU model and kernel once: they do not change while the daemon runs);
/// what cannot be read stays empty.
pub fn host_facts() -> HostFacts {
    static FIXED: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (cpu_model, kernel) = FIXED.get_or_init(|| {
        let model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_default();
        (model, read("/proc/sys/kernel/osrelease").trim().to_owned())
    });
    let meminfo = read("/proc/meminfo");
    HostFacts {
        memory_mib: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) / 1024,
        memory_available_mib: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0) / 1024,
        cpu_model: cpu_model.clone(),
        kernel: kernel.clone(),
        uptime_s: read("/proc/uptime").split_whitespace().next().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0)
            as u64,
    }
}

fn average(samples: &[StatSample]) -> StatSample {
    let n = samples.len().max(1) as f64;
    let sum = |f: fn(&StatSample) -> f64| samples.iter().map(f).sum::<f64>() / n;
    StatSample {
        t_ms: samples.last().map(|s| s.t_ms).unwrap_or(0),
        cpu_percent: sum(|s| s.cpu_percent),
        memory_bytes: (sum(|s| s.memory_bytes as f64)) as u64,
        disk_read_bps: sum(|s| s.disk_read_bps),
        disk_write_bps: sum(|s| s.disk_write_bps),
        net_rx_bps: sum(|s| s.net_rx_bps),
        net_tx_bps: sum(|s| s.net_tx_bps),
    }
}

impl Stats {
    /// Samples of VM `id` newer than `since_ms`: at 1 s (`minutes` false) or 1 min.
    pub fn samples(&self, id: &str, since_ms: u64, minutes: bool) -> Vec<StatSample> {
        let histories = self.histories.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = histories.get(id) else { return Vec::new() };
        let source = if minutes { &h.minutes } else { &h.seconds };
        source.iter().filter(|s| s.t_ms > since_ms).copied().collect()
    }

    pub fn forget(&self, id: &str) {
        self.histories.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    fn push(&self, id: &str, sample: StatSample) {
        let mut histories = self.histories.lock().unwrap_or_else(|p| p.into_inner());
        let h = histories.entry(id.to_owned()).or_default();
        h.seconds.push(sample);
        h.minute.push(sample);
        if h.minute.len() >= 60 {
            let m = average(&h.minute);
            h.minute.clear();
            h.minutes.push(m);
        }
    }

    /// Runs the sampler in its own thread for as long as the daemon lives.
    pub fn spawn(self: &Arc<Self>, host: Arc<Host>) {
        let stats = self.clone();
        let _ = std::thread::Builder::new().name("stats".into()).spawn(move || {
            let ticks_per_s = {
                // SAFETY: sysconf has no memory arguments.
                let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
                if t > 0 { t as f64 } else { 100.0 }
            };
            let mut last: HashMap<String, Last> = HashMap::new();
            let mut clients: HashMap<String, (u32, ControlClient)> = HashMap::new();
            let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
            let mut host_last: Option<(u64, (u64, u64))> = None;
            let mut rounds = 0u64;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                rounds += 1;
                if rounds.is_multiple_of(60) {
                    // Once a minute, hand the allocator's free pages back to the system: requests of many
                    // sizes from many threads leave free holes inside glibc's arenas that it keeps resident.
                    // SAFETY: malloc_trim has no memory arguments and is thread-safe.
                    unsafe { libc::malloc_trim(0) };
                }
                // The VMs' disk and network rates of this round, for the host's sample.
                let mut io = [0.0f64; 4];
                let running = host.running();
                last.retain(|id, _| running.iter().any(|(r, _)| r == id));
                clients.retain(|id, (pid, _)| running.iter().any(|(r, p)| r == id && p == pid));
                for (id, pid) in running {
                    let files = host.run_files(&id);
                    truncate_if_long(&files.serial());
                    let (Some(ticks), Some(rss)) = (cpu_ticks(pid), rss_bytes(pid)) else { continue };
                    let counters = {
                        if !clients.contains_key(&id)
                            && let Ok(c) = ControlClient::connect(&files.control())
                        {
                            clients.insert(id.clone(), (pid, c));
                        }
                        match clients.get_mut(&id).map(|(_, c)| c.request(&Request::Counters)) {
                            Some(Ok(r)) => r.counters,
                            _ => {
                                clients.remove(&id);
                                None
                            }
                        }
                    };
                    // A guest that crashed (its process keeps it) makes the VM `crashed`; a reset one runs again.
                    if let Some((_, c)) = clients.get_mut(&id)
                        && let Ok(Some(status)) = c.request(&Request::Status).map(|r| r.status)
                    {
                        host.observe(&id, pid, &status);
                        host.repair_networks(&id, pid, &status);
                    }
                    let c = counters.unwrap_or_default();
                    let (read, written, net_rx, net_tx) =
                        (c.disk_bytes_read, c.disk_bytes_written, c.net_rx_bytes, c.net_tx_bytes);
                    let t_ms = now_ms();
                    if let Some(prev) = last.get(&id).filter(|p| p.pid == pid && t_ms > p.t_ms) {
                        let dt = (t_ms - prev.t_ms) as f64 / 1000.0;
                        let sample = StatSample {
                            t_ms,
                            cpu_percent: ticks.saturating_sub(prev.cpu_ticks) as f64 / ticks_per_s / dt * 100.0,
                            memory_bytes: rss,
                            disk_read_bps: read.saturating_sub(prev.disk_read) as f64 / dt,
                            disk_write_bps: written.saturating_sub(prev.disk_written) as f64 / dt,
                            net_rx_bps: net_rx.saturating_sub(prev.net_rx) as f64 / dt,
                            net_tx_bps: net_tx.saturating_sub(prev.net_tx) as f64 / dt,
                        };
                        for (sum, rate) in io.iter_mut().zip([
                            sample.disk_read_bps,
                            sample.disk_write_bps,
                            sample.net_rx_bps,
                            sample.net_tx_bps,
                        ]) {
                            *sum += rate;
                        }
                        stats.push(&id, sample);
                    }
                    let now =
                        Last { pid, t_ms, cpu_ticks: ticks, disk_read: read, disk_written: written, net_rx, net_tx };
                    last.insert(id, now);
                }
                let (t_ms, cpu) = (now_ms(), host_cpu_ticks());
                if let (Some((busy, total)), Some((_, (prev_busy, prev_total)))) = (cpu, host_last)
                    && total > prev_total
                {
                    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
                    let used_kib = meminfo_kib(&meminfo, "MemTotal")
                        .unwrap_or(0)
                        .saturating_sub(meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0));
                    let busy_share = busy.saturating_sub(prev_busy) as f64 / (total - prev_total) as f64;
                    stats.push(
                        HOST,
                        StatSample {
                            t_ms,
                            cpu_percent: busy_share * cpus * 100.0,
                            memory_bytes: used_kib * 1024,
                            disk_read_bps: io[0],
                            disk_write_bps: io[1],
                            net_rx_bps: io[2],
                            net_tx_bps: io[3],
                        },
                    );
                }
                if let Some(cpu) = cpu {
                    host_last = Some((t_ms, cpu));
                }
            }
        });
    }
}

fn truncate_if_long(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > SERIAL_LOG_LIMIT)
        && let Ok(f) = std::fs::OpenOptions::new().write(true).open(path)
    {
        let _ = f.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_seconds_becomes_one_minute_sample_and_history_is_bounded() {
        let stats = Stats::default();
        for i in 0..(SECONDS_KEPT as u64 + 120) {
            let s = StatSample {
                t_ms: i * 1000 + 1,
                cpu_percent: 50.0,
                memory_bytes: 1000,
                disk_read_bps: i as f64,
                disk_write_bps: 0.0,
                net_rx_bps: 0.0,
                net_tx_bps: 0.0,
            };
            stats.push("vm", s);
        }
        assert_eq!(stats.samples("vm", 0, false).len(), SECONDS_KEPT);
        let minutes = stats.samples("vm", 0, true);
        assert_eq!(minutes.len(), (SECONDS_KEPT + 120) / 60);
        assert_eq!(minutes[0].cpu_percent, 50.0);
        assert_eq!(minutes[0].disk_read_bps, 29.5, "the mean of 0..60");
        assert_eq!(stats.samples("vm", 3_700_000, false).len(), 20);
        // Oldest first, the newest last, across the ring's wrap.
        let seconds = stats.samples("vm", 0, false);
        assert!(seconds.windows(2).all(|w| w[1].t_ms == w[0].t_ms + 1000));
        assert_eq!(seconds.last().unwrap().t_ms, (SECONDS_KEPT as u64 + 119) * 1000 + 1);
    }

    #[test]
    fn host_facts_and_cpu_ticks_come_from_proc() {
        let (busy, total) = host_cpu_ticks().expect("/proc/stat has a cpu line");
        assert!(busy <= total && total > 0);
        let facts = host_facts();
        assert!(facts.memory_available_mib > 0 && facts.uptime_s > 0 && !facts.kernel.is_empty(), "{facts:?}");
        assert!(facts.memory_available_mib <= facts.memory_mib, "{facts:?}");
        assert_eq!(meminfo_kib("MemTotal:       16 kB\nMemAvailable:   8 kB\n", "MemAvailable"), Some(8));
        assert_eq!(meminfo_kib("MemTotalX: 1 kB\n", "MemTotal"), None);
    }
}
