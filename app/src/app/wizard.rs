//! The *New virtual machine* wizard: its fields and their checks, the window, and the requests it sends
//! (a new VM, with its ISO uploaded first; the one-click demo VM).

use std::path::PathBuf;

use porthole_api::client::Action;
use porthole_api::{BootSpec, CreateVm, DiskFormat};

use super::theme;
use super::{CloudForm, PortholeApp, WizardNetwork, WizardOs, cloud_image, network, osinfo};
use crate::backend::image_name;

/// The create wizard's fields.
#[derive(Debug, Clone)]
pub struct Wizard {
    pub host: usize,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub iso: String,
    /// The disk: a new empty one (`disk_gib`, 0 for none) or a copy of this library image.
    pub disk_image: Option<String>,
    /// Comma-separated tags.
    pub tags: String,
    pub network: WizardNetwork,
    /// The host's bridge, for `WizardNetwork::Bridge`.
    pub bridge: String,
    /// The format of the new disk (or of the copy).
    pub disk_format: DiskFormat,
    /// *From a cloud image*: the seed's fields (`disk_image` names the image). None: another kind of disk.
    pub cloud: Option<CloudForm>,
    /// The seed's defaults, read when the wizard opened (the local user, the first key of `~/.ssh`).
    pub cloud_defaults: CloudForm,
    /// The OS on the ISO, as the host's osinfo-db identifies it.
    pub os: WizardOs,
}

/// Why the daemon would refuse `name` for a new VM on a host whose VMs are named `taken`.
pub fn vm_name_problem(name: &str, taken: &[String]) -> Option<String> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if name.is_empty() {
        Some("Give the VM a name.".to_owned())
    } else if !ok {
        Some("A name is 1-63 letters, digits, '-', '_' or '.', not starting with '.'.".to_owned())
    } else if taken.iter().any(|t| t == name) {
        Some(format!("There is a VM named {name:?} already."))
    } else {
        None
    }
}

/// Tags typed as "web, prod" → ["web", "prod"].
pub fn parse_tags(text: &str) -> Vec<String> {
    text.split([',', ' ']).map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// Why a tag would be refused by the daemon.
pub(super) fn tag_problem(tag: &str) -> Option<String> {
    let ok = tag.len() <= porthole_api::MAX_TAG_LEN && tag.chars().all(|c| c.is_alphanumeric() || "-_.:".contains(c));
    (!ok)
        .then(|| format!("Tag {tag:?}: use up to {} letters, digits, '-', '_', '.' or ':'.", porthole_api::MAX_TAG_LEN))
}

impl Wizard {
    pub(super) fn new(host: usize) -> Self {
        Wizard {
            host,
            name: String::new(),
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: porthole_api::DEFAULT_DISK_GIB,
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
            iso: String::new(),
            disk_image: None,
            tags: String::new(),
            network: WizardNetwork::Nat,
            bridge: String::new(),
            disk_format: DiskFormat::Qcow2,
            cloud: None,
            cloud_defaults: CloudForm::discover(std::env::var_os("HOME").map(PathBuf::from).as_deref()),
            os: WizardOs::default(),
        }
    }

    /// The request the wizard sends (the ISO, if any, is added once uploaded).
    pub fn request(&self) -> CreateVm {
        let has_disk = self.disk_image.is_some() || self.disk_gib > 0;
        let mut request = CreateVm {
            disk_gib: self.disk_gib,
            disk_image: self.disk_image.clone(),
            tags: parse_tags(&self.tags),
            nics: network::wizard_nics(self),
            disk_format: has_disk.then_some(self.disk_format),
            ..CreateVm::new(self.name.clone(), self.vcpus, self.memory_mib)
        };
        if let Some(spec) = self.cloud_init() {
            // The disk is a qcow2 overlay on the image.
            request.cloud_init = Some(spec);
            request.disk_format = Some(DiskFormat::Qcow2);
        }
        if !self.kernel.trim().is_empty() {
            request.boot = Some(BootSpec {
                kernel: self.kernel.trim().to_owned(),
                initrd: Some(self.initrd.trim().to_owned()).filter(|s| !s.is_empty()),
                cmdline: self.cmdline.clone(),
            });
        }
        request
    }

    /// What is wrong with the fields (shown next to them, before Create is allowed).
    pub fn problems(&self, host_memory_mib: Option<u64>, taken: &[String]) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(vm_name_problem(&self.name, taken));
        if let Some(host) = host_memory_mib
            && self.memory_mib > host
        {
            p.push(format!("The host has only {host} MiB of memory."));
        }
        if self.memory_mib < 4 {
            p.push("A VM needs at least 4 MiB of memory.".to_owned());
        }
        if self.kernel.trim().is_empty() && self.iso.trim().is_empty() && self.disk_image.is_none() {
            p.push(
                "Choose what the VM boots: an ISO, a disk image (a copy, or a cloud image), or a Linux kernel (or PVH \
                 image)."
                    .to_owned(),
            );
        }
        if !self.kernel.trim().is_empty() && !std::path::Path::new(self.kernel.trim()).is_file() {
            p.push(format!("No kernel file at {}.", self.kernel.trim()));
        }
        if !self.iso.trim().is_empty() && !std::path::Path::new(self.iso.trim()).is_file() {
            p.push(format!("No ISO file at {}.", self.iso.trim()));
        }
        if self.disk_image.as_deref() == Some("") && self.cloud.is_none() {
            p.push("Choose the library image to copy as the disk.".to_owned());
        }
        let tags = parse_tags(&self.tags);
        p.extend(tags.iter().filter_map(|t| tag_problem(t)));
        if tags.len() > porthole_api::MAX_TAGS {
            p.push(format!("At most {} tags.", porthole_api::MAX_TAGS));
        }
        if self.network == WizardNetwork::Bridge && self.bridge.trim().is_empty() {
            p.push("Name the host's bridge to attach the VM to (like br0).".to_owned());
        }
        p
    }
}

