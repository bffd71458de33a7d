//! Networking in the window: the create wizard's network choice, and the network section of a VM's details
//! and settings (the cards' editor — back end, MAC, MTU, cards added and removed —, each card's state — or
//! why it is not attached —, the guest's address, the link switch, the SSH command with a copy button, and
//! the port forwards with add and remove).

use std::collections::BTreeMap;

use porthole_api::{
    MIN_NIC_LIMIT, NicBackend, NicDefinition, NicLimits, NicSpec, NicStatus, PortForward, Protocol, UpdateVm, Vm,
    VmState,
};

use super::clones::human_bytes;
use super::theme;
use super::{PortholeApp, Wizard};

/// The wizard's network choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WizardNetwork {
    /// One user-mode (NAT) card; the daemon forwards a host port to the guest's SSH port.
    #[default]
    Nat,
    /// One card on a bridge of the host (for remote hosts and system daemons).
    Bridge,
    None,
}

impl WizardNetwork {
    fn text(self) -> &'static str {
        match self {
            WizardNetwork::Nat => "NAT (user networking)",
            WizardNetwork::Bridge => "Bridge on the host",
            WizardNetwork::None => "No network",
        }
    }
}

/// The wizard's "Network" row (in its grid).
pub(super) fn wizard_row(ui: &mut egui::Ui, w: &mut Wizard, host_decides: Option<&str>) {
    let l = ui.label("Network");
    if let Some(why) = host_decides {
        // The host gives new VMs the network it has (libvirt: its `default` network); nothing to choose.
        ui.weak("as the host offers it").labelled_by(l.id).on_hover_text(why);
        ui.end_row();
        return;
    }
    ui.horizontal(|ui| {
        egui::ComboBox::from_id_salt("network")
            .selected_text(w.network.text())
            .show_ui(ui, |ui| {
                for n in [WizardNetwork::Nat, WizardNetwork::Bridge, WizardNetwork::None] {
                    ui.selectable_value(&mut w.network, n, n.text());
                }
            })
            .response
            .labelled_by(l.id);
        match w.network {
            WizardNetwork::Nat => {
                ui.weak("SSH is forwarded from a host port");
            }
            WizardNetwork::Bridge => {
                let l = ui.label("Bridge name");
                ui.add(egui::TextEdit::singleline(&mut w.bridge).hint_text("br0").desired_width(80.0))
                    .labelled_by(l.id);
                ui.weak("the VM joins the bridge's network");
            }
            WizardNetwork::None => {
                ui.weak("no network card");
            }
        }
    });
    ui.end_row();
}

/// The network part of the wizard's summary.
pub(super) fn wizard_summary(w: &Wizard) -> String {
    match w.network {
        WizardNetwork::Nat => "NAT networking (SSH forwarded)".to_owned(),
        WizardNetwork::Bridge => format!("a card on bridge {}", w.bridge.trim()),
        WizardNetwork::None => "no network".to_owned(),
    }
}

/// The create request's cards: `None` lets the daemon make its default NAT card with an SSH forward.
pub(super) fn wizard_nics(w: &Wizard) -> Option<Vec<NicSpec>> {
    match w.network {
        WizardNetwork::Nat => None,
        WizardNetwork::Bridge => Some(vec![NicSpec::new(NicBackend::Bridge { bridge: w.bridge.trim().to_owned() })]),
        WizardNetwork::None => Some(Vec::new()),
    }
}

/// The host part of a remote host's address (`lab.example:7443` → `lab.example`, `[::1]:7443` → `::1`).
fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => address,
    }
}

/// The command that reaches the guest's SSH server through `forward` (a TCP forward to guest port 22), from
/// this computer: on the local host `localhost`, on a remote one (`remote`: its address) the host's name.
pub fn ssh_command(forward: &PortForward, remote: Option<&str>) -> Option<String> {
    ssh_command_as(forward, remote, "user")
}

/// [`ssh_command`] logging in as `user` (a cloud-init VM's user).
pub fn ssh_command_as(forward: &PortForward, remote: Option<&str>, user: &str) -> Option<String> {
    if forward.protocol != Protocol::Tcp || forward.guest_port != 22 {
        return None;
    }
    let a = forward.host_address;
    let host = if !a.is_loopback() && !a.is_unspecified() {
        a.to_string()
    } else {
        remote.map(|r| host_of(r).to_owned()).unwrap_or_else(|| "localhost".to_owned())
    };
    let port = if forward.host_port == 22 { String::new() } else { format!("-p {} ", forward.host_port) };
    Some(format!("ssh {port}{user}@{host}"))
}

