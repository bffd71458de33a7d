//! Host-side virtio drivers: they drive a [`VirtioPci`] device through its BAR registers and a guest memory
//! of their own, exactly as a guest driver would (no KVM needed). [`HostDriver`] brings any device up and
//! moves descriptors through any of its queues; [`HostBlockDriver`] adds virtio-blk requests on top. The
//! unit tests use them to check the devices, hostile chains included, and `porthole-bench disk` to
//! measure the virtio-blk back end at full host speed (guest code is instruction-emulated on our CI
//! machines).

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::{QUEUE_SIZE, VirtioBlock};
use super::pci::VirtioPci;
use super::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use super::{VirtioDevice, VirtioInterrupt};
use crate::disk::Drive;
use crate::pci::PciDevice;

/// Guest-memory layout of the drivers: queue q's rings at RINGS + q * RING_STRIDE (descriptor table, then
/// the avail ring a page on, then the used ring another page on), room for [`MAX_QUEUES`] queues of up to
/// 256 entries below 0x2_0000.
const RINGS: u64 = 0x1000;
const RING_STRIDE: u64 = 0x3000;
/// The most queues [`HostDriver`] sets up.
pub const MAX_QUEUES: usize = 6;
/// virtio-blk request headers and status bytes.
const HEADERS: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
/// Data buffers: request slot i uses DATA + i * max_data.
const DATA: u64 = 0x10_0000;
/// Where the BAR sits (any address; nothing decodes it but us).
const BAR: u64 = 0xC000_0000;
/// Device configuration, within the BAR.
const DEVICE_CONFIG: u64 = 0x2000;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Request types (virtio-blk).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// A raw descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The driver's side of one queue.
struct HostQueue {
    /// 0: left disabled.
    size: u16,
    avail_idx: u16,
    last_used: u16,
}

impl HostQueue {
    fn desc_table(index: usize) -> u64 {
        RINGS + index as u64 * RING_STRIDE
    }
    fn avail_ring(index: usize) -> u64 {
        Self::desc_table(index) + 0x1000
    }
    fn used_ring(index: usize) -> u64 {
        Self::desc_table(index) + 0x2000
    }
}

/// The host-side driver of any virtio device: negotiation (every offered feature is accepted), queue
/// set-up, descriptors, the avail and used rings, the ISR and the device configuration.
pub struct HostDriver<D: VirtioDevice> {
    pub device: VirtioPci<D>,
    pub mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<HostQueue>,
}

impl<D: VirtioDevice> HostDriver<D> {
    /// Puts `device` (raising `interrupt`) on the transport over `mem` and brings it up with queue i of
    /// `queue_sizes[i]` entries (a power of two, at most 256; 0 leaves the queue disabled). `mem` must
    /// hold the rings (below 0x2_0000).
    pub fn new(device: D, interrupt: Arc<VirtioInterrupt>, mem: GuestMemoryMmap, queue_sizes: &[u16]) -> Self {
        assert!(queue_sizes.len() <= MAX_QUEUES);
        assert!(queue_sizes.iter().all(|&s| s == 0 || (s.is_power_of_two() && s <= 256)));
        let device = VirtioPci::new(device, BAR, 16, interrupt.clone(), mem.clone(), None, None)
            .expect("without KVM, the transport needs nothing that can fail");
        let queues = queue_sizes.iter().map(|&size| HostQueue { size, avail_idx: 0, last_used: 0 }).collect();
        let mut driver = HostDriver { device, mem, interrupt, queues };
        driver.init();
        driver
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        self.device.bar_write(0, offset, data);
    }

