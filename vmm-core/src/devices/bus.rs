//! An address bus: maps non-overlapping address ranges to devices. One bus serves port I/O, another MMIO.
//! Accesses nobody claims are counted and otherwise ignored (reads return all ones, as on a PC).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    /// Fills `data` with what the device returns for a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Counts of accesses that no device claimed.
#[derive(Debug, Default)]
pub struct UnhandledCounts {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

/// The bus.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
    /// Shared so that the counts survive the bus (a reboot builds new buses).
    pub unhandled: Arc<UnhandledCounts>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A bus that adds its unhandled accesses to `unhandled`.
    pub fn with_counts(unhandled: Arc<UnhandledCounts>) -> Self {
        Bus { ranges: BTreeMap::new(), unhandled }
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, range)) = self.ranges.range(..end).next_back()
            && other + range.len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= range.len).then_some((offset, range))
    }

    /// Dispatches a read; returns false (and fills `data` with 0xFF) if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xFF);
                self.unhandled.reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write; returns false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => {
                self.unhandled.writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Locks a device; a device whose holder panicked is still used (its state is plain data).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        bytes: [u8; 4],
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.bytes[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.bytes[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dispatches_by_range_and_counts_the_rest() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Scratch::default())), 0x10, 4).unwrap();
        assert!(bus.write(0x11, &[7, 8]));
        let mut two = [0; 2];
        assert!(bus.read(0x11, &mut two));
        assert_eq!(two, [7, 8]);
        // Straddling the end, below, above: unhandled.
        assert!(!bus.read(0x13, &mut two));
        assert_eq!(two, [0xFF, 0xFF]);
        assert!(!bus.write(0x0F, &[1]));
        assert!(!bus.write(0x14, &[1]));
        assert_eq!(bus.unhandled.reads.load(Ordering::Relaxed), 1);
        assert_eq!(bus.unhandled.writes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Scratch::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x10, 4).unwrap();
        assert!(matches!(bus.insert(dev(), 0x12, 4), Err(BusError::Overlap { other: 0x10, .. })));
        assert!(matches!(bus.insert(dev(), 0x0E, 4), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(dev(), 0x20, 0), Err(BusError::BadRange { .. })));
        assert!(matches!(bus.insert(dev(), u64::MAX, 2), Err(BusError::BadRange { .. })));
        bus.insert(dev(), 0x14, 4).unwrap();
        bus.insert(dev(), 0x0C, 4).unwrap();
    }
}
