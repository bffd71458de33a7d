//! How the window looks: a VM's state as an icon, a word and a colour, and the icons of the actions (the
//! Material Symbols font of `egui_material_icons`). One action has one icon everywhere it appears.
//!
//! Icon buttons tell screen readers (and the tests, which find widgets by their accessible label) their
//! words alone: the icon's code point is not part of the label.

use egui::{Response, RichText, Ui, WidgetInfo};
use egui_material_icons::MaterialIcon;
use egui_material_icons::icons as m;
use porthole_api::VmState;

pub const START: MaterialIcon = m::ICON_PLAY_ARROW;
pub const SHUT_DOWN: MaterialIcon = m::ICON_POWER_SETTINGS_NEW;
pub const FORCE_OFF: MaterialIcon = m::ICON_POWER_OFF;
pub const RESET: MaterialIcon = m::ICON_RESTART_ALT;
pub const PAUSE: MaterialIcon = m::ICON_PAUSE;
pub const SUSPEND: MaterialIcon = m::ICON_BEDTIME;
pub const CONSOLE: MaterialIcon = m::ICON_DESKTOP_WINDOWS;
pub const INSERT: MaterialIcon = m::ICON_ALBUM;
pub const EJECT: MaterialIcon = m::ICON_EJECT;
pub const VM_SETTINGS: MaterialIcon = m::ICON_TUNE;
pub const DELETE: MaterialIcon = m::ICON_DELETE;
pub const CLONE: MaterialIcon = m::ICON_CONTENT_COPY;
pub const COPY: MaterialIcon = m::ICON_CONTENT_COPY;
pub const SNAPSHOT: MaterialIcon = m::ICON_PHOTO_CAMERA;
pub const REVERT: MaterialIcon = m::ICON_HISTORY;
pub const ADD: MaterialIcon = m::ICON_ADD;
pub const EDIT: MaterialIcon = m::ICON_EDIT;
pub const REMOVE: MaterialIcon = m::ICON_LINK_OFF;
pub const VNC: MaterialIcon = m::ICON_SCREEN_SHARE;
pub const MENU: MaterialIcon = m::ICON_MENU;
pub const UPLOAD: MaterialIcon = m::ICON_UPLOAD;
pub const CLOSE: MaterialIcon = m::ICON_CLOSE;
pub const SCREENSHOT: MaterialIcon = m::ICON_SCREENSHOT_MONITOR;
pub const KEYBOARD: MaterialIcon = m::ICON_KEYBOARD;
pub const VOLUME: MaterialIcon = m::ICON_VOLUME_UP;
pub const VOLUME_OFF: MaterialIcon = m::ICON_VOLUME_OFF;
pub const PASTE: MaterialIcon = m::ICON_CONTENT_PASTE;
pub const DETACH: MaterialIcon = m::ICON_OPEN_IN_NEW;
pub const ATTACH: MaterialIcon = m::ICON_CLOSE_FULLSCREEN;
pub const FULL_SCREEN: MaterialIcon = m::ICON_FULLSCREEN;
pub const LEAVE_FULL_SCREEN: MaterialIcon = m::ICON_FULLSCREEN_EXIT;
pub const TEMPLATE: MaterialIcon = m::ICON_INVENTORY_2;
pub const GRID: MaterialIcon = m::ICON_GRID_VIEW;
pub const LIST: MaterialIcon = m::ICON_VIEW_LIST;
pub const SEARCH: MaterialIcon = m::ICON_SEARCH;
pub const HOST: MaterialIcon = m::ICON_DNS;
pub const MACHINES: MaterialIcon = m::ICON_COMPUTER;
pub const RECONNECT: MaterialIcon = m::ICON_REFRESH;
pub const BROWSE: MaterialIcon = m::ICON_FOLDER_OPEN;
pub const ABOUT: MaterialIcon = m::ICON_INFO;
pub const PREFERENCES: MaterialIcon = m::ICON_SETTINGS;
pub const CONFIRM: MaterialIcon = m::ICON_CHECK;
pub const SEND: MaterialIcon = m::ICON_SEND;
pub const SAVE: MaterialIcon = m::ICON_SAVE;
pub const ERROR: MaterialIcon = m::ICON_ERROR;
pub const DONE: MaterialIcon = m::ICON_CHECK_CIRCLE;
pub const DOWNLOAD: MaterialIcon = m::ICON_DOWNLOAD;
/// Rate limits (a disk's, a network card's).
pub const LIMIT: MaterialIcon = m::ICON_SPEED;

/// A dialog: a window that opens in the middle of the main window, and does not fold up.
pub fn dialog<'a>(ctx: &egui::Context, title: impl Into<egui::WidgetText>) -> egui::Window<'a> {
    egui::Window::new(title)
        .collapsible(false)
        .pivot(egui::Align2::CENTER_CENTER)
        .default_pos(ctx.content_rect().center())
}

