//! Porthole, the desktop app: the VMs of this computer and of remote hosts in one window, their consoles,
//! point-and-click creation and drag-and-drop ISOs. It reaches every host only through `porthole_api`.

pub mod app;
pub mod backend;
pub mod console;
pub mod daemon;
pub mod settings;

pub use app::PortholeApp;

/// The demo guest (an animated Porthole screen that echoes typed keys): `PORTHOLE_DEMO_GUEST`, else
/// `porthole-demo.elf` next to this program, else `/usr/lib/porthole/demo.elf`, else the one this build
/// assembled from the project's micro-guest sources.
pub fn demo_guest() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("PORTHOLE_DEMO_GUEST").map(std::path::PathBuf::from),
        std::env::current_exe().ok().map(|e| e.with_file_name("porthole-demo.elf")),
        Some(std::path::PathBuf::from("/usr/lib/porthole/demo.elf")),
        porthole_guests::all().find(|(name, _)| *name == "demo").map(|(_, p)| p),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// When the process started (as early as `main` can note it).
pub fn started() -> std::time::Instant {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(std::time::Instant::now)
}

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
