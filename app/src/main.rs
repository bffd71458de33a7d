//! `porthole`: the desktop app.

use anyhow::anyhow;
use porthole::{PortholeApp, backend::Backend, daemon};

fn main() -> anyhow::Result<()> {
    porthole::started();
    let mut vnc = None;
    let mut iso = None;
    let mut console = None;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // The window's scale (HiDPI): `--scale FACTOR` anywhere, else `PORTHOLE_SCALE`, else the desktop's.
    let scale = match args.iter().position(|a| a == "--scale") {
        Some(i) => {
            let value = args.get(i + 1).cloned().ok_or_else(|| anyhow!("--scale needs a factor, e.g. 2"))?;
            args.drain(i..i + 2);
            Some(value)
        }
        None => std::env::var("PORTHOLE_SCALE").ok().filter(|v| !v.is_empty()),
    };
    if let Some(arg) = args.first() {
        match arg.as_str() {
            "--console" => {
                let name = args.get(1).ok_or_else(|| anyhow!("--console needs the name of a local VM"))?;
                console = Some(name.clone());
            }
            url if url.starts_with("vnc://") || url.starts_with("vnc+unix://") => {
                vnc = Some(url.parse::<porthole::app::VncTarget>().map_err(|e| anyhow!(e))?);
            }
            file if std::path::Path::new(file).is_file() => {
                let path = std::path::PathBuf::from(file);
                let is_image =
                    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("iso") || e.eq_ignore_ascii_case("img"));
                anyhow::ensure!(is_image, "{file} is not an ISO image (.iso or .img)");
                iso = Some(std::fs::canonicalize(&path).unwrap_or(path));
            }
            "--version" | "-V" => {
                println!("porthole {}", porthole_api::VERSION);
                return Ok(());
            }
            "--help" | "-h" => {
                println!(
                    "porthole {}\nUsage: porthole [vnc://HOST[:PORT] | vnc+unix:///PATH | FILE.iso | --console NAME] [--scale FACTOR] [--version] [--help]\n\nOpens the Porthole window. The local host's daemon (portholed) is started \
                     for this user if it is not running; remote hosts come from ~/.config/porthole/settings.json.\n\
                     vnc://HOST[:PORT], vnc+unix:///PATH  open a console on that VNC server\n\
                     FILE.iso                           open the New VM wizard with this ISO as its boot media\n\
                     --console NAME                     open the console of this computer's VM NAME\n\
                     --scale FACTOR                     draw everything FACTOR times larger (0.5 to 4; also\n\
                     \x20                                  PORTHOLE_SCALE), on top of the desktop's own scale",
                    porthole_api::VERSION
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; see porthole --help"),
        }
    }
    let scale = match scale {
        Some(v) => match v.parse::<f32>() {
            Ok(f) if (0.5..=4.0).contains(&f) => f,
            _ => anyhow::bail!("the scale {v:?} is not a number from 0.5 to 4"),
        },
        None => 1.0,
    };
    // The size and place of the last run's window.
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("Porthole")
        .with_app_id("porthole")
        .with_inner_size([1100.0 * scale, 700.0 * scale])
        .with_min_inner_size([640.0 * scale, 400.0 * scale]);
    // (Sizes in points: the window's size in pixels grows with the scale.)
    if let Some(w) = PortholeApp::saved_window(porthole::settings::path().as_deref()) {
        viewport = viewport
            .with_inner_size([w.width.max(640) as f32 * scale, w.height.max(400) as f32 * scale])
            .with_position([w.x as f32, w.y as f32]);
    }
    let settings_path = porthole::settings::path();
    let vm_dir = settings_path.as_deref().and_then(|p| porthole::settings::load(p).0.vm_dir);
    let options = eframe::NativeOptions { viewport, ..Default::default() };
    eframe::run_native(
        "Porthole",
        options,
        Box::new(move |cc| {
            if scale != 1.0 {
                cc.egui_ctx.set_zoom_factor(scale);
            }
            if let Some(path) = std::env::var_os("PORTHOLE_LAYOUT_REPORT") {
                porthole::report_layout(&cc.egui_ctx, path.into());
            }
            let ctx = cc.egui_ctx.clone();
            let backend = Backend::new(move || ctx.request_repaint())?;
            if let Some(problem) = daemon::kvm_problem() {
                backend.model().notify(format!("VMs cannot run here: {problem}"), true);
            }
            let mut app =
                PortholeApp::new(backend, porthole::local_host_in(daemon::socket_path(), vm_dir), settings_path);
            app.install_fonts(&cc.egui_ctx);
            if vnc.is_some() || iso.is_some() || console.is_some() {
                app.skip_restoring_consoles();
            }
            if let Some(target) = vnc {
                app.open_vnc(target, None);
            }
            if let Some(iso) = iso {
                app.new_vm_from_iso(&iso);
            }
            if let Some(name) = console {
                app.open_console_by_name(name);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow!("could not open the Porthole window: {e}"))
}
