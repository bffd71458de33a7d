//! virtio-gpu in 2D mode (virtio 1.2 §5.7, device ID 16): the guest's driver (Linux's `virtio_gpu`, a
//! DRM/KMS driver) keeps its framebuffers in guest RAM, creates a host *resource* for each, attaches the
//! RAM pages to it as backing, and tells the device which rectangles to copy in (`TRANSFER_TO_HOST_2D`)
//! and which to show (`RESOURCE_FLUSH`) on the one scanout. Flushed rectangles of the scanout's resource
//! go into the console's [`Screen`] through the same damage path as the VGA refresher's (64-pixel tiles in
//! 16-row bands, only what changed), so no whole frame is copied per update; while a scanout is set the
//! refresher stands aside, and when the driver lets go (scanout disabled, device reset) the VGA picture
//! comes back, as on QEMU's virtio-vga.
//!
//! The monitor follows the console: `GET_DISPLAY_INFO` and the EDID ([`crate::display::edid`],
//! `VIRTIO_GPU_F_EDID`) give the preferred size [`GpuShared::request_size`] set, and a change raises
//! `VIRTIO_GPU_EVENT_DISPLAY` with a configuration interrupt, after which the guest asks again and
//! (GNOME, KDE, the framebuffer console) switches to it. The cursor queue's pointer image and position are
//! kept for the console ([`GpuShared::cursor`]).
//!
//! The guest is untrusted: host memory for resources is bounded ([`MAX_HOST_MEMORY`], [`MAX_RESOURCES`]),
//! backing lists are bounded ([`MAX_BACKING_ENTRIES`]) and checked against guest RAM, every rectangle and
//! offset is checked before a copy; a request the device cannot carry out gets the error response the
//! specification names for it; a chain that breaks the queue's rules (outside guest memory, a response
//! buffer too small, a readable buffer after a writable one, an avail index running ahead) sets
//! NEEDS_RESET of this device only.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt, avail_within_queue};
use crate::devices::bus::lock;
use crate::display::{CursorImage, Rect, Screen, TileDamage, edid};

/// virtio-gpu's device ID.
pub const DEVICE_TYPE: u16 = 16;
pub const QUEUE_SIZE: u16 = 256;
const CONTROLQ: usize = 0;
const CURSORQ: usize = 1;
const QUEUES: usize = 2;
/// The EDID feature (`VIRTIO_GPU_F_EDID`).
pub const F_EDID: u64 = 1 << 1;
/// `events_read` bit: the display configuration changed.
pub const EVENT_DISPLAY: u32 = 1;
/// Host memory all resources of a device may take (QEMU's default `max_hostmem`).
pub const MAX_HOST_MEMORY: u64 = 256 << 20;
/// Resources a device keeps at once.
pub const MAX_RESOURCES: usize = 4096;
/// Entries one `RESOURCE_ATTACH_BACKING` may list.
pub const MAX_BACKING_ENTRIES: u32 = 16384;
/// The largest resource side.
pub const MAX_DIMENSION: u32 = 16384;
/// Chains served per queue per wake-up of the thread.
const CHAINS_PER_ROUND: usize = 64;
/// The largest cursor image kept (Linux's cursors are 64×64).
pub const MAX_CURSOR: u32 = 256;

/// Command and response types (virtio 1.2 §5.7.6.7).
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_EDID: u32 = 0x010A;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// `VIRTIO_GPU_FLAG_FENCE`: the response must carry the request's fence id.
const FLAG_FENCE: u32 = 1;
/// The request header: type, flags, fence id, context id, ring index, padding.
const HEADER: usize = 24;
/// Scanouts `GET_DISPLAY_INFO` lists (`VIRTIO_GPU_MAX_SCANOUTS`); this device has one.
const MAX_SCANOUTS: usize = 16;
/// The longest request read: an attach-backing with the most entries.
const MAX_REQUEST: usize = HEADER + 8 + MAX_BACKING_ENTRIES as usize * 16;

/// Pixel formats (virtio 1.2 §5.7.6.8), named by their bytes in memory.
pub mod format {
    pub const B8G8R8A8: u32 = 1;
    pub const B8G8R8X8: u32 = 2;
    pub const A8R8G8B8: u32 = 3;
    pub const X8R8G8B8: u32 = 4;
    pub const R8G8B8A8: u32 = 67;
    pub const X8B8G8R8: u32 = 68;
    pub const A8B8G8R8: u32 = 121;
    pub const R8G8B8X8: u32 = 134;
}

/// Where red, green and blue sit in a pixel's four bytes, for each format.
fn channel_bytes(format: u32) -> Option<[usize; 3]> {
    match format {
        format::B8G8R8A8 | format::B8G8R8X8 => Some([2, 1, 0]),
        format::A8R8G8B8 | format::X8R8G8B8 => Some([1, 2, 3]),
        format::R8G8B8A8 | format::R8G8B8X8 => Some([0, 1, 2]),
        format::X8B8G8R8 | format::A8B8G8R8 => Some([3, 2, 1]),
        _ => None,
    }
}

/// A pixel of a resource as the screen's 0x00RRGGBB.
fn rgb(p: &[u8], [r, g, b]: [usize; 3]) -> u32 {
    u32::from(p[r]) << 16 | u32::from(p[g]) << 8 | u32::from(p[b])
}

/// The pointer as the guest's driver last set it (its shape also goes to the screen's viewers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// None: hidden, or never set.
    pub image: Option<Arc<CursorImage>>,
    pub x: u32,
    pub y: u32,
    /// Bumps when the image changes.
    pub version: u64,
}

/// Counters a test or the engine's statistics read.
#[derive(Debug, Default)]
pub struct GpuCounters {
    pub commands: AtomicU64,
    /// Requests answered with an error response.
    pub errors: AtomicU64,
    /// Malformed chains (each breaks the device until the driver resets it).
    pub malformed: AtomicU64,
    pub flushes: AtomicU64,
    /// Display change events raised.
    pub display_events: AtomicU64,
}

/// What outlives the boots of a VM: the console it draws on, the preferred size, the cursor.
#[derive(Debug)]
pub struct GpuShared {
    pub screen: Arc<Screen>,
    preferred: Mutex<(u32, u32)>,
    events: AtomicU32,
    /// The interrupt of the current boot's device, to announce display changes.
    interrupt: Mutex<Option<Arc<VirtioInterrupt>>>,
    driver: AtomicBool,
    cursor: Mutex<Cursor>,
    pub counters: GpuCounters,
}

impl GpuShared {
    /// A display drawing on `screen` whose monitor prefers `width × height` at first.
    pub fn new(screen: Arc<Screen>, width: u32, height: u32) -> Arc<Self> {
        Arc::new(GpuShared {
            screen,
            preferred: Mutex::new(edid::clamp_size(width, height)),
            events: AtomicU32::new(0),
            interrupt: Mutex::new(None),
            driver: AtomicBool::new(false),
            cursor: Mutex::new(Cursor::default()),
            counters: GpuCounters::default(),
        })
    }

    /// The monitor's preferred size.
    pub fn preferred_size(&self) -> (u32, u32) {
        *lock(&self.preferred)
    }

    /// Whether the guest's driver is up (it took the device and set `DRIVER_OK`).
    pub fn driver_ready(&self) -> bool {
        self.driver.load(Ordering::Acquire)
    }

    /// Makes `width × height` (clamped to what a monitor may prefer, [`edid::clamp_size`]) the preferred
    /// size and tells the guest's driver, which then asks for the new display information and EDID.
    /// Returns the size set.
    pub fn request_size(&self, width: u32, height: u32) -> (u32, u32) {
        let size = edid::clamp_size(width, height);
        let changed = std::mem::replace(&mut *lock(&self.preferred), size) != size;
        if changed {
            self.events.fetch_or(EVENT_DISPLAY, Ordering::AcqRel);
            self.counters.display_events.fetch_add(1, Ordering::Relaxed);
            if let Some(interrupt) = lock(&self.interrupt).as_ref() {
                interrupt.signal_config();
            }
        }
        size
    }

    /// The pointer as the guest set it.
    pub fn cursor(&self) -> Cursor {
        lock(&self.cursor).clone()
    }
}

