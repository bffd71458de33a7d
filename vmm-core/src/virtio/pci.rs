//! The virtio 1.x modern PCI transport (virtio 1.2 §4.1): vendor 0x1AF4, device 0x1040 + type, one 32-bit
//! memory BAR holding the common configuration, the ISR byte, the device configuration, the notify area
//! (each announced by a vendor-specific capability) and the MSI-X table and pending bits ([`Msix`]: one
//! vector per queue plus one for configuration changes); INTA# until the driver enables MSI-X.
//!
//! Notifications are KVM ioeventfds on the notify addresses (moved with the BAR), so a guest's queue kick
//! never leaves the kernel; a write that does reach us (before registration, or without KVM in unit tests)
//! signals the same eventfd.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, NO_VECTOR, VirtioDevice, VirtioInterrupt};
use super::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1};
use crate::pci::PciDevice;
use crate::pci::config::{PciConfig, PciId};
use crate::pci::msix::{GsiRouter, Msix};
use crate::pci::std_vga::VramBar;

/// BAR 0 layout.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Queue n is notified at NOTIFY_OFFSET + n * NOTIFY_MULTIPLIER.
const NOTIFY_MULTIPLIER: u32 = 4;

/// Capability configuration types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const VENDOR_CAPABILITY: u8 = 0x09;

/// Where the transport registers its notify ioeventfds (absent in unit tests).
struct IoEvents {
    vm: Arc<VmFd>,
    /// The BAR base the ioeventfds are registered at.
    registered: Option<u64>,
}

/// A virtio device on the PCI transport.
pub struct VirtioPci<D: VirtioDevice> {
    config: PciConfig,
    device: D,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemoryMmap,
    io_events: Option<IoEvents>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<Queue>,
    /// Whether the device is serving (DRIVER_OK reached and the queues handed over).
    active: bool,
    msix: Arc<Msix>,
    /// The configuration register holding MSI-X's message control (upper half).
    msix_reg: usize,
    /// The memory BAR holding the transport's registers: 0, or 2 on a VGA device.
    bar: usize,
    /// virtio-vga: the video memory, BAR 0.
    vram: Option<VramBar>,
}

/// The PCI configuration register of BAR 0.
const REG_BAR0: usize = 4;

