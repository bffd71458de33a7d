//! virtio-net (virtio 1.2 §5.1): a receive and a transmit queue, served off the vCPU threads by one I/O
//! thread per card, which moves frames between guest memory and the card's back end ([`crate::net`]).
//!
//! Features: VERSION_1, MAC, STATUS (link up/down from the control socket), MTU, MRG_RXBUF (a frame larger
//! than one receive buffer spans several; their used entries are published together), EVENT_IDX and
//! INDIRECT_DESC; with a back end that carries virtio-net headers (TAP) also checksum and TSO offloads both
//! ways (the TAP device is told which ones the guest took).
//!
//! The guest is untrusted. A broken chain (a loop, a `next` beyond the queue, a receive buffer the device
//! may not write, a transmit buffer it may not read, memory outside the guest's RAM, a frame shorter than
//! its header or longer than [`MAX_FRAME`], an avail index that jumps past the queue) puts the device in
//! NEEDS_RESET until the driver resets it; the VMM goes on. Host memory does not depend on the guest: one
//! frame waits for receive buffers at most (the back end's socket buffers hold the rest); after
//! [`RX_STALL`] without buffers, frames for the guest are dropped and counted.

use smallvec::SmallVec;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt, avail_within_queue};
use crate::devices::bus::lock;
use crate::net::{Backend, MAX_FRAME, Nic, NicListener, VNET_HEADER_LEN};
use crate::rate_limiter::{NicLimiter, Way};

/// Virtio device ID of a network card.
pub const DEVICE_TYPE: u16 = 1;
/// Each queue's largest size.
pub const QUEUE_SIZE: u16 = 256;
/// Queue 0 receives, queue 1 transmits.
const RX: usize = 0;
const TX: usize = 1;
/// How long a frame for the guest waits for receive buffers before frames are dropped.
pub const RX_STALL: Duration = Duration::from_millis(250);
/// Frames moved each way before the thread looks at the other direction.
const BATCH: usize = 64;

/// Why a chain cannot be served at all.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    Unterminated,
    TooLong,
    WrongDirection,
    OutsideMemory,
    TooShort,
    AvailJump,
}

/// A receive chain the device took from the avail ring and holds until a frame fills it.
struct RxChain {
    head: u16,
    /// Linux posts one buffer per chain (MRG_RXBUF) or a header and a body: no allocation for those.
    segments: SmallVec<[(GuestAddress, u32); 2]>,
    capacity: usize,
}

/// The queues while the driver is up.
struct Active {
    rx: Queue,
    tx: Queue,
    mem: GuestMemoryMmap,
    mrg_rxbuf: bool,
    event_idx: bool,
    /// The used index at the last receive interrupt decision (EVENT_IDX).
    rx_signalled: Wrapping<u16>,
    /// Receive chains taken and not yet used.
    rx_held: Vec<RxChain>,
    /// The offload bits the guest accepted (told to the back end once).
    guest_offloads: (bool, bool, bool, bool),
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Bumps on every activation and reset.
    epoch: u64,
    /// Serving stopped while a machine state is saved (frames from the back end are dropped meanwhile).
    quiesced: bool,
}

/// What the I/O thread and the transport share.
struct Shared {
    nic: Arc<Nic>,
    interrupt: Arc<VirtioInterrupt>,
    rx_notify: EventFd,
    tx_notify: EventFd,
    /// Wakes the I/O thread: activation, reset, link changes, shutdown.
    wake: Arc<EventFd>,
    state: Mutex<State>,
    shutdown: AtomicBool,
}

/// A virtio-net device serving one [`Nic`].
pub struct VirtioNet {
    shared: Arc<Shared>,
    max_sizes: [u16; 2],
    thread: Option<JoinHandle<()>>,
}

