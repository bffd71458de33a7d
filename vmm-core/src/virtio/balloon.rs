//! A virtio memory balloon (virtio 1.x §5.5, device ID 5): the host asks the guest to give back memory
//! (the target), the guest's driver hands pages over on the inflate queue and takes them back on the
//! deflate queue, reports its memory statistics on the stats queue and, with free page reporting, tells
//! the host about free ranges it may drop.
//!
//! Pages the guest inflates and ranges it reports free are given back to the host kernel
//! (`madvise(MADV_DONTNEED)` on guest RAM, a private anonymous mapping: the host's RSS drops, and a later
//! guest access reads zeros). Page frame numbers and ranges are the guest's word: each is checked against
//! guest RAM; those outside are skipped and counted, never acted on. A malformed chain sets NEEDS_RESET of
//! this device only. Each wake-up of the device's thread serves at most [`CHAINS_PER_ROUND`] chains per
//! queue, then comes back, so that one queue cannot hold the others (and the target's changes) up.
//!
//! The queues, numbered as Linux and QEMU do (an absent queue takes no number): 0 inflate, 1 deflate,
//! 2 stats (`VIRTIO_BALLOON_F_STATS_VQ`), 3 free page reporting (`VIRTIO_BALLOON_F_PAGE_REPORTING`; no
//! free page hinting, so no queue for it). `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` is not offered: with it Linux
//! keeps counting ballooned pages in MemTotal and takes them back under memory pressure behind the host's
//! back; without it the guest's MemTotal follows the target, and the host's floor
//! ([`floor_mib`]) keeps the guest from being squeezed below a working size.
//!
//! The target outlives the boots of a VM (a rebooted guest's driver inflates to it again): it lives in
//! [`BalloonShared`], which the VM keeps; each boot builds a [`VirtioBalloon`] on it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt, avail_within_queue};
use crate::devices::bus::lock;

/// virtio-balloon's device ID.
pub const DEVICE_TYPE: u16 = 5;
pub const QUEUE_SIZE: u16 = 128;
const INFLATEQ: usize = 0;
const DEFLATEQ: usize = 1;
/// The stats and reporting queues' numbers when the driver takes both features (an absent queue takes no
/// number: with reporting alone, it is queue 2).
const STATSQ: usize = 2;
const REPORTQ: usize = 3;
const QUEUES: usize = 4;
/// Most page-number bytes one chain may carry (Linux sends 256 page numbers, 1 KiB, at a time).
pub const MAX_PFN_BYTES: u64 = 64 << 10;
/// Feature bits (virtio 1.2 §5.5.3).
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// The balloon's page: page frame numbers count 4 KiB pages whatever the guest's page size.
pub const PAGE: u64 = 4096;
/// Chains served per queue per wake-up of the thread.
pub const CHAINS_PER_ROUND: usize = 32;
/// How often the guest is asked for fresh statistics (by giving its stats buffer back).
pub const STATS_PERIOD: Duration = Duration::from_secs(2);
/// Statistics entries read from one buffer (Linux sends 10 to 16).
const MAX_STATS: usize = 64;
/// Smallest guest memory a target may leave, in MiB (see [`floor_mib`]).
pub const FLOOR_MIN_MIB: u64 = 128;

/// The least guest memory (MiB) the host may balloon a VM of `memory_mib` down to: 10% of its memory,
/// at least [`FLOOR_MIN_MIB`], at most all of it (a VM smaller than that cannot be ballooned).
pub fn floor_mib(memory_mib: u64) -> u64 {
    (memory_mib / 10).max(FLOOR_MIN_MIB).min(memory_mib)
}

/// Statistics tags (virtio 1.2 §5.5.6.3; 10-15 from Linux 6.12).
const STAT_TAGS: usize = 16;

/// The guest's memory statistics, as its driver last sent them (absent: the driver did not say).
/// Page counts are 4 KiB pages since the guest booted; sizes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestMemoryStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Memory the guest does not use at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// The guest's total memory (what is not in the balloon, less what its kernel reserved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// What the guest could give to new work without swapping (Linux's MemAvailable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stalls: Option<u64>,
}

impl GuestMemoryStats {
    fn from_tags(t: &[Option<u64>; STAT_TAGS]) -> Self {
        GuestMemoryStats {
            swap_in_pages: t[0],
            swap_out_pages: t[1],
            major_faults: t[2],
            minor_faults: t[3],
            free_bytes: t[4],
            total_bytes: t[5],
            available_bytes: t[6],
            disk_caches_bytes: t[7],
            hugetlb_allocations: t[8],
            hugetlb_failures: t[9],
            oom_kills: t[10],
            alloc_stalls: t[11],
        }
    }
}

