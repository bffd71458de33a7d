//! virtio-input (virtio 1.x §5.8) in two profiles: a tablet — an absolute pointer with three buttons and a
//! wheel, so a guest's cursor sits exactly where the console's pointer is (a PS/2 mouse only moves by
//! deltas, which the guest accelerates, and drifts) — and a keyboard (the keys the console sends, with
//! autorepeat done by the guest and Caps/Num/Scroll Lock LEDs).
//!
//! The device answers the configuration queries (name, ids, the event types and codes it sends, the axes'
//! ranges) and puts input events (8 bytes: type, code, value, little-endian) in the buffers the driver posts
//! on its event queue. Events wait in a bounded queue while the driver has no buffer (a guest that stops
//! reading costs at most [`MAX_PENDING`] events; later reports are dropped whole and counted). The status
//! queue carries events from the driver to the device: the keyboard keeps the latest LED states
//! ([`InputHandle::leds`]), everything else is completed and ignored. A malformed chain sets NEEDS_RESET of
//! this device only. [`InputHandle::pointer`] and [`InputHandle::key`] say whether the guest's driver took
//! the event, so the VMM can fall back to the PS/2 mouse and keyboard for firmware and boot loaders
//! ([`KeyRoute`] keeps a key's release on the device that got its press).

use std::collections::{HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt, avail_within_queue};
use crate::devices::bus::lock;
use crate::rfb::keymap::{EXTENDED, Key};

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
const EV_LED: u16 = 0x11;
const EV_REP: u16 = 0x14;
const SYN_REPORT: u16 = 0;
const BTN_LEFT: u16 = 0x110;
const BTN_RIGHT: u16 = 0x111;
const BTN_MIDDLE: u16 = 0x112;
const REL_WHEEL: u16 = 0x08;
const ABS_X: u16 = 0x00;
const ABS_Y: u16 = 0x01;
const LED_NUML: u16 = 0x00;
const LED_CAPSL: u16 = 0x01;
const LED_SCROLLL: u16 = 0x02;
const REP_DELAY: u16 = 0x00;
const REP_PERIOD: u16 = 0x01;
/// `BUS_VIRTUAL`.
const BUS_VIRTUAL: u16 = 0x06;

// Configuration selectors (virtio 1.2 §5.8.5).
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;

/// The names the guest sees (`/proc/bus/input/devices`).
pub const TABLET_NAME: &str = "Porthole tablet";
pub const KEYBOARD_NAME: &str = "Porthole keyboard";

/// What a virtio-input device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Absolute X/Y, left/middle/right buttons, a wheel.
    Tablet,
    /// The keys of [`linux_key`], autorepeat, Num/Caps/Scroll Lock LEDs.
    Keyboard,
}

impl Profile {
    /// The device's name for the guest.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Tablet => TABLET_NAME,
            Profile::Keyboard => KEYBOARD_NAME,
        }
    }

    /// A word for logs and thread names.
    fn label(self) -> &'static str {
        match self {
            Profile::Tablet => "tablet",
            Profile::Keyboard => "keyboard",
        }
    }
}

/// The Linux key codes (`KEY_*`) of the extended (0xE0-prefixed) keys we send, by their set-1 code.
const EXTENDED_KEYS: [(Key, u16); 18] = [
    (EXTENDED | 0x1C, 96),  // KEY_KPENTER
    (EXTENDED | 0x1D, 97),  // KEY_RIGHTCTRL
    (EXTENDED | 0x35, 98),  // KEY_KPSLASH
    (EXTENDED | 0x37, 99),  // KEY_SYSRQ (Print Screen)
    (EXTENDED | 0x38, 100), // KEY_RIGHTALT
    (EXTENDED | 0x47, 102), // KEY_HOME
    (EXTENDED | 0x48, 103), // KEY_UP
    (EXTENDED | 0x49, 104), // KEY_PAGEUP
    (EXTENDED | 0x4B, 105), // KEY_LEFT
    (EXTENDED | 0x4D, 106), // KEY_RIGHT
    (EXTENDED | 0x4F, 107), // KEY_END
    (EXTENDED | 0x50, 108), // KEY_DOWN
    (EXTENDED | 0x51, 109), // KEY_PAGEDOWN
    (EXTENDED | 0x52, 110), // KEY_INSERT
    (EXTENDED | 0x53, 111), // KEY_DELETE
    (EXTENDED | 0x5B, 125), // KEY_LEFTMETA
    (EXTENDED | 0x5C, 126), // KEY_RIGHTMETA
    (EXTENDED | 0x5D, 127), // KEY_COMPOSE (Menu)
];

