//! A VM's details: its state and resources, lifecycle buttons, CD/DVD, tags, the network, snapshot,
//! performance and serial console sections, and the delete confirmation. Its *Settings…* view replaces it
//! while open (see `vm_settings.rs`).

use std::path::PathBuf;

use porthole_api::client::Action;
use porthole_api::{AgentMode, Feature, InputMode, VgaMode, VmState};

use super::graphs::performance;
use super::theme;
use super::{PortholeApp, clones, parse_tags, tag_problem};
use theme::state_label;

impl PortholeApp {
    pub(super) fn details(&mut self, ui: &mut egui::Ui, host: usize, vm: &porthole_api::Vm) {
        if self.settings_open(host, &vm.id) {
            return self.settings_view(ui, host, vm);
        }
        ui.horizontal(|ui| {
            ui.heading(&vm.name);
            if vm.template {
                ui.label(egui::RichText::new("template").strong()).on_hover_text(clones::TEMPLATE_START);
            }
        });
        let linked = {
            let m = self.backend.model();
            let vms = m.hosts.get(host).map(|h| h.vms.as_slice()).unwrap_or_default();
            clones::linked_text(vm, vms)
        };
        egui::Grid::new("details").num_columns(2).show(ui, |ui| {
            ui.label("State");
            state_label(ui, vm);
            ui.end_row();
            ui.label("vCPUs");
            ui.label(vm.vcpus.to_string());
            ui.end_row();
            ui.label("Memory");
            ui.label(format!("{} MiB", vm.memory_mib));
            ui.end_row();
            ui.label("Pointer");
            let (text, more) = pointer_text(vm, self.backend.model().details.as_ref());
            ui.label(text).on_hover_text(more);
            ui.end_row();
            ui.label("Display");
            let (text, more) = display_text(vm, self.backend.model().details.as_ref());
            ui.label(text).on_hover_text(more);
            ui.end_row();
            ui.label("Clipboard");
            let (text, more) = clipboard_text(vm, self.backend.model().details.as_ref());
            ui.label(text).on_hover_text(more);
            ui.end_row();
            ui.label("Sound");
            let (text, more) = sound_text(vm.sound);
            ui.label(text).on_hover_text(more);
            ui.end_row();
            ui.label("Keyboard");
            let (text, more) = keyboard_text(vm, self.backend.model().details.as_ref());
            let leds = self
                .backend
                .model()
                .details
                .as_ref()
                .filter(|(h, id, _)| *h == host && *id == vm.id && vm_running(vm))
                .and_then(|(_, _, d)| d.keyboard_leds);
            match leds {
                Some(l) => ui.label(format!("{text} (lock lights: {})", l.text())).on_hover_text(more),
                None => ui.label(text).on_hover_text(more),
            };
            ui.end_row();
            ui.label("Disk");
            ui.label(clones::disk_text(vm));
            ui.end_row();
            if let Some(text) = &linked {
                ui.label("Linked clone");
                ui.label(text)
                    .on_hover_text("Its disk records its own changes over that VM's disk, which stays read-only");
                ui.end_row();
            }
            if let Some(c) = &vm.cloud_init {
                ui.label("Cloud-init");
                ui.label(format!("user {}, hostname {}", c.user, c.hostname));
                ui.end_row();
            }
            ui.label("Boots");
            ui.label(vm.boot.as_ref().map(|b| b.kernel.clone()).unwrap_or_else(|| {
                let order: Vec<&str> = vm
                    .boot_order
                    .iter()
                    .map(|d| match d {
                        porthole_api::BootDevice::Cdrom => "CD/DVD",
                        porthole_api::BootDevice::Disk => "disk",
                    })
                    .collect();
                format!("firmware (SeaBIOS): {}", order.join(", then "))
            }));
            ui.end_row();
            ui.label("CD/DVD");
            ui.label(vm.media.clone().unwrap_or_else(|| "empty".into()));
            ui.end_row();
            self.ssh_row(ui, host, vm);
            let l = ui.label("Tags");
            ui.horizontal(|ui| {
                let current = vm.tags.join(", ");
                let edit = match &mut self.tags_edit {
                    Some((h, v, text)) if *h == host && *v == vm.id => text,
                    other => &mut other.insert((host, vm.id.clone(), current.clone())).2,
                };
                ui.add(egui::TextEdit::singleline(edit).hint_text("web, prod").desired_width(160.0)).labelled_by(l.id);
                let tags = parse_tags(edit);
                let problem = tags.iter().find_map(|t| tag_problem(t));
                if *edit != current && theme::button(ui, problem.is_none(), theme::SAVE, "Save tags").clicked() {
                    let id = vm.id.clone();
                    let change = porthole_api::UpdateVm { tags: Some(tags), ..Default::default() };
                    self.backend.act(host, format!("Tag {}", vm.name), None, move |c| async move {
                        c.update_vm(&id, &change).await
                    });
                }
                if let Some(p) = problem {
                    ui.colored_label(ui.visuals().warn_fg_color, p);
                }
            });
            ui.end_row();
        });
        if let Some(crash) = &vm.crash {
            // The crashed VM is kept (its console still shows the last screen) until it is forced off.
            ui.colored_label(ui.visuals().error_fg_color, format!("Crashed: {}", crash.reason));
        } else if let Some(exit) = &vm.last_exit {
            ui.label(format!("Last stop: {}", exit.reason));
        }
        // A running VM's details (what its firmware says, its network cards' state), refreshed every 2 s while
        // they are open.
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            if self.details_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(2)) {
                self.backend.load_details(host, vm.id.clone());
                self.details_fetched = Some(std::time::Instant::now());
            }
            ui.ctx().request_repaint_after(std::time::Duration::from_secs(2));
        }
        if vm.boot.is_none() && matches!(vm.state, VmState::Running | VmState::Paused) {
            let status = match &self.backend.model().boot_status {
                Some((h, id, text)) if *h == host && *id == vm.id => Some(text.clone()),
                _ => None,
            };
            if let Some(text) = status {
                ui.label(format!("Firmware: {text}"));
            }
        }
        let id = vm.id.clone();
        let running = matches!(vm.state, VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting)
            || vm.crash.is_some();
        ui.horizontal_wrapped(|ui| {
            let act = |app: &Self, what: &str, action: Action| {
                let id = id.clone();
                app.backend.act(host, format!("{what} {}", vm.name), None, move |c| async move {
                    c.action(&id, action).await
                });
            };
            let (start, what) =
                if vm.state == VmState::Suspended { ("Resume from disk", "Resume") } else { ("Start", "Start") };
            let r = theme::button(ui, !running && !vm.template, theme::START, start);
            let r = if vm.template { r.on_disabled_hover_text(clones::TEMPLATE_START) } else { r };
            if r.clicked() {
                act(self, what, Action::Start);
            }
            if theme::button(ui, running, theme::SHUT_DOWN, "Shut down").clicked() {
                let id = id.clone();
                self.backend.act(host, format!("Shut down {}", vm.name), None, move |c| async move {
                    c.shutdown(&id, 60).await
                });
            }
            if theme::button(ui, running, theme::FORCE_OFF, "Force off").clicked() {
                act(self, "Force off", Action::Poweroff);
            }
            if theme::button(ui, running, theme::RESET, "Reset").clicked() {
                act(self, "Reset", Action::Reset);
            }
            if vm.state == VmState::Paused {
                if theme::button(ui, true, theme::START, "Resume").clicked() {
                    act(self, "Resume", Action::Resume);
                }
            } else if theme::button(ui, vm.state == VmState::Running, theme::PAUSE, "Pause").clicked() {
                act(self, "Pause", Action::Pause);
            }
            let live = matches!(vm.state, VmState::Running | VmState::Paused) && vm.crash.is_none();
            let lacks = self.lacks(host, Feature::Suspend);
            if theme::button(ui, live && lacks.is_none(), theme::SUSPEND, "Suspend")
                .on_hover_text("Save the running VM to disk and end it: Start resumes it where it was")
                .on_disabled_hover_text(lacks.unwrap_or_default())
                .clicked()
            {
                act(self, "Suspend", Action::Suspend);
            }
            let lacks = self.lacks(host, Feature::Console);
            if theme::button(ui, running && lacks.is_none(), theme::CONSOLE, "Open console")
                .on_disabled_hover_text(lacks.unwrap_or_default())
                .clicked()
            {
                self.open_console(host, vm);
            }
            if theme::button(ui, true, theme::INSERT, "Insert ISO…").clicked()
                && let Some(path) = rfd::FileDialog::new().add_filter("Disc images", &["iso", "img"]).pick_file()
            {
                self.attach(host, &id, path);
            }
            if theme::button(ui, vm.media.is_some(), theme::EJECT, "Eject").clicked() {
                let id = id.clone();
                self.backend.act(host, format!("Eject from {}", vm.name), None, move |c| async move {
                    c.change_media(&id, None).await
                });
            }
            let lacks = self.lacks(host, Feature::Settings);
            if theme::button(ui, lacks.is_none(), theme::VM_SETTINGS, "Settings…")
                .on_hover_text("Name, hardware, disks, CD/DVD, boot, network")
                .on_disabled_hover_text(lacks.unwrap_or_default())
                .clicked()
            {
                self.open_settings(host, vm);
            }
            if theme::button(ui, !running, theme::DELETE, "Delete…").clicked() {
                self.confirm_delete = Some((host, id.clone(), vm.name.clone()));
            }
            self.clone_buttons(ui, host, vm);
        });
        self.network_section(ui, host, vm);
        self.snapshots_section(ui, host, vm);
        egui::CollapsingHeader::new("Performance").default_open(false).show(ui, |ui| {
            if self.stats_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1)) {
                self.backend.load_stats(host, id.clone());
                self.stats_fetched = Some(std::time::Instant::now());
                ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
            }
            let samples = match &self.backend.model().stats {
                Some((h, v, s)) if *h == host && *v == id => s.clone(),
                _ => Vec::new(),
            };
            let caps = super::graphs::Caps::of(vm);
            performance(ui, "vm", "No samples yet (the VM is not running, or it just started).", &samples, caps);
        });
        egui::CollapsingHeader::new("Serial console").default_open(false).show(ui, |ui| {
            if let Some(why) = self.lacks(host, Feature::Serial) {
                ui.weak(format!("Not available on this host: {why}"));
                return;
            }
            // While open, the output is fetched once a second.
            if running && self.serial_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1)) {
                self.backend.load_serial(host, id.clone());
                self.serial_fetched = Some(std::time::Instant::now());
                ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
            }
            let lines = match &self.backend.model().serial {
                Some((h, v, lines)) if *h == host && *v == id => lines.clone(),
                _ => Vec::new(),
            };
            egui::ScrollArea::vertical().id_salt("serial").max_height(200.0).stick_to_bottom(true).show(ui, |ui| {
                for l in lines {
                    ui.monospace(l);
                }
            });
            ui.horizontal(|ui| {
                let l = ui.label("Type into the serial console");
                let r = ui.add_enabled(
                    vm.state == VmState::Running,
                    egui::TextEdit::singleline(&mut self.serial_line).hint_text("a line, sent with Enter"),
                );
                let r = r.labelled_by(l.id);
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if (theme::button(ui, vm.state == VmState::Running, theme::SEND, "Send line").clicked() || enter)
                    && vm.state == VmState::Running
                {
                    let text = format!("{}\r", std::mem::take(&mut self.serial_line));
                    let (id, backend) = (id.clone(), self.backend.clone());
                    self.backend.act(host, format!("Type into {}", vm.name), None, move |c| async move {
                        c.serial_input(&id, &text).await?;
                        // The guest echoes after a moment: fetch the output again.
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        backend.load_serial(host, id);
                        Ok(())
                    });
                    r.request_focus();
                }
            });
        });
    }

    /// Uploads an ISO to the host's library (if it is not there yet) and puts it in the VM's drive.
    pub(super) fn attach(&self, host: usize, id: &str, path: PathBuf) {
        let id = id.to_owned();
        let backend = self.backend.clone();
        self.backend.upload_then(host, path, move |c, name| async move {
            c.change_media(&id, Some(&name)).await?;
            backend.model().notify(format!("{name} is in the drive"), false);
            Ok(())
        });
    }

    pub(super) fn delete_window(&mut self, ctx: &egui::Context) {
        let Some((host, id, name)) = self.confirm_delete.clone() else { return };
        let mut answer = None;
        theme::dialog(ctx, "Delete virtual machine").show(ctx, |ui| {
            ui.label(format!("Delete {name} and its disk? This cannot be undone."));
            ui.horizontal(|ui| {
                if theme::button(ui, true, theme::DELETE, "Delete VM and disk").clicked() {
                    answer = Some(true);
                }
                if theme::button(ui, true, theme::CLOSE, "Keep it").clicked() {
                    answer = Some(false);
                }
            });
        });
        match answer {
            Some(true) => {
                self.confirm_delete = None;
                self.selected_vm = None;
                self.backend.act(
                    host,
                    format!("Delete {name}"),
                    Some(format!("Deleted {name}")),
                    move |c| async move { c.delete_vm(&id).await },
                );
            }
            Some(false) => self.confirm_delete = None,
            None => {}
        }
    }
}

