//! vmm-core: Porthole's KVM engine. A [`VmConfig`] in, a running VM out.
//!
//! Built on the rust-vmm crates: kvm-ioctls/kvm-bindings (KVM), vm-memory (guest memory), linux-loader
//! (bzImage and PVH ELF loading), vm-superio (16550 UART), acpi_tables (ACPI), seccompiler, vmm-sys-util.
//! It knows nothing of HTTP, users or the GUI. See ARCHITECTURE.md.

pub mod acpi;
pub mod audio;
pub mod boot;
pub mod config;
pub mod control;
pub mod counters;
pub mod cpu;
pub mod cpu_limits;
pub mod cpu_state;
pub mod devices;
pub mod disk;
pub mod display;
pub mod firmware;
pub mod layout;
pub mod net;
pub mod pci;
pub mod ram;
pub mod rate_limiter;
pub mod rfb;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vdagent;
pub mod virtio;
pub mod vm;

pub use config::{BootSource, ConfigError, SerialSink, VmConfig};
pub use vm::{ExitReason, Vm, VmError, VmHandle};
