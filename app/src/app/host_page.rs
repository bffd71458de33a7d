//! The host page (the *Host* tab): what the selected host is (Porthole version, kernel, CPU), its capacity
//! and what is in use (CPUs, memory, disk, with graphs of the last hour), its image library (upload by
//! *Upload…* or by dropping a file on the page; delete, refused up front for an image a VM uses) and its
//! tasks (progress; cancel for uploads and shutdowns).

use std::time::{Duration, Instant};

use porthole_api::{HostInfo, Image, Task, TaskState};

use super::PortholeApp;
use super::clones::human_bytes;
use super::theme;

/// The host page's own state.
#[derive(Default)]
pub struct HostPage {
    /// When the page's data were last asked for.
    fetched: Option<Instant>,
    /// The image whose deletion waits for the user's confirmation: (host, name).
    confirm_delete: Option<(usize, String)>,
}

/// "3 h 12 min", "5 min", "40 s".
fn duration_text(s: u64) -> String {
    match s {
        s if s >= 86_400 => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// A bar of `used` out of `total` with its text ("3.1 GiB of 16.0 GiB in use").
fn usage_bar(ui: &mut egui::Ui, used: u64, total: u64) {
    let fraction = if total > 0 { used.min(total) as f32 / total as f32 } else { 0.0 };
    let text = format!("{} of {} in use", human_bytes(used), human_bytes(total));
    ui.add(egui::ProgressBar::new(fraction).desired_width(260.0).text(text));
}

/// Overrides a widget's accessible label (an icon or a repeated word on screen, a whole phrase for screen
/// readers and tests).
fn labelled(response: &egui::Response, enabled: bool, label: String) {
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, enabled, &label));
}