/// A resource's backing: guest RAM ranges, in order, and where each starts in the concatenation.
#[derive(Debug, Default)]
struct Backing {
    ranges: Vec<(u64, u64)>,
    starts: Vec<u64>,
    len: u64,
}

impl Backing {
    /// Reads `out.len()` bytes at `offset` of the concatenated ranges; false if they run out.
    fn read(&self, mem: &GuestMemoryMmap, mut offset: u64, mut out: &mut [u8]) -> bool {
        let mut i = self.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        while !out.is_empty() {
            let (Some(&(gpa, len)), Some(&start)) = (self.ranges.get(i), self.starts.get(i)) else { return false };
            let within = offset.saturating_sub(start);
            if within >= len {
                i += 1;
                continue;
            }
            let n = (len - within).min(out.len() as u64) as usize;
            let (now, rest) = out.split_at_mut(n);
            if mem.read_slice(now, GuestAddress(gpa + within)).is_err() {
                return false;
            }
            out = rest;
            offset += n as u64;
            i += 1;
        }
        true
    }
}

/// A host resource: `width × height` pixels of 4 bytes in the guest's format.
#[derive(Debug)]
struct Resource {
    format: u32,
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    backing: Option<Backing>,
}

impl Resource {
    /// Whether `r` (untrusted) lies inside the resource and is not empty.
    fn holds(&self, r: &Rect) -> bool {
        !r.is_empty()
            && r.x.checked_add(r.w).is_some_and(|right| right <= self.width)
            && r.y.checked_add(r.h).is_some_and(|bottom| bottom <= self.height)
    }
}

/// What the one scanout shows: a rectangle of a resource.
#[derive(Debug, Clone, Copy)]
struct Scanout {
    resource: u32,
    rect: Rect,
}

/// The queues while the driver is up.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    edid: bool,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    quiesced: bool,
    resources: HashMap<u32, Resource>,
    host_bytes: u64,
    scanout: Option<Scanout>,
    /// The cursor's resource and hotspot.
    cursor_resource: u32,
    /// Request bytes (reused).
    request: Vec<u8>,
}

/// Why a chain was refused.
#[derive(Debug)]
enum Malformed {
    AvailJump,
    OutsideMemory,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// No room for the response.
    ResponseTooLong,
}

/// A request's header fields the response repeats.
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    kind: u32,
    flags: u32,
    fence: u64,
    ctx: u32,
    ring: u8,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(le32(b, at)?) | u64::from(le32(b, at + 4)?) << 32)
}

fn rect_at(b: &[u8], at: usize) -> Option<Rect> {
    Some(Rect::new(le32(b, at)?, le32(b, at + 4)?, le32(b, at + 8)?, le32(b, at + 12)?))
}

/// The response to a request: its header (type, the fence repeated) and payload.
fn response(h: &Header, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(HEADER + payload.len());
    r.extend_from_slice(&kind.to_le_bytes());
    r.extend_from_slice(&(h.flags & FLAG_FENCE).to_le_bytes());
    r.extend_from_slice(&if h.flags & FLAG_FENCE != 0 { h.fence } else { 0 }.to_le_bytes());
    r.extend_from_slice(&h.ctx.to_le_bytes());
    r.extend_from_slice(&[h.ring, 0, 0, 0]);
    r.extend_from_slice(payload);
    r
}

/// The device's side that its thread runs on.
struct Inner {
    shared: Arc<GpuShared>,
    interrupt: Arc<VirtioInterrupt>,
    state: Mutex<State>,
    kicks: [EventFd; QUEUES],
    wake: EventFd,
    shutdown: AtomicBool,
}

impl Inner {
    /// Serves up to [`CHAINS_PER_ROUND`] chains of each queue; true if some queue has more.
    fn serve(&self, state: &mut State) -> bool {
        if state.quiesced || state.active.is_none() {
            return false;
        }
        let mut more = false;
        for q in [CONTROLQ, CURSORQ] {
            match self.serve_queue(state, q) {
                Ok(m) => more |= m,
                Err(e) => {
                    self.malformed(state, e);
                    return false;
                }
            }
        }
        more
    }