/// The Linux key code (`KEY_*`) of a PC key (set-1 make code, 0xE000 for the extended keys), or None for
/// keys the virtio keyboard does not have (they go to the PS/2 keyboard). The main block, the function
/// keys and the keypad keep their set-1 code (KEY_ESC = 1 … KEY_KPDOT = 0x53, KEY_102ND = 0x56,
/// KEY_F11 = 0x57, KEY_F12 = 0x58); the extended keys have codes of their own.
pub fn linux_key(key: Key) -> Option<u16> {
    match key {
        0x01..=0x53 | 0x56..=0x58 => Some(key),
        _ => EXTENDED_KEYS.iter().find(|(k, _)| *k == key).map(|&(_, code)| code),
    }
}

/// Every key code the keyboard sends (its EV_KEY bits).
fn keyboard_codes() -> Vec<u16> {
    (0x01..=0x53).chain(0x56..=0x58).chain(EXTENDED_KEYS.iter().map(|&(_, code)| code)).collect()
}

/// The keyboard's lock LEDs as the guest last set them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leds {
    pub num_lock: bool,
    pub caps_lock: bool,
    pub scroll_lock: bool,
}

impl Leds {
    fn from_bits(bits: u8) -> Self {
        Leds { num_lock: bits & 1 != 0, caps_lock: bits & 2 != 0, scroll_lock: bits & 4 != 0 }
    }
}

/// One input event as the driver reads it.
type Event = [u8; 8];

fn event(kind: u16, code: u16, value: i32) -> Event {
    let mut e = [0u8; 8];
    e[0..2].copy_from_slice(&kind.to_le_bytes());
    e[2..4].copy_from_slice(&code.to_le_bytes());
    e[4..8].copy_from_slice(&value.to_le_bytes());
    e
}

/// Counters of an input device.
#[derive(Debug, Default)]
pub struct InputStats {
    /// Events the guest's driver received.
    pub events: AtomicU64,
    /// Events dropped because the driver left no room for them.
    pub dropped: AtomicU64,
    /// Malformed chains (each breaks the device until the driver resets it).
    pub malformed: AtomicU64,
    /// Events the driver sent on the status queue.
    pub status_events: AtomicU64,
}

/// The queues while the driver is up.
struct Active {
    mem: GuestMemoryMmap,
    eventq: Queue,
    statusq: Queue,
}

/// Key codes below this are tracked as held (every code the keyboard sends is).
const KEY_TRACKED: usize = 256;

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Events for the driver, oldest first.
    pending: VecDeque<Event>,
    /// The tablet: the RFB button mask of the last pointer event.
    buttons: u8,
    /// The keyboard: the keys held (by Linux key code), so that a key sent down again is a repeat.
    keys: [u64; KEY_TRACKED / 64],
    /// The keyboard: the LEDs the guest set (bit 0 Num, 1 Caps, 2 Scroll Lock).
    leds: u8,
    /// Serving stopped while a machine state is saved.
    quiesced: bool,
}

impl State {
    /// Sets or clears key `code`'s held bit; returns whether it was held.
    fn hold(&mut self, code: u16, held: bool) -> bool {
        let (word, bit) = (usize::from(code) / 64, 1u64 << (code % 64));
        let Some(w) = self.keys.get_mut(word) else { return false };
        let was = *w & bit != 0;
        if held {
            *w |= bit
        } else {
            *w &= !bit
        }
        was
    }
}

/// The device's side that the VMM's input path holds (one per boot).
pub struct InputHandle {
    profile: Profile,
    interrupt: Arc<VirtioInterrupt>,
    state: Mutex<State>,
    pub stats: InputStats,
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
    /// A status buffer that the device may not read, or shorter than an event.
    BadStatusBuffer,
    /// A descriptor outside guest memory, or the used ring.
    OutsideMemory,
}

impl InputHandle {
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Whether the guest's driver is up (events go to it, not to the PS/2 device).
    pub fn driver_ready(&self) -> bool {
        lock(&self.state).active.is_some()
    }

    /// The keyboard's LEDs as the guest last set them (all off until it does).
    pub fn leds(&self) -> Leds {
        Leds::from_bits(lock(&self.state).leds)
    }

    /// An RFB pointer event at (`x`, `y`) on a screen of `screen` pixels with RFB's button mask (1 left,
    /// 2 middle, 4 right, 8/16 wheel up/down). Returns false, sending nothing, while the guest's driver is
    /// not up (and always for a keyboard).
    pub fn pointer(&self, x: u16, y: u16, mask: u8, screen: (u32, u32)) -> bool {
        if self.profile != Profile::Tablet {
            return false;
        }
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
        self.report(&mut state, &batch[..n]);
        true
    }

