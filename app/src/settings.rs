//! The app's settings in the XDG config dir (`~/.config/porthole/settings.json`): the remote hosts. A file
//! that cannot be read is moved aside (`settings.json.bad-<time>`) and replaced by defaults, with a message.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A remote host as the user added it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteHost {
    pub name: String,
    /// `host:port` of its `portholed --listen`.
    pub address: String,
    pub token: String,
    /// SHA-256 of its certificate, pinned at the first connection.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub remotes: Vec<RemoteHost>,
    /// VNC servers opened directly, newest first (addresses only; passwords are never stored).
    #[serde(default)]
    pub recent_vnc: Vec<String>,
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

/// Saves the settings atomically (temp file, fsync, rename).
pub fn save(path: &Path, settings: &Settings) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(settings).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
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
            remotes: vec![RemoteHost {
                name: "lab".into(),
                address: "lab:7443".into(),
                token: "t".into(),
                fingerprint: "ab".into(),
            }],
            recent_vnc: vec!["vnc://lab:5901".into()],
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
}
