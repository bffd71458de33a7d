//! The PCI configuration space and the MMIO window as a guest reaches them: configuration mechanism #1 on
//! ports 0xCF8-0xCFF (the address latch, the data port at every offset and size, the reset control at
//! 0xCF9) and BAR accesses routed by address through the window, on a bus holding the host bridge, the
//! standard VGA (video memory and register BARs), a virtio-pci device (virtio-input: common, notify,
//! ISR and device configuration, MSI-X table) and the Intel HD Audio controller (its registers, CORB and
//! RIRB rings, stream descriptors and their DMA in the guest memory, codec verbs). A guest that moves BARs anywhere (over each other, over
//! the window's edges, sizes them with all ones) or turns decoding off and on is what this feeds.
//!
//! Input: operations of a kind byte and its bytes:
//! - 0: address latch write (u32); 1: data write: offset (0-3), size (1, 2, 4), value (u32);
//! - 2: data read: offset, size; 3: a window write: offset (u32, within the window), size (1, 2, 4, 8),
//!   value (u64); 4: a window read: offset (u32), size; 5: a reset control write (one byte).
#![no_main]

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_core::devices::bus::UnhandledCounts;
use vmm_core::devices::dispi::Dispi;
use vmm_core::devices::vga::Vga;
use vmm_core::devices::{BusDevice, MachineControl};
use vmm_core::pci::std_vga::StdVga;
use vmm_core::pci::{MMIO_WINDOW_END, MMIO_WINDOW_START, PciBus, PciConfigPorts, PciMmioWindow};
use vmm_core::virtio::VirtioInterrupt;
use vmm_core::virtio::input::{Profile, VirtioInput};
use vmm_core::virtio::pci::{BAR_SIZE, VirtioPci};

#[path = "common.rs"]
mod common;
use common::{le, take};

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]) else { return };
    let (Ok(machine), Ok(interrupt)) = (MachineControl::new(), VirtioInterrupt::new().map(Arc::new)) else { return };
    let mut bus = PciBus::new(Arc::new(UnhandledCounts::default()));
    let frame = Arc::new(AtomicU64::new(0));
    let dispi = Arc::new(Mutex::new(Dispi::new(1920, 1200, 16 << 20, frame.clone())));
    let vga = Arc::new(Mutex::new(Vga::new(frame)));
    let (vram_at, vga_mmio_at, virtio_at) = (
        bus.allocate_bar(16 << 20).expect("room for the VRAM"),
        bus.allocate_bar(0x1000).expect("room for the VGA registers"),
        bus.allocate_bar(BAR_SIZE).expect("room for the virtio BAR"),
    );
    let hda_at = bus.allocate_bar(vmm_core::pci::hda::BAR_SIZE).expect("room for the HD Audio BAR");
    let std_vga = StdVga::new(dispi, vga, vram_at, 16 << 20, vga_mmio_at, Box::new(|_| {}));
    let Ok(tablet) = VirtioInput::new(Profile::Tablet, interrupt.clone()) else { return };
    let Ok(virtio) = VirtioPci::new(tablet, virtio_at, 11, interrupt, mem.clone(), None, None) else { return };
    let Ok(sound_interrupt) = VirtioInterrupt::new().map(Arc::new) else { return };
    let screen = vmm_core::display::Screen::new();
    let Ok(hda) = vmm_core::pci::hda::Hda::new(screen, mem, hda_at, 10, sound_interrupt) else { return };
    // The host bridge is the bus's own, in slot 0.
    let inserted = [
        bus.insert(1, Arc::new(Mutex::new(std_vga))),
        bus.insert(2, Arc::new(Mutex::new(virtio))),
        bus.insert(3, Arc::new(Mutex::new(hda))),
    ];
    assert!(inserted.iter().all(Result::is_ok), "slots 1 to 3 are free on a new bus");
    let bus = Arc::new(bus);
    let mut ports = PciConfigPorts::new(bus.clone(), machine);
    let mut window = PciMmioWindow::new(bus);
    let span = MMIO_WINDOW_END - MMIO_WINDOW_START;
    while let Some(&[kind]) = take(&mut data, 1) {
        let done = match kind % 6 {
            0 => take(&mut data, 4).map(|b| ports.write(0, b)),
            1 => take(&mut data, 6).map(|b| {
                let size = [1, 2, 4, 4][usize::from(b[1] & 3)];
                ports.write(4 + u64::from(b[0] & 3), &b[2..2 + size]);
            }),
            2 => take(&mut data, 2).map(|b| {
                let mut v = [0u8; 4];
                ports.read(4 + u64::from(b[0] & 3), &mut v[..[1, 2, 4, 4][usize::from(b[1] & 3)]]);
            }),
            3 => take(&mut data, 13).map(|b| {
                let size = [1, 2, 4, 8][usize::from(b[4] & 3)];
                window.write(le(&b[..4]) % span, &b[5..5 + size]);
            }),
            4 => take(&mut data, 5).map(|b| {
                let mut v = [0u8; 8];
                window.read(le(&b[..4]) % span, &mut v[..[1, 2, 4, 8][usize::from(b[4] & 3)]]);
            }),
            _ => take(&mut data, 1).map(|b| ports.write(1, b)),
        };
        if done.is_none() {
            break;
        }
    }
});