/// A card's back end in words.
fn backend_text(b: &NicBackend) -> String {
    match b {
        NicBackend::User => "NAT (user networking, passt)".to_owned(),
        NicBackend::Bridge { bridge } => format!("bridge {bridge}"),
        NicBackend::Tap { name } => format!("TAP device {name}"),
    }
}

/// What is known of a card's state, and whether it is a problem: from the running VM's report
/// (`details`: its `GET /vms/{id}`), never silent about a card that is missing.
pub fn nic_state(vm: &Vm, nic: &NicDefinition, details: Option<&Vm>) -> (String, bool) {
    if !matches!(vm.state, VmState::Running | VmState::Paused) {
        return ("not running (the card is set up when the VM starts)".to_owned(), false);
    }
    let Some(details) = details else { return ("asking the VM…".to_owned(), false) };
    if let Some(e) = &details.nic_status_error {
        return (format!("unknown: {e}"), true);
    }
    match details.nic_status.iter().find(|s| s.id == nic.id) {
        None => ("not in the running VM (added after it started): it appears at the next start".to_owned(), true),
        Some(s) if !s.attached => (
            format!(
                "not attached, the VM runs without it: {}",
                s.error.as_deref().unwrap_or("the VM process gave no reason")
            ),
            true,
        ),
        Some(s) => {
            let tap = s.tap.as_deref().map(|t| format!(" (TAP {t})")).unwrap_or_default();
            let link = if s.link_up { "link up" } else { "link down (cable pulled)" };
            let driver = if s.driver_ready { "guest driver ready" } else { "the guest has not set the card up yet" };
            (format!("attached{tap}, {link}, {driver}"), false)
        }
    }
}

/// The add-a-forward form of the network section.
#[derive(Debug, Clone)]
pub struct ForwardForm {
    /// (host, VM id, card id) the form is for.
    key: (usize, String, String),
    protocol: Protocol,
    address: String,
    host_port: String,
    guest_port: String,
}

impl Default for ForwardForm {
    fn default() -> Self {
        ForwardForm {
            key: Default::default(),
            protocol: Protocol::Tcp,
            address: "127.0.0.1".to_owned(),
            host_port: String::new(),
            guest_port: String::new(),
        }
    }
}

impl ForwardForm {
    /// The forward the form describes, or what is wrong with it.
    fn forward(&self) -> Result<PortForward, String> {
        let port = |text: &str, what: &str| {
            text.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| format!("The {what} is 1-65535."))
        };
        let host_address =
            self.address.trim().parse().map_err(|_| format!("{:?} is not an IP address.", self.address.trim()))?;
        Ok(PortForward {
            protocol: self.protocol,
            host_address,
            host_port: port(&self.host_port, "host port")?,
            guest_port: port(&self.guest_port, "guest port")?,
            automatic: false,
        })
    }
}

/// A card's back end as the editor offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Nat,
    Bridge,
    Tap,
}

impl BackendChoice {
    fn text(self) -> &'static str {
        match self {
            BackendChoice::Nat => "NAT (passt)",
            BackendChoice::Bridge => "Bridge on the host",
            BackendChoice::Tap => "TAP device",
        }
    }
}

/// One card in the network editor (text where the user types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardFields {
    pub id: String,
    pub backend: BackendChoice,
    /// The bridge or TAP device's name.
    pub device: String,
    pub mac: String,
    pub mtu: String,
    /// Kept as they are (the forwards table edits them).
    forwards: Vec<PortForward>,
}

impl CardFields {
    fn of(spec: &NicSpec) -> CardFields {
        let (backend, device) = match &spec.backend {
            NicBackend::User => (BackendChoice::Nat, String::new()),
            NicBackend::Bridge { bridge } => (BackendChoice::Bridge, bridge.clone()),
            NicBackend::Tap { name } => (BackendChoice::Tap, name.clone()),
        };
        CardFields {
            id: spec.id.clone().unwrap_or_default(),
            backend,
            device,
            mac: spec.mac.clone().unwrap_or_default(),
            mtu: spec.mtu.map(|m| m.to_string()).unwrap_or_default(),
            forwards: spec.forwards.clone(),
        }
    }