/// The balloon as the control socket reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonStatus {
    /// Guest memory the host asks for (the VM's memory less the balloon's target), MiB.
    pub target_mib: u64,
    /// Guest memory outside the balloon now (the VM's memory less the pages the guest has given), MiB.
    pub actual_mib: u64,
    /// The least target accepted ([`floor_mib`]).
    pub floor_mib: u64,
    /// The VM's memory (the most a target may be).
    pub memory_mib: u64,
    /// Whether the guest's balloon driver is up.
    pub driver: bool,
    /// Whether the driver reports free pages (the host drops them).
    pub free_page_reporting: bool,
    /// The guest's last statistics (absent until its driver sends some).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestMemoryStats>,
    /// Milliseconds since those statistics came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_age_ms: Option<u64>,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "a balloon target of {target} MiB is below this VM's floor of {floor} MiB (10% of its {memory} MiB, at \
         least {FLOOR_MIN_MIB} MiB); the VM is unchanged"
    )]
    BelowFloor { target: u64, floor: u64, memory: u64 },
    #[error("a balloon target of {target} MiB is above this VM's memory of {memory} MiB; the VM is unchanged")]
    AboveMemory { target: u64, memory: u64 },
}

/// Counters of the balloon over the VM's life.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// 4 KiB pages the guest put in the balloon (given back to the host).
    pub inflated_pages: AtomicU64,
    /// 4 KiB pages the guest took back.
    pub deflated_pages: AtomicU64,
    /// 4 KiB pages the guest reported free (given back to the host).
    pub reported_pages: AtomicU64,
    /// Page numbers or reported ranges outside guest RAM (skipped).
    pub invalid_pages: AtomicU64,
    /// Malformed chains (each breaks the device until the driver resets it).
    pub malformed: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
}

/// What the guest last said.
#[derive(Default)]
struct Reported {
    /// Pages in the balloon (`actual`, written by the driver).
    actual: u32,
    driver: bool,
    reporting: bool,
    stats: Option<([Option<u64>; STAT_TAGS], Instant)>,
}

/// The balloon of one VM, across its boots: the target and what the guest reported.
pub struct BalloonShared {
    memory_mib: u64,
    /// Pages the host wants in the balloon (`num_pages`).
    target: AtomicU32,
    /// Bumped at every change of the target (the configuration generation).
    generation: AtomicU32,
    reported: Mutex<Reported>,
    /// The current boot's device interrupt (for the configuration-change interrupt).
    interrupt: Mutex<Option<Arc<VirtioInterrupt>>>,
    pub counters: BalloonCounters,
}

impl BalloonShared {
    /// The balloon of a VM with `memory_mib` of RAM, empty.
    pub fn new(memory_mib: u64) -> Arc<Self> {
        Arc::new(BalloonShared {
            memory_mib,
            target: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            reported: Mutex::new(Reported::default()),
            interrupt: Mutex::new(None),
            counters: BalloonCounters::default(),
        })
    }

    /// Asks the guest to keep `target_mib` of memory (the rest goes in the balloon); refused, changing
    /// nothing, below [`floor_mib`] or above the VM's memory. The guest's driver is told at once when it
    /// is up, else when it comes up.
    pub fn set_target_mib(&self, target_mib: u64) -> Result<BalloonStatus, TargetError> {
        let (memory, floor) = (self.memory_mib, floor_mib(self.memory_mib));
        if target_mib > memory {
            return Err(TargetError::AboveMemory { target: target_mib, memory });
        }
        if target_mib < floor {
            return Err(TargetError::BelowFloor { target: target_mib, floor, memory });
        }
        let pages = (memory - target_mib) * ((1 << 20) / PAGE);
        let pages = u32::try_from(pages).unwrap_or(u32::MAX);
        if self.target.swap(pages, Ordering::AcqRel) != pages {
            self.generation.fetch_add(1, Ordering::AcqRel);
            if let Some(interrupt) = lock(&self.interrupt).as_ref() {
                interrupt.signal_config();
            }
        }
        Ok(self.status())
    }

    /// The target, as guest memory in MiB.
    pub fn target_mib(&self) -> u64 {
        self.memory_mib - pages_to_mib_up(self.target.load(Ordering::Acquire))
    }

    pub fn status(&self) -> BalloonStatus {
        let r = lock(&self.reported);
        BalloonStatus {
            target_mib: self.target_mib(),
            actual_mib: self.memory_mib.saturating_sub(pages_to_mib_up(r.actual)),
            floor_mib: floor_mib(self.memory_mib),
            memory_mib: self.memory_mib,
            driver: r.driver,
            free_page_reporting: r.reporting,
            stats: r.stats.as_ref().map(|(t, _)| GuestMemoryStats::from_tags(t)),
            stats_age_ms: r.stats.as_ref().map(|(_, at)| at.elapsed().as_millis() as u64),
        }
    }
}

/// MiB holding `pages` 4 KiB pages, rounded up (memory outside the balloon rounds down).
fn pages_to_mib_up(pages: u32) -> u64 {
    u64::from(pages).div_ceil((1 << 20) / PAGE)
}

/// The queues while the driver is up.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Which queue the driver uses for statistics and for free page reporting (by the features it took).
    statsq: Option<usize>,
    reportq: Option<usize>,
    /// The stats buffer the device holds (its head); given back to ask for fresh statistics.
    stats_held: Option<u16>,
    /// When the statistics were last asked for.
    stats_asked: Instant,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Serving stopped while a machine state is saved.
    quiesced: bool,
}

