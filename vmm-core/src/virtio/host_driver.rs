//! A virtio-blk driver that runs in the host: it drives a [`VirtioPci`]`<`[`VirtioBlock`]`>` through its
//! BAR registers and a guest memory of its own, exactly as a guest driver would (no KVM needed). The unit
//! tests use it to check the device, hostile chains included, and `porthole-bench disk` to measure the
//! device back end at full host speed (guest code is instruction-emulated on our CI machines).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VirtioInterrupt;
use super::block::{QUEUE_SIZE, VirtioBlock};
use super::pci::VirtioPci;
use super::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use crate::disk::Drive;
use crate::pci::PciDevice;

/// Guest-memory layout of the driver.
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADERS: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
/// Data buffers: request slot i uses DATA + i * max_data.
const DATA: u64 = 0x10_0000;
/// Where the BAR sits (any address; nothing decodes it but us).
const BAR: u64 = 0xC000_0000;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// Request types (virtio-blk).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// A raw descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The host-side driver of one virtio-blk device.
pub struct HostBlockDriver {
    pub device: VirtioPci<VirtioBlock>,
    pub mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_size: u16,
    max_data: u64,
    avail_idx: u16,
    last_used: u16,
}

impl HostBlockDriver {
    /// Builds the device for `drive` and brings it up (features, one queue of `queue_size`, DRIVER_OK), with
    /// room for `queue_size / 3` requests (three descriptors each) of up to `max_data` bytes each.
    pub fn new(drive: Arc<Drive>, queue_size: u16, max_data: u64) -> std::io::Result<Self> {
        assert!(queue_size.is_power_of_two() && queue_size <= QUEUE_SIZE);
        let slots = u64::from(queue_size / 3);
        let mem_size = (DATA + slots * max_data).next_multiple_of(0x1000) as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).map_err(std::io::Error::other)?;
        let interrupt = Arc::new(VirtioInterrupt::new()?);
        let block = VirtioBlock::new(drive, interrupt.clone())?;
        let device = VirtioPci::new(block, BAR, 16, interrupt.clone(), mem.clone(), None);
        let mut driver = HostBlockDriver { device, mem, interrupt, queue_size, max_data, avail_idx: 0, last_used: 0 };
        driver.init();
        Ok(driver)
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        self.device.bar_write(0, offset, data);
    }

    fn read_common(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.device.bar_read(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Resets the device and brings it up again (a fresh queue).
    pub fn init(&mut self) {
        self.write_common(0x14, &[0]);
        self.write_common(0x14, &[(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u8]);
        let mut features = 0u64;
        for select in 0..2u32 {
            self.write_common(0x00, &select.to_le_bytes());
            features |= self.read_common(0x04, 4) << (32 * select);
        }
        for select in 0..2u32 {
            self.write_common(0x08, &select.to_le_bytes());
            self.write_common(0x0C, &((features >> (32 * select)) as u32).to_le_bytes());
        }
        self.write_common(
            0x14,
            &[(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK) as u8],
        );
        assert_ne!(self.read_common(0x14, 1) as u32 & VIRTIO_CONFIG_S_FEATURES_OK, 0, "features refused");
        self.write_common(0x16, &0u16.to_le_bytes());
        self.write_common(0x18, &self.queue_size.to_le_bytes());
        self.write_common(0x20, &DESC_TABLE.to_le_bytes());
        self.write_common(0x28, &AVAIL_RING.to_le_bytes());
        self.write_common(0x30, &USED_RING.to_le_bytes());
        // Zeroed rings, and used_event = 0 so that the device interrupts after every completion.
        let zeros = vec![0u8; 0x1000];
        for ring in [AVAIL_RING, USED_RING] {
            self.mem.write_slice(&zeros, GuestAddress(ring)).unwrap();
        }
        self.write_common(0x1C, &1u16.to_le_bytes());
        self.write_common(
            0x14,
            &[(VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK) as u8],
        );
        self.avail_idx = 0;
        self.last_used = 0;
    }

    /// The device status register (NEEDS_RESET is 0x40).
    pub fn status(&mut self) -> u8 {
        self.read_common(0x14, 1) as u8
    }

    /// Capacity in sectors, from the device configuration.
    pub fn capacity(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.device.bar_read(0, 0x2000, &mut b);
        u64::from_le_bytes(b)
    }

    /// The data buffer of request slot `slot`.
    pub fn data_address(&self, slot: u16) -> GuestAddress {
        GuestAddress(DATA + u64::from(slot) * self.max_data)
    }

    /// Writes descriptor `index`.
    pub fn write_desc(&self, index: u16, d: Desc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(DESC_TABLE + u64::from(index) * 16)).unwrap();
    }

    /// Puts `head` in the avail ring (advancing the index by `advance`, normally 1) and notifies.
    pub fn publish(&mut self, head: u16, advance: u16) {
        let slot = u64::from(self.avail_idx % self.queue_size);
        self.mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + slot * 2)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(advance);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
        self.device.bar_write(0, 0x3000, &0u16.to_le_bytes());
    }

    /// Posts a well-formed request in slot `slot` (descriptors 3*slot..3*slot+2): header, `len` bytes of
    /// data (none for FLUSH), status. Does not notify; call [`kick`](Self::kick) or use [`publish`].
    pub fn post(&mut self, slot: u16, kind: u32, sector: u64, len: u32) {
        assert!(slot < self.queue_size / 3, "slot {slot} does not fit a queue of {}", self.queue_size);
        let base = slot * 3;
        let header = HEADERS + u64::from(slot) * 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(header)).unwrap();
        self.mem.write_obj(0xFFu8, GuestAddress(STATUS + u64::from(slot))).unwrap();
        let status = Desc { addr: STATUS + u64::from(slot), len: 1, flags: DESC_F_WRITE, next: 0 };
        if len == 0 {
            self.write_desc(base, Desc { addr: header, len: 16, flags: DESC_F_NEXT, next: base + 2 });
        } else {
            self.write_desc(base, Desc { addr: header, len: 16, flags: DESC_F_NEXT, next: base + 1 });
            let write = if kind == T_OUT { 0 } else { DESC_F_WRITE };
            self.write_desc(
                base + 1,
                Desc { addr: self.data_address(slot).0, len, flags: write | DESC_F_NEXT, next: base + 2 },
            );
        }
        self.write_desc(base + 2, status);
        let ring_slot = u64::from(self.avail_idx % self.queue_size);
        self.mem.write_obj(base, GuestAddress(AVAIL_RING + 4 + ring_slot * 2)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes what [`post`](Self::post) queued and notifies the device.
    pub fn kick(&mut self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
        self.device.bar_write(0, 0x3000, &0u16.to_le_bytes());
    }

    /// The status byte of slot `slot` (0xFF: not written).
    pub fn request_status(&self, slot: u16) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + u64::from(slot))).unwrap()
    }

    /// Waits (up to `timeout`) for completions; returns (descriptor head, used length) of each.
    pub fn completions(&mut self, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if used != self.last_used {
                let mut done = Vec::new();
                while self.last_used != used {
                    let slot = u64::from(self.last_used % self.queue_size);
                    let id: u32 = self.mem.read_obj(GuestAddress(USED_RING + 4 + slot * 8)).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(USED_RING + 8 + slot * 8)).unwrap();
                    done.push((id as u16, len));
                    self.last_used = self.last_used.wrapping_add(1);
                }
                // used_event: interrupt again after the next completion.
                let used_event = AVAIL_RING + 4 + 2 * u64::from(self.queue_size);
                self.mem.write_obj(self.last_used, GuestAddress(used_event)).unwrap();
                return done;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Vec::new();
            }
            let mut pfd = libc::pollfd { fd: self.interrupt.line().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 100) as i32) };
            let _ = self.interrupt.line().read();
        }
    }

    /// Reads the ISR register (clearing it).
    pub fn read_isr(&mut self) -> u8 {
        let mut b = [0u8];
        self.device.bar_read(0, 0x1000, &mut b);
        b[0]
    }

    /// The drive the device serves.
    pub fn drive(&self) -> &Arc<Drive> {
        self.device.device().drive()
    }
}
