//! A VM console: an RFB session in its own thread (`porthole_api::rfb`), its screen in one egui texture
//! of which only changed rectangles are uploaded, and keyboard and pointer input sent back. Keys go as QEMU
//! extended key events (scancodes: layout-independent) when the server acknowledges them, else as keysyms.

use crate::app::theme;
use crate::settings::ReleaseKeys;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use porthole_api::rfb::{self, RfbClient};

/// What the session thread shares with the UI.
#[derive(Default)]
struct Frame {
    width: u32,
    height: u32,
    pixels: Vec<u32>,
    /// Changed area since the UI last looked: x0, y0, x1, y1.
    dirty: Option<[u32; 4]>,
    resized: bool,
    state: String,
    closed: bool,
    /// Text the server put on its clipboard that the UI has not taken yet.
    cut_text: Option<String>,
}

struct Shared {
    frame: Mutex<Frame>,
    input: Mutex<Option<UnixStream>>,
    scancodes: AtomicBool,
    /// The server takes SetDesktopSize (ExtendedDesktopSize acknowledged); its first screen's id.
    resizable: AtomicBool,
    screen_id: std::sync::atomic::AtomicU32,
    /// The server speaks the extended clipboard (UTF-8, on demand).
    extended_clipboard: AtomicBool,
    /// Text this side put on the guest's clipboard, handed over when the server asks for it.
    clipboard_out: Mutex<Option<String>>,
    /// The guest keyboard's lock lights, once the server sent them (LED state pseudo-encoding).
    lock_lights: Mutex<Option<porthole_api::KeyboardLeds>>,
    /// How the pixels come (lossless, or JPEG for a slow link) and why, for the status's tooltip.
    picture: Mutex<String>,
    /// The guest's sound, once the server offered it (QEMU's audio extension).
    sound: Mutex<Sound>,
}

/// The console's sound.
#[derive(Default)]
enum Sound {
    /// The server has not offered sound (no sound card, or a server without the extension).
    #[default]
    NotOffered,
    /// Playing on this computer's output.
    Playing(Arc<crate::audio::Player>),
    /// Offered, but this computer cannot play it: why.
    Unavailable(String),
}

/// How the screen fits the space it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// Scaled to fit, smoothed.
    Fit,
    /// The largest whole multiple that fits (or the fitting fraction), sharp pixels.
    Sharp,
    /// One screen pixel per window pixel, with scroll bars.
    Actual,
    /// The guest's screen is resized to the space the console has (servers with ExtendedDesktopSize).
    Resize,
}

