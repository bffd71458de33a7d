//! The main window: hosts on the left, the selected host's VMs (searchable) with the selected VM's details,
//! consoles in tabs, the create wizard, the add-host dialog, and notices at the bottom.

use std::path::PathBuf;

use porthole_api::client::Action;
use porthole_api::{BootSpec, Client, CreateVm, DiskFormat, VmState};

use crate::backend::{Backend, image_name};
use crate::console::Console;
use crate::settings::{RemoteHost, Settings};

mod clones;
mod cloud_image;
mod help;
mod host_page;
mod machines;
mod network;
mod osinfo;
mod preferences;
mod snapshots;
mod vm_settings;
pub use cloud_image::{CloudForm, find_ssh_key, image_text};
pub use machines::{GroupBy, MachineView};
pub use network::{WizardNetwork, ssh_command};
pub use osinfo::{OsGuess, WizardOs};
pub use snapshots::{TreeRow, tree_rows};
pub use vm_settings::SettingsForm;

/// The create wizard's fields.
#[derive(Debug, Clone)]
pub struct Wizard {
    pub host: usize,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub iso: String,
    /// The disk: a new empty one (`disk_gib`, 0 for none) or a copy of this library image.
    pub disk_image: Option<String>,
    /// Comma-separated tags.
    pub tags: String,
    pub network: WizardNetwork,
    /// The host's bridge, for `WizardNetwork::Bridge`.
    pub bridge: String,
    /// The format of the new disk (or of the copy).
    pub disk_format: DiskFormat,
    /// *From a cloud image*: the seed's fields (`disk_image` names the image). None: another kind of disk.
    pub cloud: Option<CloudForm>,
    /// The seed's defaults, read when the wizard opened (the local user, the first key of `~/.ssh`).
    pub cloud_defaults: CloudForm,
    /// The OS on the ISO, as the host's osinfo-db identifies it.
    pub os: WizardOs,
}

/// Why the daemon would refuse `name` for a new VM on a host whose VMs are named `taken`.
pub fn vm_name_problem(name: &str, taken: &[String]) -> Option<String> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if name.is_empty() {
        Some("Give the VM a name.".to_owned())
    } else if !ok {
        Some("A name is 1-63 letters, digits, '-', '_' or '.', not starting with '.'.".to_owned())
    } else if taken.iter().any(|t| t == name) {
        Some(format!("There is a VM named {name:?} already."))
    } else {
        None
    }
}

/// Tags typed as "web, prod" → ["web", "prod"].
pub fn parse_tags(text: &str) -> Vec<String> {
    text.split([',', ' ']).map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// Why a tag would be refused by the daemon.
fn tag_problem(tag: &str) -> Option<String> {
    let ok = tag.len() <= porthole_api::MAX_TAG_LEN && tag.chars().all(|c| c.is_alphanumeric() || "-_.:".contains(c));
    (!ok)
        .then(|| format!("Tag {tag:?}: use up to {} letters, digits, '-', '_', '.' or ':'.", porthole_api::MAX_TAG_LEN))
}

impl Wizard {
    fn new(host: usize) -> Self {
        Wizard {
            host,
            name: String::new(),
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: porthole_api::DEFAULT_DISK_GIB,
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
            iso: String::new(),
            disk_image: None,
            tags: String::new(),
            network: WizardNetwork::Nat,
            bridge: String::new(),
            disk_format: DiskFormat::Qcow2,
            cloud: None,
            cloud_defaults: CloudForm::discover(std::env::var_os("HOME").map(PathBuf::from).as_deref()),
            os: WizardOs::default(),
        }
    }

    /// The request the wizard sends (the ISO, if any, is added once uploaded).
    pub fn request(&self) -> CreateVm {
        let has_disk = self.disk_image.is_some() || self.disk_gib > 0;
        let mut request = CreateVm {
            disk_gib: self.disk_gib,
            disk_image: self.disk_image.clone(),
            tags: parse_tags(&self.tags),
            nics: network::wizard_nics(self),
            disk_format: has_disk.then_some(self.disk_format),
            ..CreateVm::new(self.name.clone(), self.vcpus, self.memory_mib)
        };
        if let Some(spec) = self.cloud_init() {
            // The disk is a qcow2 overlay on the image.
            request.cloud_init = Some(spec);
            request.disk_format = Some(DiskFormat::Qcow2);
        }
        if !self.kernel.trim().is_empty() {
            request.boot = Some(BootSpec {
                kernel: self.kernel.trim().to_owned(),
                initrd: Some(self.initrd.trim().to_owned()).filter(|s| !s.is_empty()),
                cmdline: self.cmdline.clone(),
            });
        }
        request
    }

    /// What is wrong with the fields (shown next to them, before Create is allowed).
    pub fn problems(&self, host_memory_mib: Option<u64>, taken: &[String]) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(vm_name_problem(&self.name, taken));
        if let Some(host) = host_memory_mib
            && self.memory_mib > host
        {
            p.push(format!("The host has only {host} MiB of memory."));
        }
        if self.memory_mib < 4 {
            p.push("A VM needs at least 4 MiB of memory.".to_owned());
        }
        if self.kernel.trim().is_empty() && self.iso.trim().is_empty() && self.disk_image.is_none() {
            p.push(
                "Choose what the VM boots: an ISO, a disk image (a copy, or a cloud image), or a Linux kernel (or PVH \
                 image)."
                    .to_owned(),
            );
        }
        if !self.kernel.trim().is_empty() && !std::path::Path::new(self.kernel.trim()).is_file() {
            p.push(format!("No kernel file at {}.", self.kernel.trim()));
        }
        if !self.iso.trim().is_empty() && !std::path::Path::new(self.iso.trim()).is_file() {
            p.push(format!("No ISO file at {}.", self.iso.trim()));
        }
        if self.disk_image.as_deref() == Some("") && self.cloud.is_none() {
            p.push("Choose the library image to copy as the disk.".to_owned());
        }
        let tags = parse_tags(&self.tags);
        p.extend(tags.iter().filter_map(|t| tag_problem(t)));
        if tags.len() > porthole_api::MAX_TAGS {
            p.push(format!("At most {} tags.", porthole_api::MAX_TAGS));
        }
        if self.network == WizardNetwork::Bridge && self.bridge.trim().is_empty() {
            p.push("Name the host's bridge to attach the VM to (like br0).".to_owned());
        }
        p
    }
}

/// The add-host dialog's fields.
#[derive(Debug, Clone, Default)]
pub struct AddHost {
    /// The name of the host being edited (None: adding a new one).
    pub editing: Option<String>,
    pub name: String,
    pub address: String,
    pub token: String,
    pub fingerprint: String,
}

enum Tab {
    Machines,
    /// The selected host's page.
    Host,
    Console(usize),
}

/// A VNC server opened directly (`porthole vnc://HOST:PORT`, `vnc+unix:///PATH`, or "Connect to VNC server…").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VncTarget {
    Tcp(String),
    Unix(PathBuf),
}

