//! virtio-scsi (virtio 1.2 §5.6) with one logical unit: a read-only CD/DVD drive (MMC-6 peripheral type 5,
//! removable) at target 0, LUN 0, serving a [`Drive`] of 2048-byte blocks (an ISO image, or empty). Made
//! for SeaBIOS (El Torito boot) and Linux's `virtio_scsi` + `sr` drivers.
//!
//! Implemented:
//! - Queues: control (0), event (1), one request queue (2). Features: VIRTIO_F_VERSION_1,
//!   VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX. Configuration per §5.6.4; the driver may change
//!   `sense_size` and `cdb_size` (clamped to 256; back to 96 and 32 at reset). Headers may be split across
//!   descriptors anywhere.
//! - Request queue, target 0 LUN 0 only (any other address but the REPORT LUNS well-known logical unit:
//!   VIRTIO_SCSI_S_BAD_TARGET). Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data; VPD pages
//!   0x00, 0x80 serial, 0x83 T10 vendor ID), REPORT LUNS, READ CAPACITY(10), READ(10/12/16) (straight from
//!   the image into guest memory), MODE SENSE(6/10) (page 0x2A, and 0x3F), GET CONFIGURATION (profile list
//!   with DVD-ROM and CD-ROM, the current one by media size, core, morphing, removable medium, random
//!   readable, multi-read, CD read, DVD read; RT 0/1/2), READ TOC/PMA/ATIP (formats 0 and 1, LBA and MSF),
//!   READ DISC INFORMATION, READ TRACK INFORMATION, GET EVENT STATUS NOTIFICATION (polled, media class),
//!   MECHANISM STATUS, START STOP UNIT (eject unless locked, load), PREVENT ALLOW MEDIUM REMOVAL, SET CD
//!   SPEED and SYNCHRONIZE CACHE (no-ops), SEEK(10), READ DVD STRUCTURE (formats 0x00 and 0x01 of DVD-sized
//!   media). Write commands fail with DATA PROTECT (07/27/00), other opcodes with ILLEGAL REQUEST (05/20/00).
//!   Status is GOOD or CHECK CONDITION with fixed-format sense (autosense, and kept for a following REQUEST
//!   SENSE, which SeaBIOS sends). `residual` = data-in size - bytes transferred; data the CDB asks for beyond
//!   the data-in buffers is VIRTIO_SCSI_S_OVERRUN; data-in and data-out together is VIRTIO_SCSI_S_FAILURE
//!   (VIRTIO_SCSI_F_INOUT is not offered).
//! - Media changes (the drive's generation bumps): the next command other than INQUIRY, REQUEST SENSE,
//!   REPORT LUNS, GET CONFIGURATION and GET EVENT STATUS NOTIFICATION gets UNIT ATTENTION 06/28/00 once
//!   (none when the drive is left empty: commands then get NOT READY 02/3A/00), and GET EVENT STATUS
//!   NOTIFICATION reports NewMedia or MediaRemoval once. A guest eject (START STOP UNIT) empties the
//!   [`Drive`] (the host sees it) unless the guest locked the medium.
//! - Control queue: task management functions complete at once (commands run one at a time, so none
//!   is ever in flight to abort): VIRTIO_SCSI_S_FUNCTION_COMPLETE, FUNCTION_REJECTED for CLEAR ACA and
//!   unknown ones, BAD_TARGET for another target or LUN; LOGICAL UNIT RESET and I_T NEXUS RESET unlock the
//!   medium and raise UNIT ATTENTION 06/29/00. Asynchronous notification queries and subscriptions
//!   answer "no events" (`event_actual` = 0).
//! - Event queue: its buffers are left with the device, never used (hot-plug is not offered and the
//!   spec forbids VIRTIO_SCSI_T_PARAM_CHANGE for MMC devices; Linux polls media with GET EVENT STATUS
//!   NOTIFICATION).
//! - Validation as in [`block`](super::block): a structurally broken chain (loop, `next` beyond the
//!   queue, bad indirect table, more descriptors than `seg_max` + 2, a device-readable descriptor after a
//!   device-writable one, no room or no guest memory for the response header, an avail index that jumps
//!   past the queue) puts the device in NEEDS_RESET until the driver resets it; a well-formed request
//!   that cannot be served (short request header, buffers outside guest RAM) completes with
//!   VIRTIO_SCSI_S_FAILURE.
//! - One thread serves the control and request queues, one request at a time (a CD drive needs no
//!   more); work per request is bounded by what the guest's buffers hold, memory use by constants.
//!
//! Not implemented: several request queues, VIRTIO_SCSI_F_INOUT/HOTPLUG/CHANGE/T10_PI, asynchronous
//! event notification, MSI-X (the transport's), more than one LUN, writable media, audio (READ CD, PLAY
//! AUDIO, READ SUB-CHANNEL), MODE SELECT, GET PERFORMANCE, READ FORMAT CAPACITIES, READ CAPACITY(16),
//! raw TOC (format 2) and other TOC formats, descriptor-format sense, a host-side media lock (the host
//! may change media while the guest holds it locked; the guest gets a unit attention).

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_SENSE_DEFAULT_SIZE, VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF, VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt};
use crate::devices::bus::lock;
use crate::disk::{Drive, Media};

/// Virtio device ID of a SCSI host.
pub const DEVICE_TYPE: u16 = 8;
/// Every queue's largest size.
pub const QUEUE_SIZE: u16 = 128;
/// Queue indices.
pub const CONTROL_QUEUE: usize = 0;
pub const EVENT_QUEUE: usize = 1;
pub const REQUEST_QUEUE: usize = 2;
const QUEUES: usize = 3;
/// Data segments per direction the driver may use (the request and response headers take two more).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest transfer the driver should ask for, in 512-byte sectors (a hint).
const MAX_SECTORS: u32 = 0xFFFF;
/// Commands the driver should queue per LUN (a hint).
const CMD_PER_LUN: u32 = 16;
/// Size of struct virtio_scsi_event.
const EVENT_INFO_SIZE: u32 = 16;
/// The largest `sense_size` and `cdb_size` the driver may set.
const MAX_SENSE_SIZE: u32 = 256;
const MAX_CDB_SIZE: u32 = 256;
/// lun, id, task_attr, prio, crn: the request header before the CDB.
const REQ_FIXED: usize = 19;
/// sense_len, residual, status_qualifier, status, response: the response header before the sense data.
const RESP_FIXED: usize = 12;

/// Logical block size of the medium.
pub const BLOCK_SIZE: u64 = 2048;
/// Media up to this many blocks (an 80-minute CD) are CDs; larger ones DVDs.
const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;

/// SCSI status codes (SAM).
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;

/// MMC profiles.
const PROFILE_CD_ROM: u16 = 0x0008;
const PROFILE_DVD_ROM: u16 = 0x0010;

/// GET EVENT STATUS NOTIFICATION media event codes.
const MEDIA_EVENT_NEW: u8 = 2;
const MEDIA_EVENT_REMOVAL: u8 = 3;

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sense {
    key: u8,
    asc: u8,
    ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (SPC-4 §4.5.3), current error.
    fn fixed(self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

const NO_SENSE: Sense = Sense::new(0x00, 0x00, 0x00);
const MEDIUM_NOT_PRESENT: Sense = Sense::new(0x02, 0x3A, 0x00);
const UNRECOVERED_READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
const INCOMPATIBLE_FORMAT: Sense = Sense::new(0x05, 0x30, 0x02);
const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
const REMOVAL_PREVENTED: Sense = Sense::new(0x05, 0x53, 0x02);
const MEDIUM_CHANGED: Sense = Sense::new(0x06, 0x28, 0x00);
const RESET_OCCURRED: Sense = Sense::new(0x06, 0x29, 0x00);
const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);

/// SCSI operation codes.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const SEEK_10: u8 = 0x2B;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_TOC_PMA_ATIP: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4A;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const READ_TRACK_INFORMATION: u8 = 0x52;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const READ_DVD_STRUCTURE: u8 = 0xAD;
    pub const SET_CD_SPEED: u8 = 0xBB;
    pub const MECHANISM_STATUS: u8 = 0xBD;
}

/// The logical unit's state (SCSI-visible), kept across commands while the driver is up.
#[derive(Debug, Default)]
struct Unit {
    /// The drive generation the unit has seen.
    generation: u32,
    unit_attention: Option<Sense>,
    /// A media event for GET EVENT STATUS NOTIFICATION.
    media_event: Option<u8>,
    /// PREVENT ALLOW MEDIUM REMOVAL.
    locked: bool,
    /// The guest ejected (and has not loaded since).
    tray_open: bool,
    /// The sense data of the last command if it ended in CHECK CONDITION, for REQUEST SENSE.
    last_sense: Option<Sense>,
}

/// The queues while the driver is up (the event queue is never used).
struct Active {
    mem: GuestMemoryMmap,
    control: Option<Queue>,
    /// Never used; kept for a machine-state file.
    event: Option<Queue>,
    request: Option<Queue>,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    unit: Unit,
    /// Serving stopped while a machine state is saved.
    quiesced: bool,
}

fn save_sense(w: &mut crate::snapshot::Writer, sense: Option<Sense>) {
    w.bool(sense.is_some());
    let s = sense.unwrap_or(Sense::new(0, 0, 0));
    w.u8(s.key);
    w.u8(s.asc);
    w.u8(s.ascq);
}

fn restore_sense(r: &mut crate::snapshot::Reader) -> Result<Option<Sense>, crate::snapshot::StateError> {
    let some = r.bool()?;
    let s = Sense::new(r.u8()?, r.u8()?, r.u8()?);
    Ok(some.then_some(s))
}

/// What the queue thread and the transport share.
struct Shared {
    drive: Arc<Drive>,
    interrupt: Arc<VirtioInterrupt>,
    /// The driver's notifications of each queue (KVM ioeventfds).
    notify: [EventFd; QUEUES],
    /// Wakes the queue thread on activation and shutdown.
    wake: EventFd,
    state: Mutex<State>,
    /// A reset (or drop) waits for `state`: the queue thread lets go of it between requests.
    stop: AtomicBool,
    shutdown: AtomicBool,
    sense_size: AtomicU32,
    cdb_size: AtomicU32,
}

/// A virtio-scsi host with one CD/DVD drive serving `drive`.
pub struct VirtioScsi {
    shared: Arc<Shared>,
    max_sizes: [u16; QUEUES],
    thread: Option<JoinHandle<()>>,
}

impl VirtioScsi {
    /// A device for the removable `drive` (its media: ISO images, 2048-byte blocks), raising `interrupt`;
    /// starts its (idle) queue thread, which inherits the caller's seccomp filter.
    pub fn new(drive: Arc<Drive>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            drive,
            interrupt,
            notify: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sense_size: AtomicU32::new(VIRTIO_SCSI_SENSE_DEFAULT_SIZE),
            cdb_size: AtomicU32::new(VIRTIO_SCSI_CDB_DEFAULT_SIZE),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("scsi-queue".into()).spawn(move || s.queue_thread())?;
        Ok(VirtioScsi { shared, max_sizes: [QUEUE_SIZE; QUEUES], thread: Some(thread) })
    }

