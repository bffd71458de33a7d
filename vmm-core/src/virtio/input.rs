//! A virtio-input tablet (virtio 1.x §5.8): an absolute pointer with three buttons and a wheel, so a guest's
//! cursor sits exactly where the console's pointer is (a PS/2 mouse only moves by deltas, which the guest
//! accelerates, and drifts).
//!
//! The device answers the configuration queries (name, ids, the event types and codes it sends, the axes'
//! ranges) and puts input events (8 bytes: type, code, value, little-endian) in the buffers the driver posts
//! on its event queue. Events wait in a bounded queue while the driver has no buffer (a guest that stops
//! reading costs at most [`MAX_PENDING`] events; later ones are dropped and counted). The status queue
//! (LED states, which a tablet has none of) is drained. A malformed chain sets NEEDS_RESET of this device
//! only. [`TabletInput::pointer`] says whether the guest's driver took the event, so the VMM can fall back to
//! the PS/2 mouse for firmware and boot loaders.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt};
use crate::devices::bus::lock;

/// virtio-input's device ID.
pub const DEVICE_TYPE: u16 = 18;
pub const QUEUE_SIZE: u16 = 64;
const EVENTQ: usize = 0;
const STATUSQ: usize = 1;
/// Events kept while the driver has no buffer for them.
pub const MAX_PENDING: usize = 256;
/// The axes' range: a position on the screen is scaled into it.
pub const ABS_MAX: u32 = 32767;

// Linux input event types and codes (linux/input-event-codes.h).
const EV_SYN: u16 = 0x00;
const EV_KEY: u16 = 0x01;
const EV_REL: u16 = 0x02;
const EV_ABS: u16 = 0x03;
const SYN_REPORT: u16 = 0;
const BTN_LEFT: u16 = 0x110;
const BTN_RIGHT: u16 = 0x111;
const BTN_MIDDLE: u16 = 0x112;
const REL_WHEEL: u16 = 0x08;
const ABS_X: u16 = 0x00;
const ABS_Y: u16 = 0x01;
/// `BUS_VIRTUAL`.
const BUS_VIRTUAL: u16 = 0x06;

// Configuration selectors (virtio 1.2 §5.8.5).
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;

/// The name the guest sees (`/proc/bus/input/devices`).
pub const NAME: &str = "Porthole tablet";

/// One input event as the driver reads it.
type Event = [u8; 8];

fn event(kind: u16, code: u16, value: i32) -> Event {
    let mut e = [0u8; 8];
    e[0..2].copy_from_slice(&kind.to_le_bytes());
    e[2..4].copy_from_slice(&code.to_le_bytes());
    e[4..8].copy_from_slice(&value.to_le_bytes());
    e
}

/// Counters of the tablet.
#[derive(Debug, Default)]
pub struct TabletStats {
    /// Events the guest's driver received.
    pub events: AtomicU64,
    /// Events dropped because the driver left no room for them.
    pub dropped: AtomicU64,
    /// Malformed chains (each breaks the device until the driver resets it).
    pub malformed: AtomicU64,
}

/// The queues while the driver is up.
struct Active {
    mem: GuestMemoryMmap,
    eventq: Queue,
    statusq: Queue,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Events for the driver, oldest first.
    pending: VecDeque<Event>,
    /// The RFB button mask of the last pointer event.
    buttons: u8,
    /// Serving stopped while a machine state is saved.
    quiesced: bool,
}

/// The tablet's side that the VMM's input path holds (it outlives nothing: one per boot).
pub struct TabletInput {
    interrupt: Arc<VirtioInterrupt>,
    state: Mutex<State>,
    pub stats: TabletStats,
    eventq_kick: EventFd,
    statusq_kick: EventFd,
    /// Wakes the thread: activation, reset, shutdown.
    wake: EventFd,
    shutdown: AtomicBool,
}

