//! Files dropped onto the window: onto a VM (its row, details or console), an ISO goes into its drive;
//! onto the host page, any file into that host's library; elsewhere, an ISO starts the wizard for a new VM.

use super::{PortholeApp, Tab};

impl PortholeApp {
    pub(super) fn handle_drops(&mut self, ui: &mut egui::Ui) {
        let dropped = ui.ctx().input(|i| i.raw.dropped_files.clone());
        for file in dropped {
            let path = file.path().to_owned();
            // Onto the host page: any file, into that host's library.
            if matches!(self.tab, Tab::Host) {
                self.upload_to_library(self.selected_host, path);
                continue;
            }
            let is_image =
                path.extension().is_some_and(|e| e.eq_ignore_ascii_case("iso") || e.eq_ignore_ascii_case("img"));
            if !is_image {
                self.backend.model().notify(format!("{} is not an ISO image: drop a .iso file", path.display()), true);
                continue;
            }
            // Onto a VM's console: into that VM's drive.
            let console_vm = match self.tab {
                Tab::Console(i) => self.consoles.get(i).and_then(|t| t.vm.clone()),
                Tab::Machines | Tab::Host => None,
            };
            // Onto a VM's row or details: into that VM's drive; elsewhere: a new VM. Without a pointer position
            // (some drop sources give none) the selected VM takes it.
            let pointer = ui.ctx().input(|i| i.pointer.latest_pos());
            let under = pointer.and_then(|p| self.drop_zones.iter().find(|(r, _, _)| r.contains(p)));
            let target = match (console_vm, matches!(self.tab, Tab::Machines), under, pointer) {
                (Some(vm), _, _, _) => Some(vm),
                (None, true, Some((_, host, id)), _) => Some((*host, id.clone())),
                (None, true, None, None) => self.selected_vm.clone().map(|id| (self.selected_host, id)),
                _ => None,
            };
            match target {
                Some((host, id)) => self.attach(host, &id, path),
                None => self.new_vm_from_iso(&path),
            }
        }
    }
}