/// Adds the icon font to `ctx` (once per context; it takes effect from the next frame).
pub fn install_fonts(ctx: &egui::Context) {
    egui_material_icons::initialize(ctx);
}

/// A button with `icon` before `text`, enabled or not; its accessible label is `text`.
pub fn button(ui: &mut Ui, enabled: bool, icon: MaterialIcon, text: &str) -> Response {
    let r = ui.add_enabled(enabled, egui::Button::new((icon.rich_text(), text)));
    r.widget_info(|| WidgetInfo::labeled(egui::Role::Button, enabled, text));
    r
}

/// A small button showing only `icon`; `what` is its accessible label and its hover text.
pub fn icon_button(ui: &mut Ui, icon: MaterialIcon, what: &str) -> Response {
    let r = ui.add(egui::Button::new(icon.rich_text()).small().frame(false)).on_hover_text(what);
    r.widget_info(|| WidgetInfo::labeled(egui::Role::Button, true, what));
    r
}

/// A selectable tab or toggle with `icon` before `text`; its accessible label is `text`.
pub fn selectable(ui: &mut Ui, selected: bool, icon: MaterialIcon, text: &str) -> Response {
    let r = ui.add(egui::Button::selectable(selected, (icon.rich_text(), text)));
    r.widget_info(|| WidgetInfo::selected(egui::Role::Button, true, selected, text));
    r
}

/// A menu entry with `icon` before `text`; its accessible label is `text`.
pub fn menu_item(ui: &mut Ui, icon: MaterialIcon, text: &str) -> Response {
    button(ui, true, icon, text)
}

/// Paints `icon` in `color` without making it a widget of its own (screen readers read the words next
/// to it).
pub fn paint_icon(ui: &mut Ui, icon: MaterialIcon, color: egui::Color32) {
    let font = egui::FontId::new(ui.text_style_height(&egui::TextStyle::Body), icon.font_family());
    let galley = ui.painter().layout_no_wrap(icon.codepoint.to_owned(), font, color);
    let (rect, _) = ui.allocate_exact_size(galley.size(), egui::Sense::hover());
    ui.painter().galley(rect.min, galley, color);
}

/// The colour a state is shown in (None: the usual text colour, for stopped and passing states).
pub fn state_color(s: VmState, crashed: bool, visuals: &egui::Visuals) -> Option<egui::Color32> {
    match s {
        _ if crashed => Some(visuals.error_fg_color),
        VmState::Running => Some(if visuals.dark_mode {
            egui::Color32::from_rgb(0x5c, 0xc8, 0x6a)
        } else {
            egui::Color32::from_rgb(0x2e, 0x8b, 0x3c)
        }),
        VmState::Paused => Some(visuals.warn_fg_color),
        VmState::Suspended => Some(egui::Color32::from_rgb(0x4a, 0x8c, 0xd8)),
        VmState::Crashed => Some(visuals.error_fg_color),
        VmState::Stopped | VmState::Starting | VmState::Stopping => None,
    }
}

/// The icon of a state: a shape that tells it apart without its colour.
pub fn state_icon(s: VmState, crashed: bool) -> MaterialIcon {
    match s {
        _ if crashed => m::ICON_ERROR,
        VmState::Running => m::ICON_PLAY_CIRCLE,
        VmState::Paused => m::ICON_PAUSE_CIRCLE,
        VmState::Stopped => m::ICON_STOP_CIRCLE,
        VmState::Starting | VmState::Stopping => m::ICON_HOURGLASS_TOP,
        VmState::Crashed => m::ICON_ERROR,
        VmState::Suspended => m::ICON_BEDTIME,
    }
}

/// A VM's state as its icon and its word, in its colour.
pub fn state_label(ui: &mut Ui, vm: &porthole_api::Vm) -> Response {
    let crashed = vm.crash.is_some();
    let color = state_color(vm.state, crashed, ui.visuals()).unwrap_or_else(|| ui.visuals().weak_text_color());
    ui.horizontal(|ui| {
        ui.spacing_mut().item_spacing.x = 3.0;
        paint_icon(ui, state_icon(vm.state, crashed), color);
        let text = RichText::new(state_text(vm.state));
        match state_color(vm.state, crashed, ui.visuals()) {
            Some(c) => ui.label(text.color(c)),
            None => ui.label(text),
        }
    })
    .inner
}

pub fn state_text(s: VmState) -> &'static str {
    match s {
        VmState::Stopped => "stopped",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "shutting down",
        VmState::Crashed => "crashed",
        VmState::Suspended => "suspended",
    }
}
