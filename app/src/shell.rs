//! The main window: the hosts sidebar and the VM list of the selected host.

/// State of the main window.
#[derive(Debug, Default)]
pub struct Shell {
    filter: String,
}

impl eframe::App for Shell {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::Panel::left("hosts").resizable(true).default_size(200.0).show(ui, |ui| {
            ui.heading("Hosts");
            ui.separator();
            let _ = ui.selectable_label(true, "Local");
        });
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label("Filter");
                ui.add(egui::TextEdit::singleline(&mut self.filter).hint_text("name or tag"));
            });
            ui.separator();
            ui.centered_and_justified(|ui| {
                ui.label("No virtual machines on this host yet.");
            });
        });
    }
}