impl PortholeApp {
    pub(super) fn host_page(&mut self, ui: &mut egui::Ui) {
        let host = self.selected_host;
        if self.host_page.fetched.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            self.backend.load_host_page(host);
            self.host_page.fetched = Some(Instant::now());
        }
        ui.ctx().request_repaint_after(Duration::from_secs(1));
        let (name, info, data, images) = {
            let m = self.backend.model();
            let Some(h) = m.hosts.get(host) else { return };
            let data = m.host_page.as_ref().filter(|(i, _)| *i == host).map(|(_, d)| d.clone()).unwrap_or_default();
            (h.name.clone(), h.info.clone(), data, m.images.get(&host).cloned())
        };
        egui::ScrollArea::both().id_salt("host page").show(ui, |ui| {
            ui.heading(format!("Host {name}"));
            let Some(info) = info else {
                ui.label("Waiting for the host to answer…");
                return;
            };
            Self::host_summary(ui, &info);
            ui.add_space(6.0);
            let no_samples = self.lacks(host, porthole_api::Feature::HostStats);
            egui::CollapsingHeader::new("Use over the last hour").default_open(true).show(ui, |ui| {
                if let Some(why) = no_samples {
                    ui.weak(format!("Not available on this host: {why}"));
                    return;
                }
                super::graphs::performance(
                    ui,
                    "host",
                    "No samples yet (the host just started).",
                    &data.stats,
                    Default::default(),
                );
            });
            ui.add_space(6.0);
            self.library(ui, host, images.as_deref());
            ui.add_space(6.0);
            self.host_tasks(ui, host, &data.tasks);
        });
    }

    fn host_summary(ui: &mut egui::Ui, info: &HostInfo) {
        ui.label(format!(
            "Porthole {} · Linux {} · up {}",
            info.version,
            if info.kernel.is_empty() { "?" } else { &info.kernel },
            duration_text(info.uptime_s)
        ));
        egui::Grid::new("host capacity").num_columns(3).spacing([12.0, 6.0]).show(ui, |ui| {
            ui.strong("CPUs");
            let model = if info.cpu_model.is_empty() { String::new() } else { format!(" × {}", info.cpu_model) };
            ui.label(format!("{}{model}", info.cpus));
            ui.weak(format!("{} vCPUs given to {} running VMs", info.vcpus_allocated, info.running_vms));
            ui.end_row();
            ui.strong("Memory");
            let total = info.memory_mib << 20;
            usage_bar(ui, total.saturating_sub(info.memory_available_mib << 20), total);
            ui.weak(format!("{} given to running VMs", human_bytes(info.memory_allocated_mib << 20)));
            ui.end_row();
            ui.strong("Disk");
            usage_bar(ui, info.disk_total_bytes.saturating_sub(info.free_disk_bytes), info.disk_total_bytes);
            ui.weak(format!(
                "images {}, VM disks {} ({} VMs)",
                human_bytes(info.images_bytes),
                human_bytes(info.vm_disks_bytes),
                info.vms
            ));
            ui.end_row();
        });
        for problem in &info.problems {
            ui.colored_label(ui.visuals().warn_fg_color, problem);
        }
    }

    fn library(&mut self, ui: &mut egui::Ui, host: usize, images: Option<&[Image]>) {
        ui.horizontal(|ui| {
            ui.heading("Image library");
            if theme::button(ui, true, theme::UPLOAD, "Upload…")
                .on_hover_text("Add a file to the library (or drop it on this page)")
                .clicked()
                && let Some(path) = rfd::FileDialog::new().pick_file()
            {
                self.upload_to_library(host, path);
            }
        });
        let Some(images) = images else {
            ui.label("Loading the library…");
            return;
        };
        if images.is_empty() {
            ui.weak("The library is empty: upload an ISO, a disk image or a kernel, or drop one on this page.");
            return;
        }
        egui::Grid::new("library").num_columns(7).striped(true).spacing([12.0, 4.0]).show(ui, |ui| {
            for title in ["Name", "Format", "OS", "Size", "On the host", "Used by", ""] {
                ui.strong(title);
            }
            ui.end_row();
            for image in images {
                ui.label(&image.name);
                let format = match image.format {
                    porthole_api::ImageFormat::Iso => "ISO",
                    porthole_api::ImageFormat::Qcow2 => "qcow2",
                    porthole_api::ImageFormat::Raw => "raw",
                };
                ui.label(format);
                // What the host's osinfo-db found on an ISO.
                match (&image.os, image.format) {
                    (Some(os), _) => {
                        ui.label(format!("{} ({})", os.name, os.short_id));
                    }
                    (None, porthole_api::ImageFormat::Iso) => {
                        ui.weak("Unknown OS");
                    }
                    (None, _) => {
                        ui.weak("—");
                    }
                }
                ui.label(human_bytes(image.virtual_bytes.max(image.size_bytes)));
                ui.label(human_bytes(image.allocated_bytes));
                if image.used_by.is_empty() {
                    ui.weak("—");
                } else {
                    ui.label(image.used_by.join(", "));
                }
                let free = image.used_by.is_empty();
                let confirming = self.host_page.confirm_delete.as_ref() == Some(&(host, image.name.clone()));
                if confirming {
                    ui.horizontal(|ui| {
                        let yes = theme::button(ui, true, theme::DELETE, "Delete");
                        labelled(&yes, true, format!("Confirm deleting {}", image.name));
                        if yes.clicked() {
                            self.backend.delete_image(host, image.name.clone());
                            self.host_page.confirm_delete = None;
                        }
                        let no = theme::button(ui, true, theme::CLOSE, "Keep");
                        labelled(&no, true, format!("Keep {}", image.name));
                        if no.clicked() {
                            self.host_page.confirm_delete = None;
                        }
                    });
                } else {
                    let hover = if free {
                        format!("Delete {} from the host", image.name)
                    } else {
                        format!("In use by {}: remove it from those VMs first", image.used_by.join(", "))
                    };
                    let delete = theme::button(ui, free, theme::DELETE, "Delete…").on_hover_text(hover);
                    labelled(&delete, free, format!("Delete {}", image.name));
                    if delete.clicked() {
                        self.host_page.confirm_delete = Some((host, image.name.clone()));
                    }
                }
                ui.end_row();
            }
        });
    }

    fn host_tasks(&mut self, ui: &mut egui::Ui, host: usize, tasks: &[Task]) {
        ui.heading("Tasks");
        if let Some(why) = self.lacks(host, porthole_api::Feature::Tasks) {
            ui.weak(format!("Not available on this host: {why}"));
            return;
        }
        if tasks.is_empty() {
            ui.weak("No tasks: uploads, shutdowns, snapshots and clones show here while they run.");
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for t in tasks {
            ui.horizontal(|ui| {
                let ago = duration_text(now.saturating_sub(t.started_ms) / 1000);
                match t.state {
                    TaskState::Running => {
                        let fraction = if t.total > 0 { t.done.min(t.total) as f32 / t.total as f32 } else { 0.0 };
                        let text = if t.total > 1 {
                            format!("{}: {} of {}", t.what, human_bytes(t.done), human_bytes(t.total))
                        } else {
                            format!("{}…", t.what)
                        };
                        ui.add(egui::ProgressBar::new(fraction).desired_width(320.0).text(text));
                        if t.cancellable {
                            let cancel = theme::button(ui, true, theme::CLOSE, "Cancel");
                            labelled(&cancel, true, format!("Cancel {}", t.what));
                            if cancel.clicked() {
                                self.backend.cancel_task(host, t.id.clone());
                            }
                        }
                    }
                    TaskState::Done => {
                        ui.label(format!("{}: done", t.what));
                    }
                    TaskState::Cancelled => {
                        ui.weak(format!("{}: cancelled", t.what));
                    }
                    TaskState::Failed => {
                        let why = t.error.as_deref().unwrap_or("no reason given");
                        ui.colored_label(ui.visuals().error_fg_color, format!("{} failed: {why}", t.what));
                    }
                }
                if t.started_ms > 0 {
                    ui.weak(format!("{ago} ago"));
                }
            });
        }
    }

    /// Uploads `path` into host `host`'s library (progress in the status bar and the page's tasks).
    pub(super) fn upload_to_library(&mut self, host: usize, path: std::path::PathBuf) {
        let backend = self.backend.clone();
        self.backend.upload_then(host, path, move |_, name| async move {
            backend.model().notify(format!("{name} is in the library"), false);
            backend.load_host_page(host);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration_text(40), "40 s");
        assert_eq!(duration_text(300), "5 min");
        assert_eq!(duration_text(3 * 3600 + 12 * 60), "3 h 12 min");
        assert_eq!(duration_text(2 * 86_400 + 5 * 3600), "2 d 5 h");
    }
}
