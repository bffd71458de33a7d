//! The console screen: what the guest shows, as 0x00RRGGBB pixels, plus the damage each viewer has not
//! seen yet.
//!
//! A refresher thread (see [`refresh`]) keeps the [`Frame`] in step with the guest: VGA text (guest RAM at
//! 0xB8000, drawn with an 8×16 font) until the guest enables a graphics mode through the DISPI registers,
//! then the linear framebuffer, where KVM's dirty-page log on the framebuffer's memslot plus a comparison
//! against the frame find what changed, so an idle screen costs almost nothing. Each viewer (an RFB client)
//! is a [`Viewer`] that collects damage rectangles; a slow viewer only accumulates a larger region, so it
//! never slows the guest or other viewers.

pub mod edid;
pub mod font;
pub mod refresh;
pub mod text;

use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use crate::devices::bus::lock;

/// Guest physical address of the linear framebuffer (the Bochs VBE default).
pub const LFB_BASE: u64 = 0xE000_0000;
/// Video memory: enough for 1920×1080 at 32 bpp, twice over for panning.
pub const VRAM_BYTES: u64 = 16 << 20;
/// The mode Linux gets through `screen_info`, and the largest the DISPI registers accept.
pub const DEFAULT_WIDTH: u32 = 1280;
pub const DEFAULT_HEIGHT: u32 = 800;
pub const MAX_WIDTH: u32 = 1920;
pub const MAX_HEIGHT: u32 = 1080;
/// Most rectangles a viewer keeps before merging them into their bounding box.
pub const MAX_RECTS: usize = 64;
/// Damage is found in tiles this wide, in bands this high.
pub const TILE_WIDTH: u32 = 64;
pub const BAND_HEIGHT: u32 = 16;

/// A rectangle in frame coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, w: u32, h: u32) -> Self {
        Rect { x, y, w, h }
    }

    pub fn is_empty(&self) -> bool {
        self.w == 0 || self.h == 0
    }

    pub fn right(&self) -> u32 {
        self.x + self.w
    }

    pub fn bottom(&self) -> u32 {
        self.y + self.h
    }

    /// The smallest rectangle holding both.
    pub fn union(&self, other: &Rect) -> Rect {
        let (x, y) = (self.x.min(other.x), self.y.min(other.y));
        Rect::new(x, y, self.right().max(other.right()) - x, self.bottom().max(other.bottom()) - y)
    }

    /// The part of `self` inside `other`, if any.
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let (x, y) = (self.x.max(other.x), self.y.max(other.y));
        let (r, b) = (self.right().min(other.right()), self.bottom().min(other.bottom()));
        (r > x && b > y).then(|| Rect::new(x, y, r - x, b - y))
    }

    fn touches(&self, other: &Rect) -> bool {
        self.x <= other.right() && other.x <= self.right() && self.y <= other.bottom() && other.y <= self.bottom()
    }
}

/// The most rows a scroll is looked for at (a text console's line is 16, a web page's wheel step ~50).
pub const MAX_SCROLL: i32 = 64;

/// The picture: `width × height` pixels, 0x00RRGGBB.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
}

impl Frame {
    pub fn new(width: u32, height: u32) -> Self {
        Frame { width, height, pixels: vec![0; (width * height) as usize] }
    }

    /// Whether a new picture is this frame moved up (positive) or down by some rows, at most
    /// [`MAX_SCROLL`]: compares sample rows of the new picture (`new_row(y, out)` fills `out` with its row
    /// `y`, false when it cannot) against the frame at every shift. None when nothing moved, or when there
    /// is too little texture to tell a scroll from a coincidence.
    pub fn detect_scroll(&self, mut new_row: impl FnMut(u32, &mut Vec<u32>) -> bool) -> Option<i32> {
        const SAMPLES: u32 = 24;
        let (w, h) = (self.width as usize, self.height as i32);
        let mut samples = Vec::new();
        let mut row = Vec::new();
        for i in 0..SAMPLES {
            let y = (MAX_SCROLL + (h - 2 * MAX_SCROLL) * i as i32 / SAMPLES as i32).clamp(0, (h - 1).max(0));
            if new_row(y as u32, &mut row) && row.len() == w && row.iter().any(|p| *p != row[0]) {
                samples.push((y, row.clone()));
            }
        }
        if samples.len() < 4 {
            return None;
        }
        let old = |y: i32| &self.pixels[y as usize * w..(y as usize + 1) * w];
        if samples.iter().all(|(y, new)| old(*y) == &new[..]) {
            return None;
        }
        (1..=MAX_SCROLL)
            .flat_map(|d| [d, -d])
            .find(|dy| samples.iter().all(|(y, new)| (0..h).contains(&(y + dy)) && old(y + dy) == &new[..]))
    }

