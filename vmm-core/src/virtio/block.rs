//! virtio-blk (virtio 1.2 §5.2): one request queue, served off the vCPU threads by a queue thread that
//! validates each descriptor chain and a small pool of I/O threads that move bytes between the image and
//! guest memory directly (no bounce buffers: memory use does not depend on what the guest posts).
//!
//! Validation: a chain whose structure is broken (a loop, a `next` beyond the queue, a bad indirect
//! table, no device-writable status byte, an avail index that jumps past the queue, more descriptors
//! than `seg_max` allows) puts the device in the NEEDS_RESET state and it stops serving until the driver
//! resets it. A well-formed request that asks for something impossible (memory outside the guest's RAM,
//! sectors past the end, a write to a read-only disk, buffers in the wrong direction, a short header)
//! completes with VIRTIO_BLK_S_IOERR; an unknown type with VIRTIO_BLK_S_UNSUPP.
//!
//! DISCARD and WRITE_ZEROES (offered on writable drives) carry up to [`MAX_DISCARD_SEG`] ranges; a range
//! past the end or longer than the configuration allows, a payload that is not whole ranges, or too many
//! ranges complete with IOERR; an unknown flag (or UNMAP on a DISCARD) with UNSUPP, as the specification
//! asks. Every range is checked before any is carried out.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt};
use crate::devices::bus::lock;
use crate::disk::{Drive, SECTOR_SIZE};
use crate::rate_limiter::Direction;

/// Virtio device ID of a block device.
pub const DEVICE_TYPE: u16 = 2;
/// The request queue's largest size.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (the header and status take two descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Threads doing disk I/O per device: how many requests can be in flight at once.
pub const IO_THREADS: usize = 4;
/// Ranges per DISCARD or WRITE_ZEROES request (max_discard_seg, max_write_zeroes_seg).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per range of a DISCARD or WRITE_ZEROES request (max_discard_sectors, max_write_zeroes_sectors):
/// 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// What a DISCARD should be aligned to, in sectors (discard_sector_alignment): 64 KiB, qcow2's usual
/// cluster and more than a file system's block.
pub const DISCARD_ALIGNMENT: u32 = 128;
/// The longest the queue thread sleeps while requests wait for the rate limits.
const RATE_RECHECK: Duration = Duration::from_millis(100);

/// Bytes of one range (struct virtio_blk_discard_write_zeroes).
const RANGE_BYTES: u32 = 16;

/// One validated request, waiting for an I/O thread.
struct Job {
    epoch: u64,
    head: u16,
    mem: GuestMemoryMmap,
    status: GuestAddress,
    kind: Kind,
    /// When the queue thread took it.
    taken: Instant,
}

enum Kind {
    Read {
        sector: u64,
        segments: Vec<(GuestAddress, u32)>,
    },
    Write {
        sector: u64,
        segments: Vec<(GuestAddress, u32)>,
    },
    Flush,
    GetId {
        address: GuestAddress,
        len: u32,
    },
    /// DISCARD (`zeroes` false) or WRITE_ZEROES: the ranges are in the data segments.
    Ranges {
        zeroes: bool,
        segments: Vec<(GuestAddress, u32)>,
    },
    /// Well-formed but impossible: completes with IOERR.
    Invalid(&'static str),
    Unsupported(u32),
}

impl Kind {
    /// What the request costs under the drive's rate limits: its direction and the bytes it moves.
    fn cost(&self) -> (Direction, u64) {
        let bytes = |segments: &[(GuestAddress, u32)]| segments.iter().map(|&(_, len)| u64::from(len)).sum();
        match self {
            Kind::Read { segments, .. } => (Direction::Read, bytes(segments)),
            Kind::Write { segments, .. } => (Direction::Write, bytes(segments)),
            _ => (Direction::Other, 0),
        }
    }
}

/// The queue while the driver is up.
struct Active {
    queue: Queue,
    mem: GuestMemoryMmap,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Bumps on every activation and reset: jobs of an older epoch are dropped untouched.
    epoch: u64,
    jobs: VecDeque<Job>,
    /// Jobs queued or being executed.
    in_flight: usize,
    /// Taking requests stopped because a queue's worth was in flight; the next completion wakes the
    /// queue thread.
    throttled: bool,
    /// Taking requests stopped while a machine state is saved.
    quiesced: bool,
    /// The next request waits for the drive's rate limits until then (the queue thread wakes to take it).
    rate_wait: Option<Instant>,
    /// Since when the request at the head of the queue waits for the rate limits.
    throttled_since: Option<Instant>,
}

/// What the queue thread, the I/O threads and the transport share.
struct Shared {
    drive: Arc<Drive>,
    interrupt: Arc<VirtioInterrupt>,
    /// The driver's queue notifications (a KVM ioeventfd).
    notify: EventFd,
    /// Wakes the queue thread on activation and shutdown.
    wake: EventFd,
    state: Mutex<State>,
    /// Signalled when a job is queued (and at shutdown).
    work: Condvar,
    /// Signalled when `in_flight` drops to zero.
    idle: Condvar,
    shutdown: AtomicBool,
}

/// A virtio-blk device serving one [`Drive`].
pub struct VirtioBlock {
    shared: Arc<Shared>,
    max_sizes: [u16; 1],
    threads: Vec<JoinHandle<()>>,
}

impl VirtioBlock {
    /// A device for `drive`, raising `interrupt`; starts its (idle) threads, which inherit the caller's
    /// seccomp filter.
    pub fn new(drive: Arc<Drive>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            drive,
            interrupt,
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let mut block = VirtioBlock { shared: shared.clone(), max_sizes: [QUEUE_SIZE], threads: Vec::new() };
        let s = shared.clone();
        block.threads.push(std::thread::Builder::new().name("blk-queue".into()).spawn(move || s.queue_thread())?);
        for _ in 0..IO_THREADS {
            let s = shared.clone();
            block.threads.push(std::thread::Builder::new().name("blk-io".into()).spawn(move || s.io_thread())?);
        }
        Ok(block)
    }

    pub fn drive(&self) -> &Arc<Drive> {
        &self.shared.drive
    }

