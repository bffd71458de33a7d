//! Resource samples: one `virConnectGetAllDomainStats` call a second for every running domain, turned into
//! [`StatSample`] rates, the last hour kept per domain.

use std::collections::{HashMap, VecDeque};
use std::ffi::CStr;

use porthole_api::StatSample;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// Samples kept per domain (an hour at one a second).
pub const KEEP: usize = 3600;

/// A domain's cumulative counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub t_ms: u64,
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One domain's record of a `virConnectGetAllDomainStats` call.
struct Record {
    dom: Domain,
    uuid: String,
    nums: Vec<(String, u64)>,
    strs: Vec<(String, String)>,
}

/// One `virConnectGetAllDomainStats` call: per domain, its handle, UUID and fields.
fn records(conn: &Connect, what: u32, flags: u32) -> Result<Vec<Record>, virt::error::Error> {
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    crate::count();
    // SAFETY: a live connection; libvirt fills `records` with a NULL-terminated array we free below.
    let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), what, &mut records, flags) };
    if n < 0 || records.is_null() {
        return Err(virt::error::Error::last_error());
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `i` < n entries of the array libvirt returned; each record is valid until freed.
        let rec = unsafe { &**records.add(i) };
        let mut uuid = [0 as libc::c_char; 40];
        // SAFETY: the record's domain is valid; the buffer holds VIR_UUID_STRING_BUFLEN (37) bytes. This does
        // not call the daemon: it reads the domain object.
        if unsafe { sys::virDomainGetUUIDString(rec.dom, uuid.as_mut_ptr()) } < 0 {
            continue;
        }
        // SAFETY: libvirt wrote a NUL-terminated string into `uuid`.
        let uuid = unsafe { CStr::from_ptr(uuid.as_ptr()) }.to_string_lossy().into_owned();
        // SAFETY: a reference of our own to the record's domain, released when the `Domain` drops.
        let dom = unsafe {
            sys::virDomainRef(rec.dom);
            Domain::from_ptr(rec.dom)
        };
        let mut nums = Vec::with_capacity(rec.nparams.max(0) as usize);
        let mut strs = Vec::new();
        for p in 0..rec.nparams.max(0) as usize {
            // SAFETY: `p` < nparams entries of the record's parameter array.
            let param = unsafe { &*rec.params.add(p) };
            // SAFETY: field is a NUL-terminated name of at most 80 bytes.
            let name = unsafe { CStr::from_ptr(param.field.as_ptr()) }.to_string_lossy().into_owned();
            // SAFETY (each arm): the union member the parameter's type names.
            let value = match param.type_ as u32 {
                sys::VIR_TYPED_PARAM_ULLONG => unsafe { param.value.ul },
                sys::VIR_TYPED_PARAM_LLONG => unsafe { param.value.l }.max(0) as u64,
                sys::VIR_TYPED_PARAM_UINT => u64::from(unsafe { param.value.ui }),
                sys::VIR_TYPED_PARAM_INT => unsafe { param.value.i }.max(0) as u64,
                sys::VIR_TYPED_PARAM_STRING => {
                    // SAFETY: a string parameter's value is a NUL-terminated string (or null).
                    let p = unsafe { param.value.s };
                    if !p.is_null() {
                        // SAFETY: non-null and NUL-terminated, alive until the list is freed.
                        strs.push((name, unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()));
                    }
                    continue;
                }
                _ => continue,
            };
            nums.push((name, value));
        }
        out.push(Record { dom, uuid, nums, strs });
    }
    // SAFETY: the array libvirt allocated, freed once, records and all (our domain references stay).
    unsafe { sys::virDomainStatsRecordListFree(records) };
    Ok(out)
}

/// A disk's size as the daemon reports it (`block.N.*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    /// The target device (`vda`, `sda`).
    pub name: String,
    pub capacity: u64,
    pub allocation: u64,
}

/// One domain in a [`Reading`].
#[derive(Clone)]
pub struct DomainReading {
    pub dom: Domain,
    pub uuid: String,
    /// `virDomainState`.
    pub state: u32,
    /// Cumulative counters, for an active domain.
    pub counters: Option<Counters>,
    /// Current memory in KiB (the balloon's size; samples only).
    pub memory_kib: u64,
    pub blocks: Vec<Block>,
}