/// The address as `porthole` takes it: `vnc://HOST:PORT` or `vnc+unix:///PATH`.
impl std::fmt::Display for VncTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VncTarget::Tcp(a) => write!(f, "vnc://{a}"),
            VncTarget::Unix(p) => write!(f, "vnc+unix://{}", p.display()),
        }
    }
}

impl std::str::FromStr for VncTarget {
    type Err = String;

    /// `vnc://HOST[:PORT]` (port 5900 by default; `:N` below 100 is display N, port 5900 + N) or
    /// `vnc+unix:///PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("vnc+unix://") {
            if path.starts_with('/') {
                return Ok(VncTarget::Unix(PathBuf::from(path)));
            }
        } else if let Some(rest) = s.strip_prefix("vnc://") {
            let rest = rest.trim_end_matches('/');
            if !rest.is_empty() {
                let (host, port) = match rest.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => match p.parse::<u16>() {
                        Ok(n) if n < 100 => (h.to_owned(), 5900 + n),
                        Ok(n) => (h.to_owned(), n),
                        Err(_) => return Err(format!("{s:?}: the port is not a number")),
                    },
                    _ => (rest.to_owned(), 5900),
                };
                return Ok(VncTarget::Tcp(format!("{host}:{port}")));
            }
        }
        Err(format!("{s:?} is not vnc://HOST[:PORT] or vnc+unix:///PATH"))
    }
}

impl VncTarget {
    fn title(&self) -> String {
        match self {
            VncTarget::Tcp(a) => a.clone(),
            VncTarget::Unix(p) => p.display().to_string(),
        }
    }

    /// A connected stream: Unix directly; TCP bridged to a socket pair (the RFB client speaks over Unix
    /// streams) by two copying threads.
    fn connect(&self) -> Result<std::os::unix::net::UnixStream, String> {
        match self {
            VncTarget::Unix(p) => {
                std::os::unix::net::UnixStream::connect(p).map_err(|e| format!("{}: {e}", p.display()))
            }
            VncTarget::Tcp(addr) => {
                let tcp = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
                let (mut t1, mut u1) =
                    (tcp.try_clone().map_err(|e| e.to_string())?, theirs.try_clone().map_err(|e| e.to_string())?);
                let (mut t2, mut u2) = (tcp, theirs);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut t1, &mut u1);
                    let _ = u1.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut t2);
                    let _ = t2.shutdown(std::net::Shutdown::Both);
                });
                Ok(ours)
            }
        }
    }
}

/// A console tab: a VM's (host index and VM id) or a VNC server's.
struct ConsoleTab {
    vm: Option<(usize, String)>,
    target: Option<VncTarget>,
    console: Console,
    /// The password field shown when a server asks for one.
    password: String,
    /// Shown in a window of its own instead of the tab.
    detached: bool,
}

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
    consoles: Vec<ConsoleTab>,
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
}