    fn serve_queue(&self, state: &mut State, q: usize) -> Result<bool, Malformed> {
        let Some(mem) = state.active.as_ref().map(|a| a.mem.clone()) else { return Ok(false) };
        let mut used = false;
        let mut result = Ok(false);
        for _ in 0..CHAINS_PER_ROUND {
            let a = state.active.as_mut().ok_or(Malformed::OutsideMemory)?;
            let Some(queue) = a.queues.get_mut(q).filter(|q| q.ready()) else { return Ok(false) };
            if !avail_within_queue(queue, &mem) {
                result = Err(Malformed::AvailJump);
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(&mem) else { break };
            let head = chain.head_index();
            let (mut readable, mut writable) = (Vec::new(), Vec::new());
            for d in chain.into_iter().take(usize::from(QUEUE_SIZE)) {
                if !GuestMemoryBackend::check_range(&mem, d.addr(), d.len() as usize) {
                    return Err(Malformed::OutsideMemory);
                }
                if d.is_write_only() {
                    writable.push((d.addr(), d.len()));
                } else if writable.is_empty() {
                    readable.push((d.addr(), d.len()));
                } else {
                    return Err(Malformed::ReadableAfterWritable);
                }
            }
            let mut request = std::mem::take(&mut state.request);
            gather(&mem, &readable, &mut request)?;
            let reply = if q == CONTROLQ { self.control(state, &mem, &request) } else { self.cursor(state, &request) };
            state.request = request;
            let written = scatter(&mem, &writable, &reply)?;
            let a = state.active.as_mut().ok_or(Malformed::OutsideMemory)?;
            let queue = &mut a.queues[q];
            queue.add_used(&mem, head, written).map_err(|_| Malformed::OutsideMemory)?;
            used = true;
            result = Ok(queue.avail_idx(&mem, Ordering::Acquire).is_ok_and(|avail| avail.0 != queue.next_avail()));
        }
        if used
            && let Some(a) = state.active.as_mut()
            && a.queues[q].needs_notification(&a.mem).unwrap_or(true)
        {
            self.interrupt.signal_queue(q);
        }
        result
    }

    /// Carries out a control request; returns the response.
    fn control(&self, state: &mut State, mem: &GuestMemoryMmap, req: &[u8]) -> Vec<u8> {
        self.shared.counters.commands.fetch_add(1, Ordering::Relaxed);
        let Some(h) = header(req) else {
            self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
            return response(&Header::default(), cmd::ERR_UNSPEC, &[]);
        };
        let body = &req[HEADER..];
        let result = match h.kind {
            cmd::GET_DISPLAY_INFO => Ok(self.display_info(&h)),
            cmd::GET_EDID => self.get_edid(state, &h, body),
            cmd::RESOURCE_CREATE_2D => self.create_2d(state, body),
            cmd::RESOURCE_UNREF => self.unref(state, body),
            cmd::RESOURCE_ATTACH_BACKING => attach_backing(state, mem, body),
            cmd::RESOURCE_DETACH_BACKING => detach_backing(state, body),
            cmd::TRANSFER_TO_HOST_2D => transfer(state, mem, body),
            cmd::SET_SCANOUT => self.set_scanout(state, body),
            cmd::RESOURCE_FLUSH => self.flush(state, body),
            _ => Err(cmd::ERR_UNSPEC),
        };
        match result {
            Ok(r) if r.is_empty() => response(&h, cmd::OK_NODATA, &[]),
            Ok(r) => r,
            Err(kind) => {
                self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                log::debug!("virtio-gpu: request {:#x} refused with {kind:#x}", h.kind);
                response(&h, kind, &[])
            }
        }
    }

    fn display_info(&self, h: &Header) -> Vec<u8> {
        let (w, h_px) = self.shared.preferred_size();
        let mut modes = vec![0u8; MAX_SCANOUTS * 24];
        for (i, v) in [0, 0, w, h_px, 1, 0].into_iter().enumerate() {
            modes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        response(h, cmd::OK_DISPLAY_INFO, &modes)
    }

    fn get_edid(&self, state: &State, h: &Header, body: &[u8]) -> Result<Vec<u8>, u32> {
        if !state.active.as_ref().is_some_and(|a| a.edid) {
            return Err(cmd::ERR_UNSPEC);
        }
        if le32(body, 0).ok_or(cmd::ERR_UNSPEC)? != 0 {
            return Err(cmd::ERR_INVALID_SCANOUT_ID);
        }
        let (w, height) = self.shared.preferred_size();
        let block = edid::edid(w, height, 1);
        let mut payload = vec![0u8; 8 + 1024];
        payload[0..4].copy_from_slice(&(block.len() as u32).to_le_bytes());
        payload[8..8 + block.len()].copy_from_slice(&block);
        Ok(response(h, cmd::OK_EDID, &payload))
    }

    fn create_2d(&self, state: &mut State, body: &[u8]) -> Result<Vec<u8>, u32> {
        let field = |at| le32(body, at).ok_or(cmd::ERR_UNSPEC);
        let (id, fmt, width, height) = (field(0)?, field(4)?, field(8)?, field(12)?);
        if id == 0 || state.resources.contains_key(&id) {
            return Err(cmd::ERR_INVALID_RESOURCE_ID);
        }
        if channel_bytes(fmt).is_none() || width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION
        {
            return Err(cmd::ERR_INVALID_PARAMETER);
        }
        let bytes = u64::from(width) * u64::from(height) * 4;
        if state.resources.len() >= MAX_RESOURCES || state.host_bytes + bytes > MAX_HOST_MEMORY {
            return Err(cmd::ERR_OUT_OF_MEMORY);
        }
        // Zeroed pages from the kernel: a resource costs host memory only as the guest fills it.
        let pixels = vec![0u8; bytes as usize];
        state.host_bytes += bytes;
        state.resources.insert(id, Resource { format: fmt, width, height, pixels, backing: None });
        Ok(Vec::new())
    }

    fn unref(&self, state: &mut State, body: &[u8]) -> Result<Vec<u8>, u32> {
        let id = le32(body, 0).ok_or(cmd::ERR_UNSPEC)?;
        let r = state.resources.remove(&id).ok_or(cmd::ERR_INVALID_RESOURCE_ID)?;
        state.host_bytes -= r.pixels.len() as u64;
        if state.scanout.is_some_and(|s| s.resource == id) {
            self.release_scanout(state);
        }
        Ok(Vec::new())
    }

    fn set_scanout(&self, state: &mut State, body: &[u8]) -> Result<Vec<u8>, u32> {
        let rect = rect_at(body, 0).ok_or(cmd::ERR_UNSPEC)?;
        let (scanout, id) = (le32(body, 16).ok_or(cmd::ERR_UNSPEC)?, le32(body, 20).ok_or(cmd::ERR_UNSPEC)?);
        if scanout != 0 {
            return Err(cmd::ERR_INVALID_SCANOUT_ID);
        }
        if id == 0 {
            self.release_scanout(state);
            return Ok(Vec::new());
        }
        let resource = state.resources.get(&id).ok_or(cmd::ERR_INVALID_RESOURCE_ID)?;
        if !resource.holds(&rect) {
            return Err(cmd::ERR_INVALID_PARAMETER);
        }
        let screen = &self.shared.screen;
        screen.set_scanout_owner(true);
        screen.resize(rect.w, rect.h);
        state.scanout = Some(Scanout { resource: id, rect });
        self.show(state, id, rect);
        Ok(Vec::new())
    }

    fn flush(&self, state: &mut State, body: &[u8]) -> Result<Vec<u8>, u32> {
        let rect = rect_at(body, 0).ok_or(cmd::ERR_UNSPEC)?;
        let id = le32(body, 16).ok_or(cmd::ERR_UNSPEC)?;
        let resource = state.resources.get(&id).ok_or(cmd::ERR_INVALID_RESOURCE_ID)?;
        if !resource.holds(&rect) {
            return Err(cmd::ERR_INVALID_PARAMETER);
        }
        self.shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.show(state, id, rect);
        Ok(Vec::new())
    }

    /// Copies `rect` of resource `id` onto the screen if the scanout shows it; damages what changed.
    fn show(&self, state: &State, id: u32, rect: Rect) {
        let Some(scanout) = state.scanout.filter(|s| s.resource == id) else { return };
        let Some(resource) = state.resources.get(&id) else { return };
        let Some(visible) = rect.intersect(&scanout.rect) else { return };
        let Some(channels) = channel_bytes(resource.format) else { return };
        let screen = &self.shared.screen;
        let mut frame = screen.write();
        if (frame.width, frame.height) != (scanout.rect.w, scanout.rect.h) {
            return;
        }
        // A flush of most of the picture may be a scroll (terminals, web pages): found as the VGA
        // refresher finds it, it goes to viewers as a copy and only the rows it uncovered are compared in.
        if visible.w == scanout.rect.w && visible.h * 2 >= scanout.rect.h {
            let row_of = |y: u32, out: &mut Vec<u32>| {
                let start = ((scanout.rect.y + y) as usize * resource.width as usize + scanout.rect.x as usize) * 4;
                let Some(src) = resource.pixels.get(start..start + scanout.rect.w as usize * 4) else { return false };
                out.clear();
                out.extend(src.chunks_exact(4).map(|p| rgb(p, channels)));
                true
            };
            if let Some(dy) = frame.detect_scroll(row_of) {
                frame.shift_rows(dy);
                drop(frame);
                screen.scroll(dy);
                frame = screen.write();
                if (frame.width, frame.height) != (scanout.rect.w, scanout.rect.h) {
                    return;
                }
            }
        }
        let mut damage = TileDamage::new(frame.width);
        let mut rects = Vec::new();
        let band_of = |y: u32| (y - scanout.rect.y) / crate::display::BAND_HEIGHT;
        let mut band = band_of(visible.y);
        for y in visible.y..visible.bottom() {
            if band_of(y) != band {
                damage.take_band(band, frame.height, &mut rects);
                band = band_of(y);
            }
            let start = (y as usize * resource.width as usize + visible.x as usize) * 4;
            let src = &resource.pixels[start..start + visible.w as usize * 4];
            let row = (y - scanout.rect.y) as usize * frame.width as usize;
            let left = (visible.x - scanout.rect.x) as usize;
            let dst = &mut frame.pixels[row + left..row + left + visible.w as usize];
            for (x, (out, p)) in dst.iter_mut().zip(src.chunks_exact(4)).enumerate() {
                let value = rgb(p, channels);
                if *out != value {
                    *out = value;
                    damage.mark(left + x);
                }
            }
        }
        damage.take_band(band, frame.height, &mut rects);
        drop(frame);
        screen.damage(&rects);
    }

    /// The scanout shows nothing: the VGA picture comes back.
    fn release_scanout(&self, state: &mut State) {
        if state.scanout.take().is_some() {
            self.shared.screen.set_scanout_owner(false);
        }
    }

    /// A cursor queue request: the pointer's image and place (no response but the buffer back).
    fn cursor(&self, state: &mut State, req: &[u8]) -> Vec<u8> {
        let Some(h) = header(req) else { return Vec::new() };
        let body = &req[HEADER..];
        let (Some(x), Some(y), Some(id), Some(hot_x), Some(hot_y)) =
            (le32(body, 4), le32(body, 8), le32(body, 16), le32(body, 20), le32(body, 24))
        else {
            return Vec::new();
        };
        let mut cursor = lock(&self.shared.cursor);
        cursor.x = x;
        cursor.y = y;
        if h.kind != cmd::UPDATE_CURSOR {
            return Vec::new();
        }
        state.cursor_resource = id;
        let image = state.resources.get(&id).filter(|r| r.width <= MAX_CURSOR && r.height <= MAX_CURSOR).map(|r| {
            let channels = channel_bytes(r.format).unwrap_or([2, 1, 0]);
            let opaque = matches!(r.format, format::B8G8R8X8 | format::X8R8G8B8 | format::R8G8B8X8 | format::X8B8G8R8);
            let alpha_at = 6 - channels.iter().sum::<usize>();
            let pixels = r
                .pixels
                .chunks_exact(4)
                .map(|p| if opaque { 0xFF00_0000 } else { u32::from(p[alpha_at]) << 24 } | rgb(p, channels))
                .collect();
            Arc::new(CursorImage { width: r.width, height: r.height, hot_x, hot_y, pixels })
        });
        if cursor.image != image {
            // A hidden pointer (resource 0, or one the device cannot show) hides the viewers' too.
            let shown = image.clone().unwrap_or_else(|| Arc::new(CursorImage::hidden()));
            self.shared.screen.set_cursor(Some(shown));
            cursor.image = image;
            cursor.version += 1;
        }
        Vec::new()
    }

    /// Counts a driver error and breaks the device until the driver resets it.
    fn malformed(&self, state: &mut State, what: Malformed) {
        let first = self.shared.counters.malformed.fetch_add(1, Ordering::Relaxed) == 0;
        let level = if first { log::Level::Warn } else { log::Level::Debug };
        log::log!(
            level,
            "virtio-gpu: malformed descriptor chain ({what:?}); the device needs a reset (guest driver error)"
        );
        state.active = None;
        self.interrupt.mark_needs_reset();
    }

    /// Forgets every resource and the scanout (a device reset, or the device going away).
    fn forget_everything(&self, state: &mut State) {
        self.release_scanout(state);
        state.resources.clear();
        state.host_bytes = 0;
        state.cursor_resource = 0;
        let mut cursor = lock(&self.shared.cursor);
        let version = cursor.version + 1;
        *cursor = Cursor { version, ..Cursor::default() };
        self.shared.screen.set_cursor(None);
    }

    fn thread(&self) {
        const WAKE: u64 = QUEUES as u64;
        let Ok(epoll) = Epoll::new() else {
            log::error!("virtio-gpu: cannot create its thread's epoll; the display stays idle");
            return;
        };
        for (token, fd) in self.kicks.iter().chain([&self.wake]).enumerate() {
            let event = EpollEvent::new(EventSet::IN, token as u64);
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), event) {
                log::error!("virtio-gpu: cannot watch a descriptor ({e}); the display stays idle");
                return;
            }
        }
        let mut events = [EpollEvent::default(); QUEUES + 1];
        while !self.shutdown.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-gpu: its thread cannot wait ({e}); the display stays idle");
                    return;
                }
            };
            for e in &events[..n] {
                let fd = if e.data() == WAKE { &self.wake } else { &self.kicks[e.data() as usize % QUEUES] };
                let _ = fd.read();
            }
            let mut state = lock(&self.state);
            if self.serve(&mut state) {
                let _ = self.wake.write(1);
            }
        }
    }
}

