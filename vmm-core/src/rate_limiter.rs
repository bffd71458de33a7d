//! Token-bucket rate limits for a disk and a network card (the way Firecracker's rate limiter works): a
//! bucket per limit holds
//! up to one second of its rate and refills continuously; a request takes its cost (one operation, its
//! bytes) from every bucket that applies to it, and waits — in order, nothing dropped — while one of them
//! is short. A request dearer than a whole bucket goes when that bucket is full and leaves it in debt, so
//! the long-run rate stays the limit whatever the request sizes.
//!
//! Limits change at any time ([`DiskLimiter::set`], [`NicLimiter::set`]): the new buckets start full.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A disk's limits: operations and bytes per second, in total and per direction (absent: none). Flushes,
/// discards and the other requests count as operations (their bytes as none) under the total limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub riops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wiops: Option<u64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wbps: Option<u64>,
}

/// The most any limit may be (a rate above it is no limit worth keeping; it also keeps the arithmetic far
/// from overflow).
pub const MAX_RATE: u64 = 1 << 40;

impl DiskLimits {
    /// No limit at all.
    pub fn is_none(&self) -> bool {
        *self == DiskLimits::default()
    }

    /// Refuses a zero or absurd rate, naming it.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in self.named() {
            match value {
                Some(0) => return Err(format!("{name}=0 would stop the disk: give a rate of at least 1")),
                Some(v) if v > MAX_RATE => return Err(format!("{name}={v} is more than {MAX_RATE}")),
                _ => {}
            }
        }
        Ok(())
    }

    fn named(&self) -> [(&'static str, Option<u64>); 6] {
        [
            ("iops", self.iops),
            ("riops", self.riops),
            ("wiops", self.wiops),
            ("bps", self.bps),
            ("rbps", self.rbps),
            ("wbps", self.wbps),
        ]
    }

    /// Sets the limit named `name` (`iops`, `bps`, …) from its text; false for a name that is none of them.
    pub fn set_named(&mut self, name: &str, value: &str) -> Result<bool, String> {
        let slot = match name {
            "iops" => &mut self.iops,
            "riops" => &mut self.riops,
            "wiops" => &mut self.wiops,
            "bps" => &mut self.bps,
            "rbps" => &mut self.rbps,
            "wbps" => &mut self.wbps,
            _ => return Ok(false),
        };
        *slot = Some(value.parse().map_err(|_| format!("{name}={value:?} is not a whole number"))?);
        self.check()?;
        Ok(true)
    }
}

/// One bucket: `rate` tokens a second, at most `rate` held. `tokens` goes below zero for a request dearer
/// than the whole bucket (its debt is paid back by the refill before anything else passes).
#[derive(Debug, Clone)]
struct Bucket {
    rate: u64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        Bucket { rate, tokens: rate as f64, refilled: now }
    }

    fn refill(&mut self, now: Instant) {
        // Several requests of one batch share one `now`: the bucket refills once.
        if now <= self.refilled {
            return;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.refilled = now;
    }

    /// How long until `cost` may be taken (zero: now). A cost above the bucket's size waits for a full bucket.
    fn wait_for(&self, cost: u64) -> Duration {
        let need = (cost as f64).min(self.rate as f64);
        if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate as f64)
        }
    }

    fn take(&mut self, cost: u64) {
        self.tokens -= cost as f64;
    }
}

/// What a request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
    /// Flushes, discards, GET_ID: operations under the total limits only.
    Other,
}

/// The buckets of a disk's limits.
#[derive(Debug, Clone, Default)]
pub struct DiskLimiter {
    limits: DiskLimits,
    /// iops, riops, wiops, bps, rbps, wbps, as the limits have them.
    buckets: [Option<Bucket>; 6],
    /// Time requests spent waiting for tokens, in microseconds.
    pub throttled_us: u64,
}

impl DiskLimiter {
    pub fn new(limits: DiskLimits, now: Instant) -> Self {
        let mut l = DiskLimiter::default();
        l.set(limits, now);
        l
    }

    pub fn limits(&self) -> DiskLimits {
        self.limits
    }

    /// New limits; their buckets start full.
    pub fn set(&mut self, limits: DiskLimits, now: Instant) {
        self.limits = limits;
        for (bucket, (_, rate)) in self.buckets.iter_mut().zip(limits.named()) {
            *bucket = rate.map(|r| Bucket::new(r, now));
        }
    }

    /// The buckets a request in `direction` of `bytes` takes from, with its cost in each.
    fn costs(direction: Direction, bytes: u64) -> [u64; 6] {
        let (read, write) = (direction == Direction::Read, direction == Direction::Write);
        [1, u64::from(read), u64::from(write), bytes, if read { bytes } else { 0 }, if write { bytes } else { 0 }]
    }

