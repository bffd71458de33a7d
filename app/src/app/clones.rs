//! Clones and templates in the window: the *Clone…* dialog (a full copy or a linked clone), turning a stopped
//! VM into a template and back, and how a VM's disk is described (format, what it takes on the host, what it
//! is linked to).

use porthole_api::{CloneVm, UpdateVm, Vm, VmState};

use super::theme;
use super::{PortholeApp, vm_name_problem};

/// Bytes in human units (binary prefixes, one decimal).
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 40 => format!("{:.1} TiB", n as f64 / (1u64 << 40) as f64),
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The details' "Disk" line: its size as the guest sees it, its format and what its files take on the host.
pub fn disk_text(vm: &Vm) -> String {
    if vm.disk_bytes == 0 {
        return "none".to_owned();
    }
    let size = if vm.disk_bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", vm.disk_bytes >> 30)
    } else {
        human_bytes(vm.disk_bytes)
    };
    match vm.disk_format {
        // A host that does not report formats (older daemons).
        None => size,
        Some(f) => {
            let format = match f {
                porthole_api::DiskFormat::Qcow2 => "qcow2",
                porthole_api::DiskFormat::Raw => "raw",
            };
            format!("{size} {format}, {} allocated on the host", human_bytes(vm.disk_allocated_bytes))
        }
    }
}

/// "linked to NAME" for a linked clone (the base's name when the host lists it, else its id).
pub fn linked_text(vm: &Vm, vms: &[Vm]) -> Option<String> {
    let base = vm.linked_to.as_deref()?;
    let name = vms.iter().find(|v| v.id == base).map_or(base, |v| v.name.as_str());
    Some(format!("linked to {name}"))
}

/// Why a template cannot start.
pub const TEMPLATE_START: &str = "Templates cannot start: clone it";

/// The *Clone…* dialog's fields.
#[derive(Debug, Clone)]
pub struct CloneForm {
    host: usize,
    vm: String,
    vm_name: String,
    pub name: String,
    pub linked: bool,
}

impl CloneForm {
    pub fn request(&self) -> CloneVm {
        CloneVm { name: self.name.trim().to_owned(), linked: self.linked }
    }
}

impl PortholeApp {
    /// *Clone…* and *Convert to template* / *Convert to VM* in a VM's action row.
    pub(super) fn clone_buttons(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm) {
        if let Some(why) = self.lacks(host, porthole_api::Feature::Clones) {
            let r = theme::button(ui, false, theme::CLONE, "Clone…");
            r.on_disabled_hover_text(why);
            return;
        }
        let stopped = vm.state == VmState::Stopped && vm.crash.is_none();
        let r = theme::button(ui, stopped, theme::CLONE, "Clone…");
        if r.on_disabled_hover_text("Shut the VM down to clone it").clicked() {
            self.clone_form = Some(CloneForm {
                host,
                vm: vm.id.clone(),
                vm_name: vm.name.clone(),
                name: format!("{}-clone", vm.name),
                linked: vm.template,
            });
        }
        let (text, to, hover) = if vm.template {
            ("Convert to VM", false, "It can start again (refused while linked clones use it)")
        } else {
            ("Convert to template", true, "A template does not start; it is cloned into new VMs")
        };
        let icon = if to { theme::TEMPLATE } else { theme::START };
        let r = theme::button(ui, stopped, icon, text).on_hover_text(hover);
        if r.on_disabled_hover_text("Shut the VM down first").clicked() {
            let id = vm.id.clone();
            let change = UpdateVm { template: Some(to), ..Default::default() };
            let done = if to { format!("{} is a template", vm.name) } else { format!("{} is a VM again", vm.name) };
            self.backend.act(host, format!("{text} {}", vm.name), Some(done), move |c| async move {
                c.update_vm(&id, &change).await
            });
        }
    }