/// Every domain's state and counters from one call.
pub struct Reading {
    /// When the call's answer came.
    pub finished: std::time::Instant,
    pub domains: Vec<DomainReading>,
}

/// What a reading asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Every domain's state (defined or running): no question to any QEMU, about a millisecond for 200
    /// domains. What a refresh needs.
    States,
    /// The running domains' counters and disk sizes (QEMU is asked for its block and balloon figures): the
    /// sampler's.
    Samples,
}

/// Reads every domain's state, or every running domain's counters, in one call.
pub fn read(conn: &Connect, kind: Kind, t_ms: u64) -> Result<Reading, virt::error::Error> {
    let (what, flags) = match kind {
        Kind::States => (sys::VIR_DOMAIN_STATS_STATE, 0),
        Kind::Samples => (
            sys::VIR_DOMAIN_STATS_STATE
                | sys::VIR_DOMAIN_STATS_CPU_TOTAL
                | sys::VIR_DOMAIN_STATS_BALLOON
                | sys::VIR_DOMAIN_STATS_BLOCK
                | sys::VIR_DOMAIN_STATS_INTERFACE,
            sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
        ),
    };
    let mut domains = Vec::new();
    for rec in records(conn, what, flags)? {
        let mut c = Counters { t_ms, ..Counters::default() };
        let (mut rss, mut current, mut cpu, mut state) = (None, None, false, 0);
        let mut blocks: Vec<Block> = Vec::new();
        let block = |blocks: &mut Vec<Block>, i: usize| -> Option<usize> {
            if i >= 4096 {
                return None;
            }
            if blocks.len() <= i {
                blocks.resize(i + 1, Block::default());
            }
            Some(i)
        };
        for (name, value) in &rec.nums {
            let (name, value) = (name.as_str(), *value);
            match name {
                "state.state" => state = value as u32,
                "cpu.time" => {
                    c.cpu_ns = value;
                    cpu = true;
                }
                "balloon.rss" => rss = Some(value * 1024),
                "balloon.current" => current = Some(value),
                _ if name.starts_with("block.") => {
                    let mut parts = name.splitn(3, '.').skip(1);
                    let (Some(n), Some(field)) = (parts.next().and_then(|n| n.parse::<usize>().ok()), parts.next())
                    else {
                        continue;
                    };
                    match field {
                        "rd.bytes" => c.rd_bytes += value,
                        "wr.bytes" => c.wr_bytes += value,
                        "capacity" => {
                            if let Some(i) = block(&mut blocks, n) {
                                blocks[i].capacity = value;
                            }
                        }
                        "allocation" => {
                            if let Some(i) = block(&mut blocks, n) {
                                blocks[i].allocation = value;
                            }
                        }
                        _ => {}
                    }
                }
                _ if name.starts_with("net.") && name.ends_with(".rx.bytes") => c.rx_bytes += value,
                _ if name.starts_with("net.") && name.ends_with(".tx.bytes") => c.tx_bytes += value,
                _ => {}
            }
        }
        for (name, value) in &rec.strs {
            if let Some(n) = name.strip_prefix("block.").and_then(|r| r.strip_suffix(".name"))
                && let Ok(n) = n.parse::<usize>()
                && let Some(i) = block(&mut blocks, n)
            {
                blocks[i].name = value.clone();
            }
        }
        c.memory_bytes = rss.or(current.map(|k| k * 1024)).unwrap_or(0);
        domains.push(DomainReading {
            dom: rec.dom,
            uuid: rec.uuid,
            state,
            counters: cpu.then_some(c),
            memory_kib: current.unwrap_or(0),
            blocks,
        });
    }
    Ok(Reading { finished: std::time::Instant::now(), domains })
}

impl Reading {
    /// The active domains' counters, for [`History::record`].
    pub fn counters(&self) -> Vec<(String, Counters)> {
        self.domains.iter().filter_map(|d| Some((d.uuid.clone(), d.counters?))).collect()
    }
}

/// The rates between two readings of the same domain.
pub fn rate(prev: &Counters, now: &Counters) -> Option<StatSample> {
    let dt_ms = now.t_ms.checked_sub(prev.t_ms).filter(|&d| d > 0)?;
    let secs = dt_ms as f64 / 1000.0;
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    Some(StatSample {
        t_ms: now.t_ms,
        cpu_percent: now.cpu_ns.saturating_sub(prev.cpu_ns) as f64 / (dt_ms as f64 * 1e6) * 100.0,
        memory_bytes: now.memory_bytes,
        disk_read_bps: per_s(prev.rd_bytes, now.rd_bytes),
        disk_write_bps: per_s(prev.wr_bytes, now.wr_bytes),
        net_rx_bps: per_s(prev.rx_bytes, now.rx_bytes),
        net_tx_bps: per_s(prev.tx_bytes, now.tx_bytes),
    })
}