    /// Takes a request's cost and returns None if every bucket had it at `now`; else takes nothing and
    /// returns how long to wait before asking again.
    pub fn try_take(&mut self, direction: Direction, bytes: u64, now: Instant) -> Option<Duration> {
        let costs = Self::costs(direction, bytes);
        let mut wait = Duration::ZERO;
        for (bucket, &cost) in self.buckets.iter_mut().zip(&costs) {
            if let Some(b) = bucket.as_mut()
                && cost > 0
            {
                b.refill(now);
                wait = wait.max(b.wait_for(cost));
            }
        }
        if !wait.is_zero() {
            return Some(wait);
        }
        for (bucket, &cost) in self.buckets.iter_mut().zip(&costs) {
            if let Some(b) = bucket.as_mut()
                && cost > 0
            {
                b.take(cost);
            }
        }
        None
    }
}

/// A network card's limits, in bits per second each way (absent: none). `rx` is towards the guest (what it
/// downloads), `tx` from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bps: Option<u64>,
}

/// The least a card's limit may be: a bucket of less than one full-size Ethernet frame a second would hold
/// a frame back for longer than a peer waits.
pub const MIN_NIC_RATE: u64 = 8 * 1514;

impl NicLimits {
    pub fn is_none(&self) -> bool {
        *self == NicLimits::default()
    }

    /// Refuses a rate below [`MIN_NIC_RATE`] or above [`MAX_RATE`], naming it.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [("rx", self.rx_bps), ("tx", self.tx_bps)] {
            match value {
                Some(v) if v < MIN_NIC_RATE => {
                    return Err(format!(
                        "{name}={v} bit/s is below {MIN_NIC_RATE} bit/s (one full-size frame a second)"
                    ));
                }
                Some(v) if v > MAX_RATE => return Err(format!("{name}={v} bit/s is more than {MAX_RATE}")),
                _ => {}
            }
        }
        Ok(())
    }

    /// Sets `rate` (both ways), `rx` or `tx` from its text (bits per second); false for another name.
    pub fn set_named(&mut self, name: &str, value: &str) -> Result<bool, String> {
        let parse = || value.parse::<u64>().map_err(|_| format!("{name}={value:?} is not a whole number of bit/s"));
        match name {
            "rate" => {
                let v = parse()?;
                (self.rx_bps, self.tx_bps) = (Some(v), Some(v));
            }
            "rx" => self.rx_bps = Some(parse()?),
            "tx" => self.tx_bps = Some(parse()?),
            _ => return Ok(false),
        }
        self.check()?;
        Ok(true)
    }
}

/// Which way a frame goes, for [`NicLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Towards the guest.
    Rx,
    /// From the guest.
    Tx,
}

/// The buckets of a card's limits (in bytes).
#[derive(Debug, Clone, Default)]
pub struct NicLimiter {
    limits: NicLimits,
    rx: Option<Bucket>,
    tx: Option<Bucket>,
}

impl NicLimiter {
    pub fn limits(&self) -> NicLimits {
        self.limits
    }

    /// New limits; their buckets start full.
    pub fn set(&mut self, limits: NicLimits, now: Instant) {
        self.limits = limits;
        let bucket = |bits: Option<u64>| bits.map(|b| Bucket::new((b / 8).max(1), now));
        (self.rx, self.tx) = (bucket(limits.rx_bps), bucket(limits.tx_bps));
    }