/// The device's side that its thread runs on.
struct Inner {
    shared: Arc<BalloonShared>,
    interrupt: Arc<VirtioInterrupt>,
    state: Mutex<State>,
    kicks: [EventFd; QUEUES],
    /// Wakes the thread: activation, resume, shutdown, and itself when a queue has more work.
    wake: EventFd,
    shutdown: AtomicBool,
}

/// Why a chain was refused.
#[derive(Debug)]
enum Malformed {
    /// The avail index ran more than a queue's worth ahead.
    AvailJump,
    /// A page-number buffer the device may write, not a whole number of page numbers, or longer than
    /// [`MAX_PFN_BYTES`].
    BadPfnBuffer,
    /// A statistics buffer the device may write, or not a whole number of entries.
    BadStatsBuffer,
    /// A descriptor outside guest memory, or the used ring.
    OutsideMemory,
}

impl Inner {
    /// Serves up to [`CHAINS_PER_ROUND`] chains of every queue; true if some queue has more.
    fn serve(&self, state: &mut State) -> bool {
        if state.quiesced {
            return false;
        }
        let Some(a) = state.active.as_mut() else { return false };
        let mut more = false;
        let mut result = Ok(());
        for q in [Some(INFLATEQ), Some(DEFLATEQ), a.reportq].into_iter().flatten() {
            match self.serve_pages(a, q) {
                Ok(m) => more |= m,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.take_stats(a);
        }
        if let Err(e) = result {
            self.malformed(state, e);
            return false;
        }
        more
    }

    /// Inflate, deflate or free page reporting chains of queue `q`; true if more wait.
    fn serve_pages(&self, a: &mut Active, q: usize) -> Result<bool, Malformed> {
        let report = a.reportq == Some(q);
        let Active { mem, queues, .. } = a;
        let Some(queue) = queues.get_mut(q).filter(|q| q.ready()) else { return Ok(false) };
        let mut used = false;
        let mut served = 0;
        let result = (|| -> Result<bool, Malformed> {
            while served < CHAINS_PER_ROUND {
                if !avail_within_queue(queue, mem) {
                    return Err(Malformed::AvailJump);
                }
                let Some(chain) = queue.pop_descriptor_chain(&*mem) else { return Ok(false) };
                let head = chain.head_index();
                let mut pfn_bytes = 0u64;
                for d in chain.into_iter().take(usize::from(QUEUE_SIZE)) {
                    if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
                        return Err(Malformed::OutsideMemory);
                    }
                    if report {
                        // Linux posts the ranges as device-writable buffers; either way is fine.
                        self.report_free(mem, d.addr().0, u64::from(d.len()));
                    } else {
                        pfn_bytes += u64::from(d.len());
                        if d.is_write_only() || d.len() % 4 != 0 || pfn_bytes > MAX_PFN_BYTES {
                            return Err(Malformed::BadPfnBuffer);
                        }
                        self.pfns(mem, d.addr(), d.len(), q == INFLATEQ)?;
                    }
                }
                queue.add_used(&*mem, head, 0).map_err(|_| Malformed::OutsideMemory)?;
                used = true;
                served += 1;
            }
            Ok(queue.avail_idx(&*mem, Ordering::Acquire).is_ok_and(|avail| avail.0 != queue.next_avail()))
        })();
        if used && queue.needs_notification(&*mem).unwrap_or(true) {
            self.interrupt.signal_queue(q);
        }
        result
    }