/// One console.
pub struct Console {
    pub scaling: Scaling,
    pub title: String,
    shared: Arc<Shared>,
    texture: Option<egui::TextureHandle>,
    /// Keyboard and pointer go to the guest.
    grabbed: bool,
    /// The keys that let go of the keyboard.
    pub release_keys: ReleaseKeys,
    last_modifiers: egui::Modifiers,
    last_pointer: Option<(u16, u16, u8)>,
    /// A paste into the guest was asked for: the next Paste event goes to the server's clipboard.
    pasting: bool,
    /// Resize mode: the size the console area asks for and since when (sent once it holds for a moment),
    /// and the last size sent.
    resize_wanted: Option<((u16, u16), std::time::Instant)>,
    resize_sent: Option<(u16, u16)>,
    /// Screen changes uploaded to the texture so far (frames shown).
    pub frames_shown: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Console {
    /// Starts a session: `connect` (run in the session thread) returns the handshaken client.
    /// Whether the console has the keyboard (clicked into; the release keys let go of it): keys go to the guest.
    pub fn keyboard_captured(&self) -> bool {
        self.grabbed
    }

    pub fn open(
        title: String,
        connect: impl FnOnce() -> Result<RfbClient, String> + Send + 'static,
        repaint: impl Fn() + Send + Sync + 'static,
    ) -> Console {
        let shared = Arc::new(Shared {
            frame: Mutex::new(Frame { state: "Connecting…".into(), ..Frame::default() }),
            input: Mutex::new(None),
            scancodes: AtomicBool::new(false),
            resizable: AtomicBool::new(false),
            screen_id: Default::default(),
            extended_clipboard: AtomicBool::new(false),
            clipboard_out: Mutex::new(None),
            lock_lights: Mutex::new(None),
            picture: Mutex::new(picture_text(rfb::PictureQuality::Lossless, None)),
            sound: Mutex::new(Sound::NotOffered),
        });
        let s = shared.clone();
        let _ = std::thread::Builder::new().name("console".into()).spawn(move || {
            let result = session(&s, connect, &repaint);
            let mut f = lock(&s.frame);
            f.closed = true;
            f.state = match result {
                Ok(()) => "The console closed.".into(),
                Err(e) => format!("The console closed: {e}"),
            };
            drop(f);
            repaint();
        });
        Console {
            scaling: Scaling::Fit,
            title,
            shared,
            texture: None,
            grabbed: false,
            release_keys: ReleaseKeys::default(),
            last_modifiers: egui::Modifiers::NONE,
            last_pointer: None,
            pasting: false,
            resize_wanted: None,
            resize_sent: None,
            frames_shown: 0,
        }
    }

    fn send(&self, bytes: &[u8]) {
        if let Some(s) = lock(&self.shared.input).as_mut() {
            let _ = s.write_all(bytes);
        }
    }

    fn key(&self, keysym: u32, scancode: u32, down: bool) {
        if self.shared.scancodes.load(Ordering::Relaxed) && scancode != 0 {
            let mut m = vec![255, 0];
            m.extend_from_slice(&u16::from(down).to_be_bytes());
            m.extend_from_slice(&keysym.to_be_bytes());
            m.extend_from_slice(&scancode.to_be_bytes());
            self.send(&m);
        } else {
            let mut m = vec![4, u8::from(down), 0, 0];
            m.extend_from_slice(&keysym.to_be_bytes());
            self.send(&m);
        }
    }

    /// Presses and releases a combination (modifiers first, released last).
    pub fn send_combo(&self, keys: &[(u32, u32)]) {
        for &(sym, code) in keys {
            self.key(sym, code, true);
        }
        for &(sym, code) in keys.iter().rev() {
            self.key(sym, code, false);
        }
    }

    pub fn closed(&self) -> bool {
        lock(&self.shared.frame).closed
    }

    /// How the pixels come (lossless, or JPEG on a slow link) and the link's measured speed.
    pub fn picture(&self) -> String {
        lock(&self.shared.picture).clone()
    }

    /// What the session is doing (or why it ended).
    pub fn status(&self) -> String {
        lock(&self.shared.frame).state.clone()
    }

    /// Draws the console into `ui`, filling it (scaled to fit, aspect kept), and forwards input.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            if theme::button(ui, true, theme::KEYBOARD, "Send Ctrl+Alt+Del").clicked() {
                self.send_combo(&[CTRL, ALT, (0xFFFF, 0xE053)]);
            }
            ui.menu_button((theme::KEYBOARD.rich_text(), "Send key"), |ui| {
                for n in 1..=12u32 {
                    if theme::button(ui, true, theme::KEYBOARD, &format!("Ctrl+Alt+F{n}")).clicked() {
                        self.send_combo(&[CTRL, ALT, (0xFFBE + n - 1, function_scancode(n))]);
                    }
                }
                if theme::button(ui, true, theme::KEYBOARD, "Ctrl+Alt+Backspace").clicked() {
                    self.send_combo(&[CTRL, ALT, (0xFF08, 0x0E)]);
                }
                if theme::button(ui, true, theme::KEYBOARD, "PrintScreen").clicked() {
                    self.send_combo(&[(0xFF61, 0xE037)]);
                }
            });
            if theme::button(ui, true, theme::PASTE, "Paste into guest")
                .on_hover_text("Put this computer's clipboard on the guest's")
                .clicked()
            {
                self.pasting = true;
                ui.ctx().send_viewport_cmd(egui::ViewportCommand::RequestPaste);
            }
            let before = self.scaling;
            let resizable = self.shared.resizable.load(Ordering::Relaxed);
            if self.scaling == Scaling::Resize && !resizable && self.resize_sent.is_some() {
                // The server refused the size it was asked for: fit the screen instead.
                self.scaling = Scaling::Fit;
            }
            egui::ComboBox::from_label("Scale")
                .selected_text(match self.scaling {
                    Scaling::Fit => "Fit (smooth)",
                    Scaling::Sharp => "Fit (sharp)",
                    Scaling::Actual => "1:1",
                    Scaling::Resize => "Resize guest to window",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.scaling, Scaling::Fit, "Fit (smooth)");
                    ui.selectable_value(&mut self.scaling, Scaling::Sharp, "Fit (sharp)");
                    ui.selectable_value(&mut self.scaling, Scaling::Actual, "1:1");
                    ui.add_enabled_ui(resizable, |ui| {
                        ui.selectable_value(&mut self.scaling, Scaling::Resize, "Resize guest to window")
                            .on_disabled_hover_text("This server cannot change its screen size");
                    });
                });
            if self.scaling == Scaling::Resize && before != Scaling::Resize {
                self.resize_sent = None;
            }
            if self.scaling != before {
                // Smooth and sharp sampling are texture options: upload the screen again.
                self.texture = None;
                lock(&self.shared.frame).resized = true;
            }
            if theme::button(ui, true, theme::SCREENSHOT, "Screenshot…").clicked() {
                self.screenshot();
            }
            let fullscreen = ui.ctx().input(|i| i.viewport().fullscreen.unwrap_or(false));
            let (icon, text) = if fullscreen {
                (theme::LEAVE_FULL_SCREEN, "Leave full screen")
            } else {
                (theme::FULL_SCREEN, "Full screen")
            };
            if theme::button(ui, true, icon, text).clicked() || ui.input(|i| i.key_pressed(egui::Key::F11)) {
                ui.ctx().send_viewport_cmd(egui::ViewportCommand::Fullscreen(!fullscreen));
            }
            let f = lock(&self.shared.frame);
            let status = if f.closed {
                f.state.clone()
            } else if self.grabbed {
                format!("{}x{} — keyboard captured ({} releases)", f.width, f.height, self.release_keys.text())
            } else if f.width > 0 {
                format!("{}x{} — click the screen to type", f.width, f.height)
            } else {
                f.state.clone()
            };
            ui.label(status).on_hover_text(lock(&self.shared.picture).clone());
            if let Some(lights) = *lock(&self.shared.lock_lights) {
                lock_lights(ui, lights);
            }
            self.sound_controls(ui);
        });
        self.upload(ui.ctx());
        // The guest's clipboard goes to this computer's; a requested paste goes to the guest's.
        if let Some(text) = lock(&self.shared.frame).cut_text.take() {
            ui.ctx().copy_text(text);
        }
        if self.pasting
            && let Some(text) = ui.input(|i| {
                i.events.iter().find_map(|e| if let egui::Event::Paste(t) = e { Some(t.clone()) } else { None })
            })
        {
            self.pasting = false;
            self.send_cut_text(&text);
        }
        let Some(texture) = self.texture.clone() else {
            ui.centered_and_justified(|ui| ui.label(lock(&self.shared.frame).state.clone()));
            return;
        };
        let [w, h] = texture.size();
        let avail = ui.available_size();
        if self.scaling == Scaling::Resize {
            self.follow_window(ui, avail, (w, h));
        }
        let fit = (avail.x / w as f32).min(avail.y / h as f32).max(0.05);
        let scale = match self.scaling {
            Scaling::Fit | Scaling::Resize => fit,
            Scaling::Sharp if fit >= 1.0 => fit.floor(),
            Scaling::Sharp => fit,
            Scaling::Actual => 1.0,
        };
        let size = egui::vec2(w as f32 * scale, h as f32 * scale);
        let image = egui::Image::new((texture.id(), size)).sense(egui::Sense::click_and_drag());
        let response = match self.scaling {
            Scaling::Actual => egui::ScrollArea::both().show(ui, |ui| ui.add(image)).inner,
            _ => ui.add(image),
        }
        .on_hover_text("The VM's screen");
        if response.clicked() {
            self.grabbed = true;
        }
        if self.grabbed {
            self.forward_keys(ui);
        }
        // Pointer: every button transition and movement over the screen, in order (a quick click can press
        // and release within one frame).
        let to_fb = |pos: egui::Pos2| -> (u16, u16) {
            (
                ((pos.x - response.rect.min.x) / scale).clamp(0.0, (w - 1) as f32) as u16,
                ((pos.y - response.rect.min.y) / scale).clamp(0.0, (h - 1) as f32) as u16,
            )
        };
        let events = ui.input(|i| i.events.clone());
        let mut buttons = self.last_pointer.map(|p| p.2).unwrap_or(0);
        let mut last = self.last_pointer.map(|p| (p.0, p.1));
        for e in events {
            let (pos, change) = match e {
                egui::Event::PointerMoved(pos) if response.rect.contains(pos) => (pos, None),
                egui::Event::PointerButton { pos, button, pressed, .. } if response.rect.contains(pos) || !pressed => {
                    let bit = match button {
                        egui::PointerButton::Primary => 1,
                        egui::PointerButton::Middle => 2,
                        egui::PointerButton::Secondary => 4,
                        _ => 0,
                    };
                    (pos, Some((bit, pressed)))
                }
                egui::Event::MouseWheel { delta, .. } if response.hovered() => {
                    let (x, y) = last.unwrap_or((0, 0));
                    let wheel = if delta.y > 0.0 { 8 } else { 16 };
                    self.pointer_event(x, y, buttons | wheel);
                    self.pointer_event(x, y, buttons);
                    continue;
                }
                _ => continue,
            };
            if let Some((bit, pressed)) = change {
                buttons = if pressed { buttons | bit } else { buttons & !bit };
            }
            let (x, y) = to_fb(pos);
            self.pointer_event(x, y, buttons);
            last = Some((x, y));
        }
        if let Some((x, y)) = last {
            self.last_pointer = Some((x, y, buttons));
        }
    }

    /// Resize mode: asks the server for a screen the size of the console area (in physical pixels) once the
    /// area has kept its size for a moment (a window being dragged bigger sends one request, not hundreds).
    fn follow_window(&mut self, ui: &egui::Ui, avail: egui::Vec2, current: (usize, usize)) {
        const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);
        let ppp = ui.ctx().pixels_per_point();
        let want = (
            (avail.x * ppp).floor().clamp(64.0, rfb::MAX_SIDE as f32) as u16,
            (avail.y * ppp).floor().clamp(64.0, rfb::MAX_SIDE as f32) as u16,
        );
        if (usize::from(want.0), usize::from(want.1)) == current || self.resize_sent == Some(want) {
            self.resize_wanted = None;
            return;
        }
        match self.resize_wanted {
            Some((size, since)) if size == want => {
                if since.elapsed() >= SETTLE {
                    let id = self.shared.screen_id.load(Ordering::Relaxed);
                    self.send(&rfb::set_desktop_size_message(id, want.0, want.1));
                    self.resize_sent = Some(want);
                    self.resize_wanted = None;
                } else {
                    ui.ctx().request_repaint_after(SETTLE - since.elapsed());
                }
            }
            _ => {
                self.resize_wanted = Some((want, std::time::Instant::now()));
                ui.ctx().request_repaint_after(SETTLE);
            }
        }
    }

    /// Puts `text` on the guest's clipboard: announced on the extended clipboard (the server fetches it when
    /// someone pastes; any Unicode), else sent as Latin-1 cut text.
    /// Mute and volume while the guest's sound plays; why not, when it cannot.
    fn sound_controls(&self, ui: &mut egui::Ui) {
        match &*lock(&self.shared.sound) {
            Sound::NotOffered => {}
            Sound::Unavailable(why) => {
                ui.add_enabled(false, egui::Label::new(theme::VOLUME_OFF.rich_text()))
                    .on_disabled_hover_text(format!("No sound: {why}"));
            }
            Sound::Playing(player) => {
                let muted = player.muted();
                let (icon, text) = if muted { (theme::VOLUME_OFF, "Unmute") } else { (theme::VOLUME, "Mute") };
                let (played, late, _) = player.counts();
                if theme::button(ui, true, icon, text)
                    .on_hover_text(format!(
                        "The guest's sound on this computer: {} s played, {} s dropped as late",
                        played / u64::from(player.format().rate.max(1)),
                        late / u64::from(player.format().rate.max(1))
                    ))
                    .clicked()
                {
                    player.set_muted(!muted);
                }
                let mut volume = player.volume() * 100.0;
                let slider = egui::Slider::new(&mut volume, 0.0..=100.0).show_value(false).text("Volume");
                if ui.add_enabled(!muted, slider).changed() {
                    player.set_volume(volume / 100.0);
                }
            }
        }
    }

    fn send_cut_text(&self, text: &str) {
        if self.shared.extended_clipboard.load(Ordering::Relaxed) {
            *lock(&self.shared.clipboard_out) = Some(text.to_owned());
            self.send(&rfb::clipboard_notify_message());
            return;
        }
        let latin1: Vec<u8> = text.chars().map(|c| if (c as u32) < 256 { c as u8 } else { b'?' }).collect();
        let mut m = vec![6, 0, 0, 0];
        m.extend_from_slice(&(latin1.len() as u32).to_be_bytes());
        m.extend_from_slice(&latin1);
        self.send(&m);
    }

    /// Saves the screen as a PNG file the user picks.
    fn screenshot(&self) {
        let (w, h, rgba) = {
            let f = lock(&self.shared.frame);
            let rgba: Vec<u8> =
                f.pixels.iter().flat_map(|p| [(p >> 16) as u8, (p >> 8) as u8, *p as u8, 255]).collect();
            (f.width, f.height, rgba)
        };
        if w == 0 {
            return;
        }
        let name = format!("{}.png", self.title.replace(['/', ' '], "_"));
        let Some(path) = rfd::FileDialog::new().set_file_name(&name).add_filter("PNG", &["png"]).save_file() else {
            return;
        };
        if let Err(e) = write_png(&path, w, h, &rgba) {
            lock(&self.shared.frame).state = format!("Cannot save {}: {e}", path.display());
        }
    }

    fn pointer_event(&self, x: u16, y: u16, buttons: u8) {
        let mut m = vec![5, buttons];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        self.send(&m);
    }

    /// Uploads what changed to the texture.
    fn upload(&mut self, ctx: &egui::Context) {
        let mut f = lock(&self.shared.frame);
        if f.width == 0 {
            return;
        }
        let (w, h) = (f.width as usize, f.height as usize);
        let to_image = |pixels: &[u32], x0: usize, y0: usize, x1: usize, y1: usize| {
            let mut rgba = Vec::with_capacity((x1 - x0) * (y1 - y0) * 4);
            for y in y0..y1 {
                for &p in &pixels[y * w + x0..y * w + x1] {
                    rgba.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, p as u8, 255]);
                }
            }
            egui::ColorImage::from_rgba_unmultiplied([x1 - x0, y1 - y0], &rgba)
        };
        let options =
            if self.scaling == Scaling::Fit { egui::TextureOptions::LINEAR } else { egui::TextureOptions::NEAREST };
        if f.resized || self.texture.is_none() {
            let image = to_image(&f.pixels, 0, 0, w, h);
            self.texture = Some(ctx.load_texture("vm-console", image, options));
            f.resized = false;
            f.dirty = None;
            self.frames_shown += 1;
        } else if let (Some([x0, y0, x1, y1]), Some(t)) = (f.dirty.take(), self.texture.as_mut()) {
            let image = to_image(&f.pixels, x0 as usize, y0 as usize, x1 as usize, y1 as usize);
            t.set_partial([x0 as usize, y0 as usize], image, options);
            self.frames_shown += 1;
        }
    }

    fn forward_keys(&mut self, ui: &mut egui::Ui) {
        let events = ui.input(|i| i.events.clone());
        let modifiers = ui.input(|i| i.modifiers);
        if self.release_keys.held(modifiers, |k| ui.input(|i| i.key_pressed(k))) {
            // The release combination: let go of the keyboard (and of the modifiers in the guest).
            self.grabbed = false;
            for (held, key) in
                [(self.last_modifiers.ctrl, CTRL), (self.last_modifiers.alt, ALT), (self.last_modifiers.shift, SHIFT)]
            {
                if held {
                    self.key(key.0, key.1, false);
                }
            }
            self.last_modifiers = egui::Modifiers::NONE;
            return;
        }
        for (on, was, key) in [
            (modifiers.shift, self.last_modifiers.shift, SHIFT),
            (modifiers.ctrl, self.last_modifiers.ctrl, CTRL),
            (modifiers.alt, self.last_modifiers.alt, ALT),
        ] {
            if on != was {
                self.key(key.0, key.1, on);
            }
        }
        self.last_modifiers = modifiers;
        for e in events {
            if let egui::Event::Key { key, pressed, repeat: false, modifiers, .. } = e
                && let Some((sym, code)) = keymap(key, modifiers.shift)
            {
                self.key(sym, code, pressed);
            }
        }
        // The guest has the keyboard: keep egui from acting on these keys.
        ui.input_mut(|i| i.events.retain(|e| !matches!(e, egui::Event::Key { .. } | egui::Event::Text(_))));
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.shared.input).take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Writes RGBA pixels as a PNG file.
pub fn write_png(path: &std::path::Path, width: u32, height: u32, rgba: &[u8]) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgba).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

