//! SSH host keys of libvirt hosts reached over `qemu+ssh://`. libvirt's SSH transport checks the host's key
//! against a known_hosts file (`~/.ssh/known_hosts`, or the URI's `known_hosts=`) and, being
//! non-interactive, refuses an unknown one. So before the first connection the *Add host* dialog fetches
//! the keys, shows their fingerprints for the user to compare with the server's, and on their word adds
//! them to that file — what `ssh` itself asks on a terminal.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use porthole_libvirt::{ConnUri, HostKey};

/// A host's SSH keys as fetched for the dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKeys {
    /// The URI they were fetched for (a changed URI fetches again).
    pub uri: String,
    /// `host` or `[host]:port`, as known_hosts names it.
    pub name: String,
    pub keys: Vec<HostKey>,
    /// The known_hosts file the connection checks.
    pub file: PathBuf,
    /// Whether that file has a key for this host already.
    pub known: bool,
}

/// The known_hosts file a connection to `uri` checks: its `known_hosts=` parameter, else the user's.
pub fn known_hosts_of(uri: &ConnUri) -> Option<PathBuf> {
    match uri.param("known_hosts") {
        Some(f) => Some(PathBuf::from(f)),
        None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".ssh/known_hosts")),
    }
}

/// The SSH host and port of `uri`, if it is an SSH connection.
pub fn ssh_target(uri: &str) -> Option<(String, u16)> {
    let uri = ConnUri::parse(uri).ok()?;
    if !uri.is_ssh() {
        return None;
    }
    Some((uri.host.clone()?, uri.port.unwrap_or(22)))
}

/// Fetches the keys of the SSH host of `uri` and whether its known_hosts file has one already.
pub fn fetch(uri: &str) -> Result<HostKeys, String> {
    let parsed = ConnUri::parse(uri)?;
    let (host, port) = ssh_target(uri).ok_or_else(|| format!("{uri} is not an SSH connection"))?;
    let file = known_hosts_of(&parsed).ok_or("HOME is not set: no known_hosts to check the key against")?;
    let keys = porthole_libvirt::ssh_host_key_fingerprint(&host, port)?;
    let name = if port == 22 { host } else { format!("[{host}]:{port}") };
    let known = file.exists()
        && Command::new("ssh-keygen")
            .arg("-F")
            .arg(&name)
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    Ok(HostKeys { uri: uri.to_owned(), name, keys, file, known })
}

/// Adds the keys the user accepted to their known_hosts file (its folder created 0700 if missing).
pub fn trust(keys: &HostKeys) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = keys.file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    for key in &keys.keys {
        porthole_libvirt::trust_host_key(&keys.file, key)
            .map_err(|e| format!("cannot add the key to {}: {e}", keys.file.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ssh_uris_have_a_target_and_known_hosts_follows_the_uri() {
        assert_eq!(ssh_target("qemu+ssh://alice@lab.example.org/system"), Some(("lab.example.org".into(), 22)));
        assert_eq!(ssh_target("qemu+ssh://bob@127.0.0.1:2222/session?socket=/x"), Some(("127.0.0.1".into(), 2222)));
        assert_eq!(ssh_target("qemu:///system"), None);
        assert_eq!(ssh_target("qemu+tls://host/system"), None);
        let uri = ConnUri::parse("qemu+libssh://h/system?known_hosts=/tmp/kh").unwrap();
        assert_eq!(known_hosts_of(&uri), Some(PathBuf::from("/tmp/kh")));
    }
}
