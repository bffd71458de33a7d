//! Network benchmarks.
//!
//! `net-backend`: the virtio-net device and its passt-protocol back end alone, fed at full host speed: a
//! peer thread plays passt on a Unix stream socket pair (4-byte length framing) and the host-side driver
//! (`vmm_core::virtio::host_driver::HostNetDriver`) plays the guest, through the production path (BAR
//! registers → I/O thread → socket → guest memory → used ring → interrupt). Against a plain socket-pair pump
//! on two threads (the same framing, each frame copied once into a destination buffer): the ceiling for
//! any design that moves frames between a socket and memory. 64-byte and 1500-byte frames, each way.
//! The guest-driven TCP comparison against QEMU with the same passt is the hardware tier's `net` scenario.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use vmm_core::net::{MacAddr, Nic, Passt};
use vmm_core::rate_limiter::NicLimits;
use vmm_core::virtio::host_driver::HostNetDriver;

const MAC: MacAddr = MacAddr([0x02, 0, 0, 0xbe, 0x4c, 0x01]);

fn frame(len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| i as u8).collect();
    f[..6].copy_from_slice(&MAC.0);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// A burst of framed frames, written with one system call by the peer.
fn burst(len: usize) -> Vec<u8> {
    let f = frame(len);
    let mut b = Vec::new();
    while b.len() + 4 + len <= 64 << 10 {
        b.extend_from_slice(&(len as u32).to_be_bytes());
        b.extend_from_slice(&f);
    }
    b
}

/// A peer that writes bursts into `socket` until `stop`.
fn flood(mut socket: UnixStream, len: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let b = burst(len);
        while !stop.load(Ordering::Relaxed) {
            if socket.write_all(&b).is_err() {
                return;
            }
        }
    })
}

/// A peer that reads framed frames from `socket` and counts them, until the socket closes.
fn sink(mut socket: UnixStream, frames: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let (mut have, mut at) = (0usize, 0usize);
        loop {
            while have - at >= 4 {
                let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                if have - at < 4 + len {
                    break;
                }
                at += 4 + len;
                frames.fetch_add(1, Ordering::Relaxed);
            }
            buf.copy_within(at..have, 0);
            have -= at;
            at = 0;
            match socket.read(&mut buf[have..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
        }
    })
}

/// Frames per second towards the guest through the device (under `limits`), and the device's I/O thread's
/// CPU time per frame (ns).
pub fn device_rx(len: usize, seconds: f64, limits: NicLimits) -> anyhow::Result<(f64, f64)> {
    let (ours, peer) = UnixStream::pair()?;
    let nic = Arc::new(Nic::with_backend("net0", MAC, 1500, Box::new(Passt::connected(ours, "net0")?)));
    nic.set_limits(limits);
    let mut d = HostNetDriver::new(nic.clone(), 256, 2048)?;
    d.post_rx(256);
    let stop = Arc::new(AtomicBool::new(false));
    let peer_thread = flood(peer, len, stop.clone());
    // Warm up, then measure.
    let _ = d.recv_count(Duration::from_secs(1));
    let start = Instant::now();
    let cpu0 = crate::threads_cpu_ns(&["net-io"]);
    let mut frames = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let (n, _) = d.recv_count(Duration::from_secs(5));
        if n == 0 {
            bail!("the device stopped delivering frames");
        }
        frames += n;
    }
    let rate = frames as f64 / start.elapsed().as_secs_f64();
    let cpu = crate::threads_cpu_ns(&["net-io"]).saturating_sub(cpu0) as f64 / frames.max(1) as f64;
    stop.store(true, Ordering::Relaxed);
    drop(d);
    drop(nic);
    let _ = peer_thread.join();
    Ok((rate, cpu))
}

/// Frames per second from the guest through the device (under `limits`), and the device's I/O thread's CPU
/// time per frame (ns).
pub fn device_tx(len: usize, seconds: f64, limits: NicLimits) -> anyhow::Result<(f64, f64)> {
    let (ours, peer) = UnixStream::pair()?;
    let nic = Arc::new(Nic::with_backend("net0", MAC, 1500, Box::new(Passt::connected(ours, "net0")?)));
    nic.set_limits(limits);
    let mut d = HostNetDriver::new(nic.clone(), 256, 2048)?;
    let counted = Arc::new(AtomicU64::new(0));
    let peer_thread = sink(peer, counted.clone());
    let f = frame(len);
    let start = Instant::now();
    let cpu0 = crate::threads_cpu_ns(&["net-io"]);
    while start.elapsed().as_secs_f64() < seconds {
        if d.send_burst(&f, 128) == 0 && !d.tx_room(Duration::from_secs(5)) {
            bail!("the device stopped taking frames");
        }
    }
    while d.tx_room(Duration::ZERO) && nic.stats.tx_frames.load(Ordering::Relaxed) < counted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let frames = nic.stats.tx_frames.load(Ordering::Relaxed);
    let rate = frames as f64 / start.elapsed().as_secs_f64();
    let cpu = crate::threads_cpu_ns(&["net-io"]).saturating_sub(cpu0) as f64 / frames.max(1) as f64;
    drop(d);
    drop(nic);
    let _ = peer_thread.join();
    Ok((rate, cpu))
}