impl VirtioNet {
    /// A device for `nic`, raising `interrupt`; starts its (idle) I/O thread, which inherits the caller's
    /// seccomp filter.
    pub fn new(nic: Arc<Nic>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        nic.set_listener(Some(NicListener { interrupt: interrupt.clone(), wake: wake.clone() }));
        let shared = Arc::new(Shared {
            nic,
            interrupt,
            rx_notify: EventFd::new(libc::EFD_NONBLOCK)?,
            tx_notify: EventFd::new(libc::EFD_NONBLOCK)?,
            wake,
            state: Mutex::new(State::default()),
            shutdown: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("net-io".into()).spawn(move || s.io_thread())?;
        Ok(VirtioNet { shared, max_sizes: [QUEUE_SIZE; 2], thread: Some(thread) })
    }

    pub fn nic(&self) -> &Arc<Nic> {
        &self.shared.nic
    }

    fn config_bytes(&self) -> [u8; 12] {
        let nic = &self.shared.nic;
        let mut b = [0u8; 12];
        b[0..6].copy_from_slice(&nic.mac.0);
        let status = if nic.link_up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        b[6..8].copy_from_slice(&status.to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        b[10..12].copy_from_slice(&nic.mtu.to_le_bytes());
        b
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.shared.nic.offloads() {
            for bit in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
            ] {
                f |= 1 << bit;
            }
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        if index == RX { &self.shared.rx_notify } else { &self.shared.tx_notify }
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
        // Nothing is writable (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered; the MAC is the VMM's).
    }

    fn activate(&mut self, activation: Activation) {
        let mut queues = activation.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else { return };
        let f = activation.driver_features;
        let has = |bit: u32| f & (1 << bit) != 0;
        {
            let mut state = lock(&self.shared.state);
            state.epoch += 1;
            state.quiesced = false;
            state.active = Some(Active {
                rx,
                tx,
                mem: activation.mem,
                mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
                event_idx: has(VIRTIO_RING_F_EVENT_IDX),
                rx_signalled: Wrapping(0),
                rx_held: Vec::new(),
                guest_offloads: (
                    has(VIRTIO_NET_F_GUEST_CSUM),
                    has(VIRTIO_NET_F_GUEST_TSO4),
                    has(VIRTIO_NET_F_GUEST_TSO6),
                    has(VIRTIO_NET_F_GUEST_ECN),
                ),
            });
        }
        self.shared.nic.driver_ready.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
    }

    fn reset(&mut self) {
        self.shared.stop_serving();
    }

    /// The I/O thread serves holding the state lock, so taking it waits for a batch in progress. Receive
    /// chains taken and not yet used go back to the avail ring (next_avail rewound over them: they were
    /// the last taken), so a restored device takes them again.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.shared.state);
        state.quiesced = true;
        let Some(active) = state.active.as_ref() else { return Ok(Vec::new()) };
        let mut rx = active.rx.state();
        rx.next_avail = rx.next_avail.wrapping_sub(active.rx_held.len() as u16);
        Ok(vec![rx, active.tx.state()])
    }

    fn resume_requests(&mut self) {
        lock(&self.shared.state).quiesced = false;
        let _ = self.shared.wake.write(1);
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.shared.nic.set_listener(None);
        self.shared.stop_serving();
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The I/O thread's view of the back end: which directions wait on it.
struct Io<'a> {
    /// The card's back end (locked for the thread's life; replaced in place, see [`Nic::replace_backend`]).
    backend: &'a mut Option<Box<dyn Backend>>,
    /// A frame for the guest that found no receive buffer (with its header), and since when.
    pending: Vec<u8>,
    has_pending: bool,
    stalled_since: Option<Instant>,
    /// The back end was full: transmit waits until it is writable.
    tx_blocked: bool,
    /// The epoch whose offloads the back end was told.
    offloads_epoch: u64,
    /// Frame staging for transmit (header included).
    staging: Vec<u8>,
    /// The pending frame has been let through by the receive rate limit (it is charged once).
    pending_paid: bool,
    rx_throttle: Throttle,
    tx_throttle: Throttle,
    /// The card's rate limits' buckets (this thread alone takes from them: no lock per frame), and the
    /// generation of the card's limits they were made from.
    limiter: NicLimiter,
    limited: bool,
    limits_seen: u64,
}

/// A direction held back by the card's rate limit: until when, and since when (for the counters).
#[derive(Default)]
struct Throttle {
    until: Option<Instant>,
    since: Option<Instant>,
}

impl Throttle {
    /// Whether the direction still waits (the clock is read only when it waited at all).
    fn holds(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }

    fn hold(&mut self, now: Instant, wait: Duration) {
        self.until = Some(now + wait);
        self.since.get_or_insert(now);
    }

    /// A frame went: the time it waited is counted.
    fn release(&mut self, waited_us: &std::sync::atomic::AtomicU64) {
        self.until = None;
        if let Some(since) = self.since.take() {
            waited_us.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}

impl Shared {
    fn stop_serving(&self) {
        let mut state = lock(&self.state);
        state.active = None;
        state.epoch += 1;
        state.quiesced = false;
        self.nic.driver_ready.store(false, Ordering::Release);
        drop(state);
        let _ = self.wake.write(1);
    }

    /// Counts a driver error and breaks the device; the first of each card is logged as a warning.
    fn malformed(&self, what: Malformed) {
        let first = self.nic.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0;
        let level = if first { log::Level::Warn } else { log::Level::Debug };
        log::log!(
            level,
            "{}: malformed descriptor chain ({what:?}); the device needs a reset (guest driver error)",
            self.nic.id
        );
        self.interrupt.mark_needs_reset();
    }

    fn io_thread(&self) {
        const RX_KICK: u64 = 1;
        const TX_KICK: u64 = 2;
        const WAKE: u64 = 3;
        const BACKEND: u64 = 4;
        const LOG: u64 = 5;
        let mut guard = self.nic.backend();
        let Ok(epoll) = Epoll::new() else {
            log::error!("{}: cannot create the network thread's epoll; the card stays idle", self.nic.id);
            return;
        };
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)).map_err(|e| {
                log::error!("{}: cannot watch a descriptor ({e}); the card stays idle", self.nic.id);
            })
        };
        let fds = [
            (self.rx_notify.as_raw_fd(), RX_KICK),
            (self.tx_notify.as_raw_fd(), TX_KICK),
            (self.wake.as_raw_fd(), WAKE),
        ];
        for (fd, token) in fds {
            if add(fd, EventSet::IN, token).is_err() {
                return;
            }
        }
        self.nic.take_replacement(&mut guard);
        let (mut backend_fd, mut log_fd) = match guard.as_ref() {
            Some(b) => (Some(b.fd()), b.log_fd()),
            None => (None, None),
        };
        let mut interest = EventSet::IN;
        if let Some(fd) = backend_fd
            && add(fd, interest, BACKEND).is_err()
        {
            return;
        }
        if let Some(fd) = log_fd {
            let _ = add(fd, EventSet::IN, LOG);
        }
        let mut io = Io {
            backend: &mut guard,
            pending: Vec::with_capacity(VNET_HEADER_LEN + MAX_FRAME),
            has_pending: false,
            stalled_since: None,
            tx_blocked: false,
            offloads_epoch: 0,
            staging: vec![0; VNET_HEADER_LEN + MAX_FRAME],
            pending_paid: false,
            rx_throttle: Throttle::default(),
            tx_throttle: Throttle::default(),
            limiter: NicLimiter::default(),
            limited: false,
            limits_seen: 0,
        };
        let mut events = [EpollEvent::default(); 8];
        while !self.shutdown.load(Ordering::Acquire) {
            if self.nic.replacement_waits() {
                // A new back end (or none): the old one's descriptors leave the epoll set before it closes.
                for fd in [backend_fd, log_fd].into_iter().flatten() {
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                self.nic.take_replacement(io.backend);
                (backend_fd, log_fd) = match io.backend.as_ref() {
                    Some(b) => (Some(b.fd()), b.log_fd()),
                    None => (None, None),
                };
                io.has_pending = false;
                io.stalled_since = None;
                io.tx_blocked = false;
                io.offloads_epoch = 0;
                interest = EventSet::IN;
                if let Some(fd) = backend_fd
                    && add(fd, interest, BACKEND).is_err()
                {
                    *io.backend = None;
                    backend_fd = None;
                }
                if let Some(fd) = log_fd {
                    let _ = add(fd, EventSet::IN, LOG);
                }
            }
            self.serve(&mut io);
            // What to wait for on the back end: frames unless one already waits; room when a send was cut
            // short or transmit is blocked.
            if let (Some(fd), Some(b)) = (backend_fd, io.backend.as_ref()) {
                let mut want = EventSet::empty();
                if !io.has_pending {
                    want |= EventSet::IN;
                }
                if io.tx_blocked || b.wants_write() {
                    want |= EventSet::OUT;
                }
                if want != interest {
                    let _ = epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, BACKEND));
                    interest = want;
                }
            }
            // Wake for the first of: the receive stall's end, a rate limit's refill.
            let stall_end = io.stalled_since.filter(|_| io.has_pending).map(|since| since + RX_STALL);
            let timeout =
                [stall_end, io.rx_throttle.until, io.tx_throttle.until].into_iter().flatten().min().map_or(-1, |at| {
                    let left = at.saturating_duration_since(Instant::now());
                    // Round up: waking a little early only finds the bucket still short.
                    left.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as i32
                });
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("{}: the network thread cannot wait: {e}", self.nic.id);
                    return;
                }
            };
            for e in &events[..n] {
                match e.data() {
                    RX_KICK => {
                        let _ = self.rx_notify.read();
                    }
                    TX_KICK => {
                        let _ = self.tx_notify.read();
                    }
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    BACKEND if e.event_set().contains(EventSet::OUT) => io.tx_blocked = false,
                    LOG => {
                        if let Some(b) = io.backend.as_mut() {
                            b.drain_log();
                        }
                        if e.event_set().intersects(EventSet::HANG_UP | EventSet::ERROR)
                            && let Some(fd) = log_fd
                        {
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Moves frames both ways until nothing more can move now.
    fn serve(&self, io: &mut Io) {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let epoch = state.epoch;
        let link_up = self.nic.link_up();
        let broken = self.interrupt.needs_reset();
        let quiesced = state.quiesced;
        let active = state.active.as_mut().filter(|_| !broken && !quiesced);
        if let (Some(a), Some(b)) = (active.as_ref(), io.backend.as_mut())
            && io.offloads_epoch != epoch
        {
            let (csum, tso4, tso6, ecn) = a.guest_offloads;
            b.set_guest_offloads(csum, tso4, tso6, ecn);
            io.offloads_epoch = epoch;
        }
        let generation = self.nic.limits_generation();
        if io.limits_seen != generation {
            // New limits (their buckets start full): whatever waited for the old ones is looked at again.
            io.limits_seen = generation;
            let limits = self.nic.limits();
            io.limiter.set(limits, Instant::now());
            io.limited = !limits.is_none();
            io.rx_throttle.until = None;
            io.tx_throttle.until = None;
        }
        let Some(active) = active else {
            // No driver (or a broken one): frames for the guest have nowhere to go.
            io.has_pending = false;
            io.stalled_since = None;
            self.drain_backend(io);
            return;
        };
        // The guest hears of each batch at once (as far as EVENT_IDX lets it ask to): its ACKs must not wait
        // for a whole backlog, or a TCP peer behind passt times out and sends again.
        loop {
            let (sent, tx_more) = self.transmit(io, active, link_up);
            let (received, rx_more) =
                if self.interrupt.needs_reset() { (false, false) } else { self.receive(io, active, link_up) };
            if sent && active.tx.needs_notification(&active.mem).unwrap_or(true) {
                self.interrupt.signal_queue(TX);
            }
            if received && rx_needs_notification(active) {
                self.interrupt.signal_queue(RX);
            }
            if self.interrupt.needs_reset() || (!tx_more && !rx_more) {
                break;
            }
        }
    }

    /// Reads and drops every frame the back end has (counted): nothing can take them.
    fn drain_backend(&self, io: &mut Io) {
        let Some(b) = io.backend.as_mut() else { return };
        loop {
            match b.recv() {
                Ok(Some(_)) => {
                    self.nic.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => return,
                Err(e) => {
                    self.backend_gone(io, e);
                    return;
                }
            }
        }
    }

    fn backend_gone(&self, io: &mut Io, e: std::io::Error) {
        log::error!(
            "{}: the network back end failed ({e}); the card has no network until it gets another",
            self.nic.id
        );
        self.nic.set_failed(format!("{}: {e}", crate::net::BACKEND_FAILED));
        *io.backend = None;
        io.has_pending = false;
        io.tx_blocked = false;
    }

    /// Sends up to [`BATCH`] frames from the transmit queue. Returns whether chains were used and whether
    /// more may be waiting.
    fn transmit(&self, io: &mut Io, active: &mut Active, link_up: bool) -> (bool, bool) {
        if io.tx_blocked || io.tx_throttle.holds() {
            return (false, false);
        }
        let result = self.transmit_batch(io, active, link_up);
        if let Some(b) = io.backend.as_mut()
            && b.wants_write()
            && let Err(e) = b.flush()
        {
            self.backend_gone(io, e);
        }
        result
    }

    fn transmit_batch(&self, io: &mut Io, active: &mut Active, link_up: bool) -> (bool, bool) {
        if let Some(b) = io.backend.as_mut()
            && b.wants_write()
        {
            if let Err(e) = b.flush() {
                self.backend_gone(io, e);
            } else if b.wants_write() {
                io.tx_blocked = true;
                return (false, false);
            }
        }
        let mem = active.mem.clone();
        // A limited card reads the clock once a batch, not once a frame.
        let mut now = None;
        let mut used = false;
        for _ in 0..BATCH {
            let _ = active.tx.disable_notification(&mem);
            if !avail_within_queue(&active.tx, &mem) {
                self.malformed(Malformed::AvailJump);
                return (used, false);
            }
            let Some(chain) = active.tx.pop_descriptor_chain(&mem) else {
                match active.tx.enable_notification(&mem) {
                    Ok(true) => continue,
                    _ => return (used, false),
                }
            };
            let head = chain.head_index();
            let len = match gather(chain, &mem, &mut io.staging) {
                Ok(len) => len,
                Err(why) => {
                    self.malformed(why);
                    return (used, false);
                }
            };
            let frame = &io.staging[..len];
            let stats = &self.nic.stats;
            match io.backend.as_mut() {
                Some(b) if link_up => {
                    // The rate limit from the guest: a frame it does not let through yet goes back to the
                    // avail ring (the last taken) and the queue waits for the refill.
                    if io.limited
                        && let t = *now.get_or_insert_with(Instant::now)
                        && let Some(wait) = io.limiter.try_take(Way::Tx, (len - VNET_HEADER_LEN) as u64, t)
                    {
                        active.tx.go_to_previous_position();
                        io.tx_throttle.hold(t, wait);
                        return (used, false);
                    }
                    io.tx_throttle.release(&stats.tx_throttled_us);
                    let skip = VNET_HEADER_LEN - b.header_len();
                    match b.send(&frame[skip..]) {
                        Ok(true) => {
                            stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                            stats.tx_bytes.fetch_add((len - VNET_HEADER_LEN) as u64, Ordering::Relaxed);
                            self.nic.snoop_tx(&frame[VNET_HEADER_LEN..]);
                        }
                        Ok(false) => {
                            // Full: give the chain back and wait for room.
                            active.tx.go_to_previous_position();
                            io.tx_blocked = true;
                            return (used, false);
                        }
                        Err(e) => {
                            stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                            self.backend_gone(io, e);
                        }
                    }
                }
                _ => {
                    stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            if active.tx.add_used(&mem, head, 0).is_err() {
                self.malformed(Malformed::OutsideMemory);
                return (used, false);
            }
            used = true;
        }
        (used, true)
    }

    /// Delivers up to [`BATCH`] frames from the back end. Returns whether chains were used and whether
    /// more may be waiting.
    fn receive(&self, io: &mut Io, active: &mut Active, link_up: bool) -> (bool, bool) {
        if io.rx_throttle.holds() {
            return (false, false);
        }
        // A limited card reads the clock once a batch, not once a frame.
        let mut now = None;
        let mut used = false;
        for _ in 0..BATCH {
            if !io.has_pending {
                let Some(b) = io.backend.as_mut() else { return (used, false) };
                let header_len = b.header_len();
                let frame = match b.recv() {
                    Ok(Some(f)) => f,
                    Ok(None) => return (used, false),
                    Err(e) => {
                        self.backend_gone(io, e);
                        return (used, false);
                    }
                };
                if !link_up || frame.len() <= header_len {
                    self.nic.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                io.pending.clear();
                if header_len == 0 {
                    io.pending.extend_from_slice(&[0; VNET_HEADER_LEN]);
                }
                io.pending.extend_from_slice(frame);
                io.has_pending = true;
                io.pending_paid = false;
            }
            // The rate limit towards the guest: the frame waits (the back end's socket holds the rest).
            if !io.pending_paid {
                if io.limited
                    && let t = *now.get_or_insert_with(Instant::now)
                    && let Some(wait) = io.limiter.try_take(Way::Rx, (io.pending.len() - VNET_HEADER_LEN) as u64, t)
                {
                    io.rx_throttle.hold(t, wait);
                    return (used, false);
                }
                io.rx_throttle.release(&self.nic.stats.rx_throttled_us);
                io.pending_paid = true;
            }
            match self.deliver(active, &mut io.pending) {
                Err(why) => {
                    self.malformed(why);
                    return (used, false);
                }
                Ok(Delivery::Delivered) => {
                    io.has_pending = false;
                    io.stalled_since = None;
                    used = true;
                }
                Ok(Delivery::Dropped) => {
                    io.has_pending = false;
                    self.nic.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Delivery::NoBuffers) => {
                    let since = *io.stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= RX_STALL {
                        // The guest has not posted buffers for long: drop (counted) rather than stall passt.
                        io.has_pending = false;
                        self.nic.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // Ask for a kick when buffers come; if some came meanwhile, try again.
                    match active.rx.enable_notification(&active.mem) {
                        Ok(true) => continue,
                        _ => return (used, false),
                    }
                }
            }
        }
        (used, true)
    }

    /// Writes one frame (`frame` starts with its 12-byte virtio-net header) into receive chains.
    fn deliver(&self, active: &mut Active, frame: &mut [u8]) -> Result<Delivery, Malformed> {
        let need = frame.len();
        let mem = active.mem.clone();
        // Take chains until the frame fits (one chain only without MRG_RXBUF).
        loop {
            let have: usize = active.rx_held.iter().map(|c| c.capacity).sum();
            if have >= need || (!active.mrg_rxbuf && !active.rx_held.is_empty()) {
                break;
            }
            if active.rx_held.len() >= usize::from(active.rx.size()) {
                // Every buffer of the queue held and still too small.
                break;
            }
            if !avail_within_queue(&active.rx, &mem) {
                return Err(Malformed::AvailJump);
            }
            let Some(chain) = active.rx.pop_descriptor_chain(&mem) else { return Ok(Delivery::NoBuffers) };
            active.rx_held.push(rx_chain(chain, &mem)?);
        }
        let have: usize = active.rx_held.iter().map(|c| c.capacity).sum();
        if have < need {
            // One buffer too small for this frame (no MRG_RXBUF), or a whole queue too small: this frame
            // cannot be delivered; the buffers stay for the next one.
            return Ok(if active.mrg_rxbuf && active.rx_held.len() < usize::from(active.rx.size()) {
                Delivery::NoBuffers
            } else {
                Delivery::Dropped
            });
        }
        // How many chains the frame uses, and the header's num_buffers.
        let mut count = 0;
        let mut covered = 0;
        while covered < need {
            covered += active.rx_held[count].capacity;
            count += 1;
        }
        frame[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        let payload_len = need - VNET_HEADER_LEN;
        let mut used: SmallVec<[(u16, u32); 4]> = SmallVec::with_capacity(count);
        let mut offset = 0;
        for chain in active.rx_held.drain(..count) {
            let mut written = 0u32;
            for &(address, len) in &chain.segments {
                if offset == need {
                    break;
                }
                let n = (len as usize).min(need - offset);
                mem.write_slice(&frame[offset..offset + n], address).map_err(|_| Malformed::OutsideMemory)?;
                offset += n;
                written += n as u32;
            }
            used.push((chain.head, written));
        }
        publish_used(&mut active.rx, &mem, &used)?;
        let stats = &self.nic.stats;
        stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        stats.rx_bytes.fetch_add(payload_len as u64, Ordering::Relaxed);
        self.nic.snoop_rx(&frame[VNET_HEADER_LEN..]);
        Ok(Delivery::Delivered)
    }
}

enum Delivery {
    Delivered,
    /// The frame cannot fit the guest's buffers: dropped (counted).
    Dropped,
    /// Not enough buffers posted yet.
    NoBuffers,
}

/// Collects a chain's descriptors, checking each with `check`; at most a queue's worth.
fn descriptors(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    write_only: bool,
) -> Result<SmallVec<[(GuestAddress, u32); 2]>, Malformed> {
    let mut segments = SmallVec::new();
    let mut last_has_next = false;
    for d in chain {
        if segments.len() == usize::from(QUEUE_SIZE) {
            return Err(Malformed::TooLong);
        }
        if d.is_write_only() != write_only {
            return Err(Malformed::WrongDirection);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(Malformed::OutsideMemory);
        }
        last_has_next = d.has_next();
        segments.push((d.addr(), d.len()));
    }
    if last_has_next || segments.is_empty() {
        // The iterator stopped early: a loop, a `next` beyond the table, or a bad indirect table.
        return Err(Malformed::Unterminated);
    }
    Ok(segments)
}

fn rx_chain(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<RxChain, Malformed> {
    let head = chain.head_index();
    let segments = descriptors(chain, mem, true)?;
    let capacity: usize = segments.iter().map(|&(_, len)| len as usize).sum();
    if capacity < VNET_HEADER_LEN {
        return Err(Malformed::TooShort);
    }
    Ok(RxChain { head, segments, capacity })
}

/// Copies a transmit chain (header and frame) into `staging` as it walks it (no list of its descriptors
/// is made); returns its length. What a broken chain left in `staging` is never sent.
fn gather(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    staging: &mut [u8],
) -> Result<usize, Malformed> {
    let (mut offset, mut count, mut last_has_next) = (0usize, 0usize, false);
    for d in chain {
        count += 1;
        if count > usize::from(QUEUE_SIZE) {
            return Err(Malformed::TooLong);
        }
        if d.is_write_only() {
            return Err(Malformed::WrongDirection);
        }
        let len = d.len() as usize;
        let Some(to) = staging.get_mut(offset..offset + len) else { return Err(Malformed::TooLong) };
        mem.read_slice(to, d.addr()).map_err(|_| Malformed::OutsideMemory)?;
        offset += len;
        last_has_next = d.has_next();
    }
    if last_has_next || count == 0 {
        // The iterator stopped early: a loop, a `next` beyond the table, or a bad indirect table.
        return Err(Malformed::Unterminated);
    }
    if offset < VNET_HEADER_LEN + 14 {
        return Err(Malformed::TooShort);
    }
    Ok(offset)
}

/// Puts `entries` in the used ring and then publishes them with one index store, so that a driver never
/// sees part of a frame spread over several buffers.
fn publish_used(queue: &mut Queue, mem: &GuestMemoryMmap, entries: &[(u16, u32)]) -> Result<(), Malformed> {
    let ring = GuestAddress(queue.used_ring());
    let size = queue.size();
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in entries {
        let slot = u64::from(next.0 % size);
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        let at = ring.checked_add(4 + slot * 8).ok_or(Malformed::OutsideMemory)?;
        mem.write_slice(&element, at).map_err(|_| Malformed::OutsideMemory)?;
        next += Wrapping(1);
    }
    fence(Ordering::Release);
    let idx_at = ring.checked_add(2).ok_or(Malformed::OutsideMemory)?;
    mem.store(next.0.to_le(), idx_at, Ordering::Release).map_err(|_| Malformed::OutsideMemory)?;
    queue.set_next_used(next.0);
    Ok(())
}

/// Whether the receive queue's driver wants an interrupt for what was published since the last decision
/// (virtio 1.2 §2.7.10: with EVENT_IDX, once the used index passes `used_event`).
fn rx_needs_notification(active: &mut Active) -> bool {
    let new = Wrapping(active.rx.next_used());
    let old = std::mem::replace(&mut active.rx_signalled, new);
    if !active.event_idx {
        return true;
    }
    fence(Ordering::SeqCst);
    let Some(used_event_at) = GuestAddress(active.rx.avail_ring()).checked_add(4 + 2 * u64::from(active.rx.size()))
    else {
        return true;
    };
    let Ok(used_event) = active.mem.read_obj::<u16>(used_event_at) else { return true };
    let used_event = Wrapping(u16::from_le(used_event));
    (new - used_event - Wrapping(1)) < (new - old)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::net::{MAX_MTU, MacAddr, Passt};
    use crate::rate_limiter::NicLimits;
    use crate::virtio::VIRTIO_CONFIG_S_NEEDS_RESET;
    use crate::virtio::host_driver::{DESC_F_NEXT, DESC_F_WRITE, Desc, HostNetDriver};

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0x12, 0x34, 0x56]);
    const WAIT: Duration = Duration::from_secs(5);

    /// A card on a socket whose other end the test holds, speaking passt's protocol.
    fn card(mtu: u16) -> (Arc<Nic>, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        let backend = Passt::connected(ours, "net0").unwrap();
        peer.set_read_timeout(Some(WAIT)).unwrap();
        (Arc::new(Nic::with_backend("net0", MAC, mtu, Box::new(backend))), peer)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&MAC.0);
        f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        f
    }

    fn peer_send(peer: &mut UnixStream, f: &[u8]) {
        peer.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        peer.write_all(f).unwrap();
    }

    fn peer_recv(peer: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        peer.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        peer.read_exact(&mut f).unwrap();
        f
    }

    #[test]
    fn frames_cross_both_ways_and_are_counted() {
        let (nic, mut peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        assert_eq!(d.net_config(), (MAC.0, 1, 1500));
        d.post_rx(16);
        let out = frame(1514, 1);
        d.send(&out);
        assert_eq!(peer_recv(&mut peer), out, "the guest's frame reaches the back end without the header");
        let back = frame(60, 2);
        peer_send(&mut peer, &back);
        assert_eq!(d.recv(WAIT), vec![(back.clone(), 1)]);
        let s = nic.status();
        assert_eq!((s.tx_frames, s.tx_bytes, s.rx_frames, s.rx_bytes), (1, 1514, 1, 60));
        assert!(s.driver_ready);
    }

    #[test]
    fn a_jumbo_frame_spans_several_merged_buffers() {
        let (nic, mut peer) = card(9000);
        let mut d = HostNetDriver::new(nic, 16, 2048).unwrap();
        d.post_rx(16);
        let big = frame(9014, 3);
        peer_send(&mut peer, &big);
        let got = d.recv(WAIT);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, 5, "12 + 9014 bytes need five 2048-byte buffers");
        assert_eq!(got[0].0, big);
        // The largest frame there is, both ways (16 buffers of 2048 bytes cannot hold it: 8192-byte ones).
        let (nic, mut peer) = card(MAX_MTU);
        let mut d = HostNetDriver::new(nic, 16, 8192).unwrap();
        d.post_rx(16);
        let max = frame(MAX_FRAME, 4);
        peer_send(&mut peer, &max);
        let got = d.recv(WAIT);
        assert_eq!((got.len(), got[0].0.len()), (1, MAX_FRAME));
        assert!(got[0].0 == max);
        d.send(&max);
        assert!(peer_recv(&mut peer) == max);
    }

    #[test]
    fn a_guest_that_posts_no_buffers_costs_one_frame_and_drops_are_counted() {
        let (nic, mut peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        peer.set_nonblocking(true).unwrap();
        // Flood for longer than RX_STALL: the device first holds one frame, then drops.
        let flood = frame(1514, 5);
        let mut framed = (flood.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&flood);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < RX_STALL * 3 {
            match peer.write(&framed) {
                Ok(n) if n == framed.len() => sent += 1,
                Ok(_) => panic!("the test writes whole frames"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        std::thread::sleep(RX_STALL);
        let dropped = nic.status().rx_dropped;
        assert!(dropped > 0, "frames are dropped once the guest has posted nothing for {RX_STALL:?}");
        assert!(dropped <= sent);
        assert_eq!(nic.status().rx_frames, 0);
        // Buffers come: frames flow again.
        d.post_rx(16);
        peer.set_nonblocking(false).unwrap();
        peer_send(&mut peer, &frame(100, 6));
        let mut got = Vec::new();
        while got.len() < 16 {
            let batch = d.recv(Duration::from_millis(500));
            if batch.is_empty() {
                break;
            }
            got.extend(batch);
        }
        assert!(!got.is_empty(), "frames arrive once buffers are posted");
    }

    #[test]
    fn link_down_drops_both_ways_and_tells_the_guest() {
        let (nic, mut peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        d.post_rx(16);
        let _ = d.read_isr();
        nic.set_link(false);
        assert_eq!(d.net_config().1, 0, "status: link down");
        assert_eq!(d.read_isr() & 2, 2, "a configuration change interrupt");
        let head = d.send(&frame(100, 7));
        assert_eq!(d.completions(1, WAIT), vec![(head, 0)]);
        peer_send(&mut peer, &frame(100, 8));
        assert!(d.recv(Duration::from_millis(300)).is_empty());
        let s = nic.status();
        assert_eq!((s.tx_dropped, s.rx_dropped, s.tx_frames, s.rx_frames), (1, 1, 0, 0));
        nic.set_link(true);
        assert_eq!(d.net_config().1, 1);
        let f = frame(100, 9);
        peer_send(&mut peer, &f);
        assert_eq!(d.recv(WAIT), vec![(f, 1)]);
    }

    #[test]
    fn malformed_chains_break_the_device_until_reset_and_nothing_else() {
        let (nic, mut peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        let cases: [(&str, &[Desc]); 5] = [
            ("device-writable transmit buffer", &[Desc { addr: 0x80_0000, len: 100, flags: DESC_F_WRITE, next: 0 }]),
            ("outside memory", &[Desc { addr: 0x4000_0000, len: 100, flags: 0, next: 0 }]),
            ("loop", &[Desc { addr: 0x80_0000, len: 100, flags: DESC_F_NEXT, next: 0 }]),
            ("shorter than a header", &[Desc { addr: 0x80_0000, len: 8, flags: 0, next: 0 }]),
            ("next beyond the queue", &[Desc { addr: 0x80_0000, len: 100, flags: DESC_F_NEXT, next: 99 }]),
        ];
        for (n, (name, chain)) in cases.iter().enumerate() {
            d.reinit();
            for (i, desc) in chain.iter().enumerate() {
                d.write_desc(1, i as u16, *desc);
            }
            d.publish(1, 0, 1);
            let deadline = Instant::now() + WAIT;
            while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0, "{name}: NEEDS_RESET");
            assert_eq!(nic.stats.malformed.load(Ordering::Relaxed), n as u64 + 1, "{name}: counted");
        }
        // A receive buffer the device may not write.
        d.reinit();
        d.write_desc(0, 0, Desc { addr: 0x10_0000, len: 2048, flags: 0, next: 0 });
        d.publish(0, 0, 1);
        peer_send(&mut peer, &frame(100, 10));
        let deadline = Instant::now() + WAIT;
        while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0, "read-only receive buffer: NEEDS_RESET");
        // After a reset the card works again.
        d.reinit();
        d.post_rx(4);
        let f = frame(64, 11);
        peer_send(&mut peer, &f);
        let got = d.recv(WAIT);
        assert!(got.iter().any(|(g, _)| *g == f), "the card works after the reset");
        d.send(&f);
        assert_eq!(peer_recv(&mut peer), f);
    }

    #[test]
    fn resets_in_the_middle_of_traffic_leave_a_working_card() {
        let (nic, peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 64, 2048).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let (mut peer, stop) = (peer.try_clone().unwrap(), stop.clone());
            std::thread::spawn(move || {
                let f = frame(1000, 13);
                while !stop.load(Ordering::Relaxed) {
                    peer_send(&mut peer, &f);
                }
            })
        };
        let drain = {
            let (mut peer, stop) = (peer.try_clone().unwrap(), stop.clone());
            peer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let _ = peer.read(&mut buf);
                }
            })
        };
        for round in 0..50u8 {
            d.post_rx(64);
            d.send_burst(&frame(200, round), 16);
            let _ = d.recv_count(Duration::from_millis(20));
            d.reinit();
        }
        d.post_rx(64);
        let deadline = Instant::now() + WAIT;
        while nic.status().rx_frames == 0 && Instant::now() < deadline {
            let _ = d.recv_count(Duration::from_millis(50));
        }
        let before = nic.status().rx_frames;
        let (frames, _) = d.recv_count(WAIT);
        assert!(frames > 0, "frames still arrive after 50 resets (before: {before})");
        assert_eq!(nic.status().malformed, 0, "resets are not driver errors");
        stop.store(true, Ordering::Relaxed);
        let _ = d.recv_count(Duration::from_millis(100));
        drop(d);
        drop(nic);
        let _ = flood.join();
        let _ = drain.join();
    }

    /// Bytes a second the card lets through each way under `limits`, host side at full speed (the driver
    /// always has frames queued, the peer always has frames waiting), counted after the first second (the
    /// full bucket's burst) for `seconds` more. Returns (towards the guest, from the guest).
    fn rates_under(limits: NicLimits, seconds: f64) -> (f64, f64) {
        let (nic, peer) = card(1500);
        nic.set_limits(limits);
        let mut d = HostNetDriver::new(nic.clone(), 64, 2048).unwrap();
        d.post_rx(64);
        let stop = Arc::new(AtomicBool::new(false));
        let out = frame(1514, 7);
        let mut writer = peer.try_clone().unwrap();
        let mut reader = peer;
        let start = Instant::now();
        let counted = move |at: Instant| at.duration_since(start).as_secs_f64() >= 1.0;
        let feeder = {
            let stop = stop.clone();
            let f = frame(1514, 8);
            std::thread::spawn(move || {
                writer.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
                let mut framed = (f.len() as u32).to_be_bytes().to_vec();
                framed.extend_from_slice(&f);
                while !stop.load(Ordering::Relaxed) {
                    let _ = writer.write_all(&framed);
                }
            })
        };
        let sink = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                reader.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                let mut bytes = 0u64;
                let mut len = [0u8; 4];
                let mut f = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if reader.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let n = u32::from_be_bytes(len) as usize;
                    reader.read_exact(&mut f[..n]).unwrap();
                    if counted(Instant::now()) {
                        bytes += n as u64;
                    }
                }
                bytes
            })
        };
        let mut rx_bytes = 0u64;
        while start.elapsed().as_secs_f64() < 1.0 + seconds {
            d.send_burst(&out, 64);
            let (_, bytes) = d.recv_count(Duration::from_millis(5));
            if counted(Instant::now()) {
                rx_bytes += bytes;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let tx_bytes = sink.join().unwrap();
        feeder.join().unwrap();
        (rx_bytes as f64 / seconds, tx_bytes as f64 / seconds)
    }

    /// The card's limits hold the rate each way within 10 % (8 Mbit/s towards the guest, 4 Mbit/s from
    /// it), host side at full speed; the time held back is counted.
    #[test]
    fn rate_limits_hold_bits_per_second_each_way() {
        let limits = NicLimits { rx_bps: Some(8_000_000), tx_bps: Some(4_000_000) };
        let (rx, tx) = rates_under(limits, 2.0);
        println!("nic rate limits: {rx:.0} B/s towards the guest under 1 MB/s, {tx:.0} B/s from it under 500 kB/s");
        assert!((900_000.0..=1_100_000.0).contains(&rx), "{rx:.0} B/s towards the guest under rx=8 Mbit/s");
        assert!((450_000.0..=550_000.0).contains(&tx), "{tx:.0} B/s from the guest under tx=4 Mbit/s");
        // One way limited leaves the other alone: far more than 1 MB/s crosses it.
        let (rx, tx) = rates_under(NicLimits { rx_bps: Some(8_000_000), tx_bps: None }, 1.0);
        assert!(rx < 1_100_000.0 && tx > 4_000_000.0, "{rx:.0} B/s in, {tx:.0} B/s out with only rx limited");
    }

    /// A limit changed while frames wait for the old one applies at once: lifting it lets the held frame
    /// and the ones behind it through.
    #[test]
    fn a_limit_changed_live_applies_at_once() {
        let (nic, mut peer) = card(1500);
        // The least rate there is: one 1514-byte frame a second, so the second frame waits ~1 s.
        nic.set_limits(NicLimits { rx_bps: None, tx_bps: Some(crate::rate_limiter::MIN_NIC_RATE) });
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        let f = frame(1514, 9);
        d.send(&f);
        assert_eq!(peer_recv(&mut peer), f, "a full bucket lets the first frame through");
        d.send(&f);
        d.send(&f);
        peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut len = [0u8; 4];
        assert!(peer.read_exact(&mut len).is_err(), "the second frame waits for the refill");
        peer.set_read_timeout(Some(WAIT)).unwrap();
        let lifted = Instant::now();
        nic.set_limits(NicLimits::default());
        assert_eq!(peer_recv(&mut peer), f);
        assert_eq!(peer_recv(&mut peer), f);
        println!("held frames went {:?} after the limit was lifted", lifted.elapsed());
        assert!(nic.status().tx_throttled_us > 0, "the wait is counted");
        assert_eq!(nic.status().limits, NicLimits::default());
    }

    #[test]
    fn with_msix_each_queue_interrupts_through_its_own_vector() {
        use crate::pci::PciDevice;
        let (nic, mut peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        // Find the MSI-X capability and enable it; vectors 0 (config), 1 (rx), 2 (tx), unmasked.
        let mut cap = (d.device.config().read(13) & 0xFF) as usize;
        while cap != 0 && d.device.config().read(cap / 4) & 0xFF != 0x11 {
            cap = ((d.device.config().read(cap / 4) >> 8) & 0xFF) as usize;
        }
        assert_ne!(cap, 0, "an MSI-X capability");
        let control = d.device.config().read(cap / 4) >> 16;
        assert_eq!(control & 0x7FF, 2, "three vectors: configuration and two queues");
        d.device.config_write(cap / 4, 3, &[0x80]);
        for v in 0..3u64 {
            d.device.bar_write(0, 0x4000 + v * 16, &0xFEE0_0000u32.to_le_bytes());
            d.device.bar_write(0, 0x4000 + v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
            d.device.bar_write(0, 0x4000 + v * 16 + 12, &0u32.to_le_bytes());
        }
        d.device.bar_write(0, 0x10, &0u16.to_le_bytes());
        for (queue, vector) in [(0u16, 1u16), (1, 2)] {
            d.device.bar_write(0, 0x16, &queue.to_le_bytes());
            d.device.bar_write(0, 0x1A, &vector.to_le_bytes());
            let mut back = [0u8; 2];
            d.device.bar_read(0, 0x1A, &mut back);
            assert_eq!(u16::from_le_bytes(back), vector);
        }
        d.device.bar_write(0, 0x1A, &99u16.to_le_bytes());
        let mut back = [0u8; 2];
        d.device.bar_read(0, 0x1A, &mut back);
        assert_eq!(u16::from_le_bytes(back), 0xFFFF, "a vector beyond the table reads back NO_VECTOR");
        d.device.bar_write(0, 0x1A, &2u16.to_le_bytes());
        let msix = d.device.msix().clone();
        let fired = |v: usize| msix.vector_fd(v).unwrap().read().is_ok();
        d.post_rx(16);
        let f = frame(100, 14);
        peer_send(&mut peer, &f);
        let deadline = Instant::now() + WAIT;
        while nic.status().rx_frames == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(fired(1), "the receive queue's vector");
        assert!(!fired(2) && !fired(0));
        assert_eq!(d.read_isr(), 0, "no INTx status with MSI-X");
        nic.set_link(false);
        assert!(fired(0), "a configuration change on the configuration vector");
        nic.set_link(true);
        let _ = fired(0);
        d.send(&f);
        assert_eq!(peer_recv(&mut peer), f);
        std::thread::sleep(Duration::from_millis(20));
        assert!(fired(2), "the transmit queue's vector");
    }

    #[test]
    fn an_avail_index_jump_breaks_the_device() {
        let (nic, _peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        d.write_desc(1, 0, Desc { addr: 0x80_0000, len: 100, flags: 0, next: 0 });
        d.publish(1, 0, 1000);
        let deadline = Instant::now() + WAIT;
        while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert_eq!(nic.stats.malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_guests_address_is_learnt_from_its_arp() {
        let (nic, mut peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC.0);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC.0);
        arp.extend_from_slice(&[10, 0, 2, 15]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 0, 2, 2]);
        d.send(&arp);
        let _ = peer_recv(&mut peer);
        assert_eq!(nic.status().ipv4.as_deref(), Some("10.0.2.15"));
    }

    #[test]
    fn a_back_end_that_ends_leaves_the_card_without_network_and_says_so() {
        let (nic, peer) = card(1500);
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        d.post_rx(4);
        drop(peer);
        let deadline = Instant::now() + WAIT;
        while nic.status().error.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(nic.status().error.is_some_and(|e| e.contains("back end failed")));
        let head = d.send(&frame(100, 12));
        assert_eq!(d.completions(1, WAIT), vec![(head, 0)], "the frame is taken back");
        assert_eq!(nic.status().tx_dropped, 1);
    }

    /// The real passt: the card's DHCP DISCOVER gets passt's OFFER through the device.
    #[test]
    fn passt_answers_dhcp_through_the_device() {
        if std::process::Command::new(crate::net::passt_binary()).arg("--version").output().is_err() {
            eprintln!("SKIP: passt is not installed (apt-get install passt)");
            return;
        }
        let config = crate::net::parse_net("user").unwrap().unwrap();
        let nic = Arc::new(Nic::open(&config, "net0".into(), "dhcp-test", 0).unwrap());
        let status = nic.status();
        if !status.attached {
            eprintln!("SKIP: passt cannot run here: {:?}", status.error);
            return;
        }
        let offered = status.ipv4.clone().expect("passt's offer is known from the start-up probe");
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        d.post_rx(16);
        d.send(&crate::net::dhcp::discover(nic.mac, 0x1234_5678));
        let deadline = Instant::now() + WAIT;
        let mut offer = None;
        while offer.is_none() && Instant::now() < deadline {
            for (f, _) in d.recv(Duration::from_millis(200)) {
                offer = offer.or(crate::net::dhcp::parse_reply(&f, 0x1234_5678));
            }
            d.post_rx(16);
        }
        assert_eq!(offer.map(|a| a.to_string()), Some(offered));
    }
}

/// TAP and bridge back ends on a bridge the test creates (needs CAP_NET_ADMIN; skipped with the reason
/// otherwise). Only an isolated test subnet on that bridge is used.
#[cfg(test)]
mod tap_tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use porthole_tests::TestBridge;

    use crate::net::{MacAddr, Nic, parse_net};
    use crate::virtio::host_driver::HostNetDriver;

    #[test]
    fn a_missing_bridge_leaves_the_card_off_the_bus_with_the_reason() {
        let config = parse_net("bridge:nosuchbr0").unwrap().unwrap();
        let nic = Nic::open(&config, "net0".into(), "t", 0).unwrap();
        let s = nic.status();
        assert!(!s.attached);
        assert!(s.error.unwrap().contains("bridge nosuchbr0 does not exist"));
    }

    #[test]
    fn a_card_on_a_bridge_reaches_the_host_through_its_tap_device() {
        let Some(bridge) = TestBridge::create_or_skip("10.213.77.1/24") else { return };
        let config = parse_net(&format!("bridge:{}", bridge.name())).unwrap().unwrap();
        let nic = Arc::new(Nic::open(&config, "net0".into(), "tap-test", 0).unwrap());
        let status = nic.status();
        assert!(status.attached, "{:?}", status.error);
        let tap = status.tap.clone().unwrap();
        assert!(
            std::path::Path::new(&format!("/sys/class/net/{}/brif/{tap}", bridge.name())).exists(),
            "{tap} is a port of {}",
            bridge.name()
        );
        let mut d = HostNetDriver::new(nic.clone(), 16, 2048).unwrap();
        d.post_rx(16);
        // ARP who-has 10.213.77.1 (the bridge) tell 10.213.77.2.
        let mac: MacAddr = nic.mac;
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&mac.0);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac.0);
        arp.extend_from_slice(&[10, 213, 77, 2]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 213, 77, 1]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut reply = None;
        while reply.is_none() && Instant::now() < deadline {
            d.send(&arp);
            for (f, _) in d.recv(Duration::from_millis(300)) {
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == [10, 213, 77, 1] {
                    reply = Some(f);
                }
            }
            d.post_rx(16);
            let _ = d.tx_room(Duration::ZERO);
        }
        let reply = reply.expect("the host answers the guest's ARP over the bridge");
        assert_eq!(&reply[0..6], &mac.0, "addressed to the card");
        assert_eq!(nic.status().ipv4.as_deref(), Some("10.213.77.2"));
        drop(d);
        drop(nic);
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists(),
            "the TAP device is removed with the card"
        );
    }
}
