//! The refresher: a thread that keeps the [`Screen`] in step with the guest while anyone is watching.
//!
//! In text mode it reads the 4000 bytes of the text buffer and the cursor registers and redraws changed
//! cells. In graphics mode it asks KVM which pages of video memory the guest wrote since the last look
//! (the dirty-page log of the framebuffer's memslot, plus pages written by the host), and compares only
//! those rows, in 64-pixel tiles, against the frame. With nobody watching it does nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MemoryRegionAddress};

use super::text::{self, TextState};
use super::{BAND_HEIGHT, Screen, TileDamage, VRAM_BYTES};
use crate::devices::bus::lock;
use crate::devices::dispi::{Dispi, GraphicsMode};
use crate::devices::vga::Vga;

const PAGE: u64 = 4096;
/// How often the screen is refreshed while watched (125 Hz: an unchanged screen costs one dirty-log ioctl or
/// one 4000-byte compare per refresh).
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(8);

/// How often the refresher looks whether a virtio-gpu scanout has let go of the picture.
const SCANOUT_POLL: Duration = Duration::from_millis(50);

/// What the refresher needs of one boot of the VM.
pub struct BootView {
    pub vm: Arc<VmFd>,
    pub ram: GuestMemoryMmap,
    /// Video memory (its own memslot, dirty-logged).
    pub vram: Arc<GuestRegionMmap>,
    pub vram_slot: u32,
    pub dispi: Arc<Mutex<Dispi>>,
    pub vga: Arc<Mutex<Vga>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Nothing,
    Text,
    Graphics(GraphicsMode),
}

/// The refresher's state, shared with the VM (which attaches each boot) and the frame source.
pub struct Refresher {
    pub screen: Arc<Screen>,
    boot: Mutex<Option<BootView>>,
    /// Pages written from the host side (the benchmark frame source), as a bitmap like KVM's.
    host_dirty: Mutex<Vec<u64>>,
    /// Counts register writes of the display devices (mode changes, cursor moves).
    pub registers_version: Arc<AtomicU64>,
    stop: AtomicBool,
    /// Nanoseconds spent refreshing, for benchmarks.
    pub busy_ns: AtomicU64,
}

impl Refresher {
    pub fn new(screen: Arc<Screen>) -> Arc<Self> {
        Arc::new(Refresher {
            screen,
            boot: Mutex::new(None),
            host_dirty: Mutex::new(vec![0; (VRAM_BYTES / PAGE / 64) as usize]),
            registers_version: Arc::default(),
            stop: AtomicBool::new(false),
            busy_ns: AtomicU64::new(0),
        })
    }

    pub fn attach(&self, view: BootView) {
        *lock(&self.boot) = Some(view);
    }

    /// Forgets the boot (before its VM and memory go away).
    pub fn detach(&self) {
        *lock(&self.boot) = None;
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.screen.close();
    }

    /// Writes `bytes` into video memory at `offset` from the host and marks the pages dirty, exactly as if
    /// the guest had written them. Returns false if no boot is attached or the range is outside VRAM.
    pub fn host_write(&self, offset: u64, bytes: &[u8]) -> bool {
        let boot = lock(&self.boot);
        let Some(view) = boot.as_ref() else {
            return false;
        };
        if offset + bytes.len() as u64 > VRAM_BYTES
            || view.vram.write_slice(bytes, MemoryRegionAddress(offset)).is_err()
        {
            return false;
        }
        let mut dirty = lock(&self.host_dirty);
        for page in offset / PAGE..(offset + bytes.len() as u64).div_ceil(PAGE) {
            dirty[(page / 64) as usize] |= 1 << (page % 64);
        }
        true
    }

    /// Sets a graphics mode from the host, as firmware or a driver would (used by the benchmark frame source).
    /// Returns false if no boot is attached.
    pub fn host_set_mode(&self, width: u16, height: u16) -> bool {
        let boot = lock(&self.boot);
        let Some(view) = boot.as_ref() else { return false };
        lock(&view.dispi).set_mode(width, height, 32);
        true
    }

