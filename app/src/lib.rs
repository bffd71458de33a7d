//! Porthole, the desktop app: the VMs of this computer and of remote hosts in one window, their consoles,
//! point-and-click creation and drag-and-drop ISOs. It reaches every host only through `porthole_api`.

pub mod app;
pub mod audio;
pub mod backend;
pub mod console;
pub mod daemon;
pub mod settings;
pub mod ssh_keys;

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

/// A program installed with this one (`portholed`, `porthole-libvirt`): next to it, else in `../lib/porthole`
/// (the .deb's and .rpm's helpers), else the name alone (found on PATH). Under `cargo test` this program runs
/// from the profile's `deps/` folder, and its siblings are one folder up.
pub fn sibling_program(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(std::path::Path::parent);
    let lib = dir.and_then(std::path::Path::parent).map(|p| p.join("lib/porthole"));
    let up = dir.filter(|d| d.ends_with("deps")).and_then(std::path::Path::parent).map(std::path::Path::to_owned);
    [dir.map(std::path::Path::to_owned), lib, up]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// Starts the helper that serves the libvirt host `uri` (`porthole-libvirt`, which links libvirt's client
/// library so this program does not). Errors say what to install when the library or the helper is missing.
pub fn libvirt_host(uri: &str) -> Result<porthole_api::HostHandle, String> {
    libvirt_host_with(&sibling_program("porthole-libvirt"), &[uri.to_string()])
}

/// [`libvirt_host`] with the helper's command line given.
pub fn libvirt_host_with(program: &std::path::Path, args: &[String]) -> Result<porthole_api::HostHandle, String> {
    match porthole_api::host_process::HostProcess::start(program, args) {
        Ok(host) => Ok(std::sync::Arc::new(host)),
        Err(e) if e.contains("libvirt.so") => Err(format!(
            "libvirt hosts need libvirt's client library, which is not installed here (Debian and Ubuntu: sudo \
             apt install libvirt0; Fedora: sudo dnf install libvirt-libs). Everything else works without it. ({e})"
        )),
        Err(e) if e.starts_with("cannot start") => Err(format!(
            "libvirt hosts need porthole-libvirt, installed with Porthole next to this program or on PATH ({e})"
        )),
        Err(e) => Err(e),
    }
}

/// When the process started (as early as `main` can note it).
pub fn started() -> std::time::Instant {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(std::time::Instant::now)
}

impl eframe::App for PortholeApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        PortholeApp::ui(self, ui);
        if let Some(stats) = frame_stats() {
            let shown = self.console_frames_shown();
            stats.lock().unwrap_or_else(|p| p.into_inner()).frame(frame.info().cpu_usage, shown);
        }
    }
}

/// `PORTHOLE_FRAME_STATS=FILE` (for `porthole-bench gui`): once a second a line "console_frames ui_frames
/// cpu_ms_mean cpu_ms_p95" is appended to FILE: console screen changes shown, frames drawn, and the CPU time
/// of those frames (eframe's measure: the app's UI code, tessellation and painting).
pub struct FrameStats {
    path: std::path::PathBuf,
    since: std::time::Instant,
    cpu_ms: Vec<f32>,
    shown_at_start: Option<u64>,
}

fn frame_stats() -> Option<&'static std::sync::Mutex<FrameStats>> {
    static STATS: std::sync::OnceLock<Option<std::sync::Mutex<FrameStats>>> = std::sync::OnceLock::new();
    STATS
        .get_or_init(|| {
            std::env::var_os("PORTHOLE_FRAME_STATS").map(|p| {
                std::sync::Mutex::new(FrameStats {
                    path: p.into(),
                    since: std::time::Instant::now(),
                    cpu_ms: Vec::new(),
                    shown_at_start: None,
                })
            })
        })
        .as_ref()
}