/// Keysym and XT scancode of the modifiers.
const SHIFT: (u32, u32) = (0xFFE1, 0x2A);
const CTRL: (u32, u32) = (0xFFE3, 0x1D);
const ALT: (u32, u32) = (0xFFE9, 0x38);

fn function_scancode(n: u32) -> u32 {
    match n {
        1..=10 => 0x3A + n,
        11 => 0x57,
        _ => 0x58,
    }
}

/// An egui key as (X11 keysym, XT scancode set 1, 0xE0-prefixed as 0xE0xx).
pub fn keymap(key: egui::Key, shift: bool) -> Option<(u32, u32)> {
    use egui::Key as K;
    const LETTERS: [u32; 26] = [
        0x1E, 0x30, 0x2E, 0x20, 0x12, 0x21, 0x22, 0x23, 0x17, 0x24, 0x25, 0x26, 0x32, 0x31, 0x18, 0x19, 0x10, 0x13,
        0x1F, 0x14, 0x16, 0x2F, 0x11, 0x2D, 0x15, 0x2C,
    ];
    let name = key.name();
    if name.len() == 1 {
        let c = name.as_bytes()[0];
        if c.is_ascii_uppercase() {
            let sym = if shift { u32::from(c) } else { u32::from(c.to_ascii_lowercase()) };
            return Some((sym, LETTERS[usize::from(c - b'A')]));
        }
    }
    Some(match key {
        K::Num1 => (u32::from(if shift { b'!' } else { b'1' }), 0x02),
        K::Num2 => (u32::from(if shift { b'@' } else { b'2' }), 0x03),
        K::Num3 => (u32::from(if shift { b'#' } else { b'3' }), 0x04),
        K::Num4 => (u32::from(if shift { b'$' } else { b'4' }), 0x05),
        K::Num5 => (u32::from(if shift { b'%' } else { b'5' }), 0x06),
        K::Num6 => (u32::from(if shift { b'^' } else { b'6' }), 0x07),
        K::Num7 => (u32::from(if shift { b'&' } else { b'7' }), 0x08),
        K::Num8 => (u32::from(if shift { b'*' } else { b'8' }), 0x09),
        K::Num9 => (u32::from(if shift { b'(' } else { b'9' }), 0x0A),
        K::Num0 => (u32::from(if shift { b')' } else { b'0' }), 0x0B),
        K::Minus => (u32::from(if shift { b'_' } else { b'-' }), 0x0C),
        K::Equals => (u32::from(if shift { b'+' } else { b'=' }), 0x0D),
        K::Backspace => (0xFF08, 0x0E),
        K::Tab => (0xFF09, 0x0F),
        K::OpenBracket => (u32::from(if shift { b'{' } else { b'[' }), 0x1A),
        K::CloseBracket => (u32::from(if shift { b'}' } else { b']' }), 0x1B),
        K::Enter => (0xFF0D, 0x1C),
        K::Semicolon => (u32::from(if shift { b':' } else { b';' }), 0x27),
        K::Quote => (u32::from(if shift { b'"' } else { b'\'' }), 0x28),
        K::Backtick => (u32::from(if shift { b'~' } else { b'`' }), 0x29),
        K::Backslash => (u32::from(if shift { b'|' } else { b'\\' }), 0x2B),
        K::Comma => (u32::from(if shift { b'<' } else { b',' }), 0x33),
        K::Period => (u32::from(if shift { b'>' } else { b'.' }), 0x34),
        K::Slash => (u32::from(if shift { b'?' } else { b'/' }), 0x35),
        K::Space => (0x20, 0x39),
        K::Escape => (0xFF1B, 0x01),
        K::F1 => (0xFFBE, 0x3B),
        K::F2 => (0xFFBF, 0x3C),
        K::F3 => (0xFFC0, 0x3D),
        K::F4 => (0xFFC1, 0x3E),
        K::F5 => (0xFFC2, 0x3F),
        K::F6 => (0xFFC3, 0x40),
        K::F7 => (0xFFC4, 0x41),
        K::F8 => (0xFFC5, 0x42),
        K::F9 => (0xFFC6, 0x43),
        K::F10 => (0xFFC7, 0x44),
        K::F12 => (0xFFC9, 0x58),
        K::Insert => (0xFF63, 0xE052),
        K::Delete => (0xFFFF, 0xE053),
        K::Home => (0xFF50, 0xE047),
        K::End => (0xFF57, 0xE04F),
        K::PageUp => (0xFF55, 0xE049),
        K::PageDown => (0xFF56, 0xE051),
        K::ArrowLeft => (0xFF51, 0xE04B),
        K::ArrowUp => (0xFF52, 0xE048),
        K::ArrowRight => (0xFF53, 0xE04D),
        K::ArrowDown => (0xFF54, 0xE050),
        _ => return None,
    })
}