    /// Presses (`down`) or releases a PC key (set-1 code, 0xE000 for the extended keys). A key sent down
    /// while held is an autorepeat (value 2). Returns false, sending nothing, while the guest's driver is
    /// not up, for a key the keyboard does not have, and always for a tablet.
    pub fn key(&self, key: Key, down: bool) -> bool {
        if self.profile != Profile::Keyboard {
            return false;
        }
        let Some(code) = linux_key(key) else { return false };
        let mut state = lock(&self.state);
        if state.active.is_none() {
            return false;
        }
        let was_held = state.hold(code, down);
        let value = match (down, was_held) {
            (true, true) => 2,
            (true, false) => 1,
            (false, _) => 0,
        };
        self.report(&mut state, &[event(EV_KEY, code, value), event(EV_SYN, SYN_REPORT, 0)]);
        true
    }

    /// Queues a whole report (or drops it whole if the guest does not read) and delivers what fits.
    fn report(&self, state: &mut State, batch: &[Event]) {
        if state.pending.len() + batch.len() > MAX_PENDING {
            self.stats.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
        } else {
            state.pending.extend(batch);
        }
        self.deliver(state);
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

    /// Takes the status queue's events (one 8-byte event per chain, as Linux sends them): LED states are
    /// kept (a keyboard's), the rest (autorepeat settings, a tablet's anything) is completed and ignored.
    fn drain_status(&self, state: &mut State) {
        if state.quiesced {
            return;
        }
        let State { active, leds, .. } = state;
        let Some(a) = active.as_mut() else { return };
        let mut used = false;
        let result = (|| -> Result<(), Malformed> {
            loop {
                if !avail_within_queue(&a.statusq, &a.mem) {
                    return Err(Malformed::AvailJump);
                }
                let Some(chain) = a.statusq.pop_descriptor_chain(&a.mem) else { return Ok(()) };
                let head = chain.head_index();
                let Some(d) = chain.into_iter().next() else { return Err(Malformed::BadStatusBuffer) };
                if d.is_write_only() || (d.len() as usize) < 8 {
                    return Err(Malformed::BadStatusBuffer);
                }
                let mut e = [0u8; 8];
                a.mem.read_slice(&mut e, d.addr()).map_err(|_| Malformed::OutsideMemory)?;
                self.stats.status_events.fetch_add(1, Ordering::Relaxed);
                let kind = u16::from_le_bytes([e[0], e[1]]);
                let code = u16::from_le_bytes([e[2], e[3]]);
                let on = i32::from_le_bytes([e[4], e[5], e[6], e[7]]) != 0;
                if self.profile == Profile::Keyboard && kind == EV_LED && code <= LED_SCROLLL {
                    let bit = 1u8 << code;
                    if on { *leds |= bit } else { *leds &= !bit }
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
            "{}: malformed descriptor chain ({what:?}); the device needs a reset (guest driver error)",
            self.profile.label()
        );
        state.active = None;
        state.pending.clear();
        self.interrupt.mark_needs_reset();
    }

    fn thread(&self) {
        const EVENTQ_KICK: u64 = 1;
        const STATUSQ_KICK: u64 = 2;
        const WAKE: u64 = 3;
        let label = self.profile.label();
        let Ok(epoll) = Epoll::new() else {
            log::error!("{label}: cannot create its thread's epoll; the device stays idle");
            return;
        };
        for (fd, token) in [
            (self.eventq_kick.as_raw_fd(), EVENTQ_KICK),
            (self.statusq_kick.as_raw_fd(), STATUSQ_KICK),
            (self.wake.as_raw_fd(), WAKE),
        ] {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
                log::error!("{label}: cannot watch a descriptor ({e}); the device stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); 3];
        while !self.shutdown.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("{label}: its thread cannot wait ({e}); the device stays idle");
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

/// Which device each held key went to (the virtio keyboard or the PS/2 one), so that its release, and the
/// console's autorepeat of it, go to the same device: a driver that comes up (or goes away) while a key is
/// held leaves no key stuck. One per boot (the devices are new then).
#[derive(Debug, Default)]
pub struct KeyRoute {
    virtio: HashSet<Key>,
    ps2: HashSet<Key>,
}

impl KeyRoute {
    /// Routes a key event: `to_virtio` sends it to the virtio keyboard and says whether the keyboard took
    /// it. Returns true when the event went to the virtio keyboard (or was a release of a key it holds),
    /// false when the caller sends it to the PS/2 keyboard.
    pub fn route(&mut self, key: Key, down: bool, to_virtio: impl FnOnce() -> bool) -> bool {
        if !down {
            self.ps2.remove(&key);
            if self.virtio.remove(&key) {
                // A keyboard whose driver went away meanwhile forgot the key with it.
                to_virtio();
                return true;
            }
            return false;
        }
        if self.ps2.contains(&key) {
            return false;
        }
        if to_virtio() {
            self.virtio.insert(key);
            return true;
        }
        self.virtio.remove(&key);
        self.ps2.insert(key);
        false
    }
}

/// A virtio-input device on the PCI transport.
pub struct VirtioInput {
    input: Arc<InputHandle>,
    max_sizes: [u16; 2],
    /// The configuration selector and sub-selector the driver wrote.
    select: u8,
    subsel: u8,
    thread: Option<JoinHandle<()>>,
}

impl VirtioInput {
    /// A device of `profile` raising `interrupt`; starts its (idle) thread, which inherits the caller's
    /// seccomp filter.
    pub fn new(profile: Profile, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let input = Arc::new(InputHandle {
            profile,
            interrupt,
            state: Mutex::new(State::default()),
            stats: InputStats::default(),
            eventq_kick: EventFd::new(libc::EFD_NONBLOCK)?,
            statusq_kick: EventFd::new(libc::EFD_NONBLOCK)?,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            shutdown: AtomicBool::new(false),
        });
        let i = input.clone();
        let thread = std::thread::Builder::new().name(profile.label().into()).spawn(move || i.thread())?;
        Ok(VirtioInput { input, max_sizes: [QUEUE_SIZE; 2], select: 0, subsel: 0, thread: Some(thread) })
    }

    /// The side the input path sends events to.
    pub fn input(&self) -> &Arc<InputHandle> {
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
        let profile = self.input.profile;
        match (self.select, u16::from(self.subsel), profile) {
            (CFG_ID_NAME, _, _) => profile.name().as_bytes().to_vec(),
            (CFG_ID_DEVIDS, _, _) => {
                let product = match profile {
                    Profile::Tablet => 0x0001,
                    Profile::Keyboard => 0x0002,
                };
                let mut b = Vec::with_capacity(8);
                for v in [BUS_VIRTUAL, 0x0000, product, 0x0001] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b
            }
            (CFG_EV_BITS, EV_KEY, Profile::Tablet) => bits(&[BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]),
            (CFG_EV_BITS, EV_REL, Profile::Tablet) => bits(&[REL_WHEEL]),
            (CFG_EV_BITS, EV_ABS, Profile::Tablet) => bits(&[ABS_X, ABS_Y]),
            (CFG_ABS_INFO, ABS_X | ABS_Y, Profile::Tablet) => {
                // min, max, fuzz, flat, res
                let mut b = Vec::with_capacity(20);
                for v in [0u32, ABS_MAX, 0, 0, 0] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b
            }
            (CFG_EV_BITS, EV_KEY, Profile::Keyboard) => bits(&keyboard_codes()),
            // Autorepeat: the guest's input core repeats held keys (a non-empty answer is all it asks).
            (CFG_EV_BITS, EV_REP, Profile::Keyboard) => bits(&[REP_DELAY, REP_PERIOD]),
            (CFG_EV_BITS, EV_LED, Profile::Keyboard) => bits(&[LED_NUML, LED_CAPSL, LED_SCROLLL]),
            // No serial (CFG_ID_SERIAL), no properties (CFG_PROP_BITS), nothing else.
            _ => Vec::new(),
        }
    }
}

impl VirtioDevice for VirtioInput {
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
        state.keys = Default::default();
        state.leds = 0;
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

    /// The selectors, the button mask, the events the driver has not taken yet; a keyboard adds its LEDs
    /// and the keys held.
    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.input.state);
        w.u8(self.select);
        w.u8(self.subsel);
        w.u8(state.buttons);
        w.u32(state.pending.len() as u32);
        for e in &state.pending {
            w.bytes(e);
        }
        if self.input.profile == Profile::Keyboard {
            w.u8(state.leds);
            for k in state.keys {
                w.u64(k);
            }
        }
    }

    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let label = self.input.profile.label();
        let (select, subsel, buttons) = (r.u8()?, r.u8()?, r.u8()?);
        let count = r.u32()? as usize;
        if count > MAX_PENDING {
            return Err(crate::snapshot::StateError::Damaged(format!(
                "a {label} with {count} events waiting (at most {MAX_PENDING})"
            )));
        }
        let mut pending = VecDeque::with_capacity(count);
        for _ in 0..count {
            pending.push_back(r.fixed::<8>()?);
        }
        let mut leds = 0;
        let mut keys = [0u64; KEY_TRACKED / 64];
        if self.input.profile == Profile::Keyboard {
            leds = r.u8()?;
            if leds > 7 {
                return Err(crate::snapshot::StateError::Damaged(format!("keyboard LEDs {leds:#x}")));
            }
            for k in &mut keys {
                *k = r.u64()?;
            }
        }
        self.select = select;
        self.subsel = subsel;
        let mut state = lock(&self.input.state);
        state.buttons = buttons;
        state.pending = pending;
        state.leds = leds;
        state.keys = keys;
        Ok(())
    }
}

impl Drop for VirtioInput {
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

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::VIRTIO_CONFIG_S_NEEDS_RESET;
    use crate::virtio::host_driver::{DESC_F_WRITE, Desc, HostDriver, HostInputDriver, INPUT_EVENTS};

    /// Event buffers: buffer i at BUFFERS + 8 * i.
    const BUFFERS: u64 = INPUT_EVENTS;
    const WAIT: Duration = Duration::from_secs(5);

    fn device(profile: Profile) -> (HostInputDriver, Arc<InputHandle>) {
        let d = HostInputDriver::new(profile).unwrap();
        let input = d.input().clone();
        (d, input)
    }

    /// Posts event buffers `first..first + count` (descriptor i is buffer i).
    fn post(d: &mut HostDriver<VirtioInput>, first: u16, count: u16) {
        for i in first..first + count {
            let desc = Desc { addr: BUFFERS + 8 * u64::from(i), len: 8, flags: DESC_F_WRITE, next: 0 };
            d.write_desc(EVENTQ, i % QUEUE_SIZE, desc);
            d.push_avail(EVENTQ, i % QUEUE_SIZE);
        }
        d.kick(EVENTQ);
    }

    /// The events the driver got, as (type, code, value).
    fn received(d: &mut HostInputDriver, want: usize) -> Vec<(u16, u16, i32)> {
        let mut out = Vec::new();
        while out.len() < want {
            let got = d.events(WAIT);
            assert!(!got.is_empty(), "only {} of {want} events came: {out:?}", out.len());
            assert_eq!(d.malformed, 0, "a completion of another length than 8");
            out.extend(got);
        }
        out
    }

    /// The configuration's `size` and payload for `select`/`subsel`.
    fn query(d: &mut HostDriver<VirtioInput>, select: u8, subsel: u8) -> Vec<u8> {
        d.write_config(0, &[select, subsel]);
        let mut config = [0u8; 136];
        d.read_config(0, &mut config);
        assert_eq!((config[0], config[1]), (select, subsel));
        config[8..8 + usize::from(config[2])].to_vec()
    }

    #[test]
    fn the_configuration_describes_an_absolute_pointer_with_three_buttons_and_a_wheel() {
        let (mut d, _) = device(Profile::Tablet);
        assert_eq!(query(&mut d, CFG_ID_NAME, 0), TABLET_NAME.as_bytes());
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
        let idle = VirtioInput::new(Profile::Tablet, interrupt).unwrap();
        assert!(!idle.input().pointer(1, 1, 0, (640, 480)), "no driver yet: the PS/2 mouse takes it");

        let (mut d, input) = device(Profile::Tablet);
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
        let (mut d, input) = device(Profile::Tablet);
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
        let (mut d, input) = device(Profile::Tablet);
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
        let (mut d, _) = device(Profile::Tablet);
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
        let (mut d, input) = device(Profile::Tablet);
        input.pointer(10, 10, 1, (640, 480));
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();
        post(&mut d, 0, 8);
        assert!(d.completions(EVENTQ, Duration::from_millis(200)).is_empty(), "nothing moves while saved");

        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let tablet = VirtioInput::new(Profile::Tablet, interrupt.clone()).unwrap();
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

    /// Status buffers: buffer i at STATUS_BUFFERS + 8 * i.
    const STATUS_BUFFERS: u64 = 0x2_8000;

    /// Posts one status event per chain (as Linux sends them), descriptors `first..`.
    fn send_status(d: &mut HostDriver<VirtioInput>, first: u16, events: &[(u16, u16, i32)]) {
        for (i, &(kind, code, value)) in events.iter().enumerate() {
            let index = first + i as u16;
            let addr = STATUS_BUFFERS + 8 * u64::from(index);
            d.mem.write_obj(event(kind, code, value), GuestAddress(addr)).unwrap();
            d.write_desc(STATUSQ, index, Desc { addr, len: 8, flags: 0, next: 0 });
            d.push_avail(STATUSQ, index);
        }
        d.kick(STATUSQ);
    }

    /// Waits for `count` status buffers to come back.
    fn status_done(d: &mut HostDriver<VirtioInput>, count: usize) {
        let mut done = 0;
        while done < count {
            let got = d.completions(STATUSQ, WAIT);
            assert!(!got.is_empty(), "only {done} of {count} status buffers came back");
            done += got.len();
        }
    }

    fn has_bit(bits: &[u8], code: u16) -> bool {
        bits.get(usize::from(code) / 8).is_some_and(|b| b & (1 << (code % 8)) != 0)
    }

    #[test]
    fn the_keyboard_configuration_lists_its_keys_autorepeat_and_leds() {
        let (mut d, _) = device(Profile::Keyboard);
        assert_eq!(query(&mut d, CFG_ID_NAME, 0), KEYBOARD_NAME.as_bytes());
        let ids = query(&mut d, CFG_ID_DEVIDS, 0);
        assert_eq!((&ids[..2], &ids[4..6]), (&BUS_VIRTUAL.to_le_bytes()[..], &[2u8, 0][..]), "its own product id");
        let keys = query(&mut d, CFG_EV_BITS, EV_KEY as u8);
        // KEY_ESC 1, KEY_ENTER 28, KEY_A 30, KEY_F12 88, KEY_KPENTER 96, KEY_UP 103, KEY_DELETE 111, KEY_COMPOSE 127.
        for code in [1, 28, 30, 57, 83, 86, 88, 96, 97, 99, 100, 103, 111, 125, 127] {
            assert!(has_bit(&keys, code), "KEY code {code} in {keys:?}");
        }
        for code in [0, 84, 85, 89, 101, 112, BTN_LEFT] {
            assert!(!has_bit(&keys, code), "no KEY code {code}");
        }
        assert_eq!(keys.len(), 16, "codes up to 127");
        assert!(!query(&mut d, CFG_EV_BITS, EV_REP as u8).is_empty(), "autorepeat");
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_LED as u8), [0b111], "Num, Caps and Scroll Lock");
        for subsel in [EV_ABS, EV_REL, EV_SYN, 0x04, 0x05, 0x12] {
            assert!(query(&mut d, CFG_EV_BITS, subsel as u8).is_empty(), "no event type {subsel:#x}");
        }
        assert!(query(&mut d, CFG_ABS_INFO, ABS_X as u8).is_empty());
        // The tablet has no LEDs and no autorepeat.
        let (mut t, _) = device(Profile::Tablet);
        assert!(query(&mut t, CFG_EV_BITS, EV_LED as u8).is_empty());
        assert!(query(&mut t, CFG_EV_BITS, EV_REP as u8).is_empty());
    }

    /// Every key the console can send from a keysym has a Linux key code of its own.
    #[test]
    fn every_console_key_has_a_distinct_linux_key_code() {
        use crate::rfb::keymap::keysym_to_key;
        let mut codes = std::collections::HashMap::new();
        for keysym in (0x20..0x7F).chain(0xFE00..=0xFFFF) {
            let Some(key) = keysym_to_key(keysym) else { continue };
            let code = linux_key(key).unwrap_or_else(|| panic!("keysym {keysym:#x} (key {key:#x}) has no KEY code"));
            if let Some(other) = codes.insert(code, key) {
                assert_eq!(other, key, "KEY code {code} for keys {other:#x} and {key:#x}");
            }
        }
        assert_eq!(linux_key(0x1E), Some(30), "KEY_A");
        assert_eq!(linux_key(0x58), Some(88), "KEY_F12");
        assert_eq!(linux_key(EXTENDED | 0x1D), Some(97), "KEY_RIGHTCTRL");
        assert_eq!(linux_key(crate::rfb::keymap::PRINT_SCREEN), Some(99), "KEY_SYSRQ");
        assert_eq!(linux_key(EXTENDED | 0x5D), Some(127), "KEY_COMPOSE");
        assert_eq!(linux_key(0x54), None, "no Alt+SysRq code of its own");
        assert_eq!(linux_key(EXTENDED | 0x20), None, "no multimedia keys");
    }

    #[test]
    fn keys_reach_the_driver_as_presses_repeats_and_releases() {
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let idle = VirtioInput::new(Profile::Keyboard, interrupt).unwrap();
        assert!(!idle.input().key(0x1E, true), "no driver yet: the PS/2 keyboard takes it");

        let (mut d, input) = device(Profile::Keyboard);
        post(&mut d, 0, 32);
        assert!(input.driver_ready());
        assert!(input.key(0x1E, true));
        assert_eq!(received(&mut d, 2), [(EV_KEY, 30, 1), (EV_SYN, SYN_REPORT, 0)]);
        assert!(input.key(0x1E, true), "the console's autorepeat");
        assert_eq!(received(&mut d, 2), [(EV_KEY, 30, 2), (EV_SYN, SYN_REPORT, 0)]);
        assert!(input.key(0x1E, false));
        assert_eq!(received(&mut d, 2), [(EV_KEY, 30, 0), (EV_SYN, SYN_REPORT, 0)]);
        assert!(input.key(0x1E, true), "pressed again after the release: a press");
        assert_eq!(received(&mut d, 2), [(EV_KEY, 30, 1), (EV_SYN, SYN_REPORT, 0)]);
        assert!(input.key(EXTENDED | 0x48, true));
        assert!(input.key(EXTENDED | 0x48, false));
        assert_eq!(
            received(&mut d, 4),
            [(EV_KEY, 103, 1), (EV_SYN, SYN_REPORT, 0), (EV_KEY, 103, 0), (EV_SYN, SYN_REPORT, 0)],
            "KEY_UP"
        );
        assert!(!input.key(0x54, true), "a key it does not have goes to PS/2");
        assert!(!input.pointer(1, 1, 1, (640, 480)), "a keyboard is no pointer");
        assert_eq!(input.stats.events.load(Ordering::Relaxed), 12);

        let (mut t, tablet) = device(Profile::Tablet);
        post(&mut t, 0, 8);
        assert!(tablet.driver_ready());
        assert!(!tablet.key(0x1E, true), "a tablet has no keys");
    }

    #[test]
    fn the_keyboard_keeps_the_leds_the_guest_sets() {
        let (mut d, input) = device(Profile::Keyboard);
        post(&mut d, 0, 8);
        assert_eq!(input.leds(), Leds::default());
        send_status(
            &mut d,
            0,
            &[
                (EV_LED, LED_CAPSL, 1),
                (EV_LED, LED_NUML, 1),
                (EV_REP, REP_DELAY, 250),
                (EV_LED, LED_SCROLLL, 1),
                (EV_LED, LED_NUML, 0),
                (EV_LED, 7, 1),
            ],
        );
        status_done(&mut d, 6);
        assert_eq!(input.leds(), Leds { num_lock: false, caps_lock: true, scroll_lock: true });
        assert_eq!(input.stats.status_events.load(Ordering::Relaxed), 6);
        send_status(&mut d, 6, &[(EV_LED, LED_CAPSL, 0), (EV_LED, LED_SCROLLL, 0)]);
        status_done(&mut d, 2);
        assert_eq!(input.leds(), Leds::default());
        // A tablet ignores LED events.
        let (mut t, tablet) = device(Profile::Tablet);
        post(&mut t, 0, 8);
        send_status(&mut t, 0, &[(EV_LED, LED_CAPSL, 1)]);
        status_done(&mut t, 1);
        assert_eq!(tablet.leds(), Leds::default());
    }

    #[test]
    fn a_status_buffer_the_device_may_not_read_breaks_the_keyboard_until_reset() {
        let (mut d, input) = device(Profile::Keyboard);
        post(&mut d, 0, 8);
        // Write-only (a device-readable buffer is what the driver must send).
        d.write_desc(STATUSQ, 0, Desc { addr: STATUS_BUFFERS, len: 8, flags: DESC_F_WRITE, next: 0 });
        d.push_avail(STATUSQ, 0);
        d.kick(STATUSQ);
        let deadline = std::time::Instant::now() + WAIT;
        while input.driver_ready() {
            assert!(std::time::Instant::now() < deadline, "the device never refused the buffer");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert!(!input.key(0x1E, true), "keys go to the PS/2 keyboard meanwhile");
        assert_eq!(input.stats.malformed.load(Ordering::Relaxed), 1);
        // Shorter than an event; then outside memory; each breaks it again after a reset.
        for desc in [
            Desc { addr: STATUS_BUFFERS, len: 4, flags: 0, next: 0 },
            Desc { addr: 0x10_0000, len: 8, flags: 0, next: 0 },
        ] {
            d.init();
            post(&mut d, 0, 8);
            let before = input.stats.malformed.load(Ordering::Relaxed);
            d.write_desc(STATUSQ, 0, desc);
            d.push_avail(STATUSQ, 0);
            d.kick(STATUSQ);
            let deadline = std::time::Instant::now() + WAIT;
            while input.stats.malformed.load(Ordering::Relaxed) == before {
                assert!(std::time::Instant::now() < deadline, "{desc:?} was taken");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(!input.driver_ready());
        }
        // An event buffer the device may not write, on the keyboard too.
        d.init();
        d.write_desc(EVENTQ, 0, Desc { addr: BUFFERS, len: 8, flags: 0, next: 0 });
        d.push_avail(EVENTQ, 0);
        d.kick(EVENTQ);
        input.key(0x1E, true);
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert_eq!(input.stats.malformed.load(Ordering::Relaxed), 4);
        // A reset brings a working keyboard, its LEDs off.
        d.init();
        post(&mut d, 0, 8);
        assert!(input.key(0x1E, true));
        assert_eq!(received(&mut d, 2)[0], (EV_KEY, 30, 1));
    }

    /// A saved keyboard, loaded into a new device, keeps its LEDs, the keys held and the waiting events.
    #[test]
    fn the_keyboard_leds_and_held_keys_survive_a_machine_state() {
        use crate::pci::PciDevice;
        let (mut d, input) = device(Profile::Keyboard);
        post(&mut d, 0, 2);
        send_status(&mut d, 0, &[(EV_LED, LED_NUML, 1)]);
        status_done(&mut d, 1);
        assert!(input.key(0x2A, true), "left shift held");
        assert_eq!(received(&mut d, 2)[0], (EV_KEY, 42, 1));
        assert!(input.key(0x1E, true), "waits: no buffer");
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();

        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let keyboard = VirtioInput::new(Profile::Keyboard, interrupt.clone()).unwrap();
        let input2 = keyboard.input().clone();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(keyboard, 0xC000_0000, 16, interrupt, d.mem.clone(), None, None)
                .unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        fresh.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        d.device = fresh;
        assert!(input2.driver_ready());
        assert_eq!(input2.leds(), Leds { num_lock: true, ..Leds::default() });
        post(&mut d, 2, 8);
        assert_eq!(received(&mut d, 2), [(EV_KEY, 30, 1), (EV_SYN, SYN_REPORT, 0)], "the waiting report");
        assert!(input2.key(0x2A, true));
        assert_eq!(received(&mut d, 2)[0], (EV_KEY, 42, 2), "shift is still held: a repeat");
    }

    /// A keyboard's state does not load into a tablet (nor the reverse): the layouts differ.
    #[test]
    fn a_keyboard_state_is_not_a_tablet_state() {
        use crate::pci::PciDevice;
        let (mut d, _) = device(Profile::Keyboard);
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let tablet = VirtioInput::new(Profile::Tablet, interrupt.clone()).unwrap();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(tablet, 0xC000_0000, 16, interrupt, d.mem.clone(), None, None).unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        let loaded = fresh.restore_state(&mut r).and_then(|()| r.finish());
        assert!(loaded.is_err(), "a keyboard's state loaded into a tablet");
    }

    #[test]
    fn a_key_is_released_on_the_device_that_got_its_press() {
        let mut route = KeyRoute::default();
        let sent = std::cell::RefCell::new(Vec::new());
        let virtio = |up: bool| {
            let sent = &sent;
            move || {
                sent.borrow_mut().push(up);
                up
            }
        };
        // Before the driver: PS/2 (the keyboard refuses).
        assert!(!route.route(0x1E, true, virtio(false)));
        // The driver comes up while 'a' is held: its repeats and its release stay on PS/2, untried.
        assert!(!route.route(0x1E, true, virtio(true)));
        assert!(!route.route(0x1E, false, virtio(true)));
        assert_eq!(sent.borrow().len(), 1, "the keyboard was only asked for the first press");
        // Now 'a' goes to the keyboard, and so does its release even if the driver went away meanwhile.
        assert!(route.route(0x1E, true, virtio(true)));
        assert!(route.route(0x1E, false, virtio(false)));
        // Held on the keyboard, whose driver goes away: the next press of it goes to PS/2.
        assert!(route.route(0x30, true, virtio(true)));
        assert!(!route.route(0x30, true, virtio(false)));
        assert!(!route.route(0x30, false, virtio(true)));
        // A release of a key never pressed goes to PS/2 (as before the virtio keyboard).
        assert!(!route.route(0x31, false, virtio(true)));
    }
}
