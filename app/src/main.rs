//! `porthole`: the desktop app.

use anyhow::anyhow;

mod shell;

fn main() -> anyhow::Result<()> {
    if let Some(arg) = std::env::args().nth(1) {
        match arg.as_str() {
            "--version" | "-V" => {
                println!("porthole {}", porthole_api::VERSION);
                return Ok(());
            }
            "--help" | "-h" => {
                println!("porthole {}\nUsage: porthole [--version] [--help]", porthole_api::VERSION);
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; see porthole --help"),
        }
    }
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Porthole")
            .with_app_id("porthole")
            .with_inner_size([1100.0, 700.0])
            .with_min_inner_size([640.0, 400.0]),
        ..Default::default()
    };
    eframe::run_native("Porthole", options, Box::new(|_cc| Ok(Box::new(shell::Shell::default()))))
        .map_err(|e| anyhow!("could not open the Porthole window: {e}"))
}