    /// The page frame numbers (le32) of a buffer: inflated pages go back to the host, deflated ones are
    /// counted (the guest simply uses them again).
    fn pfns(&self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u32, inflate: bool) -> Result<(), Malformed> {
        let c = &self.shared.counters;
        let mut buf = [0u8; 1024];
        let mut done = 0u64;
        // A run of consecutive pages, given back at once: (first guest address, pages).
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: &mut Option<(u64, u64)>| {
            if let Some((start, pages)) = run.take() {
                discard(mem, start, pages * PAGE);
            }
        };
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(buf.len() as u64) as usize;
            let at = addr.checked_add(done).ok_or(Malformed::OutsideMemory)?;
            mem.read_slice(&mut buf[..n], at).map_err(|_| Malformed::OutsideMemory)?;
            for p in buf[..n].chunks_exact(4) {
                let gpa = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]])) * PAGE;
                if !in_ram(mem, gpa, PAGE) {
                    let first = c.invalid_pages.fetch_add(1, Ordering::Relaxed) == 0;
                    if first {
                        log::warn!("balloon: the guest named page {:#x}, outside its RAM; skipped", gpa / PAGE);
                    }
                    continue;
                }
                if inflate {
                    c.inflated_pages.fetch_add(1, Ordering::Relaxed);
                    run = match run {
                        Some((start, pages))
                            if start + pages * PAGE == gpa && in_ram(mem, start, (pages + 1) * PAGE) =>
                        {
                            Some((start, pages + 1))
                        }
                        other => {
                            let mut other = other;
                            flush(&mut other);
                            Some((gpa, 1))
                        }
                    };
                } else {
                    c.deflated_pages.fetch_add(1, Ordering::Relaxed);
                }
            }
            done += n as u64;
        }
        flush(&mut run);
        Ok(())
    }

    /// A free range the guest reported: its whole pages inside guest RAM go back to the host.
    fn report_free(&self, mem: &GuestMemoryMmap, addr: u64, len: u64) {
        let start = addr.next_multiple_of(PAGE);
        let end = addr.saturating_add(len) / PAGE * PAGE;
        if end <= start || !in_ram(mem, start, end - start) {
            self.shared.counters.invalid_pages.fetch_add(1, Ordering::Relaxed);
            return;
        }
        discard(mem, start, end - start);
        self.shared.counters.reported_pages.fetch_add((end - start) / PAGE, Ordering::Relaxed);
    }

    /// Takes a statistics buffer the driver posted: reads it and holds it until fresh statistics are
    /// wanted.
    fn take_stats(&self, a: &mut Active) -> Result<(), Malformed> {
        let Some(statsq) = a.statsq else { return Ok(()) };
        let Active { mem, queues, stats_held, .. } = a;
        let Some(queue) = queues.get_mut(statsq).filter(|q| q.ready()) else { return Ok(()) };
        let mut served = 0;
        while served < CHAINS_PER_ROUND {
            if !avail_within_queue(queue, mem) {
                return Err(Malformed::AvailJump);
            }
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else { return Ok(()) };
            served += 1;
            // A second buffer while one is held: the older one goes back.
            if let Some(old) = stats_held.take() {
                queue.add_used(&*mem, old, 0).map_err(|_| Malformed::OutsideMemory)?;
                self.interrupt.signal_queue(statsq);
            }
            let head = chain.head_index();
            let mut tags = [None; STAT_TAGS];
            let mut entries = 0;
            for d in chain.into_iter().take(usize::from(QUEUE_SIZE)) {
                if d.is_write_only() || d.len() % 10 != 0 {
                    return Err(Malformed::BadStatsBuffer);
                }
                let mut e = [0u8; 10];
                for i in 0..u64::from(d.len() / 10) {
                    if entries == MAX_STATS {
                        break;
                    }
                    let at = d.addr().checked_add(i * 10).ok_or(Malformed::OutsideMemory)?;
                    mem.read_slice(&mut e, at).map_err(|_| Malformed::OutsideMemory)?;
                    entries += 1;
                    let tag = usize::from(u16::from_le_bytes([e[0], e[1]]));
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&e[2..10]);
                    if let Some(slot) = tags.get_mut(tag) {
                        *slot = Some(u64::from_le_bytes(v));
                    }
                }
            }
            *stats_held = Some(head);
            self.shared.counters.stats_updates.fetch_add(1, Ordering::Relaxed);
            lock(&self.shared.reported).stats = Some((tags, Instant::now()));
        }
        Ok(())
    }

    /// Gives the held statistics buffer back when fresh statistics are due; the time until the next
    /// request otherwise (None: nothing held).
    fn ask_stats(&self, state: &mut State) -> Option<Duration> {
        if state.quiesced {
            return None;
        }
        let a = state.active.as_mut()?;
        let head = a.stats_held?;
        let left = STATS_PERIOD.saturating_sub(a.stats_asked.elapsed());
        if !left.is_zero() {
            return Some(left);
        }
        let statsq = a.statsq?;
        let queue = a.queues.get_mut(statsq)?;
        a.stats_held = None;
        a.stats_asked = Instant::now();
        if queue.add_used(&a.mem, head, 0).is_err() {
            self.malformed(state, Malformed::OutsideMemory);
            return None;
        }
        self.interrupt.signal_queue(statsq);
        None
    }

    /// Counts a driver error and breaks the device until the driver resets it.
    fn malformed(&self, state: &mut State, what: Malformed) {
        let first = self.shared.counters.malformed.fetch_add(1, Ordering::Relaxed) == 0;
        let level = if first { log::Level::Warn } else { log::Level::Debug };
        log::log!(
            level,
            "balloon: malformed descriptor chain ({what:?}); the device needs a reset (guest driver error)"
        );
        state.active = None;
        lock(&self.shared.reported).driver = false;
        self.interrupt.mark_needs_reset();
    }

    fn thread(&self) {
        const WAKE: u64 = QUEUES as u64;
        let Ok(epoll) = Epoll::new() else {
            log::error!("balloon: cannot create its thread's epoll; the balloon stays idle");
            return;
        };
        let fds = self.kicks.iter().chain([&self.wake]).enumerate();
        for (token, fd) in fds {
            let event = EpollEvent::new(EventSet::IN, token as u64);
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), event) {
                log::error!("balloon: cannot watch a descriptor ({e}); the balloon stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); QUEUES + 1];
        let mut timeout: Option<Duration> = None;
        while !self.shutdown.load(Ordering::Acquire) {
            let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
            let n = match epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("balloon: its thread cannot wait ({e}); the balloon stays idle");
                    return;
                }
            };
            for e in &events[..n] {
                let fd = if e.data() == WAKE { &self.wake } else { &self.kicks[e.data() as usize % QUEUES] };
                let _ = fd.read();
            }
            let mut state = lock(&self.state);
            if self.serve(&mut state) {
                // More than a round's worth: come back after the others had their turn.
                let _ = self.wake.write(1);
            }
            timeout = self.ask_stats(&mut state);
        }
    }
}