/// The guest keyboard's lock lights as three small lamps (lit: on), each named for screen readers.
fn lock_lights(ui: &mut egui::Ui, lights: porthole_api::KeyboardLeds) {
    for (on, short, name) in [
        (lights.caps_lock, "Caps", "Caps Lock"),
        (lights.num_lock, "Num", "Num Lock"),
        (lights.scroll_lock, "Scroll", "Scroll Lock"),
    ] {
        let text = egui::RichText::new(short).small();
        let text = if on { text.strong().color(ui.visuals().selection.bg_fill) } else { text.weak() };
        let state = if on { "on" } else { "off" };
        let label = ui.label(text).on_hover_text(format!("{name} is {state} in the guest"));
        label.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, format!("{name} {state}")));
    }
}

/// The pseudo-encodings the console asks for, after the picture's encodings.
const PSEUDO_ENCODINGS: &[i32] = &[
    rfb::DESKTOP_SIZE,
    rfb::LAST_RECT,
    rfb::QEMU_EXTENDED_KEY_EVENT,
    rfb::EXTENDED_DESKTOP_SIZE,
    rfb::EXTENDED_CLIPBOARD,
    rfb::LED_STATE,
    rfb::QEMU_AUDIO,
];

/// The status tooltip's line about the picture.
fn picture_text(quality: rfb::PictureQuality, bits_per_second: Option<f64>) -> String {
    let what = match quality {
        rfb::PictureQuality::Lossless => "Picture: lossless",
        rfb::PictureQuality::Jpeg8 => "Picture: JPEG (quality 8) where the screen has many colours",
        rfb::PictureQuality::Jpeg6 => "Picture: JPEG (quality 6) where the screen has many colours",
    };
    match bits_per_second {
        Some(bps) => format!("{what}, chosen for the {:.1} Mbit/s the link measured", bps / 1e6),
        None => format!("{what} until the link is measured"),
    }
}