impl PortholeApp {
    /// Opens the create wizard for the selected host (*New VM…*, Ctrl+N).
    pub fn open_wizard(&mut self) {
        self.wizard = Some(Wizard::new(self.selected_host));
        self.backend.load_images(self.selected_host);
    }

    /// Opens the create wizard for the selected host with `iso` as the boot media (a dropped ISO, or
    /// `porthole FILE.iso` from the desktop's "Open with").
    pub fn new_vm_from_iso(&mut self, iso: &std::path::Path) {
        let mut w = Wizard::new(self.selected_host);
        self.backend.load_images(self.selected_host);
        w.name = image_name(iso).trim_end_matches(".iso").to_owned();
        w.iso = iso.display().to_string();
        self.wizard = Some(w);
    }

    pub(super) fn wizard_window(&mut self, ctx: &egui::Context) {
        let Some(w) = self.wizard.as_mut() else { return };
        let (host_mem, free_disk, taken, images) = {
            let m = self.backend.model();
            let h = m.hosts.get(w.host);
            (
                h.and_then(|h| h.info.as_ref().map(|i| i.memory_mib)),
                h.and_then(|h| h.info.as_ref().map(|i| i.free_disk_bytes)),
                h.map(|h| h.vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>()).unwrap_or_default(),
                m.images.get(&w.host).cloned().unwrap_or_default(),
            )
        };
        osinfo::update(w, &self.backend, &images, host_mem);
        let (no_images, no_network) = {
            let connection = self.backend.model().hosts.get(w.host).and_then(|h| h.connection.clone());
            let lacks = |f| connection.as_ref().and_then(|c| c.lacks(f));
            (lacks(porthole_api::Feature::DiskImages), lacks(porthole_api::Feature::Networking))
        };
        if no_images.is_some() {
            w.disk_image = None;
            w.cloud = None;
        }
        let mut open = true;
        let mut create = false;
        let mut cancel = false;
        // In a small main window (the wizard is about 700 points tall with every row) it scrolls; otherwise it
        // grows with its rows (a scrolling window keeps the size it opened with).
        let small = ctx.content_rect().height() < 760.0;
        let window = egui::Window::new("New virtual machine").collapsible(false).open(&mut open).vscroll(small);
        window.show(ctx, |ui| {
            egui::Grid::new("wizard").num_columns(2).show(ui, |ui| {
                let l = ui.label("Name");
                ui.text_edit_singleline(&mut w.name).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("vCPUs");
                ui.add(egui::DragValue::new(&mut w.vcpus).range(1..=64)).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Memory (MiB)");
                let max = host_mem.unwrap_or(1 << 20);
                ui.horizontal(|ui| {
                    ui.add(egui::DragValue::new(&mut w.memory_mib).range(4..=max).speed(16)).labelled_by(l.id);
                    if let Some(m) = host_mem {
                        ui.weak(format!("of {m} MiB on this host"));
                    }
                });
                ui.end_row();
                let l = ui.label("Disk");
                ui.horizontal(|ui| {
                    let text = match &w.disk_image {
                        None if w.disk_gib == 0 => "no disk".to_owned(),
                        None => "new empty disk".to_owned(),
                        Some(_) if w.cloud.is_some() => "from a cloud image".to_owned(),
                        Some(_) => "copy of a library image".to_owned(),
                    };
                    egui::ComboBox::from_id_salt("disk-kind")
                        .selected_text(text)
                        .show_ui(ui, |ui| {
                            if ui.selectable_label(w.disk_image.is_none() && w.disk_gib > 0, "new empty disk").clicked()
                            {
                                w.disk_image = None;
                                w.cloud = None;
                                w.disk_gib = w.disk_gib.max(1);
                            }
                            if ui.selectable_label(w.disk_image.is_none() && w.disk_gib == 0, "no disk").clicked() {
                                w.disk_image = None;
                                w.cloud = None;
                                w.disk_gib = 0;
                            }
                            let copy = w.disk_image.is_some() && w.cloud.is_none();
                            let why = no_images.clone().unwrap_or_default();
                            let r = ui.add_enabled(
                                no_images.is_none(),
                                egui::Button::selectable(copy, "copy of a library image"),
                            );
                            if r.on_disabled_hover_text(&why).clicked() {
                                w.disk_image.get_or_insert_default();
                                w.cloud = None;
                            }
                            let r = ui.add_enabled(
                                no_images.is_none(),
                                egui::Button::selectable(w.cloud.is_some(), "from a cloud image"),
                            );
                            if r.on_disabled_hover_text(&why).clicked() && w.cloud.is_none() {
                                w.cloud = Some(w.cloud_defaults.clone());
                                // Only qcow2 and raw images are offered: an ISO picked before goes.
                                let keep = w.disk_image.as_ref().is_some_and(|n| {
                                    images.iter().any(|i| i.name == *n && cloud_image::is_disk_image(i))
                                });
                                if !keep {
                                    w.disk_image = Some(String::new());
                                }
                                w.disk_gib = w.disk_gib.max(1);
                            }
                        })
                        .response
                        .labelled_by(l.id);
                    match &w.disk_image {
                        None if w.disk_gib > 0 => {
                            let l = ui.label("Size (GiB)");
                            ui.add(egui::DragValue::new(&mut w.disk_gib).range(1..=65536)).labelled_by(l.id);
                            if let Some(free) = free_disk {
                                ui.weak(format!("{} GiB free", free >> 30))
                                    .on_hover_text("on this host (the file grows as it is written)");
                            }
                        }
                        None => {}
                        Some(_) => {
                            cloud_image::image_picker(ui, w, &images);
                            if w.cloud.is_some() {
                                let l = ui.label("Size (GiB)");
                                ui.add(egui::DragValue::new(&mut w.disk_gib).range(1..=65536)).labelled_by(l.id);
                            }
                        }
                    }
                });
                ui.end_row();
                if w.cloud.is_some() {
                    ui.label("Disk format");
                    ui.label("qcow2: an overlay on the image, which stays unchanged");
                    ui.end_row();
                } else if w.disk_image.is_some() || w.disk_gib > 0 {
                    let l = ui.label("Disk format");
                    ui.horizontal(|ui| {
                        let text = |f: DiskFormat| match f {
                            DiskFormat::Qcow2 => "qcow2",
                            DiskFormat::Raw => "raw",
                        };
                        egui::ComboBox::from_id_salt("disk-format")
                            .selected_text(text(w.disk_format))
                            .show_ui(ui, |ui| {
                                for f in [DiskFormat::Qcow2, DiskFormat::Raw] {
                                    ui.selectable_value(&mut w.disk_format, f, text(f));
                                }
                            })
                            .response
                            .labelled_by(l.id);
                        ui.weak(match w.disk_format {
                            DiskFormat::Qcow2 => "grows as written; snapshots and linked clones",
                            DiskFormat::Raw => "a plain byte-for-byte file",
                        });
                    });
                    ui.end_row();
                }
                cloud_image::wizard_rows(ui, w);
                let l = ui.label("ISO");
                ui.horizontal(|ui| {
                    ui.text_edit_singleline(&mut w.iso).labelled_by(l.id);
                    if theme::button(ui, true, theme::BROWSE, "Browse ISO…").clicked()
                        && let Some(p) = rfd::FileDialog::new().add_filter("Disc images", &["iso", "img"]).pick_file()
                    {
                        w.iso = p.display().to_string();
                    }
                });
                ui.end_row();
                osinfo::wizard_row(ui, w);
                let l = ui.label("Kernel");
                ui.horizontal(|ui| {
                    ui.text_edit_singleline(&mut w.kernel).labelled_by(l.id);
                    if theme::button(ui, true, theme::BROWSE, "Browse kernel…").clicked()
                        && let Some(p) = rfd::FileDialog::new().pick_file()
                    {
                        w.kernel = p.display().to_string();
                    }
                });
                ui.end_row();
                let l = ui.label("Initrd");
                ui.text_edit_singleline(&mut w.initrd).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Command line");
                ui.text_edit_singleline(&mut w.cmdline).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Tags");
                ui.add(egui::TextEdit::singleline(&mut w.tags).hint_text("web, prod")).labelled_by(l.id);
                ui.end_row();
                network::wizard_row(ui, w, no_network.as_deref());
            });
            let mut problems = w.problems(host_mem, &taken);
            problems.extend(w.cloud_problems(&images));
            for p in &problems {
                ui.colored_label(ui.visuals().warn_fg_color, p);
            }
            for warning in osinfo::warnings(w) {
                ui.colored_label(ui.visuals().warn_fg_color, warning);
            }
            ui.separator();
            ui.label(format!(
                "Summary: {} with {} vCPU(s), {} MiB, {}, {}, booting {}.",
                if w.name.is_empty() { "a VM" } else { &w.name },
                w.vcpus,
                w.memory_mib,
                match (&w.disk_image, w.cloud_init()) {
                    (Some(i), Some(c)) => format!(
                        "a {} GiB qcow2 disk over cloud image {i} (user {}, hostname {})",
                        w.disk_gib, c.user, c.hostname
                    ),
                    (Some(i), None) => format!("a copy of {i} as its disk"),
                    (None, _) if w.disk_gib == 0 => "no disk".to_owned(),
                    (None, _) => format!(
                        "a new {} GiB {} disk",
                        w.disk_gib,
                        if w.disk_format == DiskFormat::Raw { "raw" } else { "qcow2" }
                    ),
                },
                network::wizard_summary(w),
                if !w.kernel.trim().is_empty() {
                    "the kernel"
                } else if w.iso.trim().is_empty() && w.disk_image.is_some() {
                    "its disk"
                } else {
                    "the ISO"
                }
            ));
            ui.horizontal(|ui| {
                create = theme::button(ui, problems.is_empty(), theme::CONFIRM, "Create").clicked();
                cancel = theme::button(ui, true, theme::CLOSE, "Cancel").clicked();
            });
        });
        if create {
            let w = self.wizard.take().expect("open");
            self.create(w);
        } else if cancel || !open {
            self.wizard = None;
        }
    }