/// Frames per second of a plain socket-pair pump: a writer thread sends each frame with one system call on
/// a SOCK_SEQPACKET pair, a reader receives each with one into a ring of destination buffers.
fn pump(len: usize, seconds: f64) -> anyhow::Result<f64> {
    use std::os::fd::AsRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors, owned at once below.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        bail!("socketpair: {}", std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fresh descriptors nobody else owns.
    let (reader, writer) =
        unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let writer_thread = std::thread::spawn(move || {
        let f = frame(len);
        while !s.load(Ordering::Relaxed) {
            // SAFETY: a live buffer of f.len() bytes.
            if unsafe { libc::send(writer.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) } < 0 {
                return;
            }
        }
    });
    let mut dest = vec![0u8; 2048 * 256];
    let (mut frames, mut slot) = (0u64, 0usize);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..64 {
            let d = &mut dest[slot * 2048 + 12..slot * 2048 + 2048];
            // SAFETY: a live buffer of d.len() bytes.
            let n = unsafe { libc::recv(reader.as_raw_fd(), d.as_mut_ptr().cast(), d.len(), 0) };
            if n <= 0 {
                bail!("recv: {}", std::io::Error::last_os_error());
            }
            slot = (slot + 1) % 256;
            frames += 1;
        }
    }
    let rate = frames as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // SAFETY: shutting down a live descriptor wakes a writer blocked on it.
    unsafe { libc::shutdown(reader.as_raw_fd(), libc::SHUT_RDWR) };
    let _ = writer_thread.join();
    Ok(rate)
}

/// Frames per second of a batched copy: a writer thread and a reader thread on a stream socket pair,
/// 64 KiB per system call, the reader parsing the framing and copying each frame once into a destination
/// buffer (a ceiling: memory bandwidth and framing only).
fn batched_copy(len: usize, seconds: f64) -> anyhow::Result<f64> {
    let (mut reader, writer) = UnixStream::pair()?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer_thread = flood(writer, len, stop.clone());
    let mut buf = vec![0u8; 256 << 10];
    let mut dest = vec![0u8; 2048 * 256];
    let (mut have, mut at, mut frames, mut slot) = (0usize, 0usize, 0u64, 0usize);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        while have - at >= 4 {
            let n = u32::from_be_bytes(buf[at..at + 4].try_into()?) as usize;
            if have - at < 4 + n {
                break;
            }
            let d = &mut dest[slot * 2048..slot * 2048 + 12 + n];
            d[12..].copy_from_slice(&buf[at + 4..at + 4 + n]);
            slot = (slot + 1) % 256;
            at += 4 + n;
            frames += 1;
        }
        buf.copy_within(at..have, 0);
        have -= at;
        at = 0;
        have += reader.read(&mut buf[have..])?;
    }
    let rate = frames as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(reader);
    let _ = writer_thread.join();
    Ok(rate)
}

pub fn backend(seconds: f64) -> anyhow::Result<()> {
    println!(
        "net backend: virtio-net device + passt-protocol back end fed at host speed vs a plain socket-pair pump (goal >= 0.8)"
    );
    for len in [64usize, 1500] {
        let raw = pump(len, seconds)?;
        let ceiling = batched_copy(len, seconds)?;
        let gbit = |r: f64| r * len as f64 * 8.0 / 1e9;
        let none = NicLimits::default();
        for (way, dev) in
            [("to guest  ", device_rx(len, seconds, none)?.0), ("from guest", device_tx(len, seconds, none)?.0)]
        {
            println!(
                "  {len:>5} B frames {way}  device {:>9.0} frames/s {:>6.2} Gbit/s   pump {:>9.0} frames/s {:>6.2} Gbit/s   ratio device/pump {:.2}",
                dev,
                gbit(dev),
                raw,
                gbit(raw),
                dev / raw
            );
        }
        println!(
            "  {len:>5} B frames (ceiling: batched copy, 64 KiB per system call: {:.0} frames/s {:.2} Gbit/s)",
            ceiling,
            gbit(ceiling)
        );
    }
    Ok(())
}