/// The colour a state is shown in (None: the usual text colour, for stopped and passing states).
fn state_color(s: VmState, crashed: bool, visuals: &egui::Visuals) -> Option<egui::Color32> {
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
fn state_label(ui: &mut egui::Ui, vm: &porthole_api::Vm) -> egui::Response {
    let text = egui::RichText::new(state_text(vm.state));
    match state_color(vm.state, vm.crash.is_some(), ui.visuals()) {
        Some(c) => ui.label(text.color(c)),
        None => ui.label(text),
    }
}

fn state_text(s: VmState) -> &'static str {
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

impl PortholeApp {
    /// The app with the local host (connected through `local`) and the remote hosts of the settings.
    pub fn new(
        backend: Backend,
        local: impl FnOnce() -> Result<Client, String> + Send + 'static,
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
            connect_remote(&backend, r);
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
            drop_zones: Vec::new(),
            snapshot_ui: Default::default(),
            clone_form: None,
            vm_settings: None,
            host_page: Default::default(),
            help: Default::default(),
            preferences: Default::default(),
        };
        app.restore_from_settings();
        app
    }

    /// Opens the create wizard for the selected host (*New VM…*, Ctrl+N).
    pub fn open_wizard(&mut self) {
        self.wizard = Some(Wizard::new(self.selected_host));
        self.backend.load_images(self.selected_host);
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

    /// Console screen changes shown so far, over every console (for the frame statistics).
    pub fn console_frames_shown(&self) -> u64 {
        self.consoles.iter().map(|t| t.console.frames_shown).sum()
    }

    /// The selected host and VM.
    pub fn selection(&self) -> (usize, Option<String>) {
        (self.selected_host, self.selected_vm.clone())
    }

    /// Draws the whole window.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        if let Some(path) = self.first_frame_report.take() {
            // For `porthole-bench gui`: when the first frame was laid out, in ms since the process started.
            let _ = std::fs::write(path, format!("{}\n", crate::started().elapsed().as_secs_f64() * 1000.0));
        }
        self.handle_drops(ui);
        self.apply_preferences(ui.ctx());
        self.handle_shortcuts(ui.ctx());
        if let Some(name) = self.console_by_name.take() {
            let mut m = self.backend.model();
            let local =
                m.hosts.first().map(|h| (h.connected, h.error.clone(), h.vms.iter().find(|v| v.name == name).cloned()));
            match local {
                Some((_, _, Some(vm)))
                    if matches!(vm.state, VmState::Running | VmState::Paused) || vm.crash.is_some() =>
                {
                    m.open_console = Some((0, vm.id));
                }
                Some((_, _, Some(_))) => m.notify(format!("{name} is not running: start it to see its console"), true),
                Some((true, _, None)) => m.notify(format!("There is no VM named {name} on this computer"), true),
                Some((_, Some(_), None)) => {} // the host's own error is shown
                _ => {
                    drop(m);
                    self.console_by_name = Some(name); // not connected yet: look again next frame
                    ui.ctx().request_repaint_after(std::time::Duration::from_millis(100));
                }
            }
        }
        let wanted = self.backend.model().open_console.take();
        if let Some((host, id)) = wanted {
            let vm = self.backend.model().hosts.get(host).and_then(|h| h.vms.iter().find(|v| v.id == id).cloned());
            match vm {
                Some(vm) => {
                    self.selected_host = host;
                    self.selected_vm = Some(id);
                    self.open_console(host, &vm);
                }
                // Not in the list yet: try again next frame.
                None => self.backend.model().open_console = Some((host, id)),
            }
        }
        egui::Panel::left("hosts").resizable(true).default_size(200.0).show(ui, |ui| self.hosts_panel(ui));
        egui::Panel::bottom("notices").show(ui, |ui| self.notices(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                if ui.selectable_label(matches!(self.tab, Tab::Machines), "Machines").clicked() {
                    self.tab = Tab::Machines;
                }
                let host = ui.selectable_label(matches!(self.tab, Tab::Host), "Host");
                if host.on_hover_text("The selected host: capacity, image library, tasks").clicked() {
                    self.tab = Tab::Host;
                }
                let mut close = None;
                for (i, tab) in self.consoles.iter().enumerate() {
                    let c = &tab.console;
                    if ui.selectable_label(matches!(self.tab, Tab::Console(j) if j == i), &c.title).clicked() {
                        self.tab = Tab::Console(i);
                    }
                    if ui.small_button("×").on_hover_text(format!("Close {}", c.title)).clicked() {
                        close = Some(i);
                    }
                }
                if let Some(i) = close {
                    self.consoles.remove(i);
                    self.tab = Tab::Machines;
                    self.remember_consoles();
                }
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    ui.menu_button("Menu", |ui| {
                        if ui.button("Preferences…").clicked() {
                            self.open_preferences();
                        }
                        if ui.button("Keyboard shortcuts").clicked() {
                            self.help.shortcuts_open = true;
                        }
                        if ui.button("About Porthole").clicked() {
                            self.help.about_open = true;
                        }
                    });
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
    }

    fn vnc_window(&mut self, ctx: &egui::Context) {
        let Some(address) = self.vnc_dialog.as_mut() else { return };
        let mut open = true;
        let mut go = None;
        egui::Window::new("Connect to a VNC server").open(&mut open).collapsible(false).show(ctx, |ui| {
            let l = ui.label("Server");
            ui.add(egui::TextEdit::singleline(address).hint_text("vnc://host:5901 or vnc+unix:///path/to/socket"))
                .labelled_by(l.id);
            let parsed = address.trim().parse::<VncTarget>();
            if let Err(e) = &parsed
                && !address.is_empty()
            {
                ui.colored_label(ui.visuals().warn_fg_color, e);
            }
            if ui.add_enabled(parsed.is_ok(), egui::Button::new("Open console")).clicked() {
                go = parsed.ok();
            }
            if !self.settings.recent_vnc.is_empty() {
                ui.separator();
                ui.label("Recent");
                for recent in &self.settings.recent_vnc {
                    if ui.link(recent).clicked() {
                        go = recent.parse().ok();
                    }
                }
            }
        });
        if let Some(target) = go {
            self.vnc_dialog = None;
            self.open_vnc(target, None);
        } else if !open {
            self.vnc_dialog = None;
        }
    }

    fn hosts_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Hosts");
        ui.separator();
        let hosts: Vec<(usize, String, String)> = {
            let m = self.backend.model();
            m.hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.name.is_empty())
                .map(|(i, h)| {
                    let state = match (&h.error, h.connected) {
                        (Some(_), _) => "unreachable".to_owned(),
                        (None, true) => format!("{} VMs", h.vms.len()),
                        (None, false) => "connecting…".to_owned(),
                    };
                    (i, h.name.clone(), state)
                })
                .collect()
        };
        for (i, name, state) in hosts {
            let label = format!("{name} — {state}");
            if ui.selectable_label(self.selected_host == i, label).clicked() {
                self.selected_host = i;
                self.selected_vm = None;
            }
        }
        ui.separator();
        if ui.button("Add host…").clicked() {
            self.add_host = Some(AddHost::default());
        }
        if ui.button("Connect to VNC server…").clicked() {
            self.vnc_dialog = Some(String::new());
        }
        if self.selected_host > 0 && ui.button("Edit host…").clicked() {
            let name = self.backend.model().hosts.get(self.selected_host).map(|h| h.name.clone()).unwrap_or_default();
            if let Some(r) = self.settings.remotes.iter().find(|r| r.name == name) {
                self.add_host = Some(AddHost {
                    editing: Some(r.name.clone()),
                    name: r.name.clone(),
                    address: r.address.clone(),
                    token: r.token.clone(),
                    fingerprint: r.fingerprint.clone(),
                });
            }
        }
        if self.selected_host > 0 && ui.button("Remove host").clicked() {
            let name = self.backend.model().hosts.get(self.selected_host).map(|h| h.name.clone()).unwrap_or_default();
            self.settings.remotes.retain(|r| r.name != name);
            self.save_settings();
            self.backend.remove_host(self.selected_host);
            self.selected_host = 0;
        }
    }

    fn notices(&mut self, ui: &mut egui::Ui) {
        let (notice, progress) = {
            let m = self.backend.model();
            (m.notices.last().cloned(), m.progress.clone())
        };
        for p in progress {
            ui.horizontal(|ui| {
                if ui.button("Cancel upload").on_hover_text(format!("Stop: {}", p.what)).clicked() {
                    self.backend.cancel_upload(&p.what);
                }
                ui.add(egui::ProgressBar::new(p.fraction).text(format!("{} {:.0}%", p.what, p.fraction * 100.0)));
            });
        }
        match notice {
            Some(n) if n.error => ui.colored_label(ui.visuals().error_fg_color, n.text),
            Some(n) => ui.label(n.text),
            None => ui.label("Ready."),
        };
    }

    fn details(&mut self, ui: &mut egui::Ui, host: usize, vm: &porthole_api::Vm) {
        if self.settings_open(host, &vm.id) {
            return self.settings_view(ui, host, vm);
        }
        ui.horizontal(|ui| {
            ui.heading(&vm.name);
            if vm.template {
                ui.label(egui::RichText::new("template").strong()).on_hover_text(clones::TEMPLATE_START);
            }
        });
        let linked = {
            let m = self.backend.model();
            let vms = m.hosts.get(host).map(|h| h.vms.as_slice()).unwrap_or_default();
            clones::linked_text(vm, vms)
        };
        egui::Grid::new("details").num_columns(2).show(ui, |ui| {
            ui.label("State");
            state_label(ui, vm);
            ui.end_row();
            ui.label("vCPUs");
            ui.label(vm.vcpus.to_string());
            ui.end_row();
            ui.label("Memory");
            ui.label(format!("{} MiB", vm.memory_mib));
            ui.end_row();
            ui.label("Disk");
            ui.label(clones::disk_text(vm));
            ui.end_row();
            if let Some(text) = &linked {
                ui.label("Linked clone");
                ui.label(text)
                    .on_hover_text("Its disk records its own changes over that VM's disk, which stays read-only");
                ui.end_row();
            }
            if let Some(c) = &vm.cloud_init {
                ui.label("Cloud-init");
                ui.label(format!("user {}, hostname {}", c.user, c.hostname));
                ui.end_row();
            }
            ui.label("Boots");
            ui.label(vm.boot.as_ref().map(|b| b.kernel.clone()).unwrap_or_else(|| {
                let order: Vec<&str> = vm
                    .boot_order
                    .iter()
                    .map(|d| match d {
                        porthole_api::BootDevice::Cdrom => "CD/DVD",
                        porthole_api::BootDevice::Disk => "disk",
                    })
                    .collect();
                format!("firmware (SeaBIOS): {}", order.join(", then "))
            }));
            ui.end_row();
            ui.label("CD/DVD");
            ui.label(vm.media.clone().unwrap_or_else(|| "empty".into()));
            ui.end_row();
            self.ssh_row(ui, host, vm);
            let l = ui.label("Tags");
            ui.horizontal(|ui| {
                let current = vm.tags.join(", ");
                let edit = match &mut self.tags_edit {
                    Some((h, v, text)) if *h == host && *v == vm.id => text,
                    other => &mut other.insert((host, vm.id.clone(), current.clone())).2,
                };
                ui.add(egui::TextEdit::singleline(edit).hint_text("web, prod").desired_width(160.0)).labelled_by(l.id);
                let tags = parse_tags(edit);
                let problem = tags.iter().find_map(|t| tag_problem(t));
                if *edit != current && ui.add_enabled(problem.is_none(), egui::Button::new("Save tags")).clicked() {
                    let id = vm.id.clone();
                    let change = porthole_api::UpdateVm { tags: Some(tags), ..Default::default() };
                    self.backend.act(host, format!("Tag {}", vm.name), None, move |c| async move {
                        c.update_vm(&id, &change).await
                    });
                }
                if let Some(p) = problem {
                    ui.colored_label(ui.visuals().warn_fg_color, p);
                }
            });
            ui.end_row();
        });
        if let Some(crash) = &vm.crash {
            // The crashed VM is kept (its console still shows the last screen) until it is forced off.
            ui.colored_label(ui.visuals().error_fg_color, format!("Crashed: {}", crash.reason));
        } else if let Some(exit) = &vm.last_exit {
            ui.label(format!("Last stop: {}", exit.reason));
        }
        // A running VM's details (what its firmware says, its network cards' state), refreshed every 2 s while
        // they are open.
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            if self.details_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(2)) {
                self.backend.load_details(host, vm.id.clone());
                self.details_fetched = Some(std::time::Instant::now());
            }
            ui.ctx().request_repaint_after(std::time::Duration::from_secs(2));
        }
        if vm.boot.is_none() && matches!(vm.state, VmState::Running | VmState::Paused) {
            let status = match &self.backend.model().boot_status {
                Some((h, id, text)) if *h == host && *id == vm.id => Some(text.clone()),
                _ => None,
            };
            if let Some(text) = status {
                ui.label(format!("Firmware: {text}"));
            }
        }
        let id = vm.id.clone();
        let running = matches!(vm.state, VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting)
            || vm.crash.is_some();
        ui.horizontal_wrapped(|ui| {
            let act = |app: &Self, what: &str, action: Action| {
                let id = id.clone();
                app.backend.act(host, format!("{what} {}", vm.name), None, move |c| async move {
                    c.action(&id, action).await
                });
            };
            let (start, what) =
                if vm.state == VmState::Suspended { ("Resume from disk", "Resume") } else { ("Start", "Start") };
            let r = ui.add_enabled(!running && !vm.template, egui::Button::new(start));
            let r = if vm.template { r.on_disabled_hover_text(clones::TEMPLATE_START) } else { r };
            if r.clicked() {
                act(self, what, Action::Start);
            }
            if ui.add_enabled(running, egui::Button::new("Shut down")).clicked() {
                let id = id.clone();
                self.backend.act(host, format!("Shut down {}", vm.name), None, move |c| async move {
                    c.shutdown(&id, 60).await
                });
            }
            if ui.add_enabled(running, egui::Button::new("Force off")).clicked() {
                act(self, "Force off", Action::Poweroff);
            }
            if ui.add_enabled(running, egui::Button::new("Reset")).clicked() {
                act(self, "Reset", Action::Reset);
            }
            if vm.state == VmState::Paused {
                if ui.button("Resume").clicked() {
                    act(self, "Resume", Action::Resume);
                }
            } else if ui.add_enabled(vm.state == VmState::Running, egui::Button::new("Pause")).clicked() {
                act(self, "Pause", Action::Pause);
            }
            let live = matches!(vm.state, VmState::Running | VmState::Paused) && vm.crash.is_none();
            if ui
                .add_enabled(live, egui::Button::new("Suspend"))
                .on_hover_text("Save the running VM to disk and end it: Start resumes it where it was")
                .clicked()
            {
                act(self, "Suspend", Action::Suspend);
            }
            if ui.add_enabled(running, egui::Button::new("Open console")).clicked() {
                self.open_console(host, vm);
            }
            if ui.button("Insert ISO…").clicked()
                && let Some(path) = rfd::FileDialog::new().add_filter("Disc images", &["iso", "img"]).pick_file()
            {
                self.attach(host, &id, path);
            }
            if ui.add_enabled(vm.media.is_some(), egui::Button::new("Eject")).clicked() {
                let id = id.clone();
                self.backend.act(host, format!("Eject from {}", vm.name), None, move |c| async move {
                    c.change_media(&id, None).await
                });
            }
            if ui.button("Settings…").on_hover_text("Name, hardware, disks, CD/DVD, boot, network").clicked() {
                self.open_settings(host, vm);
            }
            if ui.add_enabled(!running, egui::Button::new("Delete…")).clicked() {
                self.confirm_delete = Some((host, id.clone(), vm.name.clone()));
            }
            self.clone_buttons(ui, host, vm);
        });
        self.network_section(ui, host, vm);
        self.snapshots_section(ui, host, vm);
        egui::CollapsingHeader::new("Performance").default_open(false).show(ui, |ui| {
            if self.stats_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1)) {
                self.backend.load_stats(host, id.clone());
                self.stats_fetched = Some(std::time::Instant::now());
                ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
            }
            let samples = match &self.backend.model().stats {
                Some((h, v, s)) if *h == host && *v == id => s.clone(),
                _ => Vec::new(),
            };
            performance(ui, "vm", "No samples yet (the VM is not running, or it just started).", &samples);
        });
        egui::CollapsingHeader::new("Serial console").default_open(false).show(ui, |ui| {
            // While open, the output is fetched once a second.
            if running && self.serial_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1)) {
                self.backend.load_serial(host, id.clone());
                self.serial_fetched = Some(std::time::Instant::now());
                ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
            }
            let lines = match &self.backend.model().serial {
                Some((h, v, lines)) if *h == host && *v == id => lines.clone(),
                _ => Vec::new(),
            };
            egui::ScrollArea::vertical().id_salt("serial").max_height(200.0).stick_to_bottom(true).show(ui, |ui| {
                for l in lines {
                    ui.monospace(l);
                }
            });
            ui.horizontal(|ui| {
                let l = ui.label("Type into the serial console");
                let r = ui.add_enabled(
                    vm.state == VmState::Running,
                    egui::TextEdit::singleline(&mut self.serial_line).hint_text("a line, sent with Enter"),
                );
                let r = r.labelled_by(l.id);
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if (ui.add_enabled(vm.state == VmState::Running, egui::Button::new("Send line")).clicked() || enter)
                    && vm.state == VmState::Running
                {
                    let text = format!("{}\r", std::mem::take(&mut self.serial_line));
                    let (id, backend) = (id.clone(), self.backend.clone());
                    self.backend.act(host, format!("Type into {}", vm.name), None, move |c| async move {
                        c.serial_input(&id, &text).await?;
                        // The guest echoes after a moment: fetch the output again.
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        backend.load_serial(host, id);
                        Ok(())
                    });
                    r.request_focus();
                }
            });
        });
    }

    /// Uploads an ISO to the host's library (if it is not there yet) and puts it in the VM's drive.
    fn attach(&self, host: usize, id: &str, path: PathBuf) {
        let id = id.to_owned();
        let backend = self.backend.clone();
        self.backend.upload_then(host, path, move |c, name| async move {
            c.change_media(&id, Some(&name)).await?;
            backend.model().notify(format!("{name} is in the drive"), false);
            Ok(())
        });
    }

    fn open_console(&mut self, host: usize, vm: &porthole_api::Vm) {
        let this = Some((host, vm.id.clone()));
        if let Some(i) = self.consoles.iter().position(|t| t.vm == this && !t.console.closed()) {
            self.tab = Tab::Console(i);
            return;
        }
        self.consoles.retain(|t| t.vm != this);
        let Some(client) = self.backend.model().hosts.get(host).and_then(|h| h.client.clone()) else { return };
        let id = vm.id.clone();
        let runtime = self.backend.clone();
        let connect = move || -> Result<porthole_api::rfb::RfbClient, String> {
            let rt = runtime.runtime();
            let ticket = rt.block_on(client.console_ticket(&id)).map_err(|e| e.to_string())?;
            let stream = match ticket.rfb_socket {
                // The local host hands out the VM's RFB socket: connect directly.
                Some(socket) => std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?,
                None => {
                    // A remote console: the WebSocket, bridged to a socket pair for the RFB client.
                    let ws = rt.block_on(client.console_with_ticket(&ticket.path)).map_err(|e| e.to_string())?;
                    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
                    theirs.set_nonblocking(true).map_err(|e| e.to_string())?;
                    rt.spawn(async move {
                        let mut ws = ws;
                        if let Ok(mut theirs) = tokio::net::UnixStream::from_std(theirs) {
                            let _ = tokio::io::copy_bidirectional(&mut ws, &mut theirs).await;
                        }
                    });
                    ours
                }
            };
            porthole_api::rfb::RfbClient::over(stream, None).map_err(|e| e.to_string())
        };
        let backend = self.backend.clone();
        let mut console = Console::open(vm.name.clone(), connect, move || backend.repaint());
        console.scaling = preferences::scaling(self.settings.console_scaling);
        self.consoles.push(ConsoleTab { vm: this, target: None, console, password: String::new(), detached: false });
        self.tab = Tab::Console(self.consoles.len() - 1);
        self.remember_consoles();
    }

    /// Opens a console on any VNC server (and remembers the address, never the password).
    pub fn open_vnc(&mut self, target: VncTarget, password: Option<String>) {
        let address = target.to_string();
        if self.settings.recent_vnc.first() != Some(&address) {
            self.settings.recent_vnc.retain(|a| *a != address);
            self.settings.recent_vnc.insert(0, address);
            self.settings.recent_vnc.truncate(10);
            self.save_settings();
        }
        let backend = self.backend.clone();
        let t = target.clone();
        let connect = move || -> Result<porthole_api::rfb::RfbClient, String> {
            let stream = t.connect()?;
            porthole_api::rfb::RfbClient::over(stream, password.as_deref()).map_err(|e| e.to_string())
        };
        let mut console = Console::open(target.title(), connect, move || backend.repaint());
        console.scaling = preferences::scaling(self.settings.console_scaling);
        let tab = ConsoleTab { vm: None, target: Some(target), console, password: String::new(), detached: false };
        match self.tab {
            Tab::Console(i) if self.consoles.get(i).is_some_and(|c| c.target == tab.target) => self.consoles[i] = tab,
            _ => {
                self.consoles.push(tab);
                self.tab = Tab::Console(self.consoles.len() - 1);
            }
        }
        self.remember_consoles();
    }

    fn console_tab(&mut self, ui: &mut egui::Ui, i: usize) {
        let tab = &mut self.consoles[i];
        let status = tab.console.status();
        let needs_password = tab.target.is_some()
            && tab.console.closed()
            && (status.contains("password") || status.contains("authentication"));
        if needs_password {
            let mut connect = None;
            ui.label(tab.console.status());
            ui.horizontal(|ui| {
                let l = ui.label("Password");
                let r = ui.add(egui::TextEdit::singleline(&mut tab.password).password(true)).labelled_by(l.id);
                if ui.button("Connect").clicked() || (r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter))) {
                    connect = Some((tab.target.clone().expect("a VNC target"), tab.password.clone()));
                }
            });
            if let Some((target, password)) = connect {
                self.open_vnc(target, Some(password));
            }
            return;
        }
        if tab.console.closed() {
            // The session ended (the VM stopped, the server went away): offer to connect again.
            let mut again = false;
            ui.horizontal(|ui| {
                ui.label(tab.console.status());
                again = ui.button("Reconnect").clicked();
            });
            if again {
                let (vm, target) = (tab.vm.clone(), tab.target.clone());
                match (vm, target) {
                    (Some((host, id)), _) => {
                        let vm = self
                            .backend
                            .model()
                            .hosts
                            .get(host)
                            .and_then(|h| h.vms.iter().find(|v| v.id == id).cloned());
                        if let Some(vm) = vm {
                            self.open_console(host, &vm);
                        }
                    }
                    (None, Some(target)) => self.open_vnc(target, None),
                    (None, None) => {}
                }
            }
            return;
        }
        if tab.detached {
            ui.label(format!("{} is shown in its own window.", tab.console.title));
            if ui.button("Bring back into this tab").clicked() {
                tab.detached = false;
            }
            return;
        }
        if ui.button("Open in a window").clicked() {
            tab.detached = true;
        }
        tab.console.show(ui);
    }

    /// Consoles moved into windows of their own (closing the window brings the console back to its tab).
    fn console_windows(&mut self, ctx: &egui::Context) {
        for tab in self.consoles.iter_mut().filter(|t| t.detached) {
            let id = egui::ViewportId::from_hash_of(("console", &tab.vm, &tab.target, &tab.console.title));
            let builder =
                egui::ViewportBuilder::default().with_title(&tab.console.title).with_inner_size([1024.0, 700.0]);
            let close = ctx.show_viewport_immediate(id, builder, |ui, _class| {
                let mut back = false;
                egui::CentralPanel::default().show(ui, |ui| {
                    back = ui.button("Back to the tab").clicked();
                    tab.console.show(ui);
                });
                back || ui.ctx().input(|i| i.viewport().close_requested())
            });
            if close {
                tab.detached = false;
            }
        }
    }

    fn handle_drops(&mut self, ui: &mut egui::Ui) {
        let dropped = ui.ctx().input(|i| i.raw.dropped_files.clone());
        for file in dropped {
            let path = file.path().to_owned();
            // Onto the host page: any file, into that host's library.
            if matches!(self.tab, Tab::Host) {
                self.upload_to_library(self.selected_host, path);
                continue;
            }
            let is_image =
                path.extension().is_some_and(|e| e.eq_ignore_ascii_case("iso") || e.eq_ignore_ascii_case("img"));
            if !is_image {
                self.backend.model().notify(format!("{} is not an ISO image: drop a .iso file", path.display()), true);
                continue;
            }
            // Onto a VM's console: into that VM's drive.
            let console_vm = match self.tab {
                Tab::Console(i) => self.consoles.get(i).and_then(|t| t.vm.clone()),
                Tab::Machines | Tab::Host => None,
            };
            // Onto a VM's row or details: into that VM's drive; elsewhere: a new VM. Without a pointer position
            // (some drop sources give none) the selected VM takes it.
            let pointer = ui.ctx().input(|i| i.pointer.latest_pos());
            let under = pointer.and_then(|p| self.drop_zones.iter().find(|(r, _, _)| r.contains(p)));
            let target = match (console_vm, matches!(self.tab, Tab::Machines), under, pointer) {
                (Some(vm), _, _, _) => Some(vm),
                (None, true, Some((_, host, id)), _) => Some((*host, id.clone())),
                (None, true, None, None) => self.selected_vm.clone().map(|id| (self.selected_host, id)),
                _ => None,
            };
            match target {
                Some((host, id)) => self.attach(host, &id, path),
                None => self.new_vm_from_iso(&path),
            }
        }
    }

    /// Opens the create wizard for the selected host with `iso` as the boot media (a dropped ISO, or
    /// `porthole FILE.iso` from the desktop's "Open with").
    pub fn new_vm_from_iso(&mut self, iso: &std::path::Path) {
        let mut w = Wizard::new(self.selected_host);
        self.backend.load_images(self.selected_host);
        w.name = image_name(iso).trim_end_matches(".iso").to_owned();
        w.iso = iso.display().to_string();
        self.wizard = Some(w);
    }

    fn wizard_window(&mut self, ctx: &egui::Context) {
        let Some(w) = self.wizard.as_mut() else { return };
        let (host_mem, free_disk, taken, images) = {
            let m = self.backend.model();
            let h = m.hosts.get(w.host);
            (
                h.and_then(|h| h.info.as_ref().map(|i| i.memory_mib)),
                h.and_then(|h| h.info.as_ref().map(|i| i.free_disk_bytes)),
                h.map(|h| h.vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>()).unwrap_or_default(),
                m.images.get(&w.host).cloned().unwrap_or_default(),
            )
        };
        osinfo::update(w, &self.backend, &images, host_mem);
        let mut open = true;
        let mut create = false;
        let mut cancel = false;
        egui::Window::new("New virtual machine").open(&mut open).collapsible(false).show(ctx, |ui| {
            egui::Grid::new("wizard").num_columns(2).show(ui, |ui| {
                let l = ui.label("Name");
                ui.text_edit_singleline(&mut w.name).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("vCPUs");
                ui.add(egui::DragValue::new(&mut w.vcpus).range(1..=64)).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Memory (MiB)");
                let max = host_mem.unwrap_or(1 << 20);
                ui.horizontal(|ui| {
                    ui.add(egui::DragValue::new(&mut w.memory_mib).range(4..=max).speed(16)).labelled_by(l.id);
                    if let Some(m) = host_mem {
                        ui.weak(format!("of {m} MiB on this host"));
                    }
                });
                ui.end_row();
                let l = ui.label("Disk");
                ui.horizontal(|ui| {
                    let text = match &w.disk_image {
                        None if w.disk_gib == 0 => "no disk".to_owned(),
                        None => "new empty disk".to_owned(),
                        Some(_) if w.cloud.is_some() => "from a cloud image".to_owned(),
                        Some(_) => "copy of a library image".to_owned(),
                    };
                    egui::ComboBox::from_id_salt("disk-kind")
                        .selected_text(text)
                        .show_ui(ui, |ui| {
                            if ui.selectable_label(w.disk_image.is_none() && w.disk_gib > 0, "new empty disk").clicked()
                            {
                                w.disk_image = None;
                                w.cloud = None;
                                w.disk_gib = w.disk_gib.max(1);
                            }
                            if ui.selectable_label(w.disk_image.is_none() && w.disk_gib == 0, "no disk").clicked() {
                                w.disk_image = None;
                                w.cloud = None;
                                w.disk_gib = 0;
                            }
                            let copy = w.disk_image.is_some() && w.cloud.is_none();
                            if ui.selectable_label(copy, "copy of a library image").clicked() {
                                w.disk_image.get_or_insert_default();
                                w.cloud = None;
                            }
                            if ui.selectable_label(w.cloud.is_some(), "from a cloud image").clicked()
                                && w.cloud.is_none()
                            {
                                w.cloud = Some(w.cloud_defaults.clone());
                                // Only qcow2 and raw images are offered: an ISO picked before goes.
                                let keep = w.disk_image.as_ref().is_some_and(|n| {
                                    images.iter().any(|i| i.name == *n && cloud_image::is_disk_image(i))
                                });
                                if !keep {
                                    w.disk_image = Some(String::new());
                                }
                                w.disk_gib = w.disk_gib.max(1);
                            }
                        })
                        .response
                        .labelled_by(l.id);
                    match &w.disk_image {
                        None if w.disk_gib > 0 => {
                            let l = ui.label("Size (GiB)");
                            ui.add(egui::DragValue::new(&mut w.disk_gib).range(1..=65536)).labelled_by(l.id);
                            if let Some(free) = free_disk {
                                ui.weak(format!("{} GiB free on this host (the file grows as written)", free >> 30));
                            }
                        }
                        None => {}
                        Some(_) => {
                            cloud_image::image_picker(ui, w, &images);
                            if w.cloud.is_some() {
                                let l = ui.label("Size (GiB)");
                                ui.add(egui::DragValue::new(&mut w.disk_gib).range(1..=65536)).labelled_by(l.id);
                            }
                        }
                    }
                });
                ui.end_row();
                if w.cloud.is_some() {
                    ui.label("Disk format");
                    ui.label("qcow2: an overlay on the image, which stays unchanged");
                    ui.end_row();
                } else if w.disk_image.is_some() || w.disk_gib > 0 {
                    let l = ui.label("Disk format");
                    ui.horizontal(|ui| {
                        let text = |f: DiskFormat| match f {
                            DiskFormat::Qcow2 => "qcow2",
                            DiskFormat::Raw => "raw",
                        };
                        egui::ComboBox::from_id_salt("disk-format")
                            .selected_text(text(w.disk_format))
                            .show_ui(ui, |ui| {
                                for f in [DiskFormat::Qcow2, DiskFormat::Raw] {
                                    ui.selectable_value(&mut w.disk_format, f, text(f));
                                }
                            })
                            .response
                            .labelled_by(l.id);
                        ui.weak(match w.disk_format {
                            DiskFormat::Qcow2 => "grows as written; snapshots and linked clones",
                            DiskFormat::Raw => "a plain byte-for-byte file",
                        });
                    });
                    ui.end_row();
                }
                cloud_image::wizard_rows(ui, w);
                let l = ui.label("ISO");
                ui.horizontal(|ui| {
                    ui.text_edit_singleline(&mut w.iso).labelled_by(l.id);
                    if ui.button("Browse ISO…").clicked()
                        && let Some(p) = rfd::FileDialog::new().add_filter("Disc images", &["iso", "img"]).pick_file()
                    {
                        w.iso = p.display().to_string();
                    }
                });
                ui.end_row();
                osinfo::wizard_row(ui, w);
                let l = ui.label("Kernel");
                ui.horizontal(|ui| {
                    ui.text_edit_singleline(&mut w.kernel).labelled_by(l.id);
                    if ui.button("Browse kernel…").clicked()
                        && let Some(p) = rfd::FileDialog::new().pick_file()
                    {
                        w.kernel = p.display().to_string();
                    }
                });
                ui.end_row();
                let l = ui.label("Initrd");
                ui.text_edit_singleline(&mut w.initrd).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Command line");
                ui.text_edit_singleline(&mut w.cmdline).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Tags");
                ui.add(egui::TextEdit::singleline(&mut w.tags).hint_text("web, prod")).labelled_by(l.id);
                ui.end_row();
                network::wizard_row(ui, w);
            });
            let mut problems = w.problems(host_mem, &taken);
            problems.extend(w.cloud_problems(&images));
            for p in &problems {
                ui.colored_label(ui.visuals().warn_fg_color, p);
            }
            for warning in osinfo::warnings(w) {
                ui.colored_label(ui.visuals().warn_fg_color, warning);
            }
            ui.separator();
            ui.label(format!(
                "Summary: {} with {} vCPU(s), {} MiB, {}, {}, booting {}.",
                if w.name.is_empty() { "a VM" } else { &w.name },
                w.vcpus,
                w.memory_mib,
                match (&w.disk_image, w.cloud_init()) {
                    (Some(i), Some(c)) => format!(
                        "a {} GiB qcow2 disk over cloud image {i} (user {}, hostname {})",
                        w.disk_gib, c.user, c.hostname
                    ),
                    (Some(i), None) => format!("a copy of {i} as its disk"),
                    (None, _) if w.disk_gib == 0 => "no disk".to_owned(),
                    (None, _) => format!(
                        "a new {} GiB {} disk",
                        w.disk_gib,
                        if w.disk_format == DiskFormat::Raw { "raw" } else { "qcow2" }
                    ),
                },
                network::wizard_summary(w),
                if !w.kernel.trim().is_empty() {
                    "the kernel"
                } else if w.iso.trim().is_empty() && w.disk_image.is_some() {
                    "its disk"
                } else {
                    "the ISO"
                }
            ));
            ui.horizontal(|ui| {
                create = ui.add_enabled(problems.is_empty(), egui::Button::new("Create")).clicked();
                cancel = ui.button("Cancel").clicked();
            });
        });
        if create {
            let w = self.wizard.take().expect("open");
            self.create(w);
        } else if cancel || !open {
            self.wizard = None;
        }
    }

    /// Creates, starts and opens the console of the demo VM.
    fn create_demo(&self, kernel: PathBuf) {
        let backend = self.backend.clone();
        let request = CreateVm {
            disk_gib: 0,
            boot: Some(BootSpec { kernel: kernel.display().to_string(), initrd: None, cmdline: String::new() }),
            ..CreateVm::new("demo", 1, 64)
        };
        self.backend.act(0, "Create the demo VM".into(), None, move |c| async move {
            let vm = c.create_vm(&request).await?;
            c.action(&vm.id, Action::Start).await?;
            backend.model().open_console = Some((0, vm.id.clone()));
            backend.model().notify("The demo VM runs: click its screen and type", false);
            Ok(())
        });
    }

    fn create(&mut self, w: Wizard) {
        let mut request = w.request();
        let done = format!("Created {}", w.name);
        if w.iso.trim().is_empty() {
            self.backend.act(w.host, format!("Create {}", w.name), Some(done), move |c| async move {
                c.create_vm(&request).await
            });
        } else {
            let backend = self.backend.clone();
            self.backend.upload_then(w.host, PathBuf::from(w.iso.trim()), move |c, name| async move {
                request.media = Some(name);
                c.create_vm(&request).await?;
                backend.model().notify(done, false);
                Ok(())
            });
        }
    }

    fn add_host_window(&mut self, ctx: &egui::Context) {
        let Some(a) = self.add_host.as_mut() else { return };
        let mut open = true;
        let mut connect = false;
        let title = if a.editing.is_some() { "Edit host" } else { "Add a host" };
        egui::Window::new(title).open(&mut open).collapsible(false).show(ctx, |ui| {
            egui::Grid::new("add-host").num_columns(2).show(ui, |ui| {
                for (label, value, hint) in [
                    ("Host name", &mut a.name, "lab"),
                    ("Address", &mut a.address, "lab.example.org:7443"),
                    ("Token", &mut a.token, "from portholed token create"),
                    ("Certificate fingerprint", &mut a.fingerprint, "SHA-256 printed by portholed --listen"),
                ] {
                    let l = ui.label(label);
                    ui.add(egui::TextEdit::singleline(value).hint_text(hint)).labelled_by(l.id);
                    ui.end_row();
                }
            });
            ui.horizontal(|ui| {
                let can = a.address.contains(':');
                if ui.add_enabled(can, egui::Button::new("Fetch fingerprint")).clicked() {
                    let address = a.address.trim().to_owned();
                    let backend = self.backend.clone();
                    self.backend.runtime().spawn(async move {
                        let result = porthole_api::client::fetch_fingerprint(&address).await;
                        let mut m = backend.model();
                        match result {
                            Ok(fp) => m.fetched_fingerprint = Some(fp),
                            Err(e) => m.notify(format!("cannot reach {address}: {e}"), true),
                        }
                        drop(m);
                        backend.repaint();
                    });
                }
                ui.weak("compare it with what portholed --listen printed before connecting");
            });
            if let Some(fp) = self.backend.model().fetched_fingerprint.take() {
                a.fingerprint = fp;
            }
            let fingerprint_ok = porthole_api::client::parse_fingerprint(&a.fingerprint).is_some();
            let name_taken = self.settings.remotes.iter().any(|r| r.name == a.name.trim())
                && a.editing.as_deref() != Some(a.name.trim())
                || a.name.trim() == "Local";
            if name_taken {
                ui.colored_label(ui.visuals().warn_fg_color, "There is a host with this name already.");
            }
            let ok = !a.name.trim().is_empty()
                && !name_taken
                && a.address.contains(':')
                && !a.token.trim().is_empty()
                && fingerprint_ok;
            if !fingerprint_ok && !a.fingerprint.is_empty() {
                ui.colored_label(ui.visuals().warn_fg_color, "A fingerprint is 64 hex digits (colons allowed).");
            }
            connect = ui.add_enabled(ok, egui::Button::new("Connect")).clicked();
        });
        if connect {
            let a = self.add_host.take().expect("open");
            let remote = RemoteHost {
                name: a.name.trim().to_owned(),
                address: a.address.trim().to_owned(),
                token: a.token.trim().to_owned(),
                fingerprint: a.fingerprint.trim().to_owned(),
            };
            if let Some(old) = &a.editing {
                // Editing: the old connection goes, the new one comes in its place in the settings.
                let index = self.backend.model().hosts.iter().skip(1).position(|h| h.name == *old).map(|i| i + 1);
                if let Some(i) = index {
                    self.backend.remove_host(i);
                }
                match self.settings.remotes.iter_mut().find(|r| r.name == *old) {
                    Some(r) => *r = remote.clone(),
                    None => self.settings.remotes.push(remote.clone()),
                }
                self.selected_host = connect_remote(&self.backend, &remote);
                self.selected_vm = None;
            } else {
                connect_remote(&self.backend, &remote);
                self.settings.remotes.push(remote);
            }
            self.save_settings();
        } else if !open {
            self.add_host = None;
        }
    }

    fn delete_window(&mut self, ctx: &egui::Context) {
        let Some((host, id, name)) = self.confirm_delete.clone() else { return };
        let mut answer = None;
        egui::Window::new("Delete virtual machine").collapsible(false).show(ctx, |ui| {
            ui.label(format!("Delete {name} and its disk? This cannot be undone."));
            ui.horizontal(|ui| {
                if ui.button("Delete VM and disk").clicked() {
                    answer = Some(true);
                }
                if ui.button("Keep it").clicked() {
                    answer = Some(false);
                }
            });
        });
        match answer {
            Some(true) => {
                self.confirm_delete = None;
                self.selected_vm = None;
                self.backend.act(
                    host,
                    format!("Delete {name}"),
                    Some(format!("Deleted {name}")),
                    move |c| async move { c.delete_vm(&id).await },
                );
            }
            Some(false) => self.confirm_delete = None,
            None => {}
        }
    }

    fn save_settings(&self) {
        if let Some(p) = &self.settings_path
            && let Err(e) = crate::settings::save(p, &self.settings)
        {
            self.backend.model().notify(format!("cannot save the settings to {}: {e}", p.display()), true);
        }
    }
}