    pub fn drive(&self) -> &Arc<Drive> {
        &self.shared.drive
    }

    fn config_bytes(&self) -> [u8; 36] {
        let mut b = [0u8; 36];
        let sense_size = self.shared.sense_size.load(Ordering::Acquire);
        let cdb_size = self.shared.cdb_size.load(Ordering::Acquire);
        for (i, v) in [1, SEG_MAX, MAX_SECTORS, CMD_PER_LUN, EVENT_INFO_SIZE, sense_size, cdb_size].iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        // max_channel, max_target (28..32) and max_lun (32..36) are 0.
        b
    }

    /// Stops serving: waits for the request being executed, then forgets the queues.
    fn stop_serving(&self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let mut state = lock(&self.shared.state);
            state.active = None;
            state.unit = Unit::default();
            state.quiesced = false;
        }
        self.shared.stop.store(false, Ordering::Release);
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        &self.shared.notify[index.min(QUEUES - 1)]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_bytes();
        let start = offset as usize;
        match start.checked_add(data.len()).and_then(|end| bytes.get(start..end)) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only sense_size (20..24) and cdb_size (24..28) are writable, whole or in part.
        let mut bytes = self.config_bytes();
        let Some(end) = (offset as usize).checked_add(data.len()) else { return };
        if offset < 20 || end > 28 {
            log::debug!("virtio-scsi: ignored configuration write at {offset:#x} ({} bytes)", data.len());
            return;
        }
        bytes[offset as usize..end].copy_from_slice(data);
        let field = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        self.shared.sense_size.store(field(20).min(MAX_SENSE_SIZE), Ordering::Release);
        self.shared.cdb_size.store(field(24).min(MAX_CDB_SIZE), Ordering::Release);
    }

    fn activate(&mut self, activation: Activation) {
        let mut queues = activation.queues.into_iter();
        let ready = |q: Option<Queue>| q.filter(|q| q.ready());
        let control = ready(queues.next());
        let event = queues.next();
        let request = ready(queues.next());
        {
            let mut state = lock(&self.shared.state);
            state.quiesced = false;
            state.active = Some(Active { mem: activation.mem, control, event, request });
            state.unit = Unit { generation: self.shared.drive.generation(), ..Unit::default() };
        }
        let _ = self.shared.wake.write(1);
    }

    fn reset(&mut self) {
        self.stop_serving();
        self.shared.sense_size.store(VIRTIO_SCSI_SENSE_DEFAULT_SIZE, Ordering::Release);
        self.shared.cdb_size.store(VIRTIO_SCSI_CDB_DEFAULT_SIZE, Ordering::Release);
    }

    /// Requests are served one at a time holding the state lock, so taking it waits for the one running.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        self.shared.stop.store(true, Ordering::Release);
        let mut state = lock(&self.shared.state);
        self.shared.stop.store(false, Ordering::Release);
        state.quiesced = true;
        let idle = || Queue::new(QUEUE_SIZE).map(|q| q.state()).map_err(|e| format!("{e:?}"));
        let Some(active) = state.active.as_ref() else { return Ok(Vec::new()) };
        [&active.control, &active.event, &active.request]
            .into_iter()
            .map(|q| q.as_ref().map(|q| Ok(q.state())).unwrap_or_else(idle))
            .collect()
    }

    fn resume_requests(&mut self) {
        lock(&self.shared.state).quiesced = false;
        let _ = self.shared.wake.write(1);
    }

    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        w.u32(self.shared.sense_size.load(Ordering::Acquire));
        w.u32(self.shared.cdb_size.load(Ordering::Acquire));
        let state = lock(&self.shared.state);
        let u = &state.unit;
        save_sense(w, u.unit_attention);
        w.bool(u.media_event.is_some());
        w.u8(u.media_event.unwrap_or(0));
        w.bool(u.locked);
        w.bool(u.tray_open);
        save_sense(w, u.last_sense);
    }

    /// The unit's state; the media generation is this process's (the media is the drive's now).
    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (sense_size, cdb_size) = (r.u32()?.min(MAX_SENSE_SIZE), r.u32()?.min(MAX_CDB_SIZE));
        let unit_attention = restore_sense(r)?;
        let has_event = r.bool()?;
        let event = r.u8()?;
        let (locked, tray_open) = (r.bool()?, r.bool()?);
        let last_sense = restore_sense(r)?;
        self.shared.sense_size.store(sense_size, Ordering::Release);
        self.shared.cdb_size.store(cdb_size, Ordering::Release);
        let mut state = lock(&self.shared.state);
        state.unit = Unit {
            generation: self.shared.drive.generation(),
            unit_attention,
            media_event: has_event.then_some(event),
            locked,
            tray_open,
            last_sense,
        };
        Ok(())
    }
}

