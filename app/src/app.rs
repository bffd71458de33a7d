//! The main window, routing only: the hosts sidebar on the left, the notices bar at the bottom, and in the
//! middle the tab bar (*Machines*, *Host*, one tab per console) over the selected tab's view; dialogs float
//! above. Each view and dialog is a module of its own that owns its state (see ARCHITECTURE.md's map of the
//! window).

use std::path::PathBuf;

use porthole_api::HostHandle;

use crate::backend::Backend;
use crate::settings::Settings;

mod clones;
mod cloud_image;
mod consoles;
mod details;
mod drag_drop;
mod graphs;
mod help;
mod host_page;
mod hosts_sidebar;
mod machines;
mod network;
mod notifications;
mod osinfo;
mod preferences;
mod snapshots;
pub(crate) mod theme;
mod vm_settings;
mod wizard;
pub use cloud_image::{CloudForm, find_ssh_key, image_text};
pub use consoles::VncTarget;
pub use hosts_sidebar::AddHost;
pub use machines::{GroupBy, MachineView};
pub use network::{WizardNetwork, ssh_command};
pub use osinfo::{OsGuess, WizardOs};
pub use snapshots::{TreeRow, tree_rows};
pub use vm_settings::SettingsForm;
use wizard::tag_problem;
pub use wizard::{Wizard, parse_tags, vm_name_problem};

/// The tab shown in the middle of the window.
enum Tab {
    Machines,
    /// The selected host's page.
    Host,
    Console(usize),
}

/// The window's state: what is selected and open; each view's own state is a field.
pub struct PortholeApp {
    pub backend: Backend,
    settings_path: Option<PathBuf>,
    settings: Settings,
    /// Index of the first remote host in the backend's list (0 is the local host).
    selected_host: usize,
    selected_vm: Option<String>,
    pub search: String,
    pub wizard: Option<Wizard>,
    pub add_host: Option<AddHost>,
    confirm_delete: Option<(usize, String, String)>,
    consoles: Vec<consoles::ConsoleTab>,
    /// The "Connect to VNC server…" dialog's address.
    pub vnc_dialog: Option<String>,
    tab: Tab,
    /// When the open VM's stats were last fetched.
    stats_fetched: Option<std::time::Instant>,
    /// `PORTHOLE_FIRST_FRAME_FILE`: where to note when the first frame was drawn (benchmarks).
    first_frame_report: Option<PathBuf>,
    pub group_by: GroupBy,
    /// The machine list as rows or as a grid of screens.
    pub view: MachineView,
    /// VMs ticked in the list, (host, VM id), for actions on several at once.
    pub checked: std::collections::BTreeSet<(usize, String)>,
    thumbnails: machines::Thumbnails,
    /// The serial console's input line.
    pub serial_line: String,
    /// The tags field of the open VM's details: (host, VM id, text).
    tags_edit: Option<(usize, String, String)>,
    /// When the open VM's serial output was last fetched.
    serial_fetched: Option<std::time::Instant>,
    /// `porthole --console NAME`: the local VM whose console to open once the list has arrived.
    console_by_name: Option<String>,
    /// When the open running VM's details (firmware boot status, network state) were last fetched.
    details_fetched: Option<std::time::Instant>,
    /// The port-forward form of the network section.
    forward_form: network::ForwardForm,
    /// The network section's card editor.
    cards_form: network::CardsForm,
    nic_limits_form: network::NicLimitsForm,
    /// Where VMs were drawn last frame (list rows and the details), for dropped ISOs: (area, host, VM id).
    drop_zones: Vec<(egui::Rect, usize, String)>,
    /// The snapshot section's dialogs and refresh.
    snapshot_ui: snapshots::SnapshotUi,
    /// The *Clone…* dialog.
    clone_form: Option<clones::CloneForm>,
    /// The Settings view of a VM, shown in place of its details.
    vm_settings: Option<vm_settings::SettingsForm>,
    /// The *Host* tab.
    host_page: host_page::HostPage,
    /// Keyboard shortcuts and the help dialogs.
    help: help::Help,
    /// The *Preferences* dialog and what the window remembers between runs.
    preferences: preferences::Preferences,
    /// Toasts of new notices.
    pub notifications: notifications::Notifications,
    /// The icon font was added to the window's context.
    fonts_installed: bool,
}

impl PortholeApp {
    /// The app with the local host (connected through `local`) and the remote hosts of the settings.
    pub fn new(
        backend: Backend,
        local: impl FnOnce() -> Result<HostHandle, String> + Send + 'static,
        settings_path: Option<PathBuf>,
    ) -> Self {
        let (settings, problem) = match &settings_path {
            Some(p) => crate::settings::load(p),
            None => (Settings::default(), None),
        };
        if let Some(problem) = problem {
            backend.model().notify(problem, true);
        }
        backend.add_host("Local".into(), "this computer".into(), local);
        for r in &settings.remotes {
            hosts_sidebar::connect_remote(&backend, r);
        }
        let mut app = PortholeApp {
            backend,
            settings_path,
            settings,
            selected_host: 0,
            selected_vm: None,
            search: String::new(),
            wizard: None,
            add_host: None,
            confirm_delete: None,
            consoles: Vec::new(),
            vnc_dialog: None,
            tab: Tab::Machines,
            stats_fetched: None,
            first_frame_report: std::env::var_os("PORTHOLE_FIRST_FRAME_FILE").map(PathBuf::from),
            group_by: GroupBy::default(),
            view: MachineView::default(),
            checked: Default::default(),
            thumbnails: Default::default(),
            serial_line: String::new(),
            tags_edit: None,
            serial_fetched: None,
            console_by_name: None,
            details_fetched: None,
            forward_form: Default::default(),
            cards_form: Default::default(),
            nic_limits_form: Default::default(),
            drop_zones: Vec::new(),
            snapshot_ui: Default::default(),
            clone_form: None,
            vm_settings: None,
            host_page: Default::default(),
            help: Default::default(),
            preferences: Default::default(),
            notifications: Default::default(),
            fonts_installed: false,
        };
        app.restore_from_settings();
        app
    }