/// Counts the last update's transfer into `chooser`; asks the server for other encodings when the link calls
/// for another picture quality.
fn follow_the_link(client: &mut RfbClient, chooser: &mut rfb::QualityChooser, shared: &Shared) -> std::io::Result<()> {
    let Some((bytes, took)) = client.last_transfer() else { return Ok(()) };
    if let Some(quality) = chooser.observe(bytes, took) {
        // Under the input lock, as the clipboard's answers: never between a key event's bytes.
        let _input = lock(&shared.input);
        client.set_encodings(&quality.encodings(PSEUDO_ENCODINGS))?;
    }
    // Only a transfer the chooser counted changes what the tooltip says (most updates are small).
    if bytes >= rfb::QualityChooser::MIN_TRANSFER {
        *lock(&shared.picture) = picture_text(chooser.quality(), chooser.bits_per_second());
    }
    Ok(())
}

/// The server offers the guest's sound: open this computer's output, ask for its format, listen.
fn start_sound(client: &mut RfbClient, shared: &Shared) -> std::io::Result<()> {
    let player = match crate::audio::Player::open() {
        Ok(p) => Arc::new(p),
        Err(why) => {
            *lock(&shared.sound) = Sound::Unavailable(why);
            // Nothing asked for: the server sends nothing. A sink that drops keeps this from running again.
            client.audio_sink = Some(Box::new(|_| {}));
            return Ok(());
        }
    };
    let format = player.format();
    let sink = player.clone();
    client.audio_sink = Some(Box::new(move |m| sink.take(m)));
    *lock(&shared.sound) = Sound::Playing(player);
    if let Some(s) = lock(&shared.input).as_mut() {
        s.write_all(&rfb::audio_format_message(rfb::QEMU_AUDIO_S16, format.wire_channels(), format.rate))?;
        s.write_all(&rfb::audio_enable_message(true))?;
    }
    Ok(())
}

