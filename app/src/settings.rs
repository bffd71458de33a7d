//! The app's settings in the XDG config dir (`~/.config/porthole/settings.json`): the remote hosts. A file
//! that cannot be read is moved aside (`settings.json.bad-<time>`) and replaced by defaults, with a message.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A remote host as the user added it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteHost {
    pub name: String,
    /// A Porthole daemon (the default) or a libvirt connection.
    #[serde(default, skip_serializing_if = "RemoteKind::is_porthole")]
    pub kind: RemoteKind,
    /// Porthole: `host:port` of its `portholed --listen`. libvirt: the connection URI (`qemu:///system`,
    /// `qemu+ssh://user@host/system`).
    pub address: String,
    /// Porthole: the API token. libvirt: unused.
    #[serde(default)]
    pub token: String,
    /// Porthole: SHA-256 of its certificate, pinned at the first connection. libvirt over SSH: the host key's
    /// fingerprint the user accepted (the key itself is in `~/.ssh/known_hosts`, where `ssh` checks it).
    #[serde(default)]
    pub fingerprint: String,
}

/// The kinds of remote host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteKind {
    #[default]
    Porthole,
    Libvirt,
}

impl RemoteKind {
    fn is_porthole(&self) -> bool {
        *self == RemoteKind::Porthole
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub remotes: Vec<RemoteHost>,
    /// VNC servers opened directly, newest first (addresses only; passwords are never stored).
    #[serde(default)]
    pub recent_vnc: Vec<String>,
    /// Light, dark, or as the desktop says.
    #[serde(default)]
    pub theme: Theme,
    /// How a new console fits its screen.
    #[serde(default)]
    pub console_scaling: ConsoleScaling,
    /// The host selected when the window opens (by name; the local host when absent or gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_host: Option<String>,
    /// Where the window was and how big, to open it the same way next time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowGeometry>,
    /// Whether the consoles open when the window closed open again next time.
    #[serde(default = "yes")]
    pub restore_consoles: bool,
    /// The consoles open when the window closed (VMs by host and VM name; VNC servers by address).
    #[serde(default)]
    pub open_consoles: Vec<SavedConsole>,
    /// The keys that take the keyboard back from a console.
    #[serde(default)]
    pub release_keys: ReleaseKeys,
    /// Where this computer's VMs and images live (the local daemon's `--data-dir`, used when Porthole starts
    /// it); absent: `~/.local/share/porthole`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_dir: Option<std::path::PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            remotes: Vec::new(),
            recent_vnc: Vec::new(),
            theme: Theme::default(),
            console_scaling: ConsoleScaling::default(),
            default_host: None,
            window: None,
            restore_consoles: true,
            open_consoles: Vec::new(),
            release_keys: ReleaseKeys::default(),
            vm_dir: None,
        }
    }
}

/// The window's colours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Theme {
    /// As the desktop says (dark or light).
    #[default]
    System,
    Light,
    Dark,
}

/// How a new console fits its screen (the console's *Scaling* menu changes it for that console).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleScaling {
    /// Scaled to fit, smoothed.
    #[default]
    Fit,
    /// Whole multiples, sharp pixels.
    Sharp,
    /// One screen pixel per window pixel.
    Actual,
    /// The guest's screen follows the console's size (where the server can).
    Resize,
}

/// The keys that take the keyboard back from a console (it has it once its screen is clicked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseKeys {
    /// Both held (virt-manager's default).
    #[default]
    CtrlAlt,
    /// For guests that need Ctrl+Alt combinations themselves (QEMU's window uses it).
    CtrlAltG,
    /// virt-viewer's and remote-viewer's default.
    ShiftF12,
}

impl ReleaseKeys {
    pub const ALL: [ReleaseKeys; 3] = [ReleaseKeys::CtrlAlt, ReleaseKeys::CtrlAltG, ReleaseKeys::ShiftF12];

    pub fn text(self) -> &'static str {
        match self {
            ReleaseKeys::CtrlAlt => "Ctrl+Alt",
            ReleaseKeys::CtrlAltG => "Ctrl+Alt+G",
            ReleaseKeys::ShiftF12 => "Shift+F12",
        }
    }

    /// Whether the keys are held this frame (`pressed`: keys pressed this frame).
    pub fn held(self, modifiers: egui::Modifiers, pressed: impl Fn(egui::Key) -> bool) -> bool {
        match self {
            ReleaseKeys::CtrlAlt => modifiers.ctrl && modifiers.alt,
            ReleaseKeys::CtrlAltG => modifiers.ctrl && modifiers.alt && pressed(egui::Key::G),
            ReleaseKeys::ShiftF12 => modifiers.shift && pressed(egui::Key::F12),
        }
    }
}

/// The window's position and inner size, in points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowGeometry {
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

/// A console tab to open again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SavedConsole {
    /// A VM's console: its host's name ("Local" for this computer) and the VM's name.
    Vm { host: String, vm: String },
    /// A VNC server opened directly (`vnc://…`, `vnc+unix://…`).
    Vnc { address: String },
}