/// Whether `[gpa, gpa + len)` lies in one region of guest RAM.
fn in_ram(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    let Some(region) = mem.find_region(GuestAddress(gpa)) else { return false };
    gpa.checked_add(len).is_some_and(|end| end <= region.start_addr().0 + region.len())
}

/// Gives `[gpa, gpa + len)` of guest RAM (checked by [`in_ram`], page-aligned) back to the host kernel.
fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) {
    let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else { return };
    // SAFETY: the range lies inside one guest RAM region (a private anonymous mapping that outlives the
    // device); the guest gave these pages up, and afterwards they read as zeros, which is all it may expect.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        log::debug!("balloon: madvise of {len} bytes at {gpa:#x}: {}", std::io::Error::last_os_error());
    }
}

/// The balloon on the PCI transport (one per boot).
pub struct VirtioBalloon {
    inner: Arc<Inner>,
    max_sizes: [u16; QUEUES],
    thread: Option<JoinHandle<()>>,
}

impl VirtioBalloon {
    /// A balloon on `shared` raising `interrupt`; starts its (idle) thread, which inherits the caller's
    /// seccomp filter.
    pub fn new(shared: Arc<BalloonShared>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        *lock(&shared.interrupt) = Some(interrupt.clone());
        *lock(&shared.reported) = Reported::default();
        let inner = Arc::new(Inner {
            shared,
            interrupt,
            state: Mutex::new(State::default()),
            kicks: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            shutdown: AtomicBool::new(false),
        });
        let i = inner.clone();
        let thread = std::thread::Builder::new().name("balloon".into()).spawn(move || i.thread())?;
        Ok(VirtioBalloon { inner, max_sizes: [QUEUE_SIZE; QUEUES], thread: Some(thread) })
    }
}

impl VirtioDevice for VirtioBalloon {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        F_STATS_VQ | F_PAGE_REPORTING
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        &self.inner.kicks[index.min(QUEUES - 1)]
    }

    /// num_pages (le32, the host's target), actual (le32, the driver's), free_page_hint_cmd_id and
    /// poison_val (features not offered: zero).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&self.inner.shared.target.load(Ordering::Acquire).to_le_bytes());
        config[4..8].copy_from_slice(&lock(&self.inner.shared.reported).actual.to_le_bytes());
        let start = offset as usize;
        match config.get(start..start.saturating_add(data.len())) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut r = lock(&self.inner.shared.reported);
        let mut actual = r.actual.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let slot = offset.checked_add(i as u64).and_then(|o| o.checked_sub(4));
            if let Some(byte) = slot.and_then(|s| actual.get_mut(usize::try_from(s).ok()?)) {
                *byte = b;
            }
        }
        r.actual = u32::from_le_bytes(actual);
    }

    fn config_generation(&self) -> u32 {
        self.inner.shared.generation.load(Ordering::Acquire)
    }

    fn activate(&mut self, activation: Activation) {
        if activation.queues.len() != QUEUES {
            return;
        }
        {
            let mut r = lock(&self.inner.shared.reported);
            r.driver = true;
            r.reporting = activation.driver_features & F_PAGE_REPORTING != 0;
        }
        let features = activation.driver_features;
        let statsq = (features & F_STATS_VQ != 0).then_some(STATSQ);
        let reportq = (features & F_PAGE_REPORTING != 0).then_some(if statsq.is_some() { REPORTQ } else { STATSQ });
        let mut state = lock(&self.inner.state);
        state.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            statsq,
            reportq,
            stats_held: None,
            stats_asked: Instant::now(),
        });
        state.quiesced = false;
        drop(state);
        let _ = self.inner.wake.write(1);
    }

    /// The driver lets go of every page: the balloon is empty until it inflates again.
    fn reset(&mut self) {
        let mut state = lock(&self.inner.state);
        state.active = None;
        state.quiesced = false;
        drop(state);
        *lock(&self.inner.shared.reported) = Reported::default();
    }

    /// Chains are served holding the state lock, so taking it waits for one in progress.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.inner.state);
        state.quiesced = true;
        let Some(a) = state.active.as_ref() else { return Ok(Vec::new()) };
        Ok(a.queues.iter().map(|q| q.state()).collect())
    }

    fn resume_requests(&mut self) {
        lock(&self.inner.state).quiesced = false;
        let _ = self.inner.wake.write(1);
    }

    /// The target, what the driver reported (actual, statistics) and the statistics buffer held.
    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.inner.state);
        let r = lock(&self.inner.shared.reported);
        w.u32(self.inner.shared.target.load(Ordering::Acquire));
        w.u32(r.actual);
        w.bool(r.reporting);
        let held = state.active.as_ref().and_then(|a| a.stats_held);
        w.bool(held.is_some());
        w.u16(held.unwrap_or(0));
        let tags = r.stats.as_ref().map(|(t, _)| *t).unwrap_or_default();
        w.bool(r.stats.is_some());
        for t in tags {
            w.bool(t.is_some());
            w.u64(t.unwrap_or(0));
        }
    }

    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (target, actual, reporting) = (r.u32()?, r.u32()?, r.bool()?);
        let (has_held, held) = (r.bool()?, r.u16()?);
        let has_stats = r.bool()?;
        let mut tags = [None; STAT_TAGS];
        for t in &mut tags {
            let (some, v) = (r.bool()?, r.u64()?);
            *t = some.then_some(v);
        }
        if has_held && held >= QUEUE_SIZE {
            return Err(crate::snapshot::StateError::Damaged(format!("a balloon holding stats buffer {held}")));
        }
        let shared = &self.inner.shared;
        let max = shared.memory_mib * ((1 << 20) / PAGE);
        if u64::from(target) > max {
            return Err(crate::snapshot::StateError::Damaged(format!(
                "a balloon target of {target} pages in a VM of {} MiB",
                shared.memory_mib
            )));
        }
        shared.target.store(target, Ordering::Release);
        shared.generation.fetch_add(1, Ordering::AcqRel);
        {
            let mut rep = lock(&shared.reported);
            rep.actual = actual;
            rep.reporting = reporting;
            rep.stats = has_stats.then(|| (tags, Instant::now()));
        }
        let mut state = lock(&self.inner.state);
        if let Some(a) = state.active.as_mut() {
            a.stats_held = has_held.then_some(held);
        }
        drop(state);
        // The thread may have looked (at activation) before the held buffer was known: it looks again and
        // sets its timer for the next statistics request.
        let _ = self.inner.wake.write(1);
        Ok(())
    }
}