fn vendor_capability(cfg_type: u8, bar: usize, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![VENDOR_CAPABILITY, 0, (16 + extra.len()) as u8, cfg_type, bar as u8, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// `device` with its BAR at `bar_address` and INTA# on `gsi`. With `vm`, notifications are
    /// registered as ioeventfds; with `router`, MSI-X vectors are irqfds on GSIs of their own.
    pub fn new(
        device: D,
        bar_address: u64,
        gsi: u8,
        interrupt: Arc<VirtioInterrupt>,
        mem: GuestMemoryMmap,
        vm: Option<Arc<VmFd>>,
        router: Option<Arc<GsiRouter>>,
    ) -> std::io::Result<Self> {
        Self::build(device, None, bar_address, gsi, interrupt, mem, vm, router)
    }

    /// A VGA-compatible function (virtio-vga): class VGA, `vram` as BAR 0 (where the VGA BIOS and boot
    /// loaders draw through the Bochs VBE ports), the transport's registers in BAR 2 at `bar_address`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_vga(
        device: D,
        vram: VramBar,
        bar_address: u64,
        gsi: u8,
        interrupt: Arc<VirtioInterrupt>,
        mem: GuestMemoryMmap,
        vm: Option<Arc<VmFd>>,
        router: Option<Arc<GsiRouter>>,
    ) -> std::io::Result<Self> {
        Self::build(device, Some(vram), bar_address, gsi, interrupt, mem, vm, router)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        device: D,
        vram: Option<VramBar>,
        bar_address: u64,
        gsi: u8,
        interrupt: Arc<VirtioInterrupt>,
        mem: GuestMemoryMmap,
        vm: Option<Arc<VmFd>>,
        router: Option<Arc<GsiRouter>>,
    ) -> std::io::Result<Self> {
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciId {
            vendor: 0x1AF4,
            device: 0x1040 + device_type,
            revision: 1,
            // Mass storage, SCSI (as QEMU classes both virtio-blk and virtio-scsi); input, other (virtio-input);
            // display: VGA-compatible or other.
            class: match device_type {
                _ if vram.is_some() => 0x03_00_00,
                2 | 8 => 0x01_00_00,
                crate::virtio::input::DEVICE_TYPE => 0x09_80_00,
                crate::virtio::gpu::DEVICE_TYPE => 0x03_80_00,
                _ => 0xFF_00_00,
            },
            subsystem_vendor: 0x1AF4,
            subsystem: 0x1100,
        });
        let bar = if vram.is_some() { 2 } else { 0 };
        if let Some(vram) = &vram {
            vram.declare(&mut config, 0);
        }
        config.add_memory_bar(bar, BAR_SIZE, bar_address);
        // Memory decoding on, as firmware leaves a device whose BARs it placed.
        config.write(1, 0, &[crate::pci::config::COMMAND_MEMORY as u8]);
        config.set_interrupt(gsi);
        config.add_capability(&vendor_capability(CAP_COMMON, bar, COMMON_OFFSET, COMMON_LEN, &[]));
        config.add_capability(&vendor_capability(CAP_ISR, bar, ISR_OFFSET, 4, &[]));
        config.add_capability(&vendor_capability(CAP_DEVICE, bar, DEVICE_OFFSET, DEVICE_LEN, &[]));
        let queues_len = device.queue_max_sizes().len() as u64;
        config.add_capability(&vendor_capability(
            CAP_NOTIFY,
            bar,
            NOTIFY_OFFSET,
            queues_len * u64::from(NOTIFY_MULTIPLIER),
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        ));
        let msix = Arc::new(Msix::new(queues_len as usize + 1, router)?);
        let msix_reg =
            config.add_capability(&msix.capability(bar as u8, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32)) / 4;
        // Enable and function mask (message control bits 15 and 14).
        config.set_writable(msix_reg, 0xC000_0000);
        interrupt.set_msix(msix.clone());
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect();
        let mut transport = VirtioPci {
            config,
            device,
            interrupt,
            mem,
            io_events: vm.map(|vm| IoEvents { vm, registered: None }),
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            active: false,
            msix,
            msix_reg,
            bar,
            vram,
        };
        transport.update_io_events();
        Ok(transport)
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The MSI-X vectors.
    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Registers (or moves) the notify ioeventfds to where BAR 0 decodes now.
    fn update_io_events(&mut self) {
        let Some(io) = &mut self.io_events else { return };
        let now = self.config.memory_bar(self.bar).map(|(base, _)| base);
        if now == io.registered {
            return;
        }
        let queues = self.device.queue_max_sizes().len();
        let address =
            |base: u64, q: usize| IoEventAddress::Mmio(base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER));
        if let Some(old) = io.registered.take() {
            for q in 0..queues {
                if let Err(e) = io.vm.unregister_ioevent(self.device.queue_event(q), &address(old, q), NoDatamatch) {
                    log::warn!("virtio: cannot unregister a notify ioeventfd: {e}");
                }
            }
        }
        if let Some(base) = now {
            for q in 0..queues {
                if let Err(e) = io.vm.register_ioevent(self.device.queue_event(q), &address(base, q), NoDatamatch) {
                    // Notifications still arrive, through an MMIO exit and `notify`.
                    log::warn!("virtio: cannot register a notify ioeventfd: {e}");
                    return;
                }
            }
            io.registered = Some(base);
        }
    }

    fn device_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        let mut status = value;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 {
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0 && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if ok {
                let event_idx =
                    self.driver_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
            } else {
                status &= !(VIRTIO_CONFIG_S_FEATURES_OK as u8);
            }
        }
        self.status = status;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0
            && status & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0
            && !self.active
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem));
        if !valid {
            log::warn!("virtio: the driver set up a queue outside guest memory; the device needs a reset");
            self.interrupt.mark_needs_reset();
            return;
        }
        // The device gets its own copy of each queue's state; ours keeps the registers the guest reads.
        let Ok(queues) = self.queues.iter().map(|q| Queue::try_from(q.state())).collect::<Result<Vec<_>, _>>() else {
            self.interrupt.mark_needs_reset();
            return;
        };
        self.device.activate(Activation { mem: self.mem.clone(), queues, driver_features: self.driver_features });
        self.active = true;
    }

    fn vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.count() { v } else { NO_VECTOR }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The common configuration structure as the guest sees it now.
    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let features = match self.device_feature_select {
            0 => self.device_features() as u32,
            1 => (self.device_features() >> 32) as u32,
            _ => 0,
        };
        let driver_features = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&features.to_le_bytes());
        b[0x08..0x0C].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[0x0C..0x10].copy_from_slice(&driver_features.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.interrupt.config_vector().to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        let needs_reset = if self.interrupt.needs_reset() { VIRTIO_CONFIG_S_NEEDS_RESET as u8 } else { 0 };
        b[0x14] = self.status | needs_reset;
        b[0x15] = self.device.config_generation() as u8;
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            b[0x18..0x1A].copy_from_slice(&q.size().to_le_bytes());
            b[0x1A..0x1C].copy_from_slice(&self.interrupt.queue_vector(usize::from(self.queue_select)).to_le_bytes());
            b[0x1C..0x1E].copy_from_slice(&u16::from(q.ready()).to_le_bytes());
            b[0x1E..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc_table().to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.avail_ring().to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.used_ring().to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let (v32, v16) = (value as u32, value as u16);
        // Queue registers may only change while the queue is disabled and the device not yet live.
        let queue_writable = !self.active && self.selected_queue().is_some_and(|q| !q.ready());
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0C, 4) if self.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xFFFF_FFFF) | u64::from(v32),
                1 => self.driver_features = (self.driver_features & 0xFFFF_FFFF) | (u64::from(v32) << 32),
                _ => {}
            },
            // MSI-X vectors: a value beyond the table reads back NO_VECTOR (the driver then knows).
            (0x10, 2) => self.interrupt.set_config_vector(self.vector(v16)),
            (0x1A, 2) if usize::from(self.queue_select) < self.queues.len() => {
                self.interrupt.set_queue_vector(usize::from(self.queue_select), self.vector(v16))
            }
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v16);
                }
            }
            (0x1C, 2) if !self.active => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v16 == 1);
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2C | 0x30 | 0x34, 4) | (0x20 | 0x28 | 0x30, 8) if queue_writable => {
                let field = offset & !7;
                let (low, high) = match (offset & 4, data.len()) {
                    (0, 8) => (Some(v32), Some((value >> 32) as u32)),
                    (0, _) => (Some(v32), None),
                    _ => (None, Some(v32)),
                };
                if let Some(q) = self.selected_queue() {
                    match field {
                        0x20 => q.set_desc_table_address(low, high),
                        0x28 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => log::debug!("virtio: ignored common config write at {offset:#x} ({} bytes)", data.len()),
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    /// The transport (configuration space, common configuration, queues as the driver set them up),
    /// the interrupt and MSI-X state, and, while the device serves, its queues' live state: the device is
    /// quiesced first and stays so until [`resume_after_save`](PciDevice::resume_after_save).
    fn save_state(&mut self, w: &mut crate::snapshot::Writer) -> Result<(), crate::snapshot::StateError> {
        let live = if self.active {
            Some(self.device.quiesce().map_err(crate::snapshot::StateError::Unsupported)?)
        } else {
            None
        };
        self.config.save(w);
        w.u8(self.status);
        w.u32(self.device_feature_select);
        w.u32(self.driver_feature_select);
        w.u64(self.driver_features);
        w.u16(self.queue_select);
        w.u32(self.queues.len() as u32);
        for q in &self.queues {
            crate::virtio::save_queue(w, &q.state());
        }
        self.interrupt.save(w);
        self.msix.save(w);
        w.bool(live.is_some());
        if let Some(live) = live {
            w.u32(live.len() as u32);
            for q in &live {
                crate::virtio::save_queue(w, q);
            }
        }
        let mut device = crate::snapshot::Writer::new();
        self.device.save_device(&mut device);
        w.bytes(&device.buf);
        Ok(())
    }

    fn resume_after_save(&mut self) {
        if self.active {
            self.device.resume_requests();
        }
    }

    fn restore_state(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        use crate::snapshot::StateError;
        let mut config = self.config.clone();
        config.restore(r)?;
        let status = r.u8()?;
        let (device_feature_select, driver_feature_select) = (r.u32()?, r.u32()?);
        let driver_features = r.u64()?;
        let queue_select = r.u16()?;
        let max_sizes = self.device.queue_max_sizes().to_vec();
        let count = r.u32()? as usize;
        if count != max_sizes.len() {
            return Err(StateError::Damaged(format!("{count} virtio queues, this device has {}", max_sizes.len())));
        }
        let mut queues = Vec::with_capacity(count);
        for &max in &max_sizes {
            queues.push(crate::virtio::restore_queue(r, max)?);
        }
        self.interrupt.restore(r)?;
        self.msix.restore(r)?;
        let live = if r.bool()? {
            let n = r.u32()? as usize;
            if n > max_sizes.len() {
                return Err(StateError::Damaged(format!("{n} live virtio queues")));
            }
            let mut live = Vec::with_capacity(n);
            for &max in &max_sizes[..n] {
                live.push(crate::virtio::restore_queue(r, max)?);
            }
            Some(live)
        } else {
            None
        };
        let device = r.bytes(crate::snapshot::MAX_SECTION as usize)?;
        self.config = config;
        self.update_io_events();
        if let Some(vram) = self.vram.as_mut() {
            vram.follow(&self.config, 0);
        }
        self.status = status;
        self.device_feature_select = device_feature_select;
        self.driver_feature_select = driver_feature_select;
        self.driver_features = driver_features;
        self.queue_select = queue_select;
        self.queues = queues;
        if let Some(live) = live {
            if live.iter().any(|q| q.ready() && !q.is_valid(&self.mem)) {
                return Err(StateError::Damaged("a virtio queue lies outside guest memory".into()));
            }
            self.device.activate(Activation { mem: self.mem.clone(), queues: live, driver_features });
            self.active = true;
        }
        let mut r = crate::snapshot::Reader::new("pci", device);
        self.device.restore_device(&mut r)?;
        r.finish()
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == self.msix_reg {
            self.msix.write_control((self.config.read(reg) >> 16) as u16);
        }
        self.update_io_events();
        if let Some(vram) = self.vram.as_mut().filter(|_| reg == 1 || reg == REG_BAR0) {
            vram.follow(&self.config, 0);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != self.bar {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN && o + len <= COMMON_LEN => {
                let bytes = self.common_bytes();
                data.copy_from_slice(&bytes[o as usize..(o + len) as usize]);
            }
            ISR_OFFSET => data[0] = self.interrupt.read_isr(),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self.msix.read_table(o - MSIX_TABLE_OFFSET, data),
            o if o >= MSIX_PBA_OFFSET => self.msix.read_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != self.bar || data.len() > 8 {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_LEN => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if (queue as usize) < self.queues.len()
                    && (o - NOTIFY_OFFSET).is_multiple_of(u64::from(NOTIFY_MULTIPLIER))
                {
                    let _ = self.device.queue_event(queue as usize).write(1);
                }
            }
            _ => {}
        }
    }
}

impl<D: VirtioDevice> Drop for VirtioPci<D> {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;

    /// virtio-vga: a VGA-class function whose BAR 0 is the video memory (following the BAR like the std
    /// VGA's) and whose capabilities and registers live in BAR 2.
    #[test]
    fn virtio_vga_is_a_vga_function_with_video_memory_in_bar0_and_the_transport_in_bar2() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let shared = crate::virtio::gpu::GpuShared::new(crate::display::Screen::new(), 1280, 800);
        let gpu = crate::virtio::gpu::VirtioGpu::new(shared, interrupt.clone()).unwrap();
        let moved = Arc::new(Mutex::new(Vec::new()));
        let m = moved.clone();
        let vram = VramBar::new(0xE000_0000, 16 << 20, Box::new(move |a| m.lock().unwrap().push(a)));
        let mut d = VirtioPci::new_vga(gpu, vram, 0xC000_0000, 16, interrupt, mem, None, None).unwrap();
        assert_eq!(d.config().read(0), 0x1050_1AF4, "virtio-gpu, modern");
        assert_eq!(d.config().read(2) >> 8, 0x03_00_00, "VGA-compatible");
        assert_eq!(d.config().read(4), 0xE000_0008, "BAR 0: prefetchable video memory");
        assert_eq!(d.config().read(6), 0xC000_0000, "BAR 2: the transport");
        // Every virtio capability and the MSI-X table name BAR 2.
        let mut at = (d.config().read(13) & 0xFF) as usize;
        let mut seen = 0;
        while at != 0 {
            let word = d.config().read(at / 4);
            match word & 0xFF {
                0x09 => assert_eq!(d.config().read(at / 4 + 1) & 0xFF, 2, "cap at {at:#x}"),
                0x11 => assert_eq!(d.config().read(at / 4 + 1) & 7, 2, "MSI-X table BIR"),
                other => panic!("capability {other:#x}"),
            }
            seen += 1;
            at = ((word >> 8) & 0xFF) as usize;
        }
        assert_eq!(seen, 5);
        // The registers answer in BAR 2 only: num_queues (2) at 0x12.
        let mut b = [0u8; 2];
        d.bar_read(2, 0x12, &mut b);
        assert_eq!(u16::from_le_bytes(b), 2);
        d.bar_read(0, 0x12, &mut b);
        assert_eq!(b, [0, 0]);
        // BAR 0 moves the video memory: sized first, then placed.
        d.config_write(4, 0, &0xFFFF_FFFFu32.to_le_bytes());
        d.config_write(4, 0, &0xFD00_0000u32.to_le_bytes());
        assert_eq!(*moved.lock().unwrap(), [0xFD00_0000]);
    }
}