/// A small line of the last minute's CPU use, with the latest value.
fn sparkline(ui: &mut egui::Ui, history: &std::collections::VecDeque<f32>, name: &str) {
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
fn performance(ui: &mut egui::Ui, id: &str, empty: &str, samples: &[porthole_api::StatSample]) {
    use egui_plot::{Legend, Line, Plot, PlotPoints};
    let Some(last) = samples.last() else {
        ui.label(empty);
        return;
    };
    let t = |s: &porthole_api::StatSample| (s.t_ms as f64 - last.t_ms as f64) / 1000.0;
    let series = |f: fn(&porthole_api::StatSample) -> f64| -> PlotPoints<'static> {
        samples.iter().map(|s| [t(s), f(s)]).collect::<Vec<_>>().into()
    };
    ui.label(format!(
        "CPU {:.1}%   memory {:.1} MiB   disk read {:.1} KiB/s, write {:.1} KiB/s   network in {:.1} KiB/s, out {:.1} \
         KiB/s",
        last.cpu_percent,
        last.memory_bytes as f64 / 1048576.0,
        last.disk_read_bps / 1024.0,
        last.disk_write_bps / 1024.0,
        last.net_rx_bps / 1024.0,
        last.net_tx_bps / 1024.0
    ));
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

/// Adds remote host `r` to the backend; returns its index.
fn connect_remote(backend: &Backend, r: &RemoteHost) -> usize {
    let (address, token, fingerprint) = (r.address.clone(), r.token.clone(), r.fingerprint.clone());
    backend.add_host(r.name.clone(), r.address.clone(), move || {
        Client::https(&address, &token, Some(&fingerprint)).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnc_addresses_parse() {
        assert_eq!("vnc://lab:5901".parse(), Ok(VncTarget::Tcp("lab:5901".into())));
        assert_eq!("vnc://lab:1".parse(), Ok(VncTarget::Tcp("lab:5901".into())), "display numbers");
        assert_eq!("vnc://lab".parse(), Ok(VncTarget::Tcp("lab:5900".into())));
        assert_eq!("vnc://[::1]:5905".parse(), Ok(VncTarget::Tcp("[::1]:5905".into())));
        assert_eq!("vnc+unix:///run/vm.sock".parse(), Ok(VncTarget::Unix("/run/vm.sock".into())));
        for bad in ["vnc://", "vnc://lab:x", "http://lab", "vnc+unix://relative"] {
            assert!(bad.parse::<VncTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_wizard_sends_the_disk_format_and_the_cloud_seed() {
        let mut w = Wizard::new(0);
        w.name = "db_1".into();
        let r = w.request();
        assert_eq!(
            (r.disk_format, r.cloud_init.as_ref(), r.disk_image.as_ref()),
            (Some(DiskFormat::Qcow2), None, None)
        );
        w.disk_format = DiskFormat::Raw;
        assert_eq!(w.request().disk_format, Some(DiskFormat::Raw));
        w.disk_gib = 0;
        assert_eq!(w.request().disk_format, None, "no disk, no format");
        // From a cloud image: a qcow2 overlay, whatever the format chosen before, and the seed.
        w.disk_image = Some("debian.qcow2".into());
        w.disk_gib = 10;
        w.cloud = Some(CloudForm {
            user: "me".into(),
            ssh_key: "ssh-ed25519 AAAA1 a\n\n  ssh-rsa AAAA2 b \n".into(),
            key_source: None,
            hostname: String::new(),
        });
        let r = w.request();
        assert_eq!(r.disk_image.as_deref(), Some("debian.qcow2"));
        assert_eq!((r.disk_gib, r.disk_format), (10, Some(DiskFormat::Qcow2)));
        assert_eq!(
            r.cloud_init,
            Some(porthole_api::CloudInitSpec {
                hostname: "db-1".into(),
                user: "me".into(),
                ssh_authorized_keys: vec!["ssh-ed25519 AAAA1 a".into(), "ssh-rsa AAAA2 b".into()],
            })
        );
        assert_eq!(r.boot, None, "it boots its disk");
        w.cloud.as_mut().unwrap().hostname = " box ".into();
        assert_eq!(w.request().cloud_init.unwrap().hostname, "box");
        // Back to a copy of an image: no seed.
        w.cloud = None;
        assert_eq!(w.request().cloud_init, None);
    }

    #[test]
    fn the_wizard_explains_what_is_wrong() {
        let mut w = Wizard::new(0);
        assert!(w.problems(Some(4096), &[]).iter().any(|p| p.contains("Give the VM a name")));
        w.name = "web1".into();
        w.memory_mib = 8192;
        let p = w.problems(Some(4096), &["web1".into()]);
        assert!(p.iter().any(|p| p.contains("named \"web1\" already")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("only 4096 MiB")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("Choose what the VM boots")), "{p:?}");
    }
}
