//! Connection URIs of hosts reached through libvirt (`qemu+ssh://user@host/system`, …) and SSH host keys: what
//! the user is asked to accept before the first connection. No libvirt library is needed for any of it, so
//! the window uses it while libvirt itself runs in its helper process.

use std::io::Write;
use std::process::{Command, Stdio};

/// A libvirt connection URI taken apart: `driver[+transport]://[user@]host[:port]/path[?k=v&…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnUri {
    pub driver: String,
    /// `ssh`, `libssh`, `libssh2`, `tls`, `tcp`, `unix`, `ext`, or empty (local).
    pub transport: String,
    pub user: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: String,
    pub params: Vec<(String, String)>,
}

impl ConnUri {
    pub fn parse(uri: &str) -> Result<ConnUri, String> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| format!("{uri:?} is not a libvirt URI"))?;
        let (driver, transport) = match scheme.split_once('+') {
            Some((d, t)) => (d.to_string(), t.to_string()),
            None => (scheme.to_string(), String::new()),
        };
        if driver.is_empty() {
            return Err(format!("{uri:?} names no hypervisor driver"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, String::new()),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(percent_decode(u)), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // [v6]:port
            let (h, tail) = h.split_once(']').ok_or_else(|| format!("{uri:?}: unclosed '['"))?;
            (h.to_string(), tail.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        let port = match port {
            Some(p) if !p.is_empty() => Some(p.parse::<u16>().map_err(|_| format!("{uri:?}: bad port {p:?}"))?),
            _ => None,
        };
        let params = query
            .map(|q| {
                q.split('&')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => (percent_decode(k), percent_decode(v)),
                        None => (percent_decode(kv), String::new()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(ConnUri { driver, transport, user, host: (!host.is_empty()).then_some(host), port, path, params })
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether libvirt reaches the daemon over SSH (the `ssh` binary or libssh/libssh2).
    pub fn is_ssh(&self) -> bool {
        matches!(self.transport.as_str(), "ssh" | "libssh" | "libssh2")
    }

    /// Whether the daemon is on this machine's Unix socket (file descriptors can be passed to us).
    pub fn is_local(&self) -> bool {
        (self.transport.is_empty() || self.transport == "unix") && self.host.is_none()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One of a host's SSH keys as `ssh-keyscan` sees it: what to show the user before trusting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`.
    pub key_type: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it (what `ssh` shows when it asks).
    pub fingerprint: String,
    /// The line to add to a known_hosts file to trust it.
    pub known_hosts_line: String,
}

/// The SSH host keys `host:port` offers, with their fingerprints, for the user to compare before the host is
/// added to known_hosts ([`trust_host_key`]). Runs `ssh-keyscan` and `ssh-keygen -lf -`.
pub fn ssh_host_key_fingerprint(host: &str, port: u16) -> Result<Vec<HostKey>, String> {
    if host.starts_with('-') || host.is_empty() {
        return Err(format!("{host:?} is not a host name"));
    }
    let scan = Command::new("ssh-keyscan")
        .args(["-T", "10", "-p", &port.to_string(), host])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh-keyscan (is openssh-client installed?): {e}"))?;
    let text = String::from_utf8_lossy(&scan.stdout);
    let mut keys = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut child = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin, "{line}");
        }
        let out = child.wait_with_output().map_err(|e| format!("ssh-keygen: {e}"))?;
        let fp = String::from_utf8_lossy(&out.stdout);
        let fingerprint = fp.split_whitespace().nth(1).unwrap_or_default().to_string();
        let key_type = line.split_whitespace().nth(1).unwrap_or_default().to_string();
        if fingerprint.starts_with("SHA256:") {
            keys.push(HostKey { key_type, fingerprint, known_hosts_line: line.to_string() });
        }
    }
    if keys.is_empty() {
        let err = String::from_utf8_lossy(&scan.stderr);
        return Err(format!("no SSH host key from {host} port {port}: {}", err.trim()));
    }
    Ok(keys)
}

/// What a known_hosts file says of the keys a host offers now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// One of the host's keys is in the file: connections go through.
    Trusted,
    /// The file knows nothing of the host: show these keys' fingerprints and ask.
    Unknown(Vec<HostKey>),
    /// The file has other keys for this host: the host was reinstalled, or someone is in between. Warn;
    /// never trust silently.
    Changed(Vec<HostKey>),
}

/// The name known_hosts files use for `host:port` (`[host]:port` unless the port is 22).
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

/// The known_hosts file the `ssh` binary (libvirt's `ssh` transport) reads: `~/.ssh/known_hosts` of this
/// process's user.
pub fn default_known_hosts() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".ssh/known_hosts"))
}

/// Compares the keys `host:port` offers (`ssh-keyscan`) with what `known_hosts` holds for it
/// (`ssh-keygen -F`, which also finds hashed entries).
pub fn check_host_key(host: &str, port: u16, known_hosts: &std::path::Path) -> Result<HostKeyCheck, String> {
    let offered = ssh_host_key_fingerprint(host, port)?;
    let out = Command::new("ssh-keygen")
        .arg("-F")
        .arg(known_hosts_name(host, port))
        .arg("-f")
        .arg(known_hosts)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let known: Vec<(&str, &str)> = listed
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('@'))
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            Some((f.next()?, f.next()?))
        })
        .collect();
    let key_of = |k: &HostKey| {
        let mut f = k.known_hosts_line.split_whitespace().skip(1);
        (f.next().unwrap_or_default().to_string(), f.next().unwrap_or_default().to_string())
    };
    if offered.iter().map(key_of).any(|(t, b)| known.iter().any(|&(kt, kb)| kt == t && kb == b)) {
        Ok(HostKeyCheck::Trusted)
    } else if known.is_empty() {
        Ok(HostKeyCheck::Unknown(offered))
    } else {
        Ok(HostKeyCheck::Changed(offered))
    }
}

/// Adds `key` to the known_hosts file at `path` (created if missing).
pub fn trust_host_key(path: &std::path::Path, key: &HostKey) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{}", key.known_hosts_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_uris_apart() {
        let u = ConnUri::parse("qemu+ssh://root@host.example:2222/system?keyfile=/k%20f&no_tty=1").unwrap();
        assert_eq!((u.driver.as_str(), u.transport.as_str()), ("qemu", "ssh"));
        assert_eq!((u.user.as_deref(), u.host.as_deref(), u.port), (Some("root"), Some("host.example"), Some(2222)));
        assert_eq!(u.path, "/system");
        assert_eq!(u.param("keyfile"), Some("/k f"));
        assert!(u.is_ssh() && !u.is_local());
        let l = ConnUri::parse("qemu:///session?socket=/tmp/s").unwrap();
        assert!(l.is_local() && !l.is_ssh());
        assert_eq!(l.param("socket"), Some("/tmp/s"));
        let v6 = ConnUri::parse("qemu+tls://[::1]:16514/system").unwrap();
        assert_eq!((v6.host.as_deref(), v6.port), (Some("::1"), Some(16514)));
        assert!(ConnUri::parse("nonsense").is_err());
        assert!(ConnUri::parse("qemu+ssh://h:99999/system").is_err());
    }
}