    /// The *Clone…* dialog.
    pub(super) fn clone_window(&mut self, ctx: &egui::Context) {
        let Some(f) = self.clone_form.as_mut() else { return };
        let taken: Vec<String> = self
            .backend
            .model()
            .hosts
            .get(f.host)
            .map(|h| h.vms.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default();
        let mut open = true;
        let (mut go, mut cancel) = (false, false);
        theme::dialog(ctx, format!("Clone {}", f.vm_name)).open(&mut open).show(ctx, |ui| {
            ui.set_max_width(460.0);
            ui.horizontal(|ui| {
                let l = ui.label("Clone name");
                ui.text_edit_singleline(&mut f.name).labelled_by(l.id);
            });
            ui.radio_value(&mut f.linked, false, "Full copy");
            ui.weak("An independent VM with its own copy of the disk (sparse: only what was written is copied).");
            ui.radio_value(&mut f.linked, true, "Linked clone");
            ui.weak(format!(
                "Made in a moment and small: its disk records only its own changes over {}'s, which stays read-only \
                 while the clone exists.",
                f.vm_name
            ));
            let problem = vm_name_problem(f.name.trim(), &taken);
            if let Some(p) = &problem {
                ui.colored_label(ui.visuals().warn_fg_color, p);
            }
            ui.horizontal(|ui| {
                go = theme::button(ui, problem.is_none(), theme::CLONE, "Clone").clicked();
                cancel = theme::button(ui, true, theme::CLOSE, "Cancel").clicked();
            });
        });
        if go {
            let f = self.clone_form.take().expect("open");
            let request = f.request();
            let kind = if request.linked { "linked clone" } else { "full copy" };
            let what = format!("Clone {} as {} ({kind})", f.vm_name, request.name);
            let id = f.vm.clone();
            self.backend.run_task(
                f.host,
                f.vm.clone(),
                what,
                move |c| async move { c.clone_vm(&id, &request).await },
                |_, _| {},
            );
        } else if cancel || !open {
            self.clone_form = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Vm {
        serde_json::from_value(serde_json::json!({
            "id": "a", "name": "web", "vcpus": 1, "memory_mib": 64, "disk_bytes": 8u64 << 30, "state": "stopped"
        }))
        .unwrap()
    }

    #[test]
    fn sizes_are_in_human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(200 << 20), "200.0 MiB");
        assert_eq!(human_bytes((5 << 30) + (1 << 29)), "5.5 GiB");
        assert_eq!(human_bytes(3 << 40), "3.0 TiB");
    }

    #[test]
    fn the_disk_line_shows_format_and_allocation() {
        let mut v = vm();
        assert_eq!(disk_text(&v), "8 GiB", "a host that does not report the format");
        v.disk_format = Some(porthole_api::DiskFormat::Qcow2);
        v.disk_allocated_bytes = 196 << 10;
        assert_eq!(disk_text(&v), "8 GiB qcow2, 196.0 KiB allocated on the host");
        v.disk_format = Some(porthole_api::DiskFormat::Raw);
        v.disk_bytes = 1 << 29;
        assert_eq!(disk_text(&v), "512.0 MiB raw, 196.0 KiB allocated on the host");
        v.disk_bytes = 0;
        assert_eq!(disk_text(&v), "none");
    }

    #[test]
    fn a_linked_clone_names_its_base() {
        let base = vm();
        let mut clone = Vm { id: "b".into(), name: "web-2".into(), linked_to: Some("a".into()), ..vm() };
        assert_eq!(linked_text(&clone, &[base.clone(), clone.clone()]).as_deref(), Some("linked to web"));
        assert_eq!(linked_text(&clone, &[]).as_deref(), Some("linked to a"), "a base the list lacks: its id");
        clone.linked_to = None;
        assert_eq!(linked_text(&clone, &[base]), None);
    }

    #[test]
    fn the_clone_request_says_full_or_linked() {
        let f = CloneForm { host: 0, vm: "a".into(), vm_name: "web".into(), name: " web-2 ".into(), linked: true };
        assert_eq!(f.request(), CloneVm { name: "web-2".into(), linked: true });
    }
}
