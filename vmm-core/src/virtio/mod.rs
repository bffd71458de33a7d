//! Virtio 1.x devices (virtio-queue split rings) on the modern PCI transport ([`pci`]).
//!
//! A device implements [`VirtioDevice`]: its features, configuration space and queues. The transport owns
//! the negotiation (status, features, queue set-up) and hands the device its queues at `DRIVER_OK`.

pub mod balloon;
pub mod block;
pub mod console;
pub mod gpu;
pub mod host_driver;
pub mod input;
pub mod net;
pub mod pci;
pub mod scsi;
pub mod sound;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};

use crate::pci::msix::Msix;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};

/// ISR bits (virtio 1.x §4.1.4.5).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// A device's interrupt: MSI-X vectors once the driver enables them (one per queue and one for
/// configuration changes, as the driver assigns them), else the ISR status byte and the INTx line behind a
/// KVM irqfd with a resample fd (level-triggered: KVM lowers the line at the guest's EOI and signals
/// `resample`; the event loop then raises it again while the ISR still has bits set). Also carries the
/// device's "needs reset" flag, which its I/O threads set when the driver breaks the rules.
pub struct VirtioInterrupt {
    isr: AtomicU8,
    needs_reset: AtomicBool,
    line: EventFd,
    resample: EventFd,
    /// The transport's MSI-X vectors (set once, by the transport).
    msix: OnceLock<Arc<Msix>>,
    /// The vector of configuration changes and of each queue ([`NO_VECTOR`]: none).
    config_vector: AtomicU16,
    queue_vectors: [AtomicU16; MAX_QUEUES],
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xFFFF;
/// Most queues a device has here.
pub const MAX_QUEUES: usize = 8;

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt").field("isr", &self.isr).field("needs_reset", &self.needs_reset).finish()
    }
}

impl VirtioInterrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(VirtioInterrupt {
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            line: EventFd::new(libc::EFD_NONBLOCK)?,
            resample: EventFd::new(libc::EFD_NONBLOCK)?,
            msix: OnceLock::new(),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: std::array::from_fn(|_| AtomicU16::new(NO_VECTOR)),
        })
    }

    /// Gives the interrupt its transport's MSI-X vectors (once).
    pub fn set_msix(&self, msix: Arc<Msix>) {
        let _ = self.msix.set(msix);
    }

    /// The MSI-X vectors, when the driver has enabled them.
    fn msix_enabled(&self) -> Option<&Arc<Msix>> {
        self.msix.get().filter(|m| m.enabled())
    }

    /// The configuration-change vector, as the driver set it.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    /// Queue `index`'s vector, as the driver set it.
    pub fn queue_vector(&self, index: usize) -> u16 {
        self.queue_vectors.get(index).map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub fn set_queue_vector(&self, index: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(index) {
            v.store(vector, Ordering::Release);
        }
    }

    /// The eventfd registered as the irqfd.
    pub fn line(&self) -> &EventFd {
        &self.line
    }

    /// The eventfd KVM signals at the guest's end of interrupt.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    fn raise(&self, bit: u8) {
        self.isr.fetch_or(bit, Ordering::AcqRel);
        let _ = self.line.write(1);
    }

    /// The device put buffers in the used ring of queue `index`.
    pub fn signal_queue(&self, index: usize) {
        match self.msix_enabled() {
            Some(msix) => {
                let vector = self.queue_vector(index);
                if vector != NO_VECTOR {
                    msix.fire(vector);
                }
            }
            None => self.raise(ISR_QUEUE),
        }
    }

    /// The device put buffers in used rings (of any of its queues).
    pub fn signal_used(&self) {
        match self.msix_enabled() {
            Some(msix) => {
                let mut fired = 0u64;
                for v in &self.queue_vectors {
                    let vector = v.load(Ordering::Acquire);
                    if usize::from(vector) < 64 && fired & (1 << vector) == 0 {
                        fired |= 1 << vector;
                        msix.fire(vector);
                    }
                }
            }
            None => self.raise(ISR_QUEUE),
        }
    }

    /// The device's configuration changed (or it needs a reset).
    pub fn signal_config(&self) {
        match self.msix_enabled() {
            Some(msix) => {
                let vector = self.config_vector();
                if vector != NO_VECTOR {
                    msix.fire(vector);
                }
            }
            None => self.raise(ISR_CONFIG),
        }
    }

    /// The driver broke the rules: the device stops and says it needs a reset.
    pub fn mark_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// A guest read of the ISR register: returns the bits and clears them (which lowers the line).
    pub fn read_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// The guest acknowledged the interrupt (EOI): raise the line again if something is still pending.
    pub fn resample(&self) {
        let _ = self.resample.read();
        if self.isr.load(Ordering::Acquire) != 0 {
            let _ = self.line.write(1);
        }
    }

    /// The interrupt state for a machine-state file: ISR bits, NEEDS_RESET, the vectors.
    pub fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u8(self.isr.load(Ordering::Acquire));
        w.bool(self.needs_reset());
        w.u16(self.config_vector());
        for v in &self.queue_vectors {
            w.u16(v.load(Ordering::Acquire));
        }
    }

    /// Loads what [`save`](Self::save) wrote; a pending ISR raises the line again.
    pub fn restore(&self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (isr, needs_reset, config_vector) = (r.u8()?, r.bool()?, r.u16()?);
        let mut vectors = [NO_VECTOR; MAX_QUEUES];
        for v in &mut vectors {
            *v = r.u16()?;
        }
        self.isr.store(isr & (ISR_QUEUE | ISR_CONFIG), Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
        self.set_config_vector(config_vector);
        for (slot, v) in self.queue_vectors.iter().zip(vectors) {
            slot.store(v, Ordering::Release);
        }
        if isr != 0 {
            let _ = self.line.write(1);
        }
        Ok(())
    }

    /// Device reset: nothing pending, no longer broken, no vectors assigned (the MSI-X table and its
    /// enable bit are the PCI function's, which a virtio reset leaves alone).
    pub fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// The queues, configured by the driver (sizes, addresses, event index).
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub driver_features: u64,
}