    fn read_common(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.device.bar_read(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Resets the device and brings it up again (fresh queues).
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
        let zeros = vec![0u8; 0x1000];
        for index in 0..self.queues.len() {
            let size = self.queues[index].size;
            self.queues[index].avail_idx = 0;
            self.queues[index].last_used = 0;
            if size == 0 {
                continue;
            }
            self.write_common(0x16, &(index as u16).to_le_bytes());
            self.write_common(0x18, &size.to_le_bytes());
            self.write_common(0x20, &HostQueue::desc_table(index).to_le_bytes());
            self.write_common(0x28, &HostQueue::avail_ring(index).to_le_bytes());
            self.write_common(0x30, &HostQueue::used_ring(index).to_le_bytes());
            // Zeroed rings, and used_event = 0 so that the device interrupts after every completion.
            for ring in [HostQueue::avail_ring(index), HostQueue::used_ring(index)] {
                self.mem.write_slice(&zeros, GuestAddress(ring)).unwrap();
            }
            self.write_common(0x1C, &1u16.to_le_bytes());
        }
        self.write_common(
            0x14,
            &[(VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK) as u8],
        );
    }

    /// The device status register (NEEDS_RESET is 0x40).
    pub fn status(&mut self) -> u8 {
        self.read_common(0x14, 1) as u8
    }

    /// Reads the device configuration at `offset`.
    pub fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.device.bar_read(0, DEVICE_CONFIG + offset, data);
    }

    /// Writes the device configuration at `offset`.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.bar_write(0, DEVICE_CONFIG + offset, data);
    }

    /// Writes descriptor `index` of queue `queue`.
    pub fn write_desc(&self, queue: usize, index: u16, d: Desc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        let address = HostQueue::desc_table(queue) + u64::from(index) * 16;
        self.mem.write_slice(&b, GuestAddress(address)).unwrap();
    }

    /// Puts `head` in the avail ring of `queue` without publishing it (see [`kick`](Self::kick)).
    pub fn push_avail(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = u64::from(q.avail_idx % q.size);
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem.write_obj(head, GuestAddress(HostQueue::avail_ring(queue) + 4 + slot * 2)).unwrap();
    }

    /// Publishes what [`push_avail`](Self::push_avail) queued on `queue` and notifies the device.
    pub fn kick(&mut self, queue: usize) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let idx = self.queues[queue].avail_idx;
        self.mem.write_obj(idx, GuestAddress(HostQueue::avail_ring(queue) + 2)).unwrap();
        self.device.bar_write(0, 0x3000 + 4 * queue as u64, &0u16.to_le_bytes());
    }

    /// Puts `head` in the avail ring of `queue` (advancing the index by `advance`, normally 1) and
    /// notifies.
    pub fn publish(&mut self, queue: usize, head: u16, advance: u16) {
        self.push_avail(queue, head);
        let q = &mut self.queues[queue];
        q.avail_idx = q.avail_idx.wrapping_add(advance).wrapping_sub(1);
        self.kick(queue);
    }

    /// Waits (up to `timeout`) for completions on `queue`; returns (descriptor head, used length) of each.
    pub fn completions(&mut self, queue: usize, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        let used_ring = HostQueue::used_ring(queue);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(used_ring + 2)).unwrap();
            let q = &mut self.queues[queue];
            if used != q.last_used {
                let mut done = Vec::new();
                while q.last_used != used {
                    let slot = u64::from(q.last_used % q.size);
                    let id: u32 = self.mem.read_obj(GuestAddress(used_ring + 4 + slot * 8)).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(used_ring + 8 + slot * 8)).unwrap();
                    done.push((id as u16, len));
                    q.last_used = q.last_used.wrapping_add(1);
                }
                // used_event: interrupt again after the next completion.
                let used_event = HostQueue::avail_ring(queue) + 4 + 2 * u64::from(q.size);
                self.mem.write_obj(q.last_used, GuestAddress(used_event)).unwrap();
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

    /// Entries published on `queue` that the device has not returned yet, as far as
    /// [`completions`](Self::completions) has read the used ring.
    pub fn outstanding(&self, queue: usize) -> u16 {
        let q = &self.queues[queue];
        q.avail_idx.wrapping_sub(q.last_used)
    }

    /// Reads the ISR register (clearing it).
    pub fn read_isr(&mut self) -> u8 {
        let mut b = [0u8];
        self.device.bar_read(0, 0x1000, &mut b);
        b[0]
    }
}

/// The host-side driver of one virtio-blk device (its one queue is queue 0 of a [`HostDriver`], which it
/// dereferences to).
pub struct HostBlockDriver {
    driver: HostDriver<VirtioBlock>,
    queue_size: u16,
    max_data: u64,
}

impl Deref for HostBlockDriver {
    type Target = HostDriver<VirtioBlock>;
    fn deref(&self) -> &Self::Target {
        &self.driver
    }
}

