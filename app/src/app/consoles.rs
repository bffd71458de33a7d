//! Console tabs: a VM's screen (through a console ticket from its host) or any VNC server's, each in a tab
//! or detached into a window of its own; the *Connect to a VNC server* dialog; and a password prompt for
//! servers that ask for one.

use std::path::PathBuf;

use porthole_api::VmState;

use super::theme;
use super::{PortholeApp, Tab, preferences};
use crate::console::Console;

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
    pub(super) fn title(&self) -> String {
        match self {
            VncTarget::Tcp(a) => a.clone(),
            VncTarget::Unix(p) => p.display().to_string(),
        }
    }

    /// A connected stream: Unix directly; TCP bridged to a socket pair (the RFB client speaks over Unix
    /// streams) by two copying threads.
    pub(super) fn connect(&self) -> Result<std::os::unix::net::UnixStream, String> {
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
pub(super) struct ConsoleTab {
    pub(super) vm: Option<(usize, String)>,
    pub(super) target: Option<VncTarget>,
    pub(super) console: Console,
    /// The password field shown when a server asks for one.
    pub(super) password: String,
    /// Shown in a window of its own instead of the tab.
    pub(super) detached: bool,
}

impl PortholeApp {
    /// Opens the consoles asked for outside the window: `porthole --console NAME` (once the local host's
    /// list has the VM) and the backend's requests (the demo VM, a click on a screen in the grid).
    pub(super) fn open_requested_consoles(&mut self, ctx: &egui::Context) {
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
                    ctx.request_repaint_after(std::time::Duration::from_millis(100));
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
    }

    pub(super) fn vnc_window(&mut self, ctx: &egui::Context) {
        let Some(address) = self.vnc_dialog.as_mut() else { return };
        let mut open = true;
        let mut go = None;
        theme::dialog(ctx, "Connect to a VNC server").open(&mut open).show(ctx, |ui| {
            let l = ui.label("Server");
            ui.add(egui::TextEdit::singleline(address).hint_text("vnc://host:5901 or vnc+unix:///path/to/socket"))
                .labelled_by(l.id);
            let parsed = address.trim().parse::<VncTarget>();
            if let Err(e) = &parsed
                && !address.is_empty()
            {
                ui.colored_label(ui.visuals().warn_fg_color, e);
            }
            if theme::button(ui, parsed.is_ok(), theme::CONSOLE, "Open console").clicked() {
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

    pub(super) fn open_console(&mut self, host: usize, vm: &porthole_api::Vm) {
        let this = Some((host, vm.id.clone()));
        if let Some(i) = self.consoles.iter().position(|t| t.vm == this && !t.console.closed()) {
            self.tab = Tab::Console(i);
            return;
        }
        self.consoles.retain(|t| t.vm != this);
        let Some(connection) = self.backend.model().hosts.get(host).and_then(|h| h.connection.clone()) else {
            return;
        };
        let id = vm.id.clone();
        let runtime = self.backend.clone();
        let connect = move || -> Result<porthole_api::rfb::RfbClient, String> {
            let stream = runtime.runtime().block_on(connection.open_console(&id)).map_err(|e| e.to_string())?;
            porthole_api::rfb::RfbClient::over(stream, None).map_err(|e| e.to_string())
        };
        let backend = self.backend.clone();
        let mut console = Console::open(vm.name.clone(), connect, move || backend.repaint());
        console.scaling = preferences::scaling(self.settings.console_scaling);
        console.release_keys = self.settings.release_keys;
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
        console.release_keys = self.settings.release_keys;
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

    pub(super) fn console_tab(&mut self, ui: &mut egui::Ui, i: usize) {
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
                if theme::button(ui, true, theme::CONFIRM, "Connect").clicked()
                    || (r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)))
                {
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
                again = theme::button(ui, true, theme::RECONNECT, "Reconnect").clicked();
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
            if theme::button(ui, true, theme::ATTACH, "Bring back into this tab").clicked() {
                tab.detached = false;
            }
            return;
        }
        if theme::button(ui, true, theme::DETACH, "Open in a window").clicked() {
            tab.detached = true;
        }
        tab.console.show(ui);
    }

    /// Consoles moved into windows of their own (closing the window brings the console back to its tab).
    pub(super) fn console_windows(&mut self, ctx: &egui::Context) {
        for tab in self.consoles.iter_mut().filter(|t| t.detached) {
            let id = egui::ViewportId::from_hash_of(("console", &tab.vm, &tab.target, &tab.console.title));
            let builder =
                egui::ViewportBuilder::default().with_title(&tab.console.title).with_inner_size([1024.0, 700.0]);
            let close = ctx.show_viewport_immediate(id, builder, |ui, _class| {
                let mut back = false;
                egui::CentralPanel::default().show(ui, |ui| {
                    back = theme::button(ui, true, theme::ATTACH, "Back to the tab").clicked();
                    tab.console.show(ui);
                });
                back || ui.ctx().input(|i| i.viewport().close_requested())
            });
            if close {
                tab.detached = false;
            }
        }
    }
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
}