/// How the console's pointer reaches the guest, in a few words and then in full: the tablet (absolute)
/// once its driver is up, else the PS/2 mouse; `details` is the running VM's `GET /vms/{id}` (host, id,
/// VM), which says which.
fn pointer_text(
    vm: &porthole_api::Vm,
    details: Option<&(usize, String, porthole_api::Vm)>,
) -> (&'static str, &'static str) {
    let live = details.filter(|(_, id, _)| *id == vm.id).and_then(|(_, _, d)| d.absolute_pointer);
    match (vm.input, vm_running(vm), live) {
        (InputMode::Ps2, _, _) => {
            ("PS/2 mouse", "A relative pointer: the guest moves its cursor by the steps it is sent")
        }
        (InputMode::Virtio, true, Some(true)) => ("tablet (absolute)", "The guest's cursor sits under the console's"),
        (InputMode::Virtio, true, Some(false)) => {
            ("PS/2 mouse for now", "The guest has not loaded its tablet driver (virtio_input) yet")
        }
        (InputMode::Virtio, _, _) => {
            ("tablet", "Absolute once the guest's driver (virtio_input) is up; the PS/2 mouse before")
        }
    }
}

/// The display adapter in a few words and then in full: with virtio, whether the guest's driver is up
/// (the screen follows the console window) — as `pointer_text`.
fn display_text(
    vm: &porthole_api::Vm,
    details: Option<&(usize, String, porthole_api::Vm)>,
) -> (&'static str, &'static str) {
    let live = details.filter(|(_, id, _)| *id == vm.id).and_then(|(_, _, d)| d.display_follows);
    match (vm.vga, vm_running(vm), live) {
        (VgaMode::Std, _, _) => ("standard VGA", "The guest picks its resolution"),
        (VgaMode::Virtio, true, Some(true)) => {
            ("virtio, follows the window", "The guest's virtio-gpu driver takes the console's size")
        }
        (VgaMode::Virtio, true, Some(false)) => {
            ("virtio (VGA for now)", "The guest has not loaded its virtio-gpu driver yet: the VGA shows")
        }
        (VgaMode::Virtio, _, _) => {
            ("virtio", "VGA for firmware and boot loaders, then virtio-gpu, which follows the console's size")
        }
    }
}