impl DerefMut for HostBlockDriver {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.driver
    }
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
        let driver = HostDriver::new(block, interrupt, mem, &[queue_size]);
        Ok(HostBlockDriver { driver, queue_size, max_data })
    }

    /// Capacity in sectors, from the device configuration.
    pub fn capacity(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.driver.read_config(0, &mut b);
        u64::from_le_bytes(b)
    }

    /// The data buffer of request slot `slot`.
    pub fn data_address(&self, slot: u16) -> GuestAddress {
        GuestAddress(DATA + u64::from(slot) * self.max_data)
    }

    /// Writes descriptor `index`.
    pub fn write_desc(&self, index: u16, d: Desc) {
        self.driver.write_desc(0, index, d);
    }

    /// Puts `head` in the avail ring (advancing the index by `advance`, normally 1) and notifies.
    pub fn publish(&mut self, head: u16, advance: u16) {
        self.driver.publish(0, head, advance);
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
            let write = if matches!(kind, T_OUT | T_DISCARD | T_WRITE_ZEROES) { 0 } else { DESC_F_WRITE };
            self.write_desc(
                base + 1,
                Desc { addr: self.data_address(slot).0, len, flags: write | DESC_F_NEXT, next: base + 2 },
            );
        }
        self.write_desc(base + 2, status);
        self.driver.push_avail(0, base);
    }

    /// Publishes what [`post`](Self::post) queued and notifies the device.
    pub fn kick(&mut self) {
        self.driver.kick(0);
    }

    /// The status byte of slot `slot` (0xFF: not written).
    pub fn request_status(&self, slot: u16) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + u64::from(slot))).unwrap()
    }

    /// Waits (up to `timeout`) for completions; returns (descriptor head, used length) of each.
    pub fn completions(&mut self, timeout: Duration) -> Vec<(u16, u32)> {
        self.driver.completions(0, timeout)
    }

    /// The drive the device serves.
    pub fn drive(&self) -> &Arc<Drive> {
        self.device.device().drive()
    }
}

/// Receive buffers of [`HostNetDriver`]: descriptor i of queue 0 is NET_RX + i * NET_RX_BUF.
const NET_RX: u64 = 0x10_0000;
/// Transmit buffers: descriptor i of queue 1 is NET_TX + i * NET_TX_BUF (room for the largest frame).
const NET_TX: u64 = 0x80_0000;
const NET_TX_BUF: u64 = 0x1_0020;

/// The host-side driver of one virtio-net device: queue 0 receives into `rx_buf`-byte buffers, queue 1
/// transmits. Every offered feature is accepted (MRG_RXBUF and EVENT_IDX included).
pub struct HostNetDriver {
    driver: HostDriver<super::net::VirtioNet>,
    queue_size: u16,
    rx_buf: u32,
    /// Receive descriptors posted and not yet returned.
    rx_posted: u16,
    next_rx: u16,
    next_tx: u16,
    tx_outstanding: u16,
}

impl Deref for HostNetDriver {
    type Target = HostDriver<super::net::VirtioNet>;
    fn deref(&self) -> &Self::Target {
        &self.driver
    }
}

impl DerefMut for HostNetDriver {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.driver
    }
}