/// Why a chain was refused.
#[derive(Debug)]
enum Malformed {
    /// The avail index ran more than a queue's worth ahead.
    AvailJump,
    /// An event buffer that the device may not write, or shorter than an event.
    BadEventBuffer,
    /// A descriptor outside guest memory, or the used ring.
    OutsideMemory,
}

impl TabletInput {
    /// Whether the guest's driver is up (events go to it, not to the PS/2 mouse).
    pub fn driver_ready(&self) -> bool {
        lock(&self.state).active.is_some()
    }

    /// An RFB pointer event at (`x`, `y`) on a screen of `screen` pixels with RFB's button mask (1 left,
    /// 2 middle, 4 right, 8/16 wheel up/down). Returns false, sending nothing, while the guest's driver is
    /// not up.
    pub fn pointer(&self, x: u16, y: u16, mask: u8, screen: (u32, u32)) -> bool {
        let mut state = lock(&self.state);
        if state.active.is_none() {
            return false;
        }
        let scale = |v: u16, size: u32| -> i32 {
            let last = size.saturating_sub(1).max(1);
            (u64::from(u32::from(v).min(last)) * u64::from(ABS_MAX) / u64::from(last)) as i32
        };
        let mut batch = [[0u8; 8]; 8];
        let mut n = 0;
        let mut push = |e: Event| {
            batch[n] = e;
            n += 1;
        };
        push(event(EV_ABS, ABS_X, scale(x, screen.0)));
        push(event(EV_ABS, ABS_Y, scale(y, screen.1)));
        let changed = mask ^ state.buttons;
        for (bit, code) in [(1u8, BTN_LEFT), (2, BTN_MIDDLE), (4, BTN_RIGHT)] {
            if changed & bit != 0 {
                push(event(EV_KEY, code, i32::from(mask & bit != 0)));
            }
        }
        // The wheel: a press of "button" 4 (up) or 5 (down) is one notch.
        let pressed = mask & changed;
        if pressed & 8 != 0 {
            push(event(EV_REL, REL_WHEEL, 1));
        }
        if pressed & 16 != 0 {
            push(event(EV_REL, REL_WHEEL, -1));
        }
        push(event(EV_SYN, SYN_REPORT, 0));
        state.buttons = mask;
        if state.pending.len() + n > MAX_PENDING {
            // The guest does not read: a whole report is dropped, never part of one.
            self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            state.pending.extend(&batch[..n]);
        }
        self.deliver(&mut state);
        true
    }

    /// Puts pending events in the driver's buffers and tells it.
    fn deliver(&self, state: &mut State) {
        if state.quiesced {
            return;
        }
        let State { active, pending, .. } = state;
        let Some(a) = active.as_mut() else { return };
        let mut used = 0;
        let result = (|| -> Result<(), Malformed> {
            while !pending.is_empty() {
                if !avail_within_queue(&a.eventq, &a.mem) {
                    return Err(Malformed::AvailJump);
                }
                let Some(chain) = a.eventq.pop_descriptor_chain(&a.mem) else { break };
                let head = chain.head_index();
                // Linux posts one 8-byte buffer per chain; only the first descriptor is used.
                let Some(d) = chain.into_iter().next() else { return Err(Malformed::BadEventBuffer) };
                if !d.is_write_only() || (d.len() as usize) < 8 {
                    return Err(Malformed::BadEventBuffer);
                }
                let e = pending.front().copied().unwrap_or_default();
                a.mem.write_slice(&e, d.addr()).map_err(|_| Malformed::OutsideMemory)?;
                a.eventq.add_used(&a.mem, head, 8).map_err(|_| Malformed::OutsideMemory)?;
                pending.pop_front();
                used += 1;
            }
            Ok(())
        })();
        if used > 0 {
            self.stats.events.fetch_add(used, Ordering::Relaxed);
            if a.eventq.needs_notification(&a.mem).unwrap_or(true) {
                self.interrupt.signal_queue(EVENTQ);
            }
        }
        if let Err(e) = result {
            self.malformed(state, e);
        }
    }