fn header(req: &[u8]) -> Option<Header> {
    Some(Header {
        kind: le32(req, 0)?,
        flags: le32(req, 4)?,
        fence: le64(req, 8)?,
        ctx: le32(req, 16)?,
        ring: *req.get(20)?,
    })
    .filter(|_| req.len() >= HEADER)
}

/// Reads the device-readable buffers of a chain (at most [`MAX_REQUEST`] bytes) into `out`.
fn gather(mem: &GuestMemoryMmap, parts: &[(GuestAddress, u32)], out: &mut Vec<u8>) -> Result<(), Malformed> {
    out.clear();
    for &(addr, len) in parts {
        let n = (len as usize).min(MAX_REQUEST - out.len());
        let at = out.len();
        out.resize(at + n, 0);
        mem.read_slice(&mut out[at..], addr).map_err(|_| Malformed::OutsideMemory)?;
        if out.len() == MAX_REQUEST {
            break;
        }
    }
    Ok(())
}

/// Writes `reply` into the device-writable buffers of a chain; returns its length.
fn scatter(mem: &GuestMemoryMmap, parts: &[(GuestAddress, u32)], reply: &[u8]) -> Result<u32, Malformed> {
    let mut rest = reply;
    for &(addr, len) in parts {
        if rest.is_empty() {
            break;
        }
        let n = (len as usize).min(rest.len());
        mem.write_slice(&rest[..n], addr).map_err(|_| Malformed::OutsideMemory)?;
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        return Err(Malformed::ResponseTooLong);
    }
    Ok(reply.len() as u32)
}

/// `RESOURCE_ATTACH_BACKING`: resource id, entry count, then (address, length, padding) entries.
fn attach_backing(state: &mut State, mem: &GuestMemoryMmap, body: &[u8]) -> Result<Vec<u8>, u32> {
    let (id, count) = (le32(body, 0).ok_or(cmd::ERR_UNSPEC)?, le32(body, 4).ok_or(cmd::ERR_UNSPEC)?);
    let resource = state.resources.get_mut(&id).ok_or(cmd::ERR_INVALID_RESOURCE_ID)?;
    if resource.backing.is_some() || count == 0 || count > MAX_BACKING_ENTRIES {
        return Err(cmd::ERR_UNSPEC);
    }
    let mut backing = Backing::default();
    for i in 0..count as usize {
        let (addr, len) =
            (le64(body, 8 + i * 16).ok_or(cmd::ERR_UNSPEC)?, le32(body, 16 + i * 16).ok_or(cmd::ERR_UNSPEC)?);
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(cmd::ERR_UNSPEC);
        }
        backing.ranges.push((addr, u64::from(len)));
        backing.starts.push(backing.len);
        backing.len += u64::from(len);
    }
    resource.backing = Some(backing);
    Ok(Vec::new())
}

fn detach_backing(state: &mut State, body: &[u8]) -> Result<Vec<u8>, u32> {
    let id = le32(body, 0).ok_or(cmd::ERR_UNSPEC)?;
    let resource = state.resources.get_mut(&id).ok_or(cmd::ERR_INVALID_RESOURCE_ID)?;
    resource.backing.take().map(|_| Vec::new()).ok_or(cmd::ERR_UNSPEC)
}

/// `TRANSFER_TO_HOST_2D`: rectangle, offset of its first pixel in the backing, resource id. Row `i` of
/// the rectangle is read at `offset + i × stride` (stride: the resource's width in bytes).
fn transfer(state: &mut State, mem: &GuestMemoryMmap, body: &[u8]) -> Result<Vec<u8>, u32> {
    let rect = rect_at(body, 0).ok_or(cmd::ERR_UNSPEC)?;
    let offset = le64(body, 16).ok_or(cmd::ERR_UNSPEC)?;
    let id = le32(body, 24).ok_or(cmd::ERR_UNSPEC)?;
    let resource = state.resources.get_mut(&id).ok_or(cmd::ERR_INVALID_RESOURCE_ID)?;
    if !resource.holds(&rect) {
        return Err(cmd::ERR_INVALID_PARAMETER);
    }
    let Some(backing) = resource.backing.as_ref() else { return Err(cmd::ERR_UNSPEC) };
    let stride = u64::from(resource.width) * 4;
    let row_bytes = u64::from(rect.w) * 4;
    let last = offset
        .checked_add(u64::from(rect.h - 1) * stride)
        .and_then(|o| o.checked_add(row_bytes))
        .ok_or(cmd::ERR_INVALID_PARAMETER)?;
    if last > backing.len {
        return Err(cmd::ERR_INVALID_PARAMETER);
    }
    let full_rows = rect.x == 0 && rect.w == resource.width;
    let rows = if full_rows { 1 } else { rect.h };
    let len = if full_rows { row_bytes * u64::from(rect.h) } else { row_bytes } as usize;
    for i in 0..rows {
        let at = ((rect.y + i) as usize * resource.width as usize + rect.x as usize) * 4;
        let out = &mut resource.pixels[at..at + len];
        if !backing.read(mem, offset + u64::from(i) * stride, out) {
            return Err(cmd::ERR_UNSPEC);
        }
    }
    Ok(Vec::new())
}

/// virtio-gpu on the PCI transport (one per boot).
pub struct VirtioGpu {
    inner: Arc<Inner>,
    max_sizes: [u16; QUEUES],
    thread: Option<JoinHandle<()>>,
}

impl VirtioGpu {
    /// A display on `shared` raising `interrupt`; starts its (idle) thread, which inherits the caller's
    /// seccomp filter.
    pub fn new(shared: Arc<GpuShared>, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        *lock(&shared.interrupt) = Some(interrupt.clone());
        let inner = Arc::new(Inner {
            shared,
            interrupt,
            state: Mutex::new(State::default()),
            kicks: [EventFd::new(libc::EFD_NONBLOCK)?, EventFd::new(libc::EFD_NONBLOCK)?],
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            shutdown: AtomicBool::new(false),
        });
        let i = inner.clone();
        let thread = std::thread::Builder::new().name("virtio-gpu".into()).spawn(move || i.thread())?;
        Ok(VirtioGpu { inner, max_sizes: [QUEUE_SIZE; QUEUES], thread: Some(thread) })
    }