/// The session thread: handshake, then follow the screen until it closes.
fn session(
    shared: &Shared,
    connect: impl FnOnce() -> Result<RfbClient, String>,
    repaint: &dyn Fn(),
) -> Result<(), String> {
    let mut client = connect()?;
    let io = |e: std::io::Error| e.to_string();
    // A still screen sends nothing for as long as it stays still: wait for updates without a deadline.
    client.set_read_timeout(None).map_err(io)?;
    *lock(&shared.input) = Some(client.input().map_err(io)?);
    let mut chooser = rfb::QualityChooser::default();
    client.set_encodings(&chooser.quality().encodings(PSEUDO_ENCODINGS)).map_err(io)?;
    client.full_frame().map_err(io)?;
    follow_the_link(&mut client, &mut chooser, shared).map_err(io)?;
    {
        let mut f = lock(&shared.frame);
        f.width = client.width;
        f.height = client.height;
        f.pixels = client.pixels.clone();
        f.resized = true;
        f.state = format!("Connected to {}", client.name);
    }
    repaint();
    let mut resize_refused = false;
    loop {
        client.request(true).map_err(io)?;
        let rects = client.read_update().map_err(io)?;
        follow_the_link(&mut client, &mut chooser, shared).map_err(io)?;
        if client.acknowledged.contains(&rfb::QEMU_EXTENDED_KEY_EVENT) {
            shared.scancodes.store(true, Ordering::Relaxed);
        }
        // A server with ExtendedDesktopSize may still refuse sizes (status 1-3: a guest that picks its own
        // resolution); after a refusal the console stops asking. 4: forwarded to the guest (QEMU).
        if matches!(client.resize_status, Some(s) if s != 0 && s != 4) {
            resize_refused = true;
        }
        if client.acknowledged.contains(&rfb::EXTENDED_DESKTOP_SIZE) {
            shared.screen_id.store(client.screen_id, Ordering::Relaxed);
        }
        shared
            .resizable
            .store(client.acknowledged.contains(&rfb::EXTENDED_DESKTOP_SIZE) && !resize_refused, Ordering::Relaxed);
        if client.clipboard.extended {
            shared.extended_clipboard.store(true, Ordering::Relaxed);
        }
        if client.lock_lights.is_some() {
            *lock(&shared.lock_lights) = client.lock_lights;
        }
        if client.acknowledged.contains(&rfb::QEMU_AUDIO) && client.audio_sink.is_none() {
            start_sound(&mut client, shared).map_err(io)?;
        }
        // Clipboard answers go out under the input lock, so they never interleave with a key event.
        if client.clipboard_owed() {
            let replies = client.clipboard_replies(lock(&shared.clipboard_out).as_deref());
            if let Some(s) = lock(&shared.input).as_mut() {
                for m in replies {
                    s.write_all(&m).map_err(io)?;
                }
            }
        }
        let mut f = lock(&shared.frame);
        if let Some(text) = client.cut_text.take() {
            f.cut_text = Some(text);
        }
        if f.width != client.width || f.height != client.height {
            f.width = client.width;
            f.height = client.height;
            f.pixels = client.pixels.clone();
            f.resized = true;
        } else {
            let w = client.width;
            for &(encoding, x, y, rw, rh) in &rects {
                if rw == 0
                    || rh == 0
                    || ![rfb::RAW, rfb::COPY_RECT, rfb::HEXTILE, rfb::ZLIB, rfb::ZRLE, rfb::TIGHT].contains(&encoding)
                {
                    continue;
                }
                for row in y..y + rh {
                    let at = (row * w + x) as usize;
                    f.pixels[at..at + rw as usize].copy_from_slice(&client.pixels[at..at + rw as usize]);
                }
                let d = f.dirty.get_or_insert([x, y, x + rw, y + rh]);
                *d = [d[0].min(x), d[1].min(y), d[2].max(x + rw), d[3].max(y + rh)];
            }
        }
        drop(f);
        repaint();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screenshots_are_pngs_of_the_screen() {
        let path = std::env::temp_dir().join(format!("porthole-shot-{}.png", std::process::id()));
        let rgba: Vec<u8> = (0..4 * 3 * 2).map(|i| i as u8).collect();
        write_png(&path, 3, 2, &rgba).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..info.buffer_size()], &rgba[..]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn keys_map_to_keysyms_and_scancodes() {
        assert_eq!(keymap(egui::Key::A, false), Some((u32::from(b'a'), 0x1E)));
        assert_eq!(keymap(egui::Key::A, true), Some((u32::from(b'A'), 0x1E)));
        assert_eq!(keymap(egui::Key::Num1, true), Some((u32::from(b'!'), 0x02)));
        assert_eq!(keymap(egui::Key::Delete, false), Some((0xFFFF, 0xE053)));
        assert_eq!(keymap(egui::Key::F12, false), Some((0xFFC9, 0x58)));
    }
}