    /// Completes the status queue's buffers (LED states: a tablet has no LEDs).
    fn drain_status(&self, state: &mut State) {
        if state.quiesced {
            return;
        }
        let Some(a) = state.active.as_mut() else { return };
        let mut used = false;
        let result = (|| -> Result<(), Malformed> {
            loop {
                if !avail_within_queue(&a.statusq, &a.mem) {
                    return Err(Malformed::AvailJump);
                }
                let Some(chain) = a.statusq.pop_descriptor_chain(&a.mem) else { return Ok(()) };
                let head = chain.head_index();
                for d in chain.into_iter().take(usize::from(QUEUE_SIZE)) {
                    if !GuestMemoryBackend::check_range(&a.mem, d.addr(), d.len() as usize) {
                        return Err(Malformed::OutsideMemory);
                    }
                }
                a.statusq.add_used(&a.mem, head, 0).map_err(|_| Malformed::OutsideMemory)?;
                used = true;
            }
        })();
        if used && a.statusq.needs_notification(&a.mem).unwrap_or(true) {
            self.interrupt.signal_queue(STATUSQ);
        }
        if let Err(e) = result {
            self.malformed(state, e);
        }
    }

    /// Counts a driver error and breaks the device until the driver resets it.
    fn malformed(&self, state: &mut State, what: Malformed) {
        let first = self.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0;
        let level = if first { log::Level::Warn } else { log::Level::Debug };
        log::log!(
            level,
            "tablet: malformed descriptor chain ({what:?}); the device needs a reset (guest driver error)"
        );
        state.active = None;
        state.pending.clear();
        self.interrupt.mark_needs_reset();
    }

    fn thread(&self) {
        const EVENTQ_KICK: u64 = 1;
        const STATUSQ_KICK: u64 = 2;
        const WAKE: u64 = 3;
        let Ok(epoll) = Epoll::new() else {
            log::error!("tablet: cannot create its thread's epoll; the tablet stays idle");
            return;
        };
        for (fd, token) in [
            (self.eventq_kick.as_raw_fd(), EVENTQ_KICK),
            (self.statusq_kick.as_raw_fd(), STATUSQ_KICK),
            (self.wake.as_raw_fd(), WAKE),
        ] {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
                log::error!("tablet: cannot watch a descriptor ({e}); the tablet stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); 3];
        while !self.shutdown.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("tablet: its thread cannot wait ({e}); the tablet stays idle");
                    return;
                }
            };
            let mut state = lock(&self.state);
            for e in &events[..n] {
                match e.data() {
                    EVENTQ_KICK => {
                        let _ = self.eventq_kick.read();
                        self.deliver(&mut state);
                    }
                    STATUSQ_KICK => {
                        let _ = self.statusq_kick.read();
                        self.drain_status(&mut state);
                    }
                    _ => {
                        let _ = self.wake.read();
                        self.deliver(&mut state);
                        self.drain_status(&mut state);
                    }
                }
            }
        }
    }
}

/// An avail index more than a queue's worth ahead is a driver bug (or an attack).
fn avail_within_queue(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    matches!(queue.avail_idx(mem, Ordering::Acquire),
        Ok(avail) if (avail - Wrapping(queue.next_avail())).0 <= queue.size())
}

/// The virtio-input tablet on the PCI transport.
pub struct VirtioTablet {
    input: Arc<TabletInput>,
    max_sizes: [u16; 2],
    /// The configuration selector and sub-selector the driver wrote.
    select: u8,
    subsel: u8,
    thread: Option<JoinHandle<()>>,
}

