//! Keyboard shortcuts (handled here, listed in the *Keyboard shortcuts* dialog) and the *About* dialog. The
//! shortcuts are off while a console has the keyboard: then every key goes to the guest.

use egui::{Key, KeyboardShortcut, Modifiers};
use porthole_api::VmState;
use porthole_api::client::Action;

use super::theme;
use super::{PortholeApp, Tab};

/// What a shortcut does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    NewVm,
    Search,
    Start,
    ShutDown,
    OpenConsole,
    HostPage,
    Preferences,
    Shortcuts,
}

/// The window's shortcuts, in the order the dialog lists them.
pub const SHORTCUTS: [(Command, KeyboardShortcut, &str); 8] = [
    (Command::NewVm, KeyboardShortcut::new(Modifiers::COMMAND, Key::N), "New VM…"),
    (Command::Search, KeyboardShortcut::new(Modifiers::COMMAND, Key::F), "Search the machines"),
    (
        Command::Start,
        KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::S),
        "Start (or resume) the selected VM",
    ),
    (
        Command::ShutDown,
        KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::D),
        "Shut down the selected VM",
    ),
    (Command::OpenConsole, KeyboardShortcut::new(Modifiers::COMMAND, Key::O), "Open the selected VM's console"),
    (Command::HostPage, KeyboardShortcut::new(Modifiers::COMMAND, Key::H), "Show the selected host's page"),
    (Command::Preferences, KeyboardShortcut::new(Modifiers::COMMAND, Key::Comma), "Preferences"),
    (Command::Shortcuts, KeyboardShortcut::new(Modifiers::NONE, Key::F1), "Keyboard shortcuts"),
];

/// Keys the console handles itself, listed in the dialog too.
const CONSOLE_KEYS: [(&str, &str); 1] = [("F11", "Full screen on or off (console)")];

/// The help dialogs' state.
#[derive(Default)]
pub struct Help {
    pub shortcuts_open: bool,
    pub about_open: bool,
    /// Ctrl+F was pressed: the search field takes the focus when it is drawn next.
    pub focus_search: bool,
}

impl PortholeApp {
    /// Runs the shortcut pressed this frame, if any (none while a console has the keyboard).
    pub(super) fn handle_shortcuts(&mut self, ctx: &egui::Context) {
        if self.consoles.iter().any(|t| t.console.keyboard_captured()) {
            return;
        }
        let pressed = SHORTCUTS.iter().find(|(_, shortcut, _)| ctx.input_mut(|i| i.consume_shortcut(shortcut)));
        let Some(&(command, _, _)) = pressed else { return };
        let selected = self.selected_vm.clone().and_then(|id| {
            self.backend.model().hosts.get(self.selected_host).and_then(|h| h.vms.iter().find(|v| v.id == id).cloned())
        });
        match command {
            Command::NewVm => self.open_wizard(),
            Command::Search => {
                self.tab = Tab::Machines;
                self.help.focus_search = true;
            }
            Command::HostPage => self.tab = Tab::Host,
            Command::Preferences => self.open_preferences(),
            Command::Shortcuts => self.help.shortcuts_open = true,
            Command::Start | Command::ShutDown | Command::OpenConsole => {
                let Some(vm) = selected else {
                    self.backend.model().notify("Select a VM first (click it in the list)", true);
                    return;
                };
                let (host, id, name) = (self.selected_host, vm.id.clone(), vm.name.clone());
                match command {
                    Command::Start if matches!(vm.state, VmState::Stopped | VmState::Suspended) => {
                        self.backend.act(host, format!("Start {name}"), None, move |c| async move {
                            c.action(&id, Action::Start).await
                        });
                    }
                    Command::ShutDown if matches!(vm.state, VmState::Running | VmState::Paused) => {
                        self.backend.act(host, format!("Shut down {name}"), None, move |c| async move {
                            c.shutdown(&id, 60).await
                        });
                    }
                    Command::OpenConsole if matches!(vm.state, VmState::Running | VmState::Paused) => {
                        self.open_console(host, &vm);
                    }
                    _ => self.backend.model().notify(format!("{name} is {}", theme::state_text(vm.state)), true),
                }
            }
        }
    }

    /// The *Keyboard shortcuts* and *About* dialogs.
    pub(super) fn help_windows(&mut self, ctx: &egui::Context) {
        let mut open = self.help.shortcuts_open;
        theme::dialog(ctx, "Keyboard shortcuts").open(&mut open).resizable(false).show(ctx, |ui| {
            egui::Grid::new("shortcuts").num_columns(2).spacing([16.0, 4.0]).striped(true).show(ui, |ui| {
                for (_, shortcut, what) in SHORTCUTS {
                    ui.monospace(ctx.format_shortcut(&shortcut));
                    ui.label(what);
                    ui.end_row();
                }
                let release = (self.settings.release_keys.text(), "Release the keyboard and pointer (console)");
                for (keys, what) in CONSOLE_KEYS.into_iter().chain([release]) {
                    ui.monospace(keys);
                    ui.label(what);
                    ui.end_row();
                }
            });
            ui.weak("While a console has the keyboard, every key goes to the guest: release it first.");
        });
        self.help.shortcuts_open = open;
        let mut open = self.help.about_open;
        theme::dialog(ctx, "About Porthole").open(&mut open).resizable(false).show(ctx, |ui| {
            ui.heading(format!("Porthole {}", porthole_api::VERSION));
            ui.label("Virtual machines of this computer and of remote hosts in one window: create them, see their");
            ui.label("screens, attach ISOs, take snapshots. Local VMs run on Porthole's own KVM engine.");
            ui.add_space(6.0);
            let hosts: Vec<String> = self
                .backend
                .model()
                .hosts
                .iter()
                .map(|h| match &h.info {
                    Some(i) => format!("{}: portholed {} on {}", h.name, i.version, i.hostname),
                    None => format!("{}: not connected", h.name),
                })
                .collect();
            for h in hosts {
                ui.label(h);
            }
        });
        self.help.about_open = open;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortcuts_are_distinct() {
        for (i, (_, a, _)) in SHORTCUTS.iter().enumerate() {
            for (_, b, _) in &SHORTCUTS[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