impl FrameStats {
    fn frame(&mut self, cpu_s: Option<f32>, shown: u64) {
        let start = *self.shown_at_start.get_or_insert(shown);
        self.cpu_ms.extend(cpu_s.map(|s| s * 1000.0));
        if self.since.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        let frames = self.cpu_ms.len().max(1);
        self.cpu_ms.sort_by(f32::total_cmp);
        let mean = self.cpu_ms.iter().sum::<f32>() / frames as f32;
        let p95 = self.cpu_ms.get(frames * 95 / 100).or(self.cpu_ms.last()).copied().unwrap_or(0.0);
        let secs = self.since.elapsed().as_secs_f32();
        let line =
            format!("{:.1} {:.1} {mean:.2} {p95:.2}\n", (shown - start) as f32 / secs, self.cpu_ms.len() as f32 / secs);
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
            let _ = f.write_all(line.as_bytes());
        }
        self.since = std::time::Instant::now();
        self.cpu_ms.clear();
        self.shown_at_start = Some(shown);
    }
}

/// The local host's connection: start the daemon if needed, then its Unix socket.
pub fn local_host(
    socket: std::path::PathBuf,
) -> impl FnOnce() -> Result<porthole_api::HostHandle, String> + Send + 'static {
    local_host_in(socket, None)
}

/// The local host as `local_host` connects it; a daemon started for it keeps its VMs in `data_dir` (the
/// *Where local VMs live* preference) when given.
pub fn local_host_in(
    socket: std::path::PathBuf,
    data_dir: Option<std::path::PathBuf>,
) -> impl FnOnce() -> Result<porthole_api::HostHandle, String> + Send + 'static {
    move || {
        daemon::ensure_running(&socket, data_dir.as_deref())?;
        let client = porthole_api::Client::unix(&socket).map_err(|e| e.to_string())?;
        Ok(std::sync::Arc::new(client) as porthole_api::HostHandle)
    }
}

/// `PORTHOLE_LAYOUT_REPORT=FILE` (for the window tests): FILE holds, as JSON, what the last frame laid out:
/// `{"pixels_per_point", "window": [w, h], "nodes": [{"role", "name", "rect": [x0, y0, x1, y1]}]}`, each node
/// a named accessibility node (a label, or a text's runs) with its bounds, all in physical pixels of the
/// window. Rewritten (whole, by renaming a new file over it) when the layout changes. Turns on egui's
/// accessibility tree, which it reads.
pub fn report_layout(ctx: &egui::Context, path: std::path::PathBuf) {
    ctx.enable_accesskit();
    ctx.add_plugin(LayoutReport { path, last: String::new() });
}

struct LayoutReport {
    path: std::path::PathBuf,
    last: String,
}

impl egui::Plugin for LayoutReport {
    fn debug_name(&self) -> &'static str {
        "porthole layout report"
    }

    fn output_hook(&mut self, ctx: &egui::Context, output: &mut egui::FullOutput) {
        let Some(update) = &output.platform_output.accesskit_update else { return };
        let ppp = output.pixels_per_point;
        let nodes: std::collections::HashMap<_, _> = update.nodes.iter().map(|(id, n)| (*id, n)).collect();
        let scaled = |r: egui::accesskit::Rect| {
            [r.x0 * f64::from(ppp), r.y0 * f64::from(ppp), r.x1 * f64::from(ppp), r.y1 * f64::from(ppp)]
        };
        let mut named = Vec::new();
        for (_, node) in &update.nodes {
            use egui::accesskit::Role;
            let Some(bounds) = node.bounds() else { continue };
            let name = match (node.role(), node.label()) {
                (Role::TextRun, _) => continue,
                (_, Some(label)) => label.to_owned(),
                (Role::Label, None) => node.children().iter().filter_map(|c| nodes.get(c)?.value()).collect::<String>(),
                _ => continue,
            };
            if name.trim().is_empty() {
                continue;
            }
            named.push(serde_json::json!({
                "role": format!("{:?}", node.role()),
                "name": name.trim(),
                "rect": scaled(bounds),
            }));
        }
        let window = ctx.content_rect().size() * ppp;
        let report = serde_json::json!({"pixels_per_point": ppp, "window": [window.x, window.y], "nodes": named});
        let text = report.to_string();
        if text != self.last {
            let new = self.path.with_extension("new");
            if std::fs::write(&new, &text).and_then(|()| std::fs::rename(&new, &self.path)).is_ok() {
                self.last = text;
            }
        }
    }
}