impl VirtioTablet {
    /// A tablet raising `interrupt`; starts its (idle) thread, which inherits the caller's seccomp filter.
    pub fn new(interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let input = Arc::new(TabletInput {
            interrupt,
            state: Mutex::new(State::default()),
            stats: TabletStats::default(),
            eventq_kick: EventFd::new(libc::EFD_NONBLOCK)?,
            statusq_kick: EventFd::new(libc::EFD_NONBLOCK)?,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            shutdown: AtomicBool::new(false),
        });
        let i = input.clone();
        let thread = std::thread::Builder::new().name("tablet".into()).spawn(move || i.thread())?;
        Ok(VirtioTablet { input, max_sizes: [QUEUE_SIZE; 2], select: 0, subsel: 0, thread: Some(thread) })
    }

    /// The side the input path sends pointer events to.
    pub fn input(&self) -> &Arc<TabletInput> {
        &self.input
    }

    /// The configuration's union (`u`) for the current selectors; its length is the `size` field.
    fn config_payload(&self) -> Vec<u8> {
        let bits = |codes: &[u16]| {
            let top = codes.iter().copied().max().map_or(0, |c| usize::from(c) / 8 + 1);
            let mut b = vec![0u8; top];
            for &c in codes {
                b[usize::from(c) / 8] |= 1 << (c % 8);
            }
            b
        };
        match (self.select, self.subsel) {
            (CFG_ID_NAME, _) => NAME.as_bytes().to_vec(),
            (CFG_ID_DEVIDS, _) => {
                let mut b = Vec::with_capacity(8);
                for v in [BUS_VIRTUAL, 0x0000, 0x0001, 0x0001] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b
            }
            (CFG_EV_BITS, s) if u16::from(s) == EV_KEY => bits(&[BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]),
            (CFG_EV_BITS, s) if u16::from(s) == EV_REL => bits(&[REL_WHEEL]),
            (CFG_EV_BITS, s) if u16::from(s) == EV_ABS => bits(&[ABS_X, ABS_Y]),
            (CFG_ABS_INFO, s) if u16::from(s) == ABS_X || u16::from(s) == ABS_Y => {
                // min, max, fuzz, flat, res
                let mut b = Vec::with_capacity(20);
                for v in [0u32, ABS_MAX, 0, 0, 0] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b
            }
            // No serial (CFG_ID_SERIAL), no properties (CFG_PROP_BITS), nothing else.
            _ => Vec::new(),
        }
    }
}

impl VirtioDevice for VirtioTablet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        if index == EVENTQ { &self.input.eventq_kick } else { &self.input.statusq_kick }
    }

    /// select (u8), subsel (u8), size (u8), 5 reserved bytes, then 128 bytes of `u`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let payload = self.config_payload();
        let mut config = [0u8; 136];
        config[0] = self.select;
        config[1] = self.subsel;
        config[2] = payload.len().min(128) as u8;
        let len = payload.len().min(128);
        config[8..8 + len].copy_from_slice(&payload[..len]);
        let start = offset as usize;
        match config.get(start..start.saturating_add(data.len())) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match offset.saturating_add(i as u64) {
                0 => self.select = b,
                1 => self.subsel = b,
                _ => {} // `size` and `u` are the device's
            }
        }
    }

    fn activate(&mut self, activation: Activation) {
        let mut queues = activation.queues.into_iter();
        let (Some(eventq), Some(statusq)) = (queues.next(), queues.next()) else { return };
        {
            let mut state = lock(&self.input.state);
            state.active = Some(Active { mem: activation.mem, eventq, statusq });
            state.pending.clear();
            state.quiesced = false;
        }
        let _ = self.input.wake.write(1);
    }

    fn reset(&mut self) {
        let mut state = lock(&self.input.state);
        state.active = None;
        state.pending.clear();
        state.buttons = 0;
        state.quiesced = false;
        drop(state);
        self.select = 0;
        self.subsel = 0;
    }

    /// Events are written holding the state lock, so taking it waits for a delivery in progress.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.input.state);
        state.quiesced = true;
        let Some(a) = state.active.as_ref() else { return Ok(Vec::new()) };
        Ok(vec![a.eventq.state(), a.statusq.state()])
    }

    fn resume_requests(&mut self) {
        lock(&self.input.state).quiesced = false;
        let _ = self.input.wake.write(1);
    }

    /// The selectors, the button mask and the events the driver has not taken yet.
    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.input.state);
        w.u8(self.select);
        w.u8(self.subsel);
        w.u8(state.buttons);
        w.u32(state.pending.len() as u32);
        for e in &state.pending {
            w.bytes(e);
        }
    }

    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (select, subsel, buttons) = (r.u8()?, r.u8()?, r.u8()?);
        let count = r.u32()? as usize;
        if count > MAX_PENDING {
            return Err(crate::snapshot::StateError::Damaged(format!(
                "a tablet with {count} events waiting (at most {MAX_PENDING})"
            )));
        }
        let mut pending = VecDeque::with_capacity(count);
        for _ in 0..count {
            pending.push_back(r.fixed::<8>()?);
        }
        self.select = select;
        self.subsel = subsel;
        let mut state = lock(&self.input.state);
        state.buttons = buttons;
        state.pending = pending;
        Ok(())
    }
}

