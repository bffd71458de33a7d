//! The notices bar at the bottom of the window: running uploads with their progress and cancel, and the
//! last notice (an error in the error colour).

use super::PortholeApp;

impl PortholeApp {
    pub(super) fn notices(&mut self, ui: &mut egui::Ui) {
        let (notice, progress) = {
            let m = self.backend.model();
            (m.notices.last().cloned(), m.progress.clone())
        };
        for p in progress {
            ui.horizontal(|ui| {
                if ui.button("Cancel upload").on_hover_text(format!("Stop: {}", p.what)).clicked() {
                    self.backend.cancel_upload(&p.what);
                }
                ui.add(egui::ProgressBar::new(p.fraction).text(format!("{} {:.0}%", p.what, p.fraction * 100.0)));
            });
        }
        match notice {
            Some(n) if n.error => ui.colored_label(ui.visuals().error_fg_color, n.text),
            Some(n) => ui.label(n.text),
            None => ui.label("Ready."),
        };
    }
}
