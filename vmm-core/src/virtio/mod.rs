//! Virtio 1.x devices (virtio-queue split rings) on the modern PCI transport ([`pci`]).
//!
//! A device implements [`VirtioDevice`]: its features, configuration space and queues. The transport owns
//! the negotiation (status, features, queue set-up) and hands the device its queues at `DRIVER_OK`.

pub mod block;
pub mod host_driver;
pub mod net;
pub mod pci;
pub mod scsi;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

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

/// A device's interrupt: the ISR status byte and the INTx line behind a KVM irqfd with a resample fd
/// (level-triggered: KVM lowers the line at the guest's EOI and signals `resample`; the event loop then
/// raises it again while the ISR still has bits set). Also carries the device's "needs reset" flag,
/// which its I/O threads set when the driver breaks the rules.
#[derive(Debug)]
pub struct VirtioInterrupt {
    isr: AtomicU8,
    needs_reset: AtomicBool,
    line: EventFd,
    resample: EventFd,
}

impl VirtioInterrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(VirtioInterrupt {
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            line: EventFd::new(libc::EFD_NONBLOCK)?,
            resample: EventFd::new(libc::EFD_NONBLOCK)?,
        })
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

    /// The device put buffers in a used ring.
    pub fn signal_used(&self) {
        self.raise(ISR_QUEUE);
    }

    /// The device's configuration changed (or it needs a reset).
    pub fn signal_config(&self) {
        self.raise(ISR_CONFIG);
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

    /// Device reset: nothing pending, no longer broken.
    pub fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
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
}