impl HostNetDriver {
    /// Builds the device for `nic` and brings it up with two queues of `queue_size`, receive buffers of
    /// `rx_buf` bytes (none posted yet).
    pub fn new(nic: Arc<crate::net::Nic>, queue_size: u16, rx_buf: u32) -> std::io::Result<Self> {
        assert!(queue_size.is_power_of_two() && queue_size <= super::net::QUEUE_SIZE);
        let mem_size = (NET_TX + u64::from(queue_size) * NET_TX_BUF).next_multiple_of(0x1000) as usize;
        assert!(NET_RX + u64::from(queue_size) * u64::from(rx_buf) <= NET_TX);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).map_err(std::io::Error::other)?;
        let interrupt = Arc::new(VirtioInterrupt::new()?);
        let net = super::net::VirtioNet::new(nic, interrupt.clone())?;
        let driver = HostDriver::new(net, interrupt, mem, &[queue_size, queue_size]);
        Ok(HostNetDriver { driver, queue_size, rx_buf, rx_posted: 0, next_rx: 0, next_tx: 0, tx_outstanding: 0 })
    }

    /// Resets the device and brings it up again; nothing is posted.
    pub fn reinit(&mut self) {
        self.driver.init();
        (self.rx_posted, self.next_rx, self.next_tx, self.tx_outstanding) = (0, 0, 0, 0);
    }

    /// Posts `count` receive buffers (at most the free ones) and notifies.
    pub fn post_rx(&mut self, count: u16) {
        let count = count.min(self.queue_size - self.rx_posted);
        for _ in 0..count {
            let i = self.next_rx % self.queue_size;
            let addr = NET_RX + u64::from(i) * u64::from(self.rx_buf);
            self.driver.write_desc(0, i, Desc { addr, len: self.rx_buf, flags: DESC_F_WRITE, next: 0 });
            self.driver.push_avail(0, i);
            self.next_rx = self.next_rx.wrapping_add(1);
        }
        self.rx_posted += count;
        self.driver.kick(0);
    }

    /// Frames received within `timeout` (without their virtio-net header), merging buffers as the
    /// header's `num_buffers` says. Returns the frames and every header's `num_buffers`.
    pub fn recv(&mut self, timeout: Duration) -> Vec<(Vec<u8>, u16)> {
        let used = self.driver.completions(0, timeout);
        self.rx_posted -= used.len() as u16;
        let mut frames = Vec::new();
        let mut it = used.into_iter();
        while let Some((head, len)) = it.next() {
            let read = |head: u16, len: u32| {
                let mut b = vec![0u8; len as usize];
                let addr = NET_RX + u64::from(head) * u64::from(self.rx_buf);
                self.driver.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                b
            };
            let mut bytes = read(head, len);
            let buffers = u16::from_le_bytes([bytes[10], bytes[11]]);
            for _ in 1..buffers {
                let Some((h, l)) = it.next() else { break };
                bytes.extend_from_slice(&read(h, l));
            }
            frames.push((bytes[crate::net::VNET_HEADER_LEN..].to_vec(), buffers));
        }
        frames
    }

    /// Takes the receive buffers the device filled within `timeout` and posts them again; returns the frames
    /// (counted by their headers' `num_buffers`) and payload bytes received. For benchmarks: the frames'
    /// contents are not read.
    pub fn recv_count(&mut self, timeout: Duration) -> (u64, u64) {
        let used = self.driver.completions(0, timeout);
        let (mut frames, mut bytes, mut rest) = (0u64, 0u64, 0u16);
        for &(head, len) in &used {
            bytes += u64::from(len);
            if rest == 0 {
                let at = NET_RX + u64::from(head) * u64::from(self.rx_buf) + 10;
                rest = self.driver.mem.read_obj::<u16>(GuestAddress(at)).unwrap_or(1).max(1);
                frames += 1;
                bytes -= crate::net::VNET_HEADER_LEN as u64;
            }
            rest -= 1;
        }
        self.rx_posted -= used.len() as u16;
        self.post_rx(used.len() as u16);
        (frames, bytes)
    }

    /// Queues `frame` `count` times (as far as the queue has room, reclaiming finished ones) with one
    /// notification. Returns how many were queued.
    pub fn send_burst(&mut self, frame: &[u8], count: u16) -> u16 {
        let _ = self.tx_room(Duration::ZERO);
        let n = count.min(self.queue_size - self.tx_outstanding);
        let mut bytes = vec![0u8; crate::net::VNET_HEADER_LEN];
        bytes.extend_from_slice(frame);
        for _ in 0..n {
            let i = self.next_tx % self.queue_size;
            let addr = NET_TX + u64::from(i) * NET_TX_BUF;
            self.driver.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            self.driver.write_desc(1, i, Desc { addr, len: bytes.len() as u32, flags: 0, next: 0 });
            self.driver.push_avail(1, i);
            self.next_tx = self.next_tx.wrapping_add(1);
        }
        self.tx_outstanding += n;
        if n > 0 {
            self.driver.kick(1);
        }
        n
    }

    /// Queues `frame` (an Ethernet frame; a zero header is put in front) on the transmit queue and
    /// notifies. Returns the descriptor used.
    pub fn send(&mut self, frame: &[u8]) -> u16 {
        let i = self.next_tx % self.queue_size;
        let addr = NET_TX + u64::from(i) * NET_TX_BUF;
        let mut bytes = vec![0u8; crate::net::VNET_HEADER_LEN];
        bytes.extend_from_slice(frame);
        self.driver.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        self.driver.write_desc(1, i, Desc { addr, len: bytes.len() as u32, flags: 0, next: 0 });
        self.driver.push_avail(1, i);
        self.next_tx = self.next_tx.wrapping_add(1);
        self.tx_outstanding += 1;
        self.driver.kick(1);
        i
    }

    /// Whether the transmit queue has room for another frame; takes finished ones back (waiting up to
    /// `timeout` when it is full).
    pub fn tx_room(&mut self, timeout: Duration) -> bool {
        let wait = if self.tx_outstanding == self.queue_size { timeout } else { Duration::ZERO };
        self.tx_outstanding -= self.driver.completions(1, wait).len() as u16;
        self.tx_outstanding < self.queue_size
    }

    /// The card's configuration space: MAC, status, MTU.
    pub fn net_config(&mut self) -> ([u8; 6], u16, u16) {
        let mut b = [0u8; 12];
        self.driver.read_config(0, &mut b);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[..6]);
        (mac, u16::from_le_bytes([b[6], b[7]]), u16::from_le_bytes([b[10], b[11]]))
    }
}

