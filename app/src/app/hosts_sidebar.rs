//! The hosts sidebar: the local host and the remote ones with their state, and the dialogs that add, edit
//! and remove a remote host (its address, token and certificate fingerprint).

use porthole_api::Client;

use super::PortholeApp;
use super::theme;
use crate::backend::Backend;
use crate::settings::{RemoteHost, RemoteKind};
use porthole_api::ssh::HostKeyCheck;

/// The add-host dialog's fields.
#[derive(Debug, Clone, Default)]
pub struct AddHost {
    /// The name of the host being edited (None: adding a new one).
    pub editing: Option<String>,
    pub name: String,
    pub address: String,
    pub token: String,
    pub fingerprint: String,
    /// A Porthole daemon or a libvirt connection (`address` is then the URI).
    pub kind: RemoteKind,
    /// A libvirt host over SSH: its keys as fetched, and whether the user trusts them.
    pub ssh_keys: Option<crate::ssh_keys::HostKeys>,
    pub trust_key: bool,
}

impl PortholeApp {
    pub(super) fn hosts_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Hosts");
        ui.separator();
        let hosts: Vec<(usize, String, String, String)> = {
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
                    let kind = h.connection.as_ref().map_or("", |c| c.kind().name());
                    (i, h.name.clone(), state, format!("{kind} host {}", h.address))
                })
                .collect()
        };
        for (i, name, state, about) in hosts {
            let label = format!("{name} — {state}");
            let icon = if i == 0 { theme::MACHINES } else { theme::HOST };
            if theme::selectable(ui, self.selected_host == i, icon, &label).on_hover_text(about.trim_start()).clicked()
            {
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
                    kind: r.kind,
                    ..Default::default()
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
            ui.horizontal(|ui| {
                ui.label("Kind");
                ui.selectable_value(&mut a.kind, RemoteKind::Porthole, "Porthole host");
                ui.selectable_value(&mut a.kind, RemoteKind::Libvirt, "libvirt (local or SSH)");
            });
            let name_taken = self.settings.remotes.iter().any(|r| r.name == a.name.trim())
                && a.editing.as_deref() != Some(a.name.trim())
                || a.name.trim() == "Local";
            let ok = match a.kind {
                RemoteKind::Porthole => porthole_fields(ui, &self.backend, a),
                RemoteKind::Libvirt => libvirt_fields(ui, &self.backend, a),
            };
            if name_taken {
                ui.colored_label(ui.visuals().warn_fg_color, "There is a host with this name already.");
            }
            connect =
                theme::button(ui, ok && !name_taken && !a.name.trim().is_empty(), theme::CONFIRM, "Connect").clicked();
        });
        if connect {
            let a = self.add_host.take().expect("open");
            if a.kind == RemoteKind::Libvirt
                && let Some(keys) =
                    a.ssh_keys.as_ref().filter(|k| matches!(k.check, HostKeyCheck::Unknown(_)) && a.trust_key)
                && let Err(e) = crate::ssh_keys::trust(keys)
            {
                self.backend.model().notify(format!("cannot trust the host key: {e}"), true);
                return;
            }
            let fingerprint = match a.kind {
                RemoteKind::Porthole => a.fingerprint.trim().to_owned(),
                RemoteKind::Libvirt => match a.ssh_keys.map(|k| k.check) {
                    Some(HostKeyCheck::Unknown(keys)) => {
                        keys.iter().map(|k| k.fingerprint.clone()).collect::<Vec<_>>().join(" ")
                    }
                    _ => String::new(),
                },
            };
            let remote = RemoteHost {
                name: a.name.trim().to_owned(),
                kind: a.kind,
                address: a.address.trim().to_owned(),
                token: if a.kind == RemoteKind::Porthole { a.token.trim().to_owned() } else { String::new() },
                fingerprint,
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

/// Labelled single-line fields in a grid.
fn fields(ui: &mut egui::Ui, id: &str, rows: Vec<(&str, &mut String, &str)>) {
    egui::Grid::new(id).num_columns(2).show(ui, |ui| {
        for (label, value, hint) in rows {
            let l = ui.label(label);
            ui.add(egui::TextEdit::singleline(value).hint_text(hint).desired_width(320.0)).labelled_by(l.id);
            ui.end_row();
        }
    });
}

/// A Porthole host's fields (address, token, certificate fingerprint); whether they are complete.
fn porthole_fields(ui: &mut egui::Ui, backend: &Backend, a: &mut AddHost) -> bool {
    fields(
        ui,
        "add-host",
        vec![
            ("Host name", &mut a.name, "lab"),
            ("Address", &mut a.address, "lab.example.org:7443"),
            ("Token", &mut a.token, "from portholed token create"),
            ("Certificate fingerprint", &mut a.fingerprint, "SHA-256 printed by portholed --listen"),
        ],
    );
    ui.horizontal(|ui| {
        let can = a.address.contains(':');
        if theme::button(ui, can, theme::DOWNLOAD, "Fetch fingerprint").clicked() {
            let address = a.address.trim().to_owned();
            let b = backend.clone();
            backend.runtime().spawn(async move {
                let result = porthole_api::client::fetch_fingerprint(&address).await;
                let mut m = b.model();
                match result {
                    Ok(fp) => m.fetched_fingerprint = Some(fp),
                    Err(e) => m.notify(format!("cannot reach {address}: {e}"), true),
                }
                drop(m);
                b.repaint();
            });
        }
        ui.weak("compare it with what portholed --listen printed before connecting");
    });
    if let Some(fp) = backend.model().fetched_fingerprint.take() {
        a.fingerprint = fp;
    }
    let fingerprint_ok = porthole_api::client::parse_fingerprint(&a.fingerprint).is_some();
    if !fingerprint_ok && !a.fingerprint.is_empty() {
        ui.colored_label(ui.visuals().warn_fg_color, "A fingerprint is 64 hex digits (colons allowed).");
    }
    a.address.contains(':') && !a.token.trim().is_empty() && fingerprint_ok
}

/// A libvirt host's fields (the connection URI, and for SSH the host key to accept); whether they are
/// complete.
fn libvirt_fields(ui: &mut egui::Ui, backend: &Backend, a: &mut AddHost) -> bool {
    fields(
        ui,
        "add-libvirt",
        vec![("Host name", &mut a.name, "server"), ("Connection URI", &mut a.address, "qemu+ssh://user@server/system")],
    );
    ui.horizontal(|ui| {
        ui.weak("This computer:");
        for uri in ["qemu:///system", "qemu:///session"] {
            if ui.small_button(uri).clicked() {
                a.address = uri.to_owned();
            }
        }
    });
    let uri = a.address.trim();
    if !uri.contains("://") {
        if !uri.is_empty() {
            ui.colored_label(ui.visuals().warn_fg_color, "A libvirt URI looks like qemu:///system.");
        }
        return false;
    }
    if crate::ssh_keys::ssh_target(uri).is_none() {
        // Local sockets and TLS (certificates checked by libvirt) need nothing more.
        return true;
    }
    // The keys fetched are for this URI only: a changed URI asks again.
    if a.ssh_keys.as_ref().is_some_and(|k| k.uri != uri) {
        a.ssh_keys = None;
        a.trust_key = false;
    }
    if let Some(result) = backend.model().fetched_host_keys.take() {
        match result {
            Ok(keys) if keys.uri == uri => a.ssh_keys = Some(keys),
            Ok(_) => {}
            Err(e) => backend.model().notify(e, true),
        }
    }
    if theme::button(ui, true, theme::DOWNLOAD, "Fetch host key").clicked() {
        let (b, uri) = (backend.clone(), uri.to_owned());
        backend.runtime().spawn_blocking(move || {
            b.model().fetched_host_keys = Some(crate::ssh_keys::fetch(&uri));
            b.repaint();
        });
    }
    match &a.ssh_keys {
        None => {
            ui.weak("SSH checks the server's key: fetch it to compare with the server's own before connecting.");
            false
        }
        Some(keys) => match &keys.check {
            HostKeyCheck::Trusted => {
                ui.weak(format!("{} has this host's key; SSH checks it.", keys.file.display()));
                true
            }
            HostKeyCheck::Unknown(offered) => {
                ui.label(format!("Host keys of {}:", keys.name));
                for k in offered {
                    ui.monospace(format!("{} {}", k.key_type, k.fingerprint));
                }
                ui.checkbox(
                    &mut a.trust_key,
                    "I compared these with the server's (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and trust them",
                );
                a.trust_key
            }
            HostKeyCheck::Changed(offered) => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!(
                        "The key of {} is not the one {} holds: the server was reinstalled, or someone is in \
                         between. Check with its administrator; if the new key is right, remove the old one \
                         (ssh-keygen -R '{}') and fetch again.",
                        keys.name,
                        keys.file.display(),
                        keys.name
                    ),
                );
                for k in offered {
                    ui.monospace(format!("{} {}", k.key_type, k.fingerprint));
                }
                false
            }
        },
    }
}

/// Adds remote host `r` to the backend; returns its index.
pub(super) fn connect_remote(backend: &Backend, r: &RemoteHost) -> usize {
    let (address, token, fingerprint) = (r.address.clone(), r.token.clone(), r.fingerprint.clone());
    if r.kind == RemoteKind::Libvirt {
        return backend.add_host(r.name.clone(), r.address.clone(), move || crate::libvirt_host(&address));
    }
    backend.add_host(r.name.clone(), r.address.clone(), move || {
        let client = Client::https(&address, &token, Some(&fingerprint)).map_err(|e| e.to_string())?;
        Ok(std::sync::Arc::new(client) as porthole_api::HostHandle)
    })
}