    fn config_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..8].copy_from_slice(&self.shared.drive.sectors().to_le_bytes());
        b[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        b[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        b[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        b[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        b[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        b[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes()); // discard_sector_alignment
        b[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        b[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        b[56] = 1; // write_zeroes_may_unmap
        b
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.shared.drive.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, _index: usize) -> &EventFd {
        &self.shared.notify
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_bytes();
        let start = offset as usize;
        match bytes.get(start..start + data.len()) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable (VIRTIO_BLK_F_CONFIG_WCE is not offered).
    }

    fn config_generation(&self) -> u32 {
        self.shared.drive.generation()
    }

    fn activate(&mut self, activation: Activation) {
        let Some(queue) = activation.queues.into_iter().next() else { return };
        {
            let mut state = lock(&self.shared.state);
            state.epoch += 1;
            state.quiesced = false;
            state.active = Some(Active { queue, mem: activation.mem });
        }
        self.shared.drive.set_listener(Some(self.shared.interrupt.clone()));
        let _ = self.shared.wake.write(1);
    }

    fn reset(&mut self) {
        self.shared.drive.set_listener(None);
        self.shared.stop_serving();
    }

    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.shared.state);
        state.quiesced = true;
        // Queued jobs still run (the I/O threads take them); nothing new is taken.
        while state.in_flight > 0 {
            state = self.shared.idle.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let queues = state.active.as_ref().map(|a| vec![a.queue.state()]).unwrap_or_default();
        drop(state);
        // What the guest wrote reaches the image before the state that says so is saved.
        if let Some(media) = self.shared.drive.media()
            && let Err(e) = media.backend.flush()
        {
            log::warn!("{}: flushing before the machine state is saved: {e}", self.shared.drive.id);
        }
        Ok(queues)
    }

    fn resume_requests(&mut self) {
        lock(&self.shared.state).quiesced = false;
        let _ = self.shared.wake.write(1);
    }
}

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        self.shared.drive.set_listener(None);
        self.shared.stop_serving();
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Why a chain cannot be served at all.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    Empty,
    Unterminated,
    TooLong,
    NoStatus,
}

impl Shared {
    /// Stops serving the queue: drops queued jobs and waits for those being executed.
    fn stop_serving(&self) {
        let mut state = lock(&self.state);
        state.active = None;
        state.epoch += 1;
        let dropped = state.jobs.len();
        state.jobs.clear();
        state.in_flight -= dropped;
        state.throttled = false;
        state.quiesced = false;
        while state.in_flight > 0 {
            state = self.idle.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn queue_thread(&self) {
        const NOTIFY: u64 = 1;
        const WAKE: u64 = 2;
        let Ok(epoll) = Epoll::new() else {
            log::error!("virtio-blk: cannot create the queue thread's epoll; the disk stays idle");
            return;
        };
        for (fd, token) in [(self.notify.as_raw_fd(), NOTIFY), (self.wake.as_raw_fd(), WAKE)] {
            if epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).is_err() {
                log::error!("virtio-blk: cannot watch the queue notifications; the disk stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); 2];
        while !self.shutdown.load(Ordering::Acquire) {
            // Waiting for the rate limits' tokens: wake when they are there, and at least every 100 ms (limits
            // changed meanwhile apply within that).
            let timeout = match lock(&self.state).rate_wait {
                Some(at) => at.saturating_duration_since(Instant::now()).min(RATE_RECHECK).as_millis() as i32,
                None => -1,
            };
            match epoll.wait(timeout, &mut events) {
                Ok(n) => {
                    for e in &events[..n] {
                        let _ = if e.data() == NOTIFY { self.notify.read() } else { self.wake.read() };
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-blk: the queue thread cannot wait: {e}");
                    return;
                }
            }
            // Take new requests, run one of them here (one thread hop less for a lone request), repeat
            // until there is nothing left to take or run.
            loop {
                self.take_requests();
                match self.next_job() {
                    Some(job) => self.complete(job),
                    None => break,
                }
            }
        }
    }

    /// Moves every available chain to the job list, or marks the device broken.
    fn take_requests(&self) {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let epoch = state.epoch;
        if state.quiesced {
            return;
        }
        state.rate_wait = None;
        let Some(active) = state.active.as_mut() else { return };
        if self.interrupt.needs_reset() {
            return;
        }
        let mem = active.mem.clone();
        let mut queued = 0;
        // One clock reading and, for a drive with limits, one lock of its limiter for the whole pass (a pass
        // takes microseconds); an unlimited drive, the usual one, never touches the limiter.
        let now = Instant::now();
        let mut limiter = self.drive.is_limited().then(|| lock(&self.drive.limiter));
        let broken = 'serve: loop {
            let _ = active.queue.disable_notification(&mem);
            loop {
                // At most a queue's worth of requests in flight, whatever the driver does (a driver that
                // re-posts descriptors before they complete could otherwise queue jobs without end).
                if state.in_flight + queued >= usize::from(active.queue.size()) {
                    state.throttled = true;
                    break 'serve false;
                }
                // An avail index more than a queue's worth ahead is a driver bug (or an attack).
                match active.queue.avail_idx(&mem, Ordering::Acquire) {
                    Ok(avail) if (avail - Wrapping(active.queue.next_avail())).0 <= active.queue.size() => {}
                    _ => {
                        self.malformed("the avail index jumped past the queue");
                        break 'serve true;
                    }
                }
                let Some(chain) = active.queue.pop_descriptor_chain(&mem) else { break };
                match parse(chain, &mem) {
                    Ok((head, status, kind)) => {
                        // The drive's rate limits: a request they do not let through yet goes back to the
                        // avail ring (it is the last taken) and everything behind it waits with it.
                        if let Some(limiter) = limiter.as_mut() {
                            let (direction, bytes) = kind.cost();
                            if let Some(wait) = limiter.try_take(direction, bytes, now) {
                                active.queue.go_to_previous_position();
                                state.rate_wait = Some(now + wait);
                                state.throttled_since.get_or_insert(now);
                                break 'serve false;
                            }
                        }
                        if let Some(since) = state.throttled_since.take() {
                            let waited = now.saturating_duration_since(since).as_micros() as u64;
                            self.drive.stats.throttled_us.fetch_add(waited, Ordering::Relaxed);
                        }
                        state.jobs.push_back(Job { epoch, head, mem: mem.clone(), status, kind, taken: now });
                        queued += 1;
                    }
                    Err(why) => {
                        self.malformed(&format!("malformed request ({why:?})"));
                        break 'serve true;
                    }
                }
            }
            match active.queue.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break false,
                Err(_) => break true,
            }
        };
        state.in_flight += queued;
        drop(limiter);
        drop(guard);
        // The queue thread runs one job itself; the I/O threads take the others.
        for _ in 1..queued {
            self.work.notify_one();
        }
        if broken {
            self.interrupt.mark_needs_reset();
        }
    }

    /// Takes the next job of the current epoch (dropping stale ones), or none.
    fn pop_job(&self, state: &mut State) -> Option<Job> {
        while let Some(job) = state.jobs.pop_front() {
            if job.epoch == state.epoch {
                return Some(job);
            }
            state.in_flight -= 1;
        }
        if state.in_flight == 0 {
            self.idle.notify_all();
        }
        None
    }

    fn next_job(&self) -> Option<Job> {
        self.pop_job(&mut lock(&self.state))
    }

    fn io_thread(&self) {
        loop {
            let job = {
                let mut state = lock(&self.state);
                loop {
                    if let Some(job) = self.pop_job(&mut state) {
                        break job;
                    }
                    if self.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            self.complete(job);
        }
    }

    /// Counts a driver error; the first of each drive is logged as a warning (a guest could otherwise
    /// flood the log), the others at debug level.
    fn malformed(&self, what: &str) {
        let first = self.drive.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0;
        let level = if first { log::Level::Warn } else { log::Level::Debug };
        log::log!(level, "{}: {what}; the device needs a reset (guest driver error)", self.drive.id);
    }

    /// Executes a job and puts it in the used ring (unless the device was reset meanwhile).
    fn complete(&self, job: Job) {
        let started = Instant::now();
        let (status, written) = self.execute(&job);
        let stats = &self.drive.stats;
        if matches!(job.kind, Kind::Read { .. } | Kind::Write { .. }) {
            let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
            stats.slowest_transfer_us.fetch_max(us(started.elapsed()), Ordering::Relaxed);
            stats.slowest_wait_us.fetch_max(us(started.duration_since(job.taken)), Ordering::Relaxed);
        }
        let count = |c: &std::sync::atomic::AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        match (&job.kind, status) {
            (_, s) if s != VIRTIO_BLK_S_OK => count(&stats.errors, 1),
            (Kind::Read { .. }, _) => {
                count(&stats.bytes_read, u64::from(written));
                count(&stats.reads, 1)
            }
            (Kind::Write { segments, .. }, _) => {
                count(&stats.bytes_written, segments.iter().map(|&(_, len)| u64::from(len)).sum());
                count(&stats.writes, 1)
            }
            (Kind::Flush, _) => count(&stats.flushes, 1),
            (Kind::Ranges { .. }, _) => count(&stats.discards, 1),
            _ => 0,
        };
        let _ = job.mem.write_obj(status as u8, job.status);
        let mut state = lock(&self.state);
        let mut notify = false;
        if state.epoch == job.epoch
            && let Some(active) = state.active.as_mut()
            && active.queue.add_used(&job.mem, job.head, written + 1).is_ok()
        {
            notify = active.queue.needs_notification(&job.mem).unwrap_or(true);
        }
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.idle.notify_all();
        }
        let resume = std::mem::take(&mut state.throttled);
        drop(state);
        if resume {
            let _ = self.wake.write(1);
        }
        if notify {
            self.interrupt.signal_used();
        }
    }

    /// Carries out a job; returns the status and how many bytes of guest memory it wrote.
    fn execute(&self, job: &Job) -> (u32, u32) {
        match &job.kind {
            Kind::Read { sector, segments } => self.transfer(&job.mem, *sector, segments, false),
            Kind::Write { sector, segments } => {
                if self.drive.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.transfer(&job.mem, *sector, segments, true)
            }
            Kind::Flush => match self.drive.media() {
                Some(m) => match m.backend.flush() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        log::warn!("{}: flush failed: {e}", self.drive.id);
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                },
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            Kind::GetId { address, len } => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let serial = self.drive.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                let len = (*len as usize).min(id.len());
                match job.mem.write_slice(&id[..len], *address) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            Kind::Ranges { zeroes, segments } => self.ranges(&job.mem, *zeroes, segments),
            Kind::Invalid(why) => {
                log::debug!("{}: request refused: {why}", self.drive.id);
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Kind::Unsupported(t) => {
                log::debug!("{}: unsupported request type {t}", self.drive.id);
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// A DISCARD or WRITE_ZEROES: reads and checks every range, then carries them out.
    fn ranges(&self, mem: &GuestMemoryMmap, zeroes: bool, segments: &[(GuestAddress, u32)]) -> (u32, u32) {
        let Some(media) = self.drive.media() else { return (VIRTIO_BLK_S_IOERR, 0) };
        if self.drive.read_only {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let total: u64 = segments.iter().map(|&(_, len)| u64::from(len)).sum();
        if total == 0
            || !total.is_multiple_of(u64::from(RANGE_BYTES))
            || total > u64::from(MAX_DISCARD_SEG * RANGE_BYTES)
        {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        // At most MAX_DISCARD_SEG ranges: a bounded buffer, whatever the segments claim.
        let mut payload = vec![0u8; total as usize];
        let mut at = 0;
        for &(address, len) in segments {
            let len = len as usize;
            if mem.read_slice(&mut payload[at..at + len], address).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            at += len;
        }
        let mut ranges = Vec::new();
        for r in payload.chunks_exact(RANGE_BYTES as usize) {
            let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            let sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
            let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!zeroes && flags != 0) {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            let start = sector.checked_mul(SECTOR_SIZE);
            let len = u64::from(sectors) * SECTOR_SIZE;
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= media.backend.size() && sectors <= MAX_DISCARD_SECTORS => {
                    ranges.push((start, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
                }
                _ => return (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        for (start, len, unmap) in ranges {
            let result =
                if zeroes { media.backend.write_zeroes(start, len, unmap) } else { media.backend.discard(start, len) };
            if let Err(e) = result {
                let what = if zeroes { "write-zeroes" } else { "discard" };
                log::warn!("{}: {what} of {len} bytes at byte {start} failed: {e}", self.drive.id);
                return (VIRTIO_BLK_S_IOERR, 0);
            }
        }
        (VIRTIO_BLK_S_OK, 0)
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        segments: &[(GuestAddress, u32)],
        write: bool,
    ) -> (u32, u32) {
        let Some(media) = self.drive.media() else { return (VIRTIO_BLK_S_IOERR, 0) };
        let total: u64 = segments.iter().map(|&(_, len)| u64::from(len)).sum();
        let start = sector.checked_mul(SECTOR_SIZE);
        let in_range = start.and_then(|s| s.checked_add(total)).is_some_and(|end| end <= media.backend.size());
        if !in_range || !total.is_multiple_of(SECTOR_SIZE) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let offset = start.unwrap_or(0);
        let mut slices = Vec::with_capacity(segments.len());
        for &(address, len) in segments {
            let Ok(slice) = mem.get_slice(address, len as usize) else { return (VIRTIO_BLK_S_IOERR, 0) };
            slices.push(slice);
        }
        // The whole request in one call (a qcow2 image allocates its clusters once).
        let result =
            if write { media.backend.writev_at(&slices, offset) } else { media.backend.readv_at(&slices, offset) };
        if let Err(e) = result {
            log::warn!("{}: {} at byte {offset} failed: {e}", self.drive.id, if write { "write" } else { "read" });
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        (VIRTIO_BLK_S_OK, if write { 0 } else { total as u32 })
    }
}

/// Validates a chain: header, data segments, status byte.
fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<(u16, GuestAddress, Kind), Malformed> {
    let head = chain.head_index();
    let mut descriptors = Vec::new();
    for d in chain {
        if descriptors.len() == SEG_MAX as usize + 2 {
            return Err(Malformed::TooLong);
        }
        descriptors.push(d);
    }
    let (Some(first), Some(last)) = (descriptors.first(), descriptors.last()) else { return Err(Malformed::Empty) };
    if last.has_next() {
        // The iterator stopped early: a loop, a `next` beyond the table, or an unreadable descriptor.
        return Err(Malformed::Unterminated);
    }
    if descriptors.len() < 2
        || !last.is_write_only()
        || last.len() == 0
        || !GuestMemoryBackend::check_range(mem, last.addr(), 1)
    {
        return Err(Malformed::NoStatus);
    }
    let status = last.addr();
    let data = &descriptors[1..descriptors.len() - 1];
    if first.is_write_only() || first.len() < 16 {
        return Ok((head, status, Kind::Invalid("the request header is short or device-writable")));
    }
    let Ok(header) = mem.read_obj::<[u8; 16]>(first.addr()) else {
        return Ok((head, status, Kind::Invalid("the request header is outside guest memory")));
    };
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);
    let segments = || data.iter().map(|d| (d.addr(), d.len())).collect::<Vec<_>>();
    let all_writable = data.iter().all(|d| d.is_write_only());
    let kind = match kind {
        VIRTIO_BLK_T_IN if all_writable => Kind::Read { sector, segments: segments() },
        VIRTIO_BLK_T_OUT if data.iter().all(|d| !d.is_write_only()) => Kind::Write { sector, segments: segments() },
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => Kind::Invalid("data buffers point the wrong way"),
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if data.iter().all(|d| !d.is_write_only()) => {
            Kind::Ranges { zeroes: kind == VIRTIO_BLK_T_WRITE_ZEROES, segments: segments() }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => Kind::Invalid("range buffers point the wrong way"),
        VIRTIO_BLK_T_GET_ID => match data.first() {
            Some(d) if d.is_write_only() => Kind::GetId { address: d.addr(), len: d.len() },
            _ => Kind::Invalid("GET_ID without a device-writable buffer"),
        },
        other => Kind::Unsupported(other),
    };
    Ok((head, status, kind))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::disk::Media;
    use crate::disk::qemu;
    use crate::virtio::host_driver::{
        Desc, HostBlockDriver, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    };

    const WAIT: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(200);

    struct Image {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Image {
        fn new(name: &str, sectors: usize) -> Image {
            let dir = std::env::temp_dir().join(format!("porthole-blk-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("disk.img");
            let bytes: Vec<u8> = (0..sectors * 512).map(|i| (i / 512 + i % 251) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            Image { dir, path }
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn driver(image: &Image, read_only: bool) -> HostBlockDriver {
        let media = Drive::open_media(&image.path, read_only).unwrap();
        let drive = Arc::new(Drive::new("disk0".into(), read_only, false, "PORTHOLE-SN".into(), Some(media)));
        HostBlockDriver::new(drive, 32, 64 * 1024).unwrap()
    }

    fn one(d: &mut HostBlockDriver, slot: u16, kind: u32, sector: u64, len: u32) -> (u8, u32) {
        d.post(slot, kind, sector, len);
        d.kick();
        let done = d.completions(WAIT);
        assert_eq!(done.len(), 1, "one completion");
        assert_eq!(done[0].0, slot * 3, "the head of the chain");
        (d.request_status(slot), done[0].1)
    }

    /// Keeps `depth` requests of `kind` and `len` bytes in flight on a drive limited by `limits` for
    /// `seconds`; returns the operations and bytes completed after the first second (the buckets start full:
    /// the first second carries their burst) per second.
    fn rate_under(limits: crate::rate_limiter::DiskLimits, kind: u32, len: u32, seconds: f64) -> (f64, f64) {
        let image = Image::new(&format!("rate-{kind}-{len}"), 4096);
        let media = Drive::open_media(&image.path, false).unwrap();
        let drive = Arc::new(Drive::new("disk0".into(), false, false, String::new(), Some(media)));
        drive.set_limits(limits);
        let mut d = HostBlockDriver::new(drive, 64, u64::from(len)).unwrap();
        let depth = 16u16;
        for slot in 0..depth {
            d.post(slot, kind, u64::from(slot) * 8, len);
        }
        d.kick();
        let start = Instant::now();
        let (mut ops, mut bytes) = (0u64, 0u64);
        while start.elapsed().as_secs_f64() < seconds {
            let done = d.completions(Duration::from_millis(50));
            let counted = start.elapsed().as_secs_f64() >= 1.0;
            for (head, _) in &done {
                let slot = head / 3;
                assert_eq!(d.request_status(slot), 0);
                if counted {
                    ops += 1;
                    bytes += u64::from(len);
                }
                d.post(slot, kind, u64::from(slot) * 8, len);
            }
            if !done.is_empty() {
                d.kick();
            }
        }
        let counted_for = seconds - 1.0;
        (ops as f64 / counted_for, bytes as f64 / counted_for)
    }

    /// The drive's limits hold the rate the device completes requests at (host side at full speed: the
    /// driver always has requests waiting), within 10 %.
    #[test]
    fn rate_limits_hold_operations_and_bytes_per_second() {
        use crate::rate_limiter::DiskLimits;
        let (iops, _) = rate_under(DiskLimits { iops: Some(200), ..Default::default() }, T_IN, 512, 3.0);
        assert!((180.0..=220.0).contains(&iops), "{iops:.0} reads/s under iops=200");
        let mib = 1 << 20;
        let (_, bps) = rate_under(DiskLimits { wbps: Some(mib), ..Default::default() }, T_OUT, 64 * 1024, 3.0);
        assert!((0.9 * mib as f64..=1.1 * mib as f64).contains(&bps), "{bps:.0} B/s written under wbps=1 MiB/s");
        // A read limit leaves writes alone (and the other way round): 200 writes/s is far below what the
        // device does unlimited.
        let (free, _) = rate_under(DiskLimits { riops: Some(20), ..Default::default() }, T_OUT, 512, 1.5);
        assert!(free > 400.0, "{free:.0} writes/s under a read limit of 20/s");
        println!(
            "rate limits: {iops:.1} reads/s under iops=200, {bps:.0} B/s under wbps=1048576, {free:.0} writes/s under riops=20"
        );
    }

    /// Requests over the limit wait (none fails, none is dropped); lifting the limit lets them all through at
    /// once; the time they waited is counted.
    #[test]
    fn limited_requests_wait_and_go_when_the_limit_is_lifted() {
        use crate::rate_limiter::DiskLimits;
        let image = Image::new("limit-live", 64);
        let mut d = driver(&image, false);
        d.drive().set_limits(DiskLimits { iops: Some(2), ..Default::default() });
        for slot in 0..10 {
            d.post(slot, T_IN, u64::from(slot), 512);
        }
        d.kick();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(400);
        while Instant::now() < deadline {
            done.extend(d.completions(Duration::from_millis(50)));
        }
        assert!((2..=3).contains(&done.len()), "{} of 10 passed a limit of 2/s in 0.4 s", done.len());
        d.drive().set_limits(DiskLimits::default());
        let deadline = Instant::now() + WAIT;
        while done.len() < 10 && Instant::now() < deadline {
            done.extend(d.completions(WAIT));
        }
        assert_eq!(done.len(), 10, "every request completes once the limit is lifted");
        assert!((0..10).all(|slot| d.request_status(slot) == 0));
        assert!(d.drive().stats.throttled_us.load(Ordering::Relaxed) > 0);
    }

    /// Saving a machine state quiesces the device: a request posted meanwhile is not taken. What it saved,
    /// loaded into a new device on the same memory, lets the driver go on where it was.
    #[test]
    fn a_saved_device_goes_on_in_a_new_one() {
        use crate::pci::PciDevice;
        let image = Image::new("state", 64);
        let mut d = driver(&image, false);
        assert_eq!(one(&mut d, 0, T_IN, 3, 512), (0, 513));
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();
        d.post(1, T_IN, 5, 512);
        d.kick();
        assert!(d.completions(SHORT).is_empty(), "nothing is taken while the state is saved");

        // (The same drive: its image is locked by whoever holds it.)
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let block = VirtioBlock::new(d.drive().clone(), interrupt.clone()).unwrap();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(block, 0xC000_0000, 16, interrupt, d.mem.clone(), None, None).unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        fresh.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        d.device = fresh;
        d.kick();
        assert_eq!(d.completions(WAIT), vec![(3, 513)], "the new device took the waiting request, and only it");
        assert_eq!(d.request_status(1), 0);
        let mut got = vec![0u8; 512];
        d.mem.read_slice(&mut got, d.data_address(1)).unwrap();
        assert_eq!(got, image.bytes()[5 * 512..6 * 512]);
        assert_eq!(one(&mut d, 2, T_IN, 7, 512), (0, 513), "and goes on");
    }

    #[test]
    fn reads_writes_flushes_and_identifies() {
        let image = Image::new("rw", 64);
        let mut d = driver(&image, false);
        assert_eq!(d.capacity(), 64);
        let (status, len) = one(&mut d, 0, T_IN, 3, 1024);
        assert_eq!((status, len), (0, 1025));
        let mut got = vec![0u8; 1024];
        d.mem.read_slice(&mut got, d.data_address(0)).unwrap();
        assert_eq!(got, image.bytes()[3 * 512..5 * 512]);
        d.mem.write_slice(&[0x5A; 2048], d.data_address(1)).unwrap();
        assert_eq!(one(&mut d, 1, T_OUT, 10, 2048), (0, 1));
        assert_eq!(one(&mut d, 2, T_FLUSH, 0, 0), (0, 1));
        let file = image.bytes();
        assert_eq!(file.len(), 64 * 512);
        assert!(file[10 * 512..14 * 512].iter().all(|&b| b == 0x5A));
        assert_eq!(one(&mut d, 3, T_GET_ID, 0, 20), (0, 21));
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, d.data_address(3)).unwrap();
        assert_eq!(&id[..11], b"PORTHOLE-SN");
        assert_eq!(one(&mut d, 4, 99, 0, 512), (VIRTIO_BLK_S_UNSUPP as u8, 1));
    }

    #[test]
    fn impossible_requests_fail_with_ioerr_and_never_grow_the_image() {
        let image = Image::new("range", 16);
        let mut d = driver(&image, false);
        let ioerr = (VIRTIO_BLK_S_IOERR as u8, 1);
        assert_eq!(one(&mut d, 0, T_OUT, 15, 1024), ioerr, "past the end");
        assert_eq!(one(&mut d, 1, T_IN, u64::MAX / 256, 512), ioerr, "sector overflow");
        assert_eq!(one(&mut d, 2, T_IN, 0, 100), ioerr, "not whole sectors");
        // A data buffer outside guest memory, and one far too long.
        d.write_desc(1, Desc { addr: 0x40_0000_0000, len: 512, flags: 2 | 1, next: 2 });
        d.write_desc(0, Desc { addr: 0x1_0000, len: 16, flags: 1, next: 1 });
        d.write_desc(2, Desc { addr: 0x2_0000, len: 1, flags: 2, next: 0 });
        d.mem.write_slice(&[0u8; 16], GuestAddress(0x1_0000)).unwrap();
        d.publish(0, 1);
        assert_eq!(d.completions(WAIT), [(0, 1)]);
        assert_eq!(d.request_status(0), VIRTIO_BLK_S_IOERR as u8);
        d.write_desc(1, Desc { addr: d.data_address(0).0, len: 0xFFFF_FE00, flags: 2 | 1, next: 2 });
        d.publish(0, 1);
        assert_eq!(d.completions(WAIT), [(0, 1)]);
        assert_eq!(d.request_status(0), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(image.bytes().len(), 16 * 512);
        assert_eq!(d.status() & 0x40, 0, "the device still works");
        assert_eq!(one(&mut d, 5, T_IN, 0, 512).0, 0);
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let image = Image::new("ro", 8);
        let before = image.bytes();
        let mut d = driver(&image, true);
        assert_ne!(d.device.device().features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(one(&mut d, 0, T_OUT, 0, 512), (VIRTIO_BLK_S_IOERR as u8, 1));
        assert_eq!(one(&mut d, 1, T_IN, 0, 512), (0, 513));
        assert_eq!(image.bytes(), before);
    }

    #[test]
    fn requests_run_concurrently_and_all_complete() {
        let image = Image::new("many", 256);
        let mut d = driver(&image, false);
        for slot in 0..8 {
            d.post(slot, T_IN, u64::from(slot) * 8, 4096);
        }
        d.kick();
        let mut done = Vec::new();
        while done.len() < 8 {
            let got = d.completions(WAIT);
            assert!(!got.is_empty(), "completions stalled at {}", done.len());
            done.extend(got);
        }
        done.sort();
        assert_eq!(done, (0..8).map(|s| (s * 3, 4097)).collect::<Vec<_>>());
        let file = image.bytes();
        for slot in 0..8u16 {
            let mut got = vec![0u8; 4096];
            d.mem.read_slice(&mut got, d.data_address(slot)).unwrap();
            let start = usize::from(slot) * 8 * 512;
            assert_eq!(got, file[start..start + 4096]);
        }
    }

    /// Malformed chains: the device says it needs a reset and serves nothing more until it gets one.
    #[test]
    fn malformed_chains_break_the_device_until_reset() {
        let image = Image::new("hostile", 16);
        let mut d = driver(&image, false);
        let header = Desc { addr: 0x1_0000, len: 16, flags: 1, next: 1 };
        let status = Desc { addr: 0x2_0000, len: 1, flags: 2, next: 0 };
        type Case = fn(&mut HostBlockDriver, Desc, Desc);
        let cases: [(&str, Case); 7] = [
            ("loop", |d, h, _| {
                d.write_desc(0, h);
                d.write_desc(1, Desc { addr: 0x3_0000, len: 512, flags: 1 | 2, next: 0 });
                d.publish(0, 1);
            }),
            ("next beyond the queue", |d, h, _| {
                d.write_desc(0, Desc { next: 0xFFFF, ..h });
                d.publish(0, 1);
            }),
            ("head beyond the queue", |d, _, _| d.publish(32 + 5, 1)),
            ("read-only status", |d, h, s| {
                d.write_desc(0, h);
                d.write_desc(1, Desc { flags: 0, ..s });
                d.publish(0, 1);
            }),
            ("bogus indirect table", |d, _, _| {
                d.write_desc(0, Desc { addr: 0x10_0000, len: 0x1000_0000, flags: 4, next: 0 });
                d.publish(0, 1);
            }),
            ("indirect table outside memory", |d, _, _| {
                d.write_desc(0, Desc { addr: 0x40_0000_0000, len: 48, flags: 4, next: 0 });
                d.publish(0, 1);
            }),
            ("avail index jump", |d, h, s| {
                d.write_desc(0, h);
                d.write_desc(1, s);
                d.publish(0, 1000);
            }),
        ];
        for (name, case) in cases {
            d.init();
            case(&mut d, header, status);
            assert_eq!(d.completions(SHORT), [], "{name}: nothing completes");
            assert_eq!(d.status() & 0x40, 0x40, "{name}: NEEDS_RESET");
            assert_eq!(d.read_isr() & 2, 2, "{name}: a configuration interrupt");
            // Broken: a good request is not served either.
            d.post(1, T_IN, 0, 512);
            d.kick();
            assert_eq!(d.completions(SHORT), [], "{name}: the device stays stopped");
            d.init();
            assert_eq!(d.status() & 0x40, 0, "{name}: reset clears NEEDS_RESET");
            assert_eq!(one(&mut d, 1, T_IN, 0, 512).0, 0, "{name}: serves again after reset");
        }
    }

    /// A backend that takes its time, so that requests pile up.
    struct Slow;
    impl crate::disk::DiskBackend for Slow {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _buf: &vm_memory::VolatileSlice<'_>, _offset: u64) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn write_at(&self, _buf: &vm_memory::VolatileSlice<'_>, _offset: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A driver that re-posts the same chain as fast as it can: never more than a queue's worth of
    /// requests is held, and once the avail index runs too far ahead the device stops.
    #[test]
    fn requests_in_flight_are_bounded_by_the_queue_size() {
        let media = Media { path: "slow".into(), backend: Arc::new(Slow) };
        let drive = Arc::new(Drive::new("disk0".into(), false, false, String::new(), Some(media)));
        let mut d = HostBlockDriver::new(drive, 32, 4096).unwrap();
        d.post(0, T_IN, 0, 512);
        let mut most = 0;
        for _ in 0..200 {
            d.publish(0, 1);
            most = most.max(lock(&d.device.device().shared.state).in_flight);
        }
        std::thread::sleep(SHORT);
        most = most.max(lock(&d.device.device().shared.state).in_flight);
        assert!(most <= 32, "{most} requests in flight");
        assert_eq!(d.status() & 0x40, 0x40, "the runaway avail index broke the device");
        d.init();
        assert_eq!(lock(&d.device.device().shared.state).in_flight, 0, "the reset waited for every request");
    }

    #[test]
    fn media_changes_reach_the_driver() {
        let iso_a = Image::new("media-a", 8);
        let iso_b = Image::new("media-b", 32);
        let drive = Arc::new(Drive::new("cdrom0".into(), true, true, String::new(), None));
        let mut d = HostBlockDriver::new(drive.clone(), 16, 4096).unwrap();
        assert_eq!(d.capacity(), 0);
        assert_eq!(one(&mut d, 0, T_IN, 0, 512).0, VIRTIO_BLK_S_IOERR as u8, "no media");
        let generation = |d: &mut HostBlockDriver| {
            let mut b = [0u8];
            crate::pci::PciDevice::bar_read(&mut d.device, 0, 0x15, &mut b);
            b[0]
        };
        let g0 = generation(&mut d);
        drive.change_media(Some(Drive::open_media(&iso_a.path, true).unwrap())).unwrap();
        assert_eq!(d.read_isr() & 2, 2, "config change interrupt");
        assert_ne!(generation(&mut d), g0);
        assert_eq!(d.capacity(), 8);
        assert_eq!(one(&mut d, 1, T_IN, 0, 512), (0, 513));
        drive.change_media(None).unwrap();
        assert_eq!(d.capacity(), 0);
        assert_eq!(one(&mut d, 2, T_IN, 0, 512).0, VIRTIO_BLK_S_IOERR as u8);
        let media_b: Media = Drive::open_media(&iso_b.path, true).unwrap();
        drive.change_media(Some(media_b)).unwrap();
        assert_eq!(d.capacity(), 32);
        assert_eq!(one(&mut d, 3, T_IN, 31, 512), (0, 513));
        let mut got = vec![0u8; 512];
        d.mem.read_slice(&mut got, d.data_address(3)).unwrap();
        assert_eq!(got, iso_b.bytes()[31 * 512..]);
        assert_eq!(one(&mut d, 4, T_OUT, 0, 512).0, VIRTIO_BLK_S_IOERR as u8, "media is read-only");
    }

    /// A fixed disk grows while the driver is up, raw and qcow2: a configuration-change interrupt, the new
    /// capacity, the new range reading as zeros (and writable), the old data kept; shrinking, a size that
    /// is not whole sectors and a removable drive are refused with the drive unchanged.
    #[test]
    fn a_disk_grows_while_the_driver_is_up() {
        let raw = Image::new("grow-raw", 8);
        let qcow2 = raw.dir.join("disk.qcow2");
        crate::disk::create_qcow2(&qcow2, 8 * 512, None).unwrap();
        for path in [&raw.path, &qcow2] {
            let media = Drive::open_media(path, false).unwrap();
            let drive = Arc::new(Drive::new("disk0".into(), false, false, String::new(), Some(media)));
            let mut d = HostBlockDriver::new(drive.clone(), 16, 4096).unwrap();
            assert_eq!(d.capacity(), 8);
            assert_eq!(one(&mut d, 0, T_IN, 8, 512).0, VIRTIO_BLK_S_IOERR as u8, "past the end");
            let _ = d.read_isr();
            drive.grow(64 * 512).unwrap();
            assert_eq!(d.read_isr() & 2, 2, "config change interrupt");
            assert_eq!(d.capacity(), 64, "{path:?}");
            assert_eq!(one(&mut d, 1, T_IN, 63, 512), (0, 513), "the new last sector reads");
            let mut got = vec![1u8; 512];
            d.mem.read_slice(&mut got, d.data_address(1)).unwrap();
            assert!(got.iter().all(|&b| b == 0), "as zeros");
            d.mem.write_slice(&[0x5a; 512], d.data_address(2)).unwrap();
            assert_eq!(one(&mut d, 2, T_OUT, 40, 512).0, 0, "and takes writes");
            assert_eq!(one(&mut d, 3, T_IN, 40, 512), (0, 513));
            d.mem.read_slice(&mut got, d.data_address(3)).unwrap();
            assert!(got.iter().all(|&b| b == 0x5a));
            if path == &raw.path {
                assert_eq!(one(&mut d, 4, T_IN, 7, 512), (0, 513));
                d.mem.read_slice(&mut got, d.data_address(4)).unwrap();
                assert_eq!(got, raw.bytes()[7 * 512..8 * 512], "the old data stays");
            }
            for (size, why) in [(32 * 512, "only grows"), (100 * 512 + 1, "whole number")] {
                let e = drive.grow(size).unwrap_err().to_string();
                assert!(e.contains(why), "{e}");
            }
            assert_eq!(d.capacity(), 64, "refusals change nothing");
        }
        let cdrom = Arc::new(Drive::new("cdrom0".into(), true, true, String::new(), None));
        assert!(cdrom.grow(1 << 20).unwrap_err().to_string().contains("only a fixed, writable disk grows"));
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("porthole-blkq-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CHUNK: u32 = 64 * 1024;

    fn driver_on(path: &std::path::Path, backing: &[PathBuf]) -> HostBlockDriver {
        let media = Drive::open_media_on(path, false, None, backing).unwrap();
        let drive = Arc::new(Drive::new("disk0".into(), false, false, String::new(), Some(media)));
        HostBlockDriver::new(drive, 32, u64::from(CHUNK)).unwrap()
    }

    /// Reads the whole disk through the device.
    fn read_disk(d: &mut HostBlockDriver) -> Vec<u8> {
        let sectors = d.capacity();
        let mut out = Vec::new();
        let mut sector = 0;
        while sector < sectors {
            let len = (sectors - sector).min(u64::from(CHUNK) / 512) as u32 * 512;
            assert_eq!(one(d, 0, T_IN, sector, len), (0, len + 1), "read at sector {sector}");
            let mut chunk = vec![0u8; len as usize];
            d.mem.read_slice(&mut chunk, d.data_address(0)).unwrap();
            out.extend(chunk);
            sector += u64::from(len / 512);
        }
        out
    }

    /// Writes `data` at `sector` through the device.
    fn write_disk(d: &mut HostBlockDriver, sector: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(CHUNK as usize).enumerate() {
            d.mem.write_slice(chunk, d.data_address(1)).unwrap();
            let at = sector + (i * CHUNK as usize / 512) as u64;
            assert_eq!(one(d, 1, T_OUT, at, chunk.len() as u32), (0, 1), "write at sector {at}");
        }
    }

    /// A DISCARD or WRITE_ZEROES of `ranges` (sector, sectors, flags); returns the status.
    fn ranges(d: &mut HostBlockDriver, kind: u32, ranges: &[(u64, u32, u32)]) -> u8 {
        let mut payload = Vec::new();
        for &(sector, n, flags) in ranges {
            payload.extend(sector.to_le_bytes());
            payload.extend(n.to_le_bytes());
            payload.extend(flags.to_le_bytes());
        }
        d.mem.write_slice(&payload, d.data_address(2)).unwrap();
        let (status, len) = one(d, 2, kind, 0, payload.len() as u32);
        assert_eq!(len, 1);
        status
    }

    /// Images qemu-img made (plain, compressed, preallocated, an overlay on an explicitly given backing
    /// file) read back through the device what qemu-img and qemu-io put in them.
    #[test]
    fn qcow2_images_made_by_qemu_img_read_back_through_the_device() {
        let dir = Scratch::new("qemu-made");
        let content = qemu::pattern(3 << 20);
        let raw = dir.path("pattern.raw");
        std::fs::write(&raw, &content).unwrap();
        let r = raw.to_str().unwrap();
        for (name, create) in [
            ("plain", None),
            ("compressed", None),
            ("prealloc-metadata", Some("preallocation=metadata")),
            ("prealloc-full", Some("preallocation=full")),
            ("cluster-4k", Some("cluster_size=4096")),
        ] {
            let q = dir.path(&format!("{name}.qcow2"));
            let qs = q.to_str().unwrap();
            match create {
                // Made first, then filled by convert -n (which keeps the image as it was made).
                Some(opts) => {
                    qemu::img(&["create", "-q", "-f", "qcow2", "-o", opts, qs, "3M"]);
                    qemu::img(&["convert", "-n", "-O", "qcow2", r, qs])
                }
                None if name == "compressed" => qemu::img(&["convert", "-c", "-O", "qcow2", r, qs]),
                None => qemu::img(&["convert", "-O", "qcow2", r, qs]),
            };
            let mut d = driver_on(&q, &[]);
            assert_eq!(d.capacity(), 3 << 11, "{name}");
            assert!(read_disk(&mut d) == content, "{name}: the device reads what qemu-img wrote");
        }
        // An overlay written by qemu-io on the compressed image, opened with its backing file given.
        let base = dir.path("compressed.qcow2");
        let overlay = dir.path("overlay.qcow2");
        let (b, o) = (base.to_str().unwrap(), overlay.to_str().unwrap());
        qemu::img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", o]);
        qemu::io(&["-f", "qcow2", "-c", "write -P 0xab 1M 192k", "-c", "write -z 2M 64k", o]);
        let mut expected = content.clone();
        expected[1 << 20..(1 << 20) + (192 << 10)].fill(0xab);
        expected[2 << 20..(2 << 20) + (64 << 10)].fill(0);
        let mut d = driver_on(&overlay, std::slice::from_ref(&base));
        assert!(read_disk(&mut d) == expected, "the overlay reads through to its backing file");
    }

    /// The same writes through the device on a qcow2 image (plain, and an overlay) and on a raw file:
    /// `qemu-img check` finds the qcow2 clean, and `qemu-img compare` finds both equal.
    #[test]
    fn writes_to_qcow2_through_the_device_agree_with_raw_and_qemu_img() {
        let dir = Scratch::new("writes");
        let base = dir.path("base.qcow2");
        let base_raw = dir.path("base.raw");
        std::fs::write(&base_raw, qemu::pattern(4 << 20)).unwrap();
        qemu::img(&["convert", "-O", "qcow2", base_raw.to_str().unwrap(), base.to_str().unwrap()]);
        let plain = dir.path("plain.qcow2");
        qemu::img(&["create", "-q", "-f", "qcow2", plain.to_str().unwrap(), "4M"]);
        let overlay = dir.path("overlay.qcow2");
        let (b, o) = (base.to_str().unwrap(), overlay.to_str().unwrap());
        qemu::img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", o]);
        let raw = dir.path("plain.raw");
        std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
        let raw_over = dir.path("overlay.raw");
        std::fs::copy(&base_raw, &raw_over).unwrap();
        // Sizes and places that straddle clusters, rewrite some, and leave most of the disk alone.
        let writes: Vec<(u64, Vec<u8>)> =
            [(0u64, 512usize), (7, 4096), (127, 70_000 / 512 * 512), (2048, 1 << 20), (3000, 8192), (8191, 512)]
                .iter()
                .enumerate()
                .map(|(i, &(sector, len))| (sector, (0..len).map(|j| (j * 7 + i * 41 + j / 512) as u8).collect()))
                .collect();
        for (image, backing, twin) in [(&plain, vec![], &raw), (&overlay, vec![base.clone()], &raw_over)] {
            for (path, backing) in [(image, backing), (twin, vec![])] {
                let mut d = driver_on(path, &backing);
                for (sector, data) in &writes {
                    write_disk(&mut d, *sector, data);
                }
                assert_eq!(one(&mut d, 3, T_FLUSH, 0, 0), (0, 1));
                // Flushed: qemu-img finds the image consistent while the device still has it open.
                if path == image {
                    qemu::check(path);
                }
            }
            qemu::check(image);
            let (i, t) = (image.to_str().unwrap(), twin.to_str().unwrap());
            qemu::img(&["compare", "-q", "-f", "qcow2", "-F", "raw", i, t]);
        }
    }

    /// DISCARD and WRITE_ZEROES (with and without UNMAP) read back as zeros and give the space back, on
    /// qcow2 (qemu-img's actual-size) and on raw (the file's blocks).
    #[test]
    fn discard_and_write_zeroes_free_space_on_qcow2_and_raw() {
        use std::os::unix::fs::MetadataExt;
        let dir = Scratch::new("discard");
        let q = dir.path("d.qcow2");
        qemu::img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "8M"]);
        let raw = dir.path("d.raw");
        crate::disk::create_raw_image(&raw, 8 << 20).unwrap();
        let data: Vec<u8> = (0..6 << 20).map(|i: usize| (i % 253 + 1) as u8).collect();
        for path in [&q, &raw] {
            let mut d = driver_on(path, &[]);
            let features = d.device.device().features();
            assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
            assert_ne!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
            write_disk(&mut d, 0, &data);
            assert_eq!(one(&mut d, 3, T_FLUSH, 0, 0), (0, 1));
            let used = |p: &std::path::Path| {
                if p == q { qemu::actual_size(p) } else { std::fs::metadata(p).unwrap().blocks() * 512 }
            };
            let full = used(path);
            assert!(full >= 6 << 20, "{path:?}: {full}");
            // 2 MiB discarded, 2 MiB zeroed with UNMAP (two ranges), 2 MiB zeroed keeping their space.
            assert_eq!(ranges(&mut d, T_DISCARD, &[(0, 4096, 0)]), 0);
            assert_eq!(ranges(&mut d, T_WRITE_ZEROES, &[(4096, 2048, 1), (6144, 2048, 1)]), 0);
            assert_eq!(ranges(&mut d, T_WRITE_ZEROES, &[(8192, 4096, 0)]), 0);
            assert_eq!(one(&mut d, 3, T_FLUSH, 0, 0), (0, 1));
            let got = read_disk(&mut d);
            let nonzero = got.iter().position(|&b| b != 0);
            assert_eq!(nonzero, None, "{path:?}: discarded and zeroed ranges read as zeros");
            let after = used(path);
            eprintln!("{path:?}: {full} bytes used before, {after} after");
            // Give or take a cluster of qcow2 metadata written meanwhile.
            let slack = if path == &q { 64 << 10 } else { 0 };
            assert!(after + (4 << 20) <= full + slack, "{path:?}: the 4 MiB unmapped came back ({full} -> {after})");
            assert_eq!(d.drive().stats.discards.load(Ordering::Relaxed), 3);
        }
        qemu::check(&q);
        qemu::img(&["compare", "-q", "-f", "qcow2", "-F", "raw", q.to_str().unwrap(), raw.to_str().unwrap()]);
    }

    /// A discard on an image with an internal snapshot (qemu-img snapshot -c) frees nothing the snapshot
    /// still uses: the snapshot reads back whole, and qemu-img check finds the image clean.
    #[test]
    fn discards_leave_internal_snapshots_whole() {
        let dir = Scratch::new("snapshot-discard");
        let content = qemu::pattern(2 << 20);
        let raw = dir.path("p.raw");
        std::fs::write(&raw, &content).unwrap();
        let q = dir.path("s.qcow2");
        qemu::img(&["convert", "-O", "qcow2", raw.to_str().unwrap(), q.to_str().unwrap()]);
        qemu::img(&["snapshot", "-c", "before", q.to_str().unwrap()]);
        let mut d = driver_on(&q, &[]);
        assert_eq!(ranges(&mut d, T_DISCARD, &[(0, 4096, 0)]), 0);
        assert_eq!(one(&mut d, 3, T_FLUSH, 0, 0), (0, 1));
        assert!(read_disk(&mut d).iter().all(|&b| b == 0), "the active state reads as zeros");
        drop(d);
        qemu::check(&q);
        let back = dir.path("back.raw");
        let (qs, bs) = (q.to_str().unwrap(), back.to_str().unwrap());
        qemu::img(&["convert", "-l", "snapshot.name=before", "-O", "raw", qs, bs]);
        assert!(std::fs::read(&back).unwrap() == content, "the snapshot still holds the image as it was");
    }

    /// Malformed DISCARD / WRITE_ZEROES requests: IOERR or UNSUPP as the specification says, nothing
    /// changes, the device keeps working.
    #[test]
    fn malformed_discards_fail_cleanly() {
        let image = Image::new("bad-discard", 64);
        let before = image.bytes();
        let mut d = driver(&image, false);
        let (ioerr, unsupp) = (VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(ranges(&mut d, T_DISCARD, &[(0, 8, 2)]), unsupp, "an unknown flag");
        assert_eq!(ranges(&mut d, T_WRITE_ZEROES, &[(0, 8, 0x8000_0001)]), unsupp, "an unknown flag");
        assert_eq!(ranges(&mut d, T_DISCARD, &[(0, 8, 1)]), unsupp, "UNMAP on a DISCARD");
        assert_eq!(ranges(&mut d, T_DISCARD, &[(60, 8, 0)]), ioerr, "past the end");
        assert_eq!(ranges(&mut d, T_WRITE_ZEROES, &[(u64::MAX / 2, 8, 0)]), ioerr, "sector overflow");
        assert_eq!(ranges(&mut d, T_DISCARD, &[(0, MAX_DISCARD_SECTORS + 1, 0)]), ioerr, "too long");
        let many = vec![(0u64, 1u32, 0u32); MAX_DISCARD_SEG as usize + 1];
        assert_eq!(ranges(&mut d, T_DISCARD, &many), ioerr, "too many ranges");
        // Every range is checked first: a good one before a bad one is not carried out.
        assert_eq!(ranges(&mut d, T_WRITE_ZEROES, &[(0, 8, 0), (0, 8, 4)]), unsupp);
        // Not whole ranges; none at all; a device-writable range buffer.
        d.post(2, T_DISCARD, 0, 15);
        d.kick();
        assert_eq!(d.completions(WAIT).len(), 1);
        assert_eq!(d.request_status(2), ioerr, "a partial range");
        assert_eq!(one(&mut d, 2, T_DISCARD, 0, 0), (ioerr, 1), "no range");
        assert_eq!(one(&mut d, 2, T_IN, 0, 512).0, 0);
        d.post(4, T_DISCARD, 0, 16);
        d.write_desc(13, Desc { addr: d.data_address(4).0, len: 16, flags: 2 | 1, next: 14 });
        d.kick();
        assert_eq!(d.completions(WAIT).len(), 1);
        assert_eq!(d.request_status(4), ioerr, "a device-writable range buffer");
        assert_eq!(image.bytes(), before, "nothing changed");
        assert_eq!(d.status() & 0x40, 0, "the device still works");
        drop(d);
        // A read-only drive offers neither and refuses both.
        let mut ro = driver(&image, true);
        assert_eq!(ro.device.device().features() & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(ranges(&mut ro, T_DISCARD, &[(0, 8, 0)]), ioerr);
        assert_eq!(ranges(&mut ro, T_WRITE_ZEROES, &[(0, 8, 0)]), ioerr);
        assert_eq!(image.bytes(), before);
    }

    #[test]
    fn the_configuration_announces_the_discard_limits() {
        let image = Image::new("discard-config", 16);
        let mut d = driver(&image, false);
        let mut cfg = [0u8; 60];
        d.read_config(0, &mut cfg);
        let le32 = |at: usize| u32::from_le_bytes([cfg[at], cfg[at + 1], cfg[at + 2], cfg[at + 3]]);
        assert_eq!((le32(36), le32(40), le32(44)), (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT));
        assert_eq!((le32(48), le32(52), cfg[56]), (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1));
    }
}
