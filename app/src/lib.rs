//! Porthole, the desktop app: the VMs of this computer and of remote hosts in one window, their consoles,
//! point-and-click creation and drag-and-drop ISOs. It reaches every host only through `porthole_api`.

pub mod app;
pub mod backend;
pub mod console;
pub mod daemon;
pub mod settings;

pub use app::PortholeApp;

impl eframe::App for PortholeApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        PortholeApp::ui(self, ui);
    }
}

/// The local host's connection: start the daemon if needed, then its Unix socket.
pub fn local_host(
    socket: std::path::PathBuf,
) -> impl FnOnce() -> Result<porthole_api::Client, String> + Send + 'static {
    move || {
        daemon::ensure_running(&socket)?;
        porthole_api::Client::unix(&socket).map_err(|e| e.to_string())
    }
}