    /// Moves the picture up (`dy` > 0) or down by `dy` rows (what [`detect_scroll`](Self::detect_scroll)
    /// found); the rows uncovered keep their old pixels until redrawn.
    pub fn shift_rows(&mut self, dy: i32) {
        let width = self.width as usize;
        let rows = (dy.unsigned_abs() as usize).min(self.height as usize);
        let moved = (self.height as usize - rows) * width;
        let shift = rows * width;
        if dy > 0 {
            self.pixels.copy_within(shift..shift + moved, 0);
        } else {
            self.pixels.copy_within(0..moved, shift);
        }
    }

    pub fn bounds(&self) -> Rect {
        Rect::new(0, 0, self.width, self.height)
    }

    /// The pixels of `r` (which must lie inside the frame), row by row.
    pub fn copy_rect(&self, r: &Rect, out: &mut Vec<u32>) {
        out.clear();
        for y in r.y..r.bottom() {
            let start = (y * self.width + r.x) as usize;
            out.extend_from_slice(&self.pixels[start..start + r.w as usize]);
        }
    }
}

/// Which tiles of one band of rows changed, turned into rectangles (runs of changed tiles) when the band
/// is done: the damage the refresher and the virtio-gpu scanout report.
#[derive(Debug)]
pub struct TileDamage {
    width: u32,
    tiles: Vec<bool>,
}

impl TileDamage {
    /// For a frame `width` pixels wide.
    pub fn new(width: u32) -> Self {
        TileDamage { width, tiles: vec![false; width.div_ceil(TILE_WIDTH) as usize] }
    }

    /// Pixel column `x` of the band changed.
    pub fn mark(&mut self, x: usize) {
        if let Some(t) = self.tiles.get_mut(x / TILE_WIDTH as usize) {
            *t = true;
        }
    }

    /// Appends the changed tiles of band `band` (rows `band × BAND_HEIGHT` up to `height`) to `out` and
    /// starts the next band clean.
    pub fn take_band(&mut self, band: u32, height: u32, out: &mut Vec<Rect>) {
        let top = band * BAND_HEIGHT;
        let h = (top + BAND_HEIGHT).min(height).saturating_sub(top);
        let mut t = 0;
        while t < self.tiles.len() {
            if !self.tiles[t] {
                t += 1;
                continue;
            }
            let first = t;
            while t < self.tiles.len() && self.tiles[t] {
                self.tiles[t] = false;
                t += 1;
            }
            let x = first as u32 * TILE_WIDTH;
            let right = (t as u32 * TILE_WIDTH).min(self.width);
            if h > 0 {
                out.push(Rect::new(x, top, right - x, h));
            }
        }
    }
}

/// A pointer image: `width × height` pixels 0xAARRGGBB (alpha ≥ 0x80 shows), with its hotspot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorImage {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub pixels: Vec<u32>,
}

impl CursorImage {
    /// A pointer that shows nothing.
    pub fn hidden() -> Self {
        CursorImage { width: 1, height: 1, hot_x: 0, hot_y: 0, pixels: vec![0] }
    }
}

/// What a viewer has not seen yet.
#[derive(Debug, Default)]
pub struct Damage {
    /// The whole frame scrolled by this many rows (positive: content moved up) before `rects` changed;
    /// sent as a CopyRect. Only recorded for a viewer with nothing else pending.
    pub scroll: Option<i32>,
    pub rects: Vec<Rect>,
    /// The frame changed size since the viewer last looked.
    pub resized: bool,
    /// Set when the viewer must stop (the VM is going away).
    pub closed: bool,
}

