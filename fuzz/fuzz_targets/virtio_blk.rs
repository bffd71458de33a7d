//! virtio-blk as a hostile guest driver sees it, through `vmm_core::virtio::host_driver`: the device is
//! brought up (features, one queue of 16), the input writes descriptors, a request header and the avail
//! ring, kicks, and the target waits until the device completed what it could or marked itself broken
//! (NEEDS_RESET). Input: n (descriptors, 1-16), n raw descriptors (addr u64, len u32, flags u16, next u16,
//! little-endian), 16 header bytes (written at 0x1_0000), k (avail entries, 1-8), k heads (u16), the
//! avail index advance (u16). Memory: descriptor table 0x1000, avail 0x2000, used 0x3000, headers
//! 0x1_0000, status bytes 0x2_0000, data 0x10_0000-0x10_5000.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::disk::Drive;
use vmm_core::virtio::host_driver::{Desc, HostBlockDriver};

#[path = "common.rs"]
mod common;
use common::{le, scratch_image, take};

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(path) = scratch_image("blk") else { return };
    let Some(&[n]) = take(&mut data, 1) else { return };
    let n = usize::from(n % 16) + 1;
    let Some(descs) = take(&mut data, n * 16) else { return };
    let Some(header) = take(&mut data, 16) else { return };
    let Some(&[k]) = take(&mut data, 1) else { return };
    let k = usize::from(k % 8) + 1;
    let Some(heads) = take(&mut data, k * 2 + 2) else { return };
    let read_only = input[0] & 0x80 != 0;
    let Ok(media) = Drive::open_media(path, read_only) else { return };
    let drive = Arc::new(Drive::new("disk0".into(), read_only, false, "FUZZ".into(), Some(media)));
    let Ok(mut d) = HostBlockDriver::new(drive, 16, 4096) else { return };
    for (i, b) in descs.chunks_exact(16).enumerate() {
        let desc = Desc { addr: le(&b[0..8]), len: le(&b[8..12]) as u32, flags: le(&b[12..14]) as u16, next: le(&b[14..16]) as u16 };
        d.write_desc(i as u16, desc);
    }
    let _ = d.mem.write_slice(header, GuestAddress(0x1_0000));
    let heads: Vec<u16> = heads.chunks_exact(2).map(|h| u16::from_le_bytes([h[0], h[1]])).collect();
    let (advance, heads) = heads.split_last().expect("k + 1 values");
    for &h in &heads[..heads.len() - 1] {
        d.push_avail(0, h);
    }
    d.publish(heads[heads.len() - 1], *advance);
    // Wait for the device: every request done, or broken, or a while without progress.
    let mut done = 0;
    let mut idle = Instant::now();
    while done < heads.len() && d.status() & 0x40 == 0 && idle.elapsed() < Duration::from_millis(20) {
        let got = d.completions(Duration::from_millis(2)).len();
        if got > 0 {
            done += got;
            idle = Instant::now();
        }
    }
});