    /// The card's spec, or what is wrong with the form (the host checks the rest: MACs in use, bridges).
    pub fn spec(&self) -> Result<NicSpec, String> {
        let id = &self.id;
        let device = self.device.trim();
        let backend = match self.backend {
            BackendChoice::Nat => NicBackend::User,
            _ if device.is_empty() || device.len() > 15 || device.contains(['/', ' ']) => {
                return Err(format!("{id}: give the device's name (at most 15 characters, no spaces or /)."));
            }
            BackendChoice::Bridge => NicBackend::Bridge { bridge: device.to_owned() },
            BackendChoice::Tap => NicBackend::Tap { name: device.to_owned() },
        };
        let mac = self.mac.trim();
        let mac = if mac.is_empty() {
            None
        } else {
            let bytes: Vec<Option<u8>> = mac.split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect();
            let ok = bytes.len() == 6
                && mac.split(':').all(|b| b.len() == 2)
                && bytes.iter().all(Option::is_some)
                && bytes[0].is_some_and(|b| b & 1 == 0);
            if !ok {
                return Err(format!("{id}: a MAC address is six hex bytes like 02:12:34:56:78:9a, unicast."));
            }
            Some(mac.to_ascii_lowercase())
        };
        let mtu = match self.mtu.trim() {
            "" => None,
            t => Some(
                t.parse::<u32>()
                    .ok()
                    .filter(|m| (68..=65520).contains(m))
                    .ok_or(format!("{id}: the MTU is 68-65520."))?,
            ),
        };
        // Forwards need NAT: another back end drops them.
        let forwards = if backend == NicBackend::User { self.forwards.clone() } else { Vec::new() };
        // Limits are set on their own (live); a card keeps its own.
        Ok(NicSpec { id: Some(id.clone()), backend, mac, mtu, forwards, limits: None })
    }
}

/// The rate limits typed for a VM's cards, by card id: (download, upload) in Mbit/s, and the limits they were
/// made from.
#[derive(Debug, Clone, Default)]
pub struct NicLimitsForm {
    key: (usize, String),
    cards: BTreeMap<String, ((String, String), NicLimits)>,
}

const MBIT: f64 = 1_000_000.0;

/// A limit in Mbit/s as the form shows it.
fn mbit_text(bits: Option<u64>) -> String {
    bits.map(|b| if b % 1_000_000 == 0 { (b / 1_000_000).to_string() } else { format!("{:.3}", b as f64 / MBIT) })
        .unwrap_or_default()
}

/// The limits typed (Mbit/s, empty: none), or what is wrong.
pub fn nic_limits_of(download: &str, upload: &str) -> Result<NicLimits, String> {
    let least = MIN_NIC_LIMIT as f64 / MBIT;
    let parse = |t: &str, what: &str| -> Result<Option<u64>, String> {
        match t.trim() {
            "" => Ok(None),
            t => match t.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= least && v <= 1_000_000.0 => Ok(Some((v * MBIT).round() as u64)),
                _ => Err(format!("{what}: give Mbit/s from {least} to 1000000, or nothing.")),
            },
        }
    };
    Ok(NicLimits { rx_bps: parse(download, "Download")?, tx_bps: parse(upload, "Upload")? })
}

/// A card's limits in words.
pub fn nic_limits_text(l: &NicLimits) -> String {
    let way = |v: Option<u64>, what: &str| v.map(|b| format!("{} Mbit/s {what}", mbit_text(Some(b))));
    let parts: Vec<String> = [way(l.rx_bps, "down"), way(l.tx_bps, "up")].into_iter().flatten().collect();
    if parts.is_empty() { "no limit".to_owned() } else { format!("at most {}", parts.join(", ")) }
}

/// The network editor of a VM: its cards as it will have them (its pending change on a running VM).
#[derive(Debug, Clone, Default)]
pub struct CardsForm {
    /// (host, VM id) the form is for, and the cards it was made from.
    key: (usize, String),
    base: Vec<NicSpec>,
    pub cards: Vec<CardFields>,
}

/// The cards VM `vm` will have at its next start (its pending change, else what it has).
fn cards_of(vm: &Vm) -> Vec<NicSpec> {
    match vm.pending.as_ref().and_then(|p| p.nics.clone()) {
        Some(pending) => pending,
        None => vm.nics.iter().map(NicSpec::from).collect(),
    }
}