    pub fn shared(&self) -> &Arc<GpuShared> {
        &self.inner.shared
    }
}

impl VirtioDevice for VirtioGpu {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        F_EDID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn queue_event(&self, index: usize) -> &EventFd {
        &self.inner.kicks[index.min(QUEUES - 1)]
    }

    /// events_read, events_clear (reads 0), num_scanouts (1), num_capsets (0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&self.inner.shared.events.load(Ordering::Acquire).to_le_bytes());
        config[8..12].copy_from_slice(&1u32.to_le_bytes());
        let start = offset as usize;
        match config.get(start..start.saturating_add(data.len())) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }

    /// A write to events_clear clears those bits of events_read.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            let clear = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.inner.shared.events.fetch_and(!clear, Ordering::AcqRel);
        }
    }

    fn activate(&mut self, activation: Activation) {
        if activation.queues.len() != QUEUES {
            return;
        }
        let mut state = lock(&self.inner.state);
        state.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            edid: activation.driver_features & F_EDID != 0,
        });
        state.quiesced = false;
        drop(state);
        self.inner.shared.driver.store(true, Ordering::Release);
        let _ = self.inner.wake.write(1);
    }

    fn reset(&mut self) {
        let mut state = lock(&self.inner.state);
        state.active = None;
        state.quiesced = false;
        self.inner.forget_everything(&mut state);
        drop(state);
        self.inner.shared.driver.store(false, Ordering::Release);
    }

    /// Requests are served holding the state lock, so taking it waits for one in progress.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::QueueState>, String> {
        let mut state = lock(&self.inner.state);
        state.quiesced = true;
        let Some(a) = state.active.as_ref() else { return Ok(Vec::new()) };
        Ok(a.queues.iter().map(|q| q.state()).collect())
    }

    fn resume_requests(&mut self) {
        lock(&self.inner.state).quiesced = false;
        let _ = self.inner.wake.write(1);
    }

    /// The preferred size and pending events, every resource (format, size, pixels, backing), the
    /// scanout and the cursor.
    fn save_device(&self, w: &mut crate::snapshot::Writer) {
        let state = lock(&self.inner.state);
        let shared = &self.inner.shared;
        let (pw, ph) = shared.preferred_size();
        w.u32(pw);
        w.u32(ph);
        w.u32(shared.events.load(Ordering::Acquire));
        w.bool(state.active.as_ref().is_some_and(|a| a.edid));
        let mut ids: Vec<_> = state.resources.keys().copied().collect();
        ids.sort_unstable();
        w.u32(ids.len() as u32);
        for id in ids {
            let r = &state.resources[&id];
            w.u32(id);
            w.u32(r.format);
            w.u32(r.width);
            w.u32(r.height);
            w.bytes(&r.pixels);
            let ranges = r.backing.as_ref().map_or(&[][..], |b| &b.ranges[..]);
            w.bool(r.backing.is_some());
            w.u32(ranges.len() as u32);
            for &(addr, len) in ranges {
                w.u64(addr);
                w.u64(len);
            }
        }
        let scanout = state.scanout;
        w.bool(scanout.is_some());
        let s = scanout.map_or(Scanout { resource: 0, rect: Rect::new(0, 0, 0, 0) }, |s| s);
        for v in [s.resource, s.rect.x, s.rect.y, s.rect.w, s.rect.h] {
            w.u32(v);
        }
        let cursor = shared.cursor();
        w.u32(state.cursor_resource);
        w.u32(cursor.x);
        w.u32(cursor.y);
        let (hx, hy) = cursor.image.as_ref().map_or((0, 0), |i| (i.hot_x, i.hot_y));
        w.u32(hx);
        w.u32(hy);
    }

    fn restore_device(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        use crate::snapshot::StateError::Damaged;
        let (pw, ph, events, edid_on) = (r.u32()?, r.u32()?, r.u32()?, r.bool()?);
        let count = r.u32()? as usize;
        if count > MAX_RESOURCES {
            return Err(Damaged(format!("a display with {count} resources")));
        }
        let mut resources = HashMap::new();
        let mut host_bytes = 0u64;
        for _ in 0..count {
            let (id, fmt, width, height) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            let bytes = u64::from(width) * u64::from(height) * 4;
            host_bytes += bytes;
            if id == 0 || channel_bytes(fmt).is_none() || width > MAX_DIMENSION || height > MAX_DIMENSION {
                return Err(Damaged(format!("a display resource {id} of format {fmt}, {width}×{height}")));
            }
            if host_bytes > MAX_HOST_MEMORY {
                return Err(Damaged("display resources over the device's memory bound".into()));
            }
            let pixels = r.bytes(bytes as usize)?.to_vec();
            if pixels.len() as u64 != bytes {
                return Err(Damaged(format!("display resource {id}: {} bytes of pixels", pixels.len())));
            }
            let (has_backing, ranges) = (r.bool()?, r.u32()?);
            if ranges > MAX_BACKING_ENTRIES {
                return Err(Damaged(format!("display resource {id} with {ranges} backing ranges")));
            }
            let mut backing = Backing::default();
            for _ in 0..ranges {
                let (addr, len) = (r.u64()?, r.u64()?);
                backing.ranges.push((addr, len));
                backing.starts.push(backing.len);
                backing.len = backing.len.saturating_add(len);
            }
            let backing = has_backing.then_some(backing);
            resources.insert(id, Resource { format: fmt, width, height, pixels, backing });
        }
        let has_scanout = r.bool()?;
        let (sid, x, y, sw, sh) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let (cursor_resource, cx, cy, hx, hy) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let scanout = has_scanout.then(|| Scanout { resource: sid, rect: Rect::new(x, y, sw, sh) });
        if let Some(s) = scanout
            && !resources.get(&s.resource).is_some_and(|res| res.holds(&s.rect))
        {
            return Err(Damaged(format!("a display scanout of resource {sid} at {x},{y} {sw}×{sh}")));
        }
        let inner = &self.inner;
        *lock(&inner.shared.preferred) = edid::clamp_size(pw, ph);
        inner.shared.events.store(events, Ordering::Release);
        let mut state = lock(&inner.state);
        inner.forget_everything(&mut state);
        if let Some(a) = state.active.as_mut() {
            a.edid = edid_on;
        }
        state.resources = resources;
        state.host_bytes = host_bytes;
        if let Some(s) = scanout {
            inner.shared.screen.set_scanout_owner(true);
            inner.shared.screen.resize(s.rect.w, s.rect.h);
            state.scanout = Some(s);
            inner.show(&state, s.resource, s.rect);
        }
        // The cursor as the guest set it: its image from the restored resource.
        let mut cursor_req = vec![0u8; HEADER + 32];
        cursor_req[0..4].copy_from_slice(&cmd::UPDATE_CURSOR.to_le_bytes());
        for (at, v) in [(4, cx), (8, cy), (16, cursor_resource), (20, hx), (24, hy)] {
            cursor_req[HEADER + at..HEADER + at + 4].copy_from_slice(&v.to_le_bytes());
        }
        inner.cursor(&mut state, &cursor_req);
        drop(state);
        let _ = inner.wake.write(1);
        Ok(())
    }
}