    /// Creates, starts and opens the console of the demo VM.
    pub(super) fn create_demo(&self, kernel: PathBuf) {
        let backend = self.backend.clone();
        let request = CreateVm {
            disk_gib: 0,
            boot: Some(BootSpec { kernel: kernel.display().to_string(), initrd: None, cmdline: String::new() }),
            ..CreateVm::new("demo", 1, 64)
        };
        self.backend.act(0, "Create the demo VM".into(), None, move |c| async move {
            let vm = c.create_vm(&request).await?;
            c.action(&vm.id, Action::Start).await?;
            backend.model().open_console = Some((0, vm.id.clone()));
            backend.model().notify("The demo VM runs: click its screen and type", false);
            Ok(())
        });
    }

    pub(super) fn create(&mut self, w: Wizard) {
        let mut request = w.request();
        let done = format!("Created {}", w.name);
        if w.iso.trim().is_empty() {
            self.backend.act(w.host, format!("Create {}", w.name), Some(done), move |c| async move {
                c.create_vm(&request).await
            });
        } else {
            let backend = self.backend.clone();
            self.backend.upload_then(w.host, PathBuf::from(w.iso.trim()), move |c, name| async move {
                request.media = Some(name);
                c.create_vm(&request).await?;
                backend.model().notify(done, false);
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wizard_sends_the_disk_format_and_the_cloud_seed() {
        let mut w = Wizard::new(0);
        w.name = "db_1".into();
        let r = w.request();
        assert_eq!(
            (r.disk_format, r.cloud_init.as_ref(), r.disk_image.as_ref()),
            (Some(DiskFormat::Qcow2), None, None)
        );
        w.disk_format = DiskFormat::Raw;
        assert_eq!(w.request().disk_format, Some(DiskFormat::Raw));
        w.disk_gib = 0;
        assert_eq!(w.request().disk_format, None, "no disk, no format");
        // From a cloud image: a qcow2 overlay, whatever the format chosen before, and the seed.
        w.disk_image = Some("debian.qcow2".into());
        w.disk_gib = 10;
        w.cloud = Some(CloudForm {
            user: "me".into(),
            ssh_key: "ssh-ed25519 AAAA1 a\n\n  ssh-rsa AAAA2 b \n".into(),
            key_source: None,
            hostname: String::new(),
        });
        let r = w.request();
        assert_eq!(r.disk_image.as_deref(), Some("debian.qcow2"));
        assert_eq!((r.disk_gib, r.disk_format), (10, Some(DiskFormat::Qcow2)));
        assert_eq!(
            r.cloud_init,
            Some(porthole_api::CloudInitSpec {
                hostname: "db-1".into(),
                user: "me".into(),
                ssh_authorized_keys: vec!["ssh-ed25519 AAAA1 a".into(), "ssh-rsa AAAA2 b".into()],
            })
        );
        assert_eq!(r.boot, None, "it boots its disk");
        w.cloud.as_mut().unwrap().hostname = " box ".into();
        assert_eq!(w.request().cloud_init.unwrap().hostname, "box");
        // Back to a copy of an image: no seed.
        w.cloud = None;
        assert_eq!(w.request().cloud_init, None);
    }

    #[test]
    fn the_wizard_explains_what_is_wrong() {
        let mut w = Wizard::new(0);
        assert!(w.problems(Some(4096), &[]).iter().any(|p| p.contains("Give the VM a name")));
        w.name = "web1".into();
        w.memory_mib = 8192;
        let p = w.problems(Some(4096), &["web1".into()]);
        assert!(p.iter().any(|p| p.contains("named \"web1\" already")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("only 4096 MiB")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("Choose what the VM boots")), "{p:?}");
    }
}
