//! Graphs: the machine list's CPU sparkline and the performance plots of a VM and of a host.

/// A small line of the last minute's CPU use, with the latest value.
pub fn sparkline(ui: &mut egui::Ui, history: &std::collections::VecDeque<f32>, name: &str) {
    ui.horizontal(|ui| {
        let (rect, response) = ui.allocate_exact_size(egui::vec2(80.0, 16.0), egui::Sense::hover());
        let top = history.iter().copied().fold(100.0f32, f32::max);
        let n = (history.len().max(2) - 1) as f32;
        let points: Vec<egui::Pos2> = history
            .iter()
            .enumerate()
            .map(|(i, v)| {
                egui::pos2(rect.left() + rect.width() * i as f32 / n, rect.bottom() - rect.height() * v / top)
            })
            .collect();
        ui.painter().line(points, egui::Stroke::new(1.0, ui.visuals().selection.bg_fill));
        let last = history.back().copied().unwrap_or(0.0);
        response.on_hover_text(format!("{name}: CPU {last:.0}% (last minute)"));
        ui.label(format!("{last:.0}%"));
    });
}

/// CPU, memory, disk and network graphs of the last hour (seconds before now on the x axis).
/// `id` keeps the plots of different pages apart; `empty` is said when there are no samples yet.
pub fn performance(ui: &mut egui::Ui, id: &str, empty: &str, samples: &[porthole_api::StatSample]) {
    use egui_plot::{Legend, Line, Plot, PlotPoints};
    let Some(last) = samples.last() else {
        ui.label(empty);
        return;
    };
    let t = |s: &porthole_api::StatSample| (s.t_ms as f64 - last.t_ms as f64) / 1000.0;
    let series = |f: fn(&porthole_api::StatSample) -> f64| -> PlotPoints<'static> {
        samples.iter().map(|s| [t(s), f(s)]).collect::<Vec<_>>().into()
    };
    // The latest figures, each its own label so that a narrow window wraps between them.
    ui.horizontal_wrapped(|ui| {
        let parts = [
            format!("CPU {:.1}%", last.cpu_percent),
            format!("memory {:.1} MiB", last.memory_bytes as f64 / 1048576.0),
            format!(
                "disk read {:.1} KiB/s, write {:.1} KiB/s",
                last.disk_read_bps / 1024.0,
                last.disk_write_bps / 1024.0
            ),
            format!("network in {:.1} KiB/s, out {:.1} KiB/s", last.net_rx_bps / 1024.0, last.net_tx_bps / 1024.0),
        ];
        for text in parts {
            // Whole: a part that does not fit starts the next line.
            ui.add(egui::Label::new(text).extend());
        }
    });
    for (plot, title, lines) in [
        ("cpu", "CPU %", vec![("CPU %", series(|s| s.cpu_percent))]),
        ("mem", "Memory (MiB)", vec![("memory", series(|s| s.memory_bytes as f64 / 1048576.0))]),
        (
            "disk",
            "Disk (KiB/s)",
            vec![("read", series(|s| s.disk_read_bps / 1024.0)), ("write", series(|s| s.disk_write_bps / 1024.0))],
        ),
        (
            "net",
            "Network (KiB/s)",
            vec![("in", series(|s| s.net_rx_bps / 1024.0)), ("out", series(|s| s.net_tx_bps / 1024.0))],
        ),
    ] {
        ui.label(title);
        Plot::new((id, plot)).height(90.0).legend(Legend::default()).allow_scroll(false).show(ui, |plot| {
            for (name, points) in lines {
                plot.line(Line::new(name, points));
            }
        });
    }
}