impl Damage {
    /// Adds `r`, merging touching rectangles and collapsing to a bounding box past [`MAX_RECTS`].
    pub fn add(&mut self, r: Rect) {
        if r.is_empty() {
            return;
        }
        let mut merged = r;
        self.rects.retain(|old| {
            if old.touches(&merged) {
                merged = merged.union(old);
                false
            } else {
                true
            }
        });
        self.rects.push(merged);
        if self.rects.len() > MAX_RECTS {
            let all = self.rects.iter().skip(1).fold(self.rects[0], |a, b| a.union(b));
            self.rects = vec![all];
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rects.is_empty() && self.scroll.is_none() && !self.resized && !self.closed
    }

    pub fn take(&mut self) -> Damage {
        std::mem::take(self)
    }
}

/// One viewer's mailbox.
#[derive(Debug, Default)]
pub struct Viewer {
    pub damage: Mutex<Damage>,
    pub wake: Condvar,
    /// Counts the pokes (changed with `damage` locked), so a waiter for them misses none.
    pokes: std::sync::atomic::AtomicU64,
}

impl Viewer {
    fn push(&self, f: impl FnOnce(&mut Damage)) {
        f(&mut lock(&self.damage));
        self.wake.notify_all();
    }

    /// Wakes whoever waits on this viewer (for reasons other than damage).
    pub fn poke(&self) {
        let _guard = lock(&self.damage);
        self.pokes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_all();
    }

