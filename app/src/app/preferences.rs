//! The *Preferences* dialog (theme, how new consoles fit their screen, the host selected at start, whether
//! console tabs open again, the keys that release a console's keyboard, where local VMs live), and what the window remembers between runs: its size and position and the open
//! consoles. Changes apply at once and are saved in the settings file.

use crate::console::Scaling;
use crate::settings::{ConsoleScaling, ReleaseKeys, SavedConsole, Theme, WindowGeometry};

use super::{PortholeApp, VncTarget, theme};

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
    /// The *Local VMs live in* field while the dialog is open.
    vm_dir: Option<String>,
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

/// Where the local daemon keeps its VMs unless told otherwise (as `portholed` picks it).
pub fn default_vm_dir() -> Option<std::path::PathBuf> {
    directories::ProjectDirs::from("", "", "porthole").map(|p| p.data_dir().to_owned())
}

/// The *Local VMs live in* field's folder (None: the default), or why it cannot be used.
pub fn vm_dir_choice(text: &str) -> Result<Option<std::path::PathBuf>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let dir = std::path::PathBuf::from(text);
    if !dir.is_absolute() {
        return Err("Give a full path (starting with /).".into());
    }
    match std::fs::metadata(&dir) {
        Ok(m) if !m.is_dir() => Err(format!("{text} is a file, not a folder.")),
        Ok(_) => Ok(Some(dir)),
        // Created when the daemon starts, if its parent exists.
        Err(_) if dir.parent().is_some_and(|p| p.is_dir()) => Ok(Some(dir)),
        Err(e) => Err(format!("{text}: {e}")),
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
        let (hosts, local_data_dir) = {
            let m = self.backend.model();
            let hosts: Vec<String> = m.hosts.iter().map(|h| h.name.clone()).collect();
            let dir =
                m.hosts.first().and_then(|h| h.info.as_ref()).map(|i| i.data_dir.clone()).filter(|d| !d.is_empty());
            (hosts, dir)
        };
        theme::dialog(ctx, "Preferences").open(&mut open).resizable(false).show(ctx, |ui| {
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
                let l = ui.label("Release the keyboard with");
                let keys = &mut self.settings.release_keys;
                egui::ComboBox::from_id_salt("release keys")
                    .selected_text(keys.text())
                    .show_ui(ui, |ui| {
                        for choice in ReleaseKeys::ALL {
                            ui.selectable_value(keys, choice, choice.text());
                        }
                    })
                    .response
                    .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Local VMs live in");
                ui.vertical(|ui| {
                    ui.horizontal(|ui| {
                        let edit = self.preferences.vm_dir.get_or_insert_with(|| {
                            self.settings.vm_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default()
                        });
                        let hint = default_vm_dir().map(|d| d.display().to_string()).unwrap_or_default();
                        ui.add(egui::TextEdit::singleline(edit).hint_text(hint).desired_width(260.0)).labelled_by(l.id);
                        if theme::button(ui, true, theme::BROWSE, "Choose folder…").clicked()
                            && let Some(dir) = rfd::FileDialog::new().pick_folder()
                        {
                            *edit = dir.display().to_string();
                        }
                    });
                    let text = self.preferences.vm_dir.clone().unwrap_or_default();
                    match vm_dir_choice(&text) {
                        Ok(dir) => self.settings.vm_dir = dir,
                        Err(why) => {
                            ui.colored_label(ui.visuals().warn_fg_color, why);
                        }
                    }
                    // Said only of a folder the user chose (a daemon started otherwise keeps its own).
                    if let (Some(wanted), Some(now)) = (&self.settings.vm_dir, &local_data_dir)
                        && wanted.as_path() != std::path::Path::new(now)
                    {
                        ui.colored_label(
                            ui.visuals().warn_fg_color,
                            format!(
                                "The local daemon running now keeps its VMs in {now}: the new folder is used when \
                                 Porthole next starts it (after you log out, or once it is stopped)."
                            ),
                        );
                    }
                });
                ui.end_row();
            });
        });
        self.preferences.open = open;
        if !open {
            self.preferences.vm_dir = None;
        }
        if self.settings.release_keys != before.release_keys {
            for tab in &mut self.consoles {
                tab.console.release_keys = self.settings.release_keys;
            }
        }
        if self.settings != before {
            self.save_settings();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_folder_must_be_a_full_path_to_a_folder_or_a_new_one() {
        let dir = std::env::temp_dir().join(format!("porthole-vm-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(vm_dir_choice("  "), Ok(None), "empty: the default");
        assert_eq!(vm_dir_choice(&dir.display().to_string()), Ok(Some(dir.clone())));
        assert_eq!(vm_dir_choice(&dir.join("new").display().to_string()), Ok(Some(dir.join("new"))));
        assert!(vm_dir_choice("vms").unwrap_err().contains("full path"));
        assert!(vm_dir_choice(&file.display().to_string()).unwrap_err().contains("not a folder"));
        assert!(vm_dir_choice(&dir.join("no/such").display().to_string()).is_err(), "its parent must exist");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
