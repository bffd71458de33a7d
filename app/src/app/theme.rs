//! How a VM's state looks: its words and its colour.

use porthole_api::VmState;

/// The colour a state is shown in (None: the usual text colour, for stopped and passing states).
pub fn state_color(s: VmState, crashed: bool, visuals: &egui::Visuals) -> Option<egui::Color32> {
    match s {
        _ if crashed => Some(visuals.error_fg_color),
        VmState::Running => Some(egui::Color32::from_rgb(0x3c, 0xa0, 0x4a)),
        VmState::Paused => Some(visuals.warn_fg_color),
        VmState::Suspended => Some(egui::Color32::from_rgb(0x4a, 0x8c, 0xd8)),
        VmState::Crashed => Some(visuals.error_fg_color),
        VmState::Stopped | VmState::Starting | VmState::Stopping => None,
    }
}

/// A VM's state as a label in its colour.
pub fn state_label(ui: &mut egui::Ui, vm: &porthole_api::Vm) -> egui::Response {
    let text = egui::RichText::new(state_text(vm.state));
    match state_color(vm.state, vm.crash.is_some(), ui.visuals()) {
        Some(c) => ui.label(text.color(c)),
        None => ui.label(text),
    }
}

pub fn state_text(s: VmState) -> &'static str {
    match s {
        VmState::Stopped => "stopped",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "shutting down",
        VmState::Crashed => "crashed",
        VmState::Suspended => "suspended",
    }
}