    /// How many times the viewer was poked: what [`Viewer::wait_for_poke`] compares with.
    pub fn pokes(&self) -> u64 {
        self.pokes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until the viewer is poked after `seen` was read from [`Viewer::pokes`], or `timeout` passes
    /// (damage alone does not end the wait).
    pub fn wait_for_poke(&self, seen: u64, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = lock(&self.damage);
        while self.pokes() == seen {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else { return };
            guard = self.wake.wait_timeout(guard, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits until there is damage or `timeout` passes; returns the damage guard.
    pub fn wait(&self, timeout: Duration) -> std::sync::MutexGuard<'_, Damage> {
        let guard = lock(&self.damage);
        if !guard.is_empty() {
            return guard;
        }
        self.wake.wait_timeout(guard, timeout).unwrap_or_else(|p| p.into_inner()).0
    }
}

/// The screen shared by the refresher and every viewer.
#[derive(Debug, Default)]
pub struct Screen {
    frame: RwLock<Frame>,
    viewers: Mutex<Vec<Weak<Viewer>>>,
    /// Set when a viewer joins, so the refresher reads everything once.
    full_refresh: std::sync::atomic::AtomicBool,
    /// Counts finished refreshes, so a new viewer can wait for an up-to-date frame.
    refreshes: Mutex<u64>,
    refreshed: Condvar,
    viewer_joined: Condvar,
    /// Set while a virtio-gpu scanout draws the picture (the refresher stands aside); changed only with
    /// the frame locked, so whoever holds the frame sees it steady.
    scanout_owner: std::sync::atomic::AtomicBool,
    /// The pointer shape the guest set (None: the server's own arrow), and a count of its changes.
    cursor: Mutex<(u64, Option<Arc<CursorImage>>)>,
    /// The text the guest's clipboard last got (through its clipboard agent), and a count of its changes.
    clipboard: Mutex<(u64, Option<Arc<str>>)>,
    /// The sound the guest plays, for viewers that listen.
    audio: crate::audio::AudioOutput,
}

impl Screen {
    pub fn new() -> Arc<Self> {
        Arc::new(Screen { frame: RwLock::new(Frame::new(640, 400)), ..Screen::default() })
    }

    /// Registers a viewer; it starts with the whole frame as damage.
    pub fn subscribe(&self) -> Arc<Viewer> {
        let viewer = Arc::new(Viewer::default());
        viewer.push(|d| d.add(self.read().bounds()));
        lock(&self.viewers).push(Arc::downgrade(&viewer));
        self.full_refresh.store(true, std::sync::atomic::Ordering::Release);
        self.viewer_joined.notify_all();
        viewer
    }

    /// Lets the idle refresher sleep until a viewer joins (or `timeout`).
    fn wait_for_viewer(&self, timeout: Duration) {
        let viewers = lock(&self.viewers);
        if viewers.iter().all(|v| v.strong_count() == 0) {
            let _ = self.viewer_joined.wait_timeout(viewers, timeout);
        }
    }

    /// How many viewers are connected.
    pub fn viewer_count(&self) -> usize {
        let mut viewers = lock(&self.viewers);
        viewers.retain(|v| v.strong_count() > 0);
        viewers.len()
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Frame> {
        self.frame.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Frame> {
        self.frame.write().unwrap_or_else(|p| p.into_inner())
    }

    fn broadcast(&self, f: impl Fn(&mut Damage)) {
        let mut viewers = lock(&self.viewers);
        viewers.retain(|v| match v.upgrade() {
            Some(viewer) => {
                viewer.push(&f);
                true
            }
            None => false,
        });
    }

    /// Tells every viewer about changed rectangles.
    pub fn damage(&self, rects: &[Rect]) {
        if !rects.is_empty() {
            self.broadcast(|d| rects.iter().for_each(|r| d.add(*r)));
        }
    }

    /// Tells every viewer the whole frame moved by `dy` rows: as a copy for a viewer with nothing pending,
    /// as whole-frame damage otherwise.
    pub fn scroll(&self, dy: i32) {
        let bounds = self.read().bounds();
        self.broadcast(|d| {
            if d.is_empty() {
                d.scroll = Some(dy);
            } else {
                d.add(bounds);
            }
        });
    }

    /// Gives the picture to a virtio-gpu scanout (`true`) or back to the VGA refresher, which then redraws
    /// everything.
    pub fn set_scanout_owner(&self, owned: bool) {
        let _frame = self.write();
        self.scanout_owner.store(owned, std::sync::atomic::Ordering::Release);
        if !owned {
            self.full_refresh.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Sets the pointer shape viewers show (None: the server's own arrow) and wakes them.
    pub fn set_cursor(&self, image: Option<Arc<CursorImage>>) {
        {
            let mut cursor = lock(&self.cursor);
            if cursor.1 == image {
                return;
            }
            *cursor = (cursor.0 + 1, image);
        }
        let viewers = lock(&self.viewers);
        for viewer in viewers.iter().filter_map(Weak::upgrade) {
            viewer.poke();
        }
    }

    /// The pointer shape and how many times it changed.
    pub fn cursor(&self) -> (u64, Option<Arc<CursorImage>>) {
        lock(&self.cursor).clone()
    }

    /// Puts text the guest copied on the viewers' clipboard and wakes them.
    pub fn set_clipboard(&self, text: &str) {
        {
            let mut clipboard = lock(&self.clipboard);
            *clipboard = (clipboard.0 + 1, Some(Arc::from(text)));
        }
        self.poke_viewers();
    }

    fn poke_viewers(&self) {
        let viewers = lock(&self.viewers);
        for viewer in viewers.iter().filter_map(Weak::upgrade) {
            viewer.poke();
        }
    }

    /// The guest's sound, for viewers to read.
    pub fn audio(&self) -> &crate::audio::AudioOutput {
        &self.audio
    }

    /// The guest started playing sound in `format` (false: a format no listener can take; nothing plays).
    pub fn audio_start(&self, format: crate::audio::AudioFormat) -> bool {
        let ok = self.audio.start(format);
        self.poke_viewers();
        ok
    }

    /// Sound the guest played (interleaved frames of the started format); wakes the viewers.
    pub fn audio_push(&self, samples: &[i16]) {
        self.audio.push(samples);
        // The sound plays every few milliseconds: only wake the viewers when one of them listens.
        if self.audio.has_listeners() {
            self.poke_viewers();
        }
    }

    /// The guest stopped playing.
    pub fn audio_stop(&self) {
        self.audio.stop();
        self.poke_viewers();
    }

    /// How many times the guest's clipboard text changed (what viewers compare on every update).
    pub fn clipboard_version(&self) -> u64 {
        lock(&self.clipboard).0
    }

    /// The guest's clipboard text and how many times it changed.
    pub fn clipboard(&self) -> (u64, Option<Arc<str>>) {
        lock(&self.clipboard).clone()
    }

    /// How many times the pointer shape changed (what viewers compare on every update).
    pub fn cursor_version(&self) -> u64 {
        lock(&self.cursor).0
    }

    /// Whether a virtio-gpu scanout draws the picture (read it with the frame locked to rely on it).
    pub fn scanout_owned(&self) -> bool {
        self.scanout_owner.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces the frame with one of another size (all black) and tells every viewer; at the same size it
    /// only marks everything damaged (the picture will be redrawn).
    pub fn resize(&self, width: u32, height: u32) {
        self.resize_unless(width, height, false);
    }

    /// [`resize`](Self::resize), for the VGA refresher: nothing happens while a scanout owns the picture.
    pub fn resize_for_vga(&self, width: u32, height: u32) {
        self.resize_unless(width, height, true);
    }

    fn resize_unless(&self, width: u32, height: u32, unless_scanout: bool) {
        let same = {
            let mut frame = self.write();
            if unless_scanout && self.scanout_owned() {
                return;
            }
            let same = (frame.width, frame.height) == (width, height);
            if !same {
                *frame = Frame::new(width, height);
            }
            same
        };
        self.broadcast(|d| {
            if !same {
                d.rects.clear();
                d.resized = true;
            }
            d.add(Rect::new(0, 0, width, height));
        });
    }

    /// Tells every viewer to stop.
    pub fn close(&self) {
        self.broadcast(|d| d.closed = true);
    }

    /// Called by the refresher after each refresh.
    fn refreshed(&self) {
        *lock(&self.refreshes) += 1;
        self.refreshed.notify_all();
    }

    /// Waits (at most `timeout`) until the refresher has refreshed the screen once more, so that a new
    /// viewer starts from the guest's current mode and picture.
    pub fn wait_for_refresh(&self, timeout: Duration) {
        let guard = lock(&self.refreshes);
        let start = *guard;
        let _ = self.refreshed.wait_timeout_while(guard, timeout, |n| *n == start);
    }

    fn take_full_refresh(&self) -> bool {
        self.full_refresh.swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_merges_touching_rects_and_stays_bounded() {
        let mut d = Damage::default();
        d.add(Rect::new(0, 0, 10, 10));
        d.add(Rect::new(10, 0, 10, 10)); // touches: merged
        assert_eq!(d.rects, vec![Rect::new(0, 0, 20, 10)]);
        d.add(Rect::new(100, 100, 5, 5));
        assert_eq!(d.rects.len(), 2);
        for i in 0..1000 {
            d.add(Rect::new(200 + i * 3, 300, 1, 1));
        }
        assert!(d.rects.len() <= MAX_RECTS);
        let all = d.rects.iter().fold(d.rects[0], |a, b| a.union(b));
        assert!(all.intersect(&Rect::new(0, 0, 1, 1)).is_some() && all.right() > 200 + 999 * 3);
    }

    #[test]
    fn viewers_get_damage_until_dropped() {
        let screen = Screen::new();
        let v = screen.subscribe();
        assert_eq!(lock(&v.damage).take().rects, vec![Rect::new(0, 0, 640, 400)]);
        screen.damage(&[Rect::new(1, 2, 3, 4)]);
        assert_eq!(v.wait(Duration::from_millis(1)).take().rects, vec![Rect::new(1, 2, 3, 4)]);
        screen.resize(800, 600);
        let d = v.wait(Duration::from_millis(1)).take();
        assert!(d.resized);
        assert_eq!(screen.viewer_count(), 1);
        drop(v);
        assert_eq!(screen.viewer_count(), 0);
    }
}