/// Gives widget `r` the accessible name `name` (the grid's visible label is shorter: "MAC", where the tree
/// needs to say which card's).
fn name_for_screen_readers(ui: &egui::Ui, r: &egui::Response, name: &str) {
    ui.ctx().accesskit_node_builder(r.id, |node| node.set_label(name));
}

/// What happens to forwards changed while the VM runs.
const RUNNING_REASON: &str = "The VM runs: forwards added or removed apply at once (the card moves to a new passt \
                              with them: connections through the card end, the guest keeps its address).";

impl PortholeApp {
    /// The "SSH" row of a VM's details grid (a VM with a forward to its port 22): the command, and a button
    /// that copies it.
    pub(super) fn ssh_row(&self, ui: &mut egui::Ui, host: usize, vm: &Vm) {
        let remote = if host > 0 { self.backend.model().hosts.get(host).map(|h| h.address.clone()) } else { None };
        // A cloud-init VM: the user its seed created.
        let user = vm.cloud_init.as_ref().map_or("user", |c| c.user.as_str());
        let Some((f, cmd)) = vm
            .nics
            .iter()
            .flat_map(|n| &n.forwards)
            .find_map(|f| Some((f, ssh_command_as(f, remote.as_deref(), user)?)))
        else {
            return;
        };
        ui.label("SSH");
        ui.horizontal(|ui| {
            ui.monospace(&cmd);
            // An icon (its name on hover and for screen readers): the row stays narrow.
            if theme::icon_button(ui, theme::COPY, "Copy SSH command").clicked() {
                ui.ctx().copy_text(cmd.clone());
                self.backend.model().notify(format!("Copied: {cmd}"), false);
            }
            if remote.is_some() && f.host_address.is_loopback() {
                ui.weak(format!("(on {} of that host only: run it there, or forward from 0.0.0.0)", f.host_address));
            }
        });
        ui.end_row();
    }

    /// The "Network" section of a VM's details.
    pub(super) fn network_section(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm) {
        let running = matches!(vm.state, VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting)
            || vm.crash.is_some();
        // What the running VM reported (none once it stopped: an old report says nothing of the new state).
        let details = match &self.backend.model().details {
            Some((h, id, d))
                if *h == host && *id == vm.id && matches!(vm.state, VmState::Running | VmState::Paused) =>
            {
                Some(d.clone())
            }
            _ => None,
        };
        egui::CollapsingHeader::new("Network").default_open(false).show(ui, |ui| {
            if let Some(why) = self.lacks(host, porthole_api::Feature::Networking) {
                ui.weak(format!("Not managed from Porthole on this host: {why}"));
                return;
            }
            self.cards_editor(ui, host, vm, running);
            if vm.nics.is_empty() {
                ui.label("No network card.");
                return;
            }
            for (i, nic) in vm.nics.iter().enumerate() {
                if vm.nics.len() > 1 {
                    ui.strong(format!("Card {}", nic.id));
                }
                let status: Option<NicStatus> =
                    details.as_ref().and_then(|d| d.nic_status.iter().find(|s| s.id == nic.id).cloned());
                egui::Grid::new(("nic", i)).num_columns(2).show(ui, |ui| {
                    ui.label("MAC");
                    ui.monospace(&nic.mac);
                    ui.end_row();
                    ui.label("Back end");
                    ui.label(format!("{}, MTU {}", backend_text(&nic.backend), nic.mtu));
                    ui.end_row();
                    ui.label("State");
                    let (text, problem) = nic_state(vm, nic, details.as_ref());
                    if problem {
                        ui.colored_label(ui.visuals().error_fg_color, text);
                    } else {
                        ui.label(text);
                    }
                    ui.end_row();
                    if let Some(s) = &status {
                        ui.label("Guest address");
                        let addresses: Vec<&str> =
                            [&s.ipv4, &s.ipv6].into_iter().flatten().map(String::as_str).collect();
                        ui.label(if addresses.is_empty() { "not known yet".to_owned() } else { addresses.join(", ") });
                        ui.end_row();
                        ui.label("Traffic");
                        ui.label(format!(
                            "in {} ({} frames), out {} ({} frames)",
                            human_bytes(s.rx_bytes),
                            s.rx_frames,
                            human_bytes(s.tx_bytes),
                            s.tx_frames
                        ));
                        ui.end_row();
                        ui.label("Link");
                        let mut up = s.link_up;
                        let r = ui.add_enabled(s.attached, egui::Checkbox::new(&mut up, "Cable plugged in"));
                        if r.changed() {
                            let (id, nic_id, backend) = (vm.id.clone(), nic.id.clone(), self.backend.clone());
                            let what =
                                format!("{} the cable of {} {}", if up { "Plug in" } else { "Pull" }, vm.name, nic.id);
                            self.backend.act(host, what, None, move |c| async move {
                                let r = c.set_nic_link(&id, &nic_id, up).await;
                                backend.load_details(host, id);
                                r
                            });
                        }
                        ui.end_row();
                    }
                    self.nic_limits_row(ui, host, vm, nic, status.as_ref());
                });
                if nic.backend == NicBackend::User {
                    self.forwards(ui, host, vm, i, running);
                }
                ui.add_space(4.0);
            }
        });
    }

