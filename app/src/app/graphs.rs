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

/// The limits a VM's graphs draw as lines: its CPU cap (percent of one CPU) and its disks' and network
/// cards' rates (KiB/s each way), where every drive or card has one (else the VM as a whole has none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Caps {
    pub cpu_percent: Option<f64>,
    pub disk_read: Option<f64>,
    pub disk_write: Option<f64>,
    pub net_in: Option<f64>,
    pub net_out: Option<f64>,
}

impl Caps {
    pub fn of(vm: &porthole_api::Vm) -> Caps {
        /// The sum of every item's limit, or None when one has none.
        fn total<T>(items: &[T], limit: impl Fn(&T) -> Option<u64>) -> Option<f64> {
            if items.is_empty() {
                return None;
            }
            items.iter().map(|i| limit(i).map(|v| v as f64 / 1024.0)).sum()
        }
        let disks: Vec<_> = vm.drives.iter().filter(|d| d.kind == porthole_api::DriveKind::Disk).collect();
        let either = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Caps {
            cpu_percent: vm.cpu_cap_percent.map(f64::from),
            disk_read: total(&disks, |d| either(d.limits.rbps, d.limits.bps)),
            disk_write: total(&disks, |d| either(d.limits.wbps, d.limits.bps)),
            net_in: total(&vm.nics, |n| n.limits.rx_bps.map(|b| b / 8)),
            net_out: total(&vm.nics, |n| n.limits.tx_bps.map(|b| b / 8)),
        }
    }
}

/// CPU, memory, disk and network graphs of the last hour (seconds before now on the x axis), with the
/// limits in `caps` as dashed lines. `id` keeps the plots of different pages apart; `empty` is said when
/// there are no samples yet.
pub fn performance(ui: &mut egui::Ui, id: &str, empty: &str, samples: &[porthole_api::StatSample], caps: Caps) {
    use egui_plot::{HLine, Legend, Line, LineStyle, Plot, PlotPoints};
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
    for (plot, title, lines, limits) in [
        ("cpu", "CPU %", vec![("CPU %", series(|s| s.cpu_percent))], vec![("CPU cap", caps.cpu_percent)]),
        ("mem", "Memory (MiB)", vec![("memory", series(|s| s.memory_bytes as f64 / 1048576.0))], vec![]),
        (
            "disk",
            "Disk (KiB/s)",
            vec![("read", series(|s| s.disk_read_bps / 1024.0)), ("write", series(|s| s.disk_write_bps / 1024.0))],
            vec![("read limit", caps.disk_read), ("write limit", caps.disk_write)],
        ),
        (
            "net",
            "Network (KiB/s)",
            vec![("in", series(|s| s.net_rx_bps / 1024.0)), ("out", series(|s| s.net_tx_bps / 1024.0))],
            vec![("in limit", caps.net_in), ("out limit", caps.net_out)],
        ),
    ] {
        ui.label(title);
        Plot::new((id, plot)).height(90.0).legend(Legend::default()).allow_scroll(false).show(ui, |plot| {
            for (name, points) in lines {
                plot.line(Line::new(name, points));
            }
            for (name, value) in limits {
                if let Some(v) = value {
                    plot.hline(HLine::new(name, v).style(LineStyle::dashed_loose()));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_the_vms_limits_in_the_graphs_units() {
        let vm: porthole_api::Vm = serde_json::from_value(serde_json::json!({
            "id": "a", "name": "a", "vcpus": 2, "memory_mib": 64, "disk_bytes": 0, "state": "running",
            "cpu_cap_percent": 150,
            "drives": [
                {"id": "disk0", "kind": "disk", "bus": "virtio-blk", "size_bytes": 1024, "read_only": false,
                 "limits": {"rbps": 1048576, "bps": 524288}},
                {"id": "disk1", "kind": "disk", "bus": "virtio-blk", "size_bytes": 1024, "read_only": false,
                 "limits": {"rbps": 2097152}},
                {"id": "cdrom0", "kind": "cdrom", "bus": "virtio-scsi", "size_bytes": 0, "read_only": true}
            ],
            "nics": [{"id": "net0", "backend": {"type": "user"}, "mac": "02:00:00:00:00:01",
                      "limits": {"rx_bps": 8192000}}]
        }))
        .unwrap();
        let caps = Caps::of(&vm);
        assert_eq!(caps.cpu_percent, Some(150.0));
        assert_eq!(caps.disk_read, Some(512.0 + 2048.0), "the lower of a disk's read and total limits, summed");
        assert_eq!(caps.disk_write, None, "disk1 has no write limit: the VM has none as a whole");
        assert_eq!((caps.net_in, caps.net_out), (Some(1000.0), None));
    }
}
