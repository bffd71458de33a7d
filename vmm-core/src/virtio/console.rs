//! virtio-console (virtio 1.x §5.3) with multiple ports, carrying one named port (Linux shows it as
//! `/dev/virtio-ports/NAME`) to a [`PortBackend`] on the host: today the SPICE agent's
//! `com.redhat.spice.0` ([`crate::vdagent`]).
//!
//! With MULTIPORT the driver and the device talk on the control queues: the driver says it is ready, the
//! device adds its port (id 1: port 0 is the legacy console, which this device does not add), the driver
//! says the port is ready, the device names it and says the host end is open; the driver then says when
//! a guest program opens and closes the port. Port data flows on the port's receive (to the guest) and
//! transmit queues. Bytes for the guest wait in the backend (bounded there) until the driver posts
//! buffers; what the guest writes goes to the backend as it comes. A malformed chain sets NEEDS_RESET of
//! this device only.

use std::collections::VecDeque;
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

/// virtio-console's device ID.
pub const DEVICE_TYPE: u16 = 3;
const F_MULTIPORT: u64 = 1 << 1;
pub const QUEUE_SIZE: u16 = 64;
/// Ports the device has room for: the legacy console's 0 (never added) and ours, 1.
const MAX_PORTS: u32 = 2;
/// Our port's id.
pub const PORT: u32 = 1;
/// Queues: port 0's receive and transmit, the control receive and transmit, port 1's receive and transmit.
const QUEUES: usize = 6;
// Queue 0, port 0's receive queue, is never used: the port is not added.
const PORT0_TX: usize = 1;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
const PORT_RX: usize = 4;
const PORT_TX: usize = 5;

// Control events.
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
const CONTROL_HEADER: usize = 8;
/// Control messages waiting for driver buffers (the handshake needs three).
const MAX_CONTROL_PENDING: usize = 16;
/// Most bytes taken from one chain of the transmit queue (Linux writes at most a page or so per buffer).
const MAX_TX_CHAIN: u32 = 1 << 20;

/// The host end of a port.
pub trait PortBackend: Send + Sync {
    /// The port's name, as the guest sees it.
    fn name(&self) -> &str;
    /// A guest program opened (true) or closed the port.
    fn guest_open(&self, open: bool);
    /// Bytes the guest wrote.
    fn received(&self, bytes: &[u8]);
    /// Whether bytes wait for the guest.
    fn has_output(&self) -> bool;
    /// Takes up to `max` of the bytes waiting for the guest.
    fn take_output(&self, max: usize) -> Vec<u8>;
    /// Readable while bytes wait for the guest.
    fn wake_fd(&self) -> &EventFd;
    /// The backend's state for a machine-state file.
    fn save(&self, w: &mut crate::snapshot::Writer);
    fn restore(&self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError>;
}

impl PortBackend for crate::vdagent::Agent {
    fn name(&self) -> &str {
        crate::vdagent::PORT_NAME
    }
    fn guest_open(&self, open: bool) {
        crate::vdagent::Agent::guest_open(self, open)
    }
    fn received(&self, bytes: &[u8]) {
        crate::vdagent::Agent::received(self, bytes)
    }
    fn has_output(&self) -> bool {
        crate::vdagent::Agent::has_output(self)
    }
    fn take_output(&self, max: usize) -> Vec<u8> {
        crate::vdagent::Agent::take_output(self, max)
    }
    fn wake_fd(&self) -> &EventFd {
        crate::vdagent::Agent::wake_fd(self)
    }
    fn save(&self, w: &mut crate::snapshot::Writer) {
        crate::vdagent::Agent::save(self, w)
    }
    fn restore(&self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        crate::vdagent::Agent::restore(self, r)
    }
}

/// Counters of the device.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    /// Bytes the guest wrote to the port, and bytes it received.
    pub bytes_from_guest: AtomicU64,
    pub bytes_to_guest: AtomicU64,
    /// Control messages from the driver.
    pub control_messages: AtomicU64,
    /// Malformed chains (each breaks the device until the driver resets it).
    pub malformed: AtomicU64,
}