    /// Takes a frame of `bytes` going `way` and returns None if its bucket had them at `now`; else takes
    /// nothing and returns how long to wait before asking again.
    pub fn try_take(&mut self, way: Way, bytes: u64, now: Instant) -> Option<Duration> {
        let bucket = match way {
            Way::Rx => self.rx.as_mut(),
            Way::Tx => self.tx.as_mut(),
        }?;
        bucket.refill(now);
        let wait = bucket.wait_for(bytes);
        if wait.is_zero() {
            bucket.take(bytes);
            None
        } else {
            Some(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_lets_a_second_of_operations_through_then_the_rate() {
        let t0 = Instant::now();
        let mut l = DiskLimiter::new(DiskLimits { iops: Some(100), ..Default::default() }, t0);
        for _ in 0..100 {
            assert_eq!(l.try_take(Direction::Read, 4096, t0), None, "a full bucket: a second's worth at once");
        }
        let wait = l.try_take(Direction::Write, 4096, t0).expect("empty");
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-6, "{wait:?}");
        // One second later, 100 more and no more: the rate holds over time.
        let mut passed = 0;
        for step in 0..=1000 {
            let now = t0 + ms(step);
            while l.try_take(Direction::Read, 512, now).is_none() {
                passed += 1;
            }
        }
        assert!((100..=101).contains(&passed), "{passed} in a second at 100 IOPS");
    }

    #[test]
    fn bytes_and_directions_have_their_own_buckets() {
        let t0 = Instant::now();
        let limits = DiskLimits { wbps: Some(1 << 20), riops: Some(10), ..Default::default() };
        let mut l = DiskLimiter::new(limits, t0);
        // Writes: a MiB a second, whatever the number of requests; reads: 10 a second, whatever their size.
        assert_eq!(l.try_take(Direction::Write, 1 << 20, t0), None);
        assert!(l.try_take(Direction::Write, 4096, t0).is_some());
        for _ in 0..10 {
            assert_eq!(l.try_take(Direction::Read, 8 << 20, t0), None, "reads are not limited by bytes");
        }
        assert!(l.try_take(Direction::Read, 512, t0).is_some());
        assert_eq!(l.try_take(Direction::Other, 0, t0), None, "a flush is under no direction's limit");
        assert_eq!(l.try_take(Direction::Write, 4096, t0 + ms(4)), None, "4 ms refill 4 KiB at 1 MiB/s");
    }

    #[test]
    fn a_request_dearer_than_the_bucket_goes_when_it_is_full_and_its_debt_is_paid() {
        let t0 = Instant::now();
        let mut l = DiskLimiter::new(DiskLimits { bps: Some(1000), ..Default::default() }, t0);
        assert_eq!(l.try_take(Direction::Read, 4000, t0), None, "a full bucket lets it through");
        // 4000 taken from 1000: 3 s of debt, then a second to refill for the next big one.
        let wait = l.try_take(Direction::Read, 4000, t0).unwrap();
        assert!((wait.as_secs_f64() - 4.0).abs() < 1e-6, "{wait:?}");
        assert!(l.try_take(Direction::Read, 1, t0 + ms(2999)).is_some());
        assert_eq!(l.try_take(Direction::Read, 1, t0 + ms(3002)), None);
    }

    #[test]
    fn new_limits_start_full_and_bad_ones_are_refused() {
        let t0 = Instant::now();
        let mut l = DiskLimiter::new(DiskLimits { iops: Some(1), ..Default::default() }, t0);
        assert_eq!(l.try_take(Direction::Read, 1, t0), None);
        assert!(l.try_take(Direction::Read, 1, t0).is_some());
        l.set(DiskLimits::default(), t0);
        assert_eq!(l.try_take(Direction::Read, 1, t0), None, "no limit");
        let mut limits = DiskLimits::default();
        assert_eq!(limits.set_named("wiops", "50"), Ok(true));
        assert_eq!(limits.set_named("speed", "50"), Ok(false));
        assert!(limits.set_named("bps", "0").unwrap_err().contains("stop the disk"));
        assert!(limits.set_named("bps", "-1").unwrap_err().contains("whole number"));
        assert!(DiskLimits { iops: Some(MAX_RATE + 1), ..Default::default() }.check().is_err());
    }

    #[test]
    fn a_card_has_a_bucket_each_way_in_bytes_from_bits() {
        let t0 = Instant::now();
        let mut l = NicLimiter::default();
        l.set(NicLimits { rx_bps: Some(8_000_000), tx_bps: None }, t0);
        // A second of 1 MB/s at once, then 1.5 ms per 1500-byte frame.
        let mut taken = 0u64;
        while l.try_take(Way::Rx, 1500, t0).is_none() {
            taken += 1500;
        }
        assert_eq!(taken, 999_000, "a full bucket: a second's worth");
        let wait = l.try_take(Way::Rx, 1500, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.0005).abs() < 1e-6, "{wait:?}");
        assert_eq!(l.try_take(Way::Rx, 1500, t0 + ms(1)), None);
        for _ in 0..10_000 {
            assert_eq!(l.try_take(Way::Tx, 65_000, t0), None, "no limit from the guest");
        }
    }

    #[test]
    fn a_cards_limits_are_named_and_checked() {
        let mut limits = NicLimits::default();
        assert_eq!(limits.set_named("rate", "10000000"), Ok(true));
        assert_eq!(limits, NicLimits { rx_bps: Some(10_000_000), tx_bps: Some(10_000_000) });
        assert_eq!(limits.set_named("tx", "64000"), Ok(true));
        assert_eq!(limits.tx_bps, Some(64_000));
        assert_eq!(limits.set_named("mtu", "1500"), Ok(false));
        assert!(limits.set_named("rx", "100").unwrap_err().contains("below"));
        assert!(limits.set_named("rx", "-5").unwrap_err().contains("whole number"));
        assert!(NicLimits { tx_bps: Some(MAX_RATE + 1), rx_bps: None }.check().is_err());
    }
}