/// A queue's state in a machine-state file.
pub fn save_queue(w: &mut crate::snapshot::Writer, q: &virtio_queue::QueueState) {
    w.u16(q.max_size);
    w.u16(q.next_avail);
    w.u16(q.next_used);
    w.bool(q.event_idx_enabled);
    w.u16(q.size);
    w.bool(q.ready);
    w.u64(q.desc_table);
    w.u64(q.avail_ring);
    w.u64(q.used_ring);
}

/// Loads what [`save_queue`] wrote into a queue of at most `max_size` entries (checked by virtio-queue).
pub fn restore_queue(r: &mut crate::snapshot::Reader, max_size: u16) -> Result<Queue, crate::snapshot::StateError> {
    let saved_max = r.u16()?;
    let state = virtio_queue::QueueState {
        max_size,
        next_avail: r.u16()?,
        next_used: r.u16()?,
        event_idx_enabled: r.bool()?,
        size: r.u16()?,
        ready: r.bool()?,
        desc_table: r.u64()?,
        avail_ring: r.u64()?,
        used_ring: r.u64()?,
    };
    if saved_max != max_size {
        return Err(crate::snapshot::StateError::Damaged(format!(
            "a virtio queue of at most {saved_max} entries, this device's has {max_size}"
        )));
    }
    Queue::try_from(state)
        .map_err(|e| crate::snapshot::StateError::Damaged(format!("a virtio queue cannot be set up: {e:?}")))
}

/// Whether the driver's avail index is at most a queue's worth ahead of the device (further is a driver
/// bug, or an attack).
pub(crate) fn avail_within_queue(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    matches!(queue.avail_idx(mem, Ordering::Acquire),
        Ok(avail) if (avail - std::num::Wrapping(queue.next_avail())).0 <= queue.size())
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2: block, 8: SCSI host).
    fn device_type(&self) -> u16;
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// The eventfd the driver's notifications of queue `index` arrive on.
    fn queue_event(&self, index: usize) -> &EventFd;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Bumps when the configuration changes behind the driver's back (e.g. new media).
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation);
    /// Stops serving (waiting for requests in flight) and forgets the queues.
    fn reset(&mut self);

    /// For a machine-state file, while the device is active: stops taking requests and waits until none
    /// is in flight (so it no longer touches guest memory or its queues), then returns each queue's live
    /// state. [`resume_requests`](Self::resume_requests) undoes it. A device whose state cannot be saved
    /// says what it is.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        Err(match self.device_type() {
            1 => "a virtio-net network card: its state is not saved yet".into(),
            8 => "a virtio-scsi controller (CD/DVD drive): its state is not saved yet".into(),
            t => format!("a virtio device of type {t}: its state is not saved yet"),
        })
    }

    /// Takes requests again after [`quiesce`](Self::quiesce).
    fn resume_requests(&mut self) {}

    /// Device state beyond the queues (configuration the driver wrote, what the device model keeps), for
    /// a machine-state file; called after `quiesce` when the device is active.
    fn save_device(&self, _w: &mut crate::snapshot::Writer) {}

    /// Loads what [`save_device`](Self::save_device) wrote (after the device was activated again when it
    /// was active).
    fn restore_device(&mut self, _r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        Ok(())
    }
}