/// Why a chain was refused.
#[derive(Debug)]
enum Malformed {
    /// The avail index ran more than a queue's worth ahead.
    AvailJump,
    /// A receive buffer the device may not write, or shorter than the message.
    BadReceiveBuffer,
    /// A transmit buffer the device may not read, or longer than [`MAX_TX_CHAIN`].
    BadTransmitBuffer,
    /// A control message shorter than its header.
    ShortControl,
    /// A descriptor outside guest memory, or the used ring.
    OutsideMemory,
}

/// The queues while the driver is up.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Control messages for the driver, oldest first.
    control: VecDeque<Vec<u8>>,
    /// The driver said the port is ready (it has its device node).
    port_ready: bool,
    /// A guest program holds the port open.
    guest_open: bool,
    /// Serving stopped while a machine state is saved.
    quiesced: bool,
}

/// The device's side shared with its thread.
struct Shared {
    backend: Arc<dyn PortBackend>,
    interrupt: Arc<VirtioInterrupt>,
    state: Mutex<State>,
    stats: Arc<ConsoleStats>,
    kicks: [EventFd; QUEUES],
    /// Wakes the thread: activation, reset, shutdown.
    wake: EventFd,
    shutdown: AtomicBool,
}

fn control_message(id: u32, event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTROL_HEADER + extra.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(extra);
    m
}

/// The next chain the driver made available on `queue`, if any. A queue the driver left disabled has no
/// rings to read (Linux enables them all; a driver may leave port 0's alone): None. An avail index run
/// more than a queue ahead is malformed.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>>, Malformed> {
    if !queue.ready() {
        return Ok(None);
    }
    if !avail_within_queue(queue, mem) {
        return Err(Malformed::AvailJump);
    }
    Ok(queue.pop_descriptor_chain(mem))
}

/// Interrupts for `queue` unless the driver asked not to be (event index, flags).
fn notify(interrupt: &VirtioInterrupt, a: &mut Active, queue: usize) {
    if a.queues[queue].needs_notification(&a.mem).unwrap_or(true) {
        interrupt.signal_queue(queue);
    }
}

impl Shared {
    fn queue_control(&self, state: &mut State, message: Vec<u8>) {
        if state.control.len() < MAX_CONTROL_PENDING {
            state.control.push_back(message);
        }
    }

    /// Handles the control messages the driver sent.
    fn drain_control(&self, state: &mut State) -> Result<(), Malformed> {
        let Some(a) = state.active.as_mut() else { return Ok(()) };
        let mut messages = Vec::new();
        let mut used = false;
        let result = (|| -> Result<(), Malformed> {
            loop {
                let Some(chain) = next_chain(&mut a.queues[CONTROL_TX], &a.mem)? else { return Ok(()) };
                let head = chain.head_index();
                let mut header = [0u8; CONTROL_HEADER];
                let mut got = 0;
                for d in chain {
                    if d.is_write_only() {
                        return Err(Malformed::BadTransmitBuffer);
                    }
                    let take = (d.len() as usize).min(CONTROL_HEADER - got);
                    a.mem.read_slice(&mut header[got..got + take], d.addr()).map_err(|_| Malformed::OutsideMemory)?;
                    got += take;
                    if got == CONTROL_HEADER {
                        break;
                    }
                }
                if got < CONTROL_HEADER {
                    return Err(Malformed::ShortControl);
                }
                a.queues[CONTROL_TX].add_used(&a.mem, head, 0).map_err(|_| Malformed::OutsideMemory)?;
                used = true;
                messages.push(header);
            }
        })();
        if used {
            notify(&self.interrupt, a, CONTROL_TX);
        }
        for m in messages {
            self.stats.control_messages.fetch_add(1, Ordering::Relaxed);
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            match event {
                DEVICE_READY if value == 1 => {
                    self.queue_control(state, control_message(PORT, DEVICE_ADD, 1, &[]));
                }
                DEVICE_READY => log::warn!("serial port: the guest's driver failed to set up"),
                PORT_READY if id == PORT && value == 1 => {
                    state.port_ready = true;
                    let name = self.backend.name().as_bytes().to_vec();
                    self.queue_control(state, control_message(PORT, PORT_NAME, 1, &name));
                    // The host end is always open.
                    self.queue_control(state, control_message(PORT, PORT_OPEN, 1, &[]));
                }
                PORT_OPEN if id == PORT => {
                    let open = value != 0;
                    if open != state.guest_open {
                        state.guest_open = open;
                        self.backend.guest_open(open);
                    }
                }
                _ => log::debug!("serial port: control event {event} for port {id} ignored"),
            }
        }
        result
    }