impl Drop for VirtioTablet {
    fn drop(&mut self) {
        lock(&self.input.state).active = None;
        self.input.shutdown.store(true, Ordering::Release);
        let _ = self.input.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::VIRTIO_CONFIG_S_NEEDS_RESET;
    use crate::virtio::host_driver::{DESC_F_WRITE, Desc, HostDriver};

    /// Event buffers: buffer i at BUFFERS + 8 * i.
    const BUFFERS: u64 = 0x2_0000;
    const WAIT: Duration = Duration::from_secs(5);

    fn tablet() -> (HostDriver<VirtioTablet>, Arc<TabletInput>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x3_0000)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let device = VirtioTablet::new(interrupt.clone()).unwrap();
        let input = device.input().clone();
        (HostDriver::new(device, interrupt, mem, &[QUEUE_SIZE, QUEUE_SIZE]), input)
    }

    /// Posts event buffers `first..first + count` (descriptor i is buffer i).
    fn post(d: &mut HostDriver<VirtioTablet>, first: u16, count: u16) {
        for i in first..first + count {
            let desc = Desc { addr: BUFFERS + 8 * u64::from(i), len: 8, flags: DESC_F_WRITE, next: 0 };
            d.write_desc(EVENTQ, i % QUEUE_SIZE, desc);
            d.push_avail(EVENTQ, i % QUEUE_SIZE);
        }
        d.kick(EVENTQ);
    }

    /// The events the driver got, as (type, code, value).
    fn received(d: &mut HostDriver<VirtioTablet>, want: usize) -> Vec<(u16, u16, i32)> {
        let mut out = Vec::new();
        while out.len() < want {
            let done = d.completions(EVENTQ, WAIT);
            assert!(!done.is_empty(), "only {} of {want} events came: {out:?}", out.len());
            for (head, len) in done {
                assert_eq!(len, 8);
                let e: [u8; 8] = d.mem.read_obj(GuestAddress(BUFFERS + 8 * u64::from(head))).unwrap();
                let kind = u16::from_le_bytes([e[0], e[1]]);
                let code = u16::from_le_bytes([e[2], e[3]]);
                out.push((kind, code, i32::from_le_bytes([e[4], e[5], e[6], e[7]])));
            }
        }
        out
    }

    /// The configuration's `size` and payload for `select`/`subsel`.
    fn query(d: &mut HostDriver<VirtioTablet>, select: u8, subsel: u8) -> Vec<u8> {
        d.write_config(0, &[select, subsel]);
        let mut config = [0u8; 136];
        d.read_config(0, &mut config);
        assert_eq!((config[0], config[1]), (select, subsel));
        config[8..8 + usize::from(config[2])].to_vec()
    }