    /// The "Rate limits" row of card `nic`: download and upload in Mbit/s, set at once (a running VM takes
    /// them live), with the time frames waited for them.
    fn nic_limits_row(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm, nic: &NicDefinition, s: Option<&NicStatus>) {
        let key = (host, vm.id.clone());
        if self.nic_limits_form.key != key {
            self.nic_limits_form = NicLimitsForm { key, cards: BTreeMap::new() };
        }
        let of = |l: &NicLimits| (mbit_text(l.rx_bps), mbit_text(l.tx_bps));
        let (fields, base) =
            self.nic_limits_form.cards.entry(nic.id.clone()).or_insert_with(|| (of(&nic.limits), nic.limits));
        if *base != nic.limits {
            // The host's limits changed (this form's or another's): start again from them.
            (*fields, *base) = (of(&nic.limits), nic.limits);
        }
        ui.label("Rate limits");
        let mut set = None;
        ui.horizontal_wrapped(|ui| {
            for (text, hint, what) in
                [(&mut fields.0, "download Mbit/s", "towards the VM"), (&mut fields.1, "upload Mbit/s", "from the VM")]
            {
                let r = ui.add(egui::TextEdit::singleline(text).hint_text(hint).desired_width(110.0));
                name_for_screen_readers(ui, &r, &format!("{hint} limit of {}", nic.id));
                r.on_hover_text(format!("At most this many megabits a second {what} (empty: no limit)"));
            }
            let parsed = nic_limits_of(&fields.0, &fields.1);
            let changed = parsed.as_ref().is_ok_and(|l| *l != nic.limits);
            if theme::button(ui, changed, theme::LIMIT, &format!("Limit {}", nic.id)).clicked() {
                set = parsed.clone().ok();
            }
            match parsed {
                Err(why) => {
                    ui.colored_label(ui.visuals().warn_fg_color, why);
                }
                Ok(_) => {
                    let waited = s.map_or(0, |s| s.rx_throttled_us + s.tx_throttled_us);
                    let waited = if waited > 0 {
                        format!(" (frames waited {:.1} s)", waited as f64 / 1e6)
                    } else {
                        String::new()
                    };
                    ui.weak(format!("{}{waited}", nic_limits_text(&nic.limits)));
                }
            }
        });
        ui.end_row();
        if let Some(limits) = set {
            let (id, nic_id, backend) = (vm.id.clone(), nic.id.clone(), self.backend.clone());
            let what = format!("Limit {} of {}", nic.id, vm.name);
            let done = format!("{what}: {}", nic_limits_text(&limits));
            self.backend.act(host, what, Some(done), move |c| async move {
                let r = c.set_nic_limits(&id, &nic_id, &limits).await;
                backend.load_details(host, id);
                r
            });
        }
    }