impl Drop for VirtioScsi {
    fn drop(&mut self) {
        self.stop_serving();
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a chain cannot be served at all.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    Empty,
    Unterminated,
    TooLong,
    /// A device-readable descriptor after a device-writable one.
    Order,
    /// No room, or no guest memory, for the response.
    NoResponse,
}

/// A chain's buffers, in order: the device-readable ones, then the device-writable ones.
struct Buffers {
    head: u16,
    readable: Vec<(GuestAddress, u32)>,
    writable: Vec<(GuestAddress, u32)>,
}

fn total(segments: &[(GuestAddress, u32)]) -> u64 {
    segments.iter().map(|&(_, len)| u64::from(len)).sum()
}

/// The pieces of `segments` that hold bytes `offset..offset + len` of their concatenation.
fn sub(segments: &[(GuestAddress, u32)], mut offset: u64, mut len: u64) -> Vec<(GuestAddress, u32)> {
    let mut out = Vec::new();
    for &(address, size) in segments {
        if len == 0 {
            break;
        }
        let size = u64::from(size);
        if offset >= size {
            offset -= size;
            continue;
        }
        let n = (size - offset).min(len);
        out.push((GuestAddress(address.0.wrapping_add(offset)), n as u32));
        len -= n;
        offset = 0;
    }
    out
}

/// Whether every byte of `segments` is guest memory.
fn in_memory(mem: &GuestMemoryMmap, segments: &[(GuestAddress, u32)]) -> bool {
    segments.iter().all(|&(address, len)| len == 0 || mem.check_range(address, len as usize))
}

/// Reads bytes `offset..offset + out.len()` of `segments` into `out`; false if they are not all there.
fn gather(mem: &GuestMemoryMmap, segments: &[(GuestAddress, u32)], offset: u64, out: &mut [u8]) -> bool {
    let pieces = sub(segments, offset, out.len() as u64);
    if total(&pieces) != out.len() as u64 {
        return false;
    }
    let mut at = 0;
    for (address, len) in pieces {
        let len = len as usize;
        if mem.read_slice(&mut out[at..at + len], address).is_err() {
            return false;
        }
        at += len;
    }
    true
}

/// Writes `data` at byte `offset` of `segments`; false if it does not all fit.
fn scatter(mem: &GuestMemoryMmap, segments: &[(GuestAddress, u32)], offset: u64, data: &[u8]) -> bool {
    let pieces = sub(segments, offset, data.len() as u64);
    if total(&pieces) != data.len() as u64 {
        return false;
    }
    let mut at = 0;
    for (address, len) in pieces {
        let len = len as usize;
        if mem.write_slice(&data[at..at + len], address).is_err() {
            return false;
        }
        at += len;
    }
    true
}

/// Validates a chain's structure and splits it into its readable and writable buffers.
fn collect(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Buffers, Malformed> {
    let head = chain.head_index();
    let mut buffers = Buffers { head, readable: Vec::new(), writable: Vec::new() };
    let mut count = 0;
    let mut last_has_next = false;
    for d in chain {
        if count == SEG_MAX as usize + 2 {
            return Err(Malformed::TooLong);
        }
        count += 1;
        last_has_next = d.has_next();
        if d.is_write_only() {
            buffers.writable.push((d.addr(), d.len()));
        } else if buffers.writable.is_empty() {
            buffers.readable.push((d.addr(), d.len()));
        } else {
            return Err(Malformed::Order);
        }
    }
    if count == 0 {
        return Err(Malformed::Empty);
    }
    if last_has_next {
        // The iterator stopped early: a loop, a `next` beyond the table, or an unreadable descriptor.
        return Err(Malformed::Unterminated);
    }
    Ok(buffers)
}

/// What a command returns besides its status.
enum Reply {
    Nothing,
    /// Emulated data, of which the driver asked for at most `allocation` bytes.
    Data(Vec<u8>, usize),
    /// Bytes `offset..offset + len` of the medium.
    Read {
        media: Media,
        offset: u64,
        len: u64,
    },
}

/// How a request ended.
struct Outcome {
    response: u8,
    status: u8,
    sense: Option<Sense>,
    /// Bytes written to the data-in buffers.
    transferred: u64,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// A logical block address as READ TOC reports it: LBA, or MSF (with the 2-second pregap).
fn toc_address(lba: u64, msf: bool) -> [u8; 4] {
    if !msf {
        return (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes();
    }
    let frames = lba + 150;
    let minutes = (frames / (75 * 60)).min(255) as u8;
    [0, minutes, (frames / 75 % 60) as u8, (frames % 75) as u8]
}

/// The address of the REPORT LUNS well-known logical unit (virtio 1.2 §5.6.6.1).
const REPORT_LUNS_WLUN: [u8; 8] = [0xC1, 0x01, 0, 0, 0, 0, 0, 0];

/// Whether the address in `lun` is target 0, LUN 0 (single-level, peripheral or flat addressing).
fn lun_is_ours(lun: &[u8]) -> bool {
    lun[0] == 1 && lun[1] == 0 && (lun[2] & 0xC0) <= 0x40 && lun[2] & 0x3F == 0 && lun[3] == 0 && lun[4..8] == [0; 4]
}

impl Shared {
    fn queue_thread(&self) {
        const WAKE: u64 = QUEUES as u64;
        let Ok(epoll) = Epoll::new() else {
            log::error!("virtio-scsi: cannot create the queue thread's epoll; the CD drive stays idle");
            return;
        };
        let fds = [(self.notify[CONTROL_QUEUE].as_raw_fd(), CONTROL_QUEUE as u64)]
            .into_iter()
            .chain([(self.notify[REQUEST_QUEUE].as_raw_fd(), REQUEST_QUEUE as u64), (self.wake.as_raw_fd(), WAKE)]);
        for (fd, token) in fds {
            if epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).is_err() {
                log::error!("virtio-scsi: cannot watch the queue notifications; the CD drive stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); QUEUES + 1];
        while !self.shutdown.load(Ordering::Acquire) {
            match epoll.wait(-1, &mut events) {
                Ok(n) => {
                    for e in &events[..n] {
                        let fd = if e.data() == WAKE { &self.wake } else { &self.notify[e.data() as usize] };
                        let _ = fd.read();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-scsi: the queue thread cannot wait: {e}");
                    return;
                }
            }
            // Serve both queues, one request at a time, until both are empty (or a reset waits).
            while !self.stop.load(Ordering::Acquire) {
                let mut state = lock(&self.state);
                let control = self.serve_one(&mut state, CONTROL_QUEUE);
                let request = self.serve_one(&mut state, REQUEST_QUEUE);
                if !control && !request {
                    break;
                }
            }
        }
    }

    /// Counts a driver error; the first of each drive is logged as a warning (a guest could otherwise
    /// flood the log), the others at debug level.
    fn malformed(&self, what: &str) {
        let first = self.drive.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0;
        let level = if first { log::Level::Warn } else { log::Level::Debug };
        log::log!(level, "{}: {what}; the virtio-scsi device needs a reset (guest driver error)", self.drive.id);
    }

    /// Takes the next chain of queue `which` and completes it; false when there was none (or the device
    /// is broken or stopped).
    fn serve_one(&self, state: &mut State, which: usize) -> bool {
        if state.quiesced {
            return false;
        }
        let State { active, unit, .. } = state;
        let Some(active) = active.as_mut() else { return false };
        if self.interrupt.needs_reset() {
            return false;
        }
        let mem = active.mem.clone();
        let queue = if which == CONTROL_QUEUE { &mut active.control } else { &mut active.request };
        let Some(queue) = queue.as_mut() else { return false };
        let mut retried = false;
        let chain = loop {
            let _ = queue.disable_notification(&mem);
            // An avail index more than a queue's worth ahead is a driver bug (or an attack).
            match queue.avail_idx(&mem, Ordering::Acquire) {
                Ok(avail) if (avail - Wrapping(queue.next_avail())).0 <= queue.size() => {}
                _ => return self.broken("the avail index jumped past the queue"),
            }
            if let Some(chain) = queue.pop_descriptor_chain(&mem) {
                break chain;
            }
            match queue.enable_notification(&mem) {
                // More arrived meanwhile (a second time: the ring cannot be read after all).
                Ok(true) if !retried => retried = true,
                Ok(false) => return false,
                Ok(true) | Err(_) => return self.broken("the avail ring is unreadable"),
            }
        };
        let buffers = match collect(chain) {
            Ok(b) => b,
            Err(why) => return self.broken(&format!("malformed request ({why:?})")),
        };
        let written = if which == CONTROL_QUEUE {
            self.control(&mem, &buffers, unit)
        } else {
            self.request(&mem, &buffers, unit)
        };
        let Ok(written) = written else { return self.broken("no room in guest memory for the response") };
        let notify = match queue.add_used(&mem, buffers.head, written) {
            Ok(()) => queue.needs_notification(&mem).unwrap_or(true),
            Err(_) => return self.broken("the used ring is unwritable"),
        };
        if notify {
            self.interrupt.signal_used();
        }
        true
    }

    fn broken(&self, what: &str) -> bool {
        self.malformed(what);
        self.interrupt.mark_needs_reset();
        false
    }

    /// Serves a control request; returns how many bytes it wrote, or Err when the response has no room.
    fn control(&self, mem: &GuestMemoryMmap, b: &Buffers, unit: &mut Unit) -> Result<u32, Malformed> {
        let mut req = [0u8; 24];
        let readable = total(&b.readable);
        let room = total(&b.writable);
        if room == 0 || !in_memory(mem, &sub(&b.writable, 0, 5)) {
            return Err(Malformed::NoResponse);
        }
        let got = readable >= 4 && gather(mem, &b.readable, 0, &mut req[..readable.min(24) as usize]);
        let kind = u32::from_le_bytes([req[0], req[1], req[2], req[3]]);
        match kind {
            VIRTIO_SCSI_T_TMF if got && readable >= 24 => {
                let subtype = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
                // An I_T nexus reset addresses the target only.
                let ours = if subtype == VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET {
                    req[8] == 1 && req[9] == 0
                } else {
                    lun_is_ours(&req[8..16])
                };
                let response = if !ours {
                    VIRTIO_SCSI_S_BAD_TARGET
                } else {
                    match subtype {
                        // Commands complete before the next request is taken: nothing to abort or find.
                        VIRTIO_SCSI_T_TMF_ABORT_TASK
                        | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
                        | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET
                        | VIRTIO_SCSI_T_TMF_QUERY_TASK
                        | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => VIRTIO_SCSI_S_OK,
                        VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET | VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => {
                            unit.locked = false;
                            unit.last_sense = None;
                            unit.unit_attention = Some(RESET_OCCURRED);
                            VIRTIO_SCSI_S_OK
                        }
                        _ => VIRTIO_SCSI_S_FUNCTION_REJECTED,
                    }
                };
                Ok(if scatter(mem, &b.writable, 0, &[response as u8]) { 1 } else { 0 })
            }
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE if room >= 5 => {
                let response = if !got || readable < 16 {
                    VIRTIO_SCSI_S_FAILURE
                } else if !lun_is_ours(&req[4..12]) {
                    VIRTIO_SCSI_S_BAD_TARGET
                } else {
                    VIRTIO_SCSI_S_OK
                };
                // event_actual = 0: no asynchronous events.
                Ok(if scatter(mem, &b.writable, 0, &[0, 0, 0, 0, response as u8]) { 5 } else { 0 })
            }
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => Err(Malformed::NoResponse),
            _ => {
                log::debug!("{}: control request of type {kind} refused", self.drive.id);
                Ok(if scatter(mem, &b.writable, 0, &[VIRTIO_SCSI_S_FAILURE as u8]) { 1 } else { 0 })
            }
        }
    }

    /// Serves a command request; returns how many bytes it wrote, or Err when the response has no room.
    fn request(&self, mem: &GuestMemoryMmap, b: &Buffers, unit: &mut Unit) -> Result<u32, Malformed> {
        let sense_size = self.sense_size.load(Ordering::Acquire) as usize;
        let cdb_size = self.cdb_size.load(Ordering::Acquire) as usize;
        let resp_len = RESP_FIXED + sense_size;
        let writable = total(&b.writable);
        if writable < resp_len as u64 || !in_memory(mem, &sub(&b.writable, 0, resp_len as u64)) {
            return Err(Malformed::NoResponse);
        }
        let data_in = writable - resp_len as u64;
        let req_len = REQ_FIXED + cdb_size;
        let readable = total(&b.readable);
        let data_out = readable.saturating_sub(req_len as u64);
        let mut req = [0u8; REQ_FIXED + MAX_CDB_SIZE as usize];
        let outcome = if readable < req_len as u64 || !gather(mem, &b.readable, 0, &mut req[..req_len]) {
            log::debug!("{}: SCSI request header short or outside guest memory", self.drive.id);
            Outcome { response: VIRTIO_SCSI_S_FAILURE as u8, status: GOOD, sense: None, transferred: 0 }
        } else if data_in > 0 && data_out > 0 {
            log::debug!("{}: bidirectional SCSI request refused", self.drive.id);
            Outcome { response: VIRTIO_SCSI_S_FAILURE as u8, status: GOOD, sense: None, transferred: 0 }
        } else if !in_memory(mem, &b.writable) || !in_memory(mem, &b.readable) {
            log::debug!("{}: SCSI request buffers outside guest memory", self.drive.id);
            Outcome { response: VIRTIO_SCSI_S_FAILURE as u8, status: GOOD, sense: None, transferred: 0 }
        } else if !lun_is_ours(&req[..8]) && req[..8] != REPORT_LUNS_WLUN {
            Outcome { response: VIRTIO_SCSI_S_BAD_TARGET as u8, status: GOOD, sense: None, transferred: 0 }
        } else {
            // The CDB, zero-padded: a CDB longer than cdb_size reads zeros.
            let mut cdb = [0u8; 16];
            let n = cdb_size.min(16);
            cdb[..n].copy_from_slice(&req[REQ_FIXED..REQ_FIXED + n]);
            if req[..8] == REPORT_LUNS_WLUN && cdb[0] != op::REPORT_LUNS {
                // The REPORT LUNS well-known logical unit knows one command.
                let sense = Some(INVALID_OPCODE);
                Outcome { response: VIRTIO_SCSI_S_OK as u8, status: CHECK_CONDITION, sense, transferred: 0 }
            } else {
                self.command(mem, &cdb, unit, &sub(&b.writable, resp_len as u64, data_in))
            }
        };
        if matches!(u32::from(outcome.response), VIRTIO_SCSI_S_FAILURE | VIRTIO_SCSI_S_OVERRUN) {
            self.drive.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut resp = [0u8; RESP_FIXED + MAX_SENSE_SIZE as usize];
        let sense_len = match outcome.sense {
            Some(sense) => {
                let n = sense_size.min(18);
                resp[RESP_FIXED..RESP_FIXED + n].copy_from_slice(&sense.fixed()[..n]);
                n as u32
            }
            None => 0,
        };
        let residual = data_in.saturating_sub(outcome.transferred).min(u64::from(u32::MAX)) as u32;
        resp[0..4].copy_from_slice(&sense_len.to_le_bytes());
        resp[4..8].copy_from_slice(&residual.to_le_bytes());
        resp[10] = outcome.status;
        resp[11] = outcome.response;
        if !scatter(mem, &b.writable, 0, &resp[..resp_len]) {
            return Err(Malformed::NoResponse);
        }
        Ok((resp_len as u64 + outcome.transferred).min(u64::from(u32::MAX)) as u32)
    }

    /// Runs a command against the unit and moves its data into `data_in`.
    fn command(
        &self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; 16],
        unit: &mut Unit,
        data_in: &[(GuestAddress, u32)],
    ) -> Outcome {
        let room = total(data_in);
        let result = self.execute(cdb, unit);
        unit.last_sense = match &result {
            Err(sense) if cdb[0] != op::REQUEST_SENSE => Some(*sense),
            _ => None,
        };
        let check = |sense: Sense| Outcome {
            response: VIRTIO_SCSI_S_OK as u8,
            status: CHECK_CONDITION,
            sense: Some(sense),
            transferred: 0,
        };
        let (wanted, transferred) = match result {
            Err(sense) => return check(sense),
            Ok(Reply::Nothing) => (0, 0),
            Ok(Reply::Data(data, allocation)) => {
                let wanted = data.len().min(allocation) as u64;
                let n = wanted.min(room);
                if !scatter(mem, data_in, 0, &data[..n as usize]) {
                    return Outcome {
                        response: VIRTIO_SCSI_S_FAILURE as u8,
                        status: GOOD,
                        sense: None,
                        transferred: 0,
                    };
                }
                (wanted, n)
            }
            Ok(Reply::Read { media, offset, len }) => {
                let n = len.min(room);
                match read_into(mem, &media, offset, &sub(data_in, 0, n)) {
                    Ok(()) => {
                        self.drive.stats.reads.fetch_add(1, Ordering::Relaxed);
                        self.drive.stats.bytes_read.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        log::warn!("{}: read at byte {offset} failed: {e}", self.drive.id);
                        self.drive.stats.errors.fetch_add(1, Ordering::Relaxed);
                        unit.last_sense = Some(UNRECOVERED_READ_ERROR);
                        return check(UNRECOVERED_READ_ERROR);
                    }
                }
                (len, n)
            }
        };
        let response = if wanted > room { VIRTIO_SCSI_S_OVERRUN } else { VIRTIO_SCSI_S_OK };
        Outcome { response: response as u8, status: GOOD, sense: None, transferred }
    }

    /// Brings the unit up to date with the drive: a new generation means new media (a unit attention
    /// and a NewMedia event) or none (a MediaRemoval event).
    fn sync_media(&self, unit: &mut Unit) -> Option<Media> {
        // Generation first: a change that lands between the two reads is seen again next time.
        let generation = self.drive.generation();
        let media = self.drive.media();
        if generation != unit.generation {
            unit.generation = generation;
            if media.is_some() {
                unit.unit_attention = Some(MEDIUM_CHANGED);
                unit.media_event = Some(MEDIA_EVENT_NEW);
                unit.tray_open = false;
            } else {
                if unit.unit_attention == Some(MEDIUM_CHANGED) {
                    unit.unit_attention = None;
                }
                unit.media_event = Some(MEDIA_EVENT_REMOVAL);
            }
        }
        media
    }

    /// Carries out one CDB.
    fn execute(&self, cdb: &[u8; 16], unit: &mut Unit) -> Result<Reply, Sense> {
        let media = self.sync_media(unit);
        let opcode = cdb[0];
        let exempt = matches!(
            opcode,
            op::INQUIRY
                | op::REQUEST_SENSE
                | op::REPORT_LUNS
                | op::GET_CONFIGURATION
                | op::GET_EVENT_STATUS_NOTIFICATION
        );
        if !exempt && let Some(sense) = unit.unit_attention.take() {
            return Err(sense);
        }
        let blocks = media.as_ref().map(|m| m.backend.size() / BLOCK_SIZE);
        let need_media = || media.clone().ok_or(MEDIUM_NOT_PRESENT);
        let data = |v: Vec<u8>, allocation: usize| Ok(Reply::Data(v, allocation));
        match opcode {
            op::TEST_UNIT_READY => need_media().map(|_| Reply::Nothing),
            op::REQUEST_SENSE => {
                let sense = unit
                    .last_sense
                    .take()
                    .or_else(|| unit.unit_attention.take())
                    .unwrap_or(if media.is_some() { NO_SENSE } else { MEDIUM_NOT_PRESENT });
                data(sense.fixed().to_vec(), usize::from(cdb[4]))
            }
            op::INQUIRY => self.inquiry(cdb).map(|v| Reply::Data(v, be16(cdb, 3))),
            op::REPORT_LUNS => {
                let allocation = be32(cdb, 6) as usize;
                if allocation < 16 {
                    return Err(INVALID_FIELD_IN_CDB);
                }
                match cdb[2] {
                    // LUN 0 (eight zero bytes) only.
                    0x00 | 0x02 => data([&[0, 0, 0, 8][..], &[0; 12]].concat(), allocation),
                    // No well-known logical units.
                    0x01 => data(vec![0; 8], allocation),
                    _ => Err(INVALID_FIELD_IN_CDB),
                }
            }
            op::READ_CAPACITY_10 => {
                need_media()?;
                let last = blocks.unwrap_or(0).saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut v = last.to_be_bytes().to_vec();
                v.extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                data(v, 8)
            }
            op::READ_10 | op::READ_12 | op::READ_16 => {
                let (lba, count) = match opcode {
                    op::READ_10 => (be32(cdb, 2), be16(cdb, 7) as u64),
                    op::READ_12 => (be32(cdb, 2), be32(cdb, 6)),
                    _ => (be64(cdb, 2), be32(cdb, 10)),
                };
                let media = need_media()?;
                if lba.checked_add(count).is_none_or(|end| end > blocks.unwrap_or(0)) {
                    return Err(LBA_OUT_OF_RANGE);
                }
                if count == 0 {
                    return Ok(Reply::Nothing);
                }
                Ok(Reply::Read { media, offset: lba * BLOCK_SIZE, len: count * BLOCK_SIZE })
            }
            op::SEEK_10 => {
                need_media()?;
                if be32(cdb, 2) >= blocks.unwrap_or(0) {
                    return Err(LBA_OUT_OF_RANGE);
                }
                Ok(Reply::Nothing)
            }
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 | op::WRITE_AND_VERIFY_10 => {
                need_media()?;
                Err(WRITE_PROTECTED)
            }
            op::SYNCHRONIZE_CACHE_10 | op::SET_CD_SPEED => Ok(Reply::Nothing),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb, unit),
            op::GET_CONFIGURATION => get_configuration(cdb, blocks),
            op::READ_TOC_PMA_ATIP => read_toc(cdb, need_media().map(|_| blocks.unwrap_or(0))?),
            op::READ_DISC_INFORMATION => {
                need_media()?;
                if cdb[1] & 0x07 != 0 {
                    return Err(INVALID_FIELD_IN_CDB);
                }
                let mut v = vec![0u8; 34];
                v[0..2].copy_from_slice(&32u16.to_be_bytes());
                v[2] = 0x0E; // last session complete, disc finalized, not erasable
                v[3] = 1; // first track
                v[4] = 1; // sessions
                v[5] = 1; // first track of the last session
                v[6] = 1; // last track of the last session
                v[16..24].fill(0xFF); // no lead-in / lead-out of a next session
                data(v, be16(cdb, 7))
            }
            op::READ_TRACK_INFORMATION => {
                let blocks = need_media().map(|_| blocks.unwrap_or(0))?;
                let number = be32(cdb, 2);
                let ok = match cdb[1] & 0x03 {
                    0 => number < blocks,
                    1 | 2 => number == 1,
                    _ => false,
                };
                if !ok {
                    return Err(INVALID_FIELD_IN_CDB);
                }
                let mut v = vec![0u8; 36];
                v[0..2].copy_from_slice(&34u16.to_be_bytes());
                v[2] = 1; // track
                v[3] = 1; // session
                v[5] = 0x04; // data track, recorded uninterrupted
                v[6] = 0x01; // data mode 1
                v[24..28].copy_from_slice(&(blocks.min(u64::from(u32::MAX)) as u32).to_be_bytes());
                v[28..32].copy_from_slice(&(blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32).to_be_bytes());
                data(v, be16(cdb, 7))
            }
            op::GET_EVENT_STATUS_NOTIFICATION => {
                if cdb[1] & 0x01 == 0 {
                    // Asynchronous notification is not supported.
                    return Err(INVALID_FIELD_IN_CDB);
                }
                let allocation = be16(cdb, 7);
                if cdb[4] & 0x10 == 0 {
                    // No event class we support was asked for: NEA, header only.
                    return data(vec![0, 2, 0x80, 0x10], allocation);
                }
                // The event is consumed only when the driver gets to see it.
                let code = if allocation >= 8 { unit.media_event.take().unwrap_or(0) } else { 0 };
                let status = if media.is_some() { 0x02 } else { u8::from(unit.tray_open) };
                data(vec![0, 6, 0x04, 0x10, code, status, 0, 0], allocation)
            }
            op::MECHANISM_STATUS => {
                let open = unit.tray_open && media.is_none();
                data(vec![0, u8::from(open) << 4, 0, 0, 0, 0, 0, 0], be16(cdb, 8))
            }
            op::START_STOP_UNIT => {
                let (power, load_eject, start) = (cdb[4] >> 4, cdb[4] & 0x02 != 0, cdb[4] & 0x01 != 0);
                match (power, load_eject, start) {
                    (0, true, false) => {
                        if unit.locked {
                            return Err(REMOVAL_PREVENTED);
                        }
                        if media.is_some() && self.drive.change_media(None).is_err() {
                            return Err(REMOVAL_PREVENTED);
                        }
                        unit.tray_open = true;
                        log::info!("{}: the guest ejected the medium", self.drive.id);
                        Ok(Reply::Nothing)
                    }
                    (0, true, true) => {
                        unit.tray_open = false;
                        Ok(Reply::Nothing)
                    }
                    (0, false, true) => need_media().map(|_| Reply::Nothing),
                    _ => Ok(Reply::Nothing),
                }
            }
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                unit.locked = cdb[4] & 0x01 != 0;
                Ok(Reply::Nothing)
            }
            op::READ_DVD_STRUCTURE => {
                let blocks = need_media().map(|_| blocks.unwrap_or(0))?;
                let (format, allocation) = (cdb[7], be16(cdb, 8));
                if format < 0xC0 && blocks <= CD_MAX_BLOCKS {
                    return Err(INCOMPATIBLE_FORMAT);
                }
                match format {
                    0x00 if cdb[6] == 0 => {
                        // Physical format information: DVD-ROM, one embossed layer.
                        let mut v = vec![0u8; 4 + 2048];
                        v[0..2].copy_from_slice(&2050u16.to_be_bytes());
                        v[4] = 0x01; // DVD-ROM, part version 1
                        v[5] = 0x0F; // 120 mm, maximum rate unspecified
                        v[6] = 0x01; // one layer, embossed
                        v[8..12].copy_from_slice(&0x30000u32.to_be_bytes());
                        let end = (0x30000 + blocks - 1).min(0xFF_FFFF) as u32;
                        v[12..16].copy_from_slice(&end.to_be_bytes());
                        data(v, allocation)
                    }
                    // Copyright information: no protection, all regions.
                    0x01 => data(vec![0, 6, 0, 0, 0, 0, 0, 0], allocation),
                    _ => Err(INVALID_FIELD_IN_CDB),
                }
            }
            _ => Err(INVALID_OPCODE),
        }
    }

    fn inquiry(&self, cdb: &[u8; 16]) -> Result<Vec<u8>, Sense> {
        let (evpd, page) = (cdb[1] & 0x01 != 0, cdb[2]);
        if cdb[1] & 0x02 != 0 || (!evpd && page != 0) {
            return Err(INVALID_FIELD_IN_CDB);
        }
        if !evpd {
            let mut v = vec![0u8; 36];
            v[0] = 0x05; // connected, CD/DVD device
            v[1] = 0x80; // removable
            v[2] = 0x05; // SPC-3
            v[3] = 0x02; // response data format
            v[4] = 36 - 5;
            v[7] = 0x02; // command queuing
            v[8..16].copy_from_slice(b"PORTHOLE");
            v[16..32].copy_from_slice(b"VIRTUAL DVD-ROM ");
            let mut revision = *b"    ";
            let version = env!("CARGO_PKG_VERSION").as_bytes();
            let n = version.len().min(4);
            revision[..n].copy_from_slice(&version[..n]);
            v[32..36].copy_from_slice(&revision);
            return Ok(v);
        }
        let serial = self.serial();
        let mut v = vec![0x05, page, 0, 0];
        match page {
            0x00 => v.extend_from_slice(&[0x00, 0x80, 0x83]),
            0x80 => v.extend_from_slice(&serial),
            0x83 => {
                // One designator: T10 vendor ID based, ASCII, of the logical unit.
                let id = [&b"PORTHOLE"[..], &serial].concat();
                v.extend_from_slice(&[0x02, 0x01, 0, id.len() as u8]);
                v.extend_from_slice(&id);
            }
            _ => return Err(INVALID_FIELD_IN_CDB),
        }
        let len = (v.len() - 4) as u16;
        v[2..4].copy_from_slice(&len.to_be_bytes());
        Ok(v)
    }

    /// The unit serial number: the drive's serial (or its id), printable ASCII, at most 32 bytes.
    fn serial(&self) -> Vec<u8> {
        let source = if self.drive.serial.trim().is_empty() { &self.drive.id } else { &self.drive.serial };
        source.trim().bytes().take(32).map(|c| if c.is_ascii_graphic() || c == b' ' { c } else { b'_' }).collect()
    }

    fn mode_sense(&self, cdb: &[u8; 16], unit: &Unit) -> Result<Reply, Sense> {
        let ten = cdb[0] == op::MODE_SENSE_10;
        let (control, page, subpage) = (cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]);
        if control == 3 {
            return Err(SAVING_NOT_SUPPORTED);
        }
        if !matches!(page, 0x2A | 0x3F) || !matches!(subpage, 0x00 | 0xFF) {
            return Err(INVALID_FIELD_IN_CDB);
        }
        // MM capabilities and mechanical status (MMC-3 layout, 0x14 bytes after the header).
        let mut caps = [0u8; 22];
        caps[0] = 0x2A;
        caps[1] = 0x14;
        if control != 1 {
            const SPEED: u16 = 24 * 176; // kB/s, 24x CD
            caps[2] = 0x3B; // reads CD-R, CD-RW, DVD-ROM, DVD-R, DVD-RAM
            caps[6] = 0x20 | 0x08 | 0x01 | if unit.locked { 0x02 } else { 0 }; // tray, eject, lock
            caps[8..10].copy_from_slice(&SPEED.to_be_bytes());
            caps[14..16].copy_from_slice(&SPEED.to_be_bytes());
        }
        // No block descriptors.
        let mut v = if ten { vec![0u8; 8] } else { vec![0u8; 4] };
        v.extend_from_slice(&caps);
        let allocation = if ten {
            let len = (v.len() - 2) as u16;
            v[0..2].copy_from_slice(&len.to_be_bytes());
            be16(cdb, 7)
        } else {
            v[0] = (v.len() - 1) as u8;
            usize::from(cdb[4])
        };
        Ok(Reply::Data(v, allocation))
    }
}

/// GET CONFIGURATION: the features of a read-only DVD/CD drive, current as the medium allows.
fn get_configuration(cdb: &[u8; 16], blocks: Option<u64>) -> Result<Reply, Sense> {
    let (rt, start, allocation) = (cdb[1] & 0x03, be16(cdb, 2) as u16, be16(cdb, 7));
    if rt == 3 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    let profile = match blocks {
        None => 0,
        Some(b) if b > CD_MAX_BLOCKS => PROFILE_DVD_ROM,
        Some(_) => PROFILE_CD_ROM,
    };
    let (dvd, cd) = (profile == PROFILE_DVD_ROM, profile == PROFILE_CD_ROM);
    // (feature code, version, persistent, current, additional data)
    let blocking: u16 = if dvd { 16 } else { 1 };
    let features: [(u16, u8, bool, bool, Vec<u8>); 8] = [
        (0x0000, 0, true, true, vec![0x00, 0x10, u8::from(dvd), 0, 0x00, 0x08, u8::from(cd), 0]),
        (0x0001, 0, true, true, vec![0, 0, 0, 1]),    // core: SCSI
        (0x0002, 0, true, true, vec![0; 4]),          // morphing: polled events only
        (0x0003, 0, true, true, vec![0x29, 0, 0, 0]), // removable medium: tray, eject, lock
        (
            0x0010,
            0,
            false,
            blocks.is_some(),
            [&(BLOCK_SIZE as u32).to_be_bytes()[..], &blocking.to_be_bytes(), &[0, 0]].concat(),
        ),
        (0x001D, 0, false, cd, vec![]),     // multi-read
        (0x001E, 2, false, cd, vec![0; 4]), // CD read
        (0x001F, 0, false, dvd, vec![]),    // DVD read
    ];
    let mut v = vec![0u8; 8];
    v[6..8].copy_from_slice(&profile.to_be_bytes());
    for (code, version, persistent, current, extra) in features {
        let wanted = match rt {
            0 => code >= start,
            1 => code >= start && current,
            _ => code == start,
        };
        if wanted {
            v.extend_from_slice(&code.to_be_bytes());
            v.push(version << 2 | u8::from(persistent) << 1 | u8::from(current));
            v.push(extra.len() as u8);
            v.extend_from_slice(&extra);
        }
    }
    let len = (v.len() - 4) as u32;
    v[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(Reply::Data(v, allocation))
}

/// READ TOC/PMA/ATIP of a single-session disc with one data track of `blocks` blocks.
fn read_toc(cdb: &[u8; 16], blocks: u64) -> Result<Reply, Sense> {
    let msf = cdb[1] & 0x02 != 0;
    let allocation = be16(cdb, 7);
    let mut format = cdb[2] & 0x0F;
    if format == 0 {
        // SFF-8020 drivers put the format in the control byte.
        format = cdb[9] >> 6;
    }
    let track = |number: u8, lba: u64| {
        let mut d = vec![0, 0x14, number, 0]; // ADR 1, data track
        d.extend_from_slice(&toc_address(lba, msf));
        d
    };
    let mut v = vec![0, 0, 1, 1];
    match (format, cdb[6]) {
        (0, 0 | 1) => {
            v.extend(track(1, 0));
            v.extend(track(0xAA, blocks));
        }
        (0, 0xAA) => v.extend(track(0xAA, blocks)),
        (1, _) => v.extend(track(1, 0)),
        _ => return Err(INVALID_FIELD_IN_CDB),
    }
    let len = (v.len() - 2) as u16;
    v[0..2].copy_from_slice(&len.to_be_bytes());
    Ok(Reply::Data(v, allocation))
}

/// Reads `offset..` of the medium straight into the data-in buffers `pieces`.
fn read_into(
    mem: &GuestMemoryMmap,
    media: &Media,
    mut offset: u64,
    pieces: &[(GuestAddress, u32)],
) -> std::io::Result<()> {
    for &(address, len) in pieces {
        for slice in mem.get_slices(address, len as usize) {
            let slice = slice.map_err(std::io::Error::other)?;
            media.backend.read_at(&slice, offset)?;
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::virtio::host_driver::{DESC_F_NEXT, DESC_F_WRITE, Desc, HostDriver};

    const WAIT: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(200);
    const REQ: u64 = 0x1_0000;
    const RESP: u64 = 0x1_1000;
    const CTRL_REQ: u64 = 0x1_2000;
    const CTRL_RESP: u64 = 0x1_3000;
    const DATA: u64 = 0x2_0000;
    const MEM: usize = 0x10_0000;
    const LUN0: [u8; 8] = [1, 0, 0x40, 0, 0, 0, 0, 0];

    type Driver = HostDriver<VirtioScsi>;

    /// An ISO-like image: `blocks` 2048-byte blocks of a pattern, or a sparse file of `bytes`.
    struct Iso {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Iso {
        fn create(name: &str, fill: impl FnOnce(&std::path::Path)) -> Iso {
            let dir = std::env::temp_dir().join(format!("porthole-scsi-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("disc.iso");
            fill(&path);
            Iso { dir, path }
        }
        fn new(name: &str, blocks: usize) -> Iso {
            Iso::create(name, |path| {
                let bytes: Vec<u8> = (0..blocks * 2048).map(|i| (i / 2048 * 7 + i % 253) as u8).collect();
                std::fs::write(path, bytes).unwrap();
            })
        }
        fn sparse(name: &str, bytes: u64) -> Iso {
            Iso::create(name, |path| std::fs::File::create(path).unwrap().set_len(bytes).unwrap())
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
        fn media(&self) -> Media {
            Drive::open_media(&self.path, true).unwrap()
        }
    }

    impl Drop for Iso {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn cdrom(iso: Option<&Iso>) -> Arc<Drive> {
        Arc::new(Drive::new("cdrom0".into(), true, true, "PH-CD-0".into(), iso.map(Iso::media)))
    }

    fn driver(drive: Arc<Drive>) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let scsi = VirtioScsi::new(drive, interrupt.clone()).unwrap();
        HostDriver::new(scsi, interrupt, mem, &[16, 16, 16])
    }

    #[derive(Debug)]
    struct Answer {
        response: u8,
        status: u8,
        sense: Vec<u8>,
        resid: u32,
        data: Vec<u8>,
        used: u32,
    }

    impl Answer {
        fn good(&self) -> bool {
            self.response == 0 && self.status == GOOD
        }
        /// (sense key, ASC, ASCQ) of a CHECK CONDITION.
        fn sense(&self) -> (u8, u8, u8) {
            assert_eq!((self.response, self.status), (0, CHECK_CONDITION), "{self:?}");
            assert_eq!(self.sense.len(), 18);
            assert_eq!(self.sense[0], 0x70, "fixed format");
            (self.sense[2], self.sense[12], self.sense[13])
        }
    }

    /// Waits for the one completion of `queue` (head 0).
    fn completed(d: &mut Driver, queue: usize) -> u32 {
        let done = d.completions(queue, WAIT);
        assert_eq!(done.len(), 1, "one completion");
        assert_eq!(done[0].0, 0, "the head of the chain");
        done[0].1
    }

    /// Reads the response header at RESP and `data_in` - resid bytes of data at `data`.
    fn answer(d: &Driver, used: u32, data: u64, data_in: u32) -> Answer {
        let mut resp = [0u8; 108];
        d.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        let sense_len = u32::from_le_bytes(resp[0..4].try_into().unwrap()) as usize;
        let resid = u32::from_le_bytes(resp[4..8].try_into().unwrap());
        let mut bytes = vec![0u8; data_in.saturating_sub(resid) as usize];
        d.mem.read_slice(&mut bytes, GuestAddress(data)).unwrap();
        Answer {
            response: resp[11],
            status: resp[10],
            sense: resp[12..12 + sense_len].to_vec(),
            resid,
            data: bytes,
            used,
        }
    }

    /// Sends `cdb` to `lun` with a data-in buffer of `data_in` bytes: request, response and data in
    /// three descriptors.
    fn command_to(d: &mut Driver, lun: [u8; 8], cdb: &[u8], data_in: u32) -> Answer {
        let mut req = [0u8; 51];
        req[..8].copy_from_slice(&lun);
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        d.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        d.mem.write_slice(&[0xEE; 108], GuestAddress(RESP)).unwrap();
        d.mem.write_slice(&vec![0xEE; data_in as usize + 16], GuestAddress(DATA)).unwrap();
        d.write_desc(REQUEST_QUEUE, 0, Desc { addr: REQ, len: 51, flags: DESC_F_NEXT, next: 1 });
        let more = if data_in > 0 { DESC_F_NEXT } else { 0 };
        d.write_desc(REQUEST_QUEUE, 1, Desc { addr: RESP, len: 108, flags: DESC_F_WRITE | more, next: 2 });
        d.write_desc(REQUEST_QUEUE, 2, Desc { addr: DATA, len: data_in, flags: DESC_F_WRITE, next: 0 });
        d.publish(REQUEST_QUEUE, 0, 1);
        let used = completed(d, REQUEST_QUEUE);
        let a = answer(d, used, DATA, data_in);
        let mut after = [0u8; 16];
        d.mem.read_slice(&mut after, GuestAddress(DATA + u64::from(data_in))).unwrap();
        assert_eq!(after, [0xEE; 16], "nothing written past the data-in buffer");
        assert_eq!(a.used, 108 + data_in - a.resid, "used length: response header and data");
        a
    }

    fn command(d: &mut Driver, cdb: &[u8], data_in: u32) -> Answer {
        command_to(d, LUN0, cdb, data_in)
    }

    /// Sends a control request; returns the `resp_len` bytes of its response and the used length.
    fn control(d: &mut Driver, req: &[u8], resp_len: u32) -> (Vec<u8>, u32) {
        d.mem.write_slice(req, GuestAddress(CTRL_REQ)).unwrap();
        d.mem.write_slice(&vec![0xEE; resp_len as usize], GuestAddress(CTRL_RESP)).unwrap();
        let req_len = req.len() as u32;
        d.write_desc(CONTROL_QUEUE, 0, Desc { addr: CTRL_REQ, len: req_len, flags: DESC_F_NEXT, next: 1 });
        d.write_desc(CONTROL_QUEUE, 1, Desc { addr: CTRL_RESP, len: resp_len, flags: DESC_F_WRITE, next: 0 });
        d.publish(CONTROL_QUEUE, 0, 1);
        let used = completed(d, CONTROL_QUEUE);
        let mut resp = vec![0u8; resp_len as usize];
        d.mem.read_slice(&mut resp, GuestAddress(CTRL_RESP)).unwrap();
        (resp, used)
    }

    fn read10(lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [op::READ_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn gesn() -> [u8; 10] {
        [op::GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]
    }

    #[test]
    fn configuration_space_and_writable_sizes() {
        let iso = Iso::new("config", 4);
        let mut d = driver(cdrom(Some(&iso)));
        let mut b = [0u8; 36];
        d.read_config(0, &mut b);
        let field = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!((field(0), field(1), field(4), field(5), field(6)), (1, SEG_MAX, 16, 96, 32));
        assert_eq!(&b[28..36], &[0; 8], "max_channel, max_target, max_lun");
        assert_eq!(d.device.device().features() >> VIRTIO_RING_F_EVENT_IDX & 1, 1);
        // A 16-byte CDB: the request header is 35 bytes.
        d.write_config(24, &16u32.to_le_bytes());
        d.write_config(20, &1000u32.to_le_bytes());
        d.read_config(20, &mut b[..8]);
        assert_eq!(&b[..8], &[0, 1, 0, 0, 16, 0, 0, 0], "sense_size clamped to 256, cdb_size 16");
        d.write_config(20, &96u32.to_le_bytes());
        d.write_config(0, &7u32.to_le_bytes());
        d.read_config(0, &mut b[..4]);
        assert_eq!(b[..4], 1u32.to_le_bytes(), "num_queues is read-only");
        let mut req = [0u8; 35];
        req[..8].copy_from_slice(&LUN0);
        req[19] = op::READ_CAPACITY_10;
        d.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        d.write_desc(REQUEST_QUEUE, 0, Desc { addr: REQ, len: 35, flags: DESC_F_NEXT, next: 1 });
        // Response header and data in one buffer.
        d.write_desc(REQUEST_QUEUE, 1, Desc { addr: RESP, len: 108 + 8, flags: DESC_F_WRITE, next: 0 });
        d.publish(REQUEST_QUEUE, 0, 1);
        let used = completed(&mut d, REQUEST_QUEUE);
        let a = answer(&d, used, RESP + 108, 8);
        assert!(a.good(), "{a:?}");
        assert_eq!(a.data, [0, 0, 0, 3, 0, 0, 8, 0]);
        // A reset restores the defaults.
        d.init();
        d.read_config(20, &mut b[..8]);
        assert_eq!(&b[..8], &[96, 0, 0, 0, 32, 0, 0, 0]);
    }

    #[test]
    fn inquiry_describes_a_removable_dvd_drive() {
        let iso = Iso::new("inquiry", 4);
        let mut d = driver(cdrom(Some(&iso)));
        let a = command(&mut d, &[op::INQUIRY, 0, 0, 0, 96, 0], 96);
        assert!(a.good(), "{a:?}");
        assert_eq!(a.data.len(), 36);
        assert_eq!(a.resid, 60, "36 of 96 bytes");
        assert_eq!(a.data[0], 0x05, "CD/DVD device");
        assert_eq!(a.data[1], 0x80, "removable");
        assert_eq!(a.data[4], 31, "additional length");
        assert_eq!(&a.data[8..16], b"PORTHOLE");
        assert_eq!(&a.data[16..32], b"VIRTUAL DVD-ROM ");
        // Vital product data.
        let a = command(&mut d, &[op::INQUIRY, 1, 0x00, 0, 255, 0], 255);
        assert_eq!(a.data, [5, 0, 0, 3, 0x00, 0x80, 0x83]);
        let a = command(&mut d, &[op::INQUIRY, 1, 0x80, 0, 255, 0], 255);
        assert_eq!(a.data, [&[5, 0x80, 0, 7][..], b"PH-CD-0"].concat());
        let a = command(&mut d, &[op::INQUIRY, 1, 0x83, 0, 255, 0], 255);
        assert_eq!(a.data, [&[5, 0x83, 0, 19, 2, 1, 0, 15][..], b"PORTHOLEPH-CD-0"].concat());
        assert_eq!(command(&mut d, &[op::INQUIRY, 1, 0x99, 0, 255, 0], 255).sense(), (5, 0x24, 0));
        assert_eq!(command(&mut d, &[op::INQUIRY, 0, 0x80, 0, 255, 0], 255).sense(), (5, 0x24, 0));
        let a = command(&mut d, &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], 16);
        assert_eq!(a.data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn short_allocation_lengths_and_buffers_set_the_residual() {
        let iso = Iso::new("resid", 4);
        let mut d = driver(cdrom(Some(&iso)));
        let a = command(&mut d, &[op::INQUIRY, 0, 0, 0, 8, 0], 64);
        assert!(a.good());
        assert_eq!((a.data.len(), a.resid), (8, 56), "allocation length 8");
        let a = command(&mut d, &read10(0, 1), 4096);
        assert!(a.good());
        assert_eq!((a.data.len(), a.resid), (2048, 2048), "one block in a two-block buffer");
        let a = command(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0);
        assert!(a.good());
        assert_eq!((a.resid, a.used), (0, 108));
        // More than the data-in buffers hold: an overrun, with what fits transferred.
        let a = command(&mut d, &read10(0, 2), 2048);
        assert_eq!(a.response, VIRTIO_SCSI_S_OVERRUN as u8);
        assert_eq!(a.data, iso.bytes()[..2048]);
    }

    #[test]
    fn read_capacity_and_reads_match_the_image() {
        let iso = Iso::new("read", 16);
        let drive = cdrom(Some(&iso));
        let mut d = driver(drive.clone());
        assert!(command(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0).good(), "no unit attention at start");
        let a = command(&mut d, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(a.data, [0, 0, 0, 15, 0, 0, 8, 0], "last LBA 15, 2048-byte blocks");
        let file = iso.bytes();
        let a = command(&mut d, &read10(3, 2), 4096);
        assert!(a.good());
        assert_eq!((a.resid, a.data.as_slice()), (0, &file[3 * 2048..5 * 2048]));
        let mut read12 = [op::READ_12, 0, 0, 0, 0, 15, 0, 0, 0, 1, 0, 0];
        assert_eq!(command(&mut d, &read12, 2048).data, file[15 * 2048..]);
        let mut read16 = [0u8; 16];
        read16[0] = op::READ_16;
        read16[9] = 14;
        read16[13] = 2;
        assert_eq!(command(&mut d, &read16, 4096).data, file[14 * 2048..]);
        assert_eq!(command(&mut d, &read10(15, 2), 4096).sense(), (5, 0x21, 0), "past the end");
        read12[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        read12[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(command(&mut d, &read12, 2048).sense(), (5, 0x21, 0), "overflow");
        assert!(command(&mut d, &read10(16, 0), 0).good(), "zero blocks");
        assert_eq!(command(&mut d, &[op::WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0).sense(), (7, 0x27, 0));
        assert_eq!(iso.bytes(), file);
        assert_eq!(drive.stats.reads.load(Ordering::Relaxed), 3);
        assert_eq!(drive.stats.bytes_read.load(Ordering::Relaxed), 5 * 2048);
    }

    #[test]
    fn data_lands_anywhere_in_split_buffers() {
        let iso = Iso::new("split", 4);
        let mut d = driver(cdrom(Some(&iso)));
        // Request header in two pieces; response header split, the data starting mid-descriptor and
        // spread over three descriptors.
        let mut req = [0u8; 51];
        req[..8].copy_from_slice(&LUN0);
        req[19..29].copy_from_slice(&read10(1, 2));
        d.mem.write_slice(&req[..20], GuestAddress(REQ)).unwrap();
        d.mem.write_slice(&req[20..], GuestAddress(REQ + 0x100)).unwrap();
        let descs = [
            Desc { addr: REQ, len: 20, flags: DESC_F_NEXT, next: 1 },
            Desc { addr: REQ + 0x100, len: 31, flags: DESC_F_NEXT, next: 2 },
            Desc { addr: RESP, len: 50, flags: DESC_F_WRITE | DESC_F_NEXT, next: 3 },
            Desc { addr: RESP + 0x100, len: 58 + 1000, flags: DESC_F_WRITE | DESC_F_NEXT, next: 4 },
            Desc { addr: DATA + 1000, len: 3000, flags: DESC_F_WRITE | DESC_F_NEXT, next: 5 },
            Desc { addr: DATA + 8192, len: 96, flags: DESC_F_WRITE, next: 0 },
        ];
        for (i, desc) in descs.into_iter().enumerate() {
            d.write_desc(REQUEST_QUEUE, i as u16, desc);
        }
        d.publish(REQUEST_QUEUE, 0, 1);
        assert_eq!(completed(&mut d, REQUEST_QUEUE), 108 + 4096);
        let mut resp = [0u8; 108];
        d.mem.read_slice(&mut resp[..50], GuestAddress(RESP)).unwrap();
        d.mem.read_slice(&mut resp[50..], GuestAddress(RESP + 0x100)).unwrap();
        assert_eq!((resp[4..8].to_vec(), resp[10], resp[11]), (vec![0; 4], GOOD, 0));
        let mut got = vec![0u8; 4096];
        d.mem.read_slice(&mut got[..1000], GuestAddress(RESP + 0x100 + 58)).unwrap();
        d.mem.read_slice(&mut got[1000..4000], GuestAddress(DATA + 1000)).unwrap();
        d.mem.read_slice(&mut got[4000..], GuestAddress(DATA + 8192)).unwrap();
        assert_eq!(got, iso.bytes()[2048..3 * 2048]);
    }

    #[test]
    fn an_empty_drive_reports_no_medium() {
        let mut d = driver(cdrom(None));
        assert_eq!(command(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0).sense(), (2, 0x3A, 0));
        // SeaBIOS asks again with REQUEST SENSE.
        let a = command(&mut d, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], 18);
        assert!(a.good());
        assert_eq!((a.data[0], a.data[2], a.data[12], a.data[13]), (0x70, 2, 0x3A, 0));
        let a = command(&mut d, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(a.sense(), (2, 0x3A, 0));
        assert_eq!(a.resid, 8);
        assert_eq!(command(&mut d, &read10(0, 1), 2048).sense(), (2, 0x3A, 0));
        assert_eq!(command(&mut d, &[op::READ_TOC_PMA_ATIP, 0, 0, 0, 0, 0, 0, 0, 12, 0], 12).sense(), (2, 0x3A, 0));
        // INQUIRY, GET CONFIGURATION and GET EVENT STATUS NOTIFICATION work without a medium.
        assert!(command(&mut d, &[op::INQUIRY, 0, 0, 0, 36, 0], 36).good());
        let a = command(&mut d, &[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8, 0], 8);
        assert_eq!(&a.data[6..8], &[0, 0], "no current profile");
        assert_eq!(command(&mut d, &gesn(), 8).data, [0, 6, 4, 0x10, 0, 0, 0, 0]);
    }

    #[test]
    fn media_changes_raise_a_unit_attention_and_an_event() {
        let iso_a = Iso::new("swap-a", 4);
        let iso_b = Iso::new("swap-b", 9);
        let drive = cdrom(Some(&iso_a));
        let mut d = driver(drive.clone());
        let tur = [op::TEST_UNIT_READY, 0, 0, 0, 0, 0];
        assert!(command(&mut d, &tur, 0).good());
        assert_eq!(command(&mut d, &gesn(), 8).data, [0, 6, 4, 0x10, 0, 2, 0, 0], "no event, media present");
        drive.change_media(Some(iso_b.media())).unwrap();
        assert_eq!(d.read_isr() & 2, 0, "no configuration interrupt: nothing in the configuration changed");
        // Exempt commands see no unit attention; the event is reported once.
        assert!(command(&mut d, &[op::INQUIRY, 0, 0, 0, 36, 0], 36).good());
        assert_eq!(command(&mut d, &gesn(), 8).data, [0, 6, 4, 0x10, MEDIA_EVENT_NEW, 2, 0, 0]);
        assert_eq!(command(&mut d, &gesn(), 8).data[4], 0);
        assert_eq!(command(&mut d, &tur, 0).sense(), (6, 0x28, 0), "unit attention");
        // REQUEST SENSE repeats it (for SeaBIOS), then it is gone.
        let a = command(&mut d, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], 18);
        assert_eq!((a.data[2], a.data[12]), (6, 0x28));
        assert!(command(&mut d, &tur, 0).good());
        let a = command(&mut d, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(a.data[..4], [0, 0, 0, 8]);
        assert_eq!(command(&mut d, &read10(8, 1), 2048).data, iso_b.bytes()[8 * 2048..]);
        // Ejected by the host: no unit attention, not ready, a removal event.
        drive.change_media(None).unwrap();
        assert_eq!(command(&mut d, &tur, 0).sense(), (2, 0x3A, 0));
        assert_eq!(command(&mut d, &gesn(), 8).data, [0, 6, 4, 0x10, MEDIA_EVENT_REMOVAL, 0, 0, 0]);
        // Ejected and reinserted between two commands: a unit attention.
        drive.change_media(Some(iso_a.media())).unwrap();
        assert_eq!(command(&mut d, &read10(0, 1), 2048).sense(), (6, 0x28, 0));
        assert_eq!(command(&mut d, &read10(0, 1), 2048).data, iso_a.bytes()[..2048]);
    }

    #[test]
    fn the_guest_locks_and_ejects() {
        let iso = Iso::new("eject", 4);
        let drive = cdrom(Some(&iso));
        let mut d = driver(drive.clone());
        let eject = [op::START_STOP_UNIT, 0, 0, 0, 0x02, 0];
        let mode_sense = [op::MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 0, 64, 0];
        assert!(command(&mut d, &[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0], 0).good());
        let a = command(&mut d, &mode_sense, 64);
        assert_eq!(a.data.len(), 30);
        assert_eq!((a.data[1], a.data[8], a.data[9]), (28, 0x2A, 0x14));
        assert_eq!(a.data[8 + 2] & 0x08, 0x08, "reads DVD-ROM");
        assert_eq!(a.data[8 + 6], 0x2B, "tray, eject, locked, lock");
        assert_eq!(command(&mut d, &eject, 0).sense(), (5, 0x53, 2), "locked");
        assert!(drive.media().is_some());
        assert!(command(&mut d, &[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0, 0], 0).good());
        assert!(command(&mut d, &eject, 0).good());
        assert!(drive.media().is_none(), "the host sees the eject");
        assert_eq!(command(&mut d, &gesn(), 8).data[4..6], [MEDIA_EVENT_REMOVAL, 0x01], "removal, tray open");
        assert_eq!(command(&mut d, &[op::MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 8).data[1], 0x10);
        assert!(command(&mut d, &[op::START_STOP_UNIT, 0, 0, 0, 0x03, 0], 0).good(), "load");
        assert_eq!(command(&mut d, &gesn(), 8).data[4..6], [0, 0], "tray closed, no medium");
        // MODE SENSE(6), all pages, and the changeable values.
        let a = command(&mut d, &[op::MODE_SENSE_6, 0x08, 0x3F, 0, 255, 0], 255);
        assert_eq!((a.data.len(), a.data[0], a.data[3], a.data[4]), (26, 25, 0, 0x2A));
        let a = command(&mut d, &[op::MODE_SENSE_6, 0, 0x6A, 0, 255, 0], 255);
        assert_eq!(&a.data[6..], &[0; 20], "nothing is changeable");
        assert_eq!(command(&mut d, &[op::MODE_SENSE_6, 0, 0xEA, 0, 255, 0], 255).sense(), (5, 0x39, 0));
        assert_eq!(command(&mut d, &[op::MODE_SENSE_6, 0, 0x01, 0, 255, 0], 255).sense(), (5, 0x24, 0));
    }

    #[test]
    fn get_configuration_reports_the_profile_by_media_size() {
        let cd = Iso::new("cd", 4);
        let dvd = Iso::sparse("dvd", 800 << 20);
        let drive = cdrom(Some(&cd));
        let mut d = driver(drive.clone());
        let all = [op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0x01, 0, 0];
        let a = command(&mut d, &all, 256);
        assert!(a.good());
        assert_eq!(&a.data[6..8], &[0x00, 0x08], "CD-ROM");
        let len = u32::from_be_bytes(a.data[0..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, a.data.len());
        // Feature descriptors, in order.
        let mut features = Vec::new();
        let mut at = 8;
        while at < a.data.len() {
            features.push((be16(&a.data, at), a.data[at + 2] & 1));
            at += 4 + usize::from(a.data[at + 3]);
        }
        assert_eq!(at, a.data.len());
        assert_eq!(features, [(0, 1), (1, 1), (2, 1), (3, 1), (0x10, 1), (0x1D, 1), (0x1E, 1), (0x1F, 0)]);
        assert_eq!(&a.data[12..20], &[0x00, 0x10, 0, 0, 0x00, 0x08, 1, 0], "profile list, CD-ROM current");
        // Allocation length 8: the header only, with the full length.
        let a = command(&mut d, &[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8, 0], 8);
        assert_eq!((a.data.len(), u32::from_be_bytes(a.data[0..4].try_into().unwrap()) as usize), (8, len));
        // RT 2: one feature.
        let a = command(&mut d, &[op::GET_CONFIGURATION, 2, 0, 0x1F, 0, 0, 0, 0, 255, 0], 255);
        assert_eq!(&a.data[8..], &[0, 0x1F, 0, 0]);
        assert_eq!(command(&mut d, &[op::GET_CONFIGURATION, 3, 0, 0, 0, 0, 0, 0, 8, 0], 8).sense(), (5, 0x24, 0));
        // READ DVD STRUCTURE is for DVDs.
        let dvd_structure = [op::READ_DVD_STRUCTURE, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x04, 0, 0];
        assert_eq!(command(&mut d, &dvd_structure, 2052).sense(), (5, 0x30, 2));
        drive.change_media(Some(dvd.media())).unwrap();
        let a = command(&mut d, &[op::GET_CONFIGURATION, 1, 0, 0, 0, 0, 0, 0x01, 0, 0], 256);
        assert_eq!(&a.data[6..8], &[0x00, 0x10], "DVD-ROM");
        let a = command(&mut d, &dvd_structure, 2052);
        assert_eq!(a.sense(), (6, 0x28, 0), "the unit attention of the new medium");
        let a = command(&mut d, &dvd_structure, 2052);
        assert!(a.good());
        assert_eq!(&a.data[..8], &[0x08, 0x02, 0, 0, 0x01, 0x0F, 0x01, 0]);
    }

    #[test]
    fn read_toc_describes_one_data_track() {
        let iso = Iso::new("toc", 300);
        let mut d = driver(cdrom(Some(&iso)));
        let a = command(&mut d, &[op::READ_TOC_PMA_ATIP, 0, 0, 0, 0, 0, 0, 0, 100, 0], 100);
        assert!(a.good());
        assert_eq!(a.data, [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xAA, 0, 0, 0, 0x01, 0x2C]);
        // MSF: track 1 at 00:02:00, the lead-out at 300 + 150 frames = 00:06:00.
        let a = command(&mut d, &[op::READ_TOC_PMA_ATIP, 0x02, 0, 0, 0, 0, 0, 0, 100, 0], 100);
        assert_eq!(&a.data[8..12], &[0, 0, 2, 0]);
        assert_eq!(&a.data[16..20], &[0, 0, 6, 0]);
        // Starting at the lead-out; session information; a track that does not exist.
        let a = command(&mut d, &[op::READ_TOC_PMA_ATIP, 0, 0, 0, 0, 0, 0xAA, 0, 100, 0], 100);
        assert_eq!(a.data, [0, 10, 1, 1, 0, 0x14, 0xAA, 0, 0, 0, 0x01, 0x2C]);
        let a = command(&mut d, &[op::READ_TOC_PMA_ATIP, 0, 1, 0, 0, 0, 0, 0, 12, 0], 12);
        assert_eq!(a.data, [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
        assert_eq!(command(&mut d, &[op::READ_TOC_PMA_ATIP, 0, 0, 0, 0, 0, 2, 0, 100, 0], 100).sense(), (5, 0x24, 0));
        let a = command(&mut d, &[op::READ_DISC_INFORMATION, 0, 0, 0, 0, 0, 0, 0, 34, 0], 34);
        assert_eq!(&a.data[..7], &[0, 32, 0x0E, 1, 1, 1, 1]);
        let a = command(&mut d, &[op::READ_TRACK_INFORMATION, 1, 0, 0, 0, 1, 0, 0, 36, 0], 36);
        assert_eq!(&a.data[24..32], &[0, 0, 0x01, 0x2C, 0, 0, 0x01, 0x2B], "track size, last recorded");
    }

    #[test]
    fn other_targets_and_luns_do_not_exist() {
        let iso = Iso::new("lun", 4);
        let mut d = driver(cdrom(Some(&iso)));
        let inquiry = [op::INQUIRY, 0, 0, 0, 36, 0];
        for lun in [
            [1, 1, 0x40, 0, 0, 0, 0, 0],
            [1, 0, 0x40, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [1, 0, 0x80, 0, 0, 0, 0, 0],
        ] {
            let a = command_to(&mut d, lun, &inquiry, 36);
            assert_eq!(a.response, VIRTIO_SCSI_S_BAD_TARGET as u8, "{lun:?}");
            assert_eq!(a.resid, 36);
        }
        assert!(command_to(&mut d, [1, 0, 0, 0, 0, 0, 0, 0], &inquiry, 36).good(), "peripheral addressing");
        let report_luns = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0];
        let a = command_to(&mut d, REPORT_LUNS_WLUN, &report_luns, 16);
        assert_eq!(a.data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "the REPORT LUNS well-known LU");
        assert_eq!(command_to(&mut d, REPORT_LUNS_WLUN, &inquiry, 36).sense(), (5, 0x20, 0));
        assert_eq!(command(&mut d, &[0x02, 0, 0, 0, 0, 0], 0).sense(), (5, 0x20, 0), "unknown opcode");
        assert_eq!(command(&mut d, &[0xFF, 0, 0, 0, 0, 0], 0).sense(), (5, 0x20, 0), "unknown opcode");
    }

    #[test]
    fn the_control_queue_answers_task_management_and_notification_queries() {
        let iso = Iso::new("control", 4);
        let mut d = driver(cdrom(Some(&iso)));
        let tmf = |subtype: u32, lun: [u8; 8]| {
            let mut r = vec![0u8; 24];
            r[4..8].copy_from_slice(&subtype.to_le_bytes());
            r[8..16].copy_from_slice(&lun);
            r
        };
        assert_eq!(control(&mut d, &tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, LUN0), 1), (vec![0], 1));
        assert_eq!(control(&mut d, &tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, LUN0), 1), (vec![0], 1));
        assert_eq!(control(&mut d, &tmf(2, LUN0), 1).0, [VIRTIO_SCSI_S_FUNCTION_REJECTED as u8], "CLEAR ACA");
        let other = [1, 3, 0x40, 0, 0, 0, 0, 0];
        assert_eq!(control(&mut d, &tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, other), 1).0, [VIRTIO_SCSI_S_BAD_TARGET as u8]);
        assert!(command(&mut d, &[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0], 0).good());
        assert_eq!(control(&mut d, &tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, LUN0), 1).0, [0]);
        assert_eq!(command(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0).sense(), (6, 0x29, 0), "reset");
        assert!(command(&mut d, &[op::START_STOP_UNIT, 0, 0, 0, 0x02, 0], 0).good(), "the reset unlocked");
        // Asynchronous notification: none.
        let mut an = vec![0u8; 16];
        an[0..4].copy_from_slice(&VIRTIO_SCSI_T_AN_QUERY.to_le_bytes());
        an[4..12].copy_from_slice(&LUN0);
        an[12..16].copy_from_slice(&0x10u32.to_le_bytes());
        assert_eq!(control(&mut d, &an, 5), (vec![0, 0, 0, 0, 0], 5));
        an[0] = VIRTIO_SCSI_T_AN_SUBSCRIBE as u8;
        assert_eq!(control(&mut d, &an, 5), (vec![0, 0, 0, 0, 0], 5));
        // An unknown type, and a short TMF.
        assert_eq!(control(&mut d, &[9, 0, 0, 0], 1).0, [VIRTIO_SCSI_S_FAILURE as u8]);
        assert_eq!(control(&mut d, &tmf(0, LUN0)[..10], 1).0, [VIRTIO_SCSI_S_FAILURE as u8]);
        // The event queue keeps its buffers.
        d.write_desc(EVENT_QUEUE, 0, Desc { addr: 0x3_0000, len: 16, flags: DESC_F_WRITE, next: 0 });
        d.publish(EVENT_QUEUE, 0, 1);
        assert_eq!(d.completions(EVENT_QUEUE, SHORT), []);
        assert_eq!(d.status() & 0x40, 0);
    }

    #[test]
    fn requests_that_cannot_be_served_fail_without_breaking_the_device() {
        let iso = Iso::new("fail", 4);
        let drive = cdrom(Some(&iso));
        let mut d = driver(drive.clone());
        let mut req = [0u8; 51];
        req[..8].copy_from_slice(&LUN0);
        req[19..29].copy_from_slice(&read10(0, 1));
        d.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        type Case = fn(&mut Driver);
        let cases: [(&str, Case); 4] = [
            ("short request header", |d| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { addr: REQ, len: 30, flags: DESC_F_NEXT, next: 1 });
                d.write_desc(REQUEST_QUEUE, 1, Desc { addr: RESP, len: 108, flags: DESC_F_WRITE, next: 0 });
            }),
            ("data-out and data-in", |d| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { addr: REQ, len: 51 + 10, flags: DESC_F_NEXT, next: 1 });
                d.write_desc(REQUEST_QUEUE, 1, Desc { addr: RESP, len: 108 + 2048, flags: DESC_F_WRITE, next: 0 });
            }),
            ("data outside guest memory", |d| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { addr: REQ, len: 51, flags: DESC_F_NEXT, next: 1 });
                d.write_desc(
                    REQUEST_QUEUE,
                    1,
                    Desc { addr: RESP, len: 108, flags: DESC_F_WRITE | DESC_F_NEXT, next: 2 },
                );
                d.write_desc(REQUEST_QUEUE, 2, Desc { addr: 0x40_0000_0000, len: 2048, flags: DESC_F_WRITE, next: 0 });
            }),
            ("request header outside guest memory", |d| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { addr: 0x40_0000_0000, len: 51, flags: DESC_F_NEXT, next: 1 });
                d.write_desc(REQUEST_QUEUE, 1, Desc { addr: RESP, len: 108, flags: DESC_F_WRITE, next: 0 });
            }),
        ];
        for (name, case) in cases {
            case(&mut d);
            d.publish(REQUEST_QUEUE, 0, 1);
            assert_eq!(d.completions(REQUEST_QUEUE, WAIT), [(0, 108)], "{name}");
            let a = answer(&d, 108, DATA, 0);
            assert_eq!(a.response, VIRTIO_SCSI_S_FAILURE as u8, "{name}");
            assert_eq!(d.status() & 0x40, 0, "{name}: the device still works");
        }
        assert!(command(&mut d, &read10(0, 1), 2048).good());
    }

    /// Malformed chains: the device says it needs a reset and serves nothing more until it gets one.
    #[test]
    fn malformed_chains_break_the_device_until_reset() {
        let iso = Iso::new("hostile", 4);
        let mut d = driver(cdrom(Some(&iso)));
        let req = Desc { addr: REQ, len: 51, flags: DESC_F_NEXT, next: 1 };
        let resp = Desc { addr: RESP, len: 108, flags: DESC_F_WRITE, next: 0 };
        type Case = fn(&mut Driver, Desc, Desc);
        let cases: [(&str, Case); 9] = [
            ("response too short", |d, q, r| {
                d.write_desc(REQUEST_QUEUE, 0, q);
                d.write_desc(REQUEST_QUEUE, 1, Desc { len: 100, ..r });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("no response", |d, q, _| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { flags: 0, ..q });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("response outside guest memory", |d, q, r| {
                d.write_desc(REQUEST_QUEUE, 0, q);
                d.write_desc(REQUEST_QUEUE, 1, Desc { addr: 0x40_0000_0000, ..r });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("readable after writable", |d, q, r| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { flags: DESC_F_WRITE | DESC_F_NEXT, ..r });
                d.write_desc(REQUEST_QUEUE, 1, Desc { flags: 0, ..q });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("loop", |d, q, r| {
                d.write_desc(REQUEST_QUEUE, 0, q);
                d.write_desc(REQUEST_QUEUE, 1, Desc { flags: DESC_F_WRITE | DESC_F_NEXT, next: 0, ..r });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("next beyond the queue", |d, q, _| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { next: 0xFFFF, ..q });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("bogus indirect table", |d, _, _| {
                d.write_desc(REQUEST_QUEUE, 0, Desc { addr: DATA, len: 0x1000_0000, flags: 4, next: 0 });
                d.publish(REQUEST_QUEUE, 0, 1);
            }),
            ("avail index jump", |d, q, r| {
                d.write_desc(REQUEST_QUEUE, 0, q);
                d.write_desc(REQUEST_QUEUE, 1, r);
                d.publish(REQUEST_QUEUE, 0, 1000);
            }),
            ("control request without a response", |d, _, _| {
                d.write_desc(CONTROL_QUEUE, 0, Desc { addr: CTRL_REQ, len: 24, flags: 0, next: 0 });
                d.publish(CONTROL_QUEUE, 0, 1);
            }),
        ];
        let mut header = [0u8; 51];
        header[..8].copy_from_slice(&LUN0);
        for (name, case) in cases {
            d.init();
            d.mem.write_slice(&header, GuestAddress(REQ)).unwrap();
            case(&mut d, req, resp);
            assert_eq!(d.completions(REQUEST_QUEUE, SHORT), [], "{name}: nothing completes");
            assert_eq!(d.completions(CONTROL_QUEUE, Duration::ZERO), [], "{name}: nothing completes");
            assert_eq!(d.status() & 0x40, 0x40, "{name}: NEEDS_RESET");
            assert_eq!(d.read_isr() & 2, 2, "{name}: a configuration interrupt");
            d.write_desc(REQUEST_QUEUE, 0, req);
            d.write_desc(REQUEST_QUEUE, 1, resp);
            d.publish(REQUEST_QUEUE, 0, 1);
            assert_eq!(d.completions(REQUEST_QUEUE, SHORT), [], "{name}: the device stays stopped");
            d.init();
            assert_eq!(d.status() & 0x40, 0, "{name}: reset clears NEEDS_RESET");
            assert!(command(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0).good(), "{name}: serves again");
        }
    }

    /// SeaBIOS sets up the request queue only.
    #[test]
    fn a_driver_may_leave_queues_disabled() {
        let iso = Iso::new("seabios", 4);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let scsi = VirtioScsi::new(cdrom(Some(&iso)), interrupt.clone()).unwrap();
        let mut d = HostDriver::new(scsi, interrupt, mem, &[0, 0, 16]);
        assert!(command(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0).good());
        assert_eq!(command(&mut d, &read10(2, 1), 2048).data, iso.bytes()[2 * 2048..3 * 2048]);
    }
}