    /// Runs until [`Refresher::stop`].
    pub fn run(&self) {
        let mut shown = Shown::Nothing;
        let mut text_state = TextState::default();
        let mut row_buf = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let start = Instant::now();
            if self.screen.viewer_count() == 0 {
                shown = Shown::Nothing; // redraw everything for the next viewer
                self.screen.wait_for_viewer(Duration::from_millis(200));
                continue;
            }
            if self.screen.scanout_owned() {
                // A virtio-gpu scanout draws the picture (and damages it) itself; once it lets go,
                // everything is drawn afresh.
                shown = Shown::Nothing;
                self.screen.refreshed();
                std::thread::sleep(SCANOUT_POLL);
                continue;
            }
            if self.screen.take_full_refresh() {
                shown = Shown::Nothing;
            }
            {
                let boot = lock(&self.boot);
                if let Some(view) = boot.as_ref() {
                    shown = self.refresh(view, shown, &mut text_state, &mut row_buf);
                }
            }
            self.screen.refreshed();
            self.busy_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            std::thread::sleep(REFRESH_INTERVAL.saturating_sub(start.elapsed()));
        }
    }

    fn refresh(&self, view: &BootView, shown: Shown, text_state: &mut TextState, row_buf: &mut Vec<u8>) -> Shown {
        let mode = lock(&view.dispi).mode();
        match mode {
            None => {
                if shown != Shown::Text {
                    self.screen.resize_for_vga(text::WIDTH, text::HEIGHT);
                    text_state.invalidate();
                }
                self.refresh_text(view, text_state);
                Shown::Text
            }
            Some(mode) => {
                let full = shown != Shown::Graphics(mode);
                if full && !matches!(shown, Shown::Graphics(m) if (m.width, m.height) == (mode.width, mode.height)) {
                    self.screen.resize_for_vga(mode.width, mode.height);
                }
                self.refresh_graphics(view, mode, full, row_buf);
                Shown::Graphics(mode)
            }
        }
    }

    fn refresh_text(&self, view: &BootView, state: &mut TextState) {
        let cursor = lock(&view.vga).cursor();
        let mut bytes = vec![0u8; text::CELLS * 2];
        let start = text::TEXT_BUFFER + u64::from(cursor.start) * 2;
        if view.ram.read_slice(&mut bytes, GuestAddress(start)).is_err() {
            return;
        }
        let cells: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let rects = {
            let mut frame = self.screen.write();
            if (frame.width, frame.height) != (text::WIDTH, text::HEIGHT) || self.screen.scanout_owned() {
                return;
            }
            state.update(&cells, cursor, &mut frame)
        };
        self.screen.damage(&rects);
    }

    /// Which rows of the visible area have dirty pages (all of them when `full`).
    fn dirty_rows(&self, view: &BootView, mode: GraphicsMode, full: bool) -> Vec<bool> {
        // Reading the log also clears it, so it is read even for a full refresh.
        let kvm_log = view.vm.get_dirty_log(view.vram_slot, VRAM_BYTES as usize).unwrap_or_default();
        let host_log = std::mem::replace(&mut *lock(&self.host_dirty), vec![0; (VRAM_BYTES / PAGE / 64) as usize]);
        let mut rows = vec![full; mode.height as usize];
        if full {
            return rows;
        }
        let stride = u64::from(mode.stride);
        let visible_end = mode.offset + stride * u64::from(mode.height);
        for (i, word) in host_log.iter().enumerate() {
            let word = word | kvm_log.get(i).copied().unwrap_or(0);
            if word == 0 {
                continue;
            }
            for bit in 0..64 {
                if word & (1 << bit) == 0 {
                    continue;
                }
                let (start, end) = ((i as u64 * 64 + bit) * PAGE, (i as u64 * 64 + bit + 1) * PAGE);
                if end <= mode.offset || start >= visible_end {
                    continue;
                }
                let first = (start.saturating_sub(mode.offset)) / stride;
                let last = ((end - 1).min(visible_end - 1) - mode.offset) / stride;
                for row in first..=last.min(u64::from(mode.height) - 1) {
                    rows[row as usize] = true;
                }
            }
        }
        rows
    }

    /// Reads one row of video memory as 0x00RRGGBB pixels.
    fn read_row(view: &BootView, mode: GraphicsMode, y: u32, row_buf: &mut Vec<u8>, out: &mut Vec<u32>) -> bool {
        let bytes_pp = (mode.bpp / 8) as usize;
        row_buf.resize(mode.width as usize * bytes_pp, 0);
        let at = mode.offset + u64::from(y) * u64::from(mode.stride);
        if view.vram.read_slice(row_buf, MemoryRegionAddress(at)).is_err() {
            return false;
        }
        out.clear();
        out.extend(
            row_buf.chunks_exact(bytes_pp).map(|b| u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16),
        );
        true
    }

    fn refresh_graphics(&self, view: &BootView, mode: GraphicsMode, full: bool, row_buf: &mut Vec<u8>) {
        let rows = self.dirty_rows(view, mode, full);
        let bytes_pp = (mode.bpp / 8) as usize;
        let width = mode.width as usize;
        let mut rects = Vec::new();
        let mut tiles = TileDamage::new(mode.width);
        let mut frame = self.screen.write();
        if (frame.width, frame.height) != (mode.width, mode.height) || self.screen.scanout_owned() {
            return;
        }
        // A scroll (text consoles, terminals, web pages) moves most rows: find it and send it as a copy.
        let dirty = rows.iter().filter(|r| **r).count();
        if !full
            && dirty * 2 >= rows.len()
            && let Some(dy) = frame.detect_scroll(|y, out| Self::read_row(view, mode, y, row_buf, out))
        {
            frame.shift_rows(dy);
            drop(frame);
            self.screen.scroll(dy);
            frame = self.screen.write();
        }
        for band in (0..mode.height).step_by(BAND_HEIGHT as usize) {
            let band_rows = band..(band + BAND_HEIGHT).min(mode.height);
            if !band_rows.clone().any(|y| rows[y as usize]) {
                continue;
            }
            for y in band_rows.clone().filter(|y| rows[*y as usize]) {
                row_buf.resize(width * bytes_pp, 0);
                let at = mode.offset + u64::from(y) * u64::from(mode.stride);
                if view.vram.read_slice(row_buf, MemoryRegionAddress(at)).is_err() {
                    continue;
                }
                let line = &mut frame.pixels[y as usize * width..(y as usize + 1) * width];
                for (x, px) in line.iter_mut().enumerate() {
                    let b = &row_buf[x * bytes_pp..x * bytes_pp + 3];
                    let value = u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16;
                    if *px != value {
                        *px = value;
                        tiles.mark(x);
                    }
                }
            }
            tiles.take_band(band / BAND_HEIGHT, mode.height, &mut rects);
        }
        drop(frame);
        self.screen.damage(&rects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryRegion;

    #[test]
    fn host_writes_mark_pages_dirty() {
        let r = Refresher::new(Screen::new());
        assert!(!r.host_write(0, &[1, 2, 3]), "no boot attached");
    }

    #[test]
    fn vram_region_reads_back_what_was_written() {
        let region: GuestRegionMmap =
            GuestRegionMmap::new(vm_memory::MmapRegion::new(4 * PAGE as usize).unwrap(), GuestAddress(0)).unwrap();
        region.write_slice(&[9, 8, 7], MemoryRegionAddress(5000)).unwrap();
        let mut b = [0u8; 3];
        region.read_slice(&mut b, MemoryRegionAddress(5000)).unwrap();
        assert_eq!(b, [9, 8, 7]);
        assert_eq!(region.len(), 4 * PAGE);
    }
}