/// Every domain's samples and last counters.
#[derive(Default)]
pub struct History {
    last: HashMap<String, Counters>,
    samples: HashMap<String, VecDeque<StatSample>>,
}

impl History {
    /// Takes one reading of every running domain; domains no longer running lose their last counters (the
    /// next run starts afresh), and keep their samples.
    pub fn record(&mut self, readings: Vec<(String, Counters)>) {
        let mut seen = HashMap::with_capacity(readings.len());
        for (uuid, now) in readings {
            if let Some(prev) = self.last.get(&uuid)
                && let Some(sample) = rate(prev, &now)
            {
                let q = self.samples.entry(uuid.clone()).or_default();
                if q.len() >= KEEP {
                    q.pop_front();
                }
                q.push_back(sample);
            }
            seen.insert(uuid, now);
        }
        self.last = seen;
    }

    /// Samples of `uuid` newer than `since_ms`.
    /// Whether `uuid` was ever sampled (and not forgotten).
    pub fn knows(&self, uuid: &str) -> bool {
        self.samples.contains_key(uuid) || self.last.contains_key(uuid)
    }

    pub fn since(&self, uuid: &str, since_ms: u64) -> Vec<StatSample> {
        self.samples.get(uuid).map(|q| q.iter().filter(|s| s.t_ms > since_ms).copied().collect()).unwrap_or_default()
    }

    pub fn forget(&mut self, uuid: &str) {
        self.last.remove(uuid);
        self.samples.remove(uuid);
    }
}

/// Averages one-second samples into one per minute (stamped with the minute's end).
pub fn per_minute(samples: &[StatSample]) -> Vec<StatSample> {
    let mut out: Vec<(u64, Vec<StatSample>)> = Vec::new();
    for s in samples {
        let minute = s.t_ms / 60_000;
        match out.last_mut() {
            Some((m, group)) if *m == minute => group.push(*s),
            _ => out.push((minute, vec![*s])),
        }
    }
    out.into_iter()
        .map(|(m, g)| {
            let n = g.len() as f64;
            let avg = |f: fn(&StatSample) -> f64| g.iter().map(f).sum::<f64>() / n;
            StatSample {
                t_ms: (m + 1) * 60_000,
                cpu_percent: avg(|s| s.cpu_percent),
                memory_bytes: g.last().map(|s| s.memory_bytes).unwrap_or(0),
                disk_read_bps: avg(|s| s.disk_read_bps),
                disk_write_bps: avg(|s| s.disk_write_bps),
                net_rx_bps: avg(|s| s.net_rx_bps),
                net_tx_bps: avg(|s| s.net_tx_bps),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_counter_differences() {
        let a = Counters { t_ms: 1000, cpu_ns: 0, rd_bytes: 100, tx_bytes: 10, ..Counters::default() };
        let b = Counters { t_ms: 3000, cpu_ns: 1_000_000_000, rd_bytes: 4100, tx_bytes: 10, ..a };
        let s = rate(&a, &b).unwrap();
        assert!((s.cpu_percent - 50.0).abs() < 1e-9, "{}", s.cpu_percent);
        assert!((s.disk_read_bps - 2000.0).abs() < 1e-9);
        assert_eq!(s.net_tx_bps, 0.0);
        assert!(rate(&b, &a).is_none(), "time going backwards gives no sample");
    }

    #[test]
    fn history_keeps_an_hour_and_filters_by_time() {
        let mut h = History::default();
        for i in 0..(KEEP as u64 + 10) {
            h.record(vec![("u".into(), Counters { t_ms: i * 1000, cpu_ns: i, ..Counters::default() })]);
        }
        assert_eq!(h.since("u", 0).len(), KEEP);
        assert_eq!(h.since("u", (KEEP as u64 + 7) * 1000).len(), 2);
        assert!(h.since("other", 0).is_empty());
        let m = per_minute(&h.since("u", 0));
        assert!(m.len() >= 60 && m.len() <= 62, "{}", m.len());
    }
}