impl Drop for VirtioGpu {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.inner.state);
            state.active = None;
            self.inner.forget_everything(&mut state);
        }
        {
            let mut current = lock(&self.inner.shared.interrupt);
            if current.as_ref().is_some_and(|i| Arc::ptr_eq(i, &self.inner.interrupt)) {
                *current = None;
            }
        }
        self.inner.shared.driver.store(false, Ordering::Release);
        self.inner.shutdown.store(true, Ordering::Release);
        let _ = self.inner.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::VIRTIO_CONFIG_S_NEEDS_RESET;
    use crate::virtio::host_driver::{DESC_F_NEXT, DESC_F_WRITE, Desc, HostDriver};

    const RAM: usize = 16 << 20;
    const REQUEST: u64 = 0x2_0000;
    const RESPONSE: u64 = 0x6_0000;
    /// Backing pages of resources from here.
    const PAGES: u64 = 0x10_0000;
    const WAIT: Duration = Duration::from_secs(10);

    fn gpu() -> (HostDriver<VirtioGpu>, Arc<GpuShared>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let shared = GpuShared::new(Screen::new(), 1280, 800);
        let device = VirtioGpu::new(shared.clone(), interrupt.clone()).unwrap();
        (HostDriver::new(device, interrupt, mem, &[QUEUE_SIZE, QUEUE_SIZE]), shared)
    }

    /// A request of `kind` with 32-bit fields after the header.
    fn req(kind: u32, fields: &[u32]) -> Vec<u8> {
        let mut r = vec![0u8; HEADER];
        r[0..4].copy_from_slice(&kind.to_le_bytes());
        r.extend(fields.iter().flat_map(|f| f.to_le_bytes()));
        r
    }

    /// Sends `request` on `queue` with `room` bytes for the response; returns the response.
    fn send(d: &mut HostDriver<VirtioGpu>, queue: usize, request: &[u8], room: u32) -> Vec<u8> {
        d.mem.write_slice(request, GuestAddress(REQUEST)).unwrap();
        let next = if room > 0 { DESC_F_NEXT } else { 0 };
        d.write_desc(queue, 0, Desc { addr: REQUEST, len: request.len() as u32, flags: next, next: 1 });
        d.write_desc(queue, 1, Desc { addr: RESPONSE, len: room, flags: DESC_F_WRITE, next: 0 });
        d.publish(queue, 0, 1);
        let done = d.completions(queue, WAIT);
        assert_eq!(done.len(), 1, "one completion");
        let mut out = vec![0u8; done[0].1 as usize];
        d.mem.read_slice(&mut out, GuestAddress(RESPONSE)).unwrap();
        out
    }

    /// A control request's response type.
    fn control(d: &mut HostDriver<VirtioGpu>, kind: u32, fields: &[u32]) -> u32 {
        let r = send(d, CONTROLQ, &req(kind, fields), 64);
        le32(&r, 0).unwrap()
    }

    /// Creates resource `id` (`w × h`, `fmt`) backed by guest pages at `at`, in two ranges split at
    /// `split` bytes (so rows cross from one range to the other).
    fn resource(d: &mut HostDriver<VirtioGpu>, id: u32, fmt: u32, (w, h): (u32, u32), at: u64, split: u32) {
        assert_eq!(control(d, cmd::RESOURCE_CREATE_2D, &[id, fmt, w, h]), cmd::OK_NODATA);
        let total = w * h * 4;
        // The second range sits 64 KiB further on: the backing is not one block of guest memory.
        let second = at + u64::from(split) + 0x1_0000;
        let entries = [at as u32, (at >> 32) as u32, split, 0, second as u32, 0, total - split, 0];
        let mut fields = vec![id, 2];
        fields.extend(entries);
        assert_eq!(control(d, cmd::RESOURCE_ATTACH_BACKING, &fields), cmd::OK_NODATA);
    }

    /// Writes pixel (x, y) of a resource `w` wide backed as [`resource`] placed it.
    fn put_pixel(d: &HostDriver<VirtioGpu>, at: u64, split: u32, w: u32, (x, y): (u32, u32), bytes: [u8; 4]) {
        let offset = (y * w + x) * 4;
        let gpa = if offset < split { at + u64::from(offset) } else { at + 0x1_0000 + u64::from(offset) };
        d.mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
    }

    fn pixel(shared: &GpuShared, x: u32, y: u32) -> u32 {
        let frame = shared.screen.read();
        frame.pixels[(y * frame.width + x) as usize]
    }

    #[test]
    fn the_monitor_prefers_the_console_size_and_a_new_size_reaches_the_driver() {
        let (mut d, shared) = gpu();
        let mut config = [0u8; 16];
        d.read_config(0, &mut config);
        assert_eq!((le32(&config, 0), le32(&config, 8), le32(&config, 12)), (Some(0), Some(1), Some(0)));
        let info = send(&mut d, CONTROLQ, &req(cmd::GET_DISPLAY_INFO, &[]), 408);
        assert_eq!(info.len(), 408);
        assert_eq!(le32(&info, 0), Some(cmd::OK_DISPLAY_INFO));
        let mode: Vec<u32> = (0..6).map(|i| le32(&info, HEADER + i * 4).unwrap()).collect();
        assert_eq!(mode, [0, 0, 1280, 800, 1, 0]);
        assert!(info[HEADER + 24..].iter().all(|&b| b == 0), "one scanout");
        let e = send(&mut d, CONTROLQ, &req(cmd::GET_EDID, &[0, 0]), 1056);
        assert_eq!((le32(&e, 0), le32(&e, HEADER)), (Some(cmd::OK_EDID), Some(128)));
        let block: [u8; 128] = e[HEADER + 8..HEADER + 136].try_into().unwrap();
        assert_eq!(edid::preferred_size(&block), (1280, 800));
        assert_eq!(control(&mut d, cmd::GET_EDID, &[1, 0]), cmd::ERR_INVALID_SCANOUT_ID);

        assert_eq!(d.read_isr() & 2, 0);
        assert_eq!(shared.request_size(1024, 768), (1024, 768));
        assert_eq!(d.read_isr() & 2, 2, "a configuration interrupt");
        d.read_config(0, &mut config);
        assert_eq!(le32(&config, 0), Some(EVENT_DISPLAY));
        let info = send(&mut d, CONTROLQ, &req(cmd::GET_DISPLAY_INFO, &[]), 408);
        assert_eq!((le32(&info, HEADER + 8), le32(&info, HEADER + 12)), (Some(1024), Some(768)));
        let e = send(&mut d, CONTROLQ, &req(cmd::GET_EDID, &[0, 0]), 1056);
        assert_eq!(edid::preferred_size(&e[HEADER + 8..HEADER + 136].try_into().unwrap()), (1024, 768));
        d.write_config(4, &EVENT_DISPLAY.to_le_bytes());
        d.read_config(0, &mut config);
        assert_eq!(le32(&config, 0), Some(0), "events_clear");
        // The same size again is no event; an absurd one is clamped.
        shared.request_size(1024, 768);
        assert_eq!(d.read_isr() & 2, 0);
        assert_eq!(shared.request_size(100_000, 1), edid::clamp_size(100_000, 1));
        assert_eq!(shared.counters.display_events.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn flushed_rectangles_reach_the_screen_and_only_changed_tiles_are_damaged() {
        let (mut d, shared) = gpu();
        let (w, h) = (256u32, 64u32);
        // Split mid-row 10, so rows cross from one range to the other.
        let split = (10 * w + 100) * 4;
        for y in 0..h {
            for x in 0..w {
                put_pixel(&d, PAGES, split, w, (x, y), [x as u8, y as u8, 0x80, 0xFF]);
            }
        }
        resource(&mut d, 7, format::B8G8R8X8, (w, h), PAGES, split);
        assert_eq!(control(&mut d, cmd::TRANSFER_TO_HOST_2D, &[0, 0, w, h, 0, 0, 7, 0]), cmd::OK_NODATA);
        let viewer = shared.screen.subscribe();
        lock(&viewer.damage).take();
        assert_eq!(control(&mut d, cmd::SET_SCANOUT, &[0, 0, w, h, 0, 7]), cmd::OK_NODATA);
        assert!(shared.screen.scanout_owned());
        {
            let frame = shared.screen.read();
            assert_eq!((frame.width, frame.height), (w, h));
        }
        assert!(lock(&viewer.damage).take().resized);
        // B8G8R8X8: bytes B, G, R, X.
        assert_eq!(pixel(&shared, 3, 5), 0x80_05_03);
        assert_eq!(pixel(&shared, 101, 10), 0x80_0A_65, "a pixel from the second range");

        // One pixel changes; the driver transfers a sub-rectangle and flushes a larger one.
        put_pixel(&d, PAGES, split, w, (200, 40), [1, 2, 3, 0]);
        let offset = (32 * w + 192) * 4;
        assert_eq!(control(&mut d, cmd::TRANSFER_TO_HOST_2D, &[192, 32, 64, 16, offset, 0, 7, 0]), cmd::OK_NODATA);
        assert_eq!(control(&mut d, cmd::RESOURCE_FLUSH, &[0, 0, w, h, 7, 0]), cmd::OK_NODATA);
        assert_eq!(pixel(&shared, 200, 40), 0x03_02_01);
        assert_eq!(lock(&viewer.damage).take().rects, [Rect::new(192, 32, 64, 16)]);
        // A flush of nothing new damages nothing.
        assert_eq!(control(&mut d, cmd::RESOURCE_FLUSH, &[0, 0, w, h, 7, 0]), cmd::OK_NODATA);
        assert!(lock(&viewer.damage).take().rects.is_empty());
        assert_eq!(shared.counters.flushes.load(Ordering::Relaxed), 2);

        // A scanout of part of a resource: the screen is that part; flushes elsewhere do not show.
        assert_eq!(control(&mut d, cmd::SET_SCANOUT, &[64, 16, 128, 32, 0, 7]), cmd::OK_NODATA);
        assert_eq!(shared.screen.read().width, 128);
        assert_eq!(pixel(&shared, 0, 0), 0x80_10_40);
        // Another format: R8G8B8X8.
        resource(&mut d, 8, format::R8G8B8X8, (16, 16), 0x40_0000, 512);
        put_pixel(&d, 0x40_0000, 512, 16, (15, 15), [0x11, 0x22, 0x33, 0]);
        assert_eq!(control(&mut d, cmd::TRANSFER_TO_HOST_2D, &[0, 0, 16, 16, 0, 0, 8, 0]), cmd::OK_NODATA);
        assert_eq!(control(&mut d, cmd::SET_SCANOUT, &[0, 0, 16, 16, 0, 8]), cmd::OK_NODATA);
        assert_eq!(pixel(&shared, 15, 15), 0x11_22_33);
    }

    #[test]
    fn the_picture_goes_back_to_vga_when_the_scanout_is_disabled_the_resource_freed_or_the_device_reset() {
        let (mut d, shared) = gpu();
        resource(&mut d, 1, format::B8G8R8X8, (64, 64), PAGES, 4096);
        let on = |d: &mut HostDriver<VirtioGpu>| control(d, cmd::SET_SCANOUT, &[0, 0, 64, 64, 0, 1]);
        assert_eq!(on(&mut d), cmd::OK_NODATA);
        assert_eq!(control(&mut d, cmd::SET_SCANOUT, &[0, 0, 0, 0, 0, 0]), cmd::OK_NODATA);
        assert!(!shared.screen.scanout_owned());
        assert_eq!(on(&mut d), cmd::OK_NODATA);
        assert_eq!(control(&mut d, cmd::RESOURCE_UNREF, &[1, 0]), cmd::OK_NODATA);
        assert!(!shared.screen.scanout_owned());
        resource(&mut d, 1, format::B8G8R8X8, (64, 64), PAGES, 4096);
        assert_eq!(on(&mut d), cmd::OK_NODATA);
        assert!(shared.driver_ready());
        d.init();
        assert!(!shared.screen.scanout_owned());
        assert_eq!(control(&mut d, cmd::SET_SCANOUT, &[0, 0, 64, 64, 0, 1]), cmd::ERR_INVALID_RESOURCE_ID, "forgotten");
    }

    /// Requests the device cannot carry out get the error the specification names; the device goes on.
    #[test]
    fn hostile_requests_get_error_responses_and_the_device_goes_on() {
        use cmd::*;
        let (mut d, shared) = gpu();
        resource(&mut d, 1, format::B8G8R8X8, (64, 64), PAGES, 4096);
        let big = MAX_DIMENSION;
        let cases: Vec<(u32, Vec<u32>, u32)> = vec![
            (0x0999, vec![], ERR_UNSPEC),
            (RESOURCE_CREATE_2D, vec![0, format::B8G8R8X8, 8, 8], ERR_INVALID_RESOURCE_ID),
            (RESOURCE_CREATE_2D, vec![1, format::B8G8R8X8, 8, 8], ERR_INVALID_RESOURCE_ID),
            (RESOURCE_CREATE_2D, vec![2, 999, 8, 8], ERR_INVALID_PARAMETER),
            (RESOURCE_CREATE_2D, vec![2, format::B8G8R8X8, 0, 8], ERR_INVALID_PARAMETER),
            (RESOURCE_CREATE_2D, vec![2, format::B8G8R8X8, big + 1, 8], ERR_INVALID_PARAMETER),
            // 16384 × 16384 × 4 = 1 GiB: over the device's bound.
            (RESOURCE_CREATE_2D, vec![2, format::B8G8R8X8, big, big], ERR_OUT_OF_MEMORY),
            (RESOURCE_CREATE_2D, vec![2, format::B8G8R8X8], ERR_UNSPEC),
            (RESOURCE_UNREF, vec![9, 0], ERR_INVALID_RESOURCE_ID),
            (RESOURCE_ATTACH_BACKING, vec![1, 1, PAGES as u32, 0, 4096, 0], ERR_UNSPEC),
            (RESOURCE_DETACH_BACKING, vec![9, 0], ERR_INVALID_RESOURCE_ID),
            (SET_SCANOUT, vec![0, 0, 64, 64, 1, 1], ERR_INVALID_SCANOUT_ID),
            (SET_SCANOUT, vec![0, 0, 65, 64, 0, 1], ERR_INVALID_PARAMETER),
            (SET_SCANOUT, vec![u32::MAX, 0, 2, 64, 0, 1], ERR_INVALID_PARAMETER),
            (SET_SCANOUT, vec![0, 0, 64, 64, 0, 9], ERR_INVALID_RESOURCE_ID),
            (RESOURCE_FLUSH, vec![0, 60, 64, 5, 1, 0], ERR_INVALID_PARAMETER),
            (TRANSFER_TO_HOST_2D, vec![0, 0, 64, 65, 0, 0, 1, 0], ERR_INVALID_PARAMETER),
            // An offset past the backing, and one that would wrap around.
            (TRANSFER_TO_HOST_2D, vec![0, 0, 64, 64, 4, 0, 1, 0], ERR_INVALID_PARAMETER),
            (TRANSFER_TO_HOST_2D, vec![0, 0, 1, 1, u32::MAX, u32::MAX, 1, 0], ERR_INVALID_PARAMETER),
            (TRANSFER_TO_HOST_2D, vec![0, 0, 1, 1, 0, 0, 9, 0], ERR_INVALID_RESOURCE_ID),
        ];
        for (i, (kind, fields, want)) in cases.iter().enumerate() {
            assert_eq!(control(&mut d, *kind, fields), *want, "case {i}: {kind:#x} {fields:?}");
        }
        // Backing: outside guest RAM, too many entries, none; then detach twice.
        assert_eq!(control(&mut d, RESOURCE_CREATE_2D, &[2, format::B8G8R8X8, 8, 8]), OK_NODATA);
        let outside = RAM as u32 - 100;
        assert_eq!(control(&mut d, RESOURCE_ATTACH_BACKING, &[2, 1, outside, 0, 256, 0]), ERR_UNSPEC);
        assert_eq!(control(&mut d, RESOURCE_ATTACH_BACKING, &[2, MAX_BACKING_ENTRIES + 1]), ERR_UNSPEC);
        assert_eq!(control(&mut d, RESOURCE_ATTACH_BACKING, &[2, 0]), ERR_UNSPEC);
        assert_eq!(control(&mut d, RESOURCE_ATTACH_BACKING, &[2, 3, PAGES as u32, 0, 64]), ERR_UNSPEC, "short");
        assert_eq!(control(&mut d, TRANSFER_TO_HOST_2D, &[0, 0, 8, 8, 0, 0, 2, 0]), ERR_UNSPEC, "no backing");
        assert_eq!(control(&mut d, RESOURCE_DETACH_BACKING, &[1, 0]), OK_NODATA);
        assert_eq!(control(&mut d, RESOURCE_DETACH_BACKING, &[1, 0]), ERR_UNSPEC);
        // Host memory is bounded: 4 resources of 64 MiB fill it, the fifth is refused until one goes.
        assert_eq!(control(&mut d, RESOURCE_UNREF, &[1, 0]), OK_NODATA);
        assert_eq!(control(&mut d, RESOURCE_UNREF, &[2, 0]), OK_NODATA);
        for id in 10..14 {
            assert_eq!(control(&mut d, RESOURCE_CREATE_2D, &[id, format::B8G8R8X8, 4096, 4096]), OK_NODATA);
        }
        assert_eq!(control(&mut d, RESOURCE_CREATE_2D, &[14, format::B8G8R8X8, 4096, 4096]), ERR_OUT_OF_MEMORY);
        assert_eq!(control(&mut d, RESOURCE_UNREF, &[10, 0]), OK_NODATA);
        assert_eq!(control(&mut d, RESOURCE_CREATE_2D, &[14, format::B8G8R8X8, 4000, 4000]), OK_NODATA);
        // A fenced request: its fence comes back.
        let mut fenced = req(GET_DISPLAY_INFO, &[]);
        fenced[4..8].copy_from_slice(&FLAG_FENCE.to_le_bytes());
        fenced[8..16].copy_from_slice(&0x1234_5678_9ABCu64.to_le_bytes());
        let r = send(&mut d, CONTROLQ, &fenced, 408);
        assert_eq!((le32(&r, 4), le64(&r, 8)), (Some(FLAG_FENCE), Some(0x1234_5678_9ABC)));
        // A request shorter than a header.
        assert_eq!(le32(&send(&mut d, CONTROLQ, &[1, 2, 3], 64), 0), Some(ERR_UNSPEC));
        assert_eq!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert_eq!(shared.counters.malformed.load(Ordering::Relaxed), 0);
        assert!(shared.counters.errors.load(Ordering::Relaxed) >= cases.len() as u64 + 8);
    }

    /// Chains that break the queue's rules break this device until the driver resets it.
    #[test]
    fn malformed_chains_need_a_reset_and_a_reset_brings_the_display_back() {
        let (mut d, shared) = gpu();
        let info = req(cmd::GET_DISPLAY_INFO, &[]);
        d.mem.write_slice(&info, GuestAddress(REQUEST)).unwrap();
        let cases: [[Desc; 2]; 3] = [
            // No room for the 408-byte response.
            [
                Desc { addr: REQUEST, len: 24, flags: DESC_F_NEXT, next: 1 },
                Desc { addr: RESPONSE, len: 100, flags: DESC_F_WRITE, next: 0 },
            ],
            // A readable buffer after a writable one.
            [
                Desc { addr: RESPONSE, len: 408, flags: DESC_F_WRITE | DESC_F_NEXT, next: 1 },
                Desc { addr: REQUEST, len: 24, flags: 0, next: 0 },
            ],
            // Outside guest memory.
            [
                Desc { addr: REQUEST, len: 24, flags: DESC_F_NEXT, next: 1 },
                Desc { addr: RAM as u64 - 8, len: 408, flags: DESC_F_WRITE, next: 0 },
            ],
        ];
        for (i, [a, b]) in cases.into_iter().enumerate() {
            d.write_desc(CONTROLQ, 0, a);
            d.write_desc(CONTROLQ, 1, b);
            d.publish(CONTROLQ, 0, 1);
            let deadline = Instant::now() + WAIT;
            while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0, "case {i}");
            assert_eq!(shared.counters.malformed.load(Ordering::Relaxed), i as u64 + 1);
            d.init();
        }
        // An avail index far ahead.
        d.write_desc(CURSORQ, 0, Desc { addr: REQUEST, len: 24, flags: 0, next: 0 });
        d.publish(CURSORQ, 0, 1000);
        let deadline = Instant::now() + WAIT;
        while d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        d.init();
        let info = send(&mut d, CONTROLQ, &req(cmd::GET_DISPLAY_INFO, &[]), 408);
        assert_eq!(le32(&info, 0), Some(cmd::OK_DISPLAY_INFO), "working again after the reset");
    }

    #[test]
    fn the_cursor_image_and_position_are_kept() {
        let (mut d, shared) = gpu();
        resource(&mut d, 3, format::B8G8R8A8, (64, 64), PAGES, 8192);
        put_pixel(&d, PAGES, 8192, 64, (1, 2), [0x30, 0x20, 0x10, 0x80]);
        assert_eq!(control(&mut d, cmd::TRANSFER_TO_HOST_2D, &[0, 0, 64, 64, 0, 0, 3, 0]), cmd::OK_NODATA);
        // update_cursor: scanout, x, y, padding, resource, hot_x, hot_y, padding.
        let update = req(cmd::UPDATE_CURSOR, &[0, 300, 200, 0, 3, 4, 5, 0]);
        assert!(send(&mut d, CURSORQ, &update, 0).is_empty(), "no response on the cursor queue");
        let c = shared.cursor();
        let image = c.image.expect("an image");
        assert_eq!((c.x, c.y, image.width, image.hot_x, image.hot_y), (300, 200, 64, 4, 5));
        assert_eq!(image.pixels[2 * 64 + 1], 0x80_10_20_30);
        let moved = req(cmd::MOVE_CURSOR, &[0, 10, 20, 0, 0, 0, 0, 0]);
        send(&mut d, CURSORQ, &moved, 0);
        let c2 = shared.cursor();
        assert_eq!((c2.x, c2.y, c2.version), (10, 20, c.version), "moved, same image");
        send(&mut d, CURSORQ, &req(cmd::UPDATE_CURSOR, &[0, 10, 20, 0, 0, 0, 0, 0]), 0);
        assert!(shared.cursor().image.is_none(), "hidden");
    }

    #[test]
    fn resources_the_scanout_and_the_cursor_survive_a_machine_state() {
        use crate::pci::PciDevice;
        let (mut d, shared) = gpu();
        resource(&mut d, 5, format::B8G8R8X8, (32, 32), PAGES, 1024);
        put_pixel(&d, PAGES, 1024, 32, (31, 31), [9, 8, 7, 0]);
        assert_eq!(control(&mut d, cmd::TRANSFER_TO_HOST_2D, &[0, 0, 32, 32, 0, 0, 5, 0]), cmd::OK_NODATA);
        assert_eq!(control(&mut d, cmd::SET_SCANOUT, &[0, 0, 32, 32, 0, 5]), cmd::OK_NODATA);
        send(&mut d, CURSORQ, &req(cmd::UPDATE_CURSOR, &[0, 7, 8, 0, 5, 1, 2, 0]), 0);
        shared.request_size(1600, 900);
        let mut w = crate::snapshot::Writer::new();
        d.device.save_state(&mut w).unwrap();
        let saved = w.buf;

        let restore = |d: &mut HostDriver<VirtioGpu>, bytes: &[u8]| {
            let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
            let shared = GpuShared::new(Screen::new(), 640, 480);
            let gpu = VirtioGpu::new(shared.clone(), interrupt.clone()).unwrap();
            let mut fresh =
                crate::virtio::pci::VirtioPci::new(gpu, 0xC000_0000, 16, interrupt, d.mem.clone(), None, None).unwrap();
            let mut r = crate::snapshot::Reader::new("pci", bytes);
            fresh.restore_state(&mut r).and_then(|()| r.finish())?;
            d.device = fresh;
            Ok::<_, crate::snapshot::StateError>(shared)
        };
        let shared2 = restore(&mut d, &saved).unwrap();
        assert!(shared2.screen.scanout_owned());
        assert_eq!(pixel(&shared2, 31, 31), 0x07_08_09);
        assert_eq!(shared2.preferred_size(), (1600, 900));
        let c = shared2.cursor();
        assert_eq!((c.x, c.y, c.image.map(|i| (i.hot_x, i.hot_y))), (7, 8, Some((1, 2))));
        // The backing came back too: a new transfer and flush work.
        put_pixel(&d, PAGES, 1024, 32, (0, 0), [1, 1, 1, 0]);
        assert_eq!(control(&mut d, cmd::TRANSFER_TO_HOST_2D, &[0, 0, 32, 32, 0, 0, 5, 0]), cmd::OK_NODATA);
        assert_eq!(control(&mut d, cmd::RESOURCE_FLUSH, &[0, 0, 32, 32, 5, 0]), cmd::OK_NODATA);
        assert_eq!(pixel(&shared2, 0, 0), 0x01_01_01);
        // A damaged state is refused whole.
        assert!(restore(&mut d, &saved[..saved.len() - 7]).is_err());
    }
}