/// Where the settings live.
pub fn path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PORTHOLE_CONFIG_DIR") {
        return Some(PathBuf::from(dir).join("settings.json"));
    }
    directories::ProjectDirs::from("", "", "porthole").map(|p| p.config_dir().join("settings.json"))
}

/// Loads the settings; a problem comes back as a message (the defaults are used then).
pub fn load(path: &Path) -> (Settings, Option<String>) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Settings::default(), None),
        Err(e) => return (Settings::default(), Some(format!("cannot read {}: {e}; using defaults", path.display()))),
    };
    match serde_json::from_slice(&bytes) {
        Ok(s) => (s, None),
        Err(e) => {
            let stamp =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let backup = path.with_file_name(format!("settings.json.bad-{stamp}"));
            let moved = std::fs::rename(path, &backup).is_ok();
            let note = if moved { format!("; it was kept as {}", backup.display()) } else { String::new() };
            (
                Settings::default(),
                Some(format!("the settings file {} is damaged ({e}): defaults are used{note}", path.display())),
            )
        }
    }
}

/// Saves the settings atomically (temp file, fsync, rename). The file holds the remote hosts' API tokens:
/// it is readable by the user only (0600), its folder created 0700.
pub fn save(path: &Path, settings: &Settings) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(settings).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // A temp file left by an older version keeps its mode when reopened: narrow it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_file_is_kept_aside_and_defaults_used() {
        let dir = std::env::temp_dir().join(format!("porthole-settings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.json");
        let s = Settings {
            remotes: vec![
                RemoteHost {
                    name: "lab".into(),
                    kind: RemoteKind::Porthole,
                    address: "lab:7443".into(),
                    token: "t".into(),
                    fingerprint: "ab".into(),
                },
                RemoteHost {
                    name: "virt".into(),
                    kind: RemoteKind::Libvirt,
                    address: "qemu+ssh://me@virt/system".into(),
                    token: String::new(),
                    fingerprint: "SHA256:abc".into(),
                },
            ],
            recent_vnc: vec!["vnc://lab:5901".into()],
            theme: Theme::Dark,
            window: Some(WindowGeometry { x: -10, y: 20, width: 1300, height: 800 }),
            open_consoles: vec![
                SavedConsole::Vm { host: "Local".into(), vm: "web".into() },
                SavedConsole::Vnc { address: "vnc://lab:5901".into() },
            ],
            ..Settings::default()
        };
        save(&path, &s).unwrap();
        assert_eq!(load(&path), (s, None));
        std::fs::write(&path, b"{ nope").unwrap();
        let (loaded, problem) = load(&path);
        assert_eq!(loaded, Settings::default());
        assert!(problem.unwrap().contains("damaged"));
        assert!(
            std::fs::read_dir(&dir).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("settings.json.bad-"))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_file_with_the_tokens_is_the_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("porthole-settings-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("config").join("settings.json");
        // A temp file an older version left world-readable.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, b"old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        let remote = RemoteHost {
            name: "lab".into(),
            kind: RemoteKind::Porthole,
            address: "lab:7443".into(),
            token: "pht_x".into(),
            fingerprint: "ab".into(),
        };
        save(&path, &Settings { remotes: vec![remote], ..Settings::default() }).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "settings.json is {mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
        let fresh = dir.join("new").join("settings.json");
        save(&fresh, &Settings::default()).unwrap();
        let dir_mode = std::fs::metadata(fresh.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "a new config folder is {dir_mode:o}");
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_older_file_gets_the_new_defaults() {
        let s: Settings = serde_json::from_str(r#"{"remotes":[],"recent_vnc":[]}"#).unwrap();
        assert_eq!(s, Settings::default());
        assert!(s.restore_consoles && s.theme == Theme::System && s.console_scaling == ConsoleScaling::Fit);
    }

    #[test]
    fn each_release_combination_needs_all_its_keys() {
        use egui::{Key, Modifiers};
        let none = |_: Key| false;
        let g = |k: Key| k == Key::G;
        let f12 = |k: Key| k == Key::F12;
        let ctrl_alt = Modifiers::CTRL | Modifiers::ALT;
        assert!(ReleaseKeys::CtrlAlt.held(ctrl_alt, none));
        assert!(!ReleaseKeys::CtrlAlt.held(Modifiers::CTRL, none));
        assert!(!ReleaseKeys::CtrlAltG.held(ctrl_alt, none), "Ctrl+Alt alone goes to the guest");
        assert!(ReleaseKeys::CtrlAltG.held(ctrl_alt, g));
        assert!(!ReleaseKeys::ShiftF12.held(Modifiers::NONE, f12));
        assert!(ReleaseKeys::ShiftF12.held(Modifiers::SHIFT, f12));
        assert!(!ReleaseKeys::ShiftF12.held(ctrl_alt, none));
        let saved = serde_json::to_string(&ReleaseKeys::ShiftF12).unwrap();
        assert_eq!(saved, "\"shift-f12\"");
    }
}