/// Whether the clipboard is shared with the guest, in a few words and then in full: with an agent port,
/// whether the guest's agent is connected — as `pointer_text`.
fn clipboard_text(
    vm: &porthole_api::Vm,
    details: Option<&(usize, String, porthole_api::Vm)>,
) -> (&'static str, &'static str) {
    let live = details.filter(|(_, id, _)| *id == vm.id).and_then(|(_, _, d)| d.agent_connected);
    match (vm.agent, vm_running(vm), live) {
        (AgentMode::None, _, _) => (
            "not shared",
            "No agent port (Settings: Clipboard): copy and paste cross only with VNC servers that have a clipboard",
        ),
        (AgentMode::Spice, true, Some(true)) => {
            ("shared", "The guest's agent (spice-vdagent) is connected: copy and paste cross both ways")
        }
        (AgentMode::Spice, true, Some(false)) => (
            "waiting for the guest's agent",
            "The guest has not started spice-vdagent (Debian, Fedora, Ubuntu: the spice-vdagent package)",
        ),
        (AgentMode::Spice, _, _) => ("with the guest's agent", "Shared once the guest runs spice-vdagent"),
    }
}

/// The sound card, in a few words and then in full.
fn sound_text(sound: porthole_api::SoundMode) -> (&'static str, &'static str) {
    match sound {
        porthole_api::SoundMode::None => ("none", "No sound card (Settings: Sound)"),
        porthole_api::SoundMode::Hda => {
            ("HD Audio", "Intel HD Audio: the guest's sound plays in the console (Mute and Volume in its toolbar)")
        }
        porthole_api::SoundMode::Virtio => (
            "virtio",
            "virtio-sound (Linux 6.2 and newer): the guest's sound plays in the console (Mute and Volume in its toolbar)",
        ),
    }
}

/// Which keyboard the console's keys reach, in a few words and then in full: the virtio keyboard once its
/// driver is up, else the PS/2 keyboard (as `pointer_text`).
fn keyboard_text(
    vm: &porthole_api::Vm,
    details: Option<&(usize, String, porthole_api::Vm)>,
) -> (&'static str, &'static str) {
    let live = details.filter(|(_, id, _)| *id == vm.id).and_then(|(_, _, d)| d.virtio_keyboard);
    match (vm.input, vm_running(vm), live) {
        (InputMode::Ps2, _, _) => ("PS/2", "The PS/2 keyboard"),
        (InputMode::Virtio, true, Some(true)) => ("virtio", "Keys go to the guest's virtio keyboard"),
        (InputMode::Virtio, true, Some(false)) => {
            ("PS/2 for now", "The guest has not loaded its virtio keyboard driver (virtio_input) yet")
        }
        (InputMode::Virtio, _, _) => ("virtio", "Once the guest's driver (virtio_input) is up; PS/2 before"),
    }
}

fn vm_running(vm: &porthole_api::Vm) -> bool {
    matches!(vm.state, VmState::Running | VmState::Paused)
}