    /// The port forwards of card `i` (a `user` card): a table with remove buttons and a form to add one.
    fn forwards(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm, i: usize, running: bool) {
        let nic = &vm.nics[i];
        // The forwards the card will have (a running VM takes new forwards at once, unless other changes to its
        // cards wait for its next start).
        let mut specs = cards_of(vm);
        let Some(at) = specs.iter().position(|s| s.id.as_deref() == Some(nic.id.as_str())) else {
            ui.weak("This card goes at the VM's next start.");
            return;
        };
        let forwards = specs[at].forwards.clone();
        let waiting = running && forwards != nic.forwards;
        ui.label(if waiting {
            "Port forwards (a host port to a guest port), as they will be at the next start"
        } else {
            "Port forwards (a host port to a guest port)"
        });
        let mut remove = None;
        egui::Grid::new(("forwards", i)).striped(true).num_columns(5).show(ui, |ui| {
            for title in ["Protocol", "Host address", "Host port", "Guest port", ""] {
                ui.strong(title);
            }
            ui.end_row();
            for (k, f) in forwards.iter().enumerate() {
                ui.label(f.protocol.to_string());
                ui.label(f.host_address.to_string());
                ui.label(if f.automatic { format!("{} (automatic)", f.host_port) } else { f.host_port.to_string() });
                ui.label(f.guest_port.to_string());
                let r = theme::button(ui, true, theme::DELETE, "Remove");
                let label = format!("Remove forward {} {}", f.protocol, f.host_port);
                r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, &label));
                if r.clicked() {
                    remove = Some(k);
                }
                ui.end_row();
            }
            if forwards.is_empty() {
                ui.weak("none");
                ui.end_row();
            }
        });
        let key = (host, vm.id.clone(), nic.id.clone());
        if self.forward_form.key != key {
            self.forward_form = ForwardForm { key, ..Default::default() };
        }
        let form = &mut self.forward_form;
        let mut add = None;
        {
            ui.horizontal_wrapped(|ui| {
                let l = ui.label("Protocol");
                egui::ComboBox::from_id_salt(("forward-protocol", i))
                    .selected_text(form.protocol.to_string())
                    .width(50.0)
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut form.protocol, Protocol::Tcp, "tcp");
                        ui.selectable_value(&mut form.protocol, Protocol::Udp, "udp");
                    })
                    .response
                    .labelled_by(l.id);
                let l = ui.label("Host address");
                ui.add(egui::TextEdit::singleline(&mut form.address).desired_width(90.0)).labelled_by(l.id);
                let l = ui.label("Host port");
                ui.add(egui::TextEdit::singleline(&mut form.host_port).hint_text("8080").desired_width(50.0))
                    .labelled_by(l.id);
                let l = ui.label("Guest port");
                ui.add(egui::TextEdit::singleline(&mut form.guest_port).hint_text("80").desired_width(50.0))
                    .labelled_by(l.id);
                let parsed = form.forward();
                let filled = !form.host_port.trim().is_empty() || !form.guest_port.trim().is_empty();
                if theme::button(ui, parsed.is_ok(), theme::ADD, "Add forward").clicked() {
                    add = parsed.as_ref().ok().cloned();
                }
                if let (Err(e), true) = (&parsed, filled) {
                    ui.colored_label(ui.visuals().warn_fg_color, e);
                }
            });
        }
        if running {
            ui.weak(RUNNING_REASON);
        }
        if let Some(k) = remove {
            specs[at].forwards.remove(k);
            self.change_nics(host, vm, specs);
        } else if let Some(f) = add {
            specs[at].forwards.push(f);
            self.forward_form.host_port.clear();
            self.forward_form.guest_port.clear();
            self.change_nics(host, vm, specs);
        }
    }

    /// The cards' settings (back end, MAC, MTU), cards added and removed: sent together with *Apply network
    /// changes*. On a running VM they wait for its next start, and the editor shows them.
    fn cards_editor(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm, running: bool) {
        let base = cards_of(vm);
        let key = (host, vm.id.clone());
        if self.cards_form.key != key || self.cards_form.base != base {
            self.cards_form = CardsForm { key, cards: base.iter().map(CardFields::of).collect(), base: base.clone() };
        }
        let form = &mut self.cards_form;
        let mut remove = None;
        for (i, card) in form.cards.iter_mut().enumerate() {
            let id = card.id.clone();
            egui::Grid::new(("card-editor", i)).num_columns(2).show(ui, |ui| {
                ui.strong(format!("Card {id}"));
                if theme::button(ui, true, theme::DELETE, &format!("Remove card {id}")).clicked() {
                    remove = Some(i);
                }
                ui.end_row();
                ui.label("Back end");
                ui.horizontal(|ui| {
                    let combo = egui::ComboBox::from_id_salt(("card-backend", i))
                        .selected_text(card.backend.text())
                        .show_ui(ui, |ui| {
                            for b in [BackendChoice::Nat, BackendChoice::Bridge, BackendChoice::Tap] {
                                ui.selectable_value(&mut card.backend, b, b.text());
                            }
                        })
                        .response;
                    name_for_screen_readers(ui, &combo, &format!("Back end of {id}"));
                    if card.backend != BackendChoice::Nat {
                        let what = if card.backend == BackendChoice::Bridge { "Bridge" } else { "TAP device" };
                        let r =
                            ui.add(egui::TextEdit::singleline(&mut card.device).hint_text("br0").desired_width(80.0));
                        name_for_screen_readers(ui, &r, &format!("{what} of {id}"));
                    }
                });
                ui.end_row();
                ui.label("MAC");
                let r = ui.add(egui::TextEdit::singleline(&mut card.mac).hint_text("new random").desired_width(140.0));
                name_for_screen_readers(ui, &r, &format!("MAC of {id}"));
                ui.end_row();
                ui.label("MTU");
                let r = ui.add(egui::TextEdit::singleline(&mut card.mtu).hint_text("1500").desired_width(60.0));
                name_for_screen_readers(ui, &r, &format!("MTU of {id}"));
                ui.end_row();
            });
        }
        if let Some(i) = remove {
            form.cards.remove(i);
        }
        let specs: Result<Vec<NicSpec>, String> = form.cards.iter().map(CardFields::spec).collect();
        let changed = specs.as_ref().map_or(true, |s| *s != form.base);
        let mut apply = None;
        ui.horizontal(|ui| {
            if theme::button(ui, form.cards.len() < 8, theme::ADD, "Add a card").clicked() {
                let taken: Vec<&str> = form.cards.iter().map(|c| c.id.as_str()).collect();
                let id = (0..).map(|n| format!("net{n}")).find(|id| !taken.contains(&id.as_str())).unwrap_or_default();
                form.cards.push(CardFields::of(&NicSpec { id: Some(id), ..NicSpec::new(NicBackend::User) }));
            }
            if theme::button(ui, changed && specs.is_ok(), theme::CONFIRM, "Apply network changes").clicked() {
                apply = specs.as_ref().ok().cloned();
            }
            if theme::button(ui, changed, theme::REVERT, "Undo network changes").clicked() {
                form.cards = form.base.iter().map(CardFields::of).collect();
            }
        });
        if let Err(e) = &specs {
            ui.colored_label(ui.visuals().warn_fg_color, e);
        }
        if running {
            let pending = vm.pending_changes.iter().any(|c| c == "nics");
            ui.weak(if pending {
                "The cards above wait for the VM's next start (it runs with its old ones until then)."
            } else {
                "The VM runs: new port forwards apply at once, other changes to its cards at its next start."
            });
        }
        if let Some(specs) = apply {
            self.change_nics(host, vm, specs);
        }
        ui.separator();
    }

    /// Asks the host to replace VM `vm`'s cards; its refusal (a port in use, …) becomes a notice.
    fn change_nics(&self, host: usize, vm: &Vm, nics: Vec<NicSpec>) {
        let id = vm.id.clone();
        let change = UpdateVm { nics: Some(nics), ..Default::default() };
        self.backend.act(host, format!("Change the network of {}", vm.name), None, move |c| async move {
            c.update_vm(&id, &change).await
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssh_command_names_the_right_host() {
        let f = PortForward::tcp(2222, 22);
        assert_eq!(ssh_command(&f, None).as_deref(), Some("ssh -p 2222 user@localhost"));
        assert_eq!(ssh_command(&f, Some("lab.example:7443")).as_deref(), Some("ssh -p 2222 user@lab.example"));
        assert_eq!(ssh_command(&f, Some("[fd00::1]:7443")).as_deref(), Some("ssh -p 2222 user@fd00::1"));
        let on = PortForward { host_address: "192.0.2.7".parse().unwrap(), ..PortForward::tcp(22, 22) };
        assert_eq!(ssh_command(&on, Some("lab:7443")).as_deref(), Some("ssh user@192.0.2.7"));
        assert_eq!(ssh_command(&PortForward::tcp(8080, 80), None), None, "not SSH");
        assert_eq!(ssh_command_as(&f, None, "ana").as_deref(), Some("ssh -p 2222 ana@localhost"));
    }

    #[test]
    fn the_card_editor_checks_macs_mtus_and_device_names() {
        let spec = NicSpec {
            id: Some("net1".into()),
            mac: Some("02:00:00:00:00:09".into()),
            ..NicSpec::new(NicBackend::User)
        };
        let mut card = CardFields::of(&spec);
        assert_eq!(card.spec(), Ok(spec.clone()), "an unchanged card is the same spec");
        card.mac = " 02:0A:0b:00:00:01 ".into();
        assert_eq!(card.spec().unwrap().mac.as_deref(), Some("02:0a:0b:00:00:01"));
        for bad in ["01:00:00:00:00:01", "02:00:00:00:00", "02:00:00:00:00:0g", "2:0:0:0:0:1"] {
            card.mac = bad.into();
            assert!(card.spec().unwrap_err().contains("six hex bytes"), "{bad}");
        }
        card.mac.clear();
        assert_eq!(card.spec().unwrap().mac, None, "empty: the host picks one");
        card.mtu = "67".into();
        assert!(card.spec().unwrap_err().contains("MTU"));
        card.mtu = "65520".into();
        assert_eq!(card.spec().unwrap().mtu, Some(65520));
        card.backend = BackendChoice::Bridge;
        assert!(card.spec().unwrap_err().contains("device's name"));
        card.device = "br0".into();
        card.forwards = vec![PortForward::tcp(2222, 22)];
        let bridged = card.spec().unwrap();
        assert_eq!(bridged.backend, NicBackend::Bridge { bridge: "br0".into() });
        assert!(bridged.forwards.is_empty(), "forwards need NAT");
    }

    #[test]
    fn the_forward_form_explains_what_is_wrong() {
        let mut form = ForwardForm { host_port: "8080".into(), guest_port: "80".into(), ..Default::default() };
        assert_eq!(form.forward(), Ok(PortForward::tcp(8080, 80)));
        form.host_port = "0".into();
        assert!(form.forward().unwrap_err().contains("host port"));
        form.host_port = "8080".into();
        form.address = "lab".into();
        assert!(form.forward().unwrap_err().contains("not an IP address"));
    }

    #[test]
    fn rate_limits_are_typed_in_mbit_per_second() {
        assert_eq!(nic_limits_of("", "").unwrap(), NicLimits::default());
        let l = nic_limits_of("100", " 2.5 ").unwrap();
        assert_eq!(l, NicLimits { rx_bps: Some(100_000_000), tx_bps: Some(2_500_000) });
        assert_eq!(nic_limits_text(&l), "at most 100 Mbit/s down, 2.500 Mbit/s up");
        assert_eq!((mbit_text(l.rx_bps), mbit_text(l.tx_bps)), ("100".to_owned(), "2.500".to_owned()));
        assert!(nic_limits_of("0.001", "").unwrap_err().starts_with("Download"), "below one frame a second");
        assert!(nic_limits_of("", "fast").unwrap_err().starts_with("Upload"));
        assert_eq!(nic_limits_text(&NicLimits::default()), "no limit");
    }

    #[test]
    fn a_card_that_is_missing_or_detached_says_why() {
        let nic = NicDefinition {
            id: "net0".into(),
            backend: NicBackend::User,
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            forwards: vec![],
            limits: NicLimits::default(),
        };
        let vm: Vm = serde_json::from_value(serde_json::json!({
            "id": "a", "name": "a", "vcpus": 1, "memory_mib": 64, "disk_bytes": 0, "state": "running"
        }))
        .unwrap();
        assert_eq!(nic_state(&vm, &nic, None).0, "asking the VM…");
        let mut details = vm.clone();
        details.nic_status_error = Some("no answer".into());
        assert_eq!(nic_state(&vm, &nic, Some(&details)), ("unknown: no answer".to_owned(), true));
        details.nic_status_error = None;
        assert!(nic_state(&vm, &nic, Some(&details)).0.contains("not in the running VM"));
        details.nic_status = vec![
            serde_json::from_value(serde_json::json!({
                "id": "net0", "backend": "user", "mac": "02:00:00:00:00:01", "mtu": 1500, "attached": false,
                "error": "passt is not installed", "link_up": true
            }))
            .unwrap(),
        ];
        let (text, problem) = nic_state(&vm, &nic, Some(&details));
        assert!(problem && text.contains("passt is not installed"), "{text}");
        let stopped = Vm { state: VmState::Stopped, ..vm };
        assert!(!nic_state(&stopped, &nic, Some(&details)).1);
    }
}