/// Where [`HostInputDriver`] keeps its event buffers: buffer i at INPUT_EVENTS + 8 * i.
pub const INPUT_EVENTS: u64 = 0x2_0000;

/// The host-side driver of one virtio-input device: 8-byte event buffers on its event queue (queue 0),
/// events read back as (type, code, value). The device's unit tests and `porthole-bench pointer` use it.
pub struct HostInputDriver {
    driver: HostDriver<super::input::VirtioInput>,
    input: Arc<super::input::InputHandle>,
    /// The next buffer to post (buffer and descriptor i % queue size).
    next: u16,
    /// Completions whose length was not one event's 8 bytes (not returned by [`Self::events`]).
    pub malformed: u64,
}

impl Deref for HostInputDriver {
    type Target = HostDriver<super::input::VirtioInput>;
    fn deref(&self) -> &Self::Target {
        &self.driver
    }
}

impl DerefMut for HostInputDriver {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.driver
    }
}

impl HostInputDriver {
    /// A device of `profile`, brought up with both queues at full size and no buffer posted.
    pub fn new(profile: super::input::Profile) -> std::io::Result<Self> {
        let size = super::input::QUEUE_SIZE;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x3_0000)]).map_err(std::io::Error::other)?;
        let interrupt = Arc::new(VirtioInterrupt::new()?);
        let device = super::input::VirtioInput::new(profile, interrupt.clone())?;
        let input = device.input().clone();
        Ok(HostInputDriver {
            driver: HostDriver::new(device, interrupt, mem, &[size, size]),
            input,
            next: 0,
            malformed: 0,
        })
    }

    /// The side an input path (the RFB server, a test) sends events to.
    pub fn input(&self) -> &Arc<super::input::InputHandle> {
        &self.input
    }

    /// Posts `count` more event buffers (at most a queue's worth may be outstanding) and notifies.
    pub fn post(&mut self, count: u16) {
        let size = super::input::QUEUE_SIZE;
        for _ in 0..count {
            let i = self.next % size;
            let desc = Desc { addr: INPUT_EVENTS + 8 * u64::from(i), len: 8, flags: DESC_F_WRITE, next: 0 };
            self.driver.write_desc(0, i, desc);
            self.driver.push_avail(0, i);
            self.next = self.next.wrapping_add(1);
        }
        self.driver.kick(0);
    }

    /// The events completed within `timeout` (waiting for the first), in order, as (type, code, value);
    /// their buffers are free to post again.
    pub fn events(&mut self, timeout: Duration) -> Vec<(u16, u16, i32)> {
        let done = self.driver.completions(0, timeout);
        let before = done.len();
        let events: Vec<_> = done
            .into_iter()
            .filter(|&(_, len)| len == 8)
            .map(|(head, _)| {
                let e: [u8; 8] =
                    self.driver.mem.read_obj(GuestAddress(INPUT_EVENTS + 8 * u64::from(head))).unwrap_or_default();
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    i32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect();
        self.malformed += (before - events.len()) as u64;
        events
    }
}

/// Where [`HostGpuDriver`] keeps its requests, responses and the scanout resource's backing.
const GPU_REQUEST: u64 = 0x4_0000;
const GPU_RESPONSE: u64 = 0x5_0000;
const GPU_BACKING: u64 = 0x10_0000;

/// A host-side virtio-gpu driver with one scanout resource covering the display (B8G8R8X8, backed by one
/// range of its memory): frames written into the backing go to the screen by TRANSFER_TO_HOST_2D and
/// RESOURCE_FLUSH, as a guest's driver presents them. The console benchmark feeds the virtio-gpu scanout
/// path with it at host speed.
pub struct HostGpuDriver {
    driver: HostDriver<super::gpu::VirtioGpu>,
    shared: Arc<super::gpu::GpuShared>,
    width: u32,
}

impl HostGpuDriver {
    /// The resource id of the scanout.
    const RESOURCE: u32 = 1;
    /// VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM: the screen's own 0x00RRGGBB little-endian pixels.
    const FORMAT: u32 = 2;

    /// A device drawing on `screen`, its scanout `width × height` set up and shown.
    pub fn new(screen: Arc<crate::display::Screen>, width: u32, height: u32) -> std::io::Result<Self> {
        let bytes = u64::from(width) * u64::from(height) * 4;
        let mem_size = (GPU_BACKING + bytes).next_multiple_of(0x1000) as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).map_err(std::io::Error::other)?;
        let interrupt = Arc::new(VirtioInterrupt::new()?);
        let shared = super::gpu::GpuShared::new(screen, width, height);
        let device = super::gpu::VirtioGpu::new(shared.clone(), interrupt.clone())?;
        let size = super::gpu::QUEUE_SIZE;
        let mut gpu = HostGpuDriver { driver: HostDriver::new(device, interrupt, mem, &[size, size]), shared, width };
        use super::gpu::cmd;
        let checks = [
            (cmd::RESOURCE_CREATE_2D, vec![Self::RESOURCE, Self::FORMAT, width, height]),
            (
                cmd::RESOURCE_ATTACH_BACKING,
                vec![Self::RESOURCE, 1, GPU_BACKING as u32, (GPU_BACKING >> 32) as u32, bytes as u32, 0],
            ),
            (cmd::SET_SCANOUT, vec![0, 0, width, height, 0, Self::RESOURCE]),
        ];
        for (kind, fields) in checks {
            let answer = gpu.control(kind, &fields)?;
            if answer != cmd::OK_NODATA {
                return Err(std::io::Error::other(format!("virtio-gpu answered {answer:#x} to {kind:#x}")));
            }
        }
        Ok(gpu)
    }

    /// The device's side (its counters, the screen it draws on).
    pub fn shared(&self) -> &Arc<super::gpu::GpuShared> {
        &self.shared
    }

    /// Sends one control request (a 24-byte header of `kind`, then `fields`); returns the response type.
    fn control(&mut self, kind: u32, fields: &[u32]) -> std::io::Result<u32> {
        let mut request = vec![0u8; 24];
        request[0..4].copy_from_slice(&kind.to_le_bytes());
        request.extend(fields.iter().flat_map(|f| f.to_le_bytes()));
        let d = &mut self.driver;
        d.mem.write_slice(&request, GuestAddress(GPU_REQUEST)).map_err(std::io::Error::other)?;
        d.mem.write_obj(u32::MAX, GuestAddress(GPU_RESPONSE)).map_err(std::io::Error::other)?;
        d.write_desc(0, 0, Desc { addr: GPU_REQUEST, len: request.len() as u32, flags: DESC_F_NEXT, next: 1 });
        d.write_desc(0, 1, Desc { addr: GPU_RESPONSE, len: 24, flags: DESC_F_WRITE, next: 0 });
        d.publish(0, 0, 1);
        if d.completions(0, Duration::from_secs(10)).len() != 1 {
            return Err(std::io::Error::other("virtio-gpu did not answer within 10 s"));
        }
        d.mem.read_obj(GuestAddress(GPU_RESPONSE)).map_err(std::io::Error::other)
    }

    /// Presents rows `rows` of the next frame (`bytes`: those rows, 0x00RRGGBB little-endian): written into
    /// the backing, transferred and flushed.
    pub fn present(&mut self, bytes: &[u8], rows: std::ops::Range<u32>) -> std::io::Result<()> {
        use super::gpu::cmd;
        let offset = u64::from(rows.start) * u64::from(self.width) * 4;
        self.driver.mem.write_slice(bytes, GuestAddress(GPU_BACKING + offset)).map_err(std::io::Error::other)?;
        let (y, h) = (rows.start, rows.end - rows.start);
        let rect = [0, y, self.width, h];
        let transfer = [&rect[..], &[offset as u32, (offset >> 32) as u32, Self::RESOURCE, 0]].concat();
        let flush = [&rect[..], &[Self::RESOURCE, 0]].concat();
        for (kind, fields) in [(cmd::TRANSFER_TO_HOST_2D, transfer), (cmd::RESOURCE_FLUSH, flush)] {
            let answer = self.control(kind, &fields)?;
            if answer != cmd::OK_NODATA {
                return Err(std::io::Error::other(format!("virtio-gpu answered {answer:#x} to {kind:#x}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::lock;

    /// A flushed picture that is the previous one scrolled goes to viewers as a scroll plus the rows it
    /// uncovered, as the VGA refresher sends it; the screen holds the new picture exactly.
    #[test]
    fn a_scrolled_scanout_is_sent_as_a_scroll() {
        let (w, h) = (320u32, 240u32);
        let screen = crate::display::Screen::new();
        let mut gpu = HostGpuDriver::new(screen.clone(), w, h).unwrap();
        // Text-like texture: every row differs from its neighbours.
        let texture = |x: u32, line: u32| (x.wrapping_mul(2_654_435_761) ^ line.wrapping_mul(40_503)) & 0xFF_FFFF;
        let frame = |first: u32| -> Vec<u8> {
            (0..h).flat_map(|y| (0..w).flat_map(move |x| texture(x, y + first).to_le_bytes())).collect()
        };
        gpu.present(&frame(0), 0..h).unwrap();
        let viewer = screen.subscribe();
        lock(&viewer.damage).take();
        for (first, dy) in [(16, 16), (4, -12)] {
            gpu.present(&frame(first), 0..h).unwrap();
            let damage = lock(&viewer.damage).take();
            assert_eq!(damage.scroll, Some(dy), "moved by {dy} rows");
            let uncovered = if dy > 0 { h - dy as u32..h } else { 0..dy.unsigned_abs() };
            assert!(
                damage.rects.iter().all(|r| r.y + r.h > uncovered.start && r.y < uncovered.end),
                "only the uncovered rows {uncovered:?} are damaged: {:?}",
                damage.rects
            );
            assert!(!damage.rects.is_empty());
            let shown = screen.read();
            let expected: Vec<u32> = (0..h).flat_map(|y| (0..w).map(move |x| texture(x, y + first))).collect();
            assert!(shown.pixels == expected, "the screen holds the new picture");
        }
    }

    /// What the host-side virtio-gpu driver presents is what the screen shows, row band by row band.
    #[test]
    fn presented_rows_reach_the_screen() {
        let screen = crate::display::Screen::new();
        let mut gpu = HostGpuDriver::new(screen.clone(), 64, 32).unwrap();
        assert!(screen.scanout_owned());
        let pixel = |x: u32, y: u32, frame: u32| (x * 4) << 16 | (y * 8) << 8 | frame;
        for frame in 1..=2 {
            let band = if frame == 1 { 0..32 } else { 8..12 };
            let bytes: Vec<u8> =
                band.clone().flat_map(|y| (0..64).flat_map(move |x| pixel(x, y, frame).to_le_bytes())).collect();
            gpu.present(&bytes, band).unwrap();
        }
        let shown = screen.read();
        for y in 0..32 {
            for x in 0..64 {
                let frame = if (8..12).contains(&y) { 2 } else { 1 };
                assert_eq!(shown.pixels[(y * 64 + x) as usize], pixel(x, y, frame), "({x}, {y})");
            }
        }
    }
}
