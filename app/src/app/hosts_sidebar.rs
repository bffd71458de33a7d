//! The hosts sidebar: the local host and the remote ones with their state, and the dialogs that add, edit
//! and remove a remote host (its address, token and certificate fingerprint).

use porthole_api::Client;

use super::PortholeApp;
use super::theme;
use crate::backend::Backend;
use crate::settings::RemoteHost;

/// The add-host dialog's fields.
#[derive(Debug, Clone, Default)]
pub struct AddHost {
    /// The name of the host being edited (None: adding a new one).
    pub editing: Option<String>,
    pub name: String,
    pub address: String,
    pub token: String,
    pub fingerprint: String,
}

impl PortholeApp {
    pub(super) fn hosts_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Hosts");
        ui.separator();
        let hosts: Vec<(usize, String, String)> = {
            let m = self.backend.model();
            m.hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.name.is_empty())
                .map(|(i, h)| {
                    let state = match (&h.error, h.connected) {
                        (Some(_), _) => "unreachable".to_owned(),
                        (None, true) => format!("{} VMs", h.vms.len()),
                        (None, false) => "connecting…".to_owned(),
                    };
                    (i, h.name.clone(), state)
                })
                .collect()
        };
        for (i, name, state) in hosts {
            let label = format!("{name} — {state}");
            let icon = if i == 0 { theme::MACHINES } else { theme::HOST };
            if theme::selectable(ui, self.selected_host == i, icon, &label).clicked() {
                self.selected_host = i;
                self.selected_vm = None;
            }
        }
        ui.separator();
        if theme::button(ui, true, theme::ADD, "Add host…").clicked() {
            self.add_host = Some(AddHost::default());
        }
        if theme::button(ui, true, theme::VNC, "Connect to VNC server…").clicked() {
            self.vnc_dialog = Some(String::new());
        }
        if self.selected_host > 0 && theme::button(ui, true, theme::EDIT, "Edit host…").clicked() {
            let name = self.backend.model().hosts.get(self.selected_host).map(|h| h.name.clone()).unwrap_or_default();
            if let Some(r) = self.settings.remotes.iter().find(|r| r.name == name) {
                self.add_host = Some(AddHost {
                    editing: Some(r.name.clone()),
                    name: r.name.clone(),
                    address: r.address.clone(),
                    token: r.token.clone(),
                    fingerprint: r.fingerprint.clone(),
                });
            }
        }
        if self.selected_host > 0 && theme::button(ui, true, theme::REMOVE, "Remove host").clicked() {
            let name = self.backend.model().hosts.get(self.selected_host).map(|h| h.name.clone()).unwrap_or_default();
            self.settings.remotes.retain(|r| r.name != name);
            self.save_settings();
            self.backend.remove_host(self.selected_host);
            self.selected_host = 0;
        }
    }

    pub(super) fn add_host_window(&mut self, ctx: &egui::Context) {
        let Some(a) = self.add_host.as_mut() else { return };
        let mut open = true;
        let mut connect = false;
        let title = if a.editing.is_some() { "Edit host" } else { "Add a host" };
        theme::dialog(ctx, title).open(&mut open).show(ctx, |ui| {
            egui::Grid::new("add-host").num_columns(2).show(ui, |ui| {
                for (label, value, hint) in [
                    ("Host name", &mut a.name, "lab"),
                    ("Address", &mut a.address, "lab.example.org:7443"),
                    ("Token", &mut a.token, "from portholed token create"),
                    ("Certificate fingerprint", &mut a.fingerprint, "SHA-256 printed by portholed --listen"),
                ] {
                    let l = ui.label(label);
                    ui.add(egui::TextEdit::singleline(value).hint_text(hint)).labelled_by(l.id);
                    ui.end_row();
                }
            });
            ui.horizontal(|ui| {
                let can = a.address.contains(':');
                if theme::button(ui, can, theme::DOWNLOAD, "Fetch fingerprint").clicked() {
                    let address = a.address.trim().to_owned();
                    let backend = self.backend.clone();
                    self.backend.runtime().spawn(async move {
                        let result = porthole_api::client::fetch_fingerprint(&address).await;
                        let mut m = backend.model();
                        match result {
                            Ok(fp) => m.fetched_fingerprint = Some(fp),
                            Err(e) => m.notify(format!("cannot reach {address}: {e}"), true),
                        }
                        drop(m);
                        backend.repaint();
                    });
                }
                ui.weak("compare it with what portholed --listen printed before connecting");
            });
            if let Some(fp) = self.backend.model().fetched_fingerprint.take() {
                a.fingerprint = fp;
            }
            let fingerprint_ok = porthole_api::client::parse_fingerprint(&a.fingerprint).is_some();
            let name_taken = self.settings.remotes.iter().any(|r| r.name == a.name.trim())
                && a.editing.as_deref() != Some(a.name.trim())
                || a.name.trim() == "Local";
            if name_taken {
                ui.colored_label(ui.visuals().warn_fg_color, "There is a host with this name already.");
            }
            let ok = !a.name.trim().is_empty()
                && !name_taken
                && a.address.contains(':')
                && !a.token.trim().is_empty()
                && fingerprint_ok;
            if !fingerprint_ok && !a.fingerprint.is_empty() {
                ui.colored_label(ui.visuals().warn_fg_color, "A fingerprint is 64 hex digits (colons allowed).");
            }
            connect = theme::button(ui, ok, theme::CONFIRM, "Connect").clicked();
        });
        if connect {
            let a = self.add_host.take().expect("open");
            let remote = RemoteHost {
                name: a.name.trim().to_owned(),
                address: a.address.trim().to_owned(),
                token: a.token.trim().to_owned(),
                fingerprint: a.fingerprint.trim().to_owned(),
            };
            if let Some(old) = &a.editing {
                // Editing: the old connection goes, the new one comes in its place in the settings.
                let index = self.backend.model().hosts.iter().skip(1).position(|h| h.name == *old).map(|i| i + 1);
                if let Some(i) = index {
                    self.backend.remove_host(i);
                }
                match self.settings.remotes.iter_mut().find(|r| r.name == *old) {
                    Some(r) => *r = remote.clone(),
                    None => self.settings.remotes.push(remote.clone()),
                }
                self.selected_host = connect_remote(&self.backend, &remote);
                self.selected_vm = None;
            } else {
                connect_remote(&self.backend, &remote);
                self.settings.remotes.push(remote);
            }
            self.save_settings();
        } else if !open {
            self.add_host = None;
        }
    }
}

/// Adds remote host `r` to the backend; returns its index.
pub(super) fn connect_remote(backend: &Backend, r: &RemoteHost) -> usize {
    let (address, token, fingerprint) = (r.address.clone(), r.token.clone(), r.fingerprint.clone());
    backend.add_host(r.name.clone(), r.address.clone(), move || {
        Client::https(&address, &token, Some(&fingerprint)).map_err(|e| e.to_string())
    })
}
