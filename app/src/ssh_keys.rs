//! SSH host keys of libvirt hosts reached over `qemu+ssh://`. libvirt's SSH transport checks the host's key
//! against a known_hosts file (`~/.ssh/known_hosts`, or the URI's `known_hosts=` for libssh) and, being
//! non-interactive, refuses an unknown one. So before the first connection the *Add host* dialog fetches
//! the keys, shows their fingerprints for the user to compare with the server's, and on their word adds
//! them to that file — what `ssh` itself asks on a terminal. A key that changed is shown as such and never
//! trusted from the dialog.

use std::path::PathBuf;

use porthole_api::ssh::{ConnUri, HostKeyCheck, check_host_key, default_known_hosts, known_hosts_name, trust_host_key};

/// A host's SSH keys as checked for the dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKeys {
    /// The URI they were fetched for (a changed URI fetches again).
    pub uri: String,
    /// `host` or `[host]:port`, as known_hosts names it.
    pub name: String,
    /// The known_hosts file the connection checks.
    pub file: PathBuf,
    pub check: HostKeyCheck,
}

/// The SSH host and port of `uri`, if it is an SSH connection.
pub fn ssh_target(uri: &str) -> Option<(String, u16)> {
    let uri = ConnUri::parse(uri).ok()?;
    if !uri.is_ssh() {
        return None;
    }
    Some((uri.host.clone()?, uri.port.unwrap_or(22)))
}

/// Fetches the keys of the SSH host of `uri` and compares them with the known_hosts file its connection
/// checks (the URI's `known_hosts=`, else the user's).
pub fn fetch(uri: &str) -> Result<HostKeys, String> {
    let parsed = ConnUri::parse(uri)?;
    let (host, port) = ssh_target(uri).ok_or_else(|| format!("{uri} is not an SSH connection"))?;
    let file = match parsed.param("known_hosts") {
        Some(f) => PathBuf::from(f),
        None => default_known_hosts().ok_or("HOME is not set: no known_hosts to check the key against")?,
    };
    let check = check_host_key(&host, port, &file)?;
    Ok(HostKeys { uri: uri.to_owned(), name: known_hosts_name(&host, port), file, check })
}

/// Adds the keys of an unknown host, which the user accepted, to the known_hosts file.
pub fn trust(keys: &HostKeys) -> Result<(), String> {
    let HostKeyCheck::Unknown(offered) = &keys.check else {
        return Err(format!("the keys of {} are not unknown: nothing to add", keys.name));
    };
    for key in offered {
        trust_host_key(&keys.file, key).map_err(|e| format!("cannot add the key to {}: {e}", keys.file.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ssh_uris_have_a_target() {
        assert_eq!(ssh_target("qemu+ssh://alice@lab.example.org/system"), Some(("lab.example.org".into(), 22)));
        assert_eq!(ssh_target("qemu+ssh://bob@127.0.0.1:2222/session?socket=/x"), Some(("127.0.0.1".into(), 2222)));
        assert_eq!(ssh_target("qemu+libssh://h/system?known_hosts=/tmp/kh"), Some(("h".into(), 22)));
        assert_eq!(ssh_target("qemu:///system"), None);
        assert_eq!(ssh_target("qemu+tls://host/system"), None);
    }
}