    /// Puts waiting control messages in the driver's buffers.
    fn deliver_control(&self, state: &mut State) -> Result<(), Malformed> {
        let State { active, control, .. } = state;
        let Some(a) = active.as_mut() else { return Ok(()) };
        let mut used = false;
        let result = (|| -> Result<(), Malformed> {
            while let Some(message) = control.front() {
                let Some(chain) = next_chain(&mut a.queues[CONTROL_RX], &a.mem)? else { return Ok(()) };
                let head = chain.head_index();
                let written = write_chain(&a.mem, chain, message)?;
                if written < message.len() {
                    return Err(Malformed::BadReceiveBuffer);
                }
                a.queues[CONTROL_RX].add_used(&a.mem, head, written as u32).map_err(|_| Malformed::OutsideMemory)?;
                used = true;
                control.pop_front();
            }
            Ok(())
        })();
        if used {
            notify(&self.interrupt, a, CONTROL_RX);
        }
        result
    }

    /// Takes what the guest wrote to the port (and completes anything written to port 0, which has no
    /// host end).
    fn drain_transmit(&self, state: &mut State, queue: usize) -> Result<(), Malformed> {
        let Some(a) = state.active.as_mut() else { return Ok(()) };
        let mut used = false;
        let mut bytes = Vec::new();
        let result = (|| -> Result<(), Malformed> {
            loop {
                let Some(chain) = next_chain(&mut a.queues[queue], &a.mem)? else { return Ok(()) };
                let head = chain.head_index();
                let mut total = 0u32;
                for d in chain {
                    total = total.saturating_add(d.len());
                    if d.is_write_only() || total > MAX_TX_CHAIN {
                        return Err(Malformed::BadTransmitBuffer);
                    }
                    if queue == PORT_TX {
                        let start = bytes.len();
                        bytes.resize(start + d.len() as usize, 0);
                        a.mem.read_slice(&mut bytes[start..], d.addr()).map_err(|_| Malformed::OutsideMemory)?;
                    }
                }
                a.queues[queue].add_used(&a.mem, head, 0).map_err(|_| Malformed::OutsideMemory)?;
                used = true;
                if bytes.len() >= MAX_TX_CHAIN as usize {
                    self.stats.bytes_from_guest.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.backend.received(&std::mem::take(&mut bytes));
                }
            }
        })();
        if used {
            notify(&self.interrupt, a, queue);
        }
        if !bytes.is_empty() {
            self.stats.bytes_from_guest.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.backend.received(&bytes);
        }
        result
    }

    /// Moves bytes waiting for the guest into the port's receive buffers while a guest program has it open.
    fn deliver_port(&self, state: &mut State) -> Result<(), Malformed> {
        if !state.guest_open {
            return Ok(());
        }
        let Some(a) = state.active.as_mut() else { return Ok(()) };
        let mut used = false;
        let result = (|| -> Result<(), Malformed> {
            while self.backend.has_output() {
                let Some(chain) = next_chain(&mut a.queues[PORT_RX], &a.mem)? else { return Ok(()) };
                let head = chain.head_index();
                let descriptors: Vec<_> = chain.collect();
                let mut room = 0usize;
                for d in &descriptors {
                    if !d.is_write_only() {
                        return Err(Malformed::BadReceiveBuffer);
                    }
                    room = room.saturating_add(d.len() as usize);
                }
                let data = self.backend.take_output(room.min(MAX_TX_CHAIN as usize));
                let mut at = 0;
                for d in &descriptors {
                    let n = (d.len() as usize).min(data.len() - at);
                    if n == 0 {
                        break;
                    }
                    a.mem.write_slice(&data[at..at + n], d.addr()).map_err(|_| Malformed::OutsideMemory)?;
                    at += n;
                }
                a.queues[PORT_RX].add_used(&a.mem, head, at as u32).map_err(|_| Malformed::OutsideMemory)?;
                self.stats.bytes_to_guest.fetch_add(at as u64, Ordering::Relaxed);
                used = true;
            }
            Ok(())
        })();
        if used {
            notify(&self.interrupt, a, PORT_RX);
        }
        result
    }