    /// The window size and position to open with (from the last run), if any.
    pub fn saved_window(settings_path: Option<&std::path::Path>) -> Option<crate::settings::WindowGeometry> {
        settings_path.and_then(|p| crate::settings::load(p).0.window)
    }

    /// Opens the console of the local VM named `name` as soon as the local host's list has it (`porthole
    /// --console NAME`, like `virt-viewer NAME`).
    pub fn open_console_by_name(&mut self, name: String) {
        self.console_by_name = Some(name);
    }

    /// The titles of the open console tabs, in order.
    pub fn console_titles(&self) -> Vec<String> {
        self.consoles.iter().map(|t| t.console.title.clone()).collect()
    }

    /// What each open console tab is doing ("Connecting…", or why it closed), in order.
    pub fn console_states(&self) -> Vec<String> {
        self.consoles.iter().map(|t| t.console.status()).collect()
    }

    /// Console screen changes shown so far, over every console (for the frame statistics).
    pub fn console_frames_shown(&self) -> u64 {
        self.consoles.iter().map(|t| t.console.frames_shown).sum()
    }

    /// The selected host and VM.
    pub fn selection(&self) -> (usize, Option<String>) {
        (self.selected_host, self.selected_vm.clone())
    }

    /// Adds the icon font to the window's context (before its first frame; `ui` does it otherwise).
    pub fn install_fonts(&mut self, ctx: &egui::Context) {
        if !self.fonts_installed {
            theme::install_fonts(ctx);
            self.fonts_installed = true;
            ctx.request_repaint();
        }
    }

    /// Draws the whole window.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.install_fonts(ui.ctx());
        if let Some(path) = self.first_frame_report.take() {
            // For `porthole-bench gui`: when the first frame was laid out, in ms since the process started.
            let _ = std::fs::write(path, format!("{}\n", crate::started().elapsed().as_secs_f64() * 1000.0));
        }
        self.handle_drops(ui);
        self.apply_preferences(ui.ctx());
        self.handle_shortcuts(ui.ctx());
        self.open_requested_consoles(ui.ctx());
        egui::Panel::left("hosts").resizable(true).default_size(200.0).show(ui, |ui| self.hosts_panel(ui));
        egui::Panel::bottom("notices").show(ui, |ui| self.notices(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                if theme::selectable(ui, matches!(self.tab, Tab::Machines), theme::MACHINES, "Machines").clicked() {
                    self.tab = Tab::Machines;
                }
                let host = theme::selectable(ui, matches!(self.tab, Tab::Host), theme::HOST, "Host");
                if host.on_hover_text("The selected host: capacity, image library, tasks").clicked() {
                    self.tab = Tab::Host;
                }
                let mut close = None;
                for (i, tab) in self.consoles.iter().enumerate() {
                    let c = &tab.console;
                    let selected = matches!(self.tab, Tab::Console(j) if j == i);
                    if theme::selectable(ui, selected, theme::CONSOLE, &c.title).clicked() {
                        self.tab = Tab::Console(i);
                    }
                    if theme::icon_button(ui, theme::CLOSE, &format!("Close {}", c.title)).clicked() {
                        close = Some(i);
                    }
                }
                if let Some(i) = close {
                    self.consoles.remove(i);
                    self.tab = Tab::Machines;
                    self.remember_consoles();
                }
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    let menu = ui.menu_button((theme::MENU.rich_text(), "Menu"), |ui| {
                        if theme::menu_item(ui, theme::PREFERENCES, "Preferences…").clicked() {
                            self.open_preferences();
                        }
                        if theme::menu_item(ui, theme::KEYBOARD, "Keyboard shortcuts").clicked() {
                            self.help.shortcuts_open = true;
                        }
                        if theme::menu_item(ui, theme::ABOUT, "About Porthole").clicked() {
                            self.help.about_open = true;
                        }
                    });
                    menu.response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, "Menu"));
                });
            });
            ui.separator();
            match self.tab {
                Tab::Console(i) if i < self.consoles.len() => self.console_tab(ui, i),
                Tab::Host => self.host_page(ui),
                _ => self.machines(ui),
            }
        });
        self.console_windows(ui.ctx());
        self.wizard_window(ui.ctx());
        self.add_host_window(ui.ctx());
        self.delete_window(ui.ctx());
        self.snapshot_windows(ui.ctx());
        self.clone_window(ui.ctx());
        self.vnc_window(ui.ctx());
        self.help_windows(ui.ctx());
        self.preferences_window(ui.ctx());
        self.toasts(ui.ctx());
    }

    /// Why host `host` lacks `feature` (the greyed control's tooltip), or `None` when it has it (or is not
    /// connected yet: its controls then fail with the host's own message).
    pub(super) fn lacks(&self, host: usize, feature: porthole_api::Feature) -> Option<String> {
        let connection = self.backend.model().hosts.get(host).and_then(|h| h.connection.clone());
        connection.and_then(|c| c.lacks(feature))
    }

    fn save_settings(&self) {
        if let Some(p) = &self.settings_path
            && let Err(e) = crate::settings::save(p, &self.settings)
        {
            self.backend.model().notify(format!("cannot save the settings to {}: {e}", p.display()), true);
        }
    }
}
