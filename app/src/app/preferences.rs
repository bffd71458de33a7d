//! The *Preferences* dialog (theme, how new consoles fit their screen, the host selected at start, whether
//! console tabs open again), and what the window remembers between runs: its size and position and the open
//! consoles. Changes apply at once and are saved in the settings file.

use crate::console::Scaling;
use crate::settings::{ConsoleScaling, SavedConsole, Theme, WindowGeometry};

use super::{PortholeApp, VncTarget};

/// The preferences dialog's and the remembered window's state.
#[derive(Default)]
pub struct Preferences {
    pub open: bool,
    /// The window geometry last seen and when it changed (saved once it has been still for a second).
    geometry: Option<(WindowGeometry, std::time::Instant)>,
    /// Consoles from the settings still to open (their hosts were not connected yet).
    pending_consoles: Vec<SavedConsole>,
    /// Whether the default host has been selected (once, when it connects).
    default_host_done: bool,
    /// The theme last given to egui (set again only when the preference changes: setting it asks for a frame).
    applied_theme: Option<Theme>,
}

pub fn scaling(s: ConsoleScaling) -> Scaling {
    match s {
        ConsoleScaling::Fit => Scaling::Fit,
        ConsoleScaling::Sharp => Scaling::Sharp,
        ConsoleScaling::Actual => Scaling::Actual,
        ConsoleScaling::Resize => Scaling::Resize,
    }
}

pub fn theme_preference(t: Theme) -> egui::ThemePreference {
    match t {
        Theme::System => egui::ThemePreference::System,
        Theme::Light => egui::ThemePreference::Light,
        Theme::Dark => egui::ThemePreference::Dark,
    }
}

impl PortholeApp {
    pub(super) fn open_preferences(&mut self) {
        self.preferences.open = true;
    }

    /// Starts what the settings ask for at start-up: the consoles to open again.
    pub(super) fn restore_from_settings(&mut self) {
        if self.settings.restore_consoles {
            self.preferences.pending_consoles = self.settings.open_consoles.clone();
        }
    }

    /// Opens none of the last run's consoles (Porthole was started for one thing: `porthole vnc://…`,
    /// `--console NAME`, an ISO to make a VM from).
    pub fn skip_restoring_consoles(&mut self) {
        self.preferences.pending_consoles.clear();
    }

    /// Each frame: the theme, the default host once it is there, consoles waiting for their hosts, and the
    /// window's geometry (saved when it changes).
    pub(super) fn apply_preferences(&mut self, ctx: &egui::Context) {
        if self.preferences.applied_theme != Some(self.settings.theme) {
            ctx.set_theme(theme_preference(self.settings.theme));
            self.preferences.applied_theme = Some(self.settings.theme);
        }
        if !self.preferences.default_host_done {
            let hosts: Vec<(String, bool)> =
                self.backend.model().hosts.iter().map(|h| (h.name.clone(), h.connected)).collect();
            match &self.settings.default_host {
                Some(name) => {
                    if let Some(i) = hosts.iter().position(|(n, _)| n == name) {
                        self.selected_host = i;
                        self.preferences.default_host_done = true;
                    }
                }
                None => self.preferences.default_host_done = true,
            }
        }
        self.open_pending_consoles();
        let geometry = ctx.input(|i| {
            let v = i.viewport();
            let (outer, inner) = (v.outer_rect?, v.inner_rect?);
            (!v.fullscreen.unwrap_or(false)).then(|| WindowGeometry {
                x: outer.min.x.round() as i32,
                y: outer.min.y.round() as i32,
                width: inner.width().round() as u32,
                height: inner.height().round() as u32,
            })
        });
        if let Some(g) = geometry.filter(|g| g.width > 0 && g.height > 0) {
            match self.preferences.geometry {
                Some((seen, _)) if seen == g => {}
                _ => self.preferences.geometry = Some((g, std::time::Instant::now())),
            }
        }
        if let Some((g, since)) = self.preferences.geometry
            && self.settings.window != Some(g)
        {
            if since.elapsed() > std::time::Duration::from_secs(1) {
                self.settings.window = Some(g);
                self.save_settings();
            } else {
                ctx.request_repaint_after(std::time::Duration::from_millis(1100));
            }
        }
    }

