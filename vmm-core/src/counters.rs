//! Counters of a running VM, readable at any time through the control socket.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters (atomics, updated by the vCPU threads and devices).
#[derive(Debug, Default)]
pub struct Counters {
    pub exits_io_in: AtomicU64,
    pub exits_io_out: AtomicU64,
    pub exits_mmio_read: AtomicU64,
    pub exits_mmio_write: AtomicU64,
    pub exits_hlt: AtomicU64,
    pub exits_shutdown: AtomicU64,
    pub exits_internal_error: AtomicU64,
    pub exits_system_event: AtomicU64,
    pub exits_interrupted: AtomicU64,
    pub exits_other: AtomicU64,
    /// Nanoseconds all vCPUs spent inside KVM_RUN.
    pub vcpu_run_ns: AtomicU64,
    /// Times the machine was (re)started, the first boot included.
    pub boots: AtomicU64,
}

/// A point-in-time copy of every counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CountersSnapshot {
    pub exits_io_in: u64,
    pub exits_io_out: u64,
    pub exits_mmio_read: u64,
    pub exits_mmio_write: u64,
    pub exits_hlt: u64,
    pub exits_shutdown: u64,
    pub exits_internal_error: u64,
    pub exits_system_event: u64,
    pub exits_interrupted: u64,
    pub exits_other: u64,
    pub vcpu_run_ns: u64,
    pub boots: u64,
    pub unhandled_pio_reads: u64,
    pub unhandled_pio_writes: u64,
    pub unhandled_mmio_reads: u64,
    pub unhandled_mmio_writes: u64,
    pub serial_bytes_out: u64,
    pub serial_bytes_in: u64,
    pub serial_bytes_lost: u64,
    pub last_post_code: u64,
    pub uptime_ms: u64,
    /// Disk requests completed, over every drive.
    pub disk_reads: u64,
    pub disk_writes: u64,
    pub disk_flushes: u64,
    pub disk_bytes_read: u64,
    pub disk_bytes_written: u64,
    /// Requests that completed with an error status.
    pub disk_errors: u64,
    /// Malformed descriptor chains (each put its device into NEEDS_RESET).
    pub disk_malformed: u64,
    /// Memory balloon: 4 KiB pages the guest put in it, took back, reported free (inflated and reported
    /// pages go back to the host), page numbers or ranges outside guest RAM (skipped), malformed chains.
    pub balloon_inflated_pages: u64,
    pub balloon_deflated_pages: u64,
    pub balloon_reported_pages: u64,
    pub balloon_invalid_pages: u64,
    pub balloon_malformed: u64,
    /// The slowest transfer of a read or write request to or from an image, over every drive (µs).
    pub disk_slowest_transfer_us: u64,
    /// The longest a read or write request waited for an I/O thread, over every drive (µs).
    pub disk_slowest_wait_us: u64,
    /// Time requests waited for their drive's rate limits, over every drive (µs).
    #[serde(default)]
    pub disk_throttled_us: u64,
    /// Network frames and bytes over every card: rx towards the guest, tx from it.
    pub net_rx_frames: u64,
    pub net_rx_bytes: u64,
    pub net_tx_frames: u64,
    pub net_tx_bytes: u64,
    /// Frames dropped either way (no receive buffers for too long, link down, back end gone).
    pub net_dropped: u64,
    /// Malformed descriptor chains of network cards.
    pub net_malformed: u64,
}

impl Counters {
    /// Copies the vCPU counters into a snapshot; the caller adds device counters.
    pub fn snapshot(&self) -> CountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            exits_io_in: l(&self.exits_io_in),
            exits_io_out: l(&self.exits_io_out),
            exits_mmio_read: l(&self.exits_mmio_read),
            exits_mmio_write: l(&self.exits_mmio_write),
            exits_hlt: l(&self.exits_hlt),
            exits_shutdown: l(&self.exits_shutdown),
            exits_internal_error: l(&self.exits_internal_error),
            exits_system_event: l(&self.exits_system_event),
            exits_interrupted: l(&self.exits_interrupted),
            exits_other: l(&self.exits_other),
            vcpu_run_ns: l(&self.vcpu_run_ns),
            boots: l(&self.boots),
            ..CountersSnapshot::default()
        }
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
