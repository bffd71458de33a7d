//! The devices of a Porthole VM. Each device is one file behind the [`BusDevice`] trait, on the port I/O
//! bus or the MMIO bus (see [`bus`]), and is unit-tested through that interface without KVM.

pub mod acpi_pm;
pub mod bus;
pub mod cpu_hotplug;
pub mod debug_port;
pub mod debugcon;
pub mod dispi;
pub mod fw_cfg;
pub mod i8042;
pub mod reset_control;
pub mod rtc;
pub mod serial;
pub mod vga;

pub use bus::{Bus, BusDevice, BusError};

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// What a device (or a vCPU) asks of the whole machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MachineRequest {
    /// Nothing asked.
    None = 0,
    /// Reset the machine (i8042 reset line, 0xCF9, ACPI reset register).
    Reset = 1,
    /// Power the machine off (ACPI S5).
    PowerOff = 2,
    /// The guest crashed (triple fault, emulation failure); the reason is recorded by whoever asks.
    Crash = 3,
    /// The host pulls the plug (forced stop, or a graceful stop that timed out).
    ForceOff = 4,
}

/// Shared by the devices and the VM's event loop: the pending machine request plus an eventfd that
/// wakes the loop. The first request wins until the loop takes it.
#[derive(Debug, Clone)]
pub struct MachineControl {
    pending: Arc<AtomicU8>,
    wake: Arc<EventFd>,
}

impl MachineControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(MachineControl {
            pending: Arc::new(AtomicU8::new(MachineRequest::None as u8)),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Asks for a reset or power-off; a request already pending is kept.
    pub fn request(&self, request: MachineRequest) {
        if self
            .pending
            .compare_exchange(MachineRequest::None as u8, request as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let _ = self.wake.write(1);
        }
    }

    /// Takes the pending request, leaving none.
    pub fn take(&self) -> MachineRequest {
        match self.pending.swap(MachineRequest::None as u8, Ordering::AcqRel) {
            1 => MachineRequest::Reset,
            2 => MachineRequest::PowerOff,
            3 => MachineRequest::Crash,
            4 => MachineRequest::ForceOff,
            _ => MachineRequest::None,
        }
    }

    /// Whether a request is pending (vCPUs stop running once one is).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) != MachineRequest::None as u8
    }

    /// The eventfd that becomes readable when a request is made.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

/// Raises a guest interrupt line through a KVM irqfd (an eventfd the kernel turns into an edge on a GSI).
#[derive(Debug, Clone)]
pub struct IrqLine {
    fd: Arc<EventFd>,
}

impl IrqLine {
    pub fn new(fd: EventFd) -> Self {
        IrqLine { fd: Arc::new(fd) }
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// Pulses the line.
    pub fn trigger(&self) {
        // An eventfd counter only overflows after 2^64 - 2 unread writes; ignore EAGAIN there.
        let _ = self.fd.write(1);
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.fd.write(1)
    }
}
