//! virtio-blk as a hostile guest driver sees it, through `vmm_core::virtio::host_driver`: the device is
//! reset and brought up (features, one queue of 16), the input writes descriptors, a request header and
//! the avail ring, kicks, and the target waits until the device completed every entry published or marked
//! itself broken (NEEDS_RESET). A device per drive mode (read-only, writable) serves 1000 inputs, reset at
//! the start of each, as a guest driver resets it, with its memory zeroed: a device that kept anything of
//! an earlier input across a reset would show as such. (A device, its threads and its drive made per input
//! cost most of the time, 259 inputs a second against 1197, and grew a sanitized run without end.)
//!
//! Input: n (descriptors, 1-16), n raw descriptors (addr u64, len u32, flags u16, next u16, little-endian),
//! 16 header bytes (written at 0x1_0000), k (avail entries, 1-8), k heads (u16), the avail index advance
//! (u16). Memory: descriptor table 0x1000, avail 0x2000, used 0x3000, headers 0x1_0000, status bytes
//! 0x2_0000, data 0x10_0000-0x10_5000.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::disk::Drive;
use vmm_core::virtio::host_driver::{Desc, HostBlockDriver};

#[path = "common.rs"]
mod common;
use common::{clear, le, scratch_image, take};

/// How many inputs one device serves before it is dropped and made anew (so its teardown is fuzzed too).
const INPUTS_PER_DEVICE: u32 = 1000;

thread_local! {
    /// The read-only and the writable device, and how many inputs each served.
    static DRIVERS: [RefCell<Option<(HostBlockDriver, u32)>>; 2] = const { [RefCell::new(None), RefCell::new(None)] };
}

/// A device on the scratch image (read-only or not), brought up.
fn driver(read_only: bool) -> Option<HostBlockDriver> {
    let path = scratch_image("blk")?;
    let media = Drive::open_media(path, read_only).ok()?;
    let drive = Arc::new(Drive::new("disk0".into(), read_only, false, "FUZZ".into(), Some(media)));
    HostBlockDriver::new(drive, 16, 4096).ok()
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(&[n]) = take(&mut data, 1) else { return };
    let n = usize::from(n % 16) + 1;
    let Some(descs) = take(&mut data, n * 16) else { return };
    let Some(header) = take(&mut data, 16) else { return };
    let Some(&[k]) = take(&mut data, 1) else { return };
    let k = usize::from(k % 8) + 1;
    let Some(heads) = take(&mut data, k * 2 + 2) else { return };
    let read_only = input[0] & 0x80 != 0;
    DRIVERS.with(|drivers| {
        let mut slot = drivers[usize::from(read_only)].borrow_mut();
        if slot.as_ref().is_none_or(|(_, served)| *served >= INPUTS_PER_DEVICE) {
            *slot = None;
            *slot = driver(read_only).map(|d| (d, 0));
        }
        let Some((d, served)) = slot.as_mut() else { return };
        *served += 1;
        clear(&d.mem);
        d.init();
        exercise(d, descs, header, heads);
    });
});

/// Writes the descriptors, the header and the avail ring, notifies, and waits for the device.
fn exercise(d: &mut HostBlockDriver, descs: &[u8], header: &[u8], heads: &[u8]) {
    for (i, b) in descs.chunks_exact(16).enumerate() {
        let desc = Desc {
            addr: le(&b[0..8]),
            len: le(&b[8..12]) as u32,
            flags: le(&b[12..14]) as u16,
            next: le(&b[14..16]) as u16,
        };
        d.write_desc(i as u16, desc);
    }
    let _ = d.mem.write_slice(header, GuestAddress(0x1_0000));
    let heads: Vec<u16> = heads.chunks_exact(2).map(|h| u16::from_le_bytes([h[0], h[1]])).collect();
    let (advance, heads) = heads.split_last().expect("k + 1 values");
    for &h in &heads[..heads.len() - 1] {
        d.push_avail(0, h);
    }
    d.publish(heads[heads.len() - 1], *advance);
    // Every entry published is completed, or the device breaks (an index past the queue's size included);
    // the wait ends at either, or after a while without progress (a device that neither completes nor
    // breaks, which libFuzzer's timeout would not catch at 20 ms).
    let published = (heads.len() as u16 - 1).wrapping_add(*advance);
    let mut done = 0usize;
    let mut idle = Instant::now();
    while done < usize::from(published) && d.status() & 0x40 == 0 && idle.elapsed() < Duration::from_millis(20) {
        let got = d.completions(Duration::from_millis(2)).len();
        if got > 0 {
            done += got;
            idle = Instant::now();
        }
    }
}