    /// Does everything there is to do; a malformed chain breaks the device until the driver resets it.
    fn service(&self, state: &mut State) {
        if state.quiesced || state.active.is_none() {
            return;
        }
        let result = self
            .drain_control(state)
            .and_then(|()| self.deliver_control(state))
            .and_then(|()| self.drain_transmit(state, PORT_TX))
            .and_then(|()| self.drain_transmit(state, PORT0_TX))
            .and_then(|()| self.deliver_port(state));
        if let Err(what) = result {
            let first = self.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0;
            let level = if first { log::Level::Warn } else { log::Level::Debug };
            log::log!(level, "serial port: malformed descriptor chain ({what:?}); the device needs a reset");
            self.disconnect(state);
            state.active = None;
            self.interrupt.mark_needs_reset();
        }
    }

    /// Forgets the driver's port state (reset, malformed chain): the backend sees the port closed.
    fn disconnect(&self, state: &mut State) {
        state.control.clear();
        state.port_ready = false;
        if std::mem::take(&mut state.guest_open) {
            self.backend.guest_open(false);
        }
    }

    fn thread(&self) {
        const WAKE: u64 = QUEUES as u64;
        const BACKEND: u64 = QUEUES as u64 + 1;
        let Ok(epoll) = Epoll::new() else {
            log::error!("serial port: cannot create its thread's epoll; the device stays idle");
            return;
        };
        let mut fds: Vec<(i32, u64)> = self.kicks.iter().enumerate().map(|(i, k)| (k.as_raw_fd(), i as u64)).collect();
        fds.push((self.wake.as_raw_fd(), WAKE));
        fds.push((self.backend.wake_fd().as_raw_fd(), BACKEND));
        for (fd, token) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
                log::error!("serial port: cannot watch a descriptor ({e}); the device stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); QUEUES + 2];
        // Whether the backend's descriptor is in the epoll set.
        let mut watching = true;
        while !self.shutdown.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("serial port: its thread cannot wait ({e}); the device stays idle");
                    return;
                }
            };
            let mut state = lock(&self.state);
            let mut backend_ready = false;
            for e in &events[..n] {
                match e.data() {
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    BACKEND => backend_ready = true,
                    i => {
                        let _ = self.kicks[i as usize].read();
                    }
                }
            }
            self.service(&mut state);
            // Output the guest cannot take now (no buffer, port closed) must not spin the thread: the
            // backend's descriptor stays readable, so stop watching it until the guest posts or opens.
            let watch = !(backend_ready && self.backend.has_output());
            if watch != watching {
                let op = if watch { ControlOperation::Add } else { ControlOperation::Delete };
                let token = EpollEvent::new(EventSet::IN, BACKEND);
                if epoll.ctl(op, self.backend.wake_fd().as_raw_fd(), token).is_ok() {
                    watching = watch;
                }
            }
        }
    }
}

/// Writes `data` into the write-only buffers of `chain`; returns how much fit.
fn write_chain<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    data: &[u8],
) -> Result<usize, Malformed> {
    let mut at = 0;
    for d in chain {
        if !d.is_write_only() {
            return Err(Malformed::BadReceiveBuffer);
        }
        let n = (d.len() as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], d.addr()).map_err(|_| Malformed::OutsideMemory)?;
        at += n;
        if at == data.len() {
            break;
        }
    }
    Ok(at)
}

/// A virtio-console device with one named port, on the PCI transport.
pub struct VirtioConsole {
    shared: Arc<Shared>,
    max_sizes: [u16; QUEUES],
    thread: Option<JoinHandle<()>>,
}