impl Drop for VirtioBalloon {
    fn drop(&mut self) {
        lock(&self.inner.state).active = None;
        {
            let mut current = lock(&self.inner.shared.interrupt);
            if current.as_ref().is_some_and(|i| Arc::ptr_eq(i, &self.inner.interrupt)) {
                *current = None;
            }
        }
        lock(&self.inner.shared.reported).driver = false;
        self.inner.shutdown.store(true, Ordering::Release);
        let _ = self.inner.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::VIRTIO_CONFIG_S_NEEDS_RESET;
    use crate::virtio::host_driver::{DESC_F_NEXT, DESC_F_WRITE, Desc, HostDriver};

    /// Driver buffers (page numbers, statistics) from here; guest pages to balloon from 1 MiB.
    const BUFFERS: u64 = 0x2_0000;
    const RAM: usize = 8 << 20;
    const WAIT: Duration = Duration::from_secs(10);

    fn balloon(memory_mib: u64) -> (HostDriver<VirtioBalloon>, Arc<BalloonShared>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let shared = BalloonShared::new(memory_mib);
        let device = VirtioBalloon::new(shared.clone(), interrupt.clone()).unwrap();
        (HostDriver::new(device, interrupt, mem, &[QUEUE_SIZE; QUEUES]), shared)
    }

    /// Writes the page numbers at BUFFERS and posts them on `queue` as descriptor 0.
    fn post_pfns(d: &mut HostDriver<VirtioBalloon>, queue: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        d.mem.write_slice(&bytes, GuestAddress(BUFFERS)).unwrap();
        d.write_desc(queue, 0, Desc { addr: BUFFERS, len: bytes.len() as u32, flags: 0, next: 0 });
        d.publish(queue, 0, 1);
    }

    /// Fills guest pages `first..first + n` with a pattern (the host backs them).
    fn touch(d: &HostDriver<VirtioBalloon>, first: u64, n: u64) {
        d.mem.write_slice(&vec![0xA5u8; (n * PAGE) as usize], GuestAddress(first * PAGE)).unwrap();
    }

    /// How many of guest pages `first..first + n` the host has in memory (mincore).
    fn resident(d: &HostDriver<VirtioBalloon>, first: u64, n: u64) -> usize {
        let host = d.mem.get_host_address(GuestAddress(first * PAGE)).unwrap();
        let mut vec = vec![0u8; n as usize];
        // SAFETY: the range is mapped guest memory; `vec` has a byte per page.
        assert_eq!(unsafe { libc::mincore(host.cast(), (n * PAGE) as usize, vec.as_mut_ptr()) }, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn page_is_zero(d: &HostDriver<VirtioBalloon>, pfn: u64) -> bool {
        let mut b = vec![0u8; PAGE as usize];
        d.mem.read_slice(&mut b, GuestAddress(pfn * PAGE)).unwrap();
        b.iter().all(|&x| x == 0)
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn the_target_has_a_floor_and_a_ceiling_and_reaches_the_driver_with_a_configuration_interrupt() {
        assert_eq!((floor_mib(512), floor_mib(4096), floor_mib(64)), (128, 409, 64));
        let (mut d, shared) = balloon(512);
        assert_eq!(d.read_isr(), 0);
        let below = shared.set_target_mib(100).unwrap_err();
        assert_eq!(below, TargetError::BelowFloor { target: 100, floor: 128, memory: 512 });
        assert!(below.to_string().contains("floor of 128 MiB"), "{below}");
        assert_eq!(shared.set_target_mib(513).unwrap_err(), TargetError::AboveMemory { target: 513, memory: 512 });
        let mut config = [0u8; 8];
        d.read_config(0, &mut config);
        assert_eq!(config, [0; 8], "refused targets change nothing");
        assert_eq!(d.read_isr(), 0);

        let status = shared.set_target_mib(384).unwrap();
        assert_eq!((status.target_mib, status.actual_mib, status.floor_mib), (384, 512, 128));
        d.read_config(0, &mut config);
        assert_eq!(u32::from_le_bytes(config[0..4].try_into().unwrap()), 128 * 256, "num_pages");
        assert_eq!(d.read_isr() & 2, 2, "configuration change");
        // The driver says how far it got.
        d.write_config(4, &(100u32 * 256).to_le_bytes());
        assert_eq!(shared.status().actual_mib, 412);
        d.write_config(4, &(128u32 * 256).to_le_bytes());
        let status = shared.status();
        assert_eq!((status.actual_mib, status.driver), (384, true));
        // The floor itself is allowed; so is all of the memory (an empty balloon).
        assert_eq!(shared.set_target_mib(128).unwrap().target_mib, 128);
        assert_eq!(shared.set_target_mib(512).unwrap().target_mib, 512);
        d.read_config(0, &mut config[..4]);
        assert_eq!(config[..4], [0; 4]);
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_pages_outside_ram_are_skipped() {
        let (mut d, shared) = balloon(512);
        let (first, n) = (0x100u64, 64u64);
        touch(&d, first, n);
        assert_eq!(resident(&d, first, n), n as usize);
        // 64 pages in two runs, one page far outside RAM, one just past its end.
        let mut pfns: Vec<u32> = (first as u32..(first + 32) as u32).collect();
        pfns.push(0xFFFF_FFFF);
        pfns.extend((first + 32) as u32..(first + n) as u32);
        pfns.push((RAM as u64 / PAGE) as u32);
        post_pfns(&mut d, INFLATEQ, &pfns);
        assert_eq!(d.completions(INFLATEQ, WAIT), [(0, 0)]);
        let c = &shared.counters;
        assert_eq!((count(&c.inflated_pages), count(&c.invalid_pages)), (n, 2));
        assert_eq!(resident(&d, first, n), 0, "the host dropped every inflated page");
        assert!((first..first + n).all(|p| page_is_zero(&d, p)));
        // Deflated pages are the guest's again: counted, nothing else.
        touch(&d, first, 4);
        post_pfns(&mut d, DEFLATEQ, &[first as u32, first as u32 + 1, first as u32 + 2, first as u32 + 3]);
        assert_eq!(d.completions(DEFLATEQ, WAIT), [(0, 0)]);
        assert_eq!(count(&c.deflated_pages), 4);
        assert_eq!(resident(&d, first, 4), 4);
        assert_eq!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
    }

    #[test]
    fn reported_free_ranges_go_back_to_the_host() {
        let (mut d, shared) = balloon(512);
        // Two ranges in one chain, as Linux posts them (device-writable): 1 MiB at 2 MiB, 64 KiB at 4 MiB.
        touch(&d, 0x200, 0x100);
        touch(&d, 0x400, 0x10);
        d.write_desc(REPORTQ, 0, Desc { addr: 0x20_0000, len: 0x10_0000, flags: DESC_F_WRITE | DESC_F_NEXT, next: 1 });
        d.write_desc(REPORTQ, 1, Desc { addr: 0x40_0000, len: 0x1_0000, flags: DESC_F_WRITE, next: 0 });
        d.publish(REPORTQ, 0, 1);
        assert_eq!(d.completions(REPORTQ, WAIT), [(0, 0)]);
        assert_eq!(count(&shared.counters.reported_pages), 0x110);
        assert_eq!(resident(&d, 0x200, 0x100) + resident(&d, 0x400, 0x10), 0);
        assert!(page_is_zero(&d, 0x2FF) && page_is_zero(&d, 0x40F));
    }

    #[test]
    fn statistics_are_kept_and_asked_for_again() {
        let (mut d, shared) = balloon(512);
        assert!(shared.status().stats.is_none());
        let post = |d: &mut HostDriver<VirtioBalloon>, free: u64| {
            let mut b = Vec::new();
            for (tag, v) in [(4u16, free), (5, 500 << 20), (6, 300 << 20), (3, 1234), (99, 7)] {
                b.extend_from_slice(&tag.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            d.mem.write_slice(&b, GuestAddress(BUFFERS)).unwrap();
            d.write_desc(STATSQ, 0, Desc { addr: BUFFERS, len: b.len() as u32, flags: 0, next: 0 });
            d.publish(STATSQ, 0, 1);
        };
        post(&mut d, 100 << 20);
        // The device holds the buffer; it comes back (a request for fresh statistics) after STATS_PERIOD.
        assert_eq!(d.completions(STATSQ, WAIT), [(0, 0)]);
        let stats = shared.status().stats.unwrap();
        assert_eq!(stats.free_bytes, Some(100 << 20));
        assert_eq!((stats.total_bytes, stats.available_bytes), (Some(500 << 20), Some(300 << 20)));
        assert_eq!((stats.minor_faults, stats.swap_in_pages), (Some(1234), None));
        post(&mut d, 50 << 20);
        assert_eq!(d.completions(STATSQ, WAIT), [(0, 0)]);
        assert_eq!(shared.status().stats.unwrap().free_bytes, Some(50 << 20));
        assert_eq!(count(&shared.counters.stats_updates), 2);
    }

    /// Each hostile chain breaks this device only, until the driver resets it; a reset brings a working
    /// balloon.
    #[test]
    fn malformed_chains_need_a_reset_and_a_reset_brings_the_balloon_back() {
        let (mut d, shared) = balloon(512);
        let cases: [(usize, Desc); 6] = [
            // A page-number buffer the device may write.
            (INFLATEQ, Desc { addr: BUFFERS, len: 8, flags: DESC_F_WRITE, next: 0 }),
            // More page numbers in one chain than the bound of work per chain.
            (INFLATEQ, Desc { addr: 0x10_0000, len: MAX_PFN_BYTES as u32 + 4, flags: 0, next: 0 }),
            // Not a whole number of page numbers.
            (DEFLATEQ, Desc { addr: BUFFERS, len: 6, flags: 0, next: 0 }),
            // Outside guest memory.
            (INFLATEQ, Desc { addr: RAM as u64 - 4, len: 8, flags: 0, next: 0 }),
            (REPORTQ, Desc { addr: 0x7F_0000, len: 0x2_0000, flags: DESC_F_WRITE, next: 0 }),
            // Statistics that are not whole entries.
            (STATSQ, Desc { addr: BUFFERS, len: 15, flags: 0, next: 0 }),
        ];
        for (i, (queue, desc)) in cases.into_iter().enumerate() {
            d.write_desc(queue, 0, desc);
            d.publish(queue, 0, 1);
            let deadline = Instant::now() + WAIT;
            while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0, "case {i}: {desc:?}");
            assert_eq!(count(&shared.counters.malformed), i as u64 + 1);
            assert!(!shared.status().driver);
            d.init();
        }
        // An avail index far ahead.
        d.write_desc(INFLATEQ, 0, Desc { addr: BUFFERS, len: 4, flags: 0, next: 0 });
        d.publish(INFLATEQ, 0, 1000);
        let deadline = Instant::now() + WAIT;
        while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        d.init();
        touch(&d, 0x300, 1);
        post_pfns(&mut d, INFLATEQ, &[0x300]);
        assert_eq!(d.completions(INFLATEQ, WAIT), [(0, 0)]);
        assert!(page_is_zero(&d, 0x300));
        assert!(shared.status().driver);
    }

    /// A long queue is served in rounds: every chain completes, none is lost between rounds.
    #[test]
    fn a_full_queue_is_served_in_rounds() {
        let (mut d, shared) = balloon(512);
        touch(&d, 0x100, u64::from(QUEUE_SIZE));
        for i in 0..QUEUE_SIZE {
            let at = BUFFERS + 4 * u64::from(i);
            d.mem.write_obj(0x100u32 + u32::from(i), GuestAddress(at)).unwrap();
            d.write_desc(INFLATEQ, i, Desc { addr: at, len: 4, flags: 0, next: 0 });
            d.push_avail(INFLATEQ, i);
        }
        d.kick(INFLATEQ);
        let mut done = 0;
        let deadline = Instant::now() + WAIT;
        while done < usize::from(QUEUE_SIZE) && Instant::now() < deadline {
            done += d.completions(INFLATEQ, WAIT).len();
        }
        assert_eq!(done, usize::from(QUEUE_SIZE));
        assert_eq!(count(&shared.counters.inflated_pages), u64::from(QUEUE_SIZE));
        assert_eq!(resident(&d, 0x100, u64::from(QUEUE_SIZE)), 0);
    }

    /// A saved balloon, loaded into a new device: the target, what the driver reported and the stats
    /// buffer it holds carry over.
    #[test]
    fn the_target_and_the_held_statistics_buffer_survive_a_machine_state() {
        use crate::pci::PciDevice;
        let (mut d, shared) = balloon(512);
        shared.set_target_mib(256).unwrap();
        d.write_config(4, &(256u32 * 256).to_le_bytes());
        let mut b = Vec::new();
        b.extend_from_slice(&6u16.to_le_bytes());
        b.extend_from_slice(&(42u64 << 20).to_le_bytes());
        d.mem.write_slice(&b, GuestAddress(BUFFERS)).unwrap();
        d.write_desc(STATSQ, 0, Desc { addr: BUFFERS, len: 10, flags: 0, next: 0 });
        d.publish(STATSQ, 0, 1);
        let deadline = Instant::now() + WAIT;
        while shared.status().stats.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();

        let shared2 = BalloonShared::new(512);
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let balloon = VirtioBalloon::new(shared2.clone(), interrupt.clone()).unwrap();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(balloon, 0xC000_0000, 16, interrupt, d.mem.clone(), None, None).unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        fresh.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        d.device = fresh;
        let status = shared2.status();
        assert_eq!((status.target_mib, status.actual_mib, status.driver), (256, 256, true));
        assert_eq!(status.stats.unwrap().available_bytes, Some(42 << 20));
        // The held buffer goes back to the driver when fresh statistics are due.
        assert_eq!(d.completions(STATSQ, WAIT), [(0, 0)]);
        touch(&d, 0x180, 1);
        post_pfns(&mut d, INFLATEQ, &[0x180]);
        assert_eq!(d.completions(INFLATEQ, WAIT), [(0, 0)]);
        assert_eq!(resident(&d, 0x180, 1), 0);
    }
}