    #[test]
    fn the_configuration_describes_an_absolute_pointer_with_three_buttons_and_a_wheel() {
        let (mut d, _) = tablet();
        assert_eq!(query(&mut d, CFG_ID_NAME, 0), NAME.as_bytes());
        assert_eq!(query(&mut d, CFG_ID_DEVIDS, 0)[..2], BUS_VIRTUAL.to_le_bytes());
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_ABS as u8), [0b11], "ABS_X and ABS_Y");
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_REL as u8), [0, 1], "REL_WHEEL (8)");
        let keys = query(&mut d, CFG_EV_BITS, EV_KEY as u8);
        assert_eq!((keys.len(), keys[0x22]), (0x23, 0b111), "BTN_LEFT, BTN_RIGHT, BTN_MIDDLE (0x110-0x112)");
        let abs = query(&mut d, CFG_ABS_INFO, ABS_Y as u8);
        assert_eq!(abs.len(), 20);
        assert_eq!(
            (u32::from_le_bytes(abs[0..4].try_into().unwrap()), u32::from_le_bytes(abs[4..8].try_into().unwrap())),
            (0, ABS_MAX)
        );
        for (select, subsel) in [(0x02, 0), (0x10, 0), (CFG_EV_BITS, 0x11), (CFG_ABS_INFO, 5), (0x7f, 0)] {
            assert!(query(&mut d, select, subsel).is_empty(), "{select:#x}/{subsel}");
        }
    }

    #[test]
    fn pointer_events_reach_the_driver_as_absolute_reports() {
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let idle = VirtioTablet::new(interrupt).unwrap();
        assert!(!idle.input().pointer(1, 1, 0, (640, 480)), "no driver yet: the PS/2 mouse takes it");

        let (mut d, input) = tablet();
        post(&mut d, 0, 32);
        assert!(input.driver_ready());
        // The bottom-right corner with the left button down, then released at the top-left.
        assert!(input.pointer(639, 479, 1, (640, 480)));
        assert_eq!(
            received(&mut d, 4),
            [(EV_ABS, ABS_X, 32767), (EV_ABS, ABS_Y, 32767), (EV_KEY, BTN_LEFT, 1), (EV_SYN, SYN_REPORT, 0)]
        );
        assert!(input.pointer(0, 0, 0, (640, 480)));
        assert_eq!(
            received(&mut d, 4),
            [(EV_ABS, ABS_X, 0), (EV_ABS, ABS_Y, 0), (EV_KEY, BTN_LEFT, 0), (EV_SYN, SYN_REPORT, 0)]
        );
        // The middle of the screen, right button, a wheel notch down (the wheel "button" held does not repeat).
        assert!(input.pointer(320, 240, 4 | 16, (641, 481)));
        assert_eq!(
            received(&mut d, 5),
            [
                (EV_ABS, ABS_X, 16383),
                (EV_ABS, ABS_Y, 16383),
                (EV_KEY, BTN_RIGHT, 1),
                (EV_REL, REL_WHEEL, -1),
                (EV_SYN, SYN_REPORT, 0)
            ]
        );
        assert!(input.pointer(320, 240, 4 | 16, (641, 481)));
        assert_eq!(received(&mut d, 3), [(EV_ABS, ABS_X, 16383), (EV_ABS, ABS_Y, 16383), (EV_SYN, SYN_REPORT, 0)]);
        // Beyond the screen (a client's stale size): the edge.
        assert!(input.pointer(5000, 5000, 4 | 16, (640, 480)));
        assert_eq!(received(&mut d, 3)[..2], [(EV_ABS, ABS_X, 32767), (EV_ABS, ABS_Y, 32767)]);
        assert_eq!(input.stats.events.load(Ordering::Relaxed), 19);
    }

    #[test]
    fn a_driver_that_does_not_read_costs_a_bounded_queue_and_whole_reports_are_dropped() {
        let (mut d, input) = tablet();
        // No buffers: everything waits, up to MAX_PENDING events (85 reports of 3: x, y, report).
        for i in 0..100u16 {
            assert!(input.pointer(i, i, 0, (640, 480)));
        }
        let kept = MAX_PENDING / 3 * 3;
        assert_eq!(lock(&input.state).pending.len(), kept);
        assert_eq!(input.stats.dropped.load(Ordering::Relaxed), (100 * 3 - kept) as u64);
        // Buffers come: the oldest reports first, in order, whole.
        post(&mut d, 0, QUEUE_SIZE);
        let got = received(&mut d, usize::from(QUEUE_SIZE));
        assert_eq!(got[0], (EV_ABS, ABS_X, 0));
        assert_eq!(got[3], (EV_ABS, ABS_X, 51), "report 1 at x = 1");
        assert!(got[..63].chunks(3).all(|r| r[2] == (EV_SYN, SYN_REPORT, 0)));
        assert_eq!(lock(&input.state).pending.len(), kept - usize::from(QUEUE_SIZE));
    }

    #[test]
    fn a_buffer_the_device_may_not_write_breaks_the_tablet_until_reset() {
        let (mut d, input) = tablet();
        d.write_desc(EVENTQ, 0, Desc { addr: BUFFERS, len: 8, flags: 0, next: 0 });
        d.push_avail(EVENTQ, 0);
        d.kick(EVENTQ);
        input.pointer(1, 1, 0, (640, 480));
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert!(!input.driver_ready(), "events go to the PS/2 mouse meanwhile");
        assert_eq!(input.stats.malformed.load(Ordering::Relaxed), 1);
        // A short buffer too; then a reset brings a working tablet.
        d.init();
        d.write_desc(EVENTQ, 0, Desc { addr: BUFFERS, len: 4, flags: DESC_F_WRITE, next: 0 });
        d.push_avail(EVENTQ, 0);
        d.kick(EVENTQ);
        input.pointer(1, 1, 0, (640, 480));
        assert_eq!(input.stats.malformed.load(Ordering::Relaxed), 2);
        d.init();
        post(&mut d, 0, 8);
        assert!(input.pointer(2, 2, 1, (640, 480)));
        assert_eq!(received(&mut d, 4)[2], (EV_KEY, BTN_LEFT, 1));
    }

    #[test]
    fn the_status_queue_is_drained() {
        let (mut d, _) = tablet();
        d.write_desc(STATUSQ, 0, Desc { addr: BUFFERS, len: 8, flags: 0, next: 0 });
        d.push_avail(STATUSQ, 0);
        d.kick(STATUSQ);
        assert_eq!(d.completions(STATUSQ, WAIT), [(0, 0)]);
    }

    /// A saved tablet, loaded into a new device on the same memory, delivers the events that were waiting
    /// and remembers the buttons held.
    #[test]
    fn waiting_events_and_the_buttons_survive_a_machine_state() {
        use crate::pci::PciDevice;
        let (mut d, input) = tablet();
        input.pointer(10, 10, 1, (640, 480));
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();
        post(&mut d, 0, 8);
        assert!(d.completions(EVENTQ, Duration::from_millis(200)).is_empty(), "nothing moves while saved");

        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let tablet = VirtioTablet::new(interrupt.clone()).unwrap();
        let input2 = tablet.input().clone();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(tablet, 0xC000_0000, 16, interrupt, d.mem.clone(), None, None).unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        fresh.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        d.device = fresh;
        assert!(input2.driver_ready());
        d.kick(EVENTQ);
        assert_eq!(received(&mut d, 4)[2], (EV_KEY, BTN_LEFT, 1), "the waiting report");
        // The button held before stays held: releasing it is a change.
        input2.pointer(10, 10, 0, (640, 480));
        assert_eq!(received(&mut d, 4)[2], (EV_KEY, BTN_LEFT, 0));
    }
}