impl VirtioConsole {
    /// A device whose port is `backend`'s, raising `interrupt`; starts its (idle) thread, which inherits
    /// the caller's seccomp filter.
    pub fn new(backend: Arc<dyn PortBackend>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let kick = || EventFd::new(libc::EFD_NONBLOCK);
        let shared = Arc::new(Shared {
            backend,
            interrupt,
            state: Mutex::new(State::default()),
            stats: Arc::new(ConsoleStats::default()),
            kicks: [kick()?, kick()?, kick()?, kick()?, kick()?, kick()?],
            wake: kick()?,
            shutdown: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("serial-port".into()).spawn(move || s.thread())?;
        Ok(VirtioConsole { shared, max_sizes: [QUEUE_SIZE; QUEUES], thread: Some(thread) })
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<ConsoleStats> {
        self.shared.stats.clone()
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        &self.shared.kicks[index.min(QUEUES - 1)]
    }

    /// cols (u16), rows (u16), max_nr_ports (u32), emerg_wr (u32): no size, two ports.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&MAX_PORTS.to_le_bytes());
        let start = offset as usize;
        match config.get(start..start.saturating_add(data.len())) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) {
        if activation.queues.len() != QUEUES {
            log::warn!(
                "serial port: the driver set up {} queues of {QUEUES}; the device stays idle",
                activation.queues.len()
            );
            return;
        }
        {
            let mut state = lock(&self.shared.state);
            self.shared.disconnect(&mut state);
            state.active = Some(Active { mem: activation.mem, queues: activation.queues });
            state.quiesced = false;
        }
        let _ = self.shared.wake.write(1);
    }

    fn reset(&mut self) {
        let mut state = lock(&self.shared.state);
        self.shared.disconnect(&mut state);
        state.active = None;
        state.quiesced = false;
    }

    /// Chains are handled holding the state lock, so taking it waits for one in progress.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.shared.state);
        state.quiesced = true;
        let Some(a) = state.active.as_ref() else { return Ok(Vec::new()) };
        Ok(a.queues.iter().map(|q| q.state()).collect())
    }

    fn resume_requests(&mut self) {
        lock(&self.shared.state).quiesced = false;
        let _ = self.shared.wake.write(1);
    }

    /// The port's state, the control messages not delivered yet, then the backend's.
    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.shared.state);
        w.bool(state.port_ready);
        w.bool(state.guest_open);
        w.u32(state.control.len() as u32);
        for m in &state.control {
            w.bytes(m);
        }
        self.shared.backend.save(w);
    }

    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (port_ready, guest_open) = (r.bool()?, r.bool()?);
        let count = r.u32()? as usize;
        if count > MAX_CONTROL_PENDING {
            return Err(crate::snapshot::StateError::Damaged(format!(
                "a serial port with {count} control messages waiting (at most {MAX_CONTROL_PENDING})"
            )));
        }
        let mut control = VecDeque::with_capacity(count);
        for _ in 0..count {
            control.push_back(r.bytes(CONTROL_HEADER + 256)?.to_vec());
        }
        self.shared.backend.restore(r)?;
        let mut state = lock(&self.shared.state);
        state.port_ready = port_ready;
        state.guest_open = guest_open;
        state.control = control;
        drop(state);
        let _ = self.shared.wake.write(1);
        Ok(())
    }
}

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        lock(&self.shared.state).active = None;
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::vdagent::Agent;
    use crate::vdagent::tests as agent;
    use crate::virtio::host_driver::{DESC_F_WRITE, Desc, HostDriver};

    const WAIT: Duration = Duration::from_secs(5);
    /// Buffers: control receive i at CONTROL_BUFS + i * 256, port receive i at PORT_BUFS + i * 4096, and
    /// what the driver sends at SEND (each message its own 64 KiB slot).
    const CONTROL_BUFS: u64 = 0x2_0000;
    const PORT_BUFS: u64 = 0x4_0000;
    const SEND: u64 = 0x10_0000;
    const RAM: usize = 0x40_0000;

    /// A guest's virtio-console driver with the agent's port, brought up to the point where the device
    /// added the port and a guest program opened it.
    struct Guest {
        d: HostDriver<VirtioConsole>,
        agent: Arc<Agent>,
        clipboard: Arc<Mutex<Vec<String>>>,
        stats: Arc<ConsoleStats>,
        /// Descriptor ids used next on each queue.
        next: [u16; QUEUES],
        sent: u64,
    }

    impl Guest {
        fn new() -> Guest {
            Guest::with_queues(&[QUEUE_SIZE; QUEUES])
        }

        /// A driver that sets up queue i with `sizes[i]` entries (0: left disabled).
        fn with_queues(sizes: &[u16]) -> Guest {
            let clipboard = Arc::new(Mutex::new(Vec::new()));
            let sink = clipboard.clone();
            let agent = Arc::new(Agent::new(Box::new(move |t| lock(&sink).push(t))).unwrap());
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
            let device = VirtioConsole::new(agent.clone(), interrupt.clone()).unwrap();
            let stats = device.stats();
            // What sits where a disabled queue's rings would be (address 0) is no avail index to follow.
            mem.write_slice(&[0x34, 0x12, 0x34, 0x12], GuestAddress(0)).unwrap();
            let d = HostDriver::new(device, interrupt, mem, sizes);
            Guest { d, agent, clipboard, stats, next: [0; QUEUES], sent: 0 }
        }

        fn desc(&mut self, queue: usize, d: Desc) {
            let i = self.next[queue] % QUEUE_SIZE;
            self.next[queue] = self.next[queue].wrapping_add(1);
            self.d.write_desc(queue, i, d);
            self.d.push_avail(queue, i);
        }

        fn post_control(&mut self, count: u16) {
            for _ in 0..count {
                let i = self.next[CONTROL_RX] % QUEUE_SIZE;
                let addr = CONTROL_BUFS + 256 * u64::from(i);
                self.desc(CONTROL_RX, Desc { addr, len: 256, flags: DESC_F_WRITE, next: 0 });
            }
            self.d.kick(CONTROL_RX);
        }

        fn post_port(&mut self, count: u16) {
            for _ in 0..count {
                let i = self.next[PORT_RX] % QUEUE_SIZE;
                let addr = PORT_BUFS + 4096 * u64::from(i);
                self.desc(PORT_RX, Desc { addr, len: 4096, flags: DESC_F_WRITE, next: 0 });
            }
            self.d.kick(PORT_RX);
        }

        /// Sends `bytes` on `queue` (the transmit queues) in one buffer.
        fn send(&mut self, queue: usize, bytes: &[u8]) {
            let addr = SEND + (self.sent % 16) * 0x1_0000;
            self.sent += 1;
            self.d.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            self.desc(queue, Desc { addr, len: bytes.len() as u32, flags: 0, next: 0 });
            self.d.kick(queue);
            assert_eq!(self.d.completions(queue, WAIT).len(), 1, "the device completes what the guest sent");
        }

        fn control(&mut self, id: u32, event: u16, value: u16) {
            self.send(CONTROL_TX, &control_message(id, event, value, &[]));
        }

        /// The control messages the device sent: (id, event, value, extra bytes).
        fn control_received(&mut self) -> Vec<(u32, u16, u16, Vec<u8>)> {
            let mut out = Vec::new();
            for (head, len) in self.d.completions(CONTROL_RX, WAIT) {
                let mut b = vec![0u8; len as usize];
                self.d.mem.read_slice(&mut b, GuestAddress(CONTROL_BUFS + 256 * u64::from(head))).unwrap();
                out.push((
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    u16::from_le_bytes([b[4], b[5]]),
                    u16::from_le_bytes([b[6], b[7]]),
                    b[8..].to_vec(),
                ));
            }
            out
        }

        /// The agent messages that arrive on the port within `WAIT` (until `count` have).
        fn agent_messages(&mut self, count: usize) -> Vec<(u32, Vec<u8>)> {
            let mut bytes = Vec::new();
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                for (head, len) in self.d.completions(PORT_RX, Duration::from_millis(100)) {
                    let mut b = vec![0u8; len as usize];
                    self.d.mem.read_slice(&mut b, GuestAddress(PORT_BUFS + 4096 * u64::from(head))).unwrap();
                    bytes.extend_from_slice(&b);
                }
                let messages = agent::parse(&bytes);
                if messages.len() >= count || std::time::Instant::now() > deadline {
                    return messages;
                }
            }
        }

        /// The driver's side of the handshake, up to a guest program opening the port.
        fn open_port(&mut self) {
            self.post_control(8);
            self.control(0, DEVICE_READY, 1);
            let added = self.control_received();
            assert_eq!(added, [(PORT, DEVICE_ADD, 1, vec![])]);
            self.post_port(16);
            self.control(PORT, PORT_READY, 1);
            let mut got = self.control_received();
            if got.len() < 2 {
                got.extend(self.control_received());
            }
            assert_eq!(
                got,
                [(PORT, PORT_NAME, 1, b"com.redhat.spice.0".to_vec()), (PORT, PORT_OPEN, 1, vec![])],
                "the port is named, and the host end is open"
            );
            self.control(PORT, PORT_OPEN, 1);
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_agent_port_is_announced_named_and_carries_the_clipboard() {
        let mut g = Guest::new();
        let mut config = [0u8; 12];
        g.d.read_config(0, &mut config);
        assert_eq!(u32::from_le_bytes([config[4], config[5], config[6], config[7]]), MAX_PORTS);
        g.agent.set_clipboard("from the console".into());
        g.open_port();
        // The guest program opened the port: the host announces itself and asks for the agent's.
        let hello = g.agent_messages(1);
        assert_eq!(hello[0].0, agent::TYPE_CAPS);
        g.send(PORT_TX, &agent::agent_announce());
        let answer = g.agent_messages(2);
        let kinds: Vec<u32> = answer.iter().map(|m| m.0).collect();
        assert_eq!(kinds, [agent::TYPE_CAPS, agent::TYPE_GRAB], "the console's text is offered to the guest");
        g.send(PORT_TX, &agent::request_text());
        let text = g.agent_messages(1);
        assert_eq!((text[0].0, &text[0].1[4..]), (agent::TYPE_CLIPBOARD, &b"from the console"[..]));

        // The guest copies: the host asks for the text, which reaches the console.
        g.send(PORT_TX, &agent::grab_text());
        assert_eq!(g.agent_messages(1)[0].0, agent::TYPE_REQUEST);
        // Written in pieces, as a program's writes may come.
        let reply = agent::clipboard_text("copied in the guest");
        g.send(PORT_TX, &reply[..10]);
        g.send(PORT_TX, &reply[10..]);
        wait_for("the guest's text", || lock(&g.clipboard).len() == 1);
        assert_eq!(lock(&g.clipboard)[0], "copied in the guest");
        assert!(g.stats.bytes_from_guest.load(Ordering::Relaxed) > 0);
        assert!(g.stats.bytes_to_guest.load(Ordering::Relaxed) > 0);

        // The program closes the port: the agent is gone until it opens again.
        g.control(PORT, PORT_OPEN, 0);
        wait_for("the agent to go", || !g.agent.connected());
        assert_eq!(g.stats.malformed.load(Ordering::Relaxed), 0);
        assert_eq!(g.d.status() & 0x40, 0);
    }

    /// A driver may leave port 0's queues disabled (the port is never added): the device does not read
    /// rings at their zero addresses.
    #[test]
    fn queues_left_disabled_are_not_served() {
        let mut g = Guest::with_queues(&[0, 0, QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]);
        g.open_port();
        assert_eq!(g.agent_messages(1)[0].0, agent::TYPE_CAPS);
        g.send(PORT_TX, &agent::agent_announce());
        wait_for("the agent", || g.agent.connected());
        assert_eq!(g.stats.malformed.load(Ordering::Relaxed), 0);
        assert_eq!(g.d.status() & 0x40, 0);
    }

    #[test]
    fn a_guest_that_never_reads_costs_bounded_memory() {
        let mut g = Guest::new();
        g.post_control(8);
        g.control(0, DEVICE_READY, 1);
        g.control_received();
        g.control(PORT, PORT_READY, 1);
        g.control(PORT, PORT_OPEN, 1);
        g.send(PORT_TX, &agent::agent_announce());
        // No receive buffer on the port: the console keeps asking to paste a megabyte.
        g.agent.set_clipboard("y".repeat(crate::vdagent::MAX_TEXT));
        for _ in 0..20 {
            g.send(PORT_TX, &agent::request_text());
        }
        assert!(g.agent.stats.dropped.load(Ordering::Relaxed) > 0, "replies beyond the bound are dropped");
        // The device still serves its queues: buffers posted now receive what waits, in order.
        g.post_port(32);
        let first = g.agent_messages(1);
        assert_eq!(first[0].0, agent::TYPE_CAPS);
        assert_eq!(g.d.status() & 0x40, 0);
    }

    #[test]
    fn malformed_chains_break_only_this_device_until_it_is_reset() {
        let mut g = Guest::new();
        g.open_port();
        // A transmit buffer the device may only write.
        g.d.mem.write_slice(&[0u8; 8], GuestAddress(SEND)).unwrap();
        g.desc(PORT_TX, Desc { addr: SEND, len: 8, flags: DESC_F_WRITE, next: 0 });
        g.d.kick(PORT_TX);
        wait_for("NEEDS_RESET", || g.stats.malformed.load(Ordering::Relaxed) == 1);
        assert_ne!(g.d.status() & 0x40, 0);
        wait_for("the agent to go", || !g.agent.connected() && !g.agent.has_output());
        // A short control message, after a reset.
        g.d.init();
        g.next = [0; QUEUES];
        g.desc(CONTROL_TX, Desc { addr: SEND, len: 4, flags: 0, next: 0 });
        g.d.kick(CONTROL_TX);
        wait_for("NEEDS_RESET", || g.stats.malformed.load(Ordering::Relaxed) == 2);
        // A descriptor outside guest memory on the receive queue.
        g.d.init();
        g.next = [0; QUEUES];
        g.desc(CONTROL_RX, Desc { addr: RAM as u64 - 4, len: 256, flags: DESC_F_WRITE, next: 0 });
        g.d.kick(CONTROL_RX);
        g.control(0, DEVICE_READY, 1);
        wait_for("NEEDS_RESET", || g.stats.malformed.load(Ordering::Relaxed) == 3);
        // And after a reset the port works again.
        g.d.init();
        g.next = [0; QUEUES];
        g.open_port();
        assert_eq!(g.agent_messages(1)[0].0, agent::TYPE_CAPS);
    }

    /// A saved device, loaded into a new one (and a new agent) on the same memory, goes on where it was:
    /// the agent stays connected and a clipboard message cut in two by the save arrives whole.
    #[test]
    fn the_port_and_the_agent_survive_a_machine_state() {
        use crate::pci::PciDevice;
        let mut g = Guest::new();
        g.open_port();
        g.agent_messages(1);
        g.send(PORT_TX, &agent::agent_announce());
        g.agent_messages(1);
        let reply = agent::clipboard_text("across the save");
        g.send(PORT_TX, &reply[..12]);
        let mut w = crate::snapshot::Writer::new();
        g.d.device.save_state(&mut w).unwrap();

        let clipboard = Arc::new(Mutex::new(Vec::new()));
        let sink = clipboard.clone();
        let agent2 = Arc::new(Agent::new(Box::new(move |t| lock(&sink).push(t))).unwrap());
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let device = VirtioConsole::new(agent2.clone(), interrupt.clone()).unwrap();
        let mut fresh =
            crate::virtio::pci::VirtioPci::new(device, 0xC000_0000, 16, interrupt, g.d.mem.clone(), None, None)
                .unwrap();
        let mut r = crate::snapshot::Reader::new("pci", &w.buf);
        fresh.restore_state(&mut r).unwrap();
        r.finish().unwrap();
        g.d.device = fresh;
        assert!(agent2.connected(), "the agent's capabilities came back");
        g.send(PORT_TX, &reply[12..]);
        wait_for("the guest's text", || lock(&clipboard).len() == 1);
        assert_eq!(lock(&clipboard)[0], "across the save");
        assert!(lock(&g.clipboard).is_empty());
        // The restored agent answers on the port.
        agent2.set_clipboard("after".into());
        assert_eq!(g.agent_messages(1)[0].0, agent::TYPE_GRAB);

        // A damaged state is refused.
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let agent3 = Arc::new(Agent::new(Box::new(|_| {})).unwrap());
        let device = VirtioConsole::new(agent3, interrupt.clone()).unwrap();
        let mut other =
            crate::virtio::pci::VirtioPci::new(device, 0xC000_0000, 16, interrupt, g.d.mem.clone(), None, None)
                .unwrap();
        assert!(other.restore_state(&mut crate::snapshot::Reader::new("pci", &w.buf[..w.buf.len() - 3])).is_err());
    }
}