    /// Opens the saved consoles whose hosts have connected (VMs that are not running are skipped).
    fn open_pending_consoles(&mut self) {
        if self.preferences.pending_consoles.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.preferences.pending_consoles);
        let mut waiting = Vec::new();
        for saved in pending {
            match &saved {
                SavedConsole::Vnc { address } => match address.parse::<VncTarget>() {
                    Ok(target) => self.open_vnc(target, None),
                    Err(e) => self.backend.model().notify(format!("cannot open {address} again: {e}"), true),
                },
                SavedConsole::Vm { host, vm } => {
                    let found = {
                        let m = self.backend.model();
                        m.hosts.iter().position(|h| &h.name == host).map(|i| {
                            let h = &m.hosts[i];
                            (i, h.connected || h.error.is_some(), h.vms.iter().find(|v| &v.name == vm).cloned())
                        })
                    };
                    match found {
                        Some((i, true, Some(v))) => {
                            let running =
                                matches!(v.state, porthole_api::VmState::Running | porthole_api::VmState::Paused);
                            if running {
                                self.open_console(i, &v);
                            }
                        }
                        Some((_, false, _)) => waiting.push(saved),
                        _ => {} // the host or the VM is gone
                    }
                }
            }
        }
        self.preferences.pending_consoles = waiting;
    }

    /// Records the open consoles in the settings (when one opens or closes).
    pub(super) fn remember_consoles(&mut self) {
        let open: Vec<SavedConsole> = self
            .consoles
            .iter()
            .filter_map(|t| match (&t.vm, &t.target) {
                (Some((host, id)), _) => {
                    let m = self.backend.model();
                    let h = m.hosts.get(*host)?;
                    let vm = h.vms.iter().find(|v| &v.id == id)?;
                    Some(SavedConsole::Vm { host: h.name.clone(), vm: vm.name.clone() })
                }
                (None, Some(target)) => Some(SavedConsole::Vnc { address: target.to_string() }),
                (None, None) => None,
            })
            .collect();
        if open != self.settings.open_consoles {
            self.settings.open_consoles = open;
            self.save_settings();
        }
    }

    /// The *Preferences* dialog.
    pub(super) fn preferences_window(&mut self, ctx: &egui::Context) {
        if !self.preferences.open {
            return;
        }
        let mut open = true;
        let before = self.settings.clone();
        let hosts: Vec<String> = self.backend.model().hosts.iter().map(|h| h.name.clone()).collect();
        egui::Window::new("Preferences").open(&mut open).collapsible(false).resizable(false).show(ctx, |ui| {
            egui::Grid::new("preferences").num_columns(2).spacing([12.0, 8.0]).show(ui, |ui| {
                ui.label("Theme");
                ui.horizontal(|ui| {
                    let t = &mut self.settings.theme;
                    ui.radio_value(t, Theme::System, "As the desktop");
                    ui.radio_value(t, Theme::Light, "Light");
                    ui.radio_value(t, Theme::Dark, "Dark");
                });
                ui.end_row();
                let l = ui.label("New consoles");
                let s = &mut self.settings.console_scaling;
                let text = |s: ConsoleScaling| match s {
                    ConsoleScaling::Fit => "Fit (smooth)",
                    ConsoleScaling::Sharp => "Fit (sharp)",
                    ConsoleScaling::Actual => "1:1",
                    ConsoleScaling::Resize => "Resize guest to window",
                };
                egui::ComboBox::from_id_salt("console scaling")
                    .selected_text(text(*s))
                    .show_ui(ui, |ui| {
                        for choice in
                            [ConsoleScaling::Fit, ConsoleScaling::Sharp, ConsoleScaling::Actual, ConsoleScaling::Resize]
                        {
                            ui.selectable_value(s, choice, text(choice));
                        }
                    })
                    .response
                    .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Host at start");
                let current = self.settings.default_host.clone().unwrap_or_else(|| "Local".to_owned());
                egui::ComboBox::from_id_salt("default host")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        for (i, name) in hosts.iter().enumerate() {
                            let value = (i > 0).then(|| name.clone());
                            ui.selectable_value(&mut self.settings.default_host, value, name);
                        }
                    })
                    .response
                    .labelled_by(l.id);
                ui.end_row();
                ui.label("Consoles");
                ui.checkbox(&mut self.settings.restore_consoles, "Open the consoles again when Porthole starts");
                ui.end_row();
            });
        });
        self.preferences.open = open;
        if self.settings != before {
            self.save_settings();
        }
    }
}
